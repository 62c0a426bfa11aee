"""Weight-space maps from ``analyses.trajectory``, drawn only from ``DIR/coords.csv``
(``python -m figures trajectory DIR``): one ``trajectory_<feature>.{png,pdf}`` per feature, PCA and t-SNE side by
side; fine-tuning runs as arrows in step order; base, experts and merged models marked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.ticker import MaxNLocator

from figures import drawn_as_written, fill_lines, fit_page, page_panels, place_labels, read_json, read_table
from figures.shift import save, short_names
from probe.errors import BadInput, is_int

STYLE = {  # kind -> marker, size, colour (None: one colour per run)
    "base": ("*", 260, "black"),
    "expert": ("s", 70, "tab:blue"),
    "merged": ("D", 80, "tab:red"),
    "run": ("o", 30, None),
}
# a colour per fine-tuning run: tab10 without the experts' blue (C0) and the merged models' red (C3)
RUN_COLOURS = [f"C{k}" for k in (2, 1, 4, 5, 6, 8, 9, 7)]
LEGEND_COLUMNS = 4
TITLES = {"norms": "per-tensor ‖θ − θ_ref‖ (paper's feature)", "sketch": "random-projection sketch of θ − θ_ref"}


NAME_CHARS = 28  # a model's name longer than this goes on two lines (a 3.4 in map holds about two of 28)


def two_lines(name: str, width: int = NAME_CHARS) -> str:
    """A long name split in two lines after the '/', '-' or '_' nearest its middle
    ("llava-hf/llava-onevision-" over "qwen2-7b-si-hf"): in one line it ran across the map into the next one."""
    cuts = [i + 1 for i, c in enumerate(name[:-1]) if c in "/-_"]
    if len(name) <= width or not cuts:
        return name
    cut = min(cuts, key=lambda i: abs(2 * i - len(name)))
    return f"{name[:cut]}\n{name[cut:]}"


def _label(ax: Any, mid: float, text: str, x: float, y: float, offset: tuple[float, float], **kw: Any) -> Any:
    """Text beside a point: on its right, or on its left when the point is right of ``mid`` (the middle of the
    panel's points), so it stays inside a narrow panel. Where it ends up is ``place_labels``' choice, once the
    figure is laid out; this is only where it is while the layout is made."""
    left = x > mid
    return ax.annotate(text, (x, y), xytext=(-offset[0] if left else offset[0], offset[1]), textcoords="offset points",
                       ha="right" if left else "left", zorder=5, **kw)  # over the runs' dots


def read_coords(path: Path) -> pd.DataFrame:
    """coords.csv, checked: finite coordinates, known kinds and methods, each point once per map, a fine-tuning
    run's points at distinct whole steps (anything else would be drawn silently wrong, or not at all)."""
    import numpy as np

    df = read_table(path, {"name": str, "kind": str, "run": str, "step": float, "feature": str, "method": str,
                           "x": float, "y": float}, source="python -m analyses.trajectory", keep_default_na=False)

    def refuse(bad: pd.Series, why: str) -> None:
        if bad.any():
            raise BadInput(f"{path}: line {int(bad.to_numpy().argmax()) + 2}: {why}")

    refuse(~np.isfinite(df[["x", "y"]]).all(axis=1), "x and y must be finite numbers")
    refuse(~df["kind"].isin(list(STYLE)), f"kind must be one of {', '.join(STYLE)}")
    refuse(~df["method"].isin(["pca", "tsne"]), "method must be pca or tsne")
    refuse((df["run"] != "") != (df["kind"] == "run"), "a point of kind run names its run, and only it")
    refuse((df["run"] != "") & df["step"].isna(), "a fine-tuning run's point without a step")
    refuse((df["run"] != "") & ((df["step"] % 1 != 0) | (df["step"] < 0)), "a step must be a whole number ≥ 0")
    refuse(df.duplicated(["name", "feature", "method"]), "repeats a point of the same map")
    refuse((df["run"] != "") & df.duplicated(["run", "step", "feature", "method"]),
           "repeats a step of its run on the same map (the arrows would zigzag)")
    return df


def read_run_info(path: Path) -> dict[str, Any]:
    """run.json beside coords.csv (θ_ref, the t-SNE perplexity, PCA's variance shares); an output from before it
    has none, and then the figure goes without those labels. A damaged one is BadInput."""
    if not path.is_file():
        return {}
    info = read_json(path, "python -m analyses.trajectory")
    perplexity, shares = info.get("perplexity_used"), info.get("pca_explained_variance", {})
    number = (int, float)
    if not (perplexity is None or isinstance(perplexity, number) and not isinstance(perplexity, bool)) \
            or not isinstance(shares, dict) \
            or not all(isinstance(v, list) and all(isinstance(x, number) for x in v) for v in shares.values()):
        raise BadInput(f"{path}: perplexity_used or pca_explained_variance is not as python -m analyses.trajectory "
                       "writes it")
    n = info.get("n_points")
    if n is not None and (not is_int(n) or n < 2):
        raise BadInput(f"{path}: n_points is {n!r}, not a count of points")
    return info


def read_sketch(result_dir: Path) -> tuple[list[str], Any]:
    """features.npz's point names and their weight sketches (one float64 row per name), checked: BadInput naming the
    file otherwise."""
    import zipfile

    import numpy as np

    path = Path(result_dir) / "features.npz"
    try:
        with np.load(path) as z:
            if lacking := [k for k in ("names", "sketch") if k not in z.files]:
                raise BadInput(f"{path}: no {' / '.join(lacking)} array (not as python -m analyses.trajectory "
                               "writes it)")
            names, sketch = [str(n) for n in z["names"]], z["sketch"].astype(np.float64)
    except BadInput:  # the refusal above names what is missing (BadInput is a ValueError)
        raise
    # BadZipFile: a file cut short (its zip directory, at the end, gone), which is no OSError
    except (OSError, ValueError, EOFError, AttributeError, TypeError, zipfile.BadZipFile):
        raise BadInput(f"{path}: not a readable .npz archive") from None
    if sketch.ndim != 2 or len(sketch) != len(names):
        raise BadInput(f"{path}: sketch is not one row per name")
    return names, sketch


def check_maps(path: Path, df: pd.DataFrame, info: dict[str, Any]) -> None:
    """coords.csv against the run.json written with it: every map (feature × method) analyses.trajectory drew, each
    with all ``n_points`` points (a cut or edited file would draw a map without a model, as if never there)."""
    n = info.get("n_points")
    if n is None:  # an output from before run.json
        return
    maps = info.get("maps")
    if maps is None:  # run.json from before it listed its maps: PCA always, t-SNE whole or not at all
        maps = {f: ["pca"] + (["tsne"] if ((df["feature"] == f) & (df["method"] == "tsne")).any() else [])
                for f in ("norms", "sketch")}
    if not (isinstance(maps, dict) and all(isinstance(m, list) and set(m) <= {"pca", "tsne"} for m in maps.values())):
        raise BadInput(f"{path.parent / 'run.json'}: maps is not as python -m analyses.trajectory writes it")
    drawn = set(zip(df["feature"], df["method"]))
    listed = {(f, m) for f, ms in maps.items() for m in ms}
    if drawn - listed:
        feature, method = min(drawn - listed)
        raise BadInput(f"{path}: a {method} map of {feature}, which run.json does not record (an edited file?)")
    for feature, method in sorted(listed):
        got = int(((df["feature"] == feature) & (df["method"] == method)).sum())
        if got != n:
            raise BadInput(f"{path}: {got} points on the {method} map of {feature}, where run.json records "
                           f"{n} (a cut or edited file?)")


def read_trajectory(result_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """coords.csv and run.json (``{}`` for an output from before it) of a finished trajectory output, checked against
    each other (``read_coords``, ``read_run_info``, ``check_maps``): BadInput naming the file otherwise."""
    result_dir = Path(result_dir)
    path = result_dir / "coords.csv"
    df = read_coords(path)
    info = read_run_info(result_dir / "run.json")
    check_maps(path, df, info)
    return df, info


@drawn_as_written
def draw_trajectory(result_dir: Path) -> list[Path]:
    result_dir = Path(result_dir)
    df, info = read_trajectory(result_dir)
    labels = short_names(list(dict.fromkeys(df["name"])))
    ref = Path(str(info.get("ref", ""))).name
    written: list[Path] = []
    for feature in dict.fromkeys(df["feature"]):
        sub = df[df["feature"] == feature]
        methods = list(dict.fromkeys(sub["method"]))
        # one legend below the panels (inside one, "best" placed it over the points' names): its lines of 4 entries
        entries = sub["run"].replace("", None).nunique() + sub.loc[sub["kind"] != "run", "kind"].nunique()
        legend = 0.12 + 0.2 * -(-entries // LEGEND_COLUMNS)  # inches
        # PCA beside t-SNE on a page: 3.5 in each, titles wrapped to that (about 14 characters an inch at 9 pt)
        fig, panels = page_panels(len(methods), 6, 4.2, min_width=3.4, margin=(0.0, legend))
        chars = int(14 * fig.get_size_inches()[0] / panels[0][0].get_subplotspec().get_gridspec().ncols)
        names_of: list[list[Any]] = []  # per panel, the labels beside points
        for (ax,), method in zip(panels, methods):
            d = sub[sub["method"] == method]
            mid = (d["x"].min() + d["x"].max()) / 2
            runs = [r for r in dict.fromkeys(d["run"]) if r]
            names_of.append([])
            for i, run in enumerate(runs):
                r = d[d["run"] == run].copy()
                r["step"] = pd.to_numeric(r["step"])
                r = r.sort_values("step")
                colour = RUN_COLOURS[i % len(RUN_COLOURS)]
                xs, ys = r["x"].to_numpy(), r["y"].to_numpy()
                ax.plot(xs, ys, "-", color=colour, alpha=0.6, lw=1.2, label=f"run {run}")
                for j in range(len(xs) - 1):
                    ax.annotate("", (xs[j + 1], ys[j + 1]), (xs[j], ys[j]),
                                arrowprops=dict(arrowstyle="->", color=colour, lw=1.2))
                ax.scatter(xs, ys, s=STYLE["run"][1], color=colour, zorder=3)
                names_of[-1].append(_label(ax, mid, f"step {int(r['step'].iloc[-1])}", xs[-1], ys[-1], (4, -8),
                                           fontsize=7, color=colour))
            for kind in ("base", "expert", "merged"):
                k = d[d["kind"] == kind]
                if k.empty:
                    continue
                marker, size, colour = STYLE[kind]
                ax.scatter(k["x"], k["y"], marker=marker, s=size, color=colour, label=kind, zorder=4,
                           edgecolors="white", linewidths=0.6)
                for _, row in k.iterrows():
                    names_of[-1].append(_label(ax, mid, two_lines(labels[row["name"]]), row["x"], row["y"], (5, 4),
                                               fontsize=8))
            title = f"{method.upper() if method == 'pca' else 't-SNE'}: {TITLES.get(feature, feature)}"
            if ref:
                title += f"\nθ_ref = {ref}"
            shares = info.get("pca_explained_variance")
            share = shares.get(feature, []) if isinstance(shares, dict) else []
            if method == "pca":
                ax.set_aspect("equal", adjustable="datalim")  # distances and directions as they are
                names = [f"PC{i + 1}" + (f" ({100 * share[i]:.0f} % of variance)" if i < len(share) else "")
                         for i in range(2)]
            else:
                names = ["t-SNE 1", "t-SNE 2"]
                if info.get("perplexity_used") is not None:
                    title += f", perplexity {info['perplexity_used']:g}"
            ax.set_title(fill_lines(title, chars), fontsize=9)
            ax.set_xlabel(names[0], fontsize=8)
            ax.set_ylabel(names[1], fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(5))  # t-SNE's long tick labels would run together at 3.5 in
            ax.margins(0.15)
        shown: dict[str, Any] = {}  # every map shows the same runs and models: one entry each
        for (ax,) in panels:
            shown |= dict(zip(*ax.get_legend_handles_labels()[::-1]))
        fig.legend(list(shown.values()), list(shown), fontsize=7, loc="lower center", frameon=False,
                   ncol=min(len(shown), LEGEND_COLUMNS))
        fig.tight_layout(rect=(0, legend / fig.get_size_inches()[1], 1, 1))
        fit_page(fig)  # the size it is saved at, where the labels are placed
        for (ax,), texts in zip(panels, names_of):  # the base, experts a real run barely moved and the merges sit
            # close together: each name beside its point clear of the other markers and names, inside its map
            place_labels(ax, texts)
        written += save(fig, result_dir / f"trajectory_{feature}")
    return written
