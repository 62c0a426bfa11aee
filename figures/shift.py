"""Figures of ``analyses.shift`` results, drawn only from ``DIR/shift.csv`` (``python -m figures shift DIR``).

- ``shift_heatmap_<model>.{png,pdf}``: layer × module Δavg (Eq. 3), log colour scale, one per model.
- ``shift_models.{png,pdf}``: mean Δavg per model (the paper's comparison) and mean Δavg per layer.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.artist import setp
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from figures import (PAGE_HEIGHT, PAGE_WIDTH, drawn_as_written, fit_page, label_step, name_colours, name_markers,
                     new_subplots, page_panels, plain_log_ticks, read_json, save_figure, separate_labels,
                     spaced_minor_labels, widen_to_hold)
from probe.errors import BadInput

if TYPE_CHECKING:
    import pandas as pd


def short_names(models: list[str]) -> dict[str, str]:
    """Readable, unique labels: each model's last folder name, or its shortest tail that tells it apart
    (probe.results.distinct_names: seed0/mixed, seed1/mixed), so the per-model files differ too."""
    from probe.results import distinct_names

    return dict(zip(models, distinct_names(models)))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def file_slugs(labels: list[str]) -> list[str]:
    """A file name part per label, no two alike even on a case-insensitive disk: ``slug`` alone made 'a b' and
    'a_b' (or any two all-CJK names, or 'VL' and 'vl' on macOS) one file, the later heatmap over the earlier. A
    label whose slug is taken gets _2, _3, … (never another label's own slug)."""
    plain = [slug(x) for x in labels]
    taken = {p.casefold() for p in plain}
    used: set[str] = set()
    out = []
    for p in plain:
        name, k = p, 1
        while name.casefold() in used or (k > 1 and name.casefold() in taken):
            k += 1
            name = f"{p}_{k}"
        used.add(name.casefold())
        out.append(name)
    return out


def number_order(name: str) -> list:
    """Sort key reading digit runs as numbers: experts.2 before experts.10 (pandas' text order put it after 19)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def log_foot(values: np.ndarray) -> float:
    """Where a Δavg of 0 (a tensor, layer or model that did not move: a frozen LM) is drawn on a log axis, which
    has no 0: a third below the smallest positive value, so it sits apart at the foot of the axis."""
    positive = values[values > 0]
    return float(positive.min()) / 3 if len(positive) else 1e-8


def save(fig: Figure, path: Path) -> list[Path]:
    paths = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    fit_page(fig)  # cropped to what is drawn, which may stick out of the figure
    for p in paths:
        save_figure(fig, p, dpi=150, bbox_inches="tight")
    return paths


def check_summary(result_dir: Path, df: "pd.DataFrame") -> dict:
    """shift.csv against the per-model counts summary.json (written with it) records: a row lost from a cut or
    edited file would be a blank cell and a mean over fewer tensors, drawn as if the model had no such tensor.
    Returns summary.json."""
    path = result_dir / "summary.json"
    summary = read_json(path, "python -m analyses.shift")
    per = summary.get("per_model")
    if not isinstance(per, dict):
        raise BadInput(f"{path}: no per_model counts (not as python -m analyses.shift writes it)")
    rows = df.groupby("model", sort=False)["numel"].agg(["size", "sum"])
    for m in dict.fromkeys([*per, *rows.index]):
        want = per.get(m) if isinstance(per.get(m), dict) else {}
        got = rows.loc[m].tolist() if m in rows.index else [0, 0]
        if got != [want.get("n_tensors"), want.get("numel")]:
            raise BadInput(f"{result_dir / 'shift.csv'}: {got[0]} tensors of {got[1]} weights for model {m}, where "
                           f"summary.json records {want.get('n_tensors')} of {want.get('numel')} (a cut or edited "
                           "file, or files of two runs?)")
    return summary


def read_shift(result_dir: Path) -> tuple["pd.DataFrame", dict]:
    """shift.csv (read and checked by ``analyses.shift_csv.read_shift_csv``) and summary.json of a finished shift
    output, checked against each other: BadInput naming the file otherwise."""
    from analyses.shift_csv import read_shift_csv

    result_dir = Path(result_dir)
    df = read_shift_csv(result_dir / "shift.csv")
    return df, check_summary(result_dir, df)


def overlapping(texts: list) -> bool:
    """Whether any two of ``texts`` (1 pt apart at least) overlap at the figure's present layout."""
    fig = texts[0].figure
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer).padded(fig.dpi / 72) for t in texts]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def means_panel(ax: Axes, names: list[str], values: np.ndarray, colours: list, across: bool) -> list:
    """Each model's mean Δavg as a dot on a log axis with its number ("0.0015 (1.7×)": k times the least shifted)
    by it: the models along x, each number above its dot, or ``across``, a row per model (its name at the left,
    as in the evaluation figure) and its number right of its dot, for models too many for their numbers to sit
    side by side. A model that did not move (mean 0, which a log axis has not) is an open triangle at the axis'
    foot. Returns the numbers' texts."""
    # dots, not bars: a bar's length on a log axis depends on where the axis starts
    low, foot, n = values.min(), log_foot(values), len(names)
    at = (lambda i, v: (v, n - 1 - i)) if across else (lambda i, v: (i, v))
    for i, (v, c) in enumerate(zip(values, colours)):
        if v > 0:
            ax.plot(*at(i, v), "o", color=c, ms=7)
        else:
            ax.plot(*at(i, foot), "<" if across else "v", color=c, mfc="none", ms=7)
    (ax.set_yticks if across else ax.set_xticks)(range(n)[::-1] if across else range(n), names)
    (ax.set_ylim if across else ax.set_xlim)(-0.6, n - 0.4)
    ax.grid(axis="x" if across else "y", which="both", alpha=0.3)
    (ax.set_xscale if across else ax.set_yscale)("log")
    plain_log_ticks(ax.xaxis if across else ax.yaxis)
    (ax.set_xlabel if across else ax.set_ylabel)("mean Δavg over tensors (log)", fontsize=8)
    foot_mark = "◁ at the left" if across else "▽ at the foot"
    ratio = low > 0 and n > 1  # one model's "(1.0×)" against itself says nothing
    ax.set_title("parameter shift from the base (Eq. 3)" + (";\n(k×): k times the least shifted" if ratio else
                 "" if low > 0 else f";\n{foot_mark}: 0, did not move (no k× ratio)"), fontsize=9)
    texts = []
    for i, v in enumerate(values):
        text = f"{v:.2g}" + (f" ({v / low:.1f}×)" if ratio else "") if v > 0 else "0 (did not move)"
        texts.append(ax.annotate(text, at(i, v if v > 0 else foot), xytext=(7, 0) if across else (0, 7),
                                 textcoords="offset points", ha="left" if across else "center",
                                 va="center" if across else "bottom", fontsize=8))
    # room for the numbers: above the dots, or right of them (widen_to_hold grows it to hold each)
    top = values.max() * 4 if low > 0 else max(values.max(), foot) * 4
    (ax.set_xlim if across else ax.set_ylim)(low / 3 if low > 0 else foot / 1.5, top)
    if not across:  # slanted, each ending under its dot: centred at 20° long names ran into each other
        setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    ax.tick_params(which="both", labelsize=7)
    ax.tick_params(axis="y" if across else "x", labelsize=8)  # the models' names, as in the evaluation figure
    return texts


@drawn_as_written
def draw_shift(result_dir: Path) -> list[Path]:
    result_dir = Path(result_dir)
    df, _ = read_shift(result_dir)
    models = list(dict.fromkeys(df["model"]))
    labels = short_names(models)
    files = dict(zip(models, file_slugs([labels[m] for m in models])))
    written: list[Path] = []
    layer_df = df.dropna(subset=["layer"]).copy()
    layer_df["layer"] = layer_df["layer"].astype(int)
    positive = df["delta_avg"][df["delta_avg"] > 0]
    vmin, vmax = (positive.min(), positive.max()) if len(positive) else (1e-8, 1.0)
    for m in models:
        sub = layer_df[layer_df["model"] == m]
        if sub.empty:
            continue
        grid = sub.pivot_table(index="layer", columns="module", values="delta_avg", aggfunc="first")
        grid = grid[sorted(grid.columns, key=number_order)]
        n_l, n_m = grid.shape
        names = [c.replace(".weight", ".w").replace(".bias", ".b") for c in grid.columns]
        below = min(3.0, 0.05 * max(map(len, names)))  # inches the module names (7 pt, rotated 60°) hang down
        # a page at most, module names and title included: a 28-layer model with 12 tensors a layer gets
        # 0.42 × 0.22 in cells, an 80-layer one 0.09 in rows with every other layer labelled
        cell_w, cell_h = min(0.45, (PAGE_WIDTH - 2) / n_m), min(0.22, (PAGE_HEIGHT - 1.5 - below) / n_l)
        fig, ax = new_subplots(figsize=(max(6, cell_w * n_m + 2), max(3, cell_h * n_l + 1.5) + below))
        values = grid.to_numpy(dtype=float)
        zero = values == 0  # unchanged tensors: the map's "under" grey; a missing tensor (NaN) stays blank
        data = np.where(zero, vmin / 10, values)
        cmap = matplotlib.colormaps["viridis"].with_extremes(under="0.75")
        im = ax.imshow(data, aspect="auto", cmap=cmap, norm=LogNorm(vmin=vmin, vmax=max(vmax, vmin * 1.01)))
        across, down = label_step(cell_w), label_step(cell_h)
        ax.set_xticks(range(0, n_m, across), names[::across], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(0, n_l, down), grid.index[::down], fontsize=7)
        ax.set_xlabel("module" + ("  (grey: Δavg = 0, unchanged)" if zero.any() else ""), fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_title(f"Δavg = mean |θ_base − θ| per tensor (Eq. 3): {labels[m]}", fontsize=9)
        cbar = fig.colorbar(im, ax=ax)
        plain_log_ticks(cbar)
        cbar.set_label("Δavg (log)", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
        fig.tight_layout()  # the rotated module names inside the figure, not past its edge
        written += save(fig, result_dir / f"shift_heatmap_{files[m]}")
    # side by side while each model's label and number keep about an inch, else one above the other
    fig, panels = page_panels(2, 5.5, 3.8, min_width=max(3.3, 0.6 + 0.9 * len(models)))
    (ax1,), (ax2,) = panels
    means = df.groupby("model", sort=False)["delta_avg"].mean().reindex(models)
    m_values = means.to_numpy()
    colour = name_colours(models)  # a model's colour in both panels, as in the evaluation figure
    names = [labels[m] for m in models]
    values = means_panel(ax1, names, m_values, [colour[m] for m in models], across=False)
    per_layer = {m: layer_df[layer_df["model"] == m].groupby("layer")["delta_avg"].mean() for m in models}
    layer_foot = log_foot(np.concatenate([s.to_numpy() for s in per_layer.values()] or [np.zeros(0)]))
    frozen = False
    marker = name_markers(models)  # a model's line told by its marker too (olive and green look alike to many)
    lines = []  # the legend's, handed to it: it leaves out a line whose label starts with '_' (a folder '_scratch')
    for m, s in per_layer.items():  # a layer that did not move: at the foot, an open triangle, not a gap
        y, z = s.to_numpy(), s.to_numpy() == 0
        line, = ax2.plot(s.index, np.where(z, layer_foot, y), marker=marker[m], ms=4, color=colour[m],
                         label=labels[m])
        lines.append(line)
        if z.any():
            frozen = True
            ax2.plot(s.index[z], np.full(z.sum(), layer_foot), "v", ms=5, mfc="white", color=line.get_color())
    ax2.set_yscale("log")
    plain_log_ticks(ax2.yaxis)
    ax2.set_xlabel("layer", fontsize=8)
    ax2.set_ylabel("mean Δavg over the layer's tensors", fontsize=8)
    ax2.set_title("shift by depth" + ("\n▽ at the foot: 0, did not move" if frozen else ""), fontsize=9)
    # below the panel: inside it ("best") the legend covered lines whenever the layers' curves filled the panel
    wide = max(len(labels[m]) for m in models) > 20  # long names one per line
    ax2.legend(lines, [labels[m] for m in per_layer], fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1 if wide else min(3, len(models)),
               frameon=False)
    ax2.xaxis.get_major_locator().set_params(integer=True)
    layers = sorted(layer_df["layer"].unique())
    if len(layers) == 1:  # one layer: whole-numbered ticks around it, not -0.050 ... 0.050
        ax2.set_xlim(layers[0] - 1, layers[0] + 1)
    ax2.tick_params(which="both", labelsize=7)
    fig.tight_layout(w_pad=3)
    fit_page(fig)  # the size it is saved at, where the numbers are placed
    # many models: numbers that run into each other where they are ("0.0018 (1.4×)" over its neighbours' with 8
    # models; separating them stacked them far above their dots) have their ratios on a second line, every model's
    widen_to_hold(ax1, values)  # a number over the first or last dot ran onto the panel's frame
    across = False
    if overlapping(values):
        for t in values:
            t.set_text(t.get_text().replace(" (", "\n("))
        if across := overlapping(values):  # still (12 models, 0.37 in apart): a row per model, its number beside it
            ax1.clear()
            values = means_panel(ax1, names, m_values, [colour[m] for m in models], across=True)
            fig.tight_layout(w_pad=3)
            fit_page(fig)
            widen_to_hold(ax1, values)
            spaced_minor_labels(ax1)
    if not across:  # (across, each number is on its model's row)
        separate_labels(values, sides=(1,))  # models that shifted alike (0.00076 and 0.0007): one above the other
    written += save(fig, result_dir / "shift_models")
    return written


draw = draw_shift
