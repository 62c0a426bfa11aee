"""How far modality fine-tuning moved the LLM, per tensor (Eq. 3, section 5.3).

    python -m analyses.shift --base qwen2 --models qwen2-vl llava-video llava-ov-si --out runs/shift

writes ``shift.csv`` (model, tensor, layer, module, numel, delta_avg, delta_max, rel_l2), ``summary.json``
(per model: mean Δavg over tensors, as the paper averages it, the element-weighted mean, and the ratio to the
least-shifted model, so "Qwen2-VL shift is 10x the others" can be checked) and the figures of
``figures.shift``. Streams one tensor at a time from memory-mapped safetensors.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


from analyses.align import Alignment, align, check_delta_finite, paired_chunks
from analyses.checkpoints import (Checkpoint, add_output_args, check_inputs_and_out, checkpoint_fingerprint,
                                  layer_module, open_checkpoint, progress, quiet_progress, reserve_descriptors)
from analyses.formulas import ShiftStats
from analyses.shift_csv import COLUMNS, COMMAND
from analyses.writer import atomic_dir, check_output, check_replaceable, returns_finished, run_request
from probe.errors import TENSOR_MEMORY_HINT, ArgParser, BadInput, cli_main, out_dir, parse_options, says_out_of_memory
from probe.results import results_line

CHUNK = 1 << 22  # elements per streamed chunk: 16 MB of fp32 temporaries


@dataclass
class ShiftConfig:
    base: str
    models: list[str]
    out: Path
    overwrite: bool = False
    allow_bin: bool = False
    figures: bool = True

    def __post_init__(self) -> None:
        self.out = out_dir(self.out)  # from Python a str too, ~ expanded as the CLI's --out


@dataclass
class ShiftRow:
    model: str
    tensor: str
    layer: int | None
    module: str
    numel: int
    delta_avg: float
    delta_max: float
    rel_l2: float


def stream_stats(ckpts: Sequence[Checkpoint], plan_al: Alignment, names: Sequence[str], desc: str = "shift") -> list[list[ShiftStats]]:
    """Per tensor, stats of every checkpoint after the first against the first, over the elements both have."""
    out = []
    for plan in progress(plan_al.tensors, desc=desc, unit="tensor", leave=False):
        stats = [ShiftStats() for _ in ckpts[1:]]
        views = [ck.view(info).reshape(-1) for ck, info in zip(ckpts, plan.infos)]
        for j, b, v in paired_chunks(plan, views, CHUNK):
            stats[j - 1].add(b, v)
        for st, ck, nm, info, v in zip(stats, ckpts[1:], names[1:], plan.infos[1:], views[1:]):
            if not st.finite:
                check_delta_finite(views[0], names[0], plan.infos[0].key, v, nm, info.key)
        del views
        for ck, info in zip(ckpts, plan.infos):
            ck.release(info)
        out.append(stats)
    return out


def compute_shift(base: Checkpoint, models: Sequence[Checkpoint], names: Sequence[str]) -> tuple[list[ShiftRow], Alignment]:
    al = align([base, *models], [base.name, *names], use="shift")
    stats = stream_stats([base, *models], al, [base.name, *names])
    rows = []
    for i, nm in enumerate(names):
        for plan, st in zip(al.tensors, stats):
            if plan.canon == "lm_head.weight" and base.tied and models[i].tied:
                continue  # both heads are their embeddings: the embed_tokens row already says it
            layer, module = layer_module(plan.canon)
            rows.append(ShiftRow(nm, plan.canon, layer, module, st[i].numel, st[i].delta_avg, st[i].max_abs, st[i].rel_l2))
    return rows, al


def summarize(rows: Sequence[ShiftRow], names: Sequence[str]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for nm in names:
        r = [x for x in rows if x.model == nm]
        numel = sum(x.numel for x in r)
        per[nm] = {
            "n_tensors": len(r),
            "numel": numel,
            "mean_delta_avg": statistics.fmean(x.delta_avg for x in r),  # the paper's "average parameter shift"
            "weighted_delta_avg": sum(x.delta_avg * x.numel for x in r) / max(numel, 1),  # mean |Δ| over all weights
            "median_delta_avg": statistics.median(x.delta_avg for x in r),
            "max_delta": max(x.delta_max for x in r),
            # rel_l2 is undefined (inf) for a base tensor of zeros that moved: the mean is over the others
            "mean_rel_l2": _mean_finite([x.rel_l2 for x in r]),
        }
    low = min(v["mean_delta_avg"] for v in per.values())
    low_w = min(v["weighted_delta_avg"] for v in per.values())
    for v in per.values():
        # null (valid JSON, unlike Infinity) when some model did not move at all: no ratio to it is defined
        v["ratio_to_least_shifted"] = v["mean_delta_avg"] / low if low > 0 else None
        v["weighted_ratio_to_least_shifted"] = v["weighted_delta_avg"] / low_w if low_w > 0 else None
    return per


def _mean_finite(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def write_csv(path: Path, rows: Sequence[ShiftRow]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r.model, r.tensor, "" if r.layer is None else r.layer, r.module, r.numel,
                        repr(r.delta_avg), repr(r.delta_max), repr(r.rel_l2)])


def checkpoint_entry(ck: Checkpoint, name: str, al: Alignment, j: int) -> dict[str, Any]:
    """How summary.json names a participant (``j``: its place in ``al``, 0 the base), with the dtypes its compared
    LM tensors are stored in (several where a checkpoint mixes them; Δ is computed in fp32 whatever they are).
    ``analyses.merge --shift`` matches models by the resolved path and the fingerprint of their files, never by
    the name given on the command line."""
    dtypes = sorted({str(p.infos[j].dtype).removeprefix("torch.") for p in al.tensors})
    return {"name": name, "path": str(ck.path), "layout": ck.layout.name, "resolved_path": str(ck.path.resolve()),
            "fingerprint": checkpoint_fingerprint(ck), "dtypes": dtypes}


def shift_request(cfg: ShiftConfig) -> dict:
    """What a shift output is computed from (``run_request``): its options and the models it compares."""
    return run_request(cfg, [cfg.base, *cfg.models])


@returns_finished("summary.json")
def run_shift(cfg: ShiftConfig) -> dict[str, Any]:
    """``python -m analyses.shift`` from Python: writes ``cfg.out`` (shift.csv, summary.json, figures unless
    ``cfg.figures`` is False) and returns summary.json's content (``per_model``: mean Δavg, ratio to the least
    shifted, …); an output already finished with the same inputs is kept and its summary returned.
    ``figures.results.Shift.read(cfg.out)`` reads the output back with shift.csv as a frame; ``shift(**options)``
    takes the command's options as keywords and returns it so. Bad input raises ``probe.errors.BadInput``."""
    check_output(cfg.out, cfg.overwrite, COMMAND, lambda: shift_request(cfg))
    if not cfg.models:
        raise BadInput("--models: give at least one model")
    with ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(cfg.base, cfg.allow_bin))
        models = [stack.enter_context(open_checkpoint(m, cfg.allow_bin)) for m in cfg.models]
        check_inputs_and_out(cfg.out, models, [base])
        check_replaceable(cfg.out, cfg.overwrite, COMMAND)
        reserve_descriptors([base, *models])
        rows, al = compute_shift(base, models, cfg.models)
        summary = {
            "base": checkpoint_entry(base, cfg.base, al, 0),
            "models": [checkpoint_entry(m, m.name, al, j) for j, m in enumerate(models, start=1)],
            "per_model": summarize(rows, cfg.models),
            "vocab": al.vocab,
            "lm_head": al.head,
            "formula": "delta_avg = mean |theta_base - theta_model| per tensor (Eq. 3), fp32",
        }
    with atomic_dir(cfg.out, cfg.overwrite, COMMAND, shift_request(cfg)) as tmp:
        write_csv(tmp / "shift.csv", rows)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        if cfg.figures:
            from figures.shift import draw_shift

            draw_shift(tmp)
    for nm, v in summary["per_model"].items():
        ratio = v["ratio_to_least_shifted"]
        print(f"{nm}: mean Δavg {v['mean_delta_avg']:.3g} "
              + (f"({ratio:.2f}x least shifted)" if ratio is not None else "(no ratio: a model did not move)"))
    if al.vocab:
        print(f"vocabulary sizes differ: {json.dumps(al.vocab)}", file=sys.stderr)
    if al.head:
        print(f"tied and untied lm_heads: {al.head['rule']}", file=sys.stderr)
    print(results_line(cfg.out, "shift"))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="python -m analyses.shift",
        examples=["python -m analyses.shift --base organism-base --models organism-vl organism-ov-si organism-video --out runs/shift",
                  "python -m figures shift runs/shift     # redraw the figures from the saved files"],
        description="Per-tensor parameter shift of modality-extended LLMs from their base (paper Eq. 3). Writes "
        "OUT/shift.csv (one row per model and LM tensor), summary.json (per model: mean Δavg, its ratio to the least "
        "shifted) and, unless --no-figures, shift_heatmap_<model> and shift_models (png/pdf).",
    )
    p.add_argument("--base", required=True, help="base LLM: local HF dir or alias (e.g. qwen2)")
    p.add_argument("--models", nargs="+", required=True, help="modality-extended models (dirs or aliases)")
    add_output_args(p, "output dir (shift.csv, summary.json, figures)")
    return p


def config(a: argparse.Namespace) -> ShiftConfig:
    """The ShiftConfig of parsed arguments (``build_parser``'s): the command line's and ``shift(**options)``'s."""
    return ShiftConfig(a.base, a.models, a.out, a.overwrite, a.allow_bin, not a.no_figures)


@says_out_of_memory(TENSOR_MEMORY_HINT)
def shift(**options: Any) -> Any:
    """The shift analysis from Python, e.g. ``shift(base="organism-base", models=["organism-vl", "organism-video"],
    out="runs/shift")``: the options of ``python -m analyses.shift --help`` as keywords (a list for several values,
    True for a flag: ``no_figures=True``). An output already finished with the same inputs is kept, as the command
    does. Returns the output read back, a ``figures.results.Shift`` (``.table``, ``.summary``, ``.per_model``); a
    refused value raises ``probe.errors.BadInput``, an unknown keyword ``TypeError``."""
    from figures.results import Shift

    a = parse_options(build_parser(), options)
    with quiet_progress(a.quiet):
        run_shift(config(a))
    return Shift.read(a.out)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    with quiet_progress(a.quiet):
        run_shift(config(a))
    return 0


main.memory_hint = TENSOR_MEMORY_HINT  # type: ignore[attr-defined]  # read by cli_main


if __name__ == "__main__":
    sys.exit(cli_main(main))
