"""A command never writes where it reads: an --out that is, holds or lies inside an input (model, data set, template,
config) is refused with one line, and every input tree, --out's too, is left byte- and metadata-identical
(``conftest.tree_manifest``). Each case was a run that wrote into, or deleted, an input."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO, tree_manifest
from probe.errors import cli_main


def refused(main, argv: list, roots: list[Path], want: str, capfd) -> None:
    """``main(argv)`` exits 2 with one line holding ``want``, and nothing under ``roots`` changed."""
    before = tree_manifest(*roots)
    capfd.readouterr()
    code = cli_main(main, [str(a) for a in argv])
    err = capfd.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and want in err, err
    assert tree_manifest(*roots) == before


@pytest.fixture()
def inputs(tmp_path, tiny_dirs, data_dir) -> tuple[Path, Path]:
    """A tiny Qwen2-VL and the synthetic image set, copied where a test may put an --out among them."""
    return shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "model"), shutil.copytree(data_dir, tmp_path / "data")


@pytest.mark.parametrize("command", ["heads", "eval"])
def test_an_out_inside_a_data_set_is_refused(command, inputs, tmp_path, capfd):
    """An --out in a subject folder wrote the run among the set's files, and one inside the set became a subject
    of its own: without a parquet file yet (a run killed early) every later read of the set stopped, the resume's
    too."""
    from probe import eval as probe_eval
    from probe import heads as probe_heads

    model, data = inputs
    out = data / "Counting" / "run"
    argv = (["--model", model] if command == "heads" else ["--models", model]) + [
        "--data", data, "--limit", "1", "--no-generate", "--quiet", "--out", out]
    main = probe_heads.main if command == "heads" else probe_eval.main
    refused(main, argv + (["--layers", "0", "--heads", "0", "--no-figures"] if command == "heads" else []),
            [tmp_path], f"is inside the data set {data}", capfd)


def test_eval_into_a_dir_holding_its_models_is_refused(inputs, tmp_path, capfd):
    """Evaluating a fine-tuning run's checkpoints into the run's own dir with --overwrite deleted that run's
    run.json (a name probe.eval owns too) and wrote its results among the checkpoints."""
    from probe.eval import main

    model, data = inputs
    run = tmp_path / "ft"
    run.mkdir()
    ckpt = model.rename(run / "checkpoint-0")
    (run / "run.json").write_text('{"config": "the fine-tuning run"}\n')
    refused(main, ["--models", ckpt, "--data", data, "--limit", "1", "--no-generate", "--quiet", "--out", run,
                   "--overwrite"], [tmp_path], f"holds the model {ckpt}", capfd)
    refused(main, ["--models", ckpt, "--data", data, "--limit", "1", "--quiet", "--out", data, "--overwrite"],
            [tmp_path], f"is the data set {data}", capfd)


def test_finetune_into_a_data_set_is_refused(inputs, tmp_path, capfd):
    """A fine-tuning --out inside a training set: the first run wrote its checkpoints there, and its resume (and
    every other read of the set) then stopped on a subject folder without data files."""
    from analyses.finetune import main

    model, data = inputs
    refused(main, ["--model", model, "--data", f"image={data}", "--split", "validation", "--steps", "1",
                   "--batch-size", "1", "--dtype", "float32", "--device", "cpu", "--quiet", "--out", data / "ft"],
            [tmp_path], f"is inside the data set {data}", capfd)


def _config(tmp_path: Path, base: str, first_expert: str) -> Path:
    """The quick replication with its data sets copied into ``tmp_path/data`` and the models given."""
    text = (REPO / "analyses" / "configs" / "quick.toml").read_text()
    text = re.sub(r'"\.\./\.\./probe/zoo/data/', f'"{tmp_path / "data"}/', text)
    text = re.sub(r'^base = .*$', f'base = "{base}"', text, flags=re.M)
    text = re.sub(r'^experts = \["organism-vl"', f'experts = ["{first_expert}"', text, flags=re.M)
    text = re.sub(r'^carrier = .*$', f'carrier = "{first_expert}"', text, flags=re.M)
    (tmp_path / "q.toml").write_text(text)
    return tmp_path / "q.toml"


@pytest.mark.parametrize("where", ["expert in a stage dir", "out inside a data set", "out inside the base"])
def test_replicate_out_apart_from_its_inputs(where, tmp_path, capfd):
    """An expert kept in a stage dir of --out (a fine-tuned checkpoint of an earlier run) was deleted with that
    stage; an --out inside a data set left its folder there (every later read of the set stopped); one inside a
    model made the model's fingerprint count the run's files, so each rerun started every stage over."""
    from analyses.replicate import MARKER, main
    from probe.zoo import organism_dir

    shutil.copytree(REPO / "probe" / "zoo" / "data", tmp_path / "data")
    base, expert, out = "organism-base", "organism-vl", tmp_path / "out"
    if where == "expert in a stage dir":
        out.mkdir()
        (out / MARKER).write_text("{}\n")  # an earlier run's --out
        expert = str(shutil.copytree(organism_dir("organism-vl"), out / "finetune" / "mixed" / "checkpoint-2"))
        want = f"holds the model {expert}"
    elif where == "out inside a data set":
        out = tmp_path / "data" / "text" / "rq"
        want = f"is inside the data set {tmp_path / 'data' / 'text'}"
    else:
        base = str(shutil.copytree(organism_dir("organism-base"), tmp_path / "organism-base"))
        out = Path(base) / "rq"
        want = f"is inside the model {base}"
    refused(main, ["--config", _config(tmp_path, base, expert), "--out", out, "--quiet"], [tmp_path], want, capfd)


def test_zoo_data_never_writes_into_the_shipped_sets(tmp_path, monkeypatch, capfd):
    """``probe.zoo data --out probe/zoo/data/text/extra`` wrote its sets into the shipped text set, whose next read
    (every organism's default run, this command's own) then stopped on a subject folder without data files."""
    import probe.zoo
    from probe.zoo.__main__ import main

    zoo = tmp_path / "zoo"
    shutil.copytree(REPO / "probe" / "zoo" / "data", zoo / "data")
    monkeypatch.setattr(probe.zoo, "package_root", lambda: zoo)
    refused(main, ["data", "--out", zoo / "data" / "text" / "extra", "--n", "1"], [tmp_path],
            "is inside the package's zoo", capfd)
