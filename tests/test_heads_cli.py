"""``python -m probe.heads`` as users run it (a subprocess), on the tiny Qwen2-VL and a small synthetic MMMU set.

The reference run is made once per pytest run (shared by xdist workers) with the naive engine; other tests copy
it before changing anything. Numbers are checked against pandas aggregation of the per-item table and against
an in-process oracle (o_proj weight columns zeroed).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, change_weights_in_place, cli_env, killed_after_first_part

N_ITEMS, LAYERS, HEADS = 6, (0, 3), (0, 1)
BASE_ARGS = ["--model", "tiny-qwen2-vl", "--limit", str(N_ITEMS), "--layers", "0,3", "--heads", "0-1",
             "--method", "naive", "--chunk-size", "1", "--max-new-tokens", "3", "--quiet"]
HEATMAPS = [f"heatmap_{m}.{e}" for m in ("accuracy", "prob_accuracy", "kl") for e in ("png", "pdf")]


def cli(args, module: str = "probe.heads", cwd: Path = REPO, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"


def assert_one_line_error(r: subprocess.CompletedProcess) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}, stderr:\n{r.stderr[-3000:]}"
    assert len(lines) == 1, f"want exactly one stderr line, got {len(lines)}:\n{r.stderr[-3000:]}"
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="session")
def base_run(shared_root, data_dir) -> Path:
    """The uninterrupted reference run (read-only for tests)."""
    from filelock import FileLock

    out = shared_root / "cli-base"
    with FileLock(str(shared_root / "cli-base.lock")):
        done = out / "heads.csv"
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)
            ok(cli([*BASE_ARGS, "--data", data_dir, "--out", out]))
    return out


def test_heatmaps_name_the_model_data_and_split(base_run, data_dir, tmp_path, monkeypatch):
    """A heatmap said which model it was of, not on which items: baseline.json keeps the data set and split, and
    every heatmap's title names all three (a redraw of a copy: base_run is read-only)."""
    from matplotlib.figure import Figure

    from figures.heads import draw_heads

    base = json.loads((base_run / "baseline.json").read_text())
    assert (base["data"], base["split"]) == (Path(data_dir).name, "validation")
    figs, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), save(self, *a, **k)))
    draw_heads(shutil.copytree(base_run, tmp_path / "run"))
    titles = [f.axes[0].get_title() for f in figs]
    assert len(titles) == 2 * 3  # png and pdf of three maps
    assert all(f"{base['model']} on {Path(data_dir).name}, validation split (n={N_ITEMS} items)" in t for t in titles)
    # the cells' percentages to a tenth (whole ones showed 12.5 % as "12"), KL to a thousandth
    cells = {t.split("\n")[0]: [x.get_text() for x in f.axes[0].texts] for f, t in zip(figs, titles)}
    assert all(re.fullmatch(r"\d+\.\d" if "KL" not in t else r"\d\.\d{3}", x) for t, xs in cells.items() for x in xs)
    assert sum(map(len, cells.values())) == 3 * len(LAYERS) * len(HEADS)


def count_open_rows(data_dir: Path, limit: int) -> int:
    """Open-ended rows met before the limit-th multiple-choice one, walking subjects and numeric ids in order."""
    rows = sorted((f.parent.name, int(r["id"].rsplit("_", 1)[1]), r["question_type"])
                  for f in data_dir.glob("*/validation-*.parquet")
                  for r in pq.read_table(f, columns=["id", "question_type"]).to_pylist())
    n_mc = n_open = 0
    for _, _, kind in rows:
        if kind == "multiple-choice":
            n_mc += 1
            if n_mc == limit:
                break
        else:
            n_open += 1
    return n_open


# --------------------------------------------------------------------------------------------------------
# outputs


def test_outputs_exist_and_agree_with_items(base_run, data_dir):
    heads = pd.read_csv(base_run / "heads.csv")
    for col in ("layer", "head", "accuracy", "prob_accuracy", "kl", "n_items"):
        assert col in heads.columns, col
    assert sorted(zip(heads["layer"], heads["head"])) == [(l, h) for l in LAYERS for h in HEADS]
    assert (heads["n_items"] == N_ITEMS).all()

    base = json.loads((base_run / "baseline.json").read_text())
    for key in ("accuracy", "prob_accuracy", "n_items", "n_skipped_open"):
        assert key in base, key
    assert base["n_items"] == N_ITEMS
    assert base["n_skipped_open"] == count_open_rows(data_dir, N_ITEMS) > 0

    items = pd.read_parquet(base_run / "items.parquet")
    assert len(items) == N_ITEMS * (1 + len(LAYERS) * len(HEADS))
    is_base = (items["layer"] == -1) & (items["head"] == -1)
    assert is_base.sum() == N_ITEMS and items.loc[is_base, "item_id"].is_unique
    assert (items.loc[is_base, "kl"] == 0.0).all()  # exactly zero with nothing masked
    assert (items["kl"] >= 0).all()
    # heads.csv and baseline.json are the means of the per-item table (recomputed here with pandas)
    masked = items[~is_base].groupby(["layer", "head"])
    agg = pd.DataFrame({"accuracy": masked["correct"].mean(), "prob_accuracy": masked["prob_correct"].mean(),
                        "kl": masked["kl"].mean(), "p_answer": masked["p_answer"].mean()}).reset_index()
    # the drops from the baseline rows and p(answer) (the comparison with summarize() below is its own code, not an
    # oracle; on this tiny run every drop is 0, so test_metrics' hand-built tables test the drops' values)
    agg["accuracy_drop"] = items.loc[is_base, "correct"].mean() - agg["accuracy"]
    agg["prob_accuracy_drop"] = items.loc[is_base, "prob_correct"].mean() - agg["prob_accuracy"]
    merged = heads.merge(agg, on=["layer", "head"], suffixes=("", "_want"))
    assert len(merged) == len(heads) == len(agg)
    for m in ("accuracy", "prob_accuracy", "kl", "p_answer", "accuracy_drop", "prob_accuracy_drop"):
        assert (merged[m] - merged[f"{m}_want"]).abs().max() <= 1e-5 * max(1.0, merged[f"{m}_want"].abs().max())
    # full precision: the reloaded heads.csv is bit-equal to the table summarize() computes from items.parquet
    from probe.results import summarize

    want, _ = summarize(items)
    pd.testing.assert_frame_equal(heads, want, check_exact=True, check_dtype=False)
    assert base["accuracy"] == pytest.approx(items.loc[is_base, "correct"].mean())
    assert base["prob_accuracy"] == pytest.approx(items.loc[is_base, "prob_correct"].mean())
    # 5-option items score all five letters
    assert set(items["prob_pred"]) <= set("ABCDE")

    for name in HEATMAPS:
        data = (base_run / name).read_bytes()
        assert data.startswith(b"\x89PNG" if name.endswith("png") else b"%PDF"), name

    run = json.loads((base_run / "run.json").read_text())
    assert run["status"] == "complete" and len(run["fingerprint"]) >= 8
    # the fingerprint rule, restated: the plan (its model and data paths already absolute and resolved here) without
    # the model's name, a label (probe.heads.plan_identity; a run fingerprinted with it is refused as an older
    # omniprobe's, as its code digest refuses parts computed beside it)
    identity = {k: v for k, v in run["plan"].items() if k != "model_spec"}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    assert run["fingerprint"] == digest
    assert {"torch", "transformers", "python"} <= set(run["versions"])
    assert run["plan"]["template"]["system"] and "{question}" in run["plan"]["template"]["user"]
    assert run["plan"]["method"] == "naive" and run["plan"]["settings"]["attn_implementation"]


def test_cli_numbers_match_in_process_oracle(base_run, data_dir, load_tiny):
    """p_answer, KL and the probability choice of the CLI equal a direct computation with o_proj columns zeroed."""
    from probe.mmmu import load_items
    from probe.prompting import PromptTemplate, build_inputs, letter_token_ids

    m = load_tiny("qwen2_vl", "sdpa")
    run = json.loads((base_run / "run.json").read_text())
    template = PromptTemplate(**run["plan"]["template"])
    items, _ = load_items(data_dir, limit=N_ITEMS)
    table = pd.read_parquet(base_run / "items.parquet").set_index(["item_id", "layer", "head"])
    o_proj = {l: m.model.model.language_model.layers[l].self_attn.o_proj for l in LAYERS}
    d = o_proj[0].in_features // m.model.config.text_config.num_attention_heads
    worst = 0.0
    for item in items[:3]:
        inputs = build_inputs(m, item, template)
        ids = letter_token_ids(m.tokenizer, item.letters)
        with torch.no_grad():
            base_logp = torch.log_softmax(m.model(**inputs).logits[0, -1, ids].double(), -1)
        for layer, head in [(3, 1), (0, 0)]:
            w = o_proj[layer].weight
            saved = w.detach().clone()
            try:
                with torch.no_grad():
                    w[:, head * d:(head + 1) * d] = 0
                    logp = torch.log_softmax(m.model(**inputs).logits[0, -1, ids].double(), -1)
            finally:
                with torch.no_grad():
                    w.copy_(saved)
            row = table.loc[(item.id, layer, head)]
            answer = item.letters.index(item.answer)
            p_ans = float(logp[answer].exp())
            kl = float((base_logp.exp() * (base_logp - logp)).sum())
            worst = max(worst, abs(row["p_answer"] - p_ans), abs(row["kl"] - kl))
            assert row["p_answer"] == pytest.approx(p_ans, abs=1e-5)
            assert row["kl"] == pytest.approx(kl, abs=1e-5)
            assert row["prob_pred"] == item.letters[int(logp.argmax())]
        assert table.loc[(item.id, -1, -1), "p_answer"] == pytest.approx(
            float(base_logp[item.letters.index(item.answer)].exp()), abs=1e-5)
    assert worst <= 1e-5


def test_figures_redraw(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    for name in HEATMAPS:
        (run / name).unlink()
    r = cli(["heads", run], module="figures")
    ok(r)
    for name in HEATMAPS:
        assert (run / name).stat().st_size > 0, name
    assert len(r.stdout.strip().splitlines()) == len(HEATMAPS)
    assert_one_line_error(cli(["heads", tmp_path / "missing"], module="figures"))


# --------------------------------------------------------------------------------------------------------
# resume, reruns, overwrite


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_resume_after_kill_equals_uninterrupted(base_run, data_dir, tmp_path, capfd, sig):
    """Killed (kill -9) or interrupted (Ctrl-C: one line "interrupted", exit 130, no traceback) once a part is
    written, the run leaves no output and no temp file, and its rerun ends with the uninterrupted run's files.
    Meanwhile `python -m figures heads` into its --out is refused (the lock the run holds), naming the run's
    process, not drawn from a half-written dir."""
    from figures.__main__ import main as figures_main
    from probe.errors import cli_main

    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "probe.heads", *BASE_ARGS, "--data", str(data_dir), "--out", str(out)]
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out / "parts"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if parts.is_dir() and any(p.name.startswith("chunk_") for p in parts.iterdir()):
                break
            time.sleep(0.02)
        capfd.readouterr()
        drawn = cli_main(figures_main, ["heads", str(out)])
        assert proc.poll() is None, f"run ended before it could be killed:\n{proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(sig)
    finally:
        if proc.poll() is None and sig == signal.SIGINT:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        err = proc.stderr.read().decode()
        proc.stderr.close()
    refused = capfd.readouterr().err.strip()
    assert drawn == 2 and refused == (f"error: {out} is in use by another running command (pid {proc.pid} on "
                                      f"{socket.gethostname()}); draw it once that command has ended"), refused
    assert not list(out.glob("heatmap_*"))
    if sig == signal.SIGINT:  # a part being written when interrupted is taken back (kill -9's waits for the rerun)
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
        assert not [p.name for d in (out, parts) for p in d.iterdir() if p.name.endswith(".tmp")]
    else:
        assert proc.returncode == -signal.SIGKILL
    done = sorted(p for p in parts.iterdir() if p.name.startswith("chunk_"))
    assert 1 <= len(done) < N_ITEMS, f"{len(done)} parts at kill time: nothing left to resume"
    assert not (out / "heads.csv").exists()
    first = done[0]
    first_bytes, first_mtime = first.read_bytes(), first.stat().st_mtime_ns

    # the rerun in this process, as test_a_resume_is_refused_while_another_command_holds_the_out_dir reruns (what
    # was killed is a real process)
    ok(run_in_process([*BASE_ARGS, "--data", data_dir, "--out", out], capfd))
    assert first.stat().st_mtime_ns == first_mtime and first.read_bytes() == first_bytes, "finished part redone"
    assert (out / "heads.csv").read_bytes() == (base_run / "heads.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "items.parquet"), pd.read_parquet(base_run / "items.parquet"),
                                  check_exact=True)
    b1, b2 = (json.loads((d / "baseline.json").read_text()) for d in (out, base_run))
    assert b1 == b2
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"


def run_in_process(args, capfd) -> subprocess.CompletedProcess:
    """``python -m probe.heads ARGS`` in this process (cheap: torch is already imported); fd-level stderr."""
    from probe.errors import cli_main
    from probe.heads import main

    capfd.readouterr()
    rc = cli_main(main, [str(a) for a in args])
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(["probe.heads", *map(str, args)], rc, captured.out, captured.err)


def test_two_runs_started_at_once_into_one_out_never_mix(base_run, data_dir, tmp_path):
    """Two real processes started together into one new --out, of two different runs (all heads; head 0 only): one
    finishes, the other is refused with one line whichever step it reaches first (the saved run.json differs, the
    dir is in use, or run.json appeared while it loaded), and the --out holds the winner's run alone, equal to an
    uninterrupted run of it (a head-0 sweep's rows are the full sweep's head-0 rows: each head is masked alone)."""
    out = tmp_path / "twice"
    runs = {"all": [], "head0": ["--heads", "0"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "probe.heads", *BASE_ARGS, *extra, "--data", str(data_dir),
                                     "--out", str(out), "--no-figures"], cwd=REPO, env=cli_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, extra in runs.items()}
    outputs = {name: p.communicate(timeout=400) for name, p in procs.items()}
    ends = {name: subprocess.CompletedProcess(p.args, p.returncode, *outputs[name]) for name, p in procs.items()}
    winners = [name for name, r in ends.items() if r.returncode == 0]
    assert len(winners) == 1, {name: (r.returncode, r.stderr[-2000:]) for name, r in ends.items()}
    loser = ends[next(name for name in runs if name not in winners)]
    # refused at its claim, once its model loaded: the device line it printed, then the one error line
    last = loser.stderr.strip().splitlines()[-1]
    assert loser.returncode == 2 and "Traceback" not in loser.stderr and last.startswith("error:"), loser.stderr
    assert re.search(r"is in use by another running command|holds a different run|now holds a different run",
                     last), loser.stderr
    # the holder named is the winner (none when read in the instant between its lock and its writing its name)
    assert "is in use" not in last or re.search(rf"command( \(pid {procs[winners[0]].pid} on [^)]+\))?;", last), last
    want = pd.read_csv(base_run / "heads.csv")
    if winners == ["head0"]:
        want = want[want["head"] == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.read_csv(out / "heads.csv"), want, check_exact=True)
    parts = sorted((out / "parts").glob("chunk_*.parquet"))
    assert len(parts) == N_ITEMS and all(
        set(pd.read_parquet(q)["head"]) == set(want["head"]) | {-1} for q in parts), "a part of the refused run"
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["status"] == "complete"


def test_a_resume_is_refused_while_another_command_holds_the_out_dir(base_run, data_dir, tmp_path, capfd):
    """The run lock used to be taken only by a run that wrote run.json, so the same command started twice (the second
    after the first had written it) computed the same parts side by side. A resume now claims the dir too, and a
    command's claim ends with it: the resume goes through once the other command is gone."""
    from conftest import lock_held_elsewhere

    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    gone = sorted((out / "parts").glob("chunk_*.parquet"))[-1]
    gone.unlink()  # a killed run with one chunk left to do
    (out / "heads.csv").unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    args = [*BASE_ARGS, "--data", data_dir, "--out", out, "--no-figures"]
    with lock_held_elsewhere(out):
        r = run_in_process(args, capfd)
        assert_one_line_error(r)
        assert r.stderr.strip() == (f"error: --out {out} is in use by another running command; wait for it to end or "
                                    "use another --out")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    ok(run_in_process(args, capfd))
    assert gone.is_file() and (out / "heads.csv").read_bytes() == (base_run / "heads.csv").read_bytes()
    with lock_held_elsewhere(out):  # this process's claim ended with its command: another can take the dir
        pass


def test_a_resume_with_nothing_to_compute_is_refused_while_another_command_holds_the_out_dir(base_run, data_dir,
                                                                                             tmp_path, capfd):
    """A resume whose parts all exist took no lock (probe.eval's does) and rewrote items.parquet, heads.csv and a
    'complete' run.json of its run into an --out another command held: an --overwrite there of another run then had
    this run's run.json over its own parts. It is now refused like any command into a held --out."""
    from conftest import lock_held_elsewhere

    out = shutil.copytree(base_run, tmp_path / "run")
    (out / "heads.csv").unlink()  # killed while assembling
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    args = [*BASE_ARGS, "--data", data_dir, "--out", out, "--no-figures"]
    with lock_held_elsewhere(out):
        r = run_in_process(args, capfd)
        assert_one_line_error(r)
        assert "is in use by another running command" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    ok(run_in_process(args, capfd))
    assert (out / "heads.csv").read_bytes() == (base_run / "heads.csv").read_bytes()


def test_a_run_json_written_between_the_check_and_the_claim_is_refused(tmp_path):
    """Two runs into one empty --out: both pass the check of the saved run.json before either writes one; the later
    to take the lock then finds the other's run.json and must stop rather than mix its parts in. The same run
    (a resume of it) goes on; its claim is then freed."""
    import json

    from conftest import lock_held_elsewhere
    from probe.errors import BadInput
    from probe.results import claim_out_dir, claimed, release_claims

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"fingerprint": "theirs", "status": "running"}))
    keep = claimed()
    try:
        with pytest.raises(BadInput, match=rf"^--out {out} now holds a different run, started while this one was "
                                           "preparing; use another --out$"):
            claim_out_dir(out, "ours")
        claim_out_dir(out, "theirs")
    finally:
        release_claims(keep)
    assert json.loads((out / "run.json").read_text())["fingerprint"] == "theirs"  # left as the other run wrote it
    with lock_held_elsewhere(out):  # freed: another process can take the dir
        pass


@pytest.mark.parametrize("software", ["transformers", "omniprobe_code"])
def test_a_resume_under_other_library_versions_is_refused(base_run, data_dir, tmp_path, capfd, software):
    """A torch or transformers upgrade (or an edit of omniprobe's own code, whose version number stays 0.1.0)
    between a kill and the resume mixed two versions' numbers in one table (exit 0), and run.json named only the
    last. A resume that has parts to compute now needs the versions its kept parts ran; one with nothing left to
    compute goes through and keeps the versions the parts were computed under."""
    out = shutil.copytree(base_run, tmp_path / "run")
    info = json.loads((out / "run.json").read_text())
    info["versions"] = info["versions"] | {software: "0.0.1-old"}
    (out / "run.json").write_text(json.dumps(info))
    args = [*BASE_ARGS, "--data", data_dir, "--out", out, "--no-figures"]
    ok(run_in_process(args, capfd))  # nothing to compute: only the outputs are assembled again
    assert json.loads((out / "run.json").read_text())["versions"][software] == "0.0.1-old"
    sorted((out / "parts").glob("chunk_*.parquet"))[-1].unlink()
    (out / "heads.csv").unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    r = run_in_process(args, capfd)
    assert_one_line_error(r)
    assert f"computed under {software} 0.0.1-old, but this process runs {software}" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_rerun_with_other_settings_then_overwrite(base_run, data_dir, tmp_path, capfd):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    small = ["--model", "tiny-qwen2-vl", "--data", data_dir, "--limit", "2", "--layers", "3", "--heads", "0",
             "--method", "naive", "--chunk-size", "1", "--max-new-tokens", "2", "--quiet", "--out", out]
    r = cli(small)  # a real process: exit code and stderr exactly as a user sees them
    assert_one_line_error(r)
    assert "--out" in r.stderr or "differ" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before, "refused run touched files"

    ok(run_in_process([*small, "--overwrite", "--no-figures"], capfd))
    heads = pd.read_csv(out / "heads.csv")
    assert list(zip(heads["layer"], heads["head"])) == [(3, 0)] and heads["n_items"].tolist() == [2]
    assert sorted(p.name for p in (out / "parts").iterdir() if p.name.startswith("chunk_")) == [
        "chunk_00000.parquet", "chunk_00001.parquet"]
    assert len(pd.read_parquet(out / "items.parquet")) == 2 * 2
    assert not list(out.glob("heatmap_*")), "stale heatmaps of the overwritten run survived"
    old_fp = json.loads(before["run.json"])["fingerprint"]
    assert json.loads((out / "run.json").read_text())["fingerprint"] != old_fp


def test_overwrite_under_torchrun_is_refused(base_run, data_dir, tmp_path, capfd, monkeypatch):
    """Under torchrun every rank ran --overwrite's clear, the later ones deleting the parts the earlier had written;
    each rank then exited 0 waiting for the others and no output was assembled."""
    out = shutil.copytree(base_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r = run_in_process([*BASE_ARGS, "--data", data_dir, "--out", out, "--overwrite", "--no-figures"], capfd)
    assert_one_line_error(r)
    assert "--overwrite under torchrun" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_same_command_on_finished_run_is_a_noop_resume(base_run, data_dir, tmp_path, capfd, monkeypatch):
    """The rerun computes nothing, so it loads no model and makes none of a load's checks (spies refuse a call)."""
    import probe.models

    def refused(*a, **k):
        raise AssertionError("a model load or its check on a finished rerun")

    for name in ("load_model", "check_fits", "_from_pretrained"):
        monkeypatch.setattr(probe.models, name, refused)
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    items_before = (out / "items.parquet").read_bytes()
    ok(run_in_process([*BASE_ARGS, "--data", data_dir, "--out", out], capfd))
    assert (out / "items.parquet").read_bytes() == items_before


def test_a_resume_naming_the_data_set_another_way_continues_and_another_set_is_refused(base_run, data_dir, tmp_path,
                                                                                       capfd, monkeypatch):
    """The same --data folder typed relative (./NAME/, from its parent) where the run had its absolute path was
    refused as a different run ("data_dir differ"): the fingerprint held the path as typed. A copy of the set
    elsewhere, the same items, is still another folder, and refused."""
    out = shutil.copytree(base_run, tmp_path / "run")
    (out / "parts" / "chunk_00002.parquet").unlink()  # a killed run, to be resumed
    monkeypatch.chdir(Path(data_dir).parent)
    ok(run_in_process([*BASE_ARGS, "--data", f"./{Path(data_dir).name}/", "--out", out], capfd))
    assert (out / "heads.csv").read_bytes() == (base_run / "heads.csv").read_bytes()
    copy = shutil.copytree(data_dir, tmp_path / "copy" / Path(data_dir).name)
    r = run_in_process([*BASE_ARGS, "--data", copy, "--out", out], capfd)
    want = f"error: --out {out} holds a different run (data_dir differ); use another --out or --overwrite"
    assert r.returncode == 2 and r.stderr.strip() == want, r.stderr


def test_a_resume_naming_the_model_another_way_continues_and_labels_it_as_now(tmp_path, capfd, monkeypatch):
    """The model's name labels baseline.json and the heatmaps and decides no number (its weights are its directory's,
    model_fingerprint), but the fingerprint held it as typed: a killed sweep of ``organism-vl`` resumed with its
    directory typed relative with a trailing slash was refused as "a different run (data_dir, data_fingerprint,
    model_path, model_spec differ)" (the directory also defaulted to the synthetic set, the alias to its own). It now
    resumes, and its outputs are an uninterrupted run's typed the new way (the oracle: that run, byte for byte); a
    refusal names what really differs, and another directory is still another model."""
    from probe.zoo import organisms_root

    common = ["--limit", "4", "--layers", "0", "--heads", "0-1", "--chunk-size", "2", "--no-generate",
              "--no-figures", "--quiet"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    ok(run_in_process(["--model", "organism-vl", *common, "--out", killed], capfd))
    for name in ("parts/chunk_00001.parquet", "heads.csv", "items.parquet", "baseline.json"):
        (killed / name).unlink()  # killed before its second chunk
    monkeypatch.chdir(organisms_root().parent)
    typed = f"{organisms_root().name}/organism-vl/"
    ok(run_in_process(["--model", typed, *common, "--out", whole], capfd))
    ok(run_in_process(["--model", typed, *common, "--out", killed], capfd))
    for name in ("heads.csv", "items.parquet", "baseline.json"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert json.loads((killed / "baseline.json").read_text(encoding="utf-8"))["model"] == typed
    plan = json.loads((whole / "run.json").read_text(encoding="utf-8"))["plan"]
    assert Path(plan["data_dir"]).parent.parent.resolve() == organisms_root().parent.resolve()  # probe/zoo/data/image
    assert plan["n_items"] == 4 and plan["subjects"]
    r = run_in_process(["--model", "organism-vl", *common[:-1], "--heads", "0", "--quiet", "--out", killed], capfd)
    assert r.returncode == 2 and r.stderr.strip() == (f"error: --out {killed} holds a different run (heads differ); "
                                                      "use another --out or --overwrite"), r.stderr
    other = shutil.copytree(organisms_root() / "organism-vl", tmp_path / "copy" / "organism-vl")
    r = run_in_process(["--model", other, "--data", plan["data_dir"], *common, "--out", killed], capfd)
    assert r.returncode == 2 and r.stderr.strip() == (f"error: --out {killed} holds a different run (model_path "
                                                      "differ); use another --out or --overwrite"), r.stderr


def test_run_is_complete_only_once_its_figures_are_written(base_run, data_dir, tmp_path, capfd, monkeypatch):
    """run.json said "complete" before the heatmaps were drawn: a kill then left a finished-looking run with
    missing or 0-byte figures. The status is written last now."""
    import figures.heads

    out = shutil.copytree(base_run, tmp_path / "run")
    for f in out.glob("heatmap_*"):
        f.unlink()
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(info | {"status": "running"}))

    def killed(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(figures.heads, "draw_heads", killed)
    r = run_in_process([*BASE_ARGS, "--data", data_dir, "--out", out], capfd)
    assert r.returncode == 130
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    monkeypatch.undo()
    ok(run_in_process([*BASE_ARGS, "--data", data_dir, "--out", out], capfd))
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert sorted(f.name for f in out.glob("heatmap_*")) == sorted(HEATMAPS)


def test_a_run_a_check_stops_says_so_in_run_json_and_resumes(base_run, data_dir, tmp_path, capfd, monkeypatch):
    """A run an UpstreamChanged (or an engine disagreeing with its oracle) stopped left run.json "running", which reads
    as a killed run. It now says "stopped" and why; the rerun, once the cause is gone, resumes to the same outputs."""
    import probe.sweep
    from probe.upstream import UpstreamChanged

    out = shutil.copytree(base_run, tmp_path / "run")
    sorted((out / "parts").glob("chunk_*.parquet"))[-1].unlink()  # a chunk left to compute

    def changed(method):
        def engine(*args, **kwargs):
            raise UpstreamChanged("a simulated change")
        return engine

    monkeypatch.setattr(probe.sweep, "get_engine", changed)
    r = run_in_process([*BASE_ARGS, "--data", data_dir, "--out", out, "--no-figures"], capfd)
    assert r.returncode == 1 and "a simulated change" in r.stderr
    saved = json.loads((out / "run.json").read_text())
    assert saved["status"] == "stopped" and saved["error"].startswith("UpstreamChanged: ")
    assert "a simulated change" in saved["error"]
    monkeypatch.undo()
    ok(run_in_process([*BASE_ARGS, "--data", data_dir, "--out", out, "--no-figures"], capfd))
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert (out / "heads.csv").read_bytes() == (base_run / "heads.csv").read_bytes()


def test_a_model_changed_in_place_is_another_run(tiny_dirs, data_dir, tmp_path, capfd):
    """A model re-merged or retrained at the same path used to resume into its old --out: every kept part then
    belonged to the old weights (exit 0, silently wrong). The weights are part of the run's identity now."""
    model = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "model")
    args = ["--model", model, "--data", data_dir, "--limit", "2", "--layers", "0", "--heads", "0",
            "--no-generate", "--no-figures", "--quiet", "--out", tmp_path / "run"]
    ok(run_in_process(args, capfd))
    change_weights_in_place(model, "layers.0.self_attn.o_proj.weight")
    r = run_in_process(args, capfd)
    assert_one_line_error(r)
    assert "holds a different run (model_fingerprint differ)" in r.stderr
    # the model's own files count, not a folder inside it: a run whose --out sits in the model dir resumes
    inside = [*args[:-1], model / "heads"]
    ok(run_in_process(inside, capfd))
    ok(run_in_process(inside, capfd))


def test_a_resume_in_another_chat_format_is_refused(text_dir, tmp_path, capfd, monkeypatch):
    """The chat format a model is prompted in is chosen by its tokenizer (the llama row falls back to Vicuna's where
    the vocabulary lacks ChatML's tokens), not by anything the plan held: a run killed under one format resumed
    under the other (exit 0), its heads.csv averaging rows of two prompts. The format is part of the run's identity
    now, recorded in run.json; the resume is refused, nothing touched. Oracle: the two formats' rows differ."""
    import probe.prompting
    from probe.tiny import tiny_dir

    out = tmp_path / "run"
    args = ["--model", tiny_dir("llama"), "--data", text_dir, "--limit", "2", "--chunk-size", "1", "--layers", "0",
            "--heads", "0", "--no-generate", "--no-figures", "--quiet", "--out", out]
    ok(run_in_process(args, capfd))
    (out / "parts" / "chunk_00001.parquet").unlink()  # killed after its first part
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    monkeypatch.setattr(probe.prompting, "holds_tokens", lambda tokenizer, texts: False)  # no ChatML tokens: Vicuna
    r = run_in_process(args, capfd)
    assert_one_line_error(r)
    assert "holds a different run (chat_format differ)" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert json.loads((out / "run.json").read_text())["plan"]["chat_format"]["name"] == "chatml"
    vicuna = tmp_path / "vicuna"
    ok(run_in_process([*args[:-1], vicuna], capfd))
    assert json.loads((vicuna / "run.json").read_text())["plan"]["chat_format"]["name"] == "vicuna"
    chatml, other = (pd.read_parquet(d / "parts" / "chunk_00000.parquet") for d in (out, vicuna))
    assert (chatml["p_answer"] - other["p_answer"]).abs().max() > 1e-4  # another prompt: other numbers


def test_a_part_of_another_run_is_named_not_merged(base_run, tiny_dirs, data_dir, tmp_path, capfd):
    """A part copied in from another run's --out (here: the same items and heads, on other weights) passed every
    check of its rows and columns and was summarised as this run's, exit 0: its numbers are another model's. Each
    part keeps the fingerprint of its run now, and one of another run is named before anything is computed."""
    model = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "model")
    change_weights_in_place(model, "layers.0.self_attn.o_proj.weight")
    other = tmp_path / "other"
    ok(run_in_process([*BASE_ARGS, "--model", model, "--limit", "1", "--data", data_dir, "--no-figures", "--out",
                       other], capfd))
    theirs, ours = (pd.read_parquet(d / "parts" / "chunk_00000.parquet") for d in (other, base_run))
    assert (theirs["p_answer"] - ours["p_answer"]).abs().max() > 1e-4  # another model's numbers under the same keys
    out = shutil.copytree(base_run, tmp_path / "run")
    part = out / "parts" / "chunk_00000.parquet"
    shutil.copy(other / "parts" / "chunk_00000.parquet", part)
    (out / "parts" / "chunk_00005.parquet").unlink()  # a killed run, to be resumed
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    r = run_in_process([*BASE_ARGS, "--data", data_dir, "--out", out, "--no-figures"], capfd)
    assert_one_line_error(r)
    assert f"{part} is another run's part" in r.stderr and "delete it and rerun" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_sweep_without_generation_writes_strict_json_that_redraws(tiny_dirs, data_dir, tmp_path, capfd):
    """Without generation the accuracy is undefined. baseline.json used to hold Python's ``NaN``, which jq,
    JavaScript and Go reject as invalid JSON; it is null now, and the heatmaps still draw from it."""
    from figures.heads import read_sweep

    out = tmp_path / "run"
    ok(run_in_process(["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--limit", "2", "--layers", "0",
                       "--heads", "0,1", "--no-generate", "--no-figures", "--quiet", "--out", out], capfd))

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    for f in ("baseline.json", "run.json"):
        json.loads((out / f).read_text(), parse_constant=refuse)
    base = json.loads((out / "baseline.json").read_text())
    assert base["accuracy"] is None and base["n_items"] == 2 and 0 < base["prob_accuracy"] <= 1
    assert all(s["accuracy"] is None for s in base["per_subject"].values())
    heads, read = read_sweep(out)
    assert read["accuracy"] != read["accuracy"] and len(heads) == 2  # NaN again once read
    ok(cli(["heads", out], module="figures"))  # no accuracy map: nothing was generated
    assert sorted(f.name for f in out.glob("heatmap_*")) == sorted(h for h in HEATMAPS if "_accuracy." not in h
                                                                   or "prob_" in h)


def test_attribution_from_the_cli_with_several_items_a_pass(tiny_dirs, data_dir, tmp_path, capfd):
    """--method attribution through the CLI: marked approximate, and --attribution-items 3 (items right-padded into
    one forward + backward) writes the heads.csv of one item a pass; it is outside the run's identity."""
    outs = {}
    for n in (1, 3):
        outs[n] = tmp_path / f"attr{n}"
        ok(run_in_process(["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--limit", "4", "--method",
                           "attribution", "--attribution-items", str(n), "--no-generate", "--no-figures", "--quiet",
                           "--out", outs[n]], capfd))
    one, three = (pd.read_csv(outs[n] / "heads.csv") for n in (1, 3))
    pd.testing.assert_frame_equal(one, three, check_exact=False, atol=1e-5, rtol=0)
    assert (one["kl"] > 0).any()
    run = json.loads((outs[3] / "run.json").read_text())
    assert run["approximate"] is True and run["plan"]["method"] == "attribution"
    assert json.loads((outs[1] / "run.json").read_text())["fingerprint"] == run["fingerprint"]
    assert run_in_process(["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--method", "attribution",
                           "--attribution-items", "0", "--out", tmp_path / "bad"], capfd).returncode == 2
    r = run_in_process(["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--limit", "1", "--layers", "0", "--heads",
                        "0", "--attribution-items", "3", "--no-generate", "--no-figures", "--quiet", "--out",
                        tmp_path / "exact"], capfd)
    ok(r)
    assert "warning: --attribution-items 3 has no effect with --method exact" in r.stderr


def test_a_plan_with_a_nan_setting_matches_itself_once_saved(tmp_path):
    """atomic_write_json writes NaN as null: the resume check must compare the run's plan as it was saved, or a NaN
    setting would make every resume "a different run"."""
    from probe.results import atomic_write_json, plan_differences

    plan = {"model": "m", "settings": {"lr": float("nan"), "steps": 3}}
    atomic_write_json(tmp_path / "run.json", plan)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["settings"]["lr"] is None
    assert plan_differences(saved, plan) == []
    assert plan_differences(saved, {"model": "m", "settings": {"lr": 0.1, "steps": 3}}) == ["lr"]


def test_a_run_whose_plan_is_this_ones_under_another_fingerprint_is_named_as_an_older_omniprobes(tmp_path):
    """A run fingerprinted by an older rule (its paths as typed, before they were resolved) with the same plan was
    refused as one whose "settings differ", naming nothing that did; it says what it is now."""
    from probe.results import different_run

    plan = {"data_dir": "data/text", "settings": {"split": "validation"}}
    assert str(different_run(tmp_path, plan, plan)) == (
        f"--out {tmp_path} holds a run written by an older omniprobe, which fingerprinted it otherwise; use another "
        "--out or --overwrite")
    assert "(data_dir differ)" in str(different_run(tmp_path, plan, plan | {"data_dir": "other"}))


def test_a_run_from_an_older_omniprobe_is_named_as_such(tiny_dirs, data_dir, tmp_path, capfd):
    """A run.json written before its plan recorded the model's fingerprint cannot be matched to the weights: it is
    refused (never resumed on trust), and the line says why instead of calling an unrecorded key different."""
    args = ["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--limit", "2", "--layers", "0", "--heads", "0",
            "--no-generate", "--no-figures", "--quiet", "--out", tmp_path / "run"]
    ok(run_in_process(args, capfd))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    del info["plan"]["model_fingerprint"]
    info["fingerprint"] = "from-an-older-release"
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    r = run_in_process(args, capfd)
    assert_one_line_error(r)
    assert "written by an older omniprobe that did not record model_fingerprint" in r.stderr


# --------------------------------------------------------------------------------------------------------
# bad input: exit 2, one line, no output dir


def _no_mc_data(root: Path) -> Path:
    from probe.synthetic import MMMU_COLUMNS, write_mmmu_parquet

    row = {c: None for c in MMMU_COLUMNS} | {"id": "validation_Art_1", "question": "Name it.", "options": "[]",
                                             "answer": "x", "question_type": "open", "explanation": ""}
    write_mmmu_parquet({"Art": [row]}, root, "validation")
    return root


def _corrupt_model(root: Path, tiny: Path) -> Path:
    shutil.copytree(tiny, root)
    (root / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" * 50)
    return root


def _text_config_with(root: Path, tiny: Path, **values) -> Path:
    """A copy of a tiny Qwen2-VL whose config.json text_config has ``values`` (impossible head counts)."""
    shutil.copytree(tiny, root)
    cfg = json.loads((root / "config.json").read_text())
    cfg["text_config"].update(values)
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def _template(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_CASES = {
    "unknown alias": lambda t, d, m: ["--model", "qwen2-vl-typo", "--data", d],
    "missing data dir": lambda t, d, m: ["--data", t / "nope"],
    "empty data dir": lambda t, d, m: ["--data", (t / "empty").mkdir() or t / "empty"],
    "no multiple-choice items": lambda t, d, m: ["--data", _no_mc_data(t / "open")],
    "layer out of range": lambda t, d, m: ["--data", d, "--layers", "99"],
    "head out of range": lambda t, d, m: ["--data", d, "--heads", "99"],
    "bad layer spec": lambda t, d, m: ["--data", d, "--layers", "two"],
    "negative layer": lambda t, d, m: ["--data", d, "--layers", "-1"],
    "backwards layer range beside a good one": lambda t, d, m: ["--data", d, "--layers", "0,3-1"],  # was [0], exit 0
    "backwards head range": lambda t, d, m: ["--data", d, "--heads", "1--2"],
    "unknown subject": lambda t, d, m: ["--data", d, "--subjects", "Astrology"],
    "unreadable checkpoint": lambda t, d, m: ["--model", _corrupt_model(t / "corrupt", m["qwen2"]), "--data", d],
    "text-only model, image items": lambda t, d, m: ["--model", "tiny-qwen2", "--data", d],
    # a traceback (transformers' division by zero, int("four")) before these were checked
    "zero heads in config.json": lambda t, d, m: ["--model", _text_config_with(t / "h0", m["qwen2_vl"],
                                                                             num_attention_heads=0), "--data", d],
    "heads not a number": lambda t, d, m: ["--model", _text_config_with(t / "hx", m["qwen2_vl"],
                                                                      num_attention_heads="four"), "--data", d],
    "heads not in whole key/value groups": lambda t, d, m: [
        "--model", _text_config_with(t / "h3", m["qwen2_vl"], num_attention_heads=3, head_dim=16), "--data", d],
    "unknown dtype": lambda t, d, m: ["--data", d, "--dtype", "float8"],
    "flash attention on the cpu": lambda t, d, m: ["--data", d, "--device", "cpu", "--attn-implementation",
                                                   "flash_attention_2"],  # was transformers' ImportError, exit 1
    # a template that cannot render was a traceback at the first item, after run.json was written
    "template placeholder typo": lambda t, d, m: ["--data", d, "--template",
                                                  _template(t / "t.json", '{"user": "{question} {choice}"}')],
    "template field not text": lambda t, d, m: ["--data", d, "--template", _template(t / "t.json", '{"user": 3}')],
    "template not an object": lambda t, d, m: ["--data", d, "--template", _template(t / "t.json", '["x"]')],
    "template lone brace": lambda t, d, m: ["--data", d, "--template",
                                            _template(t / "t.json", '{"choice": "{letter}) {option} {"}')],
    # a template that renders without the question, the choices or the letters ran and was scored (exit 0)
    "template without the question": lambda t, d, m: ["--data", d, "--template",
                                                      _template(t / "t.json", '{"user": "Choices:\\n{choices}"}')],
    "template placeholder escaped": lambda t, d, m: ["--data", d, "--template",
                                                     _template(t / "t.json", '{"user": "{{question}} {choices}"}')],
    "template choice without its letter": lambda t, d, m: ["--data", d, "--template",
                                                           _template(t / "t.json", '{"choice": "- {option}\\n"}')],
    # the model never saw a prompt ending in a lone space: SmolLM2 then puts 0.1 % on the letters
    "template prefix ending in a space": lambda t, d, m: ["--data", d, "--template",
                                                          _template(t / "t.json", '{"assistant_prefix": "Answer: "}')],
}
# What each case's one line must say: exit 2 with some "error:" line is not enough (a case refused for another
# reason, e.g. every case failing on one broken shared argument, passed before)
BAD_CASE_ERRORS = {
    "unknown alias": "unknown model 'qwen2-vl-typo'",
    "missing data dir": "MMMU data directory not found",
    "empty data dir": "files in",
    "no multiple-choice items": "no multiple-choice items in split 'validation'",
    "layer out of range": "layer 99 out of range 0..3",
    "head out of range": "head 99 out of range",
    "bad layer spec": "bad --layers spec 'two'",
    "negative layer": "layer -1 out of range",
    "backwards layer range beside a good one": "range '3-1' ends below its start",
    "backwards head range": "range '1--2' ends below its start",
    "unknown subject": "unknown subject(s) Astrology",
    "unreadable checkpoint": "unreadable checkpoint file",
    "text-only model, image items": "reads text only",
    "zero heads in config.json": "num_attention_heads must be a positive integer, got 0",
    "heads not a number": "num_attention_heads must be a positive integer, got 'four'",
    "heads not in whole key/value groups": "is no head layout",
    "unknown dtype": "unknown --dtype 'float8'",
    "flash attention on the cpu": "flash_attention_2 needs a CUDA GPU",
    "template placeholder typo": "field 'user' does not format",
    "template field not text": "field 'user' must be a string",
    "template not an object": "want a JSON object of PromptTemplate fields",
    "template lone brace": "field 'choice' does not format",
    "template without the question": "field 'user' lacks {question}",
    "template placeholder escaped": "field 'user' lacks {question}",
    "template choice without its letter": "field 'choice' lacks {letter}",
    "template prefix ending in a space": "field 'assistant_prefix' ends in a space",
}
# Each case runs in this process (fd-level stderr captured); SUBPROCESS_CASES also as a real `python -m`.
SUBPROCESS_CASES = ("unknown alias", "unreadable checkpoint")


def _bad_args(case, tmp_path, data_dir, tiny_dirs):
    out = tmp_path / "out"
    return [*BAD_CASES[case](tmp_path, data_dir, tiny_dirs), "--limit", "2", "--method", "naive", "--quiet",
            "--out", out], out


def test_index_specs_are_sorted_unique_and_checked():
    from probe.errors import BadInput
    from probe.heads import parse_index_spec

    assert parse_index_spec("3,0-1,1, 0", 4, "layer") == [0, 1, 3]
    assert parse_index_spec(" ALL ", 3, "head") == [0, 1, 2]
    assert parse_index_spec("2-2", 4, "layer") == [2]
    for spec, needle in (("0,3-1", "ends below its start"), ("-1", "out of range"), ("0-4", "layer 4 out of range"),
                         ("", "bad --layers spec"), ("1,", "bad --layers spec"), ("0-", "bad --layers spec")):
        with pytest.raises(BadInput, match=needle):
            parse_index_spec(spec, 4, "layer")


def test_every_bad_case_names_its_error():
    assert set(BAD_CASE_ERRORS) == set(BAD_CASES)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exit_2_one_line_no_output(case, tmp_path, data_dir, tiny_dirs, capfd):
    args, out = _bad_args(case, tmp_path, data_dir, tiny_dirs)
    r = run_in_process(args, capfd)
    assert_one_line_error(r)
    assert BAD_CASE_ERRORS[case] in r.stderr, (case, r.stderr)
    assert not out.exists(), f"{case}: output dir was created"


def test_out_is_the_model_dir_is_refused(tiny_dirs, data_dir, tmp_path, capfd):
    """--out MODEL_DIR --overwrite wrote run.json, heads.csv, … among the model's files: the model's fingerprint
    changed, so the same command was then refused as another run. A folder inside the model dir stays allowed."""
    model = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "model")
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    r = run_in_process(["--model", model, "--data", data_dir, "--limit", "1", "--layers", "0", "--heads", "0",
                        "--no-generate", "--quiet", "--out", model / ".", "--overwrite"], capfd)
    assert_one_line_error(r)
    assert f"is the directory of model {model}" in r.stderr
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_subprocess(case, tmp_path, data_dir, tiny_dirs):
    args, out = _bad_args(case, tmp_path, data_dir, tiny_dirs)
    r = cli(args)
    assert_one_line_error(r)
    assert BAD_CASE_ERRORS[case] in r.stderr, (case, r.stderr)
    assert not out.exists(), f"{case}: output dir was created"


# --------------------------------------------------------------------------------------------------------
# the default, no-argument run (embedded model and data, default engine)


def test_default_no_argument_run(tmp_path):
    from probe.heads import DEFAULT_MODEL

    r = cli([], cwd=tmp_path, timeout=580)
    ok(r)
    out = tmp_path / "runs" / "heads"
    for name in ("heads.csv", "baseline.json", "items.parquet", "run.json", *HEATMAPS):
        assert (out / name).is_file(), name
    heads = pd.read_csv(out / "heads.csv")
    run = json.loads((out / "run.json").read_text())
    assert run["plan"]["method"] == "exact" and run["plan"]["model_spec"] == DEFAULT_MODEL
    assert len(heads) == run["plan"]["n_layers"] * run["plan"]["n_heads"]
    assert (heads["kl"] >= 0).all()


def test_the_summary_says_why_a_run_has_no_accuracy(tmp_path, capsys):
    """The baseline line names the reason accuracy is n/a: the attribution engine estimates no generated text;
    otherwise the run was --no-generate (attribution runs said --no-generate, which they were not given)."""
    import json

    import pandas as pd

    from probe.heads import _print_summary

    heads = pd.DataFrame({"layer": [0], "head": [1], "kl": [0.25], "prob_accuracy": [0.25],
                          "prob_accuracy_drop": [0.25]})
    for method, why in (("attribution", "attribution estimates no generated text"), ("exact", "--no-generate")):
        (tmp_path / "baseline.json").write_text(json.dumps({"accuracy": None, "prob_accuracy": 0.5, "n_items": 4,
                                                            "n_skipped_open": 0, "method": method}))
        _print_summary(tmp_path, heads)
        out = capsys.readouterr().out
        assert out.startswith(f"baseline: accuracy n/a ({why})  prob_accuracy 0.500")
        # the heads printed are first-order estimates under attribution, and read as measured until they said so
        assert out.splitlines()[1].endswith("KL 0.2500" + (" [attribution estimate]" if method == "attribution" else ""))


def test_the_summary_breaks_ties_in_the_drop_by_kl(tmp_path, capsys):
    """On a real LM with 16 items most heads share a drop (0 or ±1/16), and the three heads printed were whichever the
    unstable sort put first (SmolLM2: L0.H0, L0.H1, L0.H2 at KL 0.003 while others moved KL ten times as much)."""
    import json

    import pandas as pd

    from probe.heads import _print_summary

    (tmp_path / "baseline.json").write_text(json.dumps({"accuracy": 0.5, "prob_accuracy": 0.5, "n_items": 16,
                                                        "n_skipped_open": 0, "method": "exact"}))
    kl = [0.001, 0.002, 0.003, 0.05, 0.004, 0.08, 0.005, 0.03, 0.006, 0.007, 0.002, 0.001]
    drop = [0.0] * 12
    drop[9] = 0.0625  # the one head whose drop is largest comes first, whatever its KL
    heads = pd.DataFrame({"layer": [i // 6 for i in range(12)], "head": [i % 6 for i in range(12)], "kl": kl,
                          "prob_accuracy": [0.5 - d for d in drop], "prob_accuracy_drop": drop})
    _print_summary(tmp_path, heads)
    lines = capsys.readouterr().out.splitlines()[1:4]
    assert [ln.split(":")[0].strip() for ln in lines] == ["L1.H3", "L0.H5", "L0.H3"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_disk_full_or_read_only_mid_sweep_is_one_line_naming_the_part_and_the_rerun_resumes(
        code, base_run, data_dir, tmp_path, capfd, monkeypatch):
    """pyarrow's ENOSPC names no file, so the one line said "no space left on device" without saying where; a file
    system gone read-only mid-run (EROFS) was a traceback. Both are one line naming the part now (exit 1), no temp
    file is left, the run is not complete, and the rerun resumes to the uninterrupted run's outputs."""
    import pyarrow.parquet as pq

    real = pq.write_table  # every parquet write goes through it (pandas' to_parquet too)
    calls = []

    def stopped(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) == 3:  # as pyarrow raises it: errno set, no filename
            raise OSError(code, f"Error writing bytes to file. Detail: [errno {code}] {os.strerror(code)}")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", stopped)
    out = tmp_path / "run"
    r = run_in_process([*BASE_ARGS, "--data", data_dir, "--out", out], capfd)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    part = out / "parts" / "chunk_00002.parquet"
    assert errors == [f"error: {os.strerror(code).lower()} writing {part}; "
                      f"{'free space' if code == errno.ENOSPC else 'make it writable'} and rerun the same command "
                      "(a resumable run goes on from what it had saved)"], r.stderr[-3000:]
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["chunk_00000.parquet", "chunk_00001.parquet"]
    assert not (out / "heads.csv").exists() and json.loads((out / "run.json").read_text())["status"] == "running"
    monkeypatch.undo()
    ok(run_in_process([*BASE_ARGS, "--data", data_dir, "--out", out], capfd))
    assert (out / "heads.csv").read_bytes() == (base_run / "heads.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "items.parquet"), pd.read_parquet(base_run / "items.parquet"),
                                  check_exact=True)


def _oom_in_layers_above(monkeypatch, k: int, when: str = "any") -> list[bool]:
    """Every model probe.heads loads raises a GPU out of memory (as tests/test_eval.py's ``_gpu_oom``) in a decoder
    layer called on more than ``k`` rows: the exact engine calls the layers itself for its masked rows, the greedy
    continuation and the attribution engine's pass go through the model. ``when``: "any" call, "decode" (the
    continuation's one-token steps only) or "masked" (only the layer calls made outside a forward of the model: the
    exact engine's masked rows, not its clean pass, naive guard or continuation). Returned: per layer call after a
    failure, whether every hidden state a failed call got had been freed by then."""
    import weakref

    import probe.models
    from test_eval import _gpu_oom

    load, failed, freed, inside = probe.models.load_model, [], [], []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if failed:
            freed.append(all(ref() is None for ref in failed))
        fails = {"any": True, "decode": x.shape[1] == 1, "masked": not inside}[when]
        if fails and x.shape[0] > k:
            failed.append(weakref.ref(x))
            raise _gpu_oom()

    def loading(*a, **kw):
        loaded = load(*a, **kw)
        # hooks that return None (replacing nothing); ``inside`` is read only for "masked", where no forward of the
        # model fails and leaves it set
        loaded.model.register_forward_pre_hook(lambda *_: inside.append(1))
        loaded.model.register_forward_hook(lambda *_: inside.clear())
        for layer in loaded.layers:
            layer.register_forward_pre_hook(hook, with_kwargs=True)
        return loaded

    monkeypatch.setattr(probe.models, "load_model", loading)
    return freed


BACK_OFF = re.compile(r"out of memory in GPU 0 \(tried to allocate 2\.00 GiB\) on a batch of (\d+) "
                      r"(masked rows|items): batches of at most (\d+) for the rest of this run\n")


def _assert_same_sweep(got: Path, want: Path, atol: float) -> float:
    """heads.csv and items.parquet of two runs agree: every column but the float ones exactly, those within ``atol``;
    returns the largest difference in them."""
    worst = 0.0
    for a, b in [(pd.read_csv(got / "heads.csv"), pd.read_csv(want / "heads.csv")),
                 (pd.read_parquet(got / "items.parquet"), pd.read_parquet(want / "items.parquet"))]:
        floats = [c for c in a.columns if a[c].dtype.kind == "f"]
        assert list(a.columns) == list(b.columns) and floats
        pd.testing.assert_frame_equal(a.drop(columns=floats), b.drop(columns=floats))
        pd.testing.assert_frame_equal(a[floats], b[floats], check_exact=False, rtol=0, atol=atol)
        worst = max(worst, float((a[floats] - b[floats]).abs().max().max()))
    return worst


@pytest.mark.parametrize("asked, k, when, flags", [
    (4, 1, "any", []),  # with generation: a batch is one layer's 4 heads; the forward runs out, 4 → 2 → 1
    (4, 2, "decode", []),  # the masked forward of 4 runs, its greedy continuation runs out: 4 → 2
    (8, 2, "any", ["--no-generate"]),  # both layers' 8 heads a batch: 8 → 4 → 2
], ids=["forward", "continuation", "no-generate"])
def test_the_exact_engine_halves_a_batch_that_runs_out_of_memory_for_the_rest_of_the_run(
        asked, k, when, flags, tiny_dirs, data_dir, tmp_path, capfd, monkeypatch):
    """A batch of masked rows whose forward or greedy continuation runs out of memory is halved until it runs, and
    later items and chunks of the process run at that size: one line a halving (the first item's), none after. The
    files are those of a run at --batch-size k (the oracle; every row is its own masked run, so only fp32 rounding may
    differ: floats within 1e-6), nothing of a failed batch is held when the smaller one runs, run.json records the
    sizes, and the run resumes at another --batch-size (outside its identity), adding its own record."""
    args = ["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--limit", "3", "--layers", "0,3", "--heads", "0-3",
            "--chunk-size", "1", "--max-new-tokens", "3", "--no-figures", *flags]
    ok(run_in_process([*args, "--batch-size", k, "--quiet", "--out", tmp_path / "k"], capfd))
    freed = _oom_in_layers_above(monkeypatch, k, when)
    import probe.exact

    real, guarded = probe.exact.check_against_naive, []
    monkeypatch.setattr(probe.exact, "check_against_naive", lambda *a: guarded.append(a[4]) or real(*a))
    r = run_in_process([*args, "--batch-size", asked, "--out", tmp_path / "oom"], capfd)
    ok(r)
    assert guarded == [(3, 3)] * 3  # the naive guard still checks each call's deepest row, in whatever batch it ran
    steps = [(int(n), int(h)) for n, unit, h in BACK_OFF.findall(r.stderr) if unit == "masked rows"]
    assert steps and steps[0][0] == asked and steps[-1][1] == k, r.stderr[-3000:]
    assert all(h == (n + 1) // 2 and n <= asked for n, h in steps), steps
    assert len(steps) == len(BACK_OFF.findall(r.stderr)) == {(4, 1): 2, (4, 2): 1, (8, 2): 2}[asked, k], steps
    assert freed and all(freed), freed
    _assert_same_sweep(tmp_path / "oom", tmp_path / "k", atol=1e-6)  # measured on the CPU: 0, the same bits
    record = json.loads((tmp_path / "oom" / "run.json").read_text())["batching"]
    assert record == [{"chunks": [0, 1, 2], "batch_size": asked, "largest_batch": k, "out_of_memory_cap": k}]
    monkeypatch.undo()
    (tmp_path / "oom" / "parts" / "chunk_00002.parquet").unlink()
    ok(run_in_process([*args, "--batch-size", asked, "--quiet", "--out", tmp_path / "oom"], capfd))
    record = json.loads((tmp_path / "oom" / "run.json").read_text())["batching"]
    # the first process's entry read back from its parts, now of the chunks still its own
    assert record == [{"chunks": [0, 1], "batch_size": asked, "largest_batch": k, "out_of_memory_cap": k},
                      {"chunks": [2], "batch_size": asked, "largest_batch": asked if flags else 4,
                       "out_of_memory_cap": None}]
    _assert_same_sweep(tmp_path / "oom", tmp_path / "k", atol=1e-6)



def test_a_resume_keeps_the_batching_record_of_parts_written_without_one(tiny_dirs, data_dir, tmp_path, capfd):
    """Parts keep their process's batching record (the assembling rank reads every rank's from them); a part written
    before they did has none, and a resume keeps run.json's entry for it, cut to the chunks still on disk, before
    the entries read from the parts."""
    from probe.results import part_path, part_record

    out = tmp_path / "run"
    args = ["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--limit", "3", "--layers", "0", "--heads", "0-1",
            "--chunk-size", "1", "--no-generate", "--no-figures", "--quiet", "--out", out]
    ok(run_in_process([*args, "--batch-size", "1"], capfd))
    old = json.loads((out / "run.json").read_text())
    assert old["batching"] == [{"chunks": [0, 1, 2], "batch_size": 1, "largest_batch": 1, "out_of_memory_cap": None}]
    assert part_record(part_path(out, 0)) == {"process": part_record(part_path(out, 2))["process"]} | {
        k: v for k, v in old["batching"][0].items() if k != "chunks"}
    for c in range(3):  # as written before parts kept a record
        pd.read_parquet(part_path(out, c)).to_parquet(part_path(out, c), index=False)
        assert part_record(part_path(out, c)) is None
    part_path(out, 1).unlink()
    ok(run_in_process([*args, "--batch-size", "8"], capfd))
    assert json.loads((out / "run.json").read_text())["batching"] == [
        {"chunks": [0, 2], "batch_size": 1, "largest_batch": 1, "out_of_memory_cap": None},
        {"chunks": [1], "batch_size": 8, "largest_batch": 2, "out_of_memory_cap": None}]

@pytest.fixture(scope="module")
def exact_sweep(tiny_dirs, data_dir, tmp_path_factory) -> tuple[Path, list]:
    """An exact-engine sweep of 3 chunks (one item each; 2 layers x 2 heads, 4 masked rows a batch) run uninterrupted
    (read-only for tests): what a run killed and resumed must give."""
    from probe.errors import cli_main
    from probe.heads import main

    args = ["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--limit", "3", "--layers", "0,3", "--heads", "0-1",
            "--chunk-size", "1", "--batch-size", "4", "--no-generate", "--no-figures", "--quiet"]
    out = tmp_path_factory.mktemp("exact") / "run"
    assert cli_main(main, [*map(str, args), "--out", str(out)]) == 0
    return out, args



def test_the_exact_commands_rows_are_the_naive_commands(exact_sweep, base_run):
    """Through the command (chunks, parts, one batch cap over the chunks, assembly): the exact run's items.parquet
    rows are the naive run's on the same model, items and heads: p(answer), KL and probability accuracy to 1e-5, the
    same probability choice (the naive run generates: its option probabilities come from the first generated
    position's logits, those of the prompt's last position that the exact run without generation reads)."""
    key = ["item_id", "layer", "head"]
    exact = pd.read_parquet(exact_sweep[0] / "items.parquet")
    both = exact.merge(pd.read_parquet(base_run / "items.parquet"), on=key, suffixes=("_e", "_n"))
    assert len(both) == len(exact) == 3 * (1 + len(LAYERS) * len(HEADS))
    assert (both["prob_pred_e"] == both["prob_pred_n"]).all()
    for col in ("p_answer", "kl", "prob_correct"):
        assert (both[f"{col}_e"] - both[f"{col}_n"]).abs().max() <= 1e-5, col
    assert both["kl_n"].max() > 1e-6  # the masked rows moved

def test_a_sweep_killed_after_its_first_chunk_keeps_that_processs_batching_record(exact_sweep, tmp_path, capfd):
    """probe.heads (exact) killed by SIGKILL (the kernel's out-of-memory killer: nothing runs on the way out) once
    its first chunk's part is on disk: its run.json, written as it started, names no process, and the part alone
    keeps the killed process's record. The resume (a real process was killed; the resume runs here) names both
    processes in run.json's batching in the order of their first chunks, the killed one with chunk 0 and the record
    its part kept (the part not redone), the resumed one with chunks 1 and 2 and the uninterrupted run's record, and
    gives the uninterrupted run's heads.csv and items.parquet."""
    from probe.results import part_path, part_record

    base, args = exact_sweep
    out = tmp_path / "run"
    killed_after_first_part("probe.heads", [*args, "--out", out])
    assert [p.name for p in (out / "parts").iterdir()] == [part_path(out, 0).name]
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["batching"] == []
    killed, written = part_record(part_path(out, 0)), part_path(out, 0).read_bytes()
    ok(run_in_process([*args, "--out", out], capfd))
    assert part_path(out, 0).read_bytes() == written
    (whole,) = json.loads((base / "run.json").read_text(encoding="utf-8"))["batching"]
    assert whole == {"chunks": [0, 1, 2], "batch_size": 4, "largest_batch": 4, "out_of_memory_cap": None}
    resumed = {k: v for k, v in whole.items() if k != "chunks"}
    assert killed == {"process": killed["process"]} | resumed
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["batching"] == [
        {"chunks": [0]} | resumed, {"chunks": [1, 2]} | resumed]
    assert (out / "heads.csv").read_bytes() == (base / "heads.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "items.parquet"), pd.read_parquet(base / "items.parquet"),
                                  check_exact=True)


def test_a_sweep_that_backed_off_then_was_killed_keeps_its_back_off_record(exact_sweep, tmp_path, capfd):
    """The killed process alone runs out of memory in a layer called on more than 2 rows: its first chunk backs off
    4 → 2 and its part keeps that (out_of_memory_cap 2) when SIGKILL comes. The resume, with memory enough, computes
    chunks 1 and 2 at 4 rows a batch: run.json's batching keeps the killed process's back-off record beside the
    resumed one's own (no cap), and the numbers are those of a run at those sizes: chunk 0 of an uninterrupted run at
    --batch-size 2 in place of the uninterrupted 4's, assembled by a resume."""
    from probe.results import part_path, part_record

    base, args = exact_sweep
    oracle = tmp_path / "oracle"  # the uninterrupted run with chunk 0 computed again at the size the back-off left
    shutil.copytree(base, oracle)  # (by a resume: a part copied in from a run of other --limit is another run's)
    for path in (part_path(oracle, 0), oracle / "heads.csv", oracle / "items.parquet"):
        path.unlink()
    ok(run_in_process([*args, "--batch-size", "2", "--out", oracle], capfd))  # the last of each counts
    out = tmp_path / "run"
    killed_after_first_part("probe.heads", [*args, "--out", out], setup="import pytest\n"
                            "from test_heads_cli import _oom_in_layers_above\n"
                            "_oom_in_layers_above(pytest.MonkeyPatch(), 2)")
    killed = part_record(part_path(out, 0))
    assert killed == {"process": killed["process"], "batch_size": 4, "largest_batch": 2, "out_of_memory_cap": 2}
    ok(run_in_process([*args, "--out", out], capfd))
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["batching"] == [
        {"chunks": [0], "batch_size": 4, "largest_batch": 2, "out_of_memory_cap": 2},
        {"chunks": [1, 2], "batch_size": 4, "largest_batch": 4, "out_of_memory_cap": None}]
    assert (out / "heads.csv").read_bytes() == (oracle / "heads.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "items.parquet"), pd.read_parquet(oracle / "items.parquet"),
                                  check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(part_path(out, 0)), pd.read_parquet(part_path(oracle, 0)),
                                  check_exact=True)


@pytest.mark.parametrize("quiet", [False, True])
def test_the_exact_engine_out_of_memory_at_one_row_is_still_one_line_and_writes_nothing(
        quiet, tiny_dirs, data_dir, tmp_path, capfd, monkeypatch):
    """Every masked forward runs out of memory (k = 0): halving ends at one row, where the run stops as before, exit 1
    with the one line saying what to lower, no part and no results written; --quiet leaves out the halving lines."""
    _oom_in_layers_above(monkeypatch, 0, "masked")
    out = tmp_path / "run"
    r = run_in_process(["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--limit", "2", "--layers", "0",
                        "--heads", "0-3", "--no-generate", "--batch-size", "4", "--chunk-size", "1", "--no-figures",
                        *(["--quiet"] if quiet else []), "--out", out], capfd)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("error", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("error: out of memory in GPU 0 (tried to allocate 2.00 GiB); lower "
                                                   "the batch size"), r.stderr[-3000:]
    assert [(int(n), int(h)) for n, _, h in BACK_OFF.findall(r.stderr)] == ([] if quiet else [(4, 2), (2, 1)])
    assert not list((out / "parts").glob("*")) and not (out / "items.parquet").exists()
    assert not (out / "heads.csv").exists()


def test_the_attribution_engine_halves_a_pass_that_runs_out_of_memory(tiny_dirs, data_dir, tmp_path, capfd,
                                                                     monkeypatch):
    """--attribution-items 4 whose pass runs out of memory above one item: 4 → 2 → 1 items a pass, and the files are
    those of --attribution-items 1 (the oracle: the same one-item passes, so the same bits)."""
    args = ["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--limit", "4", "--method", "attribution",
            "--no-generate", "--no-figures"]
    ok(run_in_process([*args, "--quiet", "--out", tmp_path / "one"], capfd))
    freed = _oom_in_layers_above(monkeypatch, 1)
    r = run_in_process([*args, "--attribution-items", "4", "--out", tmp_path / "oom"], capfd)
    ok(r)
    assert [(int(n), u, int(h)) for n, u, h in BACK_OFF.findall(r.stderr)] == [(4, "items", 2), (2, "items", 1)]
    assert freed and all(freed), freed
    assert _assert_same_sweep(tmp_path / "oom", tmp_path / "one", atol=0) == 0
    record = json.loads((tmp_path / "oom" / "run.json").read_text())["batching"]
    assert record == [{"chunks": [0], "batch_size": 4, "largest_batch": 1, "out_of_memory_cap": 1}]


def test_an_attribution_sweep_from_python_runs_under_a_callers_inference_mode(tiny_dirs, data_dir, tmp_path):
    """A notebook that wraps its probing in ``torch.inference_mode()`` (as inference code does) got a RuntimeError
    traceback from inside autograd ("element 0 of tensors does not require grad") from ``sweep(method=
    "attribution")``: the engine's ``enable_grad`` cannot lift inference mode, and the model loaded under it holds
    inference tensors. The oracle: the same sweep outside inference mode; the caller's mode is on again after."""
    from probe.heads import sweep

    def attribution(out):
        return sweep(model=str(tiny_dirs["qwen2_vl"]), data=data_dir, limit=2, layers="0", method="attribution",
                     no_generate=True, no_figures=True, quiet=True, out=out)

    plain = attribution(tmp_path / "plain")
    with torch.inference_mode():
        inside = attribution(tmp_path / "inside")
        assert torch.is_inference_mode_enabled()
    pd.testing.assert_frame_equal(inside.heads, plain.heads)


def test_batch_size_one_and_a_larger_batch_give_the_same_sweep(tiny_dirs, data_dir, tmp_path, capfd):
    """--batch-size moves only the last bits (README, Resuming: compare to 1e-6): the same predictions, parsed
    answers and texts, every number within 1e-6, whether each head runs alone or the layer's heads and items share
    a batch. Oracle: the one-at-a-time run."""
    args = ["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--limit", "3", "--layers", "0", "--heads", "0-2",
            "--max-new-tokens", "2", "--no-figures", "--quiet"]
    for size in ("1", "8"):
        ok(run_in_process([*args, "--batch-size", size, "--out", tmp_path / size], capfd))
    batching = json.loads((tmp_path / "8" / "run.json").read_text(encoding="utf-8"))["batching"]
    assert batching[0]["largest_batch"] > 1  # the larger size did batch rows together
    _assert_same_sweep(tmp_path / "8", tmp_path / "1", atol=1e-6)  # raises where a column differs


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_the_same_sweep_twice_into_two_folders_writes_the_same_result_bytes(tiny_dirs, data_dir, tmp_path, capfd,
                                                                          method):
    """Every engine (naive: test_resume_after_kill_equals_uninterrupted) run twice gives byte-identical heads.csv,
    items.parquet and baseline.json; run.json differs only in the fields the README names as times, the --out
    given and the parts' stats. Oracle: the first run."""
    args = ["--model", tiny_dirs["qwen2_vl"], "--data", data_dir, "--limit", "2", "--layers", "1", "--heads", "0-1",
            "--method", method, "--max-new-tokens", "2", "--no-figures", "--quiet"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        ok(run_in_process([*args, "--out", out], capfd))
    for name in ("heads.csv", "items.parquet", "baseline.json"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    a, b = (json.loads((out / "run.json").read_text(encoding="utf-8")) for out in runs)
    assert a.keys() == b.keys() and a["fingerprint"] == b["fingerprint"]
    assert {k for k in a if a[k] != b[k]} <= {"started", "finished", "elapsed_s_this_process", "argv", "parts"}
