"""Bad input on the command line or in saved results: exit 2, one ``error: …`` line on stderr, no traceback,
nothing written, inputs untouched."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO
from test_heads_cli import BASE_ARGS, base_run, cli  # noqa: F401 (base_run: the shared reference sweep)

from probe.errors import REASON_CHARS, BadInput, cli_main, error_reason


def one_error_line(rc: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------------
# argparse: one line, every CLI

MODULES = ["probe.heads", "probe.eval", "probe.convert", "probe.families", "probe.synthetic", "probe.zoo.__main__", "analyses.shift", "analyses.merge",
           "analyses.trajectory", "analyses.replicate", "analyses.finetune", "figures.__main__"]
BENCH = ["sweep", "eval", "merge", "train_step", "fsdp_load", "lora_save", "memory"]


def _main(name: str):
    if name in BENCH:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main
    return importlib.import_module(name).main


@pytest.mark.parametrize("name", MODULES + BENCH)
def test_usage_error_is_one_line_and_help_stays_full(name, capsys):
    main = _main(name)

    def parse(*argv: str) -> int:
        with pytest.raises(SystemExit) as e:
            main(list(argv))
        return e.value.code

    rc = parse("--no-such-option", "abc")
    line = one_error_line(rc, capsys.readouterr().err)
    assert line.endswith("(see --help)")
    assert parse("--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and len(out.splitlines()) > 5


@pytest.mark.parametrize("name", MODULES + BENCH)
def test_help_prints_on_an_ascii_terminal(name, monkeypatch):
    """PYTHONIOENCODING=ascii (or a latin-1 locale): the ×, → and Δ of a help text come out escaped; strict
    encoding ended --help in a UnicodeEncodeError traceback."""
    import io

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    with pytest.raises(SystemExit) as e:
        cli_main(_main(name), ["--help"])
    assert e.value.code == 0
    out.flush()
    text = raw.getvalue().decode("ascii")
    assert text.startswith("usage:") and len(text.splitlines()) > 5


def test_help_prints_on_an_ascii_terminal_in_a_subprocess():
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    r = subprocess.run([sys.executable, "-m", "probe.heads", "--help"], cwd=REPO, capture_output=True, text=True,
                       env=env, encoding="ascii")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "item \\xd7 head" in r.stdout  # the × of "item × head", escaped


@pytest.mark.parametrize("name", MODULES + BENCH)
def test_help_states_each_default_once(name, capsys):
    """``probe.heads --help`` read ``--attribution-items … (default 1; several are right-padded …) (default: 1)``:
    the option's own text named its default and the help formatter appended it again. Each option's help names
    its default at most once."""
    import re

    with pytest.raises(SystemExit):
        _main(name)(["--help"])
    out = capsys.readouterr().out
    for block in re.split(r"\n  (?=-)", out):
        flat = " ".join(block.split())
        assert len(re.findall(r"\(default\b", flat)) <= 1, flat


@pytest.mark.parametrize("name", MODULES + BENCH)
def test_help_shows_no_docstring_markup(name, capsys):
    """``probe.convert --help`` and the bench scripts' (their module docstrings as description) showed reST's
    double backquotes: ``DIR/convert-<split>.json``, ``--random-config``. A help reads as plain text."""
    with pytest.raises(SystemExit):
        _main(name)(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out, [ln for ln in out.splitlines() if "``" in ln]


def _parsers(name: str, monkeypatch) -> list:
    """The parser ``name``'s main builds, and each subcommand's: caught at its parse, before anything runs."""
    import argparse

    from probe.errors import ArgParser

    built = []

    def caught(self, *args, **kwargs):
        built.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(ArgParser, "parse_known_args", caught)
    with pytest.raises(KeyboardInterrupt):
        _main(name)([])
    subs = [sp for p in built for a in p._actions if isinstance(a, argparse._SubParsersAction)
            for sp in a.choices.values()]
    return built + subs


@pytest.mark.parametrize("name", MODULES + BENCH)
def test_every_option_says_what_it_does_and_its_default(name, monkeypatch):
    """``probe.synthetic --help`` listed --seed, --image-size and --open-fraction bare (and bench/merge.py's --dtype,
    bench/lora_save.py's --vocab-size and --rank): no meaning, no default. Every option and positional of every
    CLI has help text, and one with a default other than None/False shows it (the shared formatter used to hide
    a default of 0, which equals False). An option taking a value whose default is None or [] says what leaving it
    out does: probe.heads/eval --system-prompt and --template, probe.eval --reference, probe.zoo build --steps,
    analyses.merge --weights and 22 others did not (help44)."""
    import argparse

    for p in _parsers(name, monkeypatch):
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
            assert a.help and a.help.strip(), f"{where} has no help text"
            shown = " ".join((p._get_formatter()._expand_help(a) or "").split())
            if a.default is not None and a.default is not False and a.default != []:
                assert re.search(r"\bdefault\b", shown), f"{where} does not show its default {a.default!r}: {shown}"
            elif a.nargs != 0 and not a.required and a.help != argparse.SUPPRESS:
                # a value left out means something too (the template's system prompt, no paired differences,
                # each organism's own steps): said, not left to the reader to guess
                assert re.search(r"\bdefault\b", shown), f"{where} does not say what leaving it out does: {shown}"
            # one form, argparse's own "(default: X)", not also "(default X)" in a third of them
            assert not re.search(r"\(default(?!:)", shown), f"{where} writes its default another way: {shown}"


# one concept, one option name in every command; another spelling is at most an alias of it (the same action)
SYNONYMS = {"--batch": "--batch-size", "--output": "--out", "--out-dir": "--out", "--force": "--overwrite",
            "--model-dir": "--model", "--dataset": "--data", "--n-items": "--limit", "--silent": "--quiet"}


@pytest.mark.parametrize("name", MODULES + BENCH)
def test_one_concept_has_one_option_name(name, monkeypatch):
    """bench/train_step.py took its rows per batch as --batch, where analyses.finetune, probe.heads, probe.eval and
    the other benchmarks say --batch-size. Such a spelling is kept only as an alias of the shared name."""
    parsers = _parsers(name, monkeypatch)
    monkeypatch.undo()
    for p in parsers:
        for a in p._actions:
            odd = [o for o in a.option_strings if o in SYNONYMS and SYNONYMS[o] not in a.option_strings]
            assert not odd, f"{p.prog} {odd[0]}: the other commands call it {SYNONYMS[odd[0]]}"
    if name == "train_step":
        (p,) = parsers
        assert p.parse_args(["--batch", "5"]).batch_size == p.parse_args(["--batch-size", "5"]).batch_size == 5


@pytest.mark.parametrize("name, kind", [("probe.heads", "heads"), ("probe.eval", "eval"), ("analyses.shift", "shift"),
                                        ("analyses.merge", "merge"), ("analyses.trajectory", "trajectory"),
                                        ("analyses.replicate", "report"), ("analyses.finetune", "steps")])
def test_help_says_how_its_figures_are_redrawn(name, kind, capsys):
    """Each command that leaves figures (or, for analyses.finetune, checkpoints whose evaluations Figure 3 draws)
    shows among its examples the ``python -m figures`` line that redraws them from its saved files; none did, and
    a salience merge's merge_heads figure is drawn by nothing else."""
    with pytest.raises(SystemExit):
        _main(name)(["--help"])
    examples = capsys.readouterr().out.split("\nexamples:\n", 1)[1]
    assert f"  python -m figures {kind} runs/" in examples, examples


@pytest.mark.parametrize("name, files", [
    ("probe.heads", ["heads.csv", "baseline.json", "items.parquet", "heatmap_", "run.json"]),
    ("probe.eval", ["scores.csv", "items.parquet", "table.md", "eval.{png,pdf}", "run.json"]),
    ("probe.convert", ["<split>-00000-of-00001.parquet", "convert-<split>.json"]),
    ("probe.synthetic", ["<split>-00000-of-00001.parquet"]), ("analyses.shift", ["shift.csv", "summary.json"]),
    ("analyses.merge", ["merge_weights.csv", "merge.json", "carriers/<name>/"]),
    ("analyses.trajectory", ["coords.csv", "points.csv", "features.npz"]),
    ("analyses.finetune", ["checkpoint-<step>/", "train_log.csv"]), ("analyses.replicate", ["report.md", "report.html"])])
def test_help_says_what_the_command_writes(name, files, capsys):
    """probe.heads, probe.eval and analyses.merge --help said what they measure but not what they write (their
    --out read "output directory"); every command's help names the files it leaves."""
    with pytest.raises(SystemExit):
        _main(name)(["--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert not [f for f in files if f not in flat], flat


@pytest.mark.parametrize("name, argv, kind", [
    ("probe.heads", ["--model", "organism-base", "--data", "probe/zoo/data/text", "--layers", "0", "--heads", "0",
                     "--limit", "2", "--no-generate", "--quiet"], "heads"),
    ("analyses.shift", ["--base", "organism-base", "--models", "organism-vl", "--quiet"], "shift")])
def test_the_closing_line_says_where_the_results_are_and_how_to_redraw_them(name, argv, kind, tmp_path, capfd):
    """A finished run's last line said where its results went (``results in runs/heads/``) but not how its figures
    are drawn again, which only --help's examples showed. It names the ``python -m figures`` command, and that
    command, run as printed, draws them (from --no-figures' run too)."""
    import shlex

    from figures.__main__ import main as figures_main

    out = tmp_path / "a run"  # a space: the printed command quotes it
    assert cli_main(_main(name), [*argv, "--no-figures", "--out", str(out)]) == 0
    last = capfd.readouterr().out.strip().splitlines()[-1]
    command = f"python -m figures {kind} {shlex.quote(str(out))}"
    assert last.startswith(f"results in {out}/") and last.endswith(f"(figures: {command})"), last
    assert not list(out.glob("*.png"))
    assert figures_main(shlex.split(command)[3:]) == 0
    assert list(out.glob("*.png"))
    if kind == "heads":  # its summary counted in English: it read "1 layers × 1 heads, 2 items"
        from figures.results import load

        assert "(validation), 1 layer × 1 head, 2 items, baseline" in repr(load(out)), repr(load(out))


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("name", MODULES + BENCH)
def test_every_example_in_a_help_parses(name, monkeypatch):
    """Each ``python -m M …`` line among a command's --help examples (and in a bench script's docstring) is a
    command line M's own parser accepts: a renamed or misspelt flag in an example fails here, not in a user's
    shell."""
    import shlex

    from probe.errors import ArgParser

    parsers = _parsers(name, monkeypatch)
    monkeypatch.undo()
    lines = [e for p in parsers for e in p.examples] + [
        ln.strip() for p in parsers for ln in (p.description or "").splitlines() if ln.strip().startswith("python ")]
    runs = []
    for line in lines:
        words = shlex.split(line.rstrip("\\"), comments=True)
        words = words[:words.index(">")] if ">" in words else words  # a shell redirection
        if any(w.startswith("[") for w in words):  # a synopsis ([--k 3] …), not a command line
            continue
        if "-m" in words and words[0] in ("python", "torchrun"):
            runs.append((words[words.index("-m") + 1], words[words.index("-m") + 2:]))
        elif words[:1] == ["python"] and words[1].startswith("bench/"):
            runs.append((Path(words[1]).stem, words[2:]))
    assert runs or not lines, lines
    original = ArgParser.parse_known_args

    def parsed(self, args=None, namespace=None):
        _, extra = original(self, args, namespace)
        assert not extra, f"{self.prog}: unrecognized {extra}"
        raise _Parsed

    monkeypatch.setattr(ArgParser, "parse_known_args", parsed)
    for module, argv in runs:
        main = _main(module if module in BENCH else {"figures": "figures.__main__",
                                                     "probe.zoo": "probe.zoo.__main__"}.get(module, module))
        with pytest.raises(_Parsed):
            main(argv)


def test_a_list_option_given_twice_is_a_usage_error(capsys):
    """argparse kept only the last of ``--data a --data b``: probe.eval ran on b alone (a text model: every row
    n/a) and exited 0. Every list option of every CLI is refused the second time; a scalar repeated stays as
    argparse has it (the last wins)."""
    from probe.errors import ArgParser

    p = ArgParser(prog="x")
    p.add_argument("--data", nargs="+")
    p.add_argument_group("g").add_argument("--models", nargs="*", default=[])
    p.add_argument("--seed", type=int)
    args = p.parse_args(["--data", "a", "b", "--models", "m", "--seed", "1", "--seed", "2"])
    assert (args.data, args.models, args.seed) == (["a", "b"], ["m"], 2)
    assert p.parse_args(["--data", "c"]).data == ["c"]  # the same parser, another command line
    for argv, name in ((["--data", "a", "--data", "b"], "--data"), (["--data", "a", "--models", "m", "--models"],
                                                                      "--models")):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        line = one_error_line(e.value.code, capsys.readouterr().err)
        assert line == f"error: {name} given twice: list all its values after one {name} (see --help)"
    with pytest.raises(SystemExit) as e:  # the command a user ran
        _main("probe.eval")(["--models", "organism-base", "--data", "probe/zoo/data/text", "--data",
                             "probe/zoo/data/image"])
    assert "--data given twice" in one_error_line(e.value.code, capsys.readouterr().err)


@pytest.mark.parametrize("name, argv", [
    ("probe.heads", []), ("probe.eval", ["--models", "m", "--data", "d"]), ("probe.convert", ["mmlu", "src"]),
    ("analyses.shift", ["--base", "b", "--models", "m"]), ("analyses.merge", ["--models", "a", "b"]),
    ("analyses.trajectory", ["--base", "b"]), ("analyses.finetune", ["--model", "m", "--data", "text=d", "--steps", "2"]),
    ("analyses.replicate", []), ("probe.synthetic", [])])
def test_a_tilde_in_out_is_the_home_dir_as_in_every_input(name, argv, tmp_path, monkeypatch):
    """--out '~/runs/x' (quoted, or from a script) wrote into a folder named '~' under the working dir, while --model
    and --data expand '~' and the check that --out is no input looked at the home dir's path (probe.convert alone
    expanded it). probe.synthetic's did not until 2026-12-05: it made the folder '~' and then stopped with a
    traceback when pyarrow, which expands it, wrote into a home-dir folder that did not exist."""
    monkeypatch.setenv("HOME", str(tmp_path))
    args = importlib.import_module(name).build_parser().parse_args([*argv, "--out", "~/runs/x"])
    assert args.out == tmp_path / "runs" / "x"


@pytest.mark.parametrize("name, argv, dest", [
    ("figures.__main__", ["heads", "~/r"], "dir"), ("analyses.merge", ["--models", "a", "--shift", "~/r"], "shift_dir"),
    ("analyses.merge", ["--models", "a", "--salience", "~/r"], "salience"),
    ("analyses.merge", ["--models", "a", "--base-salience", "~/r"], "base_salience"),
    ("analyses.trajectory", ["--base", "b", "--runs", "~/r"], "runs"), ("analyses.replicate", ["--config", "~/r"], "config"),
    ("probe.heads", ["--template", "~/r"], "template"), ("probe.convert", ["mmlu", "~/r"], "src"),
    ("probe.convert", ["mmlu", "s", "--videos", "~/r"], "videos")])
def test_a_tilde_in_an_input_path_is_the_home_dir(name, argv, dest, tmp_path, monkeypatch):
    """``python -m figures shift '~/runs/shift'`` said the folder was not a directory, and analyses.merge's --shift,
    --salience and --base-salience, trajectory's --runs, replicate's --config and probe.heads' --template read a
    folder named '~' under the working dir, while --out, --model and --data expand '~'."""
    parser = _parsers(name, monkeypatch)[0]
    monkeypatch.undo()
    monkeypatch.setenv("HOME", str(tmp_path))
    value = getattr(parser.parse_args([*argv, *([] if name.startswith("figures") else ["--out", "o"])]), dest)
    assert value in (tmp_path / "r", [tmp_path / "r"]), value


def test_gpu_check_script_answers_help_and_refuses_options(tmp_path):
    """``bench/gpu_check.sh --help`` took --help for its OUT_DIR: mkdir printed its own usage and the script went on
    to the GPU steps, every log redirected into a folder that was never made. It prints its header and exits 0;
    an unknown option or a second argument exits 2 with one line; nothing is created either way."""
    script = str(REPO / "bench" / "gpu_check.sh")
    done = subprocess.run(["bash", script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "bench/gpu_check.sh [OUT_DIR]" in done.stdout and "Writes to OUT_DIR" in done.stdout
    assert "set -u" not in done.stdout and not done.stdout.startswith("#")
    for argv in (["--bogus"], ["a", "b"]):
        done = subprocess.run(["bash", script, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        one_error_line(done.returncode, done.stderr)
    assert list(tmp_path.iterdir()) == []


def test_every_cli_uses_the_shared_parser():
    found = [f"{p}:{i}" for d in ("probe", "analyses", "figures", "bench") for p in sorted((REPO / d).rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if "argparse.ArgumentParser(" in line]
    assert not found, found


def _text_io_without_encoding(path: Path) -> list[str]:
    """Calls in ``path`` that read or write text in the locale's encoding: ``open()`` in a text mode,
    ``Path.read_text()`` / ``write_text()``, none of them given ``encoding=``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name in ("read_text", "write_text") and isinstance(f, ast.Attribute):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
        elif name == "open" and isinstance(f, ast.Name):
            given = node.args[1:2] + [k.value for k in node.keywords if k.arg == "mode"]
            mode = given[0] if given else None
            if not (isinstance(mode, ast.Constant) and "b" in mode.value):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_text_files_are_read_and_written_as_utf8():
    """Under a locale that is not UTF-8 (latin-1, on a machine that has it), a text file opened without
    ``encoding=`` is read and written in that locale's encoding: a prompt template's non-ASCII text read as
    mojibake (a silently different prompt), and shift.csv or merge_weights.csv written in latin-1 for readers
    that expect UTF-8."""
    found = [hit for d in ("probe", "analyses", "figures", "bench") for p in sorted((REPO / d).rglob("*.py"))
             for hit in _text_io_without_encoding(p)]
    assert not found, found


def test_readme_names_every_module_and_every_command_it_shows_has_a_help():
    """README's Layout names every module of probe/, analyses/, figures/ and bench/ (errors.py, align.py,
    checkpoints.py, sketch.py, tiny.py, writer.py, figures' steps.py and four benchmarks were missing), and every
    ``python -m X`` the README shows is a CLI of MODULES, whose --help the test above runs."""
    import re

    readme = (REPO / "README.md").read_text()
    layout = readme.split("\n## Layout\n", 1)[1]
    modules = [p.relative_to(REPO) for d in ("probe", "analyses", "figures", "bench") for p in sorted((REPO / d).glob("*"))
               if (p.suffix in (".py", ".sh") and p.name != "__init__.py") or (p.is_dir() and not p.name.startswith("_"))]
    missing = [str(m) for m in modules if f"`{m.name}" not in layout]
    assert not missing, f"README's Layout does not name {missing}"
    shown = set(re.findall(r"python -m ([\w.]+)", readme)) - {"pytest"}
    clis = {m.removesuffix(".__main__") for m in MODULES}
    assert shown <= clis, f"README shows python -m {sorted(shown - clis)}, which MODULES does not test"



def _readme_command_lines(readme: str) -> list[str]:
    """Every command line of the README: code blocks' lines (a ``\\`` continuation joined) and inline code spans,
    a trailing ``# comment`` cut off."""
    spans: list[str] = []

    def block(m: re.Match) -> str:
        spans.extend(re.sub(r"\\\n\s*", " ", m.group(1)).splitlines())
        return ""

    prose = re.sub(r"```[a-z]*\n(.*?)```", block, readme, flags=re.S)
    spans += [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", prose)]
    return [re.sub(r"\s+#.*$", "", s) for s in spans if not s.lstrip().startswith("#")]


def test_every_option_the_readme_gives_a_command_is_one_of_its_own(monkeypatch):
    """A flag the README shows after ``python -m X`` or ``bench/X.py`` (in a code block or an inline span, up to
    ``&&``, ``;`` or a pipe) is an option of X's parser, or of the subcommand it names: a renamed or dropped option
    left in the manual would exit 2 for whoever copies the line. Conversely each option of every ``python -m`` CLI
    is named somewhere in the README (--help is not its only documentation)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = {m.removesuffix(".__main__"): m for m in MODULES} | {f"bench/{b}.py": b for b in BENCH}
    options: dict[str, tuple[set[str], dict[str, set[str]]]] = {}
    for cli, name in shown.items():
        top, *subs = _parsers(name, monkeypatch)
        choices = {n: sp for a in top._actions if isinstance(a, argparse._SubParsersAction)
                   for n, sp in a.choices.items()}
        options[cli] = ({o for a in top._actions for o in a.option_strings},
                        {n: {o for a in sp._actions for o in a.option_strings} for n, sp in choices.items()})
    checked, unknown = 0, []
    for line in _readme_command_lines(readme):
        for m in re.finditer(r"(?:python -m ([\w.]+)|(bench/\w+\.py))(.*?)(?=&&|\|\||;|\| |$)", line):
            cli, words = m.group(1) or m.group(2), m.group(3).split()
            if cli not in options:
                continue
            own, subs = options[cli]
            if words and words[0] in subs:
                own = own | subs[words[0]]
            for word in words:
                flag = word.strip("[]()…,").split("=")[0]
                if flag.startswith("--") and flag != "--":
                    checked += 1
                    if flag not in own:
                        unknown.append(f"{cli} {flag}: {line.strip()[:120]}")
    assert checked > 200 and not unknown, unknown  # 222 flags on 2026-12-06
    named = set(re.findall(r"--[a-z][a-z0-9-]*", readme))
    never = {cli: sorted(o for o in own | set().union(*subs.values()) if o.startswith("--") and o != "--help"
                         and o not in named) for cli, (own, subs) in options.items() if not cli.startswith("bench/")}
    assert not any(never.values()), f"options the README never names: {never}"


def test_readme_links_resolve():
    """Each ``(#anchor)`` of the README (its Contents line and the cross-references) is a heading's anchor as GitHub
    makes it: lower case, every character but letters, digits, ``-``, ``_`` and spaces dropped, spaces as ``-``, a
    repeated heading suffixed ``-1``, ``-2``; each relative link names a file of the repository."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    outside = re.sub(r"^```.*?^```", "", readme, flags=re.S | re.M)  # a "# comment" in a code block is no heading
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", outside, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = sum(a == slug or re.fullmatch(re.escape(slug) + r"-\d+", a) is not None for a in anchors)
        anchors.add(f"{slug}-{n}" if n else slug)
    links = re.findall(r"\]\(#([^)]+)\)", readme)
    assert len(links) > 30 and not [a for a in links if a not in anchors], sorted(set(links) - anchors)
    files = re.findall(r"\]\(([^)#:]+)\)", readme)
    missing = [f for f in files if not (REPO / f).exists()]
    assert len(files) > 10 and not missing, missing


def test_readme_heads_table_gives_the_parsers_defaults(monkeypatch):
    """The README's ``probe.heads`` flag table, default column, against the parser: a backticked value or a bare
    number is the default as argparse holds it, ``off`` a flag not set, anything else (all, none, the model's
    bundled set) a default of None or ``all`` that the command resolves itself."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("| flag | default | meaning |\n|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
    (parser,) = _parsers("probe.heads", monkeypatch)
    defaults = {o: a.default for a in parser._actions for o in a.option_strings}
    rows = [row.split(" | ")[:2] for row in table.splitlines()]
    wrong = []
    for first, cell in rows:
        given = re.search(r"`([^`]+)`", cell)
        want = given.group(1) if given else cell if cell.isdigit() else None
        for flag in re.findall(r"`(--[\w-]+)`", first):
            got = defaults[flag]
            if not (got is False if cell == "off" else str(got) == want if want else got in (None, "all")):
                wrong.append(f"{flag}: README {cell!r}, parser {got!r}")
    assert len(rows) > 15 and not wrong, wrong

# ASCII digits only: int() and float() read any Unicode decimal digit ('٣' is 3) and '_' separators
NOT_ASCII = ["٣", "３", "१", "1_0", "٣.٥"]


@pytest.mark.parametrize("text", ["0", "7", "-3", "+12", " 5 ", "0042", *NOT_ASCII, "", "-", "3.0", "1e3", "x"])
def test_ascii_numbers_are_what_int_and_float_read_of_ascii_text(text):
    """Oracle: Python's int()/float() on ASCII text without '_'; everything else is refused as they refuse."""
    from probe.errors import ascii_float, ascii_int

    for ours, python in ((ascii_int, int), (ascii_float, float)):
        try:
            expected = python(text) if text.isascii() and "_" not in text else ValueError
        except ValueError:
            expected = ValueError
        if expected is ValueError:
            with pytest.raises(ValueError):
                ours(text)
        else:
            assert ours(text) == expected and type(ours(text)) is python


@pytest.mark.parametrize("name", MODULES + BENCH)
def test_every_number_option_takes_ascii_digits_only(name, monkeypatch):
    """``--layers ٣`` ran layer 3 and ``--limit ١٠`` ten items. Each ``type=int``/``type=float`` option of each
    CLI (subcommands included) reads the ASCII number as int()/float() do and refuses the same digits in another
    script, naming the option and the value."""
    checked = 0
    for parser in _parsers(name, monkeypatch):
        for action in parser._actions:
            if action.type not in (int, float):
                continue
            assert parser._get_value(action, "7") == action.type("7")
            for text in NOT_ASCII:
                with pytest.raises(argparse.ArgumentError) as e:
                    parser._get_value(action, text)
                assert str(e.value) == (f"argument {'/'.join(action.option_strings) or action.dest}: invalid "
                                        f"{action.type.__name__} value: {text!r}")
            checked += 1
    assert checked or name in ("probe.families", "analyses.shift", "analyses.replicate", "figures.__main__"), name


@pytest.mark.parametrize("argv, line", [
    (["--limit", "١٠"], "error: argument --limit: invalid int value: '١٠' (see --help)"),
    (["--layers", "٣"], "error: bad --layers spec '٣': use 'all', '3', or '0-3,7'"),
    (["--heads", "0-٣"], "error: bad --heads spec '0-٣': use 'all', '3', or '0-3,7'"),
])
def test_a_number_in_another_script_is_refused_in_a_subprocess(argv, line, tmp_path):
    r = subprocess.run([sys.executable, "-m", "probe.heads", *argv, "--out", str(tmp_path / "o")], cwd=REPO,
                       capture_output=True, text=True, encoding="utf-8")
    assert one_error_line(r.returncode, r.stderr) == line
    assert not (tmp_path / "o").exists()


def test_a_number_in_another_script_is_refused_from_python_and_the_environment(monkeypatch):
    from probe.devices import env_index
    from probe.errors import BadInput
    from probe.heads import parse_index_spec

    assert parse_index_spec("1-2", 4, "layer") == [1, 2]
    with pytest.raises(BadInput, match="bad --layers spec"):
        parse_index_spec("١-2", 4, "layer")
    monkeypatch.setenv("RANK", "٣")
    with pytest.raises(BadInput, match="RANK='٣'"):
        env_index("RANK")


def test_bad_int_option_in_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "probe.heads", "--limit", "abc"], cwd=REPO, capture_output=True,
                       text=True)
    assert one_error_line(r.returncode, r.stderr) == "error: argument --limit: invalid int value: 'abc' (see --help)"


def test_bench_sweep_json_that_cannot_be_a_file_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    """``bench/sweep.py --json DIR`` (a folder, or a path below a file) measured every engine first and then stopped
    with an IsADirectoryError traceback, its temp file written beside the folder; now one line before any model
    loads."""
    import probe.models

    monkeypatch.setattr(probe.models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for target, words in ((tmp_path, f"--json {tmp_path} is a directory"),
                          (afile / "x.json", f"{afile} exists and is not a directory")):
        line = one_error_line(cli_main(_main("sweep"), ["--json", str(target), "--items", "1"]),
                              capsys.readouterr().err)
        assert words in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and afile.read_text() == "keep"


def test_bench_merge_workdir_holding_other_files_is_refused(tmp_path, capsys):
    """``bench/merge.py --workdir DIR`` wrote model0/… over what DIR held and deleted DIR/ours and DIR/mk at every
    round, whatever they were (a project folder, a home dir). A --workdir holding anything a run of it did not write
    is refused before it writes; its own entries (a rerun) are fine."""
    work = tmp_path / "work"
    (work / "mk").mkdir(parents=True)
    (work / "mk" / "notes.txt").write_text("keep")
    (work / "results.csv").write_text("keep")
    before = snapshot(work)
    line = one_error_line(cli_main(_main("merge"), ["--workdir", str(work), "--k", "2", "--params-m", "72",
                                                    "--rounds", "1", "--no-mergekit"]), capsys.readouterr().err)
    assert f"--workdir {work} holds results.csv" in line, line
    assert snapshot(work) == before and sorted(p.name for p in work.iterdir()) == ["mk", "results.csv"]


# --------------------------------------------------------------------------------------------------------
# --out below a regular file


def test_out_below_a_file(tmp_path, data_dir, tiny_dirs, capsys):
    from analyses import finetune
    from probe import eval as probe_eval
    from probe import heads

    afile = tmp_path / "afile"
    afile.write_text("keep")
    out = str(afile / "sub")
    for main, argv in ((heads.main, [*BASE_ARGS, "--data", str(data_dir), "--out", out]),
                       (probe_eval.main, ["--models", "tiny-qwen2-vl", "--data", str(data_dir), "--limit", "2",
                                          "--quiet", "--out", out]),
                       (finetune.main, ["--model", "tiny-qwen2-vl", "--data", f"text={data_dir}", "--split",
                                        "validation", "--steps", "1", "--batch-size", "1", "--quiet", "--device", "cpu",
                                        "--out", out])):
        line = one_error_line(cli_main(main, argv), capsys.readouterr().err)
        assert str(afile) in line and "not a directory" in line
    assert afile.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_out_in_a_read_only_dir(tmp_path, data_dir, capsys, monkeypatch):
    """A read-only --out (a read-only mount, a dir without write permission) was a traceback at the first write,
    after the model had loaded; now one line names the dir, before anything runs."""
    from analyses import finetune, replicate
    from probe import eval as probe_eval

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anyway: answer as a read-only mount does
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: (
            False if Path(p) == ro and mode & os.W_OK else real(p, mode, *a, **k)))
    try:
        for out in (ro, ro / "sub" / "dir"):
            for main, argv in ((probe_eval.main, ["--models", "tiny-qwen2-vl", "--data", str(data_dir), "--limit",
                                                  "2", "--quiet", "--out", str(out)]),
                               (finetune.main, ["--model", "tiny-qwen2-vl", "--data", f"text={data_dir}", "--split",
                                                "validation", "--steps", "1", "--batch-size", "1", "--quiet",
                                                "--device", "cpu", "--out", str(out)]),
                               (replicate.main, ["--quick", "--quiet", "--out", str(out)])):
                line = one_error_line(cli_main(main, argv), capsys.readouterr().err)
                assert f"{ro} is not writable" in line, line
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# --------------------------------------------------------------------------------------------------------
# a damaged part of a resumable head sweep


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "a row dropped", "another chunk's rows",
                                    # columns rewritten as another type: a pandas traceback at the summary, or
                                    # whole numbers summarised as measured (p_answer 0.73 → 0), exit 0
                                    "correct as text", "p_answer as whole numbers", "layer as text", "negative kl"])
def test_damaged_part_is_bad_input(base_run, data_dir, tmp_path, capsys, damage):  # noqa: F811
    """probe.heads in this process (cli_main, as the CLI runs it) but for "truncated", whose real process keeps the
    exit code and stderr exactly as a user sees them: a process per case re-imported torch, 30 s each on 2 cores."""
    from probe import heads

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    part = run / "parts" / "chunk_00000.parquet"
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    elif damage == "empty":
        part.write_bytes(b"")
    elif damage == "foreign":
        pd.DataFrame({"a": [1]}).to_parquet(part)
    elif damage == "a row dropped":  # readable, its columns right: it was summarised as this run's (exit 0)
        pd.read_parquet(part).iloc[1:].to_parquet(part)
    elif damage == "correct as text":
        df = pd.read_parquet(part)
        df.assign(correct=df["correct"].astype(str)).to_parquet(part)
    elif damage == "p_answer as whole numbers":
        df = pd.read_parquet(part)
        df.assign(p_answer=df["p_answer"].round().astype("int64")).to_parquet(part)
    elif damage == "layer as text":
        df = pd.read_parquet(part)
        df.assign(layer=df["layer"].astype(str)).to_parquet(part)
    elif damage == "negative kl":
        df = pd.read_parquet(part)
        df.assign(kl=-0.5).to_parquet(part)
    else:
        shutil.copy(run / "parts" / "chunk_00001.parquet", part)
    others = sorted((run / "parts").glob("chunk_*.parquet"))[1:]
    assert others
    others[-1].unlink()  # a part still to compute: the damaged one is named before that work (and its output)
    before = snapshot(run)
    argv = [*BASE_ARGS, "--data", str(data_dir), "--out", str(run)]
    if damage == "truncated":
        r = cli(argv)
        line = one_error_line(r.returncode, r.stderr)
    else:
        capsys.readouterr()
        line = one_error_line(cli_main(heads.main, argv), capsys.readouterr().err)
    assert str(part) in line and "delete it" in line
    column = damage.split()[-1] if damage == "negative kl" else damage.split()[0]
    assert damage not in ("correct as text", "p_answer as whole numbers", "layer as text", "negative kl") or \
        f"column {column} " in line, line
    assert snapshot(run) == before


# --------------------------------------------------------------------------------------------------------
# python -m figures KIND DIR on damaged saved results

HEADS_CSV = "layer,head,accuracy,prob_accuracy,kl,n_items,accuracy_drop,prob_accuracy_drop,p_answer\n"
BASELINE = json.dumps({"accuracy": 0.9, "prob_accuracy": 0.9, "kl": 0.0, "n_items": 4})
# probe.eval's columns, note included (figures eval/steps refuse a scores.csv without it); a row's note left off
SCORES = ("model,data,subject,n_items,accuracy,accuracy_lo,accuracy_hi,prob_accuracy,prob_accuracy_lo,"
          "prob_accuracy_hi,note\n")
CASES = {  # id: (kind, {file: content}, words the error names)
    "heads-garbage": ("heads", {"heads.csv": b"\x00\x01garbage\n\xff", "baseline.json": BASELINE}, "heads.csv"),
    "heads-header-only": ("heads", {"heads.csv": HEADS_CSV, "baseline.json": BASELINE}, "no rows"),
    "heads-no-values": ("heads", {"heads.csv": HEADS_CSV + "0,0,,,,4,,,\n", "baseline.json": BASELINE},
                        "no values"),
    "heads-text-layer": ("heads", {"heads.csv": HEADS_CSV + "zero,0,1,1,0.1,4,0,0,0.5\n", "baseline.json": BASELINE},
                         "column layer"),
    "heads-text-metric": ("heads", {"heads.csv": HEADS_CSV + "0,0,1,high,0.1,4,0,0,0.5\n", "baseline.json": BASELINE},
                          "column prob_accuracy"),
    "heads-bad-baseline": ("heads", {"heads.csv": HEADS_CSV + "0,0,1,1,0.1,4,0,0,0.5\n", "baseline.json": "[1]"},
                           "baseline.json"),
    # values no run can produce (an edited or mixed-up file) were drawn as if real: a KL of -5, accuracy 300 %
    "heads-negative-kl": ("heads", {"heads.csv": HEADS_CSV + "0,0,1,1,-5,4,0,0,0.5\n", "baseline.json": BASELINE},
                          "column kl must lie in [-1e-06, inf]; line 2 has -5"),
    "heads-accuracy-3": ("heads", {"heads.csv": HEADS_CSV + "0,0,3,1,0.1,4,0,0,0.5\n", "baseline.json": BASELINE},
                         "column accuracy must lie in [0, 1]"),
    # a baseline of 200 % (its drops edited to agree) was the centre of the colours and the title's "baseline 200.0 %"
    "heads-baseline-accuracy-2": ("heads", {"heads.csv": HEADS_CSV + "0,0,1,0.5,0.1,4,1,0.1,0.5\n",
                                            "baseline.json": json.dumps({"accuracy": 2.0, "prob_accuracy": 0.6,
                                                                         "kl": 0.0, "n_items": 4})},
                                  "baseline.json: accuracy is 2, not in [0, 1]"),
    "eval-accuracy-3": ("eval", {"scores.csv": SCORES + "m,d,all,3,3,1,1,1,1,1\n"}, "column accuracy must lie"),
    "shift-negative-delta": ("shift", {"shift.csv": "model,tensor,layer,module,numel,delta_avg\nm,t,0,q,4,-0.5\n"},
                             "column delta_avg must lie in [0, inf]"),
    "shift-wrong-columns": ("shift", {"shift.csv": "a,b\n1,2\n"}, "missing columns model"),
    "shift-text-delta": ("shift", {"shift.csv": "model,tensor,layer,module,numel,delta_avg\nm,t,0,q,4,big\n"},
                         "column delta_avg"),
    "trajectory-garbage": ("trajectory", {"coords.csv": "x\n\x01garbage\n"}, "missing columns name"),
    "eval-garbage": ("eval", {"scores.csv": "foo,bar\n1,2\n"}, "missing columns model"),
    "eval-no-all-rows": ("eval", {"scores.csv": SCORES + "m,d,s1,3,1,1,1,1,1,1\n"}, "subject 'all'"),
    # rows or files of different runs: a cell drawn twice (the last one shown), colours centred on another run's
    # baseline, a model left out of a panel (a traceback), two fine-tuning runs zigzagging on one line
    "heads-head-twice": ("heads", {"heads.csv": HEADS_CSV + "0,0,1,1,0.1,4,-0.1,-0.1,0.5\n0,0,0.5,1,0.1,4,0.4,-0.1,0.5\n",
                                   "baseline.json": BASELINE}, "line 3 repeats layer 0 head 0"),
    "heads-other-baseline": ("heads", {"heads.csv": HEADS_CSV + "0,0,1,1,0.1,4,-0.2,-0.1,0.5\n", "baseline.json": BASELINE},
                             "heads.csv line 2 and baseline.json disagree on accuracy_drop"),
    "heads-other-n": ("heads", {"heads.csv": HEADS_CSV + "0,0,1,1,0.1,8,-0.1,-0.1,0.5\n", "baseline.json": BASELINE},
                      "disagree on n_items"),
    "eval-pair-missing": ("eval", {"scores.csv": SCORES + "m1,d1,all,3,1,1,1,1,1,1\nm1,d2,all,3,1,1,1,1,1,1\n"
                                   "m2,d1,all,3,1,1,1,1,1,1\n"}, "no 'all' row for model m2 on data set d2"),
    "steps-two-runs": ("steps", {"scores.csv": SCORES + "a/checkpoint-0,d,all,3,1,1,1,1,1,1\n"
                                 "b/checkpoint-0,d,all,3,0.5,0,1,1,1,1\n"}, "a/checkpoint-0, b/checkpoint-0 are all step 0"),
    "steps-text-n": ("steps", {"scores.csv": SCORES + "m/checkpoint-1,d,all,many,1,1,1,1,1,1\n"}, "column n_items"),
    "merge-garbage": ("merge", {"merge_weights.csv": "nope\n1\n", "merge.json": "{}"}, "missing columns tensor"),
    "merge-bad-json": ("merge", {"merge_weights.csv": "tensor,slice,model,delta_avg,alpha\nt,all,m,,0.5\n",
                                 "merge.json": "{not json"}, "merge.json"),
    "report-bad-json": ("report", {"replicate.json": "garbage"}, "replicate.json"),
    # an object with an empty or odd config: a KeyError / TypeError traceback where the report first read a key
    "report-empty-config": ("report", {"replicate.json": '{"config": {}, "fingerprints": {}}'},
                            "replicate.json: its config is not one python -m analyses.replicate wrote"),
    "report-odd-config": ("report", {"replicate.json": '{"config": {"models": 5}, "fingerprints": {}}'},
                          "config key 'models': expected a table"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_figures_reject_damaged_results(case, tmp_path, capsys):
    from figures.__main__ import main

    kind, files, words = CASES[case]
    for name, text in files.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    before = snapshot(tmp_path)
    line = one_error_line(cli_main(main, [kind, str(tmp_path)]), capsys.readouterr().err)
    assert str(tmp_path) in line and words in line, line
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------------
# written files are readable like normally created ones; a killed merge's temp dir is cleaned up


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_use_the_default_file_mode(tmp_path, umask):
    from probe.results import atomic_write_bytes, atomic_write_json, atomic_write_parquet

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.csv", b"x\n")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        atomic_write_parquet(tmp_path / "c.parquet", pd.DataFrame({"x": [1]}))
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["a.csv", "b.json", "c.parquet", "plain"], 0o666 & ~umask)


def test_stale_partial_dirs_of_killed_runs_are_removed(tmp_path):
    from analyses.writer import atomic_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale, busy = tmp_path / f".out.partial-{dead.pid}", tmp_path / f".out.partial-{live.pid}"
        old = tmp_path / f".out.old-{dead.pid}"  # killed between the two renames of an --overwrite
        other = tmp_path / f".other.partial-{dead.pid}"
        for d in (stale, busy, other, old):
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"half")
        with atomic_dir(tmp_path / "out", overwrite=False, command="test") as tmp:
            (tmp / "done").write_text("1")
        assert not stale.exists() and not old.exists()
        assert busy.is_dir() and other.is_dir()  # only this output's, only the dead's
        assert (tmp_path / "out" / "done").read_text() == "1"
    finally:
        live.kill()
        live.wait()


def test_an_untagged_partial_dir_is_emptied_first_and_dropped_when_filling_fails(tmp_path):
    """probe.results.partial_dir (finetune's checkpoints, figures report): ``.NAME.partial`` beside the output,
    what a kill left in it removed before filling; filled whole it stays for the caller to rename; a failure while
    filling removes it at once and re-raises, a full disk as the OSError naming the output."""
    import errno

    from probe.results import partial_dir

    dest = tmp_path / "checkpoint-4"
    with partial_dir(dest) as tmp:
        assert tmp == tmp_path / ".checkpoint-4.partial" and tmp.is_dir()
        (tmp / "half.safetensors").write_bytes(b"killed here")
    with partial_dir(dest) as tmp:  # the rerun: nothing of the last one is left
        assert list(tmp.iterdir()) == []
        (tmp / "model.safetensors").write_bytes(b"whole")
    assert [p.name for p in tmp.iterdir()] == ["model.safetensors"] and not dest.exists()
    with pytest.raises(ValueError, match="bad tensor"):
        with partial_dir(dest) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise ValueError("bad tensor")
    assert not tmp.exists()
    with pytest.raises(OSError, match=re.escape(str(dest))) as stopped:
        with partial_dir(dest) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert stopped.value.errno == errno.ENOSPC and not tmp.exists() and not dest.exists()


def test_an_interrupt_while_filling_a_partial_dir_drops_it_too(tmp_path):
    """probe.results.partial_dir removes its dir on any exception out of the filling, a Ctrl-C (KeyboardInterrupt,
    no Exception) included, and lets it through unchanged."""
    from probe.results import partial_dir

    dest = tmp_path / "checkpoint-2"
    with pytest.raises(KeyboardInterrupt):
        with partial_dir(dest) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(tmp_path.iterdir()) == []


def test_a_writers_partial_path_is_tagged_with_its_pid_and_host(tmp_path):
    """probe.results.partial_path: ``.NAME.partial-PID-HOST`` beside the output (HOST: 8 hex digits of the host
    name's sha1, computed here), so two writers never share it and remove_stale_dirs, given the pattern the writers
    use, keeps a live writer's dir."""
    import hashlib
    import socket

    from probe.results import WRITER_TAG, partial_path, remove_stale_dirs

    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    dest = tmp_path / "merged"
    got = partial_path(dest)
    assert got == tmp_path / f".merged.partial-{os.getpid()}-{host}"
    got.mkdir()
    assert remove_stale_dirs(tmp_path, rf"\.merged\.partial-(?P<tag>{WRITER_TAG})") == [] and got.is_dir()


@pytest.mark.parametrize("raw,value,why", [
    (b'{"a": [1, 2]}', {"a": [1, 2]}, ""),
    (b"[1, 2]", None, "not a JSON object"),
    (b'"text"', None, "not a JSON object"),
    (b"{", None, "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    (b'{"a": "\xff\xfe"}', None, "not valid JSON ("),
], ids=["object", "list", "string", "cut", "not utf-8"])
def test_parse_json_object_says_why_a_file_is_no_json_object(raw, value, why, tmp_path):
    """probe.results.parse_json_object: the object and "" for a JSON object; None and the reason otherwise (a file
    of other bytes than UTF-8 is "not valid JSON", no UnicodeDecodeError traceback); NO_FILE for no file."""
    from probe.results import NO_FILE, json_object, parse_json_object

    path = tmp_path / "run.json"
    assert parse_json_object(path) == (None, NO_FILE) and json_object(path) is None
    path.write_bytes(raw)
    got, reason = parse_json_object(path)
    assert got == value and json_object(path) == value
    assert reason.startswith(why) and (reason == "") == (value is not None), reason


def test_temp_files_of_killed_writers_are_removed_on_the_next_run(tmp_path):
    """A kill mid-write left ``.NAME.RANDOM`` temp files that no resume or --overwrite removed; they carry the
    writer's PID now, and the next run in that --out deletes the dead writers' (a live rank's stay)."""
    from probe.results import atomic_write_json, prepare_out_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        (out / "parts").mkdir(parents=True)
        atomic_write_json(out / "run.json", {"fingerprint": "fp"})
        stale = [out / f".items.parquet.{dead.pid}.k2j_x9.tmp", out / "parts" / f".chunk_00002.parquet.{dead.pid}.a1.tmp"]
        busy = out / "parts" / f".chunk_00003.parquet.{live.pid}.b2.tmp"
        for f in (*stale, busy):
            f.write_bytes(b"")
        assert prepare_out_dir(out, "fp", overwrite=False)
        assert not any(f.exists() for f in stale) and busy.is_file()
        assert sorted(p.name for p in out.iterdir()) == ["parts", "run.json"]  # nothing else touched
    finally:
        live.kill()
        live.wait()


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from figures import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    real = fig.savefig

    def dies_halfway(fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    fig.savefig = dies_halfway
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []  # neither a half figure nor its temp file
    fig.savefig = real
    assert save_figure(fig, tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")
    plt.close(fig)


def test_error_reason_is_one_bounded_line():
    # The first line; a heading ending in ':' keeps the line below; no message gives the type; long lines are cut.
    assert error_reason(ValueError("bad shape\n  at line 3")) == "bad shape"
    assert error_reason(ValueError("Validation failed:\n  field x must be int\n more")) == \
        "Validation failed: field x must be int"
    assert error_reason(KeyError()) == "KeyError"
    long = error_reason(OSError("x" * 10_000))
    assert len(long) == REASON_CHARS and long.endswith("…") and "\n" not in long


def test_figures_help_says_what_each_kind_reads(capsys):
    """``python -m figures --help`` showed the module docstring's markup and no word on what each kind reads."""
    from figures.__main__ import KINDS, READS, main

    assert set(READS) == set(KINDS)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out
    for kind, what in READS.items():
        assert f"  {kind:<11}{what}\n" in out


def test_leftovers_of_another_host_are_never_taken_for_a_dead_writers(tmp_path, monkeypatch):
    """Ranks of a multi-node torchrun share --out over a network file system; a PID says whether a writer is alive
    only on its own machine. Temp files and dirs were named by the bare PID, so a run on one node deleted another
    node's live temp when the same PID was free locally. Names carry the host now: another host's are left alone,
    this host's dead writers' are removed, and bare-PID names of earlier versions are judged as before."""
    import probe.results as results
    from analyses.writer import atomic_dir
    from probe.results import prepare_out_dir, writer_tag

    monkeypatch.setattr(results, "_HOST", "a" * 8)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine, theirs = f"{dead.pid}-{'a' * 8}", f"{dead.pid}-{'b' * 8}"
    assert writer_tag() == f"{os.getpid()}-{'a' * 8}"
    out = tmp_path / "run"
    out.mkdir()
    results.atomic_write_json(out / "run.json", {"fingerprint": "fp"})
    temps = {tag: out / f".items.parquet.{tag}.k2j_x9.tmp" for tag in (mine, theirs, str(dead.pid))}
    dirs = {tag: tmp_path / f".merged.partial-{tag}" for tag in (mine, theirs, str(dead.pid))}
    for f in temps.values():
        f.write_bytes(b"")
    for d in dirs.values():
        d.mkdir()
    assert prepare_out_dir(out, "fp", overwrite=False)
    with atomic_dir(tmp_path / "merged", overwrite=False, command="test") as tmp:
        assert tmp.name == f".merged.partial-{writer_tag()}"
    assert {t for t, f in temps.items() if f.exists()} == {theirs}
    assert {t for t, d in dirs.items() if d.exists()} == {theirs}
    # a temp written now carries this process's tag, which the stale check reads back as alive
    seen = []
    results.atomic_write_with(out / "x.json", lambda tmp: seen.append(Path(tmp).name))
    assert results._TEMP.fullmatch(seen[0]).group(1) == writer_tag() and not results.writer_gone(writer_tag())


def test_an_out_that_cannot_be_created_is_one_line(tmp_path, data_dir, capsys, monkeypatch):
    """The permission check can pass where creating --out still fails (root on an NFS export that squashes root, a
    pseudo file system): that was a FileNotFoundError/PermissionError traceback from mkdir; now one line, exit 2."""
    from analyses import finetune, shift
    from probe import eval as probe_eval
    from probe import heads

    denied = tmp_path / "squashed"
    real = Path.mkdir

    def mkdir(self, *a, **k):
        if self == denied or denied in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    out = denied / "run"
    for main, argv in ((probe_eval.main, ["--models", "tiny-qwen2-vl", "--data", str(data_dir), "--limit", "2"]),
                       (heads.main, ["--model", "tiny-qwen2-vl", "--data", str(data_dir), "--limit", "2"]),
                       (finetune.main, ["--model", "tiny-qwen2-vl", "--data", f"image={data_dir}", "--split",
                                        "validation", "--steps", "1", "--batch-size", "1", "--device", "cpu"]),
                       (shift.main, ["--base", "tiny-qwen2", "--models", "tiny-qwen2-vl", "--no-figures"])):
        assert cli_main(main, [*argv, "--quiet", "--out", str(out)]) == 2
        # the placement line (stdout) and finetune's warning on training on a validation split (after the claim)
        # come once the run started: the refusal is the one line on stderr
        line = one_error_line(2, capsys.readouterr().err)
        assert "cannot create it (Permission denied)" in line, line
    assert not denied.exists()


def test_ctrl_c_inside_a_progress_bar_is_interrupted_on_its_own_last_line(capfd):
    """Ctrl-C during a SmolLM2 head sweep left "...| 232/888 [03:53<14:51,  1.36s/run]interrupted" and then the
    bar drawn again below it (closed as the run's frames were freed): the last line read was the bar. The bars
    still open are closed first, as ``print_error`` does for an error line."""
    from tqdm.auto import tqdm

    def main(argv):
        bar = tqdm(total=10, desc="sweep", file=sys.stderr)
        bar.update(3)
        raise KeyboardInterrupt

    assert cli_main(main, []) == 130
    err = capfd.readouterr().err
    assert err.endswith("\ninterrupted\n") and err.count("interrupted") == 1, repr(err)


def test_ctrl_c_while_a_command_imports_its_modules_is_one_line(tmp_path):
    """SIGINT while ``python -m analyses.merge`` still imported torch (a second or more) printed the import
    machinery's KeyboardInterrupt traceback; it is now the one line and exit code of an interrupted run. The
    signal is sent once the package ``probe`` has imported (python -X importtime reports each finished import),
    while torch still imports; landing later, the run's own handling gives the same line."""
    import signal

    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "analyses.merge", "--help"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.split("|")[-1].strip() == "probe":
            proc.send_signal(signal.SIGINT)
            break
    err = "".join(lines) + proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    own = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert own == ["interrupted"], err
    assert proc.stdout.read() == ""  # --help never printed: the signal came during the imports


def test_cli_main_gives_a_command_pythons_own_ctrl_c_handling(monkeypatch):
    """The quiet handler covers imports only: under cli_main Ctrl-C is KeyboardInterrupt again, so a run's cleanup
    (temp files, claims) runs before its exit 130."""
    import signal

    from probe.errors import interrupt_quietly_while_importing, quiet_interrupt

    monkeypatch.setattr(sys, "argv", ["-m"])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupt_quietly_while_importing()
        assert signal.getsignal(signal.SIGINT) is quiet_interrupt
        seen = []
        assert cli_main(lambda argv: seen.append(signal.getsignal(signal.SIGINT)) or 0, []) == 0
        assert seen == [signal.default_int_handler]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_while_python_shuts_a_finished_command_down_is_the_one_line(tmp_path):
    """A command's work ends when cli_main returns, but Python then runs its exit callbacks and frees the modules
    (2.7-4 s after the last line of a finished analyses.finetune or probe.heads run on organism-vl, resume43): a
    Ctrl-C landing there printed "Exception ignored in atexit callback" with a KeyboardInterrupt traceback (torch
    registers one) and exited 0. Here an exit callback sends the SIGINT itself: the line is "interrupted", exit 130
    (as for a Ctrl-C during the imports), and what the command printed is all there."""
    import signal

    code = ("import atexit, os, signal, sys, time\n"
            "sys.argv = ['-m']\n"  # as under python -m probe.X: the package installs the quiet handler
            "import probe\n"
            "from probe.errors import cli_main\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))\n"
            "sys.exit(cli_main(lambda argv: print('results in DIR') or 0, []))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)},
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's & ignores it
    assert (r.returncode, r.stderr, r.stdout) == (130, "interrupted\n", "results in DIR\n")


def test_a_text_model_on_the_default_data_is_told_to_give_data(tmp_path, capsys):
    """``python -m probe.heads --model smollm2-135m`` (or ``tiny-qwen2``, any text LM but an organism) reads the
    default data, the bundled synthetic MMMU-format set, whose items all hold images, and stopped on ``item
    validation_Colour_Shape_1 has image but tiny-qwen2 (qwen2) reads text only``: an item the user never chose,
    and no word of --data. The line now names the default set as the cause and the text set to pass."""
    r = cli(["--model", "tiny-qwen2", "--out", tmp_path / "out", "--quiet"])
    line = one_error_line(r.returncode, r.stderr)
    assert "default" in line and "--data" in line and "probe/zoo/data/text" in line, line
    assert not (tmp_path / "out").exists()
    # a --data the user gave keeps the item-level line (in this process: the real one's exit code is checked above)
    from probe import heads

    capsys.readouterr()
    code = cli_main(heads.main, ["--model", "tiny-qwen2", "--data", str(REPO / "probe/zoo/data/image"),
                                 "--out", str(tmp_path / "out2"), "--quiet"])
    assert "has image but tiny-qwen2 (qwen2) reads text only" in one_error_line(code, capsys.readouterr().err)
    assert not (tmp_path / "out2").exists()


def test_a_full_disk_while_a_tiny_model_is_cached_is_one_line_and_leaves_no_half_build(tmp_path, capfd, monkeypatch):
    """Building a tiny model into the cache (OMNIPROBE_CACHE) on a full disk was a traceback (safetensors' writer
    raises SafetensorError, no OSError) and left its hidden half-built dir there for good; now it is the one line
    naming the cache entry (exit 1), nothing is left, and the rerun builds and caches it."""
    from safetensors import SafetensorError

    import probe.tiny as tiny
    from probe.heads import main

    monkeypatch.setenv("OMNIPROBE_CACHE", str(tmp_path / "cache"))
    real = tiny.build_tiny

    def full(family, out):
        (Path(out) / "config.json").write_text("{}")  # what save_pretrained writes before the weights
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(tiny, "build_tiny", full)
    args = ["--model", "tiny-qwen2-vl", "--limit", "1", "--layers", "0", "--heads", "0", "--no-figures", "--quiet",
            "--out", str(tmp_path / "run")]
    assert cli_main(main, args) == 1
    err = capfd.readouterr().err
    target = tmp_path / "cache" / "tiny" / "qwen2_vl"
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        f"error: no space left on device writing {target}; free space and rerun the same command (a resumable run "
        "goes on from what it had saved)"] and "Traceback" not in err, err
    assert list((tmp_path / "cache" / "tiny").iterdir()) == [] and not (tmp_path / "run").exists()
    monkeypatch.setattr(tiny, "build_tiny", real)
    assert tiny.tiny_dir("qwen2_vl") == target and (target / "config.json").is_file()


@pytest.mark.parametrize("exc, line", [
    (OSError(30, "Read-only file system", "/r/o/x.csv"),
     "error: read-only file system writing /r/o/x.csv; make it writable and rerun the same command (a resumable run "
     "goes on from what it had saved)"),
    ("safetensors", "error: no space left on device; free space and rerun the same command (a resumable run goes on "
                    "from what it had saved)"),
    # a RuntimeError (torch's own write errors are) reached the out-of-memory handler first, which re-raised it
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0 (os error 28)"),
     "error: no space left on device; free space and rerun the same command (a resumable run goes on from what it "
     "had saved)"),
])
def test_cli_main_says_a_stopped_write_in_one_line_whatever_raised_it(exc, line, capfd):
    """A file system gone read-only mid-run (EROFS) and a full disk that safetensors' writer reports
    (SafetensorError, no OSError) were tracebacks from every command; cli_main says them in its one line (exit 1)."""
    from safetensors import SafetensorError

    if exc == "safetensors":
        exc = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def main(argv):
        raise exc

    assert cli_main(main, []) == 1
    err = capfd.readouterr().err
    assert err.splitlines() == [line], err


@pytest.mark.parametrize("exc", [RuntimeError("shapes do not match"), ValueError("os error 28 in a message")])
def test_cli_main_keeps_the_traceback_of_an_error_that_is_no_stopped_write(exc):
    """Only a write the file system stopped is said in one line; any other error keeps its own traceback."""
    def main(argv):
        raise exc

    with pytest.raises(type(exc)) as raised:
        cli_main(main, [])
    assert raised.value is exc


def test_a_result_file_the_file_system_refused_is_named_not_its_temp_file(tmp_path, capfd, monkeypatch):
    """A file system gone read-only refuses the temp file of an atomic write at its creation: the one line named that
    temp file (``.items.parquet.PID-HOST.RANDOM.tmp``, never to exist) instead of the result it was for."""
    import errno
    import tempfile

    from probe.results import atomic_write_json

    def refused(prefix="", suffix="", dir=None):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, f"{prefix}x1y2{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    target = tmp_path / "items.json"
    assert cli_main(lambda argv: atomic_write_json(target, {}), []) == 1
    assert capfd.readouterr().err.splitlines() == [
        f"error: read-only file system writing {target}; make it writable and rerun the same command (a resumable "
        "run goes on from what it had saved)"]
    assert list(tmp_path.iterdir()) == []


def test_a_temp_file_the_read_only_file_system_keeps_does_not_hide_why_the_write_stopped(tmp_path, capfd,
                                                                                         monkeypatch):
    """On a file system gone read-only mid-write, deleting the temp file fails too: that EROFS replaced the error
    that stopped the write, so the one line named the temp file. It names the result file now."""
    import errno

    from probe import results

    real_unlink = Path.unlink

    def read_only(self, missing_ok=False):
        if self.name.endswith(".tmp"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_unlink(self, missing_ok=missing_ok)

    def stopped(tmp):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "unlink", read_only)
    target = tmp_path / "heads.csv"
    assert cli_main(lambda argv: results.atomic_write_with(target, stopped), []) == 1
    assert capfd.readouterr().err.splitlines() == [
        f"error: read-only file system writing {target}; make it writable and rerun the same command (a resumable "
        "run goes on from what it had saved)"]
    assert not target.exists()


@pytest.mark.parametrize("code", [28, 30])
def test_a_pdf_the_disk_stopped_is_one_line_though_matplotlib_fails_again_closing_it(code, tmp_path, capfd,
                                                                                    monkeypatch):
    """matplotlib's PDF writer, its write stopped by a full or read-only disk, fails again while it closes the file
    (zlib.error: inconsistent stream state), which hid the OSError: a traceback from shift, trajectory and the
    replication. The one line names the figure now, and no PDF is left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from figures import save_figure

    real_open = open

    class Stopped:  # the disk stops in the body of the first compressed stream (after zlib's header), as it did
        def __init__(self, f):  # in the shift stage: the stream's flush fails, and its close flushes again
            self.f, self.in_stream = f, False

        def write(self, data):
            if self.in_stream and len(data):
                raise OSError(code, os.strerror(code))
            self.in_stream = self.in_stream or bytes(data[:2]) == b"x\x9c"
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Stopped(f) if str(file).endswith(".tmp") and "w" in mode else f

    import builtins

    monkeypatch.setattr(builtins, "open", open_)
    fig = plt.figure()
    fig.add_subplot().plot([0, 1], [0, 1])
    target = tmp_path / "shift_models.pdf"
    assert cli_main(lambda argv: save_figure(fig, target), []) == 1
    plt.close(fig)
    err = capfd.readouterr().err
    fix = "free space" if code == 28 else "make it writable"
    assert err.splitlines() == [f"error: {os.strerror(code).lower()} writing {target}; {fix} and rerun the same "
                                "command (a resumable run goes on from what it had saved)"], err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------
# the commands from Python (a notebook): keywords through the command's own parser, the result read back


def test_keywords_parse_as_the_command_line_and_refuse_as_python_does():
    """``probe.errors.parse_options``: a keyword per option (``_`` for ``-``), a list for several values, True/False
    for a flag, None left out; nothing given is the command line's defaults. A value the parser refuses is BadInput
    with its message (argparse's SystemExit would end a notebook cell with "exit 2"), an unknown keyword or a flag
    given a non-bool a TypeError."""
    from probe import eval as probe_eval
    from probe import heads
    from probe.errors import BadInput, parse_options

    assert vars(parse_options(heads.build_parser(), {})) == vars(heads.build_parser().parse_args([]))
    args = parse_options(probe_eval.build_parser(), {"models": ["a", "b"], "data": ["d"], "batch_size": 8,
                                                      "no_generate": True, "quiet": False, "limit": None, "out": "x"})
    want = probe_eval.build_parser().parse_args(["--models", "a", "b", "--data", "d", "--batch-size", "8",
                                                 "--no-generate", "--out", "x"])
    assert vars(args) == vars(want) and args.models == ["a", "b"] and args.batch_size == 8 and args.no_generate
    with pytest.raises(BadInput, match=r"^python -m probe.heads: argument --limit: invalid int value: 'abc'$"):
        parse_options(heads.build_parser(), {"limit": "abc"})
    with pytest.raises(BadInput, match="^python -m probe.eval: the following arguments are required: --data$"):
        parse_options(probe_eval.build_parser(), {"models": ["a"]})
    with pytest.raises(TypeError, match="no option 'batchsize'.*batch_size"):
        parse_options(heads.build_parser(), {"batchsize": 8})
    with pytest.raises(TypeError, match="quiet is a flag"):
        parse_options(heads.build_parser(), {"quiet": "yes"})
    inverted = argparse.ArgumentParser(prog="x")
    inverted.add_argument("--no-plot", dest="plot", action="store_false")
    with pytest.raises(TypeError, match="'plot' is not a store_true flag"):  # plot=False would draw
        parse_options(inverted, {"plot": False})


def _list_likes() -> list:
    """Several values as a notebook holds them: each is the list ["a", "b"] to a loop."""
    import numpy as np

    return [np.array(["a", "b"]), pd.Series(["a", "b"]), {"a": 1, "b": 2}.keys(), (x for x in "ab"),
            pd.Index(["a", "b"])]


@pytest.mark.parametrize("values", _list_likes(), ids=["ndarray", "Series", "dict_keys", "generator", "Index"])
def test_a_list_like_keyword_is_its_values_not_its_printed_form(values):
    """``models=df["model"].unique()`` or ``models=experts.keys()``: parse_options passed only lists and tuples on as
    several values and str() of anything else, one model named "['a' 'b']" (pyfuzz48). Any ordered iterable is its
    values, as the same list given by hand."""
    from probe import eval as probe_eval
    from probe.errors import parse_options

    args = parse_options(probe_eval.build_parser(), {"models": values, "data": ["d"]})
    assert args.models == ["a", "b"]


def test_several_values_for_a_one_value_option_are_refused_naming_the_keyword():
    """``model=["a", "b"]`` for --model (one value) read as argparse's "unrecognized arguments: b", naming neither
    the keyword nor the option; a list of one is that value (as before)."""
    from probe import heads
    from probe.errors import BadInput, parse_options

    with pytest.raises(BadInput) as exc:
        parse_options(heads.build_parser(), {"model": ["a", "b"]})
    assert str(exc.value) == "python -m probe.heads: model (--model) takes one value, not 2: 'a', 'b'"
    assert parse_options(heads.build_parser(), {"model": ["a"]}).model == "a"


@pytest.mark.parametrize("options, named", [
    ({"out": 7}, "out"),  # wrote the run into ./7
    ({"out": 2.5}, "out"),
    ({"template": True}, "template"),
    ({"limit": True}, "limit"),  # a bool is no number (True == 1)
    ({"model": {"a"}}, "model"),  # a set: str() of it, "{'a'}"
    ({"subjects": {"x", "y"}}, "subjects"),  # a set has no order
    ({"model": {"a": 1}}, "model"),
    ({"model": b"a"}, "model"),  # "b'a'"
    ({"subjects": [["x"]]}, "subjects"),  # a nested list: "['x']"
])
def test_a_keyword_of_no_option_type_is_a_type_error_naming_it(options, named, tmp_path, monkeypatch):
    """A Python value no command-line word stands for (an int or float for a path, a bool for a non-flag, a set, a
    dict, bytes, a list in a list) is a TypeError naming the keyword, as a flag given a non-bool is; str() of it was
    passed on, ``out=7`` writing the run into a folder named 7. A Path is a path (it works), an int a number."""
    from probe import heads
    from probe.errors import parse_options

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=f"^python -m probe.heads: {named} "):
        parse_options(heads.build_parser(), options)
    args = parse_options(heads.build_parser(), {"out": tmp_path / "o", "template": Path("t.json"), "limit": 3})
    assert (args.out, args.template, args.limit) == (tmp_path / "o", Path("t.json"), 3)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_keyword_lists_the_commands_options_and_help_is_none_of_them():
    """probe.errors.parse_options' TypeError for an unknown keyword lists the keywords there are: the parser's option
    dests (written out here from a parser built in the test), sorted, and not ``help`` (--help is argparse's, no
    option of the command; help=True is "no option", not a refused flag)."""
    from probe.errors import parse_options

    def parser():
        p = argparse.ArgumentParser(prog="x")
        p.add_argument("--out")
        p.add_argument("-n", "--batch-size", type=int)
        p.add_argument("--quiet", action="store_true")
        return p

    with pytest.raises(TypeError) as exc:
        parse_options(parser(), {"batchsize": 8})
    assert str(exc.value) == "x: no option 'batchsize' (the options: batch_size, out, quiet)"
    with pytest.raises(TypeError, match="^x: no option 'help' "):
        parse_options(parser(), {"help": True})
    assert vars(parse_options(parser(), {"batch_size": 3, "quiet": True})) == {"out": None, "batch_size": 3,
                                                                              "quiet": True}


def test_sweep_from_python_equals_the_command_and_returns_it_read_back(base_run, data_dir, tmp_path):
    """``probe.heads.sweep(**options)`` is ``python -m probe.heads`` with those options: the same heads.csv and
    baseline as the CLI's reference run, returned as a HeadSweep (its grid a layer × head table of the file)."""
    from figures.results import HeadSweep
    from probe.heads import sweep

    got = sweep(model="tiny-qwen2-vl", data=data_dir, limit=6, layers="0,3", heads="0-1", method="naive",
                chunk_size=1, max_new_tokens=3, quiet=True, no_figures=True, out=tmp_path / "h")
    assert isinstance(got, HeadSweep) and got.dir == tmp_path / "h"
    want = pd.read_csv(base_run / "heads.csv")
    pd.testing.assert_frame_equal(got.heads[want.columns].reset_index(drop=True), want, check_dtype=False, atol=1e-6)
    assert got.baseline["n_items"] == 6 == json.loads((base_run / "baseline.json").read_text())["n_items"]
    grid = got.grid("kl")
    assert list(grid.index) == [0, 3] and list(grid.columns) == [0, 1]
    assert grid.loc[3, 1] == want.set_index(["layer", "head"]).loc[(3, 1), "kl"]
    assert len(got.items) == 6 * (1 + 4)  # each item unmasked and under each of the 4 heads


# --------------------------------------------------------------------------------------------------------
# files handed over by someone else: data sets and checkpoints that are odd, damaged or hostile


def test_a_data_set_with_a_bomb_image_or_a_file_path_is_one_line_and_leaves_no_out(tmp_path, capfd):
    """Through the commands: an image past PIL's pixel limit was 'not a decodable image (DecompressionBombError)'
    (and one just under twice the limit ran, with PIL's two-line warning at each decode); an image cell holding only
    a path (here outside the data set) read as 'empty or null'. The file it names is never opened."""
    from conftest import tree_manifest
    from test_mmmu import blank_png, row, write

    from probe import eval as probe_eval
    from probe import heads

    cases = {"bomb": ({"bytes": blank_png(10000, 10000), "path": None}, "is 10000×10000 = 100,000,000 pixels, past "
                      "the 89,478,485 an image may have (PIL's decompression-bomb limit); downscale it"),
             "path": ({"bytes": None, "path": "../../../secret.png"}, "image_1 names a file ('../../../secret.png') "
                      "but holds no image bytes")}
    for name, (cell, want) in cases.items():
        data = write(tmp_path / name, {"Art": [row(1), row(2, image_1=cell)]})
        before = tree_manifest(data)
        for main, argv in ((probe_eval.main, ["--models", "organism-vl", "--data", str(data), "--quiet"]),
                           (heads.main, ["--model", "organism-vl", "--data", str(data), "--layers", "0", "--quiet"])):
            out = tmp_path / f"out-{name}-{main.__module__}"
            capfd.readouterr()
            line = one_error_line(cli_main(main, [*argv, "--out", str(out)]), capfd.readouterr().err)
            assert "row 1 id='validation_Art_2'" in line and want in line, line
            assert not out.exists() and tree_manifest(data) == before


def lines_of_eval_and_shift(model: Path, tmp_path: Path, capfd) -> list[str]:
    """The error line of probe.eval and of analyses.shift given ``model`` (each exit 2, one line, no --out made)."""
    from analyses import shift
    from probe import eval as probe_eval

    lines = []
    for main, argv in ((probe_eval.main, ["--models", str(model), "--data", str(REPO / "probe/zoo/data/text"),
                                          "--limit", "1", "--quiet"]),
                       (shift.main, ["--base", "organism-base", "--models", str(model), "--no-figures"])):
        out = tmp_path / f"out-{main.__module__}"
        capfd.readouterr()
        lines.append(one_error_line(cli_main(main, [*argv, "--out", str(out)]), capfd.readouterr().err))
        assert not out.exists()
    return lines


@pytest.mark.parametrize("how", ["flat", "string"])
def test_a_text_config_moved_to_the_top_level_or_given_as_text_is_refused_alike(tmp_path, capfd, how):
    """A LLaVA-OneVision config.json whose LM sizes sit at its top level (no text_config): transformers' class ignores
    them and builds its default Qwen2 7B text config (the oracle below), so probe.eval's load refused the tiny
    tensors, while analyses.shift read the top level and measured them. Both now read what transformers builds and
    give the same line naming a tensor of the wrong shape and where the sizes it expects come from (transformers'
    default, not the file). A text_config given as JSON text, which transformers'
    class refuses, was read as absent: refused by both, naming the key."""
    from transformers import AutoConfig

    from conftest import tree_manifest
    from probe.models import resolve_model

    model = shutil.copytree(resolve_model("organism-ov-si").path, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    text = cfg.pop("text_config")
    if how == "flat":
        cfg.update({k: v for k, v in text.items() if k != "model_type"})
        built = AutoConfig.for_model(**cfg).get_text_config(decoder=True)
        assert (built.hidden_size, built.num_hidden_layers) != (text["hidden_size"], text["num_hidden_layers"])
        # the expected sizes are the class's default, which the line says (it said "by config.json", sizes the file
        # never states)
        want = f"checkpoint {model}: tensor language_model.lm_head.weight (shape ({text['vocab_size']}, " \
               f"{text['hidden_size']}) in the file, ({built.vocab_size}, {built.hidden_size}) by transformers' " \
               "default text config of a llava_onevision with no text_config (config.json has none; its class " \
               "ignores the top-level sizes))"
    else:
        cfg["text_config"] = json.dumps(text)
        with pytest.raises(Exception):  # noqa: B017 - transformers' strict dataclass validation
            AutoConfig.for_model(**cfg)
        want = f"{model}: config text_config is a string; it must be an object"
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    before = tree_manifest(model)
    for line in lines_of_eval_and_shift(model, tmp_path, capfd):
        assert want in line, line
    assert tree_manifest(model) == before


def test_mrope_sections_of_another_head_width_are_one_line_not_a_traceback(tmp_path, capfd):
    """A Qwen2-VL text config whose M-RoPE sections sum to 12 over 16-wide heads: transformers builds and loads the
    model, and its first forward raises in the rotary split (the oracle below), which probe.eval reported as a
    traceback. Every command now refuses the config in one line naming the key, nothing written."""
    import torch
    import transformers
    from transformers import AutoConfig

    from conftest import tree_manifest
    from probe.models import resolve_model

    model = shutil.copytree(resolve_model("organism-vl").path, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [4, 4, 4]
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with torch.device("meta"), pytest.raises(RuntimeError, match="split_with_sizes"):
        transformers.Qwen2VLForConditionalGeneration(AutoConfig.from_pretrained(model)).model.language_model(
            input_ids=torch.zeros(1, 3, dtype=torch.long))
    before = tree_manifest(model)
    for line in lines_of_eval_and_shift(model, tmp_path, capfd):
        assert f"{model}: config text_config.rope_parameters.mrope_section is [4, 4, 4] (sum 12)" in line, line
    assert tree_manifest(model) == before


@pytest.mark.parametrize("named", ["../outside.safetensors", "ABSOLUTE", "sub/model-00002-of-00002.safetensors", 7])
def test_an_index_naming_a_shard_by_a_path_is_refused_by_the_probe_and_the_analyses(tmp_path, capfd, named):
    """A shard named by a path in model.safetensors.index.json: analyses.shift read one outside the model's folder
    (and then said the index maps a tensor to '../…' but it is in '…'), probe.eval called it a missing shard; a
    weight_map value that is no string was a traceback in both. Now one line naming the index and the shard."""
    from conftest import tree_manifest
    from test_models import _sharded

    from probe.models import resolve_model

    model, _, names = _sharded(resolve_model("organism-base").path, tmp_path / "m")
    index = model / "model.safetensors.index.json"
    if isinstance(named, str):
        named = str(tmp_path / "abs.safetensors") if named == "ABSOLUTE" else named
        target = (model / named) if not Path(named).is_absolute() else Path(named)
        target.parent.mkdir(parents=True, exist_ok=True)
        (model / names[1]).rename(target)  # the shard is there, where the path points
    wmap = json.loads(index.read_text())["weight_map"]
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: named if v == names[1] else v
                                                               for k, v in wmap.items()}}))
    want = (f"{index}: weight_map names the shard {named!r}, a path, not a file name in {model}; shards are read from "
            "the model's own folder only" if isinstance(named, str) else f"{index}: weight_map maps ")
    before = tree_manifest(tmp_path)
    for line in lines_of_eval_and_shift(model, tmp_path, capfd):
        assert want in line, line
    assert tree_manifest(tmp_path) == before


@pytest.mark.parametrize("src, where, key", [("organism-base", None, "num_hidden_layers"),
                                             ("organism-vl", "vision_config", "depth"),
                                             ("organism-ov-si", "vision_config", "num_hidden_layers")])
def test_a_config_of_a_billion_layers_is_refused_at_once(tmp_path, capfd, src, where, key):
    """config.json saying 10**9 layers (a decoder's, or a vision tower's): probe.eval hung in transformers' config
    build (a list of a billion layer types) or its meta-device skeleton; now every command refuses it from the
    weights' headers in one line, before transformers reads the config."""
    import time

    from conftest import tree_manifest

    from analyses import shift
    from probe import eval as probe_eval
    from probe.models import resolve_model

    model = shutil.copytree(resolve_model(src).path, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    (cfg[where] if where else cfg)[key] = 10**9
    cfg.pop("layer_types", None)
    (model / "config.json").write_text(json.dumps(cfg))
    before = tree_manifest(model)
    data = REPO / "probe/zoo/data" / ("text" if where is None else "image_single")
    for main, argv in ((probe_eval.main, ["--models", str(model), "--data", str(data), "--limit", "1", "--quiet"]),
                       (shift.main, ["--base", str(model), "--models", "organism-base", "--no-figures"])):
        out = tmp_path / f"out-{main.__module__}"
        capfd.readouterr()
        started = time.monotonic()
        line = one_error_line(cli_main(main, [*argv, "--out", str(out)]), capfd.readouterr().err)
        assert time.monotonic() - started < 60
        assert (f"checkpoint {model}: config.json says {where + '.' if where else ''}{key} 1,000,000,000, but the "
                "deepest stack of layers in its weights has 4") in line, line
        assert not out.exists()
    assert tree_manifest(model) == before


@pytest.mark.parametrize("family, side", [("llava_onevision", 10**6), ("internvl", [10**6, 32])])
def test_a_vision_tower_of_absurd_image_size_is_refused_at_once(tmp_path, capfd, family, side):
    """config.json saying a vision tower takes 10**6 px images: transformers built its position table of
    (10**6 / patch)² rows and failed after seconds with torch's allocator message (125 GB asked); now the probe
    refuses it from the config in one line, exit 2, nothing written, the model untouched."""
    import time

    from conftest import tree_manifest

    from probe import eval as probe_eval
    from probe.errors import BadInput
    from probe.models import MAX_IMAGE_SIZE, check_vision_sizes
    from probe.tiny import tiny_dir

    model = shutil.copytree(tiny_dir(family), tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    at = lambda n: cfg | {"vision_config": cfg["vision_config"] | {"image_size": n}}  # noqa: E731
    check_vision_sizes(model, at(MAX_IMAGE_SIZE))  # the bound itself passes, one pixel more does not
    with pytest.raises(BadInput, match=f"image_size {MAX_IMAGE_SIZE + 1}: "):
        check_vision_sizes(model, at(MAX_IMAGE_SIZE + 1))
    cfg["vision_config"]["image_size"] = side
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    before = tree_manifest(model)
    out = tmp_path / "out"
    started = time.monotonic()
    line = one_error_line(cli_main(probe_eval.main, ["--models", str(model), "--data", str(REPO / "probe/zoo/data/text"),
                                                     "--limit", "1", "--quiet", "--out", str(out)]),
                          capfd.readouterr().err)
    assert time.monotonic() - started < 60
    assert f"{model}/config.json says vision_config.image_size {side}: an image side past 16,384 px" in line, line
    assert not out.exists() and tree_manifest(model) == before


def _with_custom_code(src: Path, dest: Path, sentinel: Path) -> Path:
    """A copy of ``src`` whose config.json, tokenizer and processor configs name code of its own in auto_map (as
    custom-code checkpoints on the hub do), each module making ``sentinel`` when imported."""
    d = shutil.copytree(src, dest)
    code = f"import os\nos.makedirs({str(sentinel)!r}, exist_ok=True)\n"
    maps = {"config.json": {"AutoConfig": "configuration_own.OwnConfig",
                            "AutoModelForCausalLM": "modeling_own.OwnForCausalLM"},
            "tokenizer_config.json": {"AutoTokenizer": ["tokenization_own.OwnTokenizer", None]},
            "processor_config.json": {"AutoProcessor": "processing_own.OwnProcessor"},
            "preprocessor_config.json": {"AutoImageProcessor": "processing_own.OwnImageProcessor"}}
    for name, auto_map in maps.items():
        if (d / name).is_file():
            cfg = json.loads((d / name).read_text())
            (d / name).write_text(json.dumps(cfg | {"auto_map": auto_map}))
    for module in ("configuration_own", "modeling_own", "tokenization_own", "processing_own"):
        (d / f"{module}.py").write_text(code)
    return d


def test_nothing_passes_trust_remote_code():
    """The guard behind the next test: no command may run a checkpoint's own code (no trust_remote_code keyword or
    key anywhere: a **kwargs dict could carry it too)."""
    passed = re.compile(r"trust_remote_code\s*[=:]|[\"']trust_remote_code[\"']")
    files = [p for p in sorted(REPO.rglob("*.py")) if ".venv" not in p.parts and p.name != "test_cli_errors.py"]
    assert len(files) > 50
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if passed.search(line)]
    assert hits == []


def test_a_checkpoint_naming_its_own_code_loads_as_its_family_and_never_runs_it(tmp_path, capfd):
    """auto_map in config.json, the tokenizer's and the processor's configs, beside modules that run on import: the
    model loads as the family's transformers class (one warning line says so), the modules never run; a model_type
    only its own code defines is refused as unsupported."""
    from probe import eval as probe_eval
    from probe.models import resolve_model

    sentinel = tmp_path / "code-ran"
    model = _with_custom_code(resolve_model("organism-vl").path, tmp_path / "m", sentinel)
    data = str(REPO / "probe/zoo/data/image_single")
    capfd.readouterr()
    assert cli_main(probe_eval.main, ["--models", str(model), "--data", data, "--limit", "2", "--quiet",
                                      "--out", str(tmp_path / "out")]) == 0
    err = capfd.readouterr().err
    assert not sentinel.exists()
    assert err.count(f"warning: {model}/config.json names its own code in auto_map (configuration_own.OwnConfig); it "
                     "is never run: the model loads as transformers' Qwen2VLForConditionalGeneration") == 1, err
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "complete"
    own = _with_custom_code(resolve_model("organism-base").path, tmp_path / "own", sentinel)
    cfg = json.loads((own / "config.json").read_text())
    (own / "config.json").write_text(json.dumps(cfg | {"model_type": "own", "architectures": ["OwnForCausalLM"]}))
    line = one_error_line(cli_main(probe_eval.main, ["--models", str(own), "--data", data, "--quiet",
                                                     "--out", str(tmp_path / "out2")]), capfd.readouterr().err)
    assert "unsupported model_type 'own'" in line and not sentinel.exists() and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("damage", ["header length past the file", "a tensor of 10**12 elements", "cut in half"])
def test_a_safetensors_file_claiming_more_than_it_holds_is_one_line_without_allocating(tmp_path, capfd, damage):
    """A header whose length, or a tensor whose shape, claims far more than the file holds is refused from the header,
    in one line, by the probe and the analyses alike: nothing is allocated for what it claims."""
    import resource
    import struct

    from probe.models import resolve_model

    model = shutil.copytree(resolve_model("organism-base").path, tmp_path / "m")
    f = model / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    if damage == "header length past the file":
        f.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    elif damage == "a tensor of 10**12 elements":
        header = json.loads(raw[8:8 + n])
        header["lm_head.weight"]["shape"] = [10**6, 10**6]
        text = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    else:
        f.write_bytes(raw[: len(raw) // 2])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for line in lines_of_eval_and_shift(model, tmp_path, capfd):
        assert str(f) in line and ("corrupt" in line or "unreadable checkpoint file" in line), line
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 2**20  # kB: under 1 GiB more at its peak


@pytest.mark.parametrize("src, key, value, want", [
    ("organism-ov-si", "model_type", ["qwen2"], "config text_config.model_type is a list; it must be a model type name"),
    ("organism-ov-si", "model_type", {"type": "qwen2"}, "config text_config.model_type is an object; it must be a "
                                                        "model type name"),
    ("organism-ov-si", "model_type", None, "config text_config.model_type is null; it must be a model type name"),
    ("organism-ov-si", "model_type", "qwen9", "config text_config.model_type is 'qwen9', a model type transformers "
                                              "does not know: transformers' 'llava_onevision' config class builds no "
                                              "text config from it"),
    *(("organism-ov-si", "model_type", t, f"config text_config.model_type is '{t}', not a decoder LM the family's "
                                          "layers path (model.language_model.layers) holds: transformers' "
                                          "LlavaOnevisionForConditionalGeneration builds ")
      for t in ("qwen2_vl", "llava", "whisper", "t5")),
    ("organism-ov-si", "head_dim", None, "config text_config.head_dim is null, which transformers' "
                                         "LlavaOnevisionForConditionalGeneration builds no attention from"),
    ("organism-base", "head_dim", None, "config head_dim is null, which transformers' Qwen2ForCausalLM builds no "
                                        "attention from"),
    ("organism-base", "decoder", {"hidden_size": 64}, "config decoder is set, which transformers' Qwen2ForCausalLM "
                                                      "takes for its text config")])
def test_a_config_transformers_cannot_build_is_refused_by_every_command(tmp_path, capfd, src, key, value, want):
    """A (text) config stating a list, an object, null or a name transformers does not know as its model_type where
    its class looks the type up (LLaVA-OneVision), a name it knows of no decoder LM (a Qwen2-VL, a LLaVA, a Whisper,
    a T5 in the LM's place), or a null head_dim its Qwen2 attention takes as its width: transformers builds no model
    from any (the oracle: its config class or its model on the meta device raises), while the analyses read the list
    and the unknown name as of no class, the null as Qwen2 and the head width as hidden size ÷ heads, and went on
    (shift, merge and trajectory wrote results for the known names, probe.eval, probe.heads and finetune ended in a
    traceback); a "decoder" key beside a causal LM's config, which transformers takes for its
    text config (an AttributeError), ended probe.eval in a traceback.
    Every command refuses it now in one line naming the checkpoint and the key (the shared reader,
    probe.lm_config.text_config_dict): exit 2, nothing written, the checkpoint untouched."""
    import torch
    import transformers
    from transformers import AutoConfig

    from analyses import finetune, merge, shift, trajectory
    from conftest import tree_manifest
    from probe import eval as probe_eval
    from probe import heads
    from probe.families import FAMILIES
    from probe.models import resolve_model

    model = shutil.copytree(resolve_model(src).path, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    (cfg["text_config"] if "text_config" in cfg else cfg)[key] = value
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    fam = FAMILIES["llava_onevision" if "text_config" in cfg else "qwen2"]
    try:
        with torch.device("meta"):
            built = getattr(transformers, fam.model_class)(AutoConfig.from_pretrained(model))
    except (TypeError, ValueError, AttributeError):
        built = None
    # the oracle: transformers builds no such model, or one holding no decoder layers where the commands read them
    # (a LlavaModel in a LLaVA-OneVision's LM's place)
    assert built is None or not hasattr(built.get_submodule(fam.layers_path.rsplit(".", 1)[0]), "layers")
    before = tree_manifest(model)
    data = str(REPO / "probe/zoo/data" / ("image_single" if "text_config" in cfg else "text"))
    for main, argv in ((probe_eval.main, ["--models", str(model), "--data", data, "--limit", "1", "--quiet"]),
                       (heads.main, ["--model", str(model), "--data", data, "--layers", "0", "--quiet"]),
                       (finetune.main, ["--model", str(model), "--data", f"text={REPO / 'probe/zoo/data/text'}",
                                        "--split", "validation", "--steps", "1", "--batch-size", "1", "--quiet",
                                        "--device", "cpu"]),
                       (shift.main, ["--base", "organism-base", "--models", str(model), "--no-figures"]),
                       (merge.main, ["--models", "organism-base", str(model), "--method", "average"]),
                       (trajectory.main, ["--base", "organism-base", "--experts", str(model), "--no-figures"])):
        out = tmp_path / f"out-{main.__module__}"
        capfd.readouterr()
        line = one_error_line(cli_main(main, [*argv, "--out", str(out)]), capfd.readouterr().err)
        assert f"{model}: {want}" in line, (main.__module__, line)
        assert not out.exists()
    assert tree_manifest(model) == before


@pytest.mark.parametrize("stated", [False, True])
def test_a_hybrid_text_model_is_refused_by_every_command_naming_its_first_layer_of_no_softmax_attention(
        tmp_path, capfd, stated):
    """A LLaVA-OneVision checkpoint (random weights, built and saved by transformers) whose text model is MiniMax:
    layers 0 and 2 softmax attention, 1 and 3 lightning attention (MiniMaxLightningAttention: a qkv_proj and an
    out_proj, no heads of softmax attention). The check read layer 0 alone: with layer_types left to the class
    (``stated`` False), probe.eval, probe.heads and finetune ended (exit 1) in a line blaming the transformers
    version for layer 1's attention, and shift and trajectory measured its tensors (exit 0); with them stated, as
    save_pretrained writes them, every command refused it for a reason it does not have (MiniMax's strict config
    refuses four layer types in the one-layer build). Oracle: the layer transformers builds at index 1 is no
    MiniMaxAttention. Every command refuses it now in one line naming layer 1 and its kind: exit 2, nothing written,
    the checkpoint untouched."""
    import transformers

    if "minimax" not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} does not know minimax")
    model, built = _ov_text_model(tmp_path, {"model_type": "minimax", "num_local_experts": 2,
                                             "num_experts_per_tok": 1})
    layers = built.model.language_model.layers
    assert [type(layer.self_attn).__name__ for layer in layers] == ["MiniMaxAttention", "MiniMaxLightningAttention"] * 2
    saved = json.loads((model / "config.json").read_text(encoding="utf-8"))
    if not stated:
        del saved["text_config"]["layer_types"]
        (model / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    else:
        assert saved["text_config"]["layer_types"][:2] == ["full_attention", "linear_attention"]
    want = (f"{model}: config text_config.model_type is 'minimax', not a decoder LM the family's layers path "
            "(model.language_model.layers) holds: transformers' LlavaOnevisionForConditionalGeneration builds layer 1 "
            "of the MiniMaxModel at model.language_model as a 'linear_attention' layer, MiniMaxDecoderLayer whose "
            "self_attn is MiniMaxLightningAttention")
    _every_command_refuses(model, tmp_path, capfd, want)



@pytest.mark.parametrize("text, attention, part", [
    ({"model_type": "deepseek_v3", "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
      "qk_nope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 2, "num_experts_per_tok": 1, "n_group": 1,
      "topk_group": 1, "moe_intermediate_size": 16, "first_k_dense_replace": 1}, "DeepseekV3Attention", "kv_b_proj"),
    ({"model_type": "gpt_oss", "num_local_experts": 2, "num_experts_per_tok": 1}, "GptOssAttention", "sinks")])
def test_a_text_model_whose_heads_are_not_q_k_v_rows_is_refused_by_every_command(tmp_path, capfd, text, attention,
                                                                                  part):
    """A LLaVA-OneVision checkpoint (random weights, built and saved by transformers) whose text model is DeepSeek-V3
    (multi-head latent attention: q_a/q_b and kv_a/kv_b projections, o_proj input heads × v_head_dim = 12 wide where
    hidden ÷ heads is another width) or gpt-oss (per-head attention sinks): a softmax attention with an o_proj, so it
    passed; probe.heads masked o_proj columns of hidden ÷ heads, the salience merge sliced q/k/v rows it lacks, shift
    and merge measured the latent tensors as heads. Oracle: the attention transformers builds holds ``part`` (a
    saved tensor). Every command refuses it in one line naming the type and the part: exit 2, nothing written, the
    checkpoint untouched."""
    model, built = _ov_text_model(tmp_path, text)
    attn = built.model.language_model.layers[0].self_attn
    assert type(attn).__name__ == attention and hasattr(attn, part) and not hasattr(attn, "k_proj") == (
        part == "kv_b_proj")
    want = (f"{model}: config text_config.model_type is '{text['model_type']}', not a decoder LM the family's layers "
            "path (model.language_model.layers) holds: transformers' LlavaOnevisionForConditionalGeneration builds "
            f"layer 0 ")
    named = re.compile(rf"self_attn is {attention} of [\w, ]*\b{part}\b[\w, ]*, not q/k/v_proj heads")
    assert all(named.search(line) for line in _every_command_refuses(model, tmp_path, capfd, want))


def _ov_text_model(tmp_path: Path, text: dict):
    """A LLaVA-OneVision checkpoint (the organism's vision side, random weights built and saved by transformers) whose
    text config is the organism's sizes and ``text``: (its path, the model transformers built)."""
    import torch
    import transformers
    from transformers import AutoConfig

    from probe.models import resolve_model

    model = shutil.copytree(resolve_model("organism-ov-si").path, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    cfg["text_config"] = {**{k: cfg["text_config"][k] for k in (
        "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
        "num_hidden_layers", "pad_token_id", "bos_token_id", "eos_token_id")}, **text}
    torch.manual_seed(0)
    built = transformers.LlavaOnevisionForConditionalGeneration(AutoConfig.for_model(**cfg))
    (model / "model.safetensors").unlink()
    built.save_pretrained(model)
    return model, built


def _every_command_refuses(model: Path, tmp_path: Path, capfd, want: str) -> list[str]:
    """probe.eval, probe.heads, finetune, shift, merge and trajectory on ``model``: exit 2, one line holding ``want``,
    nothing written, the checkpoint untouched. The lines."""
    from analyses import finetune, merge, shift, trajectory
    from conftest import tree_manifest
    from probe import eval as probe_eval
    from probe import heads

    before, lines = tree_manifest(model), []
    data = str(REPO / "probe/zoo/data/image_single")
    for main, argv in ((probe_eval.main, ["--models", str(model), "--data", data, "--limit", "1", "--quiet"]),
                       (heads.main, ["--model", str(model), "--data", data, "--layers", "0", "--quiet"]),
                       (finetune.main, ["--model", str(model), "--data", f"text={REPO / 'probe/zoo/data/text'}",
                                        "--split", "validation", "--steps", "1", "--batch-size", "1", "--quiet",
                                        "--device", "cpu"]),
                       (shift.main, ["--base", str(model), "--models", str(model), "--no-figures"]),
                       (merge.main, ["--models", str(model), str(model), "--method", "average"]),
                       (trajectory.main, ["--base", str(model), "--experts", str(model), "--no-figures"])):
        out = tmp_path / f"out-{main.__module__}"
        capfd.readouterr()
        line = one_error_line(cli_main(main, [*argv, "--out", str(out)]), capfd.readouterr().err)
        assert want in line, (main.__module__, line)
        assert not out.exists()
        lines.append(line)
    assert tree_manifest(model) == before
    return lines


@pytest.mark.parametrize("text, want", [('"rms_norm_eps": NaN', "rms_norm_eps is NaN"),
                                        ('"rope_theta": Infinity', "rope_parameters.rope_theta is Infinity"),
                                        ('"rope_theta": -1e999', "rope_parameters.rope_theta is -Infinity")])
def test_a_config_number_that_is_no_number_is_refused_by_every_command(tmp_path, capfd, text, want):
    """config.json holding NaN or an infinity (no JSON number; Python's reader takes them): an rms_norm_eps of NaN
    made every forward NaN, and probe.eval and probe.heads stopped with exit 1 saying the forward overflowed "in this
    dtype" and to rerun with --dtype float32, the dtype they ran in; shift, merge and trajectory went on (merge wrote
    the NaN into its output's config). Refused by every command, naming the key; the oracle is the text written."""
    from probe.models import resolve_model

    model = shutil.copytree(resolve_model("organism-base").path, tmp_path / "m")
    cfg = (model / "config.json").read_text(encoding="utf-8")
    key = text.split(":")[0]
    cfg, n = re.subn(key + r': [^,\n]+', text, cfg)
    assert n == 1
    (model / "config.json").write_text(cfg, encoding="utf-8")
    _every_command_refuses(model, tmp_path, capfd, f"{model}/config.json: {want}")


def test_an_moe_text_model_is_measured_by_shift_and_refused_by_merge(tmp_path, capfd):
    """A LLaVA-OneVision checkpoint (random weights, built and saved by transformers) whose text model is Qwen2-MoE,
    layer 0 dense (mlp_only_layers), the others experts, a router and a shared expert: q/k/v_proj heads, so every
    command reads it. shift measures each expert's tensors as the tensors they are (oracle: 0.5 added to layer 1's
    experts in a copy reads Δavg 0.5 there, 0 elsewhere); merge wrote its merged LM as Qwen2ForCausalLM, the class
    the family's LM is written as, which has a dense MLP in every layer: loaded, the experts and router were dropped
    and the MLP freshly initialised (exit 0). Refused now naming the layer and its expert tensors, nothing written."""
    from safetensors.torch import load_file, save_file

    from analyses import merge, shift

    model, _ = _ov_text_model(tmp_path, {"model_type": "qwen2_moe", "num_experts": 2, "num_experts_per_tok": 1,
                                         "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
                                         "mlp_only_layers": [0]})
    twin = shutil.copytree(model, tmp_path / "twin")
    sd = load_file(twin / "model.safetensors")
    moved = {k for k in sd if ".layers.1.mlp.experts." in k and "vision" not in k}
    assert moved
    save_file({k: v + 0.5 if k in moved else v for k, v in sd.items()}, twin / "model.safetensors",
              metadata={"format": "pt"})
    assert cli_main(shift.main, ["--base", str(model), "--models", str(twin), "--no-figures", "--quiet",
                                 "--out", str(tmp_path / "shift")]) == 0
    rows = pd.read_csv(tmp_path / "shift" / "shift.csv")
    hit = rows["tensor"].str.startswith("layers.1.mlp.experts.")
    assert set(rows.loc[hit, "tensor"]) == {k[k.index("layers."):] for k in moved}
    assert (rows.loc[hit, "delta_avg"] - 0.5).abs().max() < 1e-6 and (rows.loc[~hit, "delta_avg"] == 0).all()
    out = tmp_path / "merged"
    capfd.readouterr()
    line = one_error_line(cli_main(merge.main, ["--models", str(model), str(twin), "--method", "average", "--out",
                                                str(out)]), capfd.readouterr().err)
    assert "its LM's layer 1 holds mlp.experts.0.down_proj.weight" in line and "Qwen2ForCausalLM" in line, line
    assert not out.exists()


@pytest.mark.parametrize("name", MODULES + BENCH)
def test_a_negative_number_is_an_options_value_in_every_cli(name, monkeypatch, capsys):
    """argparse reads only ``-3`` and ``-0.5`` as negative numbers: ``--lm-lr -1e-3`` (and ``analyses.merge
    --lambda -1e-3``, a rate the command takes) was "expected one argument", not the value's own check. Every
    ``type=int``/``type=float`` option of every CLI takes a negative number in any form ``float()`` reads, as that
    value (oracle: ``int()``/``float()`` of the text)."""
    parsers = _parsers(name, monkeypatch)
    monkeypatch.undo()  # the parsers parse for real below
    checked = 0
    for parser in parsers:
        for action in parser._actions:  # nothing required: each option parses alone
            monkeypatch.setattr(action, "required", False)
        for group in parser._mutually_exclusive_groups:
            monkeypatch.setattr(group, "required", False)
        for action in parser._actions:
            if action.type not in (int, float) or not action.option_strings or action.choices:
                continue
            texts = ["-3", "-0"] if action.type is int else ["-1e-3", "-2.5E+2", "-.5", "-7", "-inf", "-1.e3"]
            for text in texts:
                value = getattr(parser.parse_args([action.option_strings[-1], text]), action.dest)
                assert value in (action.type(text), [action.type(text)]), (action.option_strings, text, value)
            checked += 1
    assert checked or name in ("probe.families", "analyses.shift", "analyses.replicate", "figures.__main__"), name


@pytest.mark.parametrize("argv", [
    ["probe.eval", "--models", "organism-vl", "--data", "~no-such-user-43/d", "--out", "{tmp}/o"],
    ["probe.eval", "--models", "~no-such-user-43/m", "--data", "probe/zoo/data/text", "--out", "{tmp}/o"],
    ["probe.heads", "--model", "organism-vl", "--out", "~no-such-user-43/o"],
    ["figures", "heads", "~no-such-user-43/run"],
])
def test_a_home_of_no_user_here_is_one_line_wherever_a_path_is_read(argv, tmp_path, capsys):
    """``~user`` of a user this machine lacks made pathlib raise RuntimeError (argparse lets it through): a traceback
    from each command, one path kind after another (a data set, a model, --out, a results dir). One rule now
    (probe.errors.in_path, through which every path is expanded) and nothing written. Oracle: the user's name."""
    name, *args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    main = importlib.import_module("figures.__main__" if name == "figures" else name).main
    line = one_error_line(cli_main(main, args), capsys.readouterr().err)
    assert "~no-such-user-43" in line and "no user's home" in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, argv", [
    ("analyses.merge", ["--base", "organism-base", "--models", "organism-vl", "--method", "average", "--quiet"]),
    ("probe.zoo.__main__", ["build", "--quick"]), ("sweep", ["--device", "cpu"]), ("eval", ["--device", "cpu"]),
    ("train_step", []), ("merge", ["--no-mergekit"])])
def test_a_thread_count_no_machine_can_start_is_one_line_before_anything_runs(name, argv, tmp_path, capsys):
    """--threads 99999999999 ended every command taking it in torch.set_num_threads' ValueError traceback (past a C
    int). Refused now before anything is read or written: more than 4 × this machine's CPUs (the oracle:
    os.cpu_count)."""
    out = tmp_path / "out"
    extra = ["--out", str(out)] if name in ("analyses.merge", "probe.zoo.__main__") else []
    extra += ["--workdir", str(out)] if name == "merge" else []
    line = one_error_line(cli_main(_main(name), [*argv, "--threads", "99999999999", *extra]), capsys.readouterr().err)
    assert "--threads 99999999999" in line and f"{os.cpu_count()} CPUs" in line, line
    assert not out.exists()


def test_a_merge_on_more_threads_than_openmp_starts_is_refused_not_aborted_half_written(tmp_path):
    """analyses.merge --threads 100000 got as far as libgomp, which aborted the process ("libgomp: Out of memory
    allocating 800008 bytes", exit 1) and left the partial output dir and its lock beside --out. In a subprocess: the
    abort would take pytest with it."""
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "analyses.merge", "--base", "organism-base", "--models", "organism-vl",
                        "--method", "average", "--threads", "100000", "--quiet", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    line = one_error_line(r.returncode, r.stderr)
    assert "--threads 100000" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, argv, flag", [
    ("sweep", ["--random-config", "qwen2-7b", "--layers", "29", "--device", "cpu"], "--layers 29"),
    ("sweep", ["--random-config", "qwen2-7b", "--layers", "99999999999", "--device", "cpu"], "--layers 99999999999"),
    ("sweep", ["--random-config", "qwen2-7b", "--vocab-size", "152065", "--device", "cpu"], "--vocab-size 152065"),
    ("sweep", ["--random-config", "qwen2-vl-7b", "--vision-layers", "33", "--device", "cpu"], "--vision-layers 33"),
    ("merge", ["--arch", "qwen2-7b", "--layers", "99999999999", "--no-mergekit"], "--layers 99999999999")])
def test_a_cut_of_a_published_architecture_past_its_size_is_refused_at_once(name, argv, flag, tmp_path, capsys):
    """--layers, --vision-layers and --vocab-size cut a published architecture (probe.archs) to build it at random;
    past its own size (Qwen2-7B: 28 layers, 152,064 rows; Qwen2-VL-7B's vision tower: 32 blocks; DESIGN §1) the
    benchmarks built them: bench/sweep.py --layers 99999999999 and bench/merge.py --arch qwen2-7b --layers
    99999999999 ran past 90 s building, --vocab-size 99999999999 ended as 'out of memory … lower the batch size'."""
    extra = ["--workdir", str(tmp_path / "w")] if name == "merge" else []
    line = one_error_line(cli_main(_main(name), [*argv, *extra]), capsys.readouterr().err)
    assert flag in line and "cuts" in line, line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("damage", ["a byte no UTF-8 text holds", "a directory"])
def test_a_replicate_config_that_is_no_text_file_is_one_line(damage, tmp_path, capsys):
    """analyses.replicate --config FILE with a byte that is no UTF-8 (a file saved in Latin-1, or a binary) ended in a
    UnicodeDecodeError traceback, exit 1; the config is now bad input, nothing written, the file untouched."""
    from analyses.replicate import main

    config = tmp_path / "c.toml"
    if damage == "a directory":
        config.mkdir()
    else:
        text = (REPO / "analyses/configs/quick.toml").read_bytes()
        config.write_bytes(text.replace(b"# ", "# é ".encode("latin-1"), 1))  # é as Latin-1: no UTF-8
    before, out = snapshot(tmp_path), tmp_path / "out"
    line = one_error_line(cli_main(main, ["--config", str(config), "--quiet", "--out", str(out)]),
                          capsys.readouterr().err)
    assert f"--config {config}" in line, line
    assert not out.exists() and snapshot(tmp_path) == before


@pytest.mark.parametrize("file, text, want", [
    ("tokenizer.json", '{"model": 5}', "cannot load its tokenizer (tokenizer.json lacks 'added_tokens')"),
    ("generation_config.json", '{"eos_token_id": "x"}', "eos_token_id 'x' (generation_config.json, else "
                                                        "config.json) is not a token id"),
    ("generation_config.json", '{"eos_token_id": [2, -1]}', "eos_token_id [2, -1] (generation_config.json, else "
                                                            "config.json) is not a token id")])
def test_a_tokenizer_or_generation_config_of_the_wrong_shape_is_one_line(file, text, want, tmp_path, capfd):
    """A tokenizer.json that is JSON but no tokenizer (a KeyError inside transformers) and an eos_token_id that is no
    token id (a TypeError sorting the end ids) ended probe.eval in a traceback, exit 1, the second with its run.json
    and lock written. Bad input now: one line naming the model, nothing written, the model untouched."""
    from conftest import tree_manifest
    from probe import eval as probe_eval
    from probe.models import resolve_model

    model = shutil.copytree(resolve_model("organism-base").path, tmp_path / "m")
    (model / file).write_text(text, encoding="utf-8")
    before, out = tree_manifest(model), tmp_path / "out"
    capfd.readouterr()
    code = cli_main(probe_eval.main, ["--models", str(model), "--data", str(REPO / "probe/zoo/data/text"), "--limit",
                                      "1", "--quiet", "--device", "cpu", "--out", str(out)])
    line = one_error_line(code, capfd.readouterr().err)
    assert f"{model}" in line and want in line, line
    assert not out.exists() and tree_manifest(model) == before


# --------------------------------------------------------------------------------------------------------
# a host that cannot start a thread or process; load-time refusals; who holds a lock

ORGANISM_RUNS = {  # organism-base on 1–2 bundled text items: each command that loads a model, a second or two
    "probe.heads": ["--model", "{model}", "--data", "probe/zoo/data/text", "--limit", "1", "--layers", "0",
                    "--heads", "0", "--no-generate", "--no-figures", "--quiet", "--out", "{out}"],
    "probe.eval": ["--models", "{model}", "--data", "probe/zoo/data/text", "--limit", "1", "--no-generate",
                   "--quiet", "--out", "{out}"],
    "analyses.finetune": ["--model", "{model}", "--data", "text=probe/zoo/data/text", "--split", "validation",
                          "--steps", "1", "--batch-size", "2", "--device", "cpu", "--quiet", "--out", "{out}"],
}


def _organism_run(command: str, model: str | Path, out: Path) -> int:
    argv = [a.format(model=model, out=out) for a in ORGANISM_RUNS[command]]
    return cli_main(importlib.import_module(command).main, argv)


def test_a_thread_that_cannot_start_is_said_as_such_not_as_a_bad_checkpoint(tmp_path, monkeypatch, capfd):
    """On a host at its process limit (ulimit -u, a container's pids.max) transformers' loader could not start its
    thread pool, and probe.heads said "cannot load checkpoint …/organism-base: can't start new thread", exit 2, as if
    the checkpoint were damaged. Now one line saying what failed and what to lower, exit 1 (the host, not the input,
    as for memory running out), nothing written. Oracle: threading.Thread.start refusing as CPython does."""
    import threading

    def refuse(self, *args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    out = tmp_path / "out"
    capfd.readouterr()
    code = _organism_run("probe.heads", "organism-base", out)
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: cannot start a thread (can't start new thread): ") and "--threads" in err, err
    assert "checkpoint" not in err and not out.exists()


def test_a_process_that_cannot_start_is_said_as_such_and_other_eagain_is_not(monkeypatch, capfd):
    """A process pool (probe.zoo build's lanes) whose worker cannot be forked raises BlockingIOError EAGAIN from
    multiprocessing: a traceback before. One line now, exit 1. The same errno from a non-blocking read is no such
    failure and keeps its traceback (re-raised)."""
    import _posixsubprocess
    import errno
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    def refuse(*args, **kwargs):
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    def pool_main(argv) -> int:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            pool.submit(abs, -1).result()
        return 0

    monkeypatch.setattr(_posixsubprocess, "fork_exec", refuse)
    capfd.readouterr()
    assert cli_main(pool_main) == 1
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot start a process ({os.strerror(errno.EAGAIN)}): "), err
    monkeypatch.undo()

    def read_main(argv) -> int:
        r, w = os.pipe()
        os.set_blocking(r, False)
        try:
            os.read(r, 1)  # nothing written: EAGAIN, not a process that failed to start
        finally:
            os.close(r), os.close(w)
        return 0

    with pytest.raises(BlockingIOError):
        cli_main(read_main)


def _nan_copy(dest: Path) -> Path:
    from safetensors.torch import load_file, save_file

    from probe.models import resolve_model

    model = shutil.copytree(resolve_model("organism-base").path, dest)
    weights = load_file(model / "model.safetensors")
    key = next(k for k in weights if "layers.1.mlp.down_proj" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("command", list(ORGANISM_RUNS))
@pytest.mark.parametrize("refusal", ["non-finite weights", "--out in use"])
def test_a_refusal_found_as_the_model_loads_is_the_only_stderr_line(command, refusal, tmp_path, capfd):
    """probe.heads and probe.eval printed the placement line ("device cpu (1 thread), dtype float32, attention
    sdpa") on stderr before loading, so a checkpoint refused as it loads (a NaN weight) or an --out found in use at
    the claim after the load left two lines on stderr; analyses.finetune's lock refusal three (its --split warning
    too). The placement line goes to stdout now, and the warning after the claim: bad input is one stderr line.
    Oracle: a weight set to NaN by hand; another open file description holding the lock."""
    import fcntl

    out = tmp_path / "out"
    if refusal == "non-finite weights":
        model, says = _nan_copy(tmp_path / "nan"), "non-finite weights"
        held = None
    else:
        model, says = "organism-base", "is in use by another running command"
        out.mkdir()
        held = os.open(out / ".lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX)
    capfd.readouterr()
    try:
        code = _organism_run(command, model, out)
    finally:
        if held is not None:
            os.close(held)
    captured = capfd.readouterr()
    line = one_error_line(code, captured.err)
    assert says in line, line
    if refusal == "non-finite weights":
        assert not out.exists()


def test_a_lock_refusal_names_a_holder_that_writes_its_name_just_after_locking(tmp_path):
    """A command that had taken --out's lock but not yet written "PID HOST" into it (the instant between its flock
    and its write, or a new lock file still empty) was refused without a name: "… in use by another running
    command; wait …". A refused command now re-reads a lock that names no live holder for a moment. Oracle: a lock
    file created empty and held, its name written 0.2 s later."""
    import fcntl
    import socket
    import threading

    from probe.results import LOCK, lock_out_dir

    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK
    held = os.open(lock, os.O_CREAT | os.O_RDWR)  # another open file description: refused as another process is
    fcntl.flock(held, fcntl.LOCK_EX)
    holder = os.getppid()  # a live process that is not this one (this process's own pid names no other holder)
    writer = threading.Timer(0.2, lambda: os.pwrite(held, f"{holder} {socket.gethostname()}\n".encode(), 0))
    writer.start()
    try:
        with pytest.raises(BadInput) as refused:
            lock_out_dir(out)
    finally:
        writer.join()
        os.close(held)
    assert f"(pid {holder} on {socket.gethostname()})" in str(refused.value), refused.value


def test_a_released_lock_names_nobody(tmp_path):
    """A lock kept the name of the last command that held it after that command had let it go: one that took it
    next and was refused-against before writing its own name was named as the earlier (possibly still running)
    process. The name goes when the claim ends; a new claim writes its own."""
    import socket

    from probe.results import LOCK, lock_out_dir, release_claims

    out = tmp_path / "out"
    lock_out_dir(out)
    assert (out / LOCK).read_text(encoding="utf-8") == f"{os.getpid()} {socket.gethostname()}\n"
    release_claims()
    assert (out / LOCK).read_text(encoding="utf-8") == ""


# --------------------------------------------------------------------------------------------------------
# BadInput is a ValueError: a notebook's ``except ValueError`` catches a refused value, with the same line


def test_a_value_the_python_api_refuses_is_a_value_error_saying_the_command_lines_line(capsys):
    """``probe.errors.BadInput`` was a bare Exception: a notebook's ``except ValueError`` (what Python raises for a
    bad value) missed ``evaluate(limit=0)`` and ``merge(threads=0)``. Caught so now, with the one line the
    command prints after ``error:`` (the oracle: the CLI's own stderr), and the CLI still exits 2 with it."""
    from analyses.merge import main as merge_main
    from analyses.merge import merge
    from probe.eval import evaluate
    from probe.eval import main as eval_main

    for call, main, argv in (
            (lambda: evaluate(models=["organism-base"], data=["text"], limit=0, out="unused"), eval_main,
             ["--models", "organism-base", "--data", "text", "--limit", "0", "--out", "unused"]),
            (lambda: merge(models=["a", "b"], threads=0, out="unused"), merge_main,
             ["--models", "a", "b", "--threads", "0", "--out", "unused"])):
        try:
            call()
        except ValueError as exc:
            assert isinstance(exc, BadInput)
            said = str(exc)
        else:
            raise AssertionError("no error")
        capsys.readouterr()
        line = one_error_line(cli_main(main, argv), capsys.readouterr().err)
        assert "\n" not in said and line == f"error: {said}", (line, said)
    assert not Path("unused").exists()


@pytest.mark.parametrize("name, argv", [("figures.__main__", ["heads", "~nosuchuser48/r"]),
                                        ("analyses.merge", ["--models", "a", "b", "--out", "~nosuchuser48/o"])])
def test_a_path_refused_while_argparse_reads_it_keeps_its_own_line(name, argv, capsys):
    """argparse turns a ValueError from an option's type into "invalid in_path value: …": with BadInput a
    ValueError, ``~user`` of no user (in_path's BadInput) would have lost the line that says so."""
    capsys.readouterr()
    line = one_error_line(cli_main(importlib.import_module(name).main, argv), capsys.readouterr().err)
    assert line == "error: ~nosuchuser48/" + argv[-1].split("/")[1] + ": ~nosuchuser48 names no user's home on " \
                   "this machine", line


def test_a_refusal_of_the_video_inputs_is_not_reworded_as_the_processors(monkeypatch):
    """encode_prompt turns the processor's ValueError (an image or frames it refuses) into "item …: …'s processor
    refuses it"; probe.video's own BadInput ("video inputs are not supported for …") passes as it was raised."""
    import probe.video
    from probe.prompting import Prompt, encode_prompt

    said = BadInput("video inputs are not supported for the test family")

    def refuse(*_):
        raise said

    monkeypatch.setattr(probe.video, "add_video_inputs", refuse)
    loaded = argparse.Namespace(processor=None, tokenizer=lambda *a, **k: {"input_ids": [[1]], "attention_mask": [[1]]})
    with pytest.raises(BadInput) as caught:
        encode_prompt(loaded, argparse.Namespace(id="x"), Prompt("t", [], [object()]))
    assert caught.value is said


def test_an_unknown_key_in_a_template_file_is_named_with_the_known_fields(tmp_path, capfd) -> None:
    """A --template JSON file with a misspelt key ("sytem") said Python's dataclass wording, "--template t.json:
    PromptTemplate.__init__() got an unexpected keyword argument 'sytem'" (fuzz48b). Now one line naming the file, the
    key and the fields a template has (the oracle: dataclasses.fields of PromptTemplate), exit 2 from the command
    line, BadInput with the same line from Python; nothing written."""
    from dataclasses import fields

    from probe import heads
    from probe.prompting import PromptTemplate

    t = tmp_path / "t.json"
    t.write_text('{"sytem": "Answer."}', encoding="utf-8")
    known = ", ".join(sorted(f.name for f in fields(PromptTemplate)))
    want = f"--template {t}: unknown key 'sytem' (the fields of a template: {known})"
    out = tmp_path / "out"
    assert cli_main(heads.main, ["--model", "organism-base", "--template", str(t), "--quiet", "--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert err == f"error: {want}\n", err
    with pytest.raises(BadInput) as raised:
        heads.sweep(model="organism-base", template=t, quiet=True, out=out)
    assert str(raised.value) == want and not out.exists()
