"""Accuracy of every model on every data set with its 95 % interval, drawn only from DIR/scores.csv
(``python -m figures eval DIR``)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from figures import (PAGE_HEIGHT, PAGE_WIDTH, UNIT, drawn_as_written, drop_stale_pages, name_colours, page_caption,
                     page_grid, page_panels, page_stem, read_once, read_table, save_png_pdf, short_name)
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
    the part that tells runs apart), trimmed alike and told apart. Paths of as many parts (siblings: a report's
    merge/<method>/carriers/<expert>) of which one is too long keep one depth (``sibling_depth``): each path's own
    most that fit read "…/merge/average/…" beside "…/rep43/merge/shift/…". Long paths that end alike
    (s0/ft/mixed/checkpoint-100, s1/ft/mixed/checkpoint-100) would share one label, so those are named by their
    shortest distinct tail (probe.results.distinct_names), its start and end around an ellipsis when that is
    still too long."""
    from probe.results import distinct_names

    labels = [short_name(m, width) for m in models]
    parts = [str(m).rstrip("/").split("/") for m in models]
    for n in sorted({len(p) for p in parts if len(p) > 1}):
        group = [i for i, p in enumerate(parts) if len(p) == n]
        if len(group) > 1 and any(len(str(models[i])) > width for i in group):
            depth = sibling_depth([parts[i] for i in group], width)
            for i in group:
                labels[i] = "…/" + "/".join(parts[i][-depth:]) if depth else labels[i]
    shared = {x for x in labels if labels.count(x) > 1}
    head = width // 2 - 1
    for i, t in enumerate(distinct_names(models)):
        if labels[i] in shared:
            labels[i] = t if len(t) <= width else t[:head] + "…" + t[-(width - head - 1):]
    return labels if len(set(labels)) == len(labels) else list(models)


def sibling_depth(parts: list[list[str]], width: int) -> int:
    """The most last parts of every path (``parts``: each split at '/', one count of parts for all) that fit
    ``width`` characters behind "…/" and tell the paths apart; 0 where none does (``short_labels`` then tells
    them apart as before)."""
    for k in range(len(parts[0]) - 1, 0, -1):
        tails = ["/".join(p[-k:]) for p in parts]
        if all(len("…/" + t) <= width for t in tails):
            return k if len(set(tails)) == len(tails) else 0
    return 0


ROW = 0.38  # inches per model row when the page has room
MIN_ROW = 0.2  # the least: 8 pt labels of neighbouring models stay apart
PANEL_WIDTH = 2.6  # inches a data set's panel takes where the page has room
TITLE_CHAR, TITLE_LINE = 0.075, 0.15  # inches a character and a line of a 9 pt panel title take, about


def title_lines(names: Sequence[str], width: float) -> int:
    """Lines of the tallest panel title over panels ``width`` inches wide: one ("text (n=64)") where every name
    fits with its count, else its name wrapped (``wrap_name``) and the count below."""
    chars = max(1, int(width / TITLE_CHAR))
    if all(len(f"{n} (n=1000)") <= chars for n in names):
        return 1
    return 1 + max(wrap_name(n, chars).count("\n") + 1 for n in names)


def models_room(names: Sequence[str], min_width: float, left: float) -> float:
    """Inches a panel row has for its models' rows when the data sets ``names`` go in panels of at least
    ``min_width`` inches (``page_grid``) beside ``left``: a page's height over the rows, less each row's title,
    tick labels and axis label."""
    rows, cols = page_grid(len(names), min_width, left)
    width = min(PANEL_WIDTH, (PAGE_WIDTH - left) / cols)  # as page_panels squeezes them to fit
    return (PAGE_HEIGHT - 0.5) / rows - 0.8 - TITLE_LINE * (title_lines(names, width) - 1)


def eval_pages(n_models: int, n_sets: int, left: float, names: Sequence[str] = ()) -> tuple[float, int]:
    """(panel min width, models per page) for ``n_models`` rows in each of ``n_sets`` panels (titled ``names``):
    panels wrapped as usual (1.9 in at least) while every model gets MIN_ROW; else in as few rows as 1 in wide
    panels allow; and where even that leaves less than MIN_ROW, the models are split over pages (eval.png,
    eval-2.png, ...). Titles that wrap (long data set names) take their lines from the models' room."""
    names = list(names) or [""] * n_sets
    per_page = 0
    for min_width in (1.9, 1.0):
        per_page = max(1, int(models_room(names, min_width, left) / MIN_ROW))
        if n_models <= per_page:
            return min_width, n_models
    pages = math.ceil(n_models / per_page)
    return 1.0, math.ceil(n_models / pages)  # pages as even as they can be


def set_pages(datasets: Sequence[str], left: float) -> list[range]:
    """The data sets over as few pages (as even as they can be) as leave each panel row room for a model at
    least: 30 data sets of long names (MMMU's subjects) in 6 rows of 1 in panels had titles of 6 lines, and no
    room left, so titles, tick labels and the page's title ran over one another."""
    n = len(datasets)
    for k in range(1, n + 1):
        size = math.ceil(n / k)
        pages = [range(s, min(s + size, n)) for s in range(0, n, size)]
        if all(models_room([datasets[i] for i in p], 1.0, left) >= MIN_ROW for p in pages):
            return pages
    return [range(i, i + 1) for i in range(n)]


@drawn_as_written
def draw_eval(result_dir: Path) -> list[Path]:
    """eval.png/pdf (and eval-2, eval-3, ... when the models, or the data sets, do not fit one page at 8 pt)."""
    scores = read_scores(result_dir)
    top = scores[scores["subject"] == "all"]
    metric = "accuracy" if top["accuracy"].notna().any() else "prob_accuracy"
    models = list(dict.fromkeys(top["model"]))
    datasets = list(dict.fromkeys(top["data"]))
    colour = name_colours(models)  # a model keeps its colour in every figure (up to 20 per figure) and page
    labels = dict(zip(models, short_labels(models)))
    left = 0.6 + 0.055 * max(map(len, labels.values()))  # inches for the longest label at 8 pt
    # a rate of 0 or 100 % is drawn with its exact interval (reported_interval): the title says so where one is
    v, lo, hi = (top[f"{metric}{s}"] for s in ("", "_lo", "_hi"))
    exact = bool(((top["n_items"] > 0) & v.isin([0.0, 1.0]) & (lo == v) & (hi == v)).any())
    written: list[Path] = []
    by_sets = set_pages(datasets, left)
    n_pages = 0
    for j, sets in enumerate(by_sets):
        names = [datasets[i] for i in sets]
        min_width, per_page = eval_pages(len(models), len(names), left, names)
        pages = [range(s, min(s + per_page, len(models))) for s in range(0, len(models), per_page)]
        for k, page in enumerate(pages):
            title = ("Evaluation, 95 % bootstrap intervals" + page_caption(by_sets, j, "data sets")
                     + page_caption(pages, k, "models") + ("\n(exact Clopper-Pearson at 0 % and 100 %)" if exact
                                                           else ""))
            fig = _draw_page(top, metric, [models[i] for i in page], [labels[models[i]] for i in page], names,
                             colour, left, min_width, title)
            written += save_png_pdf(fig, result_dir, page_stem("eval", n_pages))
            n_pages += 1
    drop_stale_pages(result_dir, "eval", written)
    return written


def _draw_page(top: pd.DataFrame, metric: str, models: list[str], labels: list[str], datasets: list[str],
               colour: dict, left: float, min_width: float, title: str):
    # one panel per data set, wrapped into rows on a page (12 models × 4 sets: 2 × 2); each row has the labels
    fig, panels = page_panels(len(datasets), PANEL_WIDTH, 0.8 + ROW * len(models), min_width=min_width,
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
            name, count = ax.get_title().rsplit(" (n", 1)
            # a name still wider than its panel (mmmu_Architecture_and_Engineering over a 1 in panel ran over
            # its neighbours' titles) is broken into lines that fit
            width, chars = ax.get_window_extent(renderer).width, len(name)
            while True:
                ax.set_title(f"{wrap_name(name, chars)}\n(n{count}", fontsize=9)
                if chars <= 4 or ax.title.get_window_extent(renderer).width <= width:
                    break
                chars -= 1
        fig.tight_layout()
    if counts:  # only a page with a partly scored model: the others stay as they were drawn
        keep_inside(fig, counts)
    return fig


SEPARATORS = "_/ -"
BREAKS = re.compile(r"[^_/ -]*[_/ -]|[^_/ -]+$")  # a name's pieces, each with the separator ending it


def wrap_name(name: str, chars: int) -> str:
    """``name`` in lines of at most ``chars`` characters (and the separator ending one), broken after its '_',
    '/', '-' or ' ' (a piece longer than a line is cut where the line ends), so it reads back from its title."""
    lines, line = [], ""
    for piece in BREAKS.findall(name):
        if line and len(line + piece.rstrip(SEPARATORS)) > chars:
            lines.append(line)
            line = ""
        line += piece
        while len(line.rstrip(SEPARATORS)) > chars:
            lines.append(line[:chars])
            line = line[chars:]
    return "\n".join(x.rstrip(" ") for x in [*lines, line] if x.strip(" "))


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
