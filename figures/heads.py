"""Layer × head heatmaps of a head sweep, drawn only from DIR/heads.csv and DIR/baseline.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from figures import (NBSP, PAGE_HEIGHT, PAGE_WIDTH, UNIT, drawn_as_written, fill_lines, fit_bar_labels, label_step,
                     new_subplots, number, read_json, read_once, read_table, save_figure)
from probe.errors import BadInput
from probe.results import HEAD_METRIC_BOUNDS

PANELS = {  # accuracies on a two-sided map centred on the unmasked baseline: red below it (a drop), blue above
    "accuracy": ("Accuracy with head masked", "RdBu"),
    "prob_accuracy": ("Probability accuracy with head masked", "RdBu"),
    "kl": ("KL(orig ‖ masked) over option letters [nats]", "magma_r"),
}


def kl_limit(values: np.ndarray) -> tuple[float, bool]:
    """Top of a colour scale of non-negative values (KL, or distances from a baseline), and whether it clips: on a
    large grid (> 100 heads) one outlier head would wash the rest out, so the scale stops at the 99th percentile
    when the maximum is over twice that (the colour bar's arrow says so); small grids show their maximum. A grid
    of zeros (no head moved anything) gets a scale up to 1, not one of 1e-9 units whose bar read "0.0 ... 1.0 1e-9"."""
    v = values[np.isfinite(values)]
    top = float(v.max()) if v.size else 0.0
    if top <= 0:
        return 1.0, False
    if v.size > 100 and top > 2 * (p99 := float(np.percentile(v, 99))) and p99 > 0:
        return p99, True
    return top, False


def centred_limits(values: np.ndarray, centre: float) -> tuple[float, float, bool]:
    """Colour limits symmetric about ``centre`` (the baseline), so a drop of a few points shows on a 7B model's grid
    instead of vanishing in a fixed 0-100 % scale; they cover every value but one or two outlier heads of a large
    grid (``kl_limit`` of the distances: a head that collapses accuracy would otherwise bleach the rest).
    Returns (low, high, clipped)."""
    half, clipped = kl_limit(np.abs(values - centre))
    half = max(half, 0.1)
    return centre - half, centre + half, clipped


def extend_for(values: np.ndarray, vmin: float, vmax: float) -> str:
    """The colour bar's arrows: on the side(s) where some value lies past the scale."""
    v = values[np.isfinite(values)]
    low, high = bool(v.size and v.min() < vmin), bool(v.size and v.max() > vmax)
    return "both" if low and high else "min" if low else "max" if high else "neither"


def clip_note(values: np.ndarray, vmin: float, vmax: float, spec: str, unit: str = "") -> str:
    """What a clipped colour scale hides, for its label: how many heads lie past it and the farthest value (an
    outlier head's magnitude is itself a finding: a sink head at 3 nats against the rest's 0.05), formatted by
    ``spec`` (figures.number: its minus sign as the bar's tick labels draw theirs) and followed by ``unit``."""
    v = values[np.isfinite(values)]
    past = v[(v < vmin) | (v > vmax)]
    if not past.size:
        return ""
    far = past[np.argmax(np.abs(past - (vmin + vmax) / 2))]
    return f"\n(scale clipped at the 99th percentile; {past.size} past it, up to {number(far, spec)}{unit})"


CELLS_LEFT_OUT = "(numbers too small for the cells: the colour bar gives them)"  # the x-label's second line


def fit_cell_texts(ax: Any, cells: list[tuple[Any, float]], formats: list[str], shape: tuple[int, int],
                   pad: float = 1.0) -> bool:
    """Each (text, value) of ``cells`` printed in its heatmap cell in the first of ``formats`` (format specs, through
    figures.number) whose every text
    fits its cell (``pad`` points to spare each side) at the figure's present layout, so call it after
    ``tight_layout``; where none fits, the texts are removed and the colours alone give the values (returns False,
    for the caller to say so: blank cells beside maps that print theirs looked like missing values). Where no
    format fits flat, each is tried turned 90° (tall narrow cells). Chosen once for the whole map, so every cell
    reads alike. A one-layer sweep of a 28-head model has 0.19 in cells: its KL
    values ran together ("0.0330.5401.826"), as did a single head's over 100 layers."""
    fig = ax.figure
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    room_w = frame.width / shape[1] - 2 * pad * fig.dpi / 72
    room_h = frame.height / shape[0] - 2 * pad * fig.dpi / 72
    # flat first; then turned 90°, for cells much taller than wide (a one-layer sweep's 28 heads: 0.19 in × 2 in)
    for rotation in (0, 90):
        for fmt in formats:
            for t, v in cells:
                t.set_text(number(v, fmt))
                t.set_rotation(rotation)
            boxes = [t.get_window_extent(renderer) for t, _ in cells]
            if all(b.width <= room_w and b.height <= room_h for b in boxes):
                return True
    for t, _ in cells:
        t.remove()
    return False


def on_page(fig: Any, text: Any) -> bool:
    """Whether ``text`` lies within ``fig``'s edges at its present layout (saved without cropping, a figure cuts
    what sticks out)."""
    fig.draw_without_rendering()
    box = text.get_window_extent(fig.canvas.get_renderer())
    return fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1


def _grid(heads: pd.DataFrame, metric: str) -> tuple[np.ndarray, list[int], list[int]]:
    layers = sorted(heads["layer"].unique())
    cols = sorted(heads["head"].unique())
    grid = np.full((len(layers), len(cols)), np.nan)
    li = {l: i for i, l in enumerate(layers)}
    hi = {h: i for i, h in enumerate(cols)}
    for r in heads.itertuples():
        grid[li[r.layer], hi[r.head]] = getattr(r, metric)
    return grid, layers, cols


@drawn_as_written
def draw_metric(heads: pd.DataFrame, baseline: dict, metric: str, out_stem: Path, label: str = "") -> None:
    grid, layers, cols = _grid(heads, metric)
    title, cmap = PANELS[metric]
    scale = 1.0 if metric == "kl" else 100.0  # accuracies drawn in %, as eval and the README give them
    grid = grid * scale
    n_l, n_h = grid.shape
    # a page-wide figure at most (7 in × 9 in), so its 7-9 pt text stays that size in a paper: 8 heads get 0.65 in
    # cells, a 7B grid (28 × 28) 0.19 in cells, a 72B one (80 × 64) 0.08 in cells with every other label
    cell = min(0.7 if max(n_l, n_h) <= 12 else 0.32, (PAGE_WIDTH - 1.8) / n_h, (PAGE_HEIGHT - 1.2) / n_l)
    fig, ax = new_subplots(figsize=(max(4.5, 1.8 + cell * n_h), max(3.5, 1.2 + cell * n_l)), dpi=150)
    base = baseline.get(metric)
    centred = metric != "kl" and isinstance(base, (int, float)) and np.isfinite(base)
    base = base * scale if centred else base
    clipped = False
    if metric == "kl":
        (vmax, clipped), vmin = kl_limit(grid), 0.0
    elif centred:
        vmin, vmax, clipped = centred_limits(grid, float(base))
    else:
        vmin, vmax = 0.0, 100.0
    im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, extend=extend_for(grid, vmin, vmax))
    spec = (".3g", "") if metric == "kl" else (".1f", " %")  # the value, its unit
    note = clip_note(grid, vmin, vmax, *spec) if clipped else ""
    cbar.set_label("KL [nats]" + note if metric == "kl"
                   else metric.replace("_", " ") + f" [%] (colour centred on the baseline){note}", fontsize=8)
    if centred:
        v = grid[np.isfinite(grid)]  # the bar spans the values there are (the symmetric scale may pass 0 or 1)
        lo = max(min(float(v.min()) if v.size else base, base), vmin)
        hi = min(max(float(v.max()) if v.size else base, base), vmax)
        if lo < hi:  # else no head moved it: the whole symmetric bar stays
            cbar.ax.set_ylim(lo, hi)
        cbar.ax.axhline(base, color="black", linewidth=2)  # where the unmasked model sits
    step = label_step(cell)  # tick labels at least 0.15 in apart
    ax.set_yticks(range(0, n_l, step), [str(l) for l in layers[::step]], fontsize=7)
    ax.set_xticks(range(0, n_h, step), [str(h) for h in cols[::step]], fontsize=7)
    ax.set_xlabel("query head", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    cells: list[tuple[Any, float]] = []  # (text, value) of each cell that prints its value
    if n_l * n_h <= 100:  # small grids: print the values in the cells
        # one decimal where it fits: whole percents showed 44.5 as "44" and 12.5 (of 16 items) as "12"
        formats = [".3f", ".2f"] if metric == "kl" else [".1f", ".0f"] if cell >= 0.45 else [".0f"]
        for i in range(n_l):
            for j in range(n_h):
                if np.isfinite(grid[i, j]):
                    r, g, b, _ = im.cmap(im.norm(grid[i, j]))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # text colour by cell luminance
                    cells.append((ax.text(j, i, number(grid[i, j], formats[0]), ha="center", va="center", fontsize=7,
                                          color="white" if dark else "black"), float(grid[i, j])))
    # no-break spaces keep each value with its unit when the title wraps ("(n=64" over "items)")
    base_pct = number(100 * baseline.get(metric, float("nan")), ".1f")
    base_txt = "" if metric == "kl" else f" — baseline {base_pct}{NBSP}%"
    n = baseline.get("n_items", "?")
    # lines wrapped to the figure (about 14 characters an inch at 9 pt): a narrow grid (SmolLM2's 9 heads, 4.5 in)
    # cut a long model path and data set off at both edges
    chars = int(14 * fig.get_figwidth())
    text = f"{title}{base_txt}\n{label} (n={n}{NBSP}items)".strip()
    ax.set_title(fill_lines(text, chars), fontsize=9)

    def lay_out_page() -> None:
        fig.tight_layout()
        if fit_bar_labels(fig):  # a tall grid's bar (20 times as high as wide) is shorter than its label
            fig.tight_layout()

    lay_out_page()
    # measured: 14 characters an inch is a guess, and the title is centred over the map, left of the figure's
    # centre (beside the colour bar): "Qwen/Qwen2-VL-72B-Instruct on image, train split (n=64 items)", 62
    # characters over a 4.5 in figure, ran past its left edge
    while chars > 20 and not on_page(fig, ax.title):
        chars -= 2
        ax.set_title(fill_lines(text, chars), fontsize=9)
        lay_out_page()
    if cells and not fit_cell_texts(ax, cells, formats, grid.shape):
        ax.set_xlabel(f"query head\n{CELLS_LEFT_OUT}", fontsize=8)
        lay_out_page()  # again, for the taller label
    for ext in ("png", "pdf"):
        save_figure(fig, out_stem.with_suffix(f".{ext}"))


# probe.heads writes every column (accuracy empty throughout when nothing was generated): one lost from the file
# would leave that heatmap out, its old one beside the new ones
SWEEP_METRICS = dict.fromkeys([*PANELS, "accuracy_drop", "prob_accuracy_drop"], float)


def read_sweep(run_dir: Path, need: tuple[str, ...] = ()) -> tuple[pd.DataFrame, dict]:
    """heads.csv (with the columns ``need``) and baseline.json of a finished head sweep, checked: BadInput naming
    the file otherwise."""
    # a column every sweep has anyway needs no asking: the same file read once per report build whatever is needed
    return _read_sweep(Path(run_dir), tuple(dict.fromkeys(c for c in need if c not in SWEEP_METRICS)))


@read_once  # a report build asks each sweep 3 to 4 times (tables, findings, Figure 2)
def _read_sweep(run_dir: Path, need: tuple[str, ...]) -> tuple[pd.DataFrame, dict]:
    source = "python -m probe.heads"
    metrics = SWEEP_METRICS
    columns = {"layer": int, "head": int, **metrics, **dict.fromkeys(need, float)}
    heads = read_table(run_dir / "heads.csv", columns, {"n_items": int}, source,
                       bounds={"accuracy": UNIT, "prob_accuracy": UNIT, **HEAD_METRIC_BOUNDS}, finite=list(metrics))
    baseline = read_json(run_dir / "baseline.json", source)
    if "accuracy" in baseline and baseline["accuracy"] is None:  # nothing generated (--no-generate, attribution)
        baseline["accuracy"] = float("nan")
    for key in ("accuracy", "prob_accuracy", "n_items"):
        v = baseline.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadInput(f"{run_dir / 'baseline.json'}: {key} is {v!r}, not a number")
        if key != "n_items" and not (UNIT[0] <= v <= UNIT[1] or np.isnan(v)):  # as heads.csv's: a rate
            raise BadInput(f"{run_dir / 'baseline.json'}: {key} is {v:g}, not in [{UNIT[0]:g}, {UNIT[1]:g}]")
    check_one_run(run_dir, heads, baseline)
    return heads, baseline


def check_one_run(run_dir: Path, heads: pd.DataFrame, baseline: dict) -> None:
    """heads.csv and baseline.json of one sweep: one row per head, each over the baseline's items, its drops from
    the baseline's values (probe.results.summarize). Files of two runs, or two runs' rows in one file, would draw a
    grid whose cells overwrite each other, or colours centred on another run's baseline."""
    if (twice := heads.duplicated(["layer", "head"])).any():
        i = int(twice.to_numpy().argmax())
        raise BadInput(f"{run_dir / 'heads.csv'}: line {i + 2} repeats layer {heads['layer'].iloc[i]} head "
                       f"{heads['head'].iloc[i]} (rows of two runs?)")
    # a sweep covers every swept layer × every swept head (--layers, --heads): a row lost from a cut or edited file
    # would be a blank cell, as if the head had no value
    swept = pd.MultiIndex.from_product([sorted(heads["layer"].unique()), sorted(heads["head"].unique())])
    if len(lost := swept.difference(pd.MultiIndex.from_frame(heads[["layer", "head"]]))):
        raise BadInput(f"{run_dir / 'heads.csv'}: no row for layer {lost[0][0]} head {lost[0][1]} "
                       f"({len(lost)} of the swept {len(swept)} heads missing: a cut file?)")
    expected = {"n_items": pd.Series(float(baseline["n_items"]), index=heads.index)} | {
        f"{m}_drop": baseline[m] - heads[m] for m in ("accuracy", "prob_accuracy") if m in heads}
    for col, want in expected.items():
        if col not in heads:
            continue
        saved = heads[col]
        # a drop missing where its value and the baseline's are not (or there where they are): not this run's
        off = (saved.isna() != want.isna()) | (saved.notna() & want.notna()
                                               & ~np.isclose(saved, want, rtol=0, atol=1e-9))
        if off.any():
            i = int(off.to_numpy().argmax())
            raise BadInput(f"{run_dir}: heads.csv line {i + 2} and baseline.json disagree on {col} ({saved.iloc[i]:g} "
                           f"against {want.iloc[i]:g}): files of different runs")


@drawn_as_written
def draw_heads(run_dir: Path) -> list[Path]:
    """Redraw heatmap_{accuracy,prob_accuracy,kl}.{png,pdf} of a finished sweep."""
    run_dir = Path(run_dir)
    heads, baseline = read_sweep(run_dir)
    label = str(baseline.get("model", ""))
    if baseline.get("data"):  # which items the map is of (a sweep before 2026-12-05 did not record it)
        label += f" on {baseline['data']}" + (f", {baseline['split']} split" if baseline.get("split") else "")
    if baseline.get("approximate"):
        label += " [attribution estimate]"
    shown = [m for m in PANELS if heads[m].notna().any()]  # not accuracy when generation was skipped
    if not shown:
        raise BadInput(f"{run_dir / 'heads.csv'}: no values in any of the columns {', '.join(PANELS)}")
    written = []
    for metric in PANELS:
        stem = run_dir / f"heatmap_{metric}"
        if metric not in shown:  # nor the map an earlier drawing of it left
            for ext in (".png", ".pdf"):
                stem.with_suffix(ext).unlink(missing_ok=True)
            continue
        draw_metric(heads, baseline, metric, stem, label)
        written += [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    return written
