"""Long runs must not accumulate handles: descriptors per mapped checkpoint shard, --out locks per run, hooks left on
a model after an error. Each count here is exact (no timing, no memory threshold)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")


def descriptors_on(paths: set[Path]) -> int:
    """How many of this process's open file descriptors point at one of ``paths``."""
    want = {str(p.resolve()) for p in paths}
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") in want
        except OSError:  # the descriptor listdir itself used, closed since
            pass
    return n


def test_a_mapped_shard_holds_one_descriptor():
    """analyses.trajectory (and merge, shift) keep every shard of every checkpoint mapped until the end; each mapped
    shard held two descriptors, its own beside the one mmap keeps, so 53 one-shard checkpoints took 112 and a
    trajectory over 72B checkpoints (37 shards each) passed the usual `ulimit -n` of 1024 at its 14th checkpoint."""
    from analyses.checkpoints import open_checkpoint

    with open_checkpoint("organism-vl") as ck:
        files = {info.file for info in ck.infos.values()}
        for info in ck.infos.values():
            float(ck.view(info).float().sum())
            ck.release(info)
        assert descriptors_on(files) == len(files)  # one each: mmap's own
    assert descriptors_on(files) == 0


def checkpoint_run(root: Path, n: int) -> Path:
    """A fine-tuning run dir of ``n`` checkpoints (organism-vl's files, hard-linked: distinct dirs, no copies)."""
    from probe.zoo import organism_dir

    src = organism_dir("organism-vl")
    run = root / "run"
    for k in range(n):
        d = run / f"checkpoint-{k}"
        d.mkdir(parents=True)
        for f in src.iterdir():
            os.link(f, d / f.name)
    return run


def test_a_trajectory_over_more_files_than_the_soft_limit_raises_it(tmp_path):
    """Under a soft limit of open files below what its mapped checkpoints need (and a hard limit above), a
    trajectory ran until the stream reached the last checkpoints, then died with OSError "Too many open files"."""
    import resource

    import sklearn.manifold  # noqa: F401  (imported now: importing opens files, transiently)

    from analyses.trajectory import TrajectoryConfig, run_trajectory

    run = checkpoint_run(tmp_path, 12)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir("/proc/self/fd")) + 8  # room for the run's own files, not for 12 mapped checkpoints
    if hard != resource.RLIM_INFINITY and hard < low + 12 + 64:
        pytest.skip(f"hard limit of open files {hard} too low to raise the soft one")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        out = run_trajectory(TrajectoryConfig(tmp_path / "traj", "organism-vl", runs=[str(run)], figures=False))
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert out["n_points"] == 13 and (tmp_path / "traj" / "coords.csv").is_file()
    assert raised > low


def test_a_hard_limit_too_low_is_bad_input_before_anything_is_read(tmp_path):
    """Where even the hard limit cannot hold every mapped file, the trajectory is refused in one line at the start
    (exit 2, nothing written), not hours later with a traceback."""
    import resource
    import subprocess

    from conftest import REPO

    run = checkpoint_run(tmp_path, 40)
    limit = 60  # enough to start Python and torch; not for 41 mapped checkpoints and the margin beside them

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    out = tmp_path / "traj"
    r = subprocess.run([sys.executable, "-m", "analyses.trajectory", "--base", "organism-vl", "--runs", str(run),
                        "--out", str(out), "--no-figures", "--quiet"], cwd=REPO, capture_output=True, text=True,
                       preexec_fn=lower, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and "ulimit -Hn" in r.stderr, r.stderr
    assert not out.exists()


def test_runs_in_one_process_free_their_out_dirs_when_they_return(tmp_path):
    """A run holds an flock on DIR/.lock through an open descriptor; the claim ended only with the process
    (cli_main), so each probe.heads / probe.eval / analyses.finetune run called in one process (analyses.replicate's
    stages, a script evaluating every checkpoint) left one more descriptor open, and its finished --out locked:
    another command into it was refused as "in use" until that process exited."""
    import subprocess

    from analyses.finetune import FinetuneConfig, run_finetune
    from probe import eval as probe_eval
    from probe import heads

    text = str(Path(__file__).resolve().parents[1] / "probe/zoo/data/text")
    common = ["--limit", "2", "--no-generate", "--no-figures", "--quiet"]
    outs = [tmp_path / "heads", tmp_path / "eval", tmp_path / "ft"]
    heads.run(heads.build_parser().parse_args(["--model", "organism-base", "--data", text, "--layers", "0", "--heads",
                                               "0", "--out", str(outs[0]), *common]))
    probe_eval.run(probe_eval.build_parser().parse_args(["--models", "organism-base", "--data", text,
                                                         "--out", str(outs[1]), *common]))
    run_finetune(FinetuneConfig(model="organism-base", data={"text": text}, mix={"text": 1.0}, out=outs[2], steps=1,
                                split="validation", limit=2, batch=2, warmup=0, quiet=True))
    locks = [str(out / ".lock") for out in outs]
    assert all(Path(lock).is_file() for lock in locks)
    assert descriptors_on({Path(lock) for lock in locks}) == 0
    take = ("import fcntl, os, sys\n"
            "for p in sys.argv[1:]:\n"
            "    fcntl.flock(os.open(p, os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)\n")  # BlockingIOError if held
    r = subprocess.run([sys.executable, "-c", take, *locks], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def forward_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_a_head_mask_that_fails_to_enter_leaves_no_hook(load_tiny, monkeypatch):
    """``with HeadMask(...)`` whose entry failed part-way (a layer's o_proj not found, an interrupt) left the hooks
    of the layers before it on the user's model: every later forward ran with those heads gated, silently."""
    import torch

    from probe.masking import HeadMask

    loaded = load_tiny("qwen2")
    assert forward_hooks(loaded.model) == 0
    o_proj = loaded.o_proj

    def lost_at_layer_2(layer: int):
        if layer == 2:
            raise KeyboardInterrupt
        return o_proj(layer)

    monkeypatch.setattr(loaded, "o_proj", lost_at_layer_2)
    gates = {layer: torch.zeros(loaded.geometry.n_heads) for layer in range(loaded.geometry.n_layers)}
    with pytest.raises(KeyboardInterrupt):
        with HeadMask(loaded, gates):
            pass
    assert forward_hooks(loaded.model) == 0
