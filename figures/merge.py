"""What a salience-guided merge gave each participant, drawn only from DIR/merge_weights.csv and DIR/merge.json
(``python -m figures merge DIR``): per participant a layer × head heatmap of the weight its q_proj/o_proj head
slices received, beside the salience heatmap of its probe.heads run (when that run is still on disk)."""
from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.merge_methods import COMMAND, METHOD_KINDS, WEIGHTS_HEADER, run_fingerprint
from figures import (PAGE_HEIGHT, PAGE_WIDTH, bar_aspect, cells_per_page, drawn_as_written,
                     drop_stale_pages, even_pages, fit_bar_labels, fit_stack_gaps, heatmap_ticks, heatmap_ticks_again,
                     keep_titles_apart, page_caption, page_grid, page_panels, page_stem, read_json, read_table,
                     save_png_pdf, stacked_maps_height)
from figures.heads import centred_limits, clip_note, extend_for, kl_limit
from probe.errors import BadInput, error_reason
from probe.results import HEAD_METRIC_BOUNDS
from probe.results import distinct_names, read_manifest

# inches: a participant's column of two heatmaps at its narrowest, and the figure's margin (colour bar labels,
# suptitle)
MIN_WIDTH, MARGIN = 2.1, (2.4, 0.4)
# a page of 5 or 6 participants goes 2 rows × 3 columns, each this narrow beside this margin (3 rows × 2 left each
# heatmap 0.75 in high); up to 4 it stays 2 × 2
NARROW, NARROW_MARGIN = 1.9, (1.2, 0.4)
# inches: a participant's column (width, height) where the page has room; what of it is not its maps (across: layer
# labels, colour bar and its label; down: titles, tick and head labels), as laid out on pages of 80 × 64 grids in 2
# and 3 columns; a map's height in a column COLUMN[1] high (up to 38 layers it holds them)
COLUMN, TEXT = (2.6, 5.2), (1.45, 1.4)
MAP = (COLUMN[1] - TEXT[1]) / 2
MOST = 6  # participants a page holds at the most (2 rows × 3 columns)
Q_SLICE = re.compile(r"layers\.(\d+)\.self_attn\.q_proj\.weight$")
# before 2026-12-06 merge_weights.csv held one "alpha" column (ties: the trim threshold, every other method: the weight)
# and merge.json its mean per model as "mean_alpha"; such a merge is read as if written with today's columns
LEGACY_COLUMN, LEGACY_MEAN = "alpha", "mean_alpha"


def head_weights(rows: pd.DataFrame, source: object = "merge_weights.csv") -> dict[str, np.ndarray]:
    """participant → [n_layers, n_heads] weight of its query-head slices, checked: head-aligned slices of one
    width, each once, every head of every layer, a weight in [0, 1] (a cut, edited or mixed file otherwise)."""
    q = rows[rows["tensor"].str.match(Q_SLICE.pattern) & rows["slice"].str.startswith("rows ")].copy()
    if q.empty:
        raise BadInput(f"{source} has no per-head slices (only --method salience writes them)")
    q["layer"] = q["tensor"].str.extract(Q_SLICE.pattern)[0].astype(int)
    bounds = q["slice"].str.extract(r"^rows (\d+):(\d+)$")
    if (bad := bounds.isna().any(axis=1) | (bounds[1].astype(float) <= bounds[0].astype(float))).any():
        raise BadInput(f"{source}: slice {q['slice'][bad].iloc[0]!r} of {q['tensor'][bad].iloc[0]} is not "
                       "'rows START:END'")
    bounds = bounds.astype(int)
    width = bounds[1] - bounds[0]
    # a head's slice is rows h·d : (h+1)·d; any other (rows 16:40) would be drawn as some head it is not
    if (off := (width != width.iloc[0]) | (bounds[0] % width != 0)).any():
        i = off.to_numpy().argmax()
        raise BadInput(f"{source}: line {q.index[i] + 2}: slice {q['slice'].iloc[i]!r} of {q['tensor'].iloc[i]} is not "
                       f"one head's rows (head slices are {int(width.iloc[0])} rows from a multiple of that)")
    q["head"] = bounds[0] // width
    if (twice := q.duplicated(["model", "layer", "head"])).any():
        i = twice.to_numpy().argmax()
        raise BadInput(f"{source}: line {q.index[i] + 2} repeats {q['slice'].iloc[i]} of {q['tensor'].iloc[i]} for "
                       f"{q['model'].iloc[i]}")
    if (out := ~q["weight"].between(0.0, 1.0)).any():  # NaN too: a convex weight, never drawn clipped or blank
        i = out.to_numpy().argmax()
        raise BadInput(f"{source}: line {q.index[i] + 2}: weight {q['weight'].iloc[i]:g} of a head slice is not a "
                       "weight in [0, 1]")
    n_layers, n_heads = q["layer"].max() + 1, q["head"].max() + 1
    out_grids = {}
    for model, g in q.groupby("model", sort=False):
        grid = np.full((n_layers, n_heads), np.nan)
        grid[g["layer"], g["head"]] = g["weight"]
        if np.isnan(grid).any():
            layer, head = np.argwhere(np.isnan(grid))[0]
            raise BadInput(f"{source}: no weight of layer {layer} head {head} for {model} (a cut file?)")
        out_grids[model] = grid
    return out_grids


def check_weights(path: Path, rows: pd.DataFrame, info: dict, legacy: bool = False) -> None:
    """Every row of merge_weights.csv against merge.json (analyses.merge writes both; ``rows`` and ``info`` as
    ``merge_files`` reads them): per tensor (or slice) one finite weight for each participant the method weights
    (ties: a trim threshold ≥ 0 instead, and no weight), the other column empty, and for the convex methods a
    weight in [0, 1], the participants' summing to 1 (task arithmetic's are affine); the tensors and each model's
    mean as merge.json records them. A cut, edited or mixed file is refused by its line; ``legacy``: the file's one
    column is named "alpha" in what the refusal says."""
    method, normalize = info.get("method"), info.get("normalize")
    models, ref = info.get("models"), info.get("reference")
    if not isinstance(method, str) or method not in METHOD_KINDS:
        raise BadInput(f"{path.parent / 'merge.json'}: method {method!r} is not one of {', '.join(METHOD_KINDS)}")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in [ref, *models]):
        raise BadInput(f"{path.parent / 'merge.json'}: no models and reference (not as python -m analyses.merge "
                       "writes it)")
    kind = METHOD_KINDS[method]
    want = sorted([ref, *models] if kind.base_row and ref is not None else models)
    convex = kind.convex and normalize is not False  # merge.json's normalize is false only for --no-normalize
    # the column this method fills, the one it leaves empty, and what a refusal calls the first
    col, empty = ("trim_threshold", "weight") if kind.trims else ("weight", "trim_threshold")
    name = LEGACY_COLUMN if legacy else col

    def refuse(bad: pd.Series, why: str) -> None:
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise BadInput(f"{path}: line {i + 2}: {why} ({rows['model'].iloc[i]}, {rows['tensor'].iloc[i]} "
                           f"{rows['slice'].iloc[i]}, {name} {rows[col].iloc[i]:g})")

    value = rows[col]
    refuse(~np.isfinite(value), f"{name} must be a finite number")
    refuse(rows[empty].notna(), f"a {method} merge has no {empty.replace('_', ' ')}: its {empty} must be empty")
    refuse(~value.between(0.0, 1.0) & convex, f"{name} of a {method} merge must be a weight in [0, 1]")
    refuse((value < 0) & kind.trims, f"a {method} trim threshold must be ≥ 0")
    refuse(~rows["model"].isin(want), f"a model that is not one of the merge's ({', '.join(want)})")
    refuse(rows.duplicated(["tensor", "slice", "model"]), f"repeats a model's {name} of this tensor slice")
    groups = rows.groupby(["tensor", "slice"], sort=False)
    lost = groups["model"].transform("size") != len(want)
    refuse(lost, f"its tensor slice lacks a row of one of the {len(want)} participants (a cut file?)")
    if convex:
        refuse((groups[col].transform("sum") - 1.0).abs() > 1e-6,
               f"the participants' {name}s of this tensor slice do not sum to 1")
    n, recorded = rows["tensor"].nunique(), info.get("n_tensors")
    key = LEGACY_MEAN if legacy else f"mean_{col}"
    means, mean = rows.groupby("model")[col].mean(), info.get(f"mean_{col}")
    if n != recorded or not isinstance(mean, dict) or set(mean) != set(means.index) or not all(
            isinstance(mean[m], (int, float)) and np.isclose(v, mean[m], rtol=1e-9, atol=1e-12)
            for m, v in means.items()):
        raise BadInput(f"{path}: {n} tensors and mean {name}s {means.round(6).to_dict()}, where merge.json records "
                       f"{recorded} and {key} {mean} (a cut or edited file, or files of two merges?)")


def _salience_grid(run_dir: Path, metric: str, shape: tuple[int, int], table: bytes | None = None) -> np.ndarray | None:
    """The ``metric`` grid of a salience run (None when it is gone), which must be what the merge weighted by: one
    value for each head of the merged grid's ``shape`` (analyses.salience.read_salience refused anything else).
    ``table``: its heads.csv as ``read_heads`` read it (else the file is read here)."""
    csv = run_dir / "heads.csv"
    if table is None and not csv.is_file():
        return None
    df = read_table(csv, {"layer": int, "head": int, metric: float}, source="python -m probe.heads",
                    bounds={"kl": HEAD_METRIC_BOUNDS["kl"]}, data=table)
    cells = set(zip(df["layer"], df["head"]))
    if len(df) != shape[0] * shape[1] or cells != {(l, h) for l in range(shape[0]) for h in range(shape[1])} \
            or df[metric].isna().any():
        raise BadInput(f"{csv}: not the salience run this merge used ({len(cells)} heads with a {metric}, the merge "
                       f"weighted {shape[0]} layers x {shape[1]} heads)")
    grid = np.empty(shape)
    grid[df["layer"], df["head"]] = df[metric]
    return grid


def moved_run(run: str | None, result_dir: Path, merged_at: Any, recorded: set[str] | None) -> str | None:
    """A salience run of a merge no longer where it was, at its place relative to the merge's dir now when it is
    there: merge and runs moved together (``cp -r`` or ``mv`` of an analyses.replicate run, whose salience panels
    showed "salience run not found"): when the run is gone from where the merge read it, or (a copy) the one there
    is the run read. ``merged_at``: where the merge was (merge.json's ``resolved_out``; older merges lack it:
    ``replicate_run_place``). ``check_runs_unchanged`` holds the run found to the one the merge read, so only where
    the manifest records what it read (``recorded``: ``recorded_inputs``): without it a run swept again there was
    drawn as the merge's."""
    if run is None or recorded is None:
        return run
    gone = not (Path(run) / "heads.csv").is_file()
    if not isinstance(merged_at, str):
        return replicate_run_place(run, Path(result_dir), recorded) if gone else run
    here = Path(result_dir).resolve()
    there = here / os.path.relpath(run, merged_at)
    if str(here) == merged_at or not (there / "heads.csv").is_file():
        return run
    # a copy (cp -r A B) whose original's runs are still there: the copy's own run when it is the one read, not A's,
    # which a sweep since may have changed (B's drawing was then refused, its runs intact)
    return str(there) if gone or run_fingerprint(there) in recorded else run


def replicate_run_place(run: str, result_dir: Path, recorded: set[str]) -> str:
    """A salience run gone from where a merge that did not record its own place (merge.json without
    ``resolved_out``, before 2026-12-07) read it: where analyses.replicate lays it out (``DIR/heads/<model>``
    beside ``DIR/merge/<method>``, DIR holding replicate.json), when the run there is the one the merge read (its
    fingerprint among those the manifest records: a guess is never drawn as the merge's unless it is). Else
    ``run``, drawn as not found. Such a merge in a moved or copied run drew every panel "salience run not
    found"."""
    home = result_dir.resolve().parent.parent
    there = home / "heads" / Path(run).name
    if not (home / "replicate.json").is_file() or not (there / "heads.csv").is_file():
        return run
    return str(there) if run_fingerprint(there) in recorded else run


def read_heads(runs: list[str]) -> dict[str, bytes | None]:
    """Each salience run's heads.csv, read once (None when it is gone): the bytes fingerprinted
    (``check_runs_unchanged``) are the bytes drawn (``_salience_grid``); each was read twice."""
    tables: dict[str, bytes | None] = {}
    for r in runs:
        path = Path(r) / "heads.csv"
        try:
            tables[r] = path.read_bytes() if path.is_file() else None
        except OSError as exc:
            raise BadInput(f"{path}: not a readable table ({error_reason(exc)})") from None
    return tables


def recorded_inputs(result_dir: Path) -> set[str] | None:
    """The fingerprints of the inputs the merge's manifest records it read; None without that record (a merge
    from before merges kept their request, or its manifest gone)."""
    inputs = ((read_manifest(result_dir) or {}).get("request") or {}).get("inputs")
    return {e[1] for e in inputs if isinstance(e, list) and len(e) == 2} if isinstance(inputs, list) else None


def check_runs_unchanged(result_dir: Path, tables: dict[str, bytes | None], recorded: set[str] | None) -> None:
    """Each salience run drawn beside the weights is still the one the merge weighted by: its fingerprint
    (``run_fingerprint``) is among the inputs the merge's manifest records. A run swept again into its dir since
    (other items, another model) was drawn as if the merge had read it. A merge without that record (one from
    before merges kept their request, or written by hand) is drawn as before. ``tables``: ``read_heads(runs)``;
    ``recorded``: ``recorded_inputs(result_dir)``."""
    if recorded is None:
        return
    for r, table in tables.items():
        if table is not None and run_fingerprint(Path(r), table) not in recorded:  # gone: drawn as such
            raise BadInput(f"salience run {r} changed since the merge {result_dir} read it (its heads.csv or "
                           "run.json differ): its saliences are not what the merge weighted by; rerun the merge "
                           "(python -m analyses.merge ... --overwrite) or draw it with the run it read")


def _trims(info: dict) -> bool:
    """Whether merge.json's method holds trim thresholds where the others hold weights (ties)."""
    method = info.get("method")
    return isinstance(method, str) and method in METHOD_KINDS and METHOD_KINDS[method].trims


def _legacy_info(info: dict) -> bool | None:
    """Whether merge.json is from before 2026-12-06 (``mean_alpha``); None when it holds neither mean."""
    return True if LEGACY_MEAN in info and "mean_weight" not in info else False if "mean_weight" in info else None


def current_info(info: dict) -> dict:
    """merge.json as today's analyses.merge writes it: an older one's ``mean_alpha`` under what it was, the mean
    weight (``mean_weight``) or, for ties, the mean trim threshold (``mean_trim_threshold``), the other null."""
    if not _legacy_info(info):
        return info
    out = {}
    for k, v in info.items():  # in place of mean_alpha, so the keys keep their order
        if k == LEGACY_MEAN:
            out["mean_weight"], out["mean_trim_threshold"] = (None, v) if _trims(info) else (v, None)
        else:
            out[k] = v
    return out


def merge_files(result_dir: Path) -> tuple[Path, pd.DataFrame, dict, bool]:
    """merge_weights.csv's path, its rows (parsed, not yet checked against merge.json) and merge.json, both as
    today's analyses.merge writes them (``WEIGHTS_HEADER``, ``mean_weight``), and whether they were written before
    2026-12-06 (one ``alpha`` column, read as the weight, or for ties as the trim threshold)."""
    source = f"python -m {COMMAND}"
    weights_csv = Path(result_dir) / "merge_weights.csv"
    text = ("tensor", "slice", "model")  # the other columns hold numbers
    numbers = {c: float for c in (*WEIGHTS_HEADER, LEGACY_COLUMN) if c not in text}
    weights = read_table(weights_csv, dict.fromkeys(text, str), numbers, source)
    info = read_json(Path(result_dir) / "merge.json", source)
    legacy = LEGACY_COLUMN in weights.columns and "weight" not in weights.columns
    if not legacy and (lacking := [c for c in ("weight", "trim_threshold") if c not in weights.columns]):
        raise BadInput(f"{weights_csv}: missing column{'s' if len(lacking) > 1 else ''} {', '.join(lacking)} (not as "
                       f"{source} writes it)")
    if _legacy_info(info) not in (None, legacy):  # one file of each age: two merges
        old, new = (weights_csv.name, "merge.json") if legacy else ("merge.json", weights_csv.name)
        raise BadInput(f"{weights_csv.parent}: {old} is as analyses.merge wrote it before 2026-12-06 "
                       f"({LEGACY_COLUMN}), {new} as it writes it since (weight): files of two merges?")
    if legacy:  # its one column where it belongs (tensor, slice, model, delta_avg came first, as today)
        value = weights.pop(LEGACY_COLUMN)
        weights["weight"], weights["trim_threshold"] = (np.nan, value) if _trims(info) else (value, np.nan)
    return weights_csv, weights, current_info(info), legacy


def read_merge(result_dir: Path) -> tuple[pd.DataFrame, dict]:
    """merge_weights.csv and merge.json of a finished merge of any method, checked against each other
    (``check_weights``) and read as today's analyses.merge writes them (``merge_files``): BadInput naming the file
    otherwise."""
    weights_csv, weights, info, legacy = merge_files(result_dir)
    check_weights(weights_csv, weights, info, legacy)
    return weights, info


@drawn_as_written
def draw_merge(result_dir: Path) -> list[Path]:
    result_dir = Path(result_dir)
    weights_csv, weights, info, legacy = merge_files(result_dir)
    grids = head_weights(weights, weights_csv)
    check_weights(weights_csv, weights, info, legacy)
    sal = info.get("salience") or {}
    # the runs as resolved when merged (an older merge.json: as given, relative to the cwd the merge ran in)
    prefix = "resolved_" if isinstance(sal, dict) and "resolved_runs" in sal else ""
    runs = sal.get(f"{prefix}runs", []) if isinstance(sal, dict) else None
    metric = sal.get("metric", "kl") if isinstance(sal, dict) else None
    if isinstance(runs, list):
        runs = [sal.get(f"{prefix}base_run"), *runs]  # the base first, as in merge_weights.csv
    if not isinstance(runs, list) or not isinstance(metric, str) \
            or not all(r is None or isinstance(r, str) for r in runs):
        raise BadInput(f"{result_dir / 'merge.json'}: 'salience' is not a salience merge's record")
    recorded = recorded_inputs(result_dir)  # the manifest, read once: finding moved runs and checking them need it
    runs = [moved_run(r, result_dir, sal.get("resolved_out"), recorded) for r in runs]
    names = list(grids)
    tables = read_heads([r for r in runs if r])
    check_runs_unchanged(result_dir, tables, recorded)
    sals = [_salience_grid(Path(runs[k]), metric, grids[n].shape, tables[runs[k]])
            if k < len(runs) and runs[k] and tables[runs[k]] is not None else None for k, n in enumerate(names)]
    # one column of two heatmaps per participant, wrapped into rows on a page (4 participants: 2 × 2); past 6, or
    # where more would squeeze a big grid's cells, further pages (merge_heads-2, ...)
    titles = distinct_names(names)  # two participants in folders of one name (a/checkpoint-100, b/checkpoint-100)
    layers, heads = next(iter(grids.values())).shape  # head_weights: every participant's grid of one shape
    pages = even_pages(len(names), per_page(layers, heads))
    written: list[Path] = []
    for p, page in enumerate(pages):
        fig, named, blocks = _draw_page([names[k] for k in page], [titles[k] for k in page], [sals[k] for k in page],
                                        [k == 0 for k in page], grids, metric)
        title, caption = (f"Weight of each participant's query-head slices ({info.get('method')} merge)",
                          page_caption(pages, p, "participants"))
        sup = fig.suptitle(title + caption, fontsize=10)
        if sup.get_window_extent(fig.canvas.get_renderer()).width > fig.bbox.width:  # a page of one column (5 in)
            sup.set_text(f"{title}\n{caption.strip()}")
        fig.tight_layout()
        if fit_bar_labels(fig):  # 5 or 6 participants: bars shorter than their labels
            fig.tight_layout()
        keep_titles_apart(fig, named)  # a long name over a narrow column ran into the next and off the page
        # a participant's two maps as one block: the gap between them only what their text needs, under the gap
        # between participants (they were the same, so a salience could be read as the next participant's); its
        # new layout can leave a bar shorter than its label: fitted again
        for _ in range(3):
            fit_stack_gaps(fig, blocks)
            if not fit_bar_labels(fig):
                break
            fig.tight_layout()
        heatmap_ticks_again(fig, [(ax, list(range(ax.images[0].get_array().shape[0])),
                                   list(range(ax.images[0].get_array().shape[1])))
                                  for ax in fig.axes if ax.images and ax.images[0].colorbar is not None])
        written += save_png_pdf(fig, result_dir, page_stem("merge_heads", p))
    drop_stale_pages(result_dir, "merge_heads", written)
    return written


# a salience metric (heads.csv's column) -> its name in a title, and its colour bar's unit
SALIENCE_NAMES = {"kl": ("KL", "nats"), "accuracy_drop": ("accuracy drop", "points"),
                  "prob_accuracy_drop": ("prob. accuracy drop", "points")}


def _page_grid(participants: int) -> tuple[float, tuple[float, float], int, int]:
    """A page of ``participants``: its columns' least width, its margin and its (rows, columns) (4: 2 × 2; 5 or
    6: 2 × 3, narrower)."""
    min_width, margin = (MIN_WIDTH, MARGIN) if participants <= 4 else (NARROW, NARROW_MARGIN)
    return (min_width, margin, *page_grid(participants, min_width, margin[0]))


def column_height(layers: int, rows: int) -> float:
    """Inches a participant's column of two maps of ``layers`` rows asks for on a page of ``rows`` rows
    (``stacked_maps_height``): COLUMN's, and for a tall grid its maps' extra height up to the page's share of a row
    (80 layers had maps 1.9 in high on a page of one row 5.6 in high)."""
    return stacked_maps_height(layers, rows, COLUMN[1], MAP, MARGIN[1])


def per_page(layers: int, heads: int) -> int:
    """How many participants a page of maps of ``layers`` × ``heads`` holds (``cells_per_page``): a 72B grid's 80
    layers went 2 rows (0.018 in a layer), its 64 heads 3 columns (0.013 in a head)."""
    def room(k: int) -> tuple[float, float]:
        _, margin, rows, cols = _page_grid(k)
        width = min(margin[0] + COLUMN[0] * cols, PAGE_WIDTH)  # as page_panels sizes the page
        height = min(margin[1] + column_height(layers, rows) * rows, PAGE_HEIGHT)
        return width / cols - TEXT[0], ((height - margin[1]) / rows - TEXT[1]) / 2

    return cells_per_page(layers, heads, MOST, room)


def _draw_page(names: list[str], titles: list[str], sals: list[np.ndarray | None], is_base: list[bool],
               grids: dict[str, np.ndarray], metric: str) -> tuple[Any, list[tuple[Any, str]], list[Any]]:
    """The page of participants ``names``: its figure, each participant's title ((axes, title) each) and its
    block (its weight map's axes above its salience's)."""
    min_width, margin, rows, _ = _page_grid(len(names))
    height = column_height(grids[names[0]].shape[0], rows)
    fig, panels = page_panels(len(names), COLUMN[0], height, min_width, margin, stack=2, grouped=True, dpi=150)
    aspect = bar_aspect(len(names))
    if height > COLUMN[1]:  # a tall grid's maps: the bars grow with them (else half the map high)
        aspect *= (height - TEXT[1]) / (COLUMN[1] - TEXT[1])
    named = []
    for k, name in enumerate(names):
        ax, ax2 = panels[k]
        im = ax.imshow(grids[name], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(titles[k], fontsize=8)
        named.append((ax, titles[k]))
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, aspect=aspect)
        cb.ax.tick_params(labelsize=7)
        cb.set_label("merge weight $w_i$", fontsize=7, parse_math=True)  # the symbols typeset, as a paper has them
        s = sals[k]
        if s is None:
            ax2.text(0.5, 0.5, "base keeps $\\alpha_0$\n(no salience run)" if is_base[k] else "salience run not found",
                     ha="center", va="center", fontsize=8, transform=ax2.transAxes, parse_math=is_base[k])  # α₀
            ax2.set_axis_off()
        else:
            what, unit = SALIENCE_NAMES.get(metric, (metric.replace("_", " "), ""))
            if metric == "kl":  # the head sweep's scale (one sink head at nats would paint the other heads one colour)
                (vmax, clipped), vmin, cmap = kl_limit(s), 0.0, "magma_r"
            else:  # a signed drop in points, as Figure 2 draws it: red where removing the head hurts, blue where it
                # helps (a sequential map painted a negative drop as a small harm)
                s = 100 * s
                (vmin, vmax, clipped), cmap = centred_limits(s, 0.0), "RdBu_r"
            im2 = ax2.imshow(s, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
            ax2.set_title(f"its salience ({what})", fontsize=8)
            ax2.set_xlabel("head", fontsize=8)
            ax2.set_ylabel("layer", fontsize=8)
            cb2 = fig.colorbar(im2, ax=ax2, fraction=0.046, aspect=aspect, extend=extend_for(s, vmin, vmax))
            cb2.ax.tick_params(labelsize=7)
            # the clip note in short lines: in one it ran along the bar past the panel (and off the page's foot)
            note = "\n" + "\n".join(textwrap.wrap(clip_note(s, vmin, vmax, ".3g" if metric == "kl" else
                                                              "+.1f").strip(), 26)) if clipped else ""
            cb2.set_label(f"{what} [{unit}]" + note, fontsize=7)
        for a in (ax, ax2):
            a.tick_params(labelsize=7)
            heatmap_ticks(a, list(range(grids[name].shape[0])), list(range(grids[name].shape[1])))
        if s is not None:  # the salience map below has the same heads, labelled: here they only widened the block
            ax.set_xlabel("")
            ax.tick_params(labelbottom=False)
    return fig, named, panels
