"""Memory benchmark: peak RSS and time of assembling, resuming, drawing and loading results at the paper's scale,
without running a model.

    python bench/memory.py                          # 784 heads (28 × 28) × 900 items; eval 8 models × 4 sets × 900
    python bench/memory.py --items 90 --models 2     # a quick look
    python bench/memory.py --work /tmp/mem --keep    # keep (and on a rerun reuse) the built model, sets and results

The parts are written by the commands themselves: ``python -m probe.heads`` and ``python -m probe.eval`` run with
the model's load and its forward passes replaced by random measurements (the head sweep's engine by one that
fills ``probe.sweep.measurement_row`` as ``naive_sweep`` does; probe.eval's ``evaluate_items`` by one returning
``probe.sweep.Measurement`` s), so the parts, run.json and the assembled files have exactly the schema and rows a
real run writes. The model is a random-weight Qwen2-VL of the paper's head grid (28 layers × 28 query heads, tiny
widths: its config and tokenizer are all the commands read when no forward runs); the data are 900 synthetic
MMMU-format items in 30 subjects, as MMMU's validation split.

Each stage runs in a fresh process, one after another, and prints its peak resident memory (VmHWM, reset after
the imports), the resident memory after its imports (so the difference is the stage's data, not torch or
matplotlib), and its wall time:
- heads fresh: the sweep computing every chunk with the fake engine, then assembling (the part writer's cost too);
- heads resume: the same command again: every part kept, nothing computed, outputs assembled (read_parts kept=);
- heads plan: the plan alone (items loaded, model config and tokenizer read), to tell assembly from what every run
  costs;
- figures heads: ``python -m figures heads DIR``; load heads: ``figures.results.load(DIR)`` and its ``.items``;
- the same for probe.eval (its items.parquet of models × sets × items; scores.csv's seeded bootstrap, 2,000
  resamples per interval, is most of its assembly time) and ``python -m figures eval DIR``.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe.errors import ArgParser, check_counts, cli_main  # noqa: E402

# MMMU's 30 validation subjects (names only: the folders of the synthetic set)
SUBJECTS = ("Accounting Agriculture Architecture_and_Engineering Art Art_Theory Basic_Medical_Science Biology "
            "Chemistry Clinical_Medicine Computer_Science Design Diagnostics_and_Laboratory_Medicine Economics "
            "Electronics Energy_and_Power Finance Geography History Literature Manage Marketing Materials Math "
            "Mechanical_Engineering Music Pharmacy Physics Psychology Public_Health Sociology").split()
STAGES = ("heads-fresh", "heads-resume", "heads-plan", "figures-heads", "load-heads", "eval-fresh", "eval-resume",
          "eval-plan", "figures-eval", "load-eval")


def rss_mb() -> float:
    """This process's resident memory now, in MB."""
    import os

    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Start the kernel's peak resident memory (VmHWM) over from now: imports touch more memory than they keep
    (480 MB at the peak against 325 MB resident after them), which would hide a smaller stage's peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """The peak resident memory since ``reset_peak`` (VmHWM), else since the process started (ru_maxrss)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- inputs: built once into --work ----

def build_inputs(work: Path, items: int, layers: int, heads: int, models: int, sets: int) -> None:
    from probe.synthetic import generate_items, write_mmmu_parquet
    from probe.tiny import TinySpec, build_tiny

    head_dim = 8  # the smallest with three non-empty M-RoPE sections
    if not (work / "model").is_dir():
        build_tiny("qwen2_vl", work / "model", TinySpec(hidden_size=heads * head_dim, intermediate_size=32,
                                                        num_hidden_layers=layers, num_attention_heads=heads,
                                                        num_key_value_heads=heads // 7 if heads % 7 == 0 else heads))
    for m in range(models):  # probe.eval's models: one small Qwen2-VL under several names (its weights never load)
        if not (work / f"eval-model-{m}").is_dir():
            build_tiny("qwen2_vl", work / f"eval-model-{m}")
    per = [items // len(SUBJECTS) + (s < items % len(SUBJECTS)) for s in range(len(SUBJECTS))]
    for d in range(max(sets, 1)):
        root = work / f"data-{d}"
        if not root.is_dir():
            write_mmmu_parquet({s: generate_items(n, f"mem:{d}:{s}", 32, open_fraction=0.0, subject=s)
                                for s, n in zip(SUBJECTS, per) if n}, root, "validation")


# ---- fakes: what replaces the model (the commands' own writers stay) ----

def fake_heads_engine(loaded, items, pairs, cfg, progress=lambda n: None):
    """``naive_sweep``'s rows (probe.sweep.measurement_row, same order) from seeded random option log-probs."""
    import torch

    from probe.metrics import option_log_probs
    from probe.sweep import BASELINE, Measurement, measurement_row

    rows = []
    for item in items:
        g = torch.Generator().manual_seed(zlib.crc32(item.id.encode()))
        n = len(item.letters)
        logp = option_log_probs(torch.randn(len(pairs) + 1, n, generator=g), list(range(n)))
        picks = torch.randint(len(item.letters), (len(pairs) + 1,), generator=g).tolist()
        base = Measurement(logp[0], item.letters[picks[0]] if cfg.generate else None)
        rows.append(measurement_row(item, BASELINE, BASELINE, base, base.logp))
        for k, (layer, head) in enumerate(pairs, 1):
            m = Measurement(logp[k], f"{item.letters[picks[k]]}." if cfg.generate else None)
            rows.append(measurement_row(item, layer, head, m, base.logp))
        progress(len(pairs) + 1)
    return rows


def fake_evaluate_items(loaded, items, cfg, batch_size, progress=lambda n: None, **kw):
    import torch

    from probe.metrics import option_log_probs, prob_choice
    from probe.sweep import Measurement

    out = []
    for item in items:
        g = torch.Generator().manual_seed(zlib.crc32(item.id.encode()))
        n = len(item.letters)
        logp = option_log_probs(torch.randn(n, generator=g), list(range(n)))
        out.append(Measurement(logp, item.letters[int(prob_choice(logp))] if cfg.generate else None))
    progress(len(items))
    return out


def patch_model_away() -> None:
    """No weights load and no forward runs: load_model gives a stand-in, the engines are the fakes above."""
    import probe.batch
    import probe.models
    import probe.sweep

    probe.models.load_model = lambda *a, **k: object()
    probe.sweep.get_engine = lambda name: fake_heads_engine
    probe.batch.evaluate_items = fake_evaluate_items


# ---- one stage, in its own process ----

def heads_argv(work: Path, items: int) -> list[str]:
    return ["--model", str(work / "model"), "--data", str(work / "data-0"), "--limit", str(items), "--out",
            str(work / "heads-run"), "--quiet", "--no-figures", "--device", "cpu", "--dtype", "float32"]


def eval_argv(work: Path, items: int, models: int, sets: int) -> list[str]:
    return ["--models", *(str(work / f"eval-model-{m}") for m in range(models)), "--data",
            *(str(work / f"data-{d}") for d in range(sets)), "--limit", str(items), "--reference",
            str(work / "eval-model-0"), "--out", str(work / "eval-run"), "--quiet", "--no-figures", "--device",
            "cpu", "--dtype", "float32"]


def run_stage(stage: str, work: Path, items: int, models: int, sets: int) -> dict:
    import contextlib
    import io

    import matplotlib  # imports out of the measured difference, those the commands make lazily too

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    import transformers

    for name in ("AutoProcessor", "AutoImageProcessor", "AutoTokenizer", "Qwen2VLForConditionalGeneration"):
        getattr(transformers, name)

    import figures.eval  # noqa: F401
    import figures.heads  # noqa: F401
    import figures.results
    import probe.eval
    import probe.heads

    patch_model_away()
    import gc

    gc.collect()
    if not reset_peak():
        print("warning: cannot reset the peak RSS (/proc/self/clear_refs): peaks include the imports",
              file=sys.stderr)
    before = rss_mb()
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if stage in ("heads-fresh", "heads-resume"):
            probe.heads.run(probe.heads.build_parser().parse_args(heads_argv(work, items)))
        elif stage == "heads-plan":
            probe.heads.make_plan(probe.heads.build_parser().parse_args(heads_argv(work, items)))
        elif stage in ("eval-fresh", "eval-resume"):
            probe.eval.run(probe.eval.build_parser().parse_args(eval_argv(work, items, models, sets)))
        elif stage == "eval-plan":
            probe.eval.make_plan(probe.eval.build_parser().parse_args(eval_argv(work, items, models, sets)))
        elif stage in ("figures-heads", "figures-eval"):
            from figures.__main__ import main

            main([stage.split("-")[1], str(work / f"{stage.split('-')[1]}-run")])
        elif stage in ("load-heads", "load-eval"):
            r = figures.results.load(work / f"{stage.split('-')[1]}-run")
            n = len(r.items)
        else:
            raise ValueError(stage)
    out = {"stage": stage, "s": time.perf_counter() - t, "peak_mb": peak_mb(), "before_mb": before}
    if stage.startswith("load"):
        out["rows"] = n
    return out


def stage_process(stage: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--work", str(args.work), "--items", str(args.items),
           "--models", str(args.models), "--sets", str(args.sets), "--layers", str(args.layers), "--heads",
           str(args.heads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"stage {stage} failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=900, help="items per data set (default: 900, MMMU validation)")
    p.add_argument("--layers", type=int, default=28, help="decoder layers of the swept model (default: 28)")
    p.add_argument("--heads", type=int, default=28, help="query heads per layer (default: 28)")
    p.add_argument("--models", type=int, default=8, help="probe.eval models (default: 8)")
    p.add_argument("--sets", type=int, default=4, help="probe.eval data sets (default: 4)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run (default: all)")
    p.add_argument("--work", type=Path, default=None, help="folder for the built inputs and results (default: a "
                   "temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep --work's results (the inputs are always reused)")
    p.add_argument("--stage", choices=STAGES, default=None, help=argparse.SUPPRESS)  # one stage, in this process
    args = p.parse_args(argv)
    check_counts(args, ("items", "layers", "heads", "models", "sets"))
    if args.stage is not None:
        print(json.dumps(run_stage(args.stage, args.work, args.items, args.models, args.sets)))
        return 0
    temp = args.work is None
    if temp:
        import tempfile

        args.work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        build_inputs(args.work, args.items, args.layers, args.heads, args.models, args.sets)
        print(f"inputs built in {time.perf_counter() - t:.1f} s under {args.work}")
        for run in ("heads", "eval"):  # the fresh stages start from nothing
            if f"{run}-fresh" in args.stages:
                shutil.rmtree(args.work / f"{run}-run", ignore_errors=True)
        n_rows = args.items * (args.layers * args.heads + 1)
        print(f"head sweep: {args.layers} × {args.heads} heads × {args.items} items = {n_rows:,} item rows; "
              f"eval: {args.models} models × {args.sets} sets × {args.items} items = "
              f"{args.models * args.sets * args.items:,} item rows")
        print("| stage | peak RSS | RSS after imports | stage's own (peak − after imports) | wall |")
        print("|---|---|---|---|---|")
        for stage in args.stages:
            r = stage_process(stage, args)
            print(f"| {stage} | {r['peak_mb']:.0f} MB | {r['before_mb']:.0f} MB | {r['peak_mb'] - r['before_mb']:.0f} "
                  f"MB | {r['s']:.2f} s |", flush=True)
    finally:
        if temp or not args.keep:
            for run in ("heads-run", "eval-run"):
                shutil.rmtree(args.work / run, ignore_errors=True)
        if temp:
            shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
