"""Scale-out: ranks (RANK / WORLD_SIZE as torchrun sets them) take disjoint chunks; the last one assembles."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, lock_held_elsewhere, torchrun


def _run(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-m", "probe.heads", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_ranks_equal_one_process(tmp_path, tiny_dirs, data_dir, monkeypatch):
    """The ranks in this process, RANK / WORLD_SIZE set as torchrun sets them (three subprocesses before, each
    re-importing torch; the ranks' real processes are test_ranks_hold_the_dir_against_a_single_process's). run.json's
    batching names both ranks' chunks (it held only the assembling rank's), each rank's entry read from its parts."""
    from probe.errors import cli_main
    from probe.heads import main

    common = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(data_dir), "--limit", "5",
              "--chunk-size", "2", "--layers", "1,3", "--heads", "0-3", "--no-figures", "--quiet",
              "--no-generate"]
    single = tmp_path / "single"
    assert cli_main(main, common + ["--out", str(single)]) == 0
    sharded = tmp_path / "sharded"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli_main(main, common + ["--out", str(sharded)]) == 0
    assert not (sharded / "heads.csv").exists()  # rank 1's chunks are still missing
    parts = sorted(p.name for p in (sharded / "parts").iterdir())
    assert parts == ["chunk_00000.parquet", "chunk_00002.parquet"]
    monkeypatch.setenv("RANK", "1")
    assert cli_main(main, common + ["--out", str(sharded)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(single / "heads.csv"), pd.read_csv(sharded / "heads.csv"))
    pd.testing.assert_frame_equal(pd.read_parquet(single / "items.parquet"),
                                  pd.read_parquet(sharded / "items.parquet"))
    record = {"batch_size": 8, "largest_batch": 8, "out_of_memory_cap": None}  # 2 layers × 4 heads a batch
    assert json.loads((single / "run.json").read_text())["batching"] == [{"chunks": [0, 1, 2]} | record]
    assert json.loads((sharded / "run.json").read_text())["batching"] == [{"chunks": [0, 2]} | record,
                                                                           {"chunks": [1]} | record]


def test_overwrite_leaves_a_running_commands_dir_alone(tmp_path, tiny_dirs, data_dir, capsys):
    """--overwrite into an --out another command is writing used to delete its run.json and parts first and be
    refused ('in use') only after: the running command then ended 'waiting for N chunks' with nothing assembled.
    The refused command runs in this process (cli_main), the holder is another process."""
    from probe.errors import cli_main
    from probe.heads import main

    out = tmp_path / "busy"
    (out / "parts").mkdir(parents=True)
    (out / "run.json").write_text('{"fingerprint": "another run"}')
    (out / "parts" / "chunk_00000.parquet").write_bytes(b"its part")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    with lock_held_elsewhere(out):
        capsys.readouterr()
        code = cli_main(main, ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(data_dir), "--limit", "2",
                               "--layers", "0", "--heads", "0", "--no-figures", "--quiet", "--no-generate",
                               "--overwrite", "--out", str(out)])
        err = capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert code == 2 and err.startswith("error:") and "in use" in err, err


def test_ranks_hold_the_dir_against_a_single_process(tmp_path, tiny_dirs, data_dir, monkeypatch):
    """Ranks of a torchrun job took no lock: a single process started into their --out meanwhile computed their
    chunks beside them (or, with --overwrite, deleted them). Ranks now share the lock, which shuts out one process.
    Rank 0 runs here in this process; the others start while it computes its chunk (a run's claim ends when it
    returns, probe.errors.releases_claims)."""
    from probe import exact, heads

    common = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(data_dir), "--limit", "3", "--chunk-size", "2",
              "--layers", "1", "--heads", "0-1", "--no-figures", "--quiet", "--no-generate", "--out", str(tmp_path)]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    checked = []
    sweep = exact.exact_sweep

    def rank0_computing(*args, **kwargs):  # rank 0, mid-run: its claim is held
        for extra in ([], ["--overwrite"]):
            r = _run(common + extra, {"RANK": "0", "WORLD_SIZE": "1"})
            assert r.returncode == 2 and "in use" in r.stderr, r.stderr
        assert not list((tmp_path / "parts").glob("*.parquet"))  # the refused runs computed nothing
        r1 = _run(common, {"RANK": "1", "WORLD_SIZE": "2"})  # a rank of the same job shares the lock
        assert r1.returncode == 0, r1.stderr
        checked.append(True)
        return sweep(*args, **kwargs)

    monkeypatch.setattr(exact, "exact_sweep", rank0_computing)
    heads.main(common)  # rank 0 finishes last: it assembles
    assert checked == [True]
    assert pd.read_parquet(tmp_path / "items.parquet")["item_id"].nunique() == 3


def test_eval_ranks_split_the_pairs(tmp_path, tiny_dirs, data_dir, monkeypatch):
    """probe.eval read no RANK: under torchrun each of K ranks evaluated every model on every data set, K times the
    work, and all K wrote the results. Ranks now take every K-th (model, data set) pair; the last one assembles, and
    its run.json's batching names every pair, the other rank's read from its part (it held only its own)."""
    from probe.errors import cli_main
    from probe.eval import main, part_file

    args = ["--models", "tiny-qwen2-vl", "--data", str(data_dir), str(REPO / "probe/zoo/data/text"), "--limit", "2",
            "--no-generate", "--no-figures", "--quiet", "--out"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert cli_main(main, args + [str(single)]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert cli_main(main, args + [str(sharded)]) == 0
        if rank == 0:
            assert [p.name for p in (sharded / "parts").iterdir()] == [part_file(sharded, 0, 0).name]
            assert not (sharded / "scores.csv").exists()
    for name in ("scores.csv", "table.md"):
        assert (single / name).read_text() == (sharded / name).read_text(), name
    pd.testing.assert_frame_equal(pd.read_parquet(single / "items.parquet"), pd.read_parquet(sharded / "items.parquet"))
    batching = json.loads((sharded / "run.json").read_text())["batching"]
    record = {"batch_size": 32, "largest_batch": 2, "out_of_memory_cap": None, "out_of_memory_window": None}
    assert batching == {f"tiny-qwen2-vl|{data_dir.name}": record, "tiny-qwen2-vl|text": record}
    assert batching == json.loads((single / "run.json").read_text())["batching"]


def test_a_rank_outside_the_world_is_bad_input(tmp_path, tiny_dirs, data_dir, monkeypatch, capfd):
    """RANK >= WORLD_SIZE took no chunk (c % K never equals it) and exited 0 'waiting' with nothing done."""
    from probe.errors import cli_main
    from probe.heads import main

    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    assert cli_main(main, ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(data_dir), "--limit", "2",
                           "--layers", "0", "--heads", "0", "--no-figures", "--quiet", "--out", str(out)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: RANK 2 with WORLD_SIZE 2"), err
    assert not out.exists()


def test_a_rank_that_finds_another_writing_the_first_run_json_joins_it(tmp_path, tiny_dirs, data_dir, monkeypatch,
                                                                       capfd):
    """A rank that checked --out while another rank was writing the first run.json (its temp file beside it, no
    run.json yet: a rank started a model load later, a node later) took the dir for a foreign one and exited 2, and
    torchrun stopped the whole job. It now computes its chunks and leaves the writer's temp file alone."""
    from probe.errors import cli_main
    from probe.heads import main

    out = tmp_path / "out"
    out.mkdir()
    writer = subprocess.Popen(["sleep", "60"])  # the other rank, alive while its temp file is being written
    try:
        temp = out / f".run.json.{writer.pid}.k2x9_q.tmp"
        temp.write_text('{"fingerpr')
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        rc = cli_main(main, ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(data_dir), "--limit", "3",
                             "--chunk-size", "1", "--layers", "0", "--heads", "0", "--no-figures", "--quiet",
                             "--no-generate", "--out", str(out)])
        assert rc == 0, capfd.readouterr().err
        assert sorted(p.name for p in (out / "parts").iterdir()) == ["chunk_00001.parquet"]  # rank 1's chunk only
        assert temp.read_text() == '{"fingerpr'
    finally:
        writer.kill()
        writer.wait()


def test_overwrite_under_torchrun_is_refused_into_an_empty_out_too(tmp_path, tiny_dirs, data_dir, monkeypatch, capfd):
    """--overwrite under torchrun was refused only where --out held something: into a new --out the ranks that looked
    before any run.json existed ran, and one that looked after (a slower start) was refused, so the job failed or
    not by timing. It is now refused by every rank alike, before anything is written."""
    from probe.errors import cli_main
    from probe.heads import main

    out = tmp_path / "new"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = cli_main(main, ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(data_dir), "--limit", "2", "--layers",
                         "0", "--heads", "0", "--no-figures", "--quiet", "--no-generate", "--overwrite",
                         "--out", str(out)])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --overwrite under torchrun"), err
    assert not out.exists()


def _keyword_function(command: str, tiny_dirs, data_dir) -> tuple:
    """The keyword function of ``command`` (the module, for its ``run``), its options for a run into OUT of two
    ranks' worth of parts, the result class, its output file read with pandas (to compare the result with), and the
    part rank 1 writes."""
    from figures.results import EvalRun, HeadSweep
    from probe import eval as ev, heads
    from probe.results import part_path

    if command == "heads":
        return (heads.sweep, lambda out: dict(
            model=str(tiny_dirs["qwen2_vl"]), data=str(data_dir), limit=3, chunk_size=1, layers="1", heads="0-1",
            no_figures=True, quiet=True, no_generate=True, out=out), HeadSweep, "heads.csv",
            lambda r, out: {"heads": (r.heads, pd.read_csv(out / "heads.csv"))}, lambda out: part_path(out, 1))
    return (ev.evaluate, lambda out: dict(
        models=["tiny-qwen2-vl"], data=[str(data_dir), str(REPO / "probe/zoo/data/text")], limit=2, no_generate=True,
        no_figures=True, quiet=True, out=out), EvalRun, "scores.csv",
        lambda r, out: {"scores": (r.scores, pd.read_csv(out / "scores.csv")),
                        "items": (r.items, pd.read_parquet(out / "items.parquet"))}, lambda out: ev.part_file(out, 0, 1))


@pytest.mark.parametrize("command", ["heads", "eval"])
def test_keyword_function_under_torchrun_returns_the_assembly_on_rank_0_and_none_elsewhere(
        command, tmp_path, tiny_dirs, data_dir, monkeypatch):
    """``probe.heads.sweep`` and ``probe.eval.evaluate`` under RANK / WORLD_SIZE read the output back as soon as their
    own parts were written: rank 0, done before the others, read no heads.csv / scores.csv (BadInput, which stops a
    torchrun job) or an earlier assembly's. Now every rank but 0 returns None, and rank 0 waits for the last rank's
    assembly and returns it (``probe.results.read_on_rank_0``). The other rank runs here in this process while rank
    0 waits (``probe.results._pause``, its pause between two looks at --out)."""
    from probe import results
    from probe.errors import RunStopped
    from probe.results import atomic_write_json

    call, options, kind, output, frames, rank_1_part = _keyword_function(command, tiny_dirs, data_dir)

    def as_rank(rank: int) -> None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")

    def assert_assembled(got, out) -> None:  # the files on disk, read with pandas, and the one-process result
        assert isinstance(got, kind)
        for name, (mine, on_disk) in frames(got, out).items():
            pd.testing.assert_frame_equal(mine, on_disk, check_dtype=False, obj=name)
            pd.testing.assert_frame_equal(mine, frames(single, tmp_path / "single")[name][0], obj=name)

    single = call(**options(tmp_path / "single"))  # no RANK: one process

    # rank 1 first: None, its part written; rank 0 finishes last, assembles and returns the result
    as_rank(1)
    assert call(**options(tmp_path / "a")) is None and not (tmp_path / "a" / output).exists()
    as_rank(0)
    assert_assembled(call(**options(tmp_path / "a")), tmp_path / "a")

    # rank 0 first: it waits, rank 1 finishes and assembles, rank 0 returns that assembly
    waited = []

    def rank_1_runs(seconds: float) -> None:
        waited.append((out / output).exists())  # whether an assembly was on disk when rank 0 waited
        if len(waited) == 1:
            as_rank(1)
            assert call(**options(out)) is None
            as_rank(0)

    monkeypatch.setattr(results, "_pause", rank_1_runs)
    out = tmp_path / "b"
    got = call(**options(out))
    assert waited == [False]
    assert_assembled(got, out)

    # a finished run resumed with rank 1's part gone: rank 0 waits for its new assembly, not the output on disk
    rank_1_part(out).unlink()
    waited.clear()
    got = call(**options(out))
    assert waited == [True] and rank_1_part(out).is_file()
    assert_assembled(got, out)

    # a run another rank stopped (its run.json says so): rank 0 stops too, rather than wait for ever
    def rank_1_stops(seconds: float) -> None:
        info = json.loads((tmp_path / "c" / "run.json").read_text())
        atomic_write_json(tmp_path / "c" / "run.json", info | {"status": "stopped", "error": "EngineDisagrees: x"})

    monkeypatch.setattr(results, "_pause", rank_1_stops)
    with pytest.raises(RunStopped, match="another rank stopped the run: EngineDisagrees: x"):
        call(**options(tmp_path / "c"))


# torchrun runs this: sweep(), evaluate() and finetune() from Python on each rank, printing what each returned
FROM_PYTHON_UNDER_TORCHRUN = """
import os, sys
from pathlib import Path
import pandas as pd
from analyses.finetune import finetune
from probe.eval import evaluate
from probe.heads import sweep

out = Path(sys.argv[1])
s = sweep(model="organism-vl", limit=6, chunk_size=1, layers="0", heads="0-1", no_generate=True, no_figures=True,
          quiet=True, out=out / "heads")
e = evaluate(models=["organism-base", "organism-vl"], data=["probe/zoo/data/text"], limit=4, no_generate=True,
             no_figures=True, quiet=True, out=out / "eval")
f = finetune(model="organism-base", data=["text=probe/zoo/data/text"], split="validation", limit=8, steps=2,
             batch_size=4, device="cpu", dtype="float32", quiet=True, out=out / "ft")
same = s is not None and s.heads.equals(pd.read_csv(out / "heads" / "heads.csv")) and len(s.heads) == 2
scores, items = pd.read_csv(out / "eval" / "scores.csv"), pd.read_parquet(out / "eval" / "items.parquet")
same_e = (e is not None and len(e.items) == 8 and set(e.scores["model"]) == {"organism-base", "organism-vl"}
          and e.scores.astype(scores.dtypes).equals(scores) and e.items.equals(items))
print(f"rank {os.environ['RANK']}: {type(s).__name__} {same} {type(e).__name__} {same_e} "
      f"{type(f).__name__} {f and sorted(f.checkpoints)}")
"""


def test_sweep_evaluate_and_finetune_from_python_under_torchrun(tmp_path):
    """A real torchrun launch (2 CPU processes; finetune's data parallel on gloo): rank 0's ``sweep`` returns the
    assembled HeadSweep, its ``evaluate`` the assembled EvalRun (each equal to the files on disk, read with pandas)
    and its ``finetune`` the FinetuneRun, rank 1's all None. Before, the rank that finished its part of the sweep or
    the evaluation first read no heads.csv / scores.csv (BadInput), which stopped the job."""
    script = tmp_path / "from_python.py"
    script.write_text(FROM_PYTHON_UNDER_TORCHRUN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))
    r = torchrun([script, tmp_path / "out"], env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    said = sorted(line for line in r.stdout.splitlines() if line.startswith("rank "))
    assert said == ["rank 0: HeadSweep True EvalRun True FinetuneRun [0, 2]",
                    "rank 1: NoneType False NoneType False NoneType None"], r.stdout


class _Exchanged(Exception):
    """Stops a run at its exchange of run fingerprints (what a rank with other options would send)."""


def _exchanged_record(monkeypatch, main, argv: list[str]) -> object:
    """What a rank running ``main(argv)`` sends the other ranks (the run stops there, nothing written)."""
    from probe import results

    def stop(obj):
        raise _Exchanged(obj)

    monkeypatch.setattr(results, "gather_over_ranks", stop)
    with pytest.raises(_Exchanged) as got:
        main(argv)
    return got.value.args[0]


def _ranks_send(monkeypatch, by_rank: dict[int, object]) -> list:
    """Stands in for the launch's exchange: this rank's record where ``by_rank`` has None, the others as given."""
    from probe import results

    calls = []

    def gather(obj):
        calls.append(obj)
        return [obj if by_rank[r] is None else by_rank[r] for r in sorted(by_rank)]

    monkeypatch.setattr(results, "gather_over_ranks", gather)
    return calls


def test_heads_ranks_with_other_options_all_stop_before_writing(tmp_path, tiny_dirs, data_dir, monkeypatch, capfd):
    """Ranks of one launch given another --limit each computed their chunks of another run, and both could write
    run.json. Every rank now sends its run fingerprint first and all stop, naming the option. The same model spelled
    another way (relative path, or its alias: it sent its name as typed) is the same run, as on resume."""
    from probe.errors import cli_main
    from probe.heads import main

    model = str(tiny_dirs["qwen2_vl"])
    common = ["--data", str(data_dir), "--chunk-size", "2", "--layers", "1", "--heads", "0-1", "--no-figures",
              "--quiet", "--no-generate"]
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    other = _exchanged_record(monkeypatch, main, ["--model", model, *common, "--limit", "4", "--out", str(out)])
    monkeypatch.setenv("RANK", "0")
    calls = _ranks_send(monkeypatch, {0: None, 1: other})
    capfd.readouterr()
    assert cli_main(main, ["--model", model, *common, "--limit", "5", "--out", str(out)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["error: rank 1's limit 4 differs from rank 0's 5: every rank must run the same command"], err
    assert len(calls) == 1 and not out.exists()

    spelt = _exchanged_record(monkeypatch, main, ["--model", os.path.relpath(model), *common, "--limit", "4",
                                                  "--out", str(out)])
    assert _exchanged_record(monkeypatch, main, ["--model", "tiny-qwen2-vl", *common, "--limit", "4", "--out",
                                                 str(out)]) == spelt
    _ranks_send(monkeypatch, {0: None, 1: spelt})
    assert cli_main(main, ["--model", model, *common, "--limit", "4", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["chunk_00000.parquet"]  # rank 0's share


def test_eval_ranks_with_other_options_all_stop_before_writing(tmp_path, tiny_dirs, data_dir, monkeypatch, capfd):
    """probe.eval as rank 1, whose --no-generate rank 0 was not given: it stops too, naming the setting."""
    from probe.errors import cli_main
    from probe.eval import main

    common = ["--models", str(tiny_dirs["qwen2_vl"]), "--data", str(data_dir), "--limit", "2", "--no-figures",
              "--quiet"]
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rank_0 = _exchanged_record(monkeypatch, main, [*common, "--out", str(out)])
    monkeypatch.setenv("RANK", "1")
    _ranks_send(monkeypatch, {0: rank_0, 1: None})
    capfd.readouterr()
    assert cli_main(main, [*common, "--no-generate", "--out", str(out)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["error: rank 1's generate false differs from rank 0's true: every rank must run the same "
                   "command"], err
    assert not out.exists()


def test_finetune_ranks_with_another_lr_all_stop_before_writing(tmp_path, tiny_dirs, data_dir, text_dir,
                                                                monkeypatch, capfd):
    """Data parallel ranks given another --lr trained one model with two schedules, averaged, and rank 0's run.json
    named its own: every rank now stops before --out is read, naming the option."""
    import probe.train
    from analyses.finetune import main
    from probe.errors import cli_main

    from test_finetune import _args

    monkeypatch.setattr(probe.train, "process_state", lambda cpu: None)  # the launch's group: the exchange's fake
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # as torchrun sets them: ranks without are refused first
    monkeypatch.setenv("MASTER_PORT", "29512")
    out = tmp_path / "ft"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = _args(tiny_dirs, data_dir, text_dir, out)
    other = _exchanged_record(monkeypatch, main, [a if a != "1e-3" else "1e-4" for a in args[:-2]] + args[-2:])
    monkeypatch.setenv("RANK", "0")
    _ranks_send(monkeypatch, {0: None, 1: other})
    capfd.readouterr()
    assert cli_main(main, args) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["error: rank 1's lr 0.0001 differs from rank 0's 0.001: every rank must run the same command"], err
    assert not out.exists()
    # the model by its alias is the same run (it sent the name as typed: "rank 1's model ... differs")
    monkeypatch.setenv("RANK", "1")
    alias = _exchanged_record(monkeypatch, main, _args({"qwen2_vl": "tiny-qwen2-vl"}, data_dir, text_dir, out))
    assert alias == _exchanged_record(monkeypatch, main, args)


def test_the_first_differing_key_is_named_from_the_records_alone():
    """The refusal's key and values, on hand-built records: nested lists by path, settings by name and first."""
    from probe.results import first_difference

    a = {"models": [{"name": "m", "path": "/a"}], "n_items": 5, "settings": {"limit": 5, "seed": 0}}
    assert first_difference(a, a) is None
    assert first_difference(a, a | {"n_items": 4, "settings": {"limit": 4, "seed": 0}}) == ("limit", 5, 4)
    assert first_difference(a, a | {"models": [{"name": "m", "path": "/b"}]}) == ("models[0].path", "/a", "/b")
    assert first_difference({"lr": 1e-3}, {"lr": 1e-3, "lm_lr": 0.0}) == ("lm_lr", None, 0.0)


# torchrun runs this: probe.heads (the launch's store) and analyses.finetune (its gloo group) with rank-dependent options
RANKS_DIFFER_UNDER_TORCHRUN = """
import os, sys
from pathlib import Path
from analyses.finetune import finetune
from probe.errors import BadInput
from probe.heads import sweep

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
calls = {
    "heads": lambda: sweep(model="organism-vl", limit=4 + rank, chunk_size=1, layers="0", heads="0-1",
                           no_generate=True, no_figures=True, quiet=True, out=out / "heads"),
    "finetune": lambda: finetune(model="organism-base", data=["text=probe/zoo/data/text"], split="validation",
                                 limit=8, steps=2, batch_size=4, lr=1e-3 / 10 ** rank, device="cpu", dtype="float32",
                                 quiet=True, out=out / "ft"),
}
said = []
for name, call in calls.items():
    try:
        call()
        said.append(f"rank {rank} {name}: ran")
    except BadInput as exc:
        said.append(f"rank {rank} {name}: {exc}")
said.append(f"rank {rank} wrote: {sorted(p.name for p in out.iterdir()) if out.exists() else []}")
# a file per rank: two ranks' prints into one pipe interleave mid-line
Path(sys.argv[2], f"said-{rank}.txt").write_text("\\n".join(said) + "\\n", encoding="utf-8")
"""


def test_ranks_launched_with_other_options_all_stop_under_torchrun(tmp_path):
    """A real torchrun launch (2 CPU processes) whose ranks are given another --limit (probe.heads, exchanged through
    torchrun's store) and another --lr (analyses.finetune, over its gloo group): before, each rank ran its share of
    its own run and both wrote run.json; now each rank, having seen the other's fingerprint, stops with the same line
    naming the option, and nothing is written."""
    script = tmp_path / "ranks_differ.py"
    script.write_text(RANKS_DIFFER_UNDER_TORCHRUN, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))
    r = torchrun([script, tmp_path / "out", tmp_path], env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    said = sorted(line for rank in (0, 1)
                  for line in (tmp_path / f"said-{rank}.txt").read_text(encoding="utf-8").splitlines())
    heads = "rank 1's limit 5 differs from rank 0's 4: every rank must run the same command"
    ft = "rank 1's lr 0.0001 differs from rank 0's 0.001: every rank must run the same command"
    assert said == [f"rank 0 finetune: {ft}", f"rank 0 heads: {heads}", "rank 0 wrote: []",
                    f"rank 1 finetune: {ft}", f"rank 1 heads: {heads}", "rank 1 wrote: []"], r.stdout


def test_every_torchrun_launch_of_the_tests_takes_a_free_port():
    """The tests' torchrun launches took the fixed port 29500 (torch before its single-node default changed), so two
    suites or two xdist workers launching at once failed with "address already in use". Every launch now goes
    through conftest.torchrun (--standalone: the launcher binds port 0). Oracle: the test sources' syntax trees,
    where no other function names the launcher module or a port as an argument."""
    import ast

    named = {"torch.distributed.run", "--master-port", "--master_port", "--rdzv-endpoint", "--rdzv_endpoint"}
    found = []
    for path in sorted((REPO / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            consts = {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            if consts & named and (path.name, fn.name) not in {("conftest.py", "torchrun"), (
                    "test_sharding.py", "test_every_torchrun_launch_of_the_tests_takes_a_free_port")}:
                found.append(f"{path.name}:{fn.lineno} {fn.name}")
    assert found == [], found
    import conftest

    assert {"torch.distributed.run", "--standalone"} <= set(conftest.torchrun.__code__.co_consts)
