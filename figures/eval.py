"""Accuracy of every model on every data set with its 95 % interval, drawn only from DIR/scores.csv
(``python -m figures eval DIR``)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from figures import (PAGE_HEIGHT, UNIT, drawn_as_written, drop_stale_pages, name_colours, page_caption, page_grid,
                     page_panels, page_stem, read_once, read_table, save_png_pdf, short_name)
from probe.errors import BadInput
from probe.stats import reported_interval

SCORES = {"model": str, "data": str, "subject": str, "n_items": int,
          **{f"{m}{s}": float for m in ("accuracy", "prob_accuracy") for s in ("", "_lo", "_hi")},
          "note": str}  # what says a model was scored on part of a set ("k of n", set_size): never left out
P_ANSWER = {f"p_answer{s}": float for s in ("", "_lo", "_hi")}  # the mean p(answer), checked like the accuracies
DIFFS = dict.fromkeys(["diff_accuracy", "diff_lo", "diff_hi", "diff_prob_accuracy", "diff_prob_lo", "diff_prob_hi"],
                      float)


@read_once  # a report build asks a stage's scores.csv up to 5 times
def read_scores(result_dir: Path) -> pd.DataFrame:
    """DIR/scores.csv of a probe.eval run, checked: its columns, numbers, one 'all' row per model and data set."""
    csv = Path(result_dir) / "scores.csv"
    scores = read_table(csv, SCORES, DIFFS | P_ANSWER, "python -m probe.eval", keep_default_na=False, na_values=[""],
                        bounds=dict.fromkeys([c for c in SCORES | P_ANSWER if c.startswith(("accuracy", "prob_accuracy",
                                                                                           "p_answer"))], UNIT))
    if not (scores["subject"] == "all").any():
        raise BadInput(f"{csv}: no row with subject 'all' (the per model and data set totals)")
    if (twice := scores.duplicated(["model", "data", "subject"])).any():
        raise BadInput(f"{csv}: line {int(twice.to_numpy().argmax()) + 2} repeats a model, data set and subject")
    scored = scores["n_items"] > 0
    # a scored row's point and its interval: never a missing or crashing bar
    for m in ("accuracy", "prob_accuracy") + (("p_answer",) if "p_answer" in scores else ()):
        v, lo, hi = scores[m], scores[f"{m}_lo"], scores[f"{m}_hi"]
        measured = scored & v.notna()
        # a --no-generate run has no accuracy at all; otherwise every scored row has it
        bad = (scored & v.isna() & measured.any()) | (measured & ~((lo <= v + 1e-9) & (v <= hi + 1e-9)))
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise BadInput(f"{csv}: line {i + 2}: {m} {v.iloc[i]:g} with interval [{lo.iloc[i]:g}, {hi.iloc[i]:g}] "
                           f"on {scores['n_items'].iloc[i]} items (a value inside its interval, on every scored row)")
    top = scores[scores["subject"] == "all"]
    # an 'all' row totals its subjects' rows (probe.eval writes each subject's): another count is an edited file
    subjects = scores[scores["subject"] != "all"].groupby(["model", "data"])["n_items"].sum()
    for i, r in top.iterrows():
        if (key := (r["model"], r["data"])) in subjects and subjects[key] != r["n_items"]:
            raise BadInput(f"{csv}: line {scores.index.get_loc(i) + 2}: n_items {r['n_items']} of {r['model']} on "
                           f"{r['data']} (all), but its subjects' rows add up to {subjects[key]}")
    have = set(zip(top["model"], top["data"]))
    for model in dict.fromkeys(top["model"]):  # probe.eval writes every model × data set, n/a ones included
        for data in dict.fromkeys(top["data"]):
            if (model, data) not in have:
                raise BadInput(f"{csv}: no 'all' row for model {model} on data set {data} (probe.eval writes one "
                               "for every model and data set: rows of another run or a cut file?)")
    return scores


def set_size(row: pd.Series) -> int:
    """The items of the row's data set: n_items, or the total its note gives when the model could read only some
    ("32 of 40 items not applicable: …", probe.eval)."""
    m = re.match(r"(\d+) of (\d+) items", str(row.get("note", "")))
    return int(m.group(2)) if m else int(row["n_items"])


def short_labels(models: list[str], width: int = 40) -> list[str]:
    """Each model's name as a tick label (``short_name``: a long path keeps the whole parts of its tail that fit,
    the part that tells runs apart), told apart: long paths that end alike (s0/ft/mixed/checkpoint-100,
    s1/ft/mixed/checkpoint-100) would share one label, so those are named by their shortest distinct tail
    (probe.results.distinct_names), its start and end around an ellipsis when that is still too long."""
    from probe.results import distinct_names

    labels = [short_name(m, width) for m in models]
    shared = {x for x in labels if labels.count(x) > 1}
    head = width // 2 - 1
    for i, t in enumerate(distinct_names(models)):
        if labels[i] in shared:
            labels[i] = t if len(t) <= width else t[:head] + "…" + t[-(width - head - 1):]
    return labels if len(set(labels)) == len(labels) else list(models)


ROW = 0.38  # inches per model row when the page has room
MIN_ROW = 0.2  # the least: 8 pt labels of neighbouring models stay apart


def eval_pages(n_models: int, n_sets: int, left: float) -> tuple[float, int]:
    """(panel min width, models per page) for ``n_models`` rows in each of ``n_sets`` panels: panels wrapped as
    usual (1.9 in at least) while every model gets MIN_ROW; else in as few rows as 1 in wide panels allow; and
    where even that leaves less than MIN_ROW, the models are split over pages (eval.png, eval-2.png, ...)."""
    per_page = 0
    for min_width in (1.9, 1.0):
        rows, _ = page_grid(n_sets, min_width, left)
        per_page = max(1, int(((PAGE_HEIGHT - 0.5) / rows - 0.8) / MIN_ROW))
        if n_models <= per_page:
            return min_width, n_models
    pages = math.ceil(n_models / per_page)
    return 1.0, math.ceil(n_models / pages)  # pages as even as they can be


@drawn_as_written
def draw_eval(result_dir: Path) -> list[Path]:
    """eval.png/pdf (and eval-2, eval-3, ... when the models do not fit one page at 8 pt)."""
    import matplotlib

    matplotlib.use("Agg")

    scores = read_scores(result_dir)
    top = scores[scores["subject"] == "all"]
    metric = "accuracy" if top["accuracy"].notna().any() else "prob_accuracy"
    models = list(dict.fromkeys(top["model"]))
    datasets = list(dict.fromkeys(top["data"]))
    colour = name_colours(models)  # a model keeps its colour in every figure (up to 20 per figure) and page
    labels = dict(zip(models, short_labels(models)))
    left = 0.6 + 0.055 * max(map(len, labels.values()))  # inches for the longest label at 8 pt
    min_width, per_page = eval_pages(len(models), len(datasets), left)
    pages = [range(s, min(s + per_page, len(models))) for s in range(0, len(models), per_page)]
    # a rate of 0 or 100 % is drawn with its exact interval (reported_interval): the title says so where one is
    v, lo, hi = (top[f"{metric}{s}"] for s in ("", "_lo", "_hi"))
    exact = bool(((top["n_items"] > 0) & v.isin([0.0, 1.0]) & (lo == v) & (hi == v)).any())
    written: list[Path] = []
    for k, page in enumerate(pages):
        title = ("Evaluation, 95 % bootstrap intervals" + page_caption(pages, k, "models")
                 + ("\n(exact Clopper-Pearson at 0 % and 100 %)" if exact else ""))
        fig = _draw_page(top, metric, [models[i] for i in page], [labels[models[i]] for i in page], datasets, colour,
                         left, min_width, title)
        written += save_png_pdf(fig, result_dir, page_stem("eval", k))
    drop_stale_pages(result_dir, "eval", written)
    return written


def _draw_page(top: pd.DataFrame, metric: str, models: list[str], labels: list[str], datasets: list[str],
               colour: dict, left: float, min_width: float, title: str):
    # one panel per data set, wrapped into rows on a page (12 models × 4 sets: 2 × 2); each row has the labels
    fig, panels = page_panels(len(datasets), 2.6, 0.8 + ROW * len(models), min_width=min_width,
                              margin=(left, 0.5), dpi=150, sharey=True)
    colours = [colour[m] for m in models]
    y = np.arange(len(models))[::-1]
    counts = []  # the "k of n" labels of partly scored models, moved inside their panels once laid out
    for (ax,), ds in zip(panels, datasets):
        rows = top[top["data"] == ds].set_index("model").reindex(models)
        totals = [set_size(r) for _, r in rows.iterrows()]
        wide = ax.get_position().width * fig.get_figwidth() >= 1.6
        n = max(totals)
        for k, (name, r) in enumerate(rows.iterrows()):
            if r["n_items"] == 0:  # a narrow panel says only "n/a" (the reason ran past both its edges)
                ax.text(50, y[k], "n/a (modality)" if wide else "n/a", ha="center", va="center", fontsize=8,
                        color="0.5")
                continue
            v = r[metric]
            lo, hi = reported_interval(v, r[f"{metric}_lo"], r[f"{metric}_hi"], r["n_items"])
            part = r["n_items"] < totals[k]  # scored on the items it can read: hollow, with its count
            ax.errorbar(100 * v, y[k], xerr=[[100 * (v - lo)], [100 * (hi - v)]], fmt="o", ms=4, capsize=3,
                        color=colours[k], mfc="white" if part else colours[k])
            if part:
                label = ax.annotate(f"{int(r['n_items'])} of {totals[k]}", (100 * v, y[k]), xytext=(0, COUNT_RISE),
                                    textcoords="offset points", ha="center", fontsize=7, color="0.35")
                # out of the layout: one past a frame made tight_layout shrink every panel for it (0.96 → 0.42 in
                # at 9 sets); keep_inside moves it inside its panel instead
                label.set_in_layout(False)
                counts.append((ax, label))
        # n: the set's items, known from the rows that scored some (an n/a row's note gives no count)
        ax.set_title(f"{ds} (n={n})" if n else f"{ds} (n/a)", fontsize=9)
        ax.set_xlim(-2, 102)
        ax.set_xticks([0, 25, 50, 75, 100] if wide else [0, 50, 100])
        ax.set_ylim(-0.6, len(models) - 0.4)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(f"{metric.replace('_', ' ')} [%]", fontsize=8)
        ax.tick_params(labelsize=8)
    panels[0][0].set_yticks(y)  # shared: every row's first panel shows them
    panels[0][0].set_yticklabels(labels, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    # a title wider than its panel (many data sets, 1 in panels: "text_hard (n=64)mmmu_val (n=64)" ran together):
    # every panel's count goes on a line of its own
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    if any(ax.title.get_window_extent(renderer).width > ax.get_window_extent(renderer).width for (ax,) in panels):
        for (ax,) in panels:
            ax.set_title(ax.get_title().replace(" (n", "\n(n"), fontsize=9)
        fig.tight_layout()
    if counts:  # only a page with a partly scored model: the others stay as they were drawn
        keep_inside(fig, counts)
    return fig


COUNT_RISE = 5  # points from a partly scored model's dot up to its "k of n"
EDGE = 2  # points kept clear between a "k of n" and its panel's frame


def keep_inside(fig, labels: list) -> None:
    """Move each (axes, annotation) "k of n" label into its panel as laid out: centred over its dot, a label of a
    score near 0 % or 100 % ran across the panel's left or right frame (and over the next panel's ticks). It slides
    sideways until it clears the frame (one wider than its panel is centred on it), and a label that would cross the
    top frame (the top row of a page of tight rows) goes under its dot instead."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    to_points = 72 / fig.dpi
    for ax, label in labels:
        box, frame = label.get_window_extent(renderer), ax.get_window_extent(renderer)
        edge = EDGE / to_points  # in pixels
        if box.width > frame.width - 2 * edge:
            dx = (frame.x0 + frame.x1 - box.x0 - box.x1) / 2
        else:
            dx = max(0.0, frame.x0 + edge - box.x0) - max(0.0, box.x1 - (frame.x1 - edge))
        if box.y1 > frame.y1 - edge:  # under the dot, its top COUNT_RISE below the dot's centre
            label.set_verticalalignment("top")
            label.xyann = (dx * to_points, -COUNT_RISE)
        else:
            label.xyann = (dx * to_points, COUNT_RISE)
