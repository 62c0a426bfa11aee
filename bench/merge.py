"""Merge benchmark: ``python -m analyses.merge`` against the I/O floor and against mergekit.

    python bench/merge.py [--k 3] [--params-m 145] [--dtype bfloat16] [--rounds 3] [--workdir DIR] [--keep]
                          [--method average|salience|ties|task_arithmetic]
    python bench/merge.py --arch qwen2-7b --layers 8 --rounds 1 --no-mergekit   # a 7B LM's real tensor sizes
    python bench/merge.py --arch smollm2-135m --layers 1 --k 2 --rounds 1       # CPU smoke, under 1 min

Writes k synthetic Qwen2 checkpoints of about ``params_m`` million parameters each (or, with ``--arch``, of a
published LM's tensors at their real sizes, random weights), then measures, each in a
fresh process, in alternating order for ``--rounds`` rounds (median reported), with the page cache warm and
dirty pages synced before every measurement:
- the I/O floor: read (copy into memory) every tensor of every input with plain safetensors + write one model
  with ``save_file``, once with 1 and once with 2 torch threads (the faster median is the floor);
- the raw floor: the same input bytes read into one reused buffer and one model's bytes written, no torch
  (what the disk and page cache alone cost);
- our merge, ``--method average`` by default (merge time excludes interpreter start and imports), its peak RSS,
  and the bound 1 GB + (k + 2) x largest tensor; with a base-relative ``--method`` the first checkpoint is the
  base and the others its experts (same k inputs), and ``salience`` reads a synthetic probe.heads run per expert
  and the Δavg of a ``python -m analyses.shift`` run made once before the timing (as the README's commands do);
- mergekit 0.1.5 ``linear`` on the same models (``mergekit-yaml --lazy-unpickle``), wall time and peak RSS.
Targets: merge <= 1.3x the I/O floor, RSS within the bound, not slower than mergekit.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probe.errors import ArgParser, BadInput, check_counts, check_out_path, cli_main, out_dir  # noqa: E402


HIDDEN, MLP, VOCAB, KV = 1024, 2816, 32000, 4 * (1024 // 16)
TEXT_ARCHS = ("qwen2-7b", "qwen2-72b", "smollm2-135m")  # probe.archs' text LMs (the merge reads the LM)


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.q_proj.bias": (HIDDEN,),
            p + "self_attn.k_proj.weight": (KV, HIDDEN), p + "self_attn.k_proj.bias": (KV,),
            p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.v_proj.bias": (KV,),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN), p + "mlp.gate_proj.weight": (MLP, HIDDEN),
            p + "mlp.up_proj.weight": (MLP, HIDDEN), p + "mlp.down_proj.weight": (HIDDEN, MLP),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,)}


def numel(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


# outside the layers: embedding, final norm, untied head
FIXED_SHAPES = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
                "lm_head.weight": (VOCAB, HIDDEN)}


def model_shapes(params_m: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a synthetic Qwen2 of about ``params_m`` million parameters: the layer count comes from the
    layer's own size (an estimate of 12.9M a layer, against its real 11.3M, gave 144M for the default 160)."""
    shapes = dict(FIXED_SHAPES)
    per_layer = numel(layer_shapes(0))
    for i in range(max(1, round((params_m * 1e6 - numel(FIXED_SHAPES)) / per_layer))):
        shapes.update(layer_shapes(i))
    return shapes


def smallest_params_m() -> int:
    """The least --params-m whose checkpoint is within half a layer of it: below, model_shapes still writes one
    layer, and the report's "synthetic N M" named a smaller model than the one measured (20 for 77M)."""
    return math.ceil((numel(FIXED_SHAPES) + numel(layer_shapes(0)) / 2) / 1e6)


def synthetic_config(params_m: int) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """The config and tensor shapes of the synthetic Qwen2 of about ``params_m`` million parameters."""
    from transformers import Qwen2Config

    shapes = model_shapes(params_m)
    layers = sum(n.endswith("input_layernorm.weight") for n in shapes)
    cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=KV // (HIDDEN // 16), vocab_size=VOCAB, tie_word_embeddings=False)
    return cfg, shapes


def arch_config(name: str, layers: int | None) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """The config and LM tensor shapes of a published architecture (``probe.archs``, nothing downloaded), its
    depth cut to ``layers`` if given: every tensor the real model has at its real size (Qwen2-7B's 152,064-row
    embedding and head are its largest, 545M entries each)."""
    import torch
    from transformers import AutoModelForCausalLM

    from probe.archs import build_config

    cfg = build_config(name, layers=layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tied = getattr(cfg, "tie_word_embeddings", False)
    return cfg, {n: tuple(t.shape) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}


# what a run writes into --workdir (and a rerun replaces): the checkpoints, the salience runs and shift dir of
# --method salience, our merge and mergekit's, its config, the I/O floors' files
WORKDIR_ENTRY = re.compile(r"(model|salience)\d+|shift|ours|mk|mergekit\.yml|floor\.safetensors|raw\.bin")


def make_models(workdir: Path, k: int, cfg: Any, shapes: dict[str, tuple[int, ...]], dtype: str) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    cfg.architectures = [type(cfg).__name__.removesuffix("Config") + "ForCausalLM"]
    cfg.dtype = dtype
    td = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    dirs = []
    for m in range(k):
        d = workdir / f"model{m}"
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
        sd = {n: (torch.randn(s, generator=g) * 0.02).to(td) for n, s in shapes.items()}
        # two shards, like a real checkpoint with an index
        names = list(sd)
        half = len(names) // 2
        wmap = {}
        for j, part in enumerate((names[:half], names[half:])):
            fn = f"model-{j + 1:05d}-of-00002.safetensors"
            save_file({n: sd[n] for n in part}, d / fn, metadata={"format": "pt"})
            wmap.update({n: fn for n in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}),
                                                        encoding="utf-8")
        dirs.append(d)
    return dirs


def io_floor(dirs: list[Path], out: Path) -> float:
    from safetensors import safe_open
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    keep = {}
    for i, d in enumerate(dirs):
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    t = st.get_tensor(k).clone()  # get_tensor may be a lazy mmap view: really read the bytes
                    if i == 0:
                        keep[k] = t  # the output to write: one model's worth
                    del t
    save_file(keep, out / "floor.safetensors", metadata={"format": "pt"})
    dt = time.perf_counter() - t0
    (out / "floor.safetensors").unlink()
    return dt


def raw_floor(dirs: list[Path], out: Path) -> float:
    """Read every input byte into one reused buffer, write one model's bytes: pure I/O, no tensors."""
    buf = memoryview(bytearray(64 << 20))
    t0 = time.perf_counter()
    with open(out / "raw.bin", "wb") as dst:
        for i, d in enumerate(dirs):
            for f in sorted(d.glob("*.safetensors")):
                with open(f, "rb", buffering=0) as src:
                    while n := src.readinto(buf):
                        if i == 0:
                            dst.write(buf[:n])
    dt = time.perf_counter() - t0
    (out / "raw.bin").unlink()
    return dt


FLOOR = """
import json, runpy, sys, torch
from pathlib import Path
torch.set_num_threads(int(sys.argv[1]))
bench = runpy.run_path(sys.argv[2])
print(json.dumps(bench[sys.argv[3]]([Path(d) for d in sys.argv[5:]], Path(sys.argv[4]))))
"""


# Peak RSS is read from the child's own VmHWM: ru_maxrss of a child also counts the (large) bench process it
# was forked from, since Linux carries the pre-exec high-water mark across exec.
PEAK_HOOK = """
import atexit
atexit.register(lambda: print("peak_rss_kb", open("/proc/self/status").read().split("VmHWM:")[1].split()[0]))
"""
OURS = PEAK_HOOK + """
import json, sys, time
from analyses import merge
t0 = time.perf_counter()
merge.main(sys.argv[1:])
print(json.dumps({"merge_s": time.perf_counter() - t0}))
"""
SCRIPT = PEAK_HOOK + """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Wall time, peak RSS (bytes) and stdout of a child run with ``PEAK_HOOK`` (dirty pages are synced first,
    so one measurement's writeback does not land in the next)."""
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{cmd[:3]} failed with {p.returncode}")
    *lines, peak = p.stdout.strip().splitlines()
    return wall, int(peak.split()[1]) * 1024, "\n".join(lines)


def merge_args(method: str, inputs: list[str], work: Path, n_layers: int, n_heads: int) -> list[str]:
    """The ``analyses.merge`` arguments of one benchmark merge (synthetic salience runs written once): average and
    weighted (weights 1, 2, …) merge every input, the other methods merge the first's experts; shift and salience
    read Eq. 4's Δavg from ``work/shift``, an ``analyses.shift`` run made once if it is not there."""
    if method == "average":
        return ["--models", *inputs, "--method", "average"]
    if method == "weighted":
        return ["--models", *inputs, "--method", "weighted", "--weights", *(str(i + 1) for i in range(len(inputs)))]
    args = ["--base", inputs[0], "--models", *inputs[1:], "--method", method]
    if method == "shift":
        args += ["--shift", str(shift_run(inputs, work))]
    if method == "salience":
        import random

        dirs = []
        for m in range(1, len(inputs)):
            d = work / f"salience{m}"
            if not d.is_dir():
                d.mkdir()
                rng = random.Random(m)
                rows = [f"{layer},{h},{rng.random()!r}" for layer in range(n_layers) for h in range(n_heads)]
                (d / "heads.csv").write_text("layer,head,kl\n" + "\n".join(rows) + "\n", encoding="utf-8")
                (d / "run.json").write_text('{"status": "complete"}', encoding="utf-8")
            dirs.append(str(d))
        args += ["--salience", *dirs, "--shift", str(shift_run(inputs, work))]
    return args


def shift_argv(inputs: list[str], work: Path) -> list[str]:
    """``analyses.shift`` of the first input (the base) against the others, into ``work/shift``."""
    return ["--base", inputs[0], "--models", *inputs[1:], "--out", str(work / "shift"), "--no-figures", "--quiet"]


def shift_run(inputs: list[str], work: Path) -> Path:
    """``work/shift``: Eq. 4's Δavg for the merges that read it, computed once outside any timing."""
    if not (work / "shift").is_dir():
        from analyses import shift

        shift.main(shift_argv(inputs, work))
    return work / "shift"


def mergekit_command(work: Path, method: str, dtype: str, dirs: list[Path]) -> list[str]:
    """mergekit 0.1.5's counterpart of our ``method`` (linear for average) on the same models: its config written
    to ``work/mergekit.yml``, the command that runs it under ``PEAK_HOOK`` into ``work/mk``."""
    cfg = work / "mergekit.yml"
    if method == "average":
        cfg.write_text(f"merge_method: linear\ndtype: {dtype}\nmodels:\n" + "".join(
            f"  - model: {d}\n    parameters: {{weight: 1.0}}\n" for d in dirs), encoding="utf-8")
    else:
        density = 0.2 if method == "ties" else 1.0
        cfg.write_text(f"merge_method: {method}\ndtype: {dtype}\nbase_model: {dirs[0]}\nmodels:\n" + "".join(
            f"  - model: {d}\n    parameters: {{weight: 1.0, density: {density}}}\n" for d in dirs[1:]),
            encoding="utf-8")
    exe = str(Path(sys.executable).with_name("mergekit-yaml"))
    return [sys.executable, "-c", SCRIPT, exe, str(cfg), str(work / "mk"), "--lazy-unpickle"]


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="python bench/merge.py", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=3, help="number of checkpoints merged (default: 3)")
    ap.add_argument("--params-m", type=int, help="million parameters per synthetic checkpoint (default: 145)")
    ap.add_argument("--arch", choices=TEXT_ARCHS, help="instead of --params-m: the LM of a published architecture "
                    "at its real tensor sizes (probe/archs.py; random weights, nothing downloaded) (default: none, "
                    "--params-m)")
    ap.add_argument("--layers", type=int, help="with --arch: cut its depth to this many layers (disk: Qwen2-7B's 28 "
                    "take 15.2 GB a checkpoint in bf16, 8 take 5.9 GB) (default: all of them)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype of the synthetic checkpoints, which the merges keep (default: bfloat16)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds, median reported (default: 3)")
    ap.add_argument("--workdir", type=out_dir, help="where the synthetic checkpoints go, left there afterwards (default: a "
                    "temp dir, removed at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the temp workdir (a --workdir is always kept)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit comparison")
    ap.add_argument("--method", default="average", choices=["average", "salience", "ties", "task_arithmetic"],
                    help="our merge method measured (default: average; mergekit's counterpart: linear, ties, "
                    "task_arithmetic; salience has none)")
    ap.add_argument("--threads", type=int, default=1, help="our merge's --threads (default: 1, its default)")
    a = ap.parse_args(argv)
    check_counts(a, ("k", "params_m", "rounds", "threads", "layers"))
    if a.arch and a.params_m:
        raise BadInput("give --arch or --params-m, not both")
    if a.layers and not a.arch:
        raise BadInput("--layers cuts an --arch")
    if not a.arch:
        a.params_m = a.params_m or 145
        if a.params_m < (least := smallest_params_m()):
            raise BadInput(f"--params-m {a.params_m} is below {least}, the smallest synthetic checkpoint's (embedding, "
                           f"head and one layer: {sum(math.prod(s) for s in model_shapes(1).values()) / 1e6:.1f}M)")
    if a.workdir is not None:  # the benchmark replaces its own entries there (ours/ and mk/ deleted at every round)
        check_out_path(a.workdir, "--workdir")
        foreign = sorted(f.name for f in a.workdir.iterdir() if not WORKDIR_ENTRY.fullmatch(f.name)) \
            if a.workdir.is_dir() else []
        if foreign:
            raise BadInput(f"--workdir {a.workdir} holds {foreign[0]}, which no run of this benchmark wrote; its own "
                           "entries there are overwritten and deleted: give a new or empty directory")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        cfg, shapes = arch_config(a.arch, a.layers) if a.arch else synthetic_config(a.params_m)
        dirs = make_models(work, a.k, cfg, shapes, a.dtype)
        size = sum(f.stat().st_size for f in dirs[0].glob("*.safetensors"))
        from analyses.checkpoints import open_checkpoint

        with open_checkpoint(str(dirs[0])) as ck:
            largest = max(i.nbytes for i in ck.infos.values())
            n_layers = int(ck.text_config["num_hidden_layers"])
            n_heads = int(ck.text_config["num_attention_heads"])
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        inputs = list(map(str, dirs))
        mergekit = not a.no_mergekit and a.method != "salience"
        mk_cmd = mergekit_command(work, a.method, a.dtype, dirs) if mergekit else None
        runs: dict[str, list[float]] = {"floor_1thread": [], "floor_2threads": [], "raw_floor": [], "merge": [],
                                        "merge_wall": [], **({"mergekit_wall": []} if mergekit else {})}
        rss = mk_rss = 0
        io_floor(dirs, work)  # warm the page cache for everyone
        for _ in range(a.rounds):  # alternating, so load from other users hits every kind alike (mergekit too: it
            # was timed once after the rounds, its single time against our median)
            for key, fn, threads in (("floor_1thread", "io_floor", 1), ("floor_2threads", "io_floor", 2),
                                     ("raw_floor", "raw_floor", 1)):
                cmd = [sys.executable, "-c", PEAK_HOOK + FLOOR, str(threads), __file__, fn, str(work), *inputs]
                _, _, stdout = run_measured(cmd)
                runs[key].append(float(stdout.strip().splitlines()[-1]))
            out = work / "ours"
            shutil.rmtree(out, ignore_errors=True)
            ours = [*merge_args(a.method, inputs, work, n_layers, n_heads), "--threads", str(a.threads), "--out", str(out)]
            wall, peak, stdout = run_measured([sys.executable, "-c", OURS, *ours], env)
            runs["merge"].append(json.loads(stdout.strip().splitlines()[-1])["merge_s"])
            runs["merge_wall"].append(wall)
            rss = max(rss, peak)
            if mk_cmd is not None:
                shutil.rmtree(work / "mk", ignore_errors=True)
                wall, peak, _ = run_measured(mk_cmd)
                runs["mergekit_wall"].append(wall)
                mk_rss = max(mk_rss, peak)
        med = {k: statistics.median(v) for k, v in runs.items()}
        floor, merge_s = min(med["floor_1thread"], med["floor_2threads"]), med["merge"]
        bound = 1e9 + (a.k + 2) * largest
        res = {
            "method": a.method, "arch": a.arch or f"synthetic {a.params_m}M", "layers": a.layers,
            "threads": a.threads, "k": a.k, "dtype": a.dtype, "checkpoint_mb": round(size / 1e6), "largest_tensor_mb": round(largest / 1e6, 1),
            "rounds": a.rounds, **{f"{k}_s": round(v, 2) for k, v in med.items()},
            "all_runs_s": {k: [round(x, 2) for x in v] for k, v in runs.items()}, "io_floor_s": round(floor, 2),
            "ratio_to_io_floor": round(merge_s / floor, 2), "ratio_to_raw_floor": round(merge_s / med["raw_floor"], 2),
            "peak_rss_mb": round(rss / 1e6),
            "rss_bound_mb": round(bound / 1e6), "rss_within_bound": rss <= bound,
        }
        if mergekit:
            res.update({"mergekit_peak_rss_mb": round(mk_rss / 1e6),
                        "ours_wall_vs_mergekit_wall": round(med["merge_wall"] / med["mergekit_wall"], 2)})
        for key, v in res.items():
            print(f"{key:28s} {v}")
        print(json.dumps(res))
    finally:
        if not a.keep and a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
