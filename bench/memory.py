"""Memory benchmark: peak RSS and time of assembling, resuming, drawing and loading results at the paper's scale,
without running a model.

    python bench/memory.py                          # 784 heads (28 × 28) × 900 items; eval 8 models × 4 sets × 900
    python bench/memory.py --items 90 --models 2     # a quick look (3 min: each stage a process, imports included)
    python bench/memory.py --items 90 --sets 1 --stages heads-fresh heads-resume load-heads   # CPU smoke, ~1 min
    python bench/memory.py --work /tmp/mem --keep    # keep (and on a rerun reuse) the built model, sets and results
    python bench/memory.py --stages checkpoints      # the checkpoint commands on Qwen2-7B-sized tensors (below)

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

The checkpoint stages (``--stages checkpoints``, or any of them by name) run the commands that read and write
checkpoints, each in a fresh process as above, on a base and ``--experts`` experts built by bench/merge.py's
builder: an ``--arch`` LM (default Qwen2-7B) at its real tensor sizes, cut to ``--ckpt-layers`` layers, in
``--ckpt-dtype``, two safetensors shards and an index each. ``ckpt-shift`` is ``python -m analyses.shift``,
``ckpt-merge-M`` is ``python -m analyses.merge --method M`` with bench/merge.py's arguments (average and weighted
merge all inputs, the others the base's experts; shift and salience read ckpt-shift's output), ``ckpt-trajectory``
is ``python -m analyses.trajectory`` of the base and experts. Besides the peak RSS, which counts the inputs'
memory-mapped pages the command has touched (page cache, reclaimable), a thread samples the anonymous memory
(RssAnon, every 10 ms): what the command itself allocated. Each merge's output files are hashed (sha256, written
to ``--hashes FILE``) and deleted, to compare outputs across code changes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe.errors import ArgParser, BadInput, check_counts, cli_main  # noqa: E402

# MMMU's 30 validation subjects (names only: the folders of the synthetic set)
SUBJECTS = ("Accounting Agriculture Architecture_and_Engineering Art Art_Theory Basic_Medical_Science Biology "
            "Chemistry Clinical_Medicine Computer_Science Design Diagnostics_and_Laboratory_Medicine Economics "
            "Electronics Energy_and_Power Finance Geography History Literature Manage Marketing Materials Math "
            "Mechanical_Engineering Music Pharmacy Physics Psychology Public_Health Sociology").split()
RESULT_STAGES = ("heads-fresh", "heads-resume", "heads-plan", "figures-heads", "load-heads", "eval-fresh",
                 "eval-resume", "eval-plan", "figures-eval", "load-eval")
MERGE_METHODS = ("average", "weighted", "shift", "task_arithmetic", "ties", "salience")
CKPT_STAGES = ("ckpt-shift", *(f"ckpt-merge-{m}" for m in MERGE_METHODS), "ckpt-trajectory")
STAGES = RESULT_STAGES + CKPT_STAGES


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


def status_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS, RssAnon, …), in MB."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """The peak of this process's anonymous resident memory (RssAnon), sampled every 10 ms on a thread: VmHWM
    also counts the memory-mapped input pages a streaming command touches, which are page cache."""

    def __init__(self) -> None:
        import threading

        self.peak = status_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_mb("RssAnon"))


def peak_mb() -> float:
    """The peak resident memory since ``reset_peak`` (VmHWM), else since the process started (ru_maxrss)."""
    peak = status_mb("VmHWM")
    if math.isnan(peak):  # no VmHWM line
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return peak


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


def bench_merge():
    """bench/merge.py as a module: its checkpoint builder and its merges' arguments, reused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_merge", Path(__file__).with_name("merge.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ckpt_inputs(work: Path, experts: int) -> list[str]:
    """The checkpoint stages' inputs: the base (model0), then its experts."""
    return [str(work / "ckpt" / f"model{m}") for m in range(experts + 1)]


def build_checkpoints(work: Path, arch: str, layers: int, experts: int, dtype: str) -> bool:
    """A base and ``experts`` experts of ``arch``'s LM at its real tensor sizes, cut to ``layers`` layers (random
    weights, bench/merge.py's builder), unless --work already holds them for the same options; whether it built."""
    spec = {"arch": arch, "layers": layers, "experts": experts, "dtype": dtype}
    stamp = work / "ckpt" / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == spec:
        return False
    shutil.rmtree(work / "ckpt", ignore_errors=True)
    (work / "ckpt").mkdir(parents=True)
    merge = bench_merge()
    cfg, shapes = merge.arch_config(arch, layers)
    merge.make_models(work / "ckpt", experts + 1, cfg, shapes, dtype)
    stamp.write_text(json.dumps(spec), encoding="utf-8")
    return True


def ckpt_sizes(work: Path) -> tuple[int, int]:
    """The base's largest tensor and its whole LM, in bytes (safetensors headers only)."""
    from analyses.checkpoints import open_checkpoint

    with open_checkpoint(str(work / "ckpt" / "model0")) as ck:
        return max(i.nbytes for i in ck.infos.values()), sum(i.nbytes for i in ck.infos.values())


def ckpt_argv(stage: str, work: Path, experts: int) -> list[str]:
    """The command line of a checkpoint stage (its output under ``work/out-STAGE``, or ``work/ckpt/shift``)."""
    from analyses.checkpoints import open_checkpoint

    merge = bench_merge()
    inputs = ckpt_inputs(work, experts)
    if stage == "ckpt-shift":
        return merge.shift_argv(inputs, work / "ckpt")
    out = ["--out", str(work / f"out-{stage}"), "--quiet"]
    if stage == "ckpt-trajectory":
        return ["--base", inputs[0], "--experts", *inputs[1:], "--no-figures", *out]
    with open_checkpoint(inputs[0]) as ck:
        n_layers, n_heads = (int(ck.text_config[k]) for k in ("num_hidden_layers", "num_attention_heads"))
    return [*merge.merge_args(stage.removeprefix("ckpt-merge-"), inputs, work / "ckpt", n_layers, n_heads), *out]


def run_ckpt_stage(stage: str, work: Path, experts: int) -> dict:
    """One checkpoint command in this process: its peak RSS and sampled anonymous peak over its imports."""
    import gc

    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import analyses.merge
    import analyses.shift
    import analyses.trajectory

    command = {"ckpt-shift": analyses.shift, "ckpt-trajectory": analyses.trajectory}.get(stage, analyses.merge)
    argv = ckpt_argv(stage, work, experts)
    gc.collect()
    if not reset_peak():
        print("warning: cannot reset the peak RSS (/proc/self/clear_refs): peaks include the imports",
              file=sys.stderr)
    before, anon_before = rss_mb(), status_mb("RssAnon")
    anon = AnonPeak()
    t = time.perf_counter()
    command.main(argv)
    s = time.perf_counter() - t
    return {"stage": stage, "s": s, "peak_mb": peak_mb(), "before_mb": before, "anon_peak_mb": anon.stop(),
            "anon_before_mb": anon_before}


def output_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file a merge wrote (its safetensors, index, config, merge_weights.csv; merge.json holds
    times, so it is left out)."""
    import hashlib

    hashes = {}
    for f in sorted(out.rglob("*")):
        if f.is_file() and f.name != "merge.json" and not f.name.startswith(".omniprobe"):
            h = hashlib.sha256()
            with open(f, "rb") as src:
                while block := src.read(1 << 24):
                    h.update(block)
            hashes[str(f.relative_to(out))] = h.hexdigest()
    return hashes


# ---- fakes: what replaces the model (the commands' own writers stay) ----

def fake_heads_engine(loaded, items, pairs, cfg, progress=lambda n: None, limit=None):
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
    from types import SimpleNamespace

    import torch

    import probe.batch
    import probe.models
    import probe.sweep

    # a CPU model as far as probe.eval asks (its default --batch-size is the device's)
    probe.models.load_model = lambda *a, **k: SimpleNamespace(device=torch.device("cpu"))
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

    if stage in CKPT_STAGES:
        raise ValueError(stage)  # run_ckpt_stage's

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
           str(args.heads), "--experts", str(args.experts)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"stage {stage} failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="python bench/memory.py", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=900, help="items per data set (default: 900, MMMU validation)")
    p.add_argument("--layers", type=int, default=28, help="decoder layers of the swept model (default: 28)")
    p.add_argument("--heads", type=int, default=28, help="query heads per layer (default: 28)")
    p.add_argument("--models", type=int, default=8, help="probe.eval models (default: 8)")
    p.add_argument("--sets", type=int, default=4, help="probe.eval data sets (default: 4)")
    p.add_argument("--stages", nargs="+", choices=[*STAGES, "checkpoints"], default=list(RESULT_STAGES),
                   help="stages to run; 'checkpoints' is every ckpt- stage (default: every stage but the ckpt- ones)")
    p.add_argument("--arch", default="qwen2-7b", help="ckpt- stages: the LM whose tensors the checkpoints have, at "
                   "their real sizes (bench/merge.py's --arch; default: qwen2-7b)")
    p.add_argument("--ckpt-layers", type=int, default=2, help="ckpt- stages: its depth cut to this many layers "
                   "(default: 2; Qwen2-7B's 2 layers take 3.1 GB a checkpoint in bf16)")
    p.add_argument("--experts", type=int, default=3, help="ckpt- stages: experts beside the base (default: 3)")
    p.add_argument("--ckpt-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="ckpt- stages: the checkpoints' dtype on disk (default: bfloat16)")
    p.add_argument("--hashes", type=Path, default=None, help="ckpt- stages: write each output file's sha256 to "
                   "this JSON file (default: none written)")
    p.add_argument("--work", type=Path, default=None, help="folder for the built inputs and results (default: a "
                   "temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep --work's results (the inputs are always reused)")
    p.add_argument("--stage", choices=STAGES, default=None, help=argparse.SUPPRESS)  # one stage, in this process
    args = p.parse_args(argv)
    check_counts(args, ("items", "layers", "heads", "models", "sets", "ckpt_layers", "experts"))
    archs = bench_merge().TEXT_ARCHS
    if args.arch not in archs:
        raise BadInput(f"unknown --arch {args.arch!r}: one of {', '.join(archs)}")
    if args.stage is not None:
        if args.stage in CKPT_STAGES:
            with contextlib.redirect_stdout(sys.stderr):
                r = run_ckpt_stage(args.stage, args.work, args.experts)
        else:
            r = run_stage(args.stage, args.work, args.items, args.models, args.sets)
        print(json.dumps(r))
        return 0
    stages = list(dict.fromkeys(s for st in args.stages for s in (CKPT_STAGES if st == "checkpoints" else (st,))))
    results = [s for s in stages if s in RESULT_STAGES]
    ckpts = [s for s in stages if s in CKPT_STAGES]
    temp = args.work is None
    if temp:
        import tempfile

        args.work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        if results:
            run_results(args, results)
        if ckpts:
            run_checkpoints(args, ckpts)
    finally:
        if temp or not args.keep:
            for run in ("heads-run", "eval-run"):
                shutil.rmtree(args.work / run, ignore_errors=True)
            shutil.rmtree(args.work / "ckpt", ignore_errors=True)
            for stage in CKPT_STAGES:
                shutil.rmtree(args.work / f"out-{stage}", ignore_errors=True)
        if temp:
            shutil.rmtree(args.work, ignore_errors=True)
    return 0


def megabytes(mib: float) -> str:
    """A stage's MiB (what VmHWM and statm give) as the tables' MB (10**6 bytes): the result table printed MiB as MB."""
    return f"{mib * 2**20 / 1e6:,.0f} MB"


def run_results(args: argparse.Namespace, stages: list[str]) -> None:
    """The result-assembly stages: inputs built (or reused), each stage's row printed."""
    t = time.perf_counter()
    build_inputs(args.work, args.items, args.layers, args.heads, args.models, args.sets)
    print(f"inputs built in {time.perf_counter() - t:.1f} s under {args.work}")
    for run in ("heads", "eval"):  # the fresh stages start from nothing
        if f"{run}-fresh" in stages:
            shutil.rmtree(args.work / f"{run}-run", ignore_errors=True)
    n_rows = args.items * (args.layers * args.heads + 1)
    print(f"head sweep: {args.layers} × {args.heads} heads × {args.items} items = {n_rows:,} item rows; "
          f"eval: {args.models} models × {args.sets} sets × {args.items} items = "
          f"{args.models * args.sets * args.items:,} item rows")
    print("| stage | peak RSS | RSS after imports | stage's own (peak − after imports) | wall |")
    print("|---|---|---|---|---|")
    mb = megabytes
    for stage in stages:
        r = stage_process(stage, args)
        print(f"| {stage} | {mb(r['peak_mb'])} | {mb(r['before_mb'])} | {mb(r['peak_mb'] - r['before_mb'])} | "
              f"{r['s']:.2f} s |", flush=True)


def run_checkpoints(args: argparse.Namespace, stages: list[str]) -> None:
    """The checkpoint stages: checkpoints built (or reused), each stage's row printed, its output hashed and
    deleted (ckpt-shift's is kept: the shift and salience merges read it)."""
    t = time.perf_counter()
    built = build_checkpoints(args.work, args.arch, args.ckpt_layers, args.experts, args.ckpt_dtype)
    largest, total = ckpt_sizes(args.work)
    print(f"checkpoints {f'built in {time.perf_counter() - t:.1f} s' if built else 'reused'} under {args.work / 'ckpt'}: a base and "
          f"{args.experts} experts, {args.arch}'s LM cut to {args.ckpt_layers} layers, {args.ckpt_dtype}; one LM "
          f"{total / 1e6:,.0f} MB, its largest tensor {largest / 1e6:,.0f} MB")
    if "ckpt-shift" in stages:
        shutil.rmtree(args.work / "ckpt" / "shift", ignore_errors=True)
    print("| stage | peak RSS over imports | ÷ largest tensor | ÷ one LM | anonymous peak over imports | wall |")
    print("|---|---|---|---|---|---|")
    hashes = {}
    for stage in stages:
        shutil.rmtree(args.work / f"out-{stage}", ignore_errors=True)
        r = stage_process(stage, args)
        own = (r["peak_mb"] - r["before_mb"]) * 2**20
        print(f"| {stage} | {own / 1e6:,.0f} MB | {own / largest:.2f} | {own / total:.2f} | "
              f"{(r['anon_peak_mb'] - r['anon_before_mb']) * 2**20 / 1e6:,.0f} MB | {r['s']:.1f} s |", flush=True)
        if stage.startswith("ckpt-merge-"):
            hashes[stage] = output_hashes(args.work / f"out-{stage}")
            shutil.rmtree(args.work / f"out-{stage}")
    if args.hashes is not None:
        args.hashes.write_text(json.dumps(hashes, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(cli_main(main))
