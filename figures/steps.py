"""Figure 3: accuracy against fine-tuning steps, drawn only from ``probe.eval`` runs over ``checkpoint-<step>`` dirs
(``python -m figures steps DIR…``): one panel per eval run, one line per data set, 95 % intervals as bands, steps
on a symmetric-log axis so step 0 (the start) sits beside 10, 100, 1000 (on a linear one where they were saved at one
interval)."""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from figures import (drawn_as_written, drop_stale_pages, name_colours, name_markers, page_caption, page_panels,
                     page_split, page_stem, save_png_pdf, spaced_ticklabels)
from figures.eval import read_scores
from probe.errors import BadInput
from probe.results import distinct_names
from probe.stats import reported_interval

MIN_WIDTH, MIN_PANEL = 2.3, 2.1  # inches: a run's panel at its narrowest and lowest (title and step labels in)
STEP = re.compile(r"checkpoint-([0-9]+)/?$")  # ASCII digits, as a run names them (\d takes any Unicode digit)
METRIC_NAMES = {"accuracy": "accuracy", "prob_accuracy": "prob. accuracy"}  # an axis' or title's word for each


def metric_word(metrics: Iterable[str]) -> str:
    """The word an axis, table or finding gives the scores of runs of ``metrics`` (a --no-generate run's are
    prob. accuracy): the one metric's name, or both where the runs differ."""
    found = set(metrics)
    return METRIC_NAMES[found.pop()] if len(found) == 1 else "accuracy or prob. accuracy"


def run_metric(t: pd.DataFrame) -> str:
    """What a run's lines draw: its accuracy, or the probability accuracy of a --no-generate eval (which has none)."""
    return "accuracy" if t["accuracy"].notna().any() else "prob_accuracy"


def checkpoint_rows(scores: pd.DataFrame) -> pd.DataFrame:
    """The 'all' rows of an eval run's scores whose model is a ``checkpoint-<step>`` dir, with that step."""
    s = scores[scores["subject"] == "all"].copy()
    s["step"] = s["model"].astype(str).str.extract(STEP.pattern)[0]
    return s.dropna(subset=["step"]).astype({"step": int})


def step_scores(result_dir: Path) -> pd.DataFrame:
    """The 'all' rows of an eval run whose models are checkpoints, with their step (where the model read the set)."""
    s = checkpoint_rows(read_scores(result_dir))
    s = s[s["n_items"] > 0]
    if s.empty:
        raise BadInput(f"{result_dir}: no model named .../checkpoint-<step> in scores.csv")
    if (twice := s.duplicated(["data", "step"], keep=False)).any():  # one line per data set would zigzag between runs
        first = s[twice].iloc[0]
        models = s[twice & (s["data"] == first["data"]) & (s["step"] == first["step"])]["model"]
        raise BadInput(f"{result_dir}: {', '.join(models)} are all step {first['step']} on {first['data']}: "
                       "checkpoints of several fine-tuning runs; evaluate each run into its own --out, one panel each")
    return s.sort_values("step")


def evenly_saved(steps: list[int]) -> bool:
    """Whether checkpoints were saved at one interval (0, 10, 20, …, 290): such go on a linear axis, where on the
    symmetric-log one, 0 to 10 took a third of the panel and the last ones' markers lay 1.3 pt apart."""
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    return len(steps) >= 3 and len(gaps) == 1


@drawn_as_written
def draw_steps(result_dirs: list[Path] | Path, out: Path | None = None) -> list[Path]:
    # one run given as a str too (from Python): list("runs/x") was its characters, "/ and / are the same eval run"
    dirs = [Path(d) for d in ([result_dirs] if isinstance(result_dirs, (str, Path)) else result_dirs)]
    seen: dict[Path, Path] = {}
    for d in dirs:  # DIR and DIR/ or ./DIR too: one run drawn as two identical panels reads as two agreeing runs
        if (key := Path(d).resolve()) in seen:
            raise BadInput(f"{seen[key]} and {d} are the same eval run ({key}); give each run once")
        seen[key] = d
    tables = [step_scores(d) for d in dirs]
    names = list(dict.fromkeys(n for t in tables for n in t["data"]))  # one colour per data set in every panel
    colour = name_colours(names)
    titles = distinct_names([str(d) for d in dirs])  # seed0/mixed and seed1/mixed, not two panels called mixed
    legend = 0.39 + 0.13 * ((len(names) - 1) // 6)  # inches below the panels: its title, then 6 entries a line
    # one panel per run, wrapped into rows on a page (4 runs: 2 × 2); past 8, further pages (steps-2, ...)
    pages = page_split(len(dirs), MIN_WIDTH, MIN_PANEL, (0.6, legend))
    what = metric_word(run_metric(t) for t in tables)
    written: list[Path] = []
    for p, page in enumerate(pages):
        fig = _draw_page([titles[k] for k in page], [tables[k] for k in page], colour, legend, what)
        if len(pages) > 1:
            fig.suptitle(f"{what.capitalize()} against fine-tuning steps" + page_caption(pages, p, "runs"),
                         fontsize=10)
        fig.tight_layout(rect=(0, legend / fig.get_size_inches()[1], 1, 1))
        # a symmetric-log axis crowds the late steps (3000 beside 5000); the panels share no x axis
        spaced_ticklabels([ax for ax in fig.axes if ax.get_visible()])
        written += save_png_pdf(fig, out or dirs[0], page_stem("steps", p))
    drop_stale_pages(out or dirs[0], "steps", written)
    return written


def _draw_page(titles: list[str], tables: list[pd.DataFrame], colour: dict, legend: float, what: str):
    """One page of panels; ``what``: the metric the y axis names (both where the runs differ: each panel's title
    then says its own)."""
    import matplotlib.ticker

    fig, panels = page_panels(len(titles), 3.4, 3.04, min_width=MIN_WIDTH, margin=(0.6, legend), dpi=150, sharey=True)
    axes = [ax for (ax,) in panels]
    marker = name_markers(list(colour))  # a data set's line told by its marker too, not by its colour alone
    # the legend's lines by data set, handed to it: it leaves out a line whose label starts with '_' (a set '_x')
    seen: dict = {}
    for ax, title, t in zip(axes, titles, tables):
        metric = run_metric(t)
        for data, g in t.groupby("data", sort=False):
            c = colour[data]
            seen[data], = ax.plot(g["step"], 100 * g[metric], marker=marker[data], ms=4, color=c, label=data)
            band = [reported_interval(*x) for x in zip(g[metric], g[f"{metric}_lo"], g[f"{metric}_hi"], g["n_items"])]
            ax.fill_between(g["step"], [100 * lo for lo, _ in band], [100 * hi for _, hi in band], color=c, alpha=0.2,
                            lw=0)
            if len(g) == 1:  # a band of one step has no width: its interval as an error bar
                (lo, hi), v = band[0], g[metric].iloc[0]
                ax.errorbar(g["step"], 100 * g[metric], yerr=[[100 * (v - lo)], [100 * (hi - v)]], fmt="none",
                            color=c, alpha=0.5, capsize=3)
        steps = sorted(set(t["step"]))
        if not evenly_saved(steps):  # the paper's 0, 10, 30, 100, 200: 0 beside 10, 100, 1000
            ax.set_xscale("symlog", linthresh=10)
        shown = steps if len(steps) <= 8 else steps[::-(-len(steps) // 8)]  # the saved steps, never log-scale ticks
        ax.set_xticks(shown, [str(s) for s in shown])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        # the run fine-tuned (its eval dir), not a data set it is scored on; its metric where the runs' differ
        ax.set_title(f"run {title}" + (f" ({METRIC_NAMES[metric]})" if what not in METRIC_NAMES.values() else ""),
                     fontsize=9)
        ax.set_xlabel("fine-tuning step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            # a --no-generate eval draws the probability accuracy: the axis said "accuracy" whatever it drew
            ax.set_ylabel(f"{what} [%]\n(band: 95 % interval)", fontsize=8)
    # below the panels, never over a band
    fig.legend(list(seen.values()), list(seen), fontsize=7, loc="lower center", ncol=min(len(seen), 6), frameon=False,
               title="evaluated on", title_fontsize=7)
    return fig
