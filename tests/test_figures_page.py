"""Every figure fits a paper page (figures.PAGE_WIDTH × PAGE_HEIGHT inches, as saved), however many panels it has:
drawn here from small synthetic saved results (the files each command writes, nothing run)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from figures import PAGE_HEIGHT, PAGE_WIDTH, page_caption, page_grid, page_split

SCORE_COLUMNS = ["model", "data", "subject", "n_items", "accuracy", "accuracy_lo", "accuracy_hi", "prob_accuracy",
                 "prob_accuracy_lo", "prob_accuracy_hi", "note"]


def write_scores(d: Path, models: list[str], sets: list[str], seed: int = 0) -> Path:
    """A probe.eval scores.csv: every model on every set ('all' rows), one model unable to read the last set and
    one scored on part of a set (the figure's "n/a" and "3 of 5" marks)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for i, m in enumerate(models):
        for j, s in enumerate(sets):
            v = float(rng.uniform(0.2, 0.95))
            n, note = 64, ""
            if i == 0 and j == len(sets) - 1:
                n, note = 0, "not applicable: cannot read these items"
            elif i == 1 and j == 0:
                n, note = 40, "24 of 64 items not applicable: …"
            rows.append([m, s, "all", n, v, v - 0.08, min(v + 0.08, 1.0), v, v - 0.07, min(v + 0.07, 1.0), note])
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=SCORE_COLUMNS).to_csv(d / "scores.csv", index=False)
    return d


def write_heads(d: Path, layers: int, heads: int, seed: int = 0) -> Path:
    """A probe.heads output: heads.csv and baseline.json."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = [[l, h, 0.9, p, 2.0 * rng.random() / (1 + l), 64, 0.95 - 0.9, 0.9 - p, 0.5]  # drops from the baseline's
            for l in range(layers) for h in range(heads) for p in [0.8 - 0.1 * rng.random()]]
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["layer", "head", "accuracy", "prob_accuracy", "kl", "n_items", "accuracy_drop",
                                "prob_accuracy_drop", "p_answer"]).to_csv(d / "heads.csv", index=False)
    (d / "baseline.json").write_text(json.dumps({"accuracy": 0.95, "prob_accuracy": 0.9, "kl": 0.0, "n_items": 64,
                                                 "model": d.name}))
    return d


def write_merge(d: Path, participants: int, layers: int = 4, heads: int = 8, legacy: bool = False,
                name: str = "expert-{k}") -> Path:
    """A salience merge's merge_weights.csv and merge.json, with a salience run per expert (the base has none);
    ``legacy``: as analyses.merge wrote them before 2026-12-06 (the weight in an alpha column, mean_alpha);
    ``name``: each participant's folder name, of its number k."""
    import pandas as pd

    rng = np.random.default_rng(0)
    names = [str(d.parent / "zoo" / name.format(k=k)) for k in range(participants)]
    weight = rng.dirichlet(np.ones(participants), size=(layers, heads))
    rows = [[f"layers.{l}.self_attn.q_proj.weight", f"rows {16 * h}:{16 * (h + 1)}", m, None, weight[l, h, k], None]
            for k, m in enumerate(names) for l in range(layers) for h in range(heads)]
    # the tensors outside the head slices: Eq. 4's alpha0 for the base, the rest by shift
    rest = [0.5, *(0.5 * rng.dirichlet(np.ones(participants - 1)))] if participants > 1 else [1.0]
    rows += [["embed_tokens.weight", "all", m, None if k == 0 else 0.001, rest[k], None] for k, m in enumerate(names)]
    d.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=["tensor", "slice", "model", "delta_avg", "weight", "trim_threshold"])
    if legacy:
        df = df.drop(columns="trim_threshold").rename(columns={"weight": "alpha"})
    df.to_csv(d / "merge_weights.csv", index=False)
    runs = [str(write_heads(d.parent / "sal" / f"e{k}", layers, heads, seed=k)) for k in range(1, participants)]
    means = {"mean_alpha": df.groupby("model")["alpha"].mean().to_dict()} if legacy else {
        "mean_weight": df.groupby("model")["weight"].mean().to_dict(), "mean_trim_threshold": None}
    (d / "merge.json").write_text(json.dumps({  # as analyses.merge writes it: participants, tensors, mean weights
        "method": "salience", "base": names[0], "models": names[1:], "reference": names[0],
        "n_tensors": int(df["tensor"].nunique()), **means, "salience": {"runs": runs, "metric": "kl"}}))
    return d


def write_shift(d: Path, models: list[str], layers: int, modules: list[str], layered: int | None = None) -> Path:
    """A probe shift output: shift.csv and summary.json; ``layered``: only the first so many models have per-layer
    tensors (a heatmap each), the others their embedding alone."""
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = [[m, f"layers.{l}.{mod}", l, mod, 4096, 10 ** rng.uniform(-5, -2)]
            for m in models[:layered] for l in range(layers) for mod in modules]
    rows += [[m, "embed_tokens.weight", "", "embed_tokens.weight", 65536, 1e-4] for m in models]
    d.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=["model", "tensor", "layer", "module", "numel", "delta_avg"])
    df.to_csv(d / "shift.csv", index=False)
    per = {m: {"n_tensors": len(g), "numel": int(g["numel"].sum())} for m, g in df.groupby("model", sort=False)}
    (d / "summary.json").write_text(json.dumps({"per_model": per}))  # written with it: the counts of its rows
    return d


def write_trajectory(d: Path, runs: list[str], methods: tuple[str, ...] = ("pca", "tsne")) -> Path:
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for feature in ("norms", "sketch"):
        for method in methods:
            # the rightmost point's label sticks out of the figure: saved cropped to what is drawn, it is still a page
            rows.append(["zoo/organism-base-of-the-organism-family", "base", "", "", feature, method, 10.0, 0.0])
            rows += [[f"organism-{e}", "expert", "", "", feature, method, *rng.normal(0, 3, 2)]
                     for e in ("vl", "ov-si", "video")]
            rows.append(["shift", "merged", "", "", feature, method, 0.0, 0.0])
            for r in runs:
                xy = np.zeros(2)
                for step in (0, 10, 30, 100, 200):
                    rows.append([f"{r}@{step}", "run", r, step, feature, method, *xy])
                    xy = xy + rng.normal(0, 0.5, 2)
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["name", "kind", "run", "step", "feature", "method", "x", "y"]).to_csv(
        d / "coords.csv", index=False)
    (d / "run.json").write_text(json.dumps({"ref": "runs/shift", "perplexity_used": 5, "n_points": 5 + 5 * len(runs),
                                            "pca_explained_variance": {"norms": [0.8, 0.1], "sketch": [0.6, 0.3]},
                                            "maps": {"norms": ["pca", "tsne"], "sketch": ["pca", "tsne"]}}))
    return d


def write_replication(out: Path, experts: int, layers: int = 4, heads: int = 8) -> "object":
    """What the report's Figure 2 reads: a replicate config and one head sweep per expert and the base."""
    from figures.results import Replication

    names = [f"organism-e{k}" for k in range(experts)]
    for k, m in enumerate([*names, "organism-base"]):
        write_heads(out / "heads" / m, layers, heads, seed=k)
    cfg = {"models": {"base": "organism-base", "experts": names, "own": [f"set{k}" for k in range(experts)]},
           "heads": {"split": "train"}}
    return Replication(out, {"config": cfg, "fingerprints": {}})


def saved_inches(path: Path) -> tuple[float, float]:
    """A saved figure's size in inches: a PNG's pixels over its dpi, a PDF's page box over 72 points."""
    if path.suffix == ".png":
        with Image.open(path) as im:
            dpi = im.info["dpi"]
            return im.width / dpi[0], im.height / dpi[1]
    box = re.search(rb"/MediaBox\s*\[\s*0\s+0\s+([\d.]+)\s+([\d.]+)\s*\]", path.read_bytes())
    return float(box.group(1)) / 72, float(box.group(2)) / 72


def draw_all(root: Path, n: int, fixed: bool = True) -> list[Path]:
    """Every figure kind, each with ``n`` panels (data sets, runs, models), from synthetic saved results; with
    ``fixed`` False, not the heads and trajectory figures, whose panels do not depend on ``n`` (the same calls)."""
    from figures.eval import draw_eval
    from figures.heads import draw_heads
    from figures.merge import draw_merge
    from figures.report import draw_figure2
    from figures.shift import draw_shift
    from figures.steps import draw_steps
    from figures.trajectory import draw_trajectory

    models = ["organism-base", "organism-vl", "organism-ov-si", "organism-video", "runs/avg",
              "runs/avg/carriers/organism-ov-si", *(f"runs/merged/carriers/organism-{k}" for k in range(6))]
    sets = ["text", "image", "image_single", "video", "audio", "text_hard"][:n]
    written = draw_eval(write_scores(root / "eval", models, sets))
    runs = [write_scores(root / "steps" / f"run{k}", [f"runs/ft/checkpoint-{s}" for s in (0, 10, 30, 100, 200)],
                         ["text", "image", "video"], seed=k) for k in range(n)]
    written += draw_steps(runs, out=root / "steps")
    written += draw_merge(write_merge(root / "merge", n))
    if fixed:
        written += draw_heads(write_heads(root / "heads", 28, 28))
        written += draw_heads(write_heads(root / "heads12", 12, 12))
    modules = [f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")] + [
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight"]
    # a heatmap per model, each the same 48 × 16 page whatever n: one drawn (5 more were 8 s of the n = 6 case)
    written += draw_shift(write_shift(root / "shift", [f"organism-{k}" for k in range(n)], 48, modules, layered=1))
    if fixed:
        written += draw_trajectory(write_trajectory(root / "traj", ["text", "image", "video", "mixed"]))
    fig2 = root / "report" / "figure2.png"
    fig2.parent.mkdir()
    assert draw_figure2(write_replication(root / "rep", n - 1), fig2) == [fig2]  # the base and n - 1 experts
    return written + [fig2, fig2.with_suffix(".pdf")]


def small_texts(fig) -> list[tuple[str, float]]:
    """The texts ``fig`` draws (titles, labels, tick labels, legend entries, notes beside points) under 7 pt."""
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    texts = drawn_texts(fig) + [t for lg in legends for t in (*lg.get_texts(), lg.get_title()) if t.get_text()]
    assert len(texts) > 5
    return [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 7]


@pytest.mark.parametrize("n", [1, 6])
def test_every_figure_fits_a_page(tmp_path, monkeypatch, n):
    """Panels wrap into rows (6 data sets: 2 columns × 3 rows) instead of one row growing past the page: every
    PNG and PDF is at most 7 × 9 in as saved, so its 7-10 pt text keeps its size in a paper. Every PDF embeds its
    fonts as TrueType (pdf.fonttype 42): matplotlib's default Type 3 fonts are refused by journals' PDF checks.
    And since a figure goes into a paper at the size it is saved (never scaled down), every text it draws is at
    least 7 pt, the least a journal prints legibly: the evaluation figure's "40 of 64" beside a model scored on
    part of a set was 6 pt."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    figs: list = []
    save = Figure.savefig

    def savefig(self, fname, *a, **k):
        if self not in figs:
            figs.append(self)
        return save(self, fname, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    fixed = n == 6  # the heads and trajectory figures are the same calls whatever n: drawn (20 s) in one case
    written = draw_all(tmp_path, n, fixed)
    assert len(written) >= (20 if fixed else 12) and not plt.get_fignums()  # every figure closed
    for path in written:
        w, h = saved_inches(path)
        assert w <= PAGE_WIDTH + 0.01 and h <= PAGE_HEIGHT + 0.01, (path.relative_to(tmp_path), round(w, 2), round(h, 2))
        if path.suffix == ".pdf":
            fonts = set(re.findall(rb"/Subtype\s*/(Type3|TrueType|CIDFontType2|Type1)\b", path.read_bytes()))
            assert fonts and fonts <= {b"TrueType", b"CIDFontType2"}, (path.relative_to(tmp_path), fonts)
    assert len(figs) >= (12 if fixed else 6)
    assert not [t for fig in figs for t in small_texts(fig)]


def test_page_grid_wraps_panels_into_even_rows():
    assert page_grid(1, 2.0) == (1, 1)
    assert page_grid(4, 2.3, 0.6) == (2, 2)  # room for 2 a row
    assert page_grid(4, 2.0) == (2, 2)  # room for 3: 2 + 2, not 3 + 1
    assert page_grid(6, 2.0) == (2, 3)
    assert page_grid(5, 3.0) == (3, 2)
    assert page_grid(3, 9.0) == (3, 1)  # wider than the page: one a row


def test_eval_with_many_models_keeps_its_labels_apart(tmp_path):
    """25 models used to squeeze into 0.15 in rows (labels overlapping): every model keeps at least MIN_ROW, first by
    putting the panels side by side, then by splitting the models over pages; redrawn with fewer models, the
    pages no longer needed are removed."""
    import matplotlib.pyplot as plt

    from figures.eval import MIN_ROW, draw_eval, eval_pages

    sets = ["text", "image", "image_single", "video"]
    assert eval_pages(12, 4, 2.0) == (1.9, 12)  # the usual 2 × 2 panels
    width, per_page = eval_pages(30, 4, 2.0)
    assert width == 1.0 and per_page == 30  # one row of four panels: 8.5 in for 30 rows
    assert eval_pages(100, 4, 2.0) == (1.0, 34)  # three pages of 34, 33 and 33 (even) rather than 40, 40, 20
    for n_models, pages in ((30, 1), (100, 3)):
        d = write_scores(tmp_path / str(n_models), [f"runs/ft/checkpoint-{10 * k}" for k in range(n_models)], sets)
        written = draw_eval(d)
        assert sorted(p.name for p in written) == sorted(
            f"eval{'' if k == 1 else f'-{k}'}.{ext}" for k in range(1, pages + 1) for ext in ("png", "pdf"))
        for path in written:
            w, h = saved_inches(path)
            assert w <= PAGE_WIDTH + 0.01 and h <= PAGE_HEIGHT + 0.01, (path.name, round(w, 2), round(h, 2))
        assert not plt.get_fignums()
    # the models' rows: at least MIN_ROW apart on the page as laid out
    from figures.eval import _draw_page, read_scores
    from figures import name_colours

    scores = read_scores(tmp_path / "30")
    top = scores[scores["subject"] == "all"]
    models = list(dict.fromkeys(top["model"]))
    fig = _draw_page(top, "accuracy", models, models, sets, name_colours(models), 2.0, 1.0, "t")
    ax = fig.axes[0]
    assert ax.get_position().height * fig.get_figheight() / len(models) >= MIN_ROW * 0.95
    plt.close(fig)
    # fewer models drawn again into the same directory: pages 2 and 3 of the 100-model drawing go
    d = tmp_path / "100"
    write_scores(d, [f"m{k}" for k in range(5)], sets)
    assert [p.name for p in draw_eval(d)] == ["eval.png", "eval.pdf"]
    assert sorted(p.name for p in d.glob("eval*")) == ["eval.pdf", "eval.png"]


def test_page_split_keeps_panels_readable_over_even_pages():
    assert page_split(4, 2.1, 2.8, (2.4, 0.4)) == [range(0, 4)]
    assert page_split(6, 2.1, 2.8, (2.4, 0.4)) == [range(0, 6)]  # 2 columns × 3 rows of 2.8 in fit 9 in
    assert page_split(7, 2.1, 2.8, (2.4, 0.4)) == [range(0, 4), range(4, 7)]  # 4 + 3, not 6 + 1
    assert page_split(12, 2.3, 2.1, (0.6, 0.3)) == [range(0, 6), range(6, 12)]  # 8 a page
    assert page_split(3, 9.0, 12.0) == [range(0, 1), range(1, 2), range(2, 3)]  # bigger than a page: one each


def test_a_page_of_one_panel_is_captioned_as_one():
    """A page of one model (3 models of a 72B grid, 2 a page) was captioned "(models 3–3 of 3)"."""
    pages = [range(0, 2), range(2, 3)]
    assert [page_caption(pages, k, "models") for k in (0, 1)] == [" (models 1–2 of 3)", " (model 3 of 3)"]
    assert page_caption([range(0, 1), range(1, 2)], 0, "data sets") == " (data set 1 of 2)"
    assert page_caption([range(0, 3)], 0, "models") == ""  # one page: no caption

def test_figures_of_many_panels_go_over_pages(tmp_path):
    """12 participants, runs or models: instead of squeezing 12 pairs of heatmaps onto one page (unreadable, and
    matplotlib could not lay them out), the merge, steps and Figure 2 figures go over two pages (stem, stem-2),
    each a page at most, each panel at least its minimum height; drawn again with fewer, page 2 is removed."""
    import matplotlib.pyplot as plt

    from figures.merge import draw_merge
    from figures.report import draw_figure2
    from figures.steps import draw_steps

    def pngs(paths):
        return sorted(p.name for p in paths if p.suffix == ".png")

    runs = [write_scores(tmp_path / "steps" / f"run{k}", [f"ft/checkpoint-{s}" for s in (0, 10, 100)],
                         ["text", "image"], seed=k) for k in range(12)]
    fig2 = tmp_path / "report" / "figure2.png"
    fig2.parent.mkdir()
    drawn = {"merge": draw_merge(write_merge(tmp_path / "merge", 12)),
             "steps": draw_steps(runs, out=tmp_path / "steps"),
             "figure2": draw_figure2(write_replication(tmp_path / "rep", 11), fig2)}
    assert pngs(drawn["merge"]) == ["merge_heads-2.png", "merge_heads.png"]
    assert pngs(drawn["steps"]) == ["steps-2.png", "steps.png"]
    assert pngs(drawn["figure2"]) == ["figure2-2.png", "figure2.png"]
    assert not plt.get_fignums()
    for paths in drawn.values():
        for png in [p for p in paths if p.suffix == ".png"]:
            for path in (png, png.with_suffix(".pdf")):
                w, h = saved_inches(path)
                assert w <= PAGE_WIDTH + 0.01 and h <= PAGE_HEIGHT + 0.01, (path.name, round(w, 2), round(h, 2))
    assert pngs(draw_steps(runs[:3], out=tmp_path / "steps")) == ["steps.png"]
    assert sorted(p.name for p in (tmp_path / "steps").glob("steps*")) == ["steps.pdf", "steps.png"]
    assert draw_figure2(write_replication(tmp_path / "rep1", 0), fig2) == [fig2]  # the base alone: one page
    assert sorted(p.name for p in fig2.parent.iterdir()) == ["figure2.pdf", "figure2.png"]


def test_a_figure_saved_twice_as_pdf_is_the_same_bytes(tmp_path):
    """PDFs carried their creation time, so a stage redone with the same numbers wrote different files (and a
    merged model's dir, whose figures were part of what identified it, looked changed)."""
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from figures import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    a = save_figure(fig, tmp_path / "a.pdf")
    time.sleep(1.1)  # past the one-second resolution of a PDF date
    b = save_figure(fig, tmp_path / "b.pdf")
    plt.close(fig)
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size > 0


def test_a_clipped_salience_scale_keeps_its_colour_bar_label_on_the_page(tmp_path):
    """SmolLM2-135M's 30 × 9 heads clip the salience scale (a grid over 100 heads); the note on the colour bar ran
    in one line along it, longer than the panel is high, and past the page's bottom edge in the last row."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from figures.merge import _draw_page, _salience_grid

    d = write_merge(tmp_path / "m", 3, layers=30, heads=9)
    sals = []
    for e in sorted((tmp_path / "sal").iterdir()):
        h = pd.read_csv(e / "heads.csv")
        h.loc[:2, "kl"] = 50.0  # three sink heads: the scale stops at the 99th percentile, with its note
        h.to_csv(e / "heads.csv", index=False)
        sals.append(_salience_grid(e, "kl", (30, 9)))
    names = json.loads((d / "merge.json").read_text())
    names = [names["base"], *names["models"]]
    grids = {n: np.full((30, 9), 1 / 3) for n in names}
    fig, *_ = _draw_page(names, names, [None, *sals], [True, False, False], grids, "kl")
    fig.suptitle("Weight of each participant's query-head slices (salience merge)", fontsize=10)  # as draw_merge
    fig.tight_layout()
    fig.canvas.draw()  # as saved
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    bars = [a for a in fig.axes if "clipped" in a.yaxis.label.get_text()]
    assert len(bars) == 2
    for bar in bars:
        box = bar.yaxis.label.get_window_extent(renderer)
        assert box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1 and box.x1 <= page.x1 + 1, box
        assert box.height <= bar.get_window_extent(renderer).height * 1.05  # along its bar, not past it
    plt.close(fig)


def test_a_narrow_heatmap_keeps_its_title_on_the_page(tmp_path, monkeypatch):
    """A real LM of few heads a layer (SmolLM2-135M: 30 × 9) gets a 4.5 in wide heatmap, and its title's second line
    (model path, data set, split, engine, item count) ran past both edges: "d0/checkpoint-6 on text, … (n=16 ite"."""
    import matplotlib.pyplot as plt

    import figures.heads as fh

    d = write_heads(tmp_path / "h", 30, 9)
    baseline = json.loads((d / "baseline.json").read_text())
    baseline.update(model="/tmp/sf/ft/seed0/checkpoint-6", data="text", split="validation", method="attribution",
                    approximate=True)
    (d / "baseline.json").write_text(json.dumps(baseline))
    figs = []
    monkeypatch.setattr(fh, "save_figure", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    fh.draw_heads(d)
    assert figs
    for fig in figs:
        fig.canvas.draw()
        box = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())
        assert box.x0 >= fig.bbox.x0 - 1 and box.x1 <= fig.bbox.x1 + 1 and box.y1 <= fig.bbox.y1 + 1, box
    plt.close("all")


def colour_bar_labels(fig) -> list[tuple[object, object, object]]:
    """(label box, bar box, bar) of every vertical colour bar of ``fig``'s heatmaps, as laid out when saved."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bars = [im.colorbar for ax in fig.axes for im in ax.images if im.colorbar is not None]
    return [(cb.ax.yaxis.label.get_window_extent(renderer), cb.ax.get_window_extent(renderer), cb) for cb in bars]


def heatmap_page_is_readable(fig, columns: int, min_height: float) -> list:
    """Assert what a page of heatmaps with colour bars needs, as laid out when saved: ``columns`` columns of
    heatmaps each at least ``min_height`` inches high, each colour-bar label along its bar (3 pt past it at most)
    and on the page, no label, title or heatmap over another, a heatmap's tick labels apart. Returns the labels'
    (box, bar box, bar)."""
    labels = colour_bar_labels(fig)
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72
    for label, bar, cb in labels:
        assert label.height <= bar.height + 3 * px, (cb.ax.yaxis.label.get_text(), label.height, bar.height)
        assert fig.bbox.contains(label.x0, label.y0) and fig.bbox.contains(label.x1, label.y1)
    maps = [ax for ax in fig.axes if ax.images and ax.images[0].colorbar is not None]
    assert len({round(ax.get_position().x0, 3) for ax in maps}) == columns
    assert min(ax.get_window_extent().height for ax in maps) / fig.dpi >= min_height
    titles = [ax.title.get_window_extent(renderer) for ax in maps if ax.get_title()]
    assert all(fig.bbox.x0 <= t.x0 and t.x1 <= fig.bbox.x1 for t in titles)
    boxes = [label for label, _, _ in labels] + [ax.get_window_extent() for ax in maps] + titles
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    for ax in maps:
        # a map over another of the same heads (the merge page's weights over their salience) labels none
        labelled = [ax.yaxis] + [ax.xaxis] * ax.xaxis.get_tick_params()["labelbottom"]
        for ticks in (axis.get_ticklabels() for axis in labelled):
            shown = [t.get_window_extent(renderer) for t in ticks if t.get_text()]
            assert len(shown) >= 2 and not any(a.overlaps(b) for a, b in zip(shown, shown[1:]))
    w, h = fig.get_size_inches()
    assert w <= PAGE_WIDTH and h <= PAGE_HEIGHT
    return labels


@pytest.mark.parametrize("models", [5, 6])
@pytest.mark.parametrize("grid", [(4, 8), (28, 28)])
def test_figure2_of_many_models_keeps_its_labels_apart(tmp_path, monkeypatch, models, grid):
    """5 or 6 models went on a Figure 2 page as 3 rows × 2, each heatmap (and its colour bar) 0.6 in high: the
    labels "prob. accuracy drop [points]" and the KL's ran past both ends of their bars, into the panels above and
    below. They go 2 rows × 3 now, each heatmap at least 0.9 in high; each colour-bar label lies along its bar,
    no label, title or heatmap overlaps another, a heatmap's tick labels keep apart (28 heads in the narrower
    columns ran together, "121518"), and a long model name is wrapped to its column. Up to 4 models the page is 2 × 2
    with the labels as before."""
    import matplotlib.pyplot as plt

    import figures.report as fr

    figs = []
    monkeypatch.setattr(fr, "save_figure", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    for n in (models, 4):
        fig2 = tmp_path / f"r{n}" / "figure2.png"
        fig2.parent.mkdir()
        figs.clear()
        rep = write_replication(tmp_path / f"rep{n}", n - 1, *grid)
        rep.cfg["models"]["experts"][0] = "organism-e0-with-a-long-name-of-a-real-checkpoint"  # its sweep's folder
        (tmp_path / f"rep{n}" / "heads" / "organism-e0").rename(tmp_path / f"rep{n}" / "heads" / rep.experts[0])
        fr.draw_figure2(rep, fig2)
        assert len(figs) == 2 and figs[0] is figs[1]  # one page (png and pdf)
        fig = figs[0]
        w, h = fig.get_size_inches()
        assert w <= PAGE_WIDTH and h <= PAGE_HEIGHT
        labels = heatmap_page_is_readable(fig, 3 if n > 4 else 2, 0.9 if n > 4 else 1.0)
        assert len(labels) == 2 * n
        titles = [ax for ax in fig.axes if ax.images and ax.get_title()]
        assert len(titles) == n
        if n == 4:  # room enough: as before
            assert sorted({cb.ax.yaxis.label.get_text() for *_, cb in labels}) == [
                "KL(orig‖masked)\n[nats]", "prob. accuracy drop\n[points]"]
        plt.close("all")


def test_figure2_of_a_tall_grid_uses_the_page_height(tmp_path, monkeypatch):
    """A 72B-like sweep (80 layers × 64 heads) drew each of Figure 2's heatmaps 1.7 in high, 0.02 in a layer, on a
    page 5.2 in high with 3.8 in left below it. A page of one row of such models now takes the page's whole height
    and its maps share it: each at least 3 in high (measured as laid out), texts apart and on the page, each colour
    bar as long as its map (they grow with it: at matplotlib's aspect they stayed 1.9 in, half the 3.7 in maps). The
    organisms' 4-layer maps keep their page (margin + one panel: 0.4 + 4.8 in), as the shipped report shows."""
    import matplotlib.pyplot as plt

    import figures.report as fr

    figs = []
    close = plt.close
    monkeypatch.setattr(fr, "save_figure", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    sizes = {}
    for layers, heads in ((80, 64), (4, 8)):
        figs.clear()
        (tmp_path / f"f{layers}").mkdir()
        fr.draw_figure2(write_replication(tmp_path / f"rep{layers}", 1, layers, heads),
                        tmp_path / f"f{layers}" / "figure2.png")
        fig = figs[0]
        fig.canvas.draw()
        maps = [ax for ax in fig.axes if ax.images and ax.images[0].colorbar is not None]
        assert len(maps) == 4
        sizes[layers] = fig.get_size_inches()[1], min(ax.get_position().height for ax in maps) * fig.get_figheight()
        for ax in maps:  # each colour bar as long as its map, as on a page of shorter maps (80 layers: half of it)
            bar = ax.images[0].colorbar.ax.get_window_extent(fig.canvas.get_renderer())
            assert bar.height >= 0.9 * ax.get_window_extent().height, (layers, bar.height / fig.dpi)
        if layers == 80:
            assert overlapping_texts(fig) == []
            renderer = fig.canvas.get_renderer()
            for t in drawn_texts(fig):
                box = t.get_window_extent(renderer)
                assert fig.bbox.y0 - 1 <= box.y0 and box.y1 <= fig.bbox.y1 + 1, t.get_text()
        close("all")
    assert sizes[80][0] == pytest.approx(PAGE_HEIGHT) and sizes[80][1] >= 3.0, sizes
    assert sizes[4][0] == pytest.approx(0.4 + 4.8) and sizes[4][1] < 2.0, sizes


@pytest.mark.parametrize("models, grid", [(4, (80, 8)), (5, (4, 64))])
def test_figure2_keeps_a_big_grids_cells_readable_on_pages_of_several_models(tmp_path, monkeypatch, models, grid):
    """Only a page of one row took the page's height a tall grid needs: 3 or 4 models of 80 layers went 2 rows, each
    map 1.58 in high (0.0197 in a layer, 2.2 pixels of the PNG; one row: 3.73 in), a quarter of a 3 models' page left
    empty; and 5 or 6 models of 64 heads went 3 columns, each map 0.72 in wide (0.011 in a head, 1.2 pixels, so
    neighbouring heads ran together). A page now holds fewer models where more would leave a layer's row or a head's
    column under 0.025 in (2.75 pixels), the pages as even as they can be: measured as laid out, every map's cells
    are at least that, every page holds more than one model, its texts apart and on the page, the page a paper's."""
    import matplotlib.pyplot as plt

    import figures.report as fr

    figs = []
    close = plt.close
    monkeypatch.setattr(fr, "save_figure", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    (tmp_path / "f").mkdir()
    fr.draw_figure2(write_replication(tmp_path / "rep", models - 1, *grid), tmp_path / "f" / "figure2.png")
    pages = figs[::2]  # each page saved as png and pdf
    drawn = 0
    for fig in pages:
        maps = readable_maps(fig, grid)
        assert len(maps) >= 4  # two models a page at the least (4: 2 + 2; 5: 3 + 2), no page of one where two fit
        drawn += len(maps) // 2
    assert drawn == models
    close("all")


def readable_maps(fig, grid: tuple[int, int], bars: bool = False) -> list:
    """``fig``'s heatmaps (axes with a colour bar), each checked to be of ``grid`` with cells of at least 0.025 in
    each way (and, with ``bars``, a colour bar at least 0.9 of its height), the page's texts apart and on it, the
    page within PAGE_WIDTH × PAGE_HEIGHT."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    maps = [ax for ax in fig.axes if ax.images and ax.images[0].colorbar is not None]
    for ax in maps:
        box = ax.get_window_extent(renderer)
        rows, cols = ax.images[0].get_array().shape
        assert (rows, cols) == grid
        assert box.height / fig.dpi / rows >= 0.025 and box.width / fig.dpi / cols >= 0.025, (
            box.height / fig.dpi, box.width / fig.dpi)
        if bars:
            bar = ax.images[0].colorbar.ax.get_window_extent(renderer)
            assert bar.height >= 0.9 * box.height, (bar.height / fig.dpi, box.height / fig.dpi)
    assert overlapping_texts(fig) == []
    for t in drawn_texts(fig):
        b = t.get_window_extent(renderer)
        assert fig.bbox.x0 - 1 <= b.x0 and b.x1 <= fig.bbox.x1 + 1 and fig.bbox.y0 - 1 <= b.y0 \
            and b.y1 <= fig.bbox.y1 + 1, t.get_text()
    w, h = fig.get_size_inches()
    assert w <= PAGE_WIDTH and h <= PAGE_HEIGHT
    return maps


def drawn_texts(fig) -> list:
    """Every text of ``fig`` that is drawn: the suptitle, each visible axes' titles, axis labels, texts and the tick
    labels inside its view (matplotlib keeps labels of ticks past the ends, visible but not drawn)."""
    out = list(fig.texts)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        out += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        if not ax.axison:  # set_axis_off: its axis labels and tick labels are not drawn
            continue
        out += [ax.xaxis.label, ax.yaxis.label]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            eps = 1e-9 * max(1.0, hi - lo)
            out += [t for tick, loc in zip(axis.get_major_ticks(), axis.get_majorticklocs())
                    if lo - eps <= loc <= hi + eps for t in (tick.label1, tick.label2)]
            out.append(axis.get_offset_text())
    return [t for t in out if t.get_visible() and t.get_text()]


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """The pairs of ``drawn_texts`` whose boxes overlap, as laid out when saved."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)]
    return [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1:] if box.overlaps(other)]


def figure2_gaps(fig) -> tuple[list[float], list[float]]:
    """Figure 2's vertical gaps in inches (figure coordinates): between a model's KL and drop heatmaps, and between
    one model's drop map and the KL map of the model below it, column by column."""
    maps = [ax for ax in fig.axes if ax.images and ax.images[0].colorbar is not None]
    columns: dict[float, list] = {}
    for ax in maps:
        columns.setdefault(round(ax.get_position().x0, 3), []).append(ax)
    within, between = [], []
    for col in columns.values():
        col.sort(key=lambda ax: -ax.get_position().y1)  # top first: KL, drop, KL, drop, ...
        assert [ax.images[0].get_cmap().name for ax in col] == ["magma_r", "RdBu_r"] * (len(col) // 2)
        for i, (upper, lower) in enumerate(zip(col, col[1:])):
            gap = (upper.get_position().y0 - lower.get_position().y1) * fig.get_figheight()
            (within if i % 2 == 0 else between).append(gap)
    return within, between


# 1, 2, 5, 6 and 7 models give every kind of page Figure 2 has (up to 6 models a page, past that pages as even as
# they can be): 1 × 1, 2 × 1, 3 × 2 less one, 3 × 2, and over two pages (captioned) 2 × 2 (4 of 7) and 2 × 2 less
# one (3 of 7); 3, 4 and 8 models drew only these pages again (8: two pages of 4), so they are left out (10 s)
@pytest.mark.parametrize("grid, counts", [((4, 8), (1, 2, 5, 6, 7)), ((28, 28), (3, 6))])
def test_figure2_groups_each_models_two_heatmaps(tmp_path, monkeypatch, grid, counts):
    """A model's KL map and its probability-accuracy drop below it are one block: the gap between them was the gap
    between two models (0.84 in both, 3 to 8 models), so the eye paired a model's drop with the next model's KL.
    For every kind of page of 1 to 8 models (up to 6 a page; a 7B-like 28 × 28 grid for 3 and 6) the gap inside a
    block is under half the gap between blocks, every page's drawn texts (titles, colour-bar labels and ticks, tick
    labels) keep apart and on the page, and the heatmaps, titles and bar labels stay readable as before."""
    import matplotlib.pyplot as plt

    import figures.report as fr

    figs = []
    close = plt.close  # the real one: draw_figure2's is kept from closing the figures measured here
    monkeypatch.setattr(fr, "save_figure", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    for n in counts:
        figs.clear()
        (tmp_path / f"f{n}").mkdir()
        fr.draw_figure2(write_replication(tmp_path / f"rep{n}", n - 1, *grid), tmp_path / f"f{n}" / "figure2.png")
        pages = figs[::2]  # each page saved as png and pdf
        assert len(pages) == (1 if n <= 6 else 2)
        for fig in pages:
            within, between = figure2_gaps(fig)
            per_page = len([ax for ax in fig.axes if ax.images and ax.images[0].colorbar is not None]) // 2
            assert len(within) == per_page
            assert len(between) == per_page - len({round(ax.get_position().x0, 3) for ax in fig.axes
                                                   if ax.images and ax.images[0].colorbar is not None})
            assert 0.1 <= min(within) and max(within) - min(within) < 0.02, within  # the same in every block
            if between:  # more than one row of models
                assert max(within) < 0.5 * min(between), (n, within, between)
            assert overlapping_texts(fig) == [], n
            renderer = fig.canvas.get_renderer()
            for t in drawn_texts(fig):
                box = t.get_window_extent(renderer)
                assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1 and fig.bbox.y0 - 1 <= box.y0 \
                    and box.y1 <= fig.bbox.y1 + 1, t.get_text()
            heatmap_page_is_readable(fig, min(per_page, 3 if per_page > 4 else 2), 0.9)
        close("all")


@pytest.mark.parametrize("models, sets", [(5, 9), (8, 12), (4, 4)])
def test_eval_of_many_data_sets_keeps_panel_titles_and_marks_apart(tmp_path, models, sets):
    """9 or 12 data sets put 4 or 5 panels of 1 in on a row: their titles ("text_hard (n=64)mmmu_val (n=64)") ran
    into each other and "n/a (modality)" past both edges of its panel. Each title now fits over its panel (its
    count on a second line) and a narrow panel's mark reads "n/a"; 4 data sets keep their one-line titles."""
    import matplotlib.pyplot as plt

    from figures import name_colours
    from figures.eval import _draw_page, read_scores

    names = ["organism-base", "organism-vl", "Qwen/Qwen2-VL-7B-Instruct", "runs/merge/shift/carriers/organism-vl",
             "organism-ov-si", "organism-video", "llava-hf/llava-onevision-qwen2-7b-si-hf", "runs/ft/checkpoint-200"]
    data = ["text", "image", "image_single", "video", "audio", "text_hard", "mmmu_val", "gpqa", "mmlu_pro",
            "videomme", "ifeval", "math"]
    scores = read_scores(write_scores(tmp_path, names[:models], data[:sets]))  # the first model cannot read the last
    top = scores[scores["subject"] == "all"]
    fig = _draw_page(top, "accuracy", names[:models], names[:models], data[:sets], name_colours(names[:models]),
                     2.6, 1.9 if sets <= 4 else 1.0, "Evaluation")
    w, h = fig.get_size_inches()
    assert w <= PAGE_WIDTH + 0.01 and h <= PAGE_HEIGHT + 0.01
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == sets
    titles = [ax.title.get_window_extent(renderer) for ax in panels]
    for ax, t in zip(panels, titles):
        assert t.width <= ax.get_window_extent(renderer).width, ax.get_title()
    assert not any(a.overlaps(b) for i, a in enumerate(titles) for b in titles[i + 1:])
    marks = [t for ax in panels for t in ax.texts if t.get_text().startswith("n/a")]
    assert len(marks) == 1
    box, panel = marks[0].get_window_extent(renderer), marks[0].axes.get_window_extent(renderer)
    assert panel.x0 <= box.x0 and box.x1 <= panel.x1, marks[0].get_text()
    if sets == 4:  # room enough: as before
        assert [ax.get_title() for ax in panels] == [f"{d} (n=64)" for d in data[:4]]
        assert marks[0].get_text() == "n/a (modality)"
    plt.close(fig)


def test_trajectory_of_many_runs_and_experts_keeps_names_inside_the_maps(tmp_path, monkeypatch):
    """8 fine-tuning runs and 8 experts on one map: separating their names pushed some up past the panel's top,
    over its title ("organism-vl" across "t-SNE: random-projection sketch ..."), and a long name ran across its map
    into the next. Every name lies inside its map, clear of the titles; a long one in two lines."""
    import matplotlib.pyplot as plt
    import pandas as pd

    import figures.trajectory as ft

    d = write_trajectory(tmp_path / "t", ["text", "image", "video", "mixed", "audio", "image+video", "long-run-name",
                                           "seed1/mixed"])
    coords = pd.read_csv(d / "coords.csv", keep_default_na=False).replace(
        "zoo/organism-base-of-the-organism-family", "organism-base")  # a name that fits its map
    rng = np.random.default_rng(1)
    extra = []
    for (feature, method), _ in coords.groupby(["feature", "method"], sort=False):
        extra += [[f"organism-x{k}" if k else "llava-hf/llava-onevision-qwen2-7b-si-hf", "expert", "", "", feature,
                   method, *rng.normal(0, 3, 2)] for k in range(5)]
    pd.concat([coords, pd.DataFrame(extra, columns=coords.columns)]).to_csv(d / "coords.csv", index=False)
    info = json.loads((d / "run.json").read_text())
    (d / "run.json").write_text(json.dumps(info | {"n_points": info["n_points"] + 5}))
    figs = []
    monkeypatch.setattr(ft, "save", lambda fig, path: figs.append(fig) or [])
    ft.draw_trajectory(d)
    assert len(figs) == 2
    for fig in figs:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        maps = [ax for ax in fig.axes if ax.get_visible()]
        titles = [ax.title.get_window_extent(renderer) for ax in maps]
        names = [t for ax in maps for t in ax.texts if t.get_text()]
        assert len(names) == 2 * (8 + 8 + 2)  # per map: each run's last step, the experts, base and merged
        # a long name in two lines (in one it ran across the map into the next)
        long = {t.get_text() for t in names if "onevision" in t.get_text()}
        assert long == {"llava-hf/llava-\nonevision-qwen2-7b-si-hf"}
        for t in names:
            box, area = t.get_window_extent(renderer), t.axes.get_window_extent(renderer)
            assert area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1, t.get_text()
            assert not any(box.overlaps(title) for title in titles), t.get_text()
        plt.close(fig)


# Figure 4b of the committed example (figures/examples/report_figures/fig4b.png): base, experts and merges of a
# default replication, relative to the base, as analyses.trajectory wrote them to coords.csv (x, y per map)
FIG4B = {
    "organism-base": ("base", {"norms": [(-12.05236, 1.589702), (-23.41831, 74.08575)],
                               "sketch": [(11.08014, 1.962780), (51.38530, -6.321022)]}),
    "organism-vl": ("expert", {"norms": [(16.16737, 1.172245), (-10.79195, -105.1479)],
                               "sketch": [(-19.32087, 3.317379), (-39.79556, -48.27285)]}),
    "organism-ov-si": ("expert", {"norms": [(-7.997813, -1.137395), (95.21523, -7.437748)],
                                  "sketch": [(9.803211, 1.617358), (-9.647330, 72.88712)]}),
    "organism-video": ("expert", {"norms": [(-2.822620, -3.601889), (64.80367, -80.70407)],
                                  "sketch": [(8.571109, -2.264076), (-10.80589, 9.050867)]}),
    "runs/replicate/merge/average": ("merged", {"norms": [(-3.575646, 1.169715), (-81.28373, 19.73232)],
                                                "sketch": [(2.522286, 1.168206), (15.44941, -48.21271)]}),
    "runs/replicate/merge/shift": ("merged", {"norms": [(2.031131, 1.387843), (3.327971, -14.05584)],
                                              "sketch": [(-4.054851, 2.517829), (39.36964, 47.57371)]}),
    "runs/replicate/merge/salience": ("merged", {"norms": [(1.374272, 2.490805), (54.76537, 60.77859)],
                                                 "sketch": [(-3.076757, 2.942191), (-59.70214, 49.54292)]}),
    "runs/replicate/merge/ties": ("merged", {"norms": [(6.875663, -3.071027), (-75.71763, -59.42383)],
                                             "sketch": [(-5.524263, -11.26167), (-72.90685, -4.024582)]}),
}


def write_points(d: Path, points: dict) -> Path:
    """An analyses.trajectory output of models only (no runs): ``points`` as FIG4B, name -> (kind, {feature:
    [PCA xy, t-SNE xy]})."""
    import pandas as pd

    rows = [[name, kind, "", "", feature, method, *xy] for name, (kind, maps) in points.items()
            for feature, xys in maps.items() for method, xy in zip(("pca", "tsne"), xys)]
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["name", "kind", "run", "step", "feature", "method", "x", "y"]).to_csv(
        d / "coords.csv", index=False)
    (d / "run.json").write_text(json.dumps({"ref": "organism-base", "perplexity_used": 7, "n_points": len(points),
                                            "pca_explained_variance": {"norms": [0.93, 0.06], "sketch": [0.74, 0.17]},
                                            "maps": {"norms": ["pca", "tsne"], "sketch": ["pca", "tsne"]}}))
    return d


def label_clashes(fig) -> list[str]:
    """What is wrong with the point labels of a trajectory figure as saved: a label past its map's edge, over
    another label, or over a marker other than its own (any marker whose box holds the label's point is its own:
    a run's first checkpoint lies under the model it starts from). Markers are measured from the scatter plots
    themselves: each point's marker path at its size."""
    from matplotlib.collections import PathCollection
    from matplotlib.transforms import Affine2D, Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    wrong = []
    for ax in [ax for ax in fig.axes if ax.get_visible()]:
        markers = []
        for col in ax.collections:
            if isinstance(col, PathCollection):
                scales = col.get_transforms()
                for i, (x, y) in enumerate(col.get_offset_transform().transform(col.get_offsets())):
                    e = col.get_paths()[0].get_extents(Affine2D(scales[i % len(scales)]))
                    markers.append(Bbox.from_extents(x + e.x0, y + e.y0, x + e.x1, y + e.y1))
        labels = [t for t in ax.texts if t.get_text()]
        boxes = [t.get_window_extent(renderer) for t in labels]
        area = ax.get_window_extent(renderer)
        for k, (t, box) in enumerate(zip(labels, boxes)):
            point = ax.transData.transform(t.xy)
            if not (area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1):
                wrong.append(f"{t.get_text()!r} past its map's edge")
            wrong += [f"{t.get_text()!r} over a marker" for m in markers if not m.contains(*point) and box.overlaps(m)]
            wrong += [f"{t.get_text()!r} over {u.get_text()!r}" for u, other in zip(labels[k + 1:], boxes[k + 1:])
                      if box.overlaps(other)]
    return wrong


def label_layout(fig) -> tuple[int, int, float]:
    """How well a trajectory figure's point labels sit, as saved: the clashes (``label_clashes``), the leader lines
    (``place_labels`` draws each as an annotation without text, a thin grey line) and the farthest label from its
    point, in points (from the point to the nearest point of the label's text box; 0 where the box holds it)."""
    import math

    clashes = label_clashes(fig)  # draws the figure
    renderer = fig.canvas.get_renderer()
    leaders, farthest = 0, 0.0
    for ax in [ax for ax in fig.axes if ax.get_visible()]:
        for t in ax.texts:
            if not t.get_text():
                leaders += (t.arrowprops or {}).get("color") == "0.5"
                continue
            box, (x, y) = t.get_window_extent(renderer), ax.transData.transform(t.xy)
            dx, dy = max(box.x0 - x, x - box.x1, 0.0), max(box.y0 - y, y - box.y1, 0.0)
            farthest = max(farthest, math.hypot(dx, dy) * 72 / fig.dpi)
    return len(clashes), leaders, farthest


def crowded_points(seed: int = 0) -> dict:
    """13 models, 12 of them within about a point's marker of one another and one far off (it squeezes the others
    into a corner of the map), names of 4 to 15 characters."""
    rng = np.random.default_rng(seed)
    names = [("organism-base", "base"), *((f"organism-x{k}", "expert") for k in range(5)),
             *((m, "merged") for m in ("average", "shift", "salience", "ties", "task-arithmetic", "dare"))]
    points = {n: (kind, {f: [tuple(rng.normal(0, 0.6, 2)), tuple(rng.normal(0, 0.6, 2))] for f in ("norms", "sketch")})
              for n, kind in names}
    points["organism-base"] = ("base", {f: [(0.0, 0.0), (0.0, 0.0)] for f in ("norms", "sketch")})
    points["organism-far"] = ("expert", {f: [(12.0, 1.0), (12.0, 1.0)] for f in ("norms", "sketch")})
    return points


@pytest.mark.parametrize("case", ["example", "crowded"])
def test_trajectory_labels_keep_off_markers_and_each_other(tmp_path, monkeypatch, case):
    """Figure 4b's PCA map has the base, two experts and the merges within a few points of one another: the
    names, moved only up or down from a fixed side, ran into each other's area ("organism-ov-si" over the merges'
    names), covered other models' markers, and two ("organism-base", "average") sat far from their markers at the
    end of long lines. On the example's own coordinates and on 13 crowded models, every name (each map of both
    features) lies inside its map, over no other name and over no marker but its own; and the same results draw
    the same bytes."""
    import matplotlib.pyplot as plt

    import figures.trajectory as ft

    from matplotlib.figure import Figure

    d = write_points(tmp_path / "t", FIG4B if case == "example" else crowded_points())
    figs: list = []
    save = Figure.savefig

    def savefig(self, fname, *a, **k):  # the figures as saved, kept to measure (not drawn a third time for it)
        if self not in figs:
            figs.append(self)
        return save(self, fname, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    monkeypatch.setattr(plt, "close", lambda fig=None: None)  # kept open (with their canvas) to measure
    first = [p.read_bytes() for p in ft.draw_trajectory(d)]
    monkeypatch.undo()
    assert len(figs) == 2
    for fig in figs:
        names = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_text()]
        assert len(names) == 2 * (8 if case == "example" else 13)
        assert label_clashes(fig) == []
        plt.close(fig)
    assert first == [p.read_bytes() for p in ft.draw_trajectory(d)]


def test_trajectory_labels_sit_close_to_their_points(tmp_path, monkeypatch):
    """With 12 fixed directions 4 points apart, Figure 4b's names kept off each other and the markers, but the
    farthest sat 20.5 pt from its point on the sketch map (18.4 on the norms map), and 13 crowded models' names up
    to 52 pt, with 15 and 13 leaders (now 33 and 36 pt, 14 and 12 leaders). Measured with the renderer
    (``label_layout``): no clash, leaders only where 4b's base and organism-ov-si, whose markers overlap, leave no
    free place beside them (16.4 pt is the least found there without a clash), and a lone model's name exactly at
    its marker's edge plus the 2 pt gap."""
    import matplotlib.pyplot as plt

    import figures.trajectory as ft

    def drawn(points: dict, name: str) -> list:
        figs: list = []
        monkeypatch.setattr(ft, "save", lambda fig, path: figs.append(fig) or [])
        ft.draw_trajectory(write_points(tmp_path / name, points))
        layouts = [label_layout(fig) for fig in figs]
        plt.close("all")
        return layouts

    (clashes, leaders, norms), (clashes2, leaders2, sketch) = drawn(FIG4B, "4b")
    assert (clashes, clashes2) == (0, 0) and leaders == 0 and leaders2 <= 2
    assert norms <= 14 and sketch <= 17
    for clashes, leaders, farthest in drawn(crowded_points(), "crowded"):
        assert clashes == 0 and leaders <= 14 and farthest <= 40
    # two experts far apart: a square marker of area 70 pt² (STYLE) and a 0.6 pt edge, so its name's box starts
    # sqrt(70) / 2 + 0.3 + 2 points from the point, whichever side it is on
    alone = {f"organism-x{k}": ("expert", {f: [(10.0 * k, 0.0), (10.0 * k, 0.0)] for f in ("norms", "sketch")})
             for k in range(2)}
    for clashes, leaders, farthest in drawn(alone, "alone"):
        assert (clashes, leaders) == (0, 0) and farthest == pytest.approx(70 ** 0.5 / 2 + 0.3 + 2, abs=0.05)


def test_trajectory_labels_were_crowded_before(tmp_path, monkeypatch):
    """The check above finds what it is for: the same example drawn with labels where the old rule put them
    (``separate_labels``: each moved straight up or down, in order, off the ones before it) clashes: names over
    other models' markers. The old call's leader lines and its keeping names inside the map (options since
    removed) left the same clashes on this example."""
    import matplotlib.pyplot as plt

    import figures
    import figures.trajectory as ft

    def old_rule(ax, texts):
        figures.separate_labels(texts[::-1])

    figs = []
    monkeypatch.setattr(ft, "save", lambda fig, path: figs.append(fig) or [])
    monkeypatch.setattr(ft, "place_labels", old_rule)
    ft.draw_trajectory(write_points(tmp_path / "t", FIG4B))
    assert label_clashes(figs[1])  # the sketch's maps: Figure 4b as shipped before
    plt.close("all")


@pytest.mark.parametrize("models", [3, 8])
def test_shift_numbers_of_many_models_keep_apart(tmp_path, monkeypatch, models):
    """8 models put their dots 0.6 in apart and each number ("0.0018 (1.4×)", 0.9 in wide) ran over its
    neighbours' (separating them stacked them far above their dots). Where numbers run into each other, every
    model's has its ratio on a second line, within the room between two dots; no two numbers overlap. 3 models
    (numbers apart) keep one-line numbers."""
    import matplotlib.pyplot as plt

    import figures.shift as fs

    figs = {}
    monkeypatch.setattr(fs, "save", lambda fig, path: figs.setdefault(path.name, fig) and [])
    names = ["organism-vl", "organism-ov-si", "organism-video", "Qwen/Qwen2-VL-7B-Instruct", "carriers/organism-vl",
             "llava-hf/llava-onevision-qwen2-7b-si-hf", "mixed/checkpoint-200", "organism-audio"]
    fs.draw_shift(write_shift(tmp_path / "s", names[:models], 4, ["self_attn.q_proj.weight", "mlp.up_proj.weight"]))
    fig = figs["shift_models"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    numbers = [t for t in ax.texts if "×" in t.get_text()]
    assert len(numbers) == models
    boxes = [t.get_window_extent(renderer) for t in numbers]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(("\n" in t.get_text()) == (models > 3) for t in numbers)
    if models > 3:  # each within the room between two dots
        room = ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0]
        assert max(b.width for b in boxes) <= room
    plt.close("all")


@pytest.mark.parametrize("participants", [5, 6])
@pytest.mark.parametrize("grid", [(4, 8), (28, 28)])
def test_merge_of_many_participants_keeps_its_labels_apart(tmp_path, monkeypatch, participants, grid):
    """5 or 6 participants of a salience merge went 3 rows × 2, each heatmap 0.75 in high, and "merge weight $w_i$"
    ran past its bar. They go 2 rows × 3 now (heatmaps at least 0.9 in high), with every label along its bar and
    apart, as Figure 2; 4 participants stay 2 × 2."""
    import matplotlib.pyplot as plt

    import figures.merge as fm

    figs = []
    monkeypatch.setattr(fm, "save_png_pdf", lambda fig, d, stem: figs.append(fig) or [])
    for n in (participants, 4):
        figs.clear()
        fm.draw_merge(write_merge(tmp_path / f"m{n}" / "merge", n, *grid))
        assert len(figs) == 1
        heatmap_page_is_readable(figs[0], 3 if n > 4 else 2, 0.9)
        plt.close("all")


LONG_NAME = "organism-qwen2-72b-instruct-expert-vlm-{k}"  # a 72B checkpoint's folder name: 40 characters


def test_merge_of_many_long_named_participants_keeps_its_titles_apart_and_on_the_page(tmp_path, monkeypatch):
    """6 participants go 3 columns of 1.9 in; a 40-character checkpoint name as a title (2.5 in wide at 8 pt) ran
    into its neighbours' and 0.25 in past the page's left edge. A title is wrapped where it does not fit, as Figure
    2's are: every drawn text apart and on the page, each title its participant's name whole."""
    import matplotlib.pyplot as plt

    import figures.merge as fm

    figs = []
    monkeypatch.setattr(fm, "save_png_pdf", lambda fig, d, stem: figs.append(fig) or [])
    fm.draw_merge(write_merge(tmp_path / "merge", 6, name=LONG_NAME))
    fig, = figs
    assert overlapping_texts(fig) == []
    renderer = fig.canvas.get_renderer()
    for t in drawn_texts(fig):
        b = t.get_window_extent(renderer)
        assert fig.bbox.x0 - 1 <= b.x0 and b.x1 <= fig.bbox.x1 + 1 and fig.bbox.y0 - 1 <= b.y0 \
            and b.y1 <= fig.bbox.y1 + 1, t.get_text()
    titles = [ax.get_title().replace("\n", "") for ax in fig.axes if ax.get_title().startswith("organism")]
    assert titles == [LONG_NAME.format(k=k) for k in range(6)]
    plt.close("all")


@pytest.mark.parametrize("participants, grid", [(3, (80, 8)), (6, (4, 64)), (2, (80, 8))])
def test_merge_keeps_a_big_grids_cells_readable(tmp_path, monkeypatch, participants, grid):
    """A 72B merge's 80 layers × 64 heads: 3 or 4 participants went 2 rows, each map 1.46 in high (0.018 in a
    layer), 5 or 6 went 3 columns, each map 0.86 in wide (0.013 in a head, the labels 0 11 22 … run together), and
    a page of one row (2 participants) left its maps 1.9 in high on a page 5.6 in high. As Figure 2: a page holds
    fewer participants where more would leave a layer's row or a head's column under 0.025 in, a page of one row of
    tall maps takes the height they need, their colour bars as long as the maps. Measured as laid out: every
    map's cells at least 0.025 in each way, each bar at least 0.9 of its map, texts apart and on the page."""
    import matplotlib.pyplot as plt

    import figures.merge as fm

    figs = []
    monkeypatch.setattr(fm, "save_png_pdf", lambda fig, d, stem: figs.append(fig) or [])
    fm.draw_merge(write_merge(tmp_path / "merge", participants, *grid))
    drawn = 0
    for fig in figs:
        maps = readable_maps(fig, grid, bars=True)
        drawn += sum(ax.get_title().startswith("expert-") for ax in maps)
    assert drawn == participants
    plt.close("all")


@pytest.mark.parametrize("participants, grid", [(4, (4, 8)), (6, (4, 8))])
def test_merge_groups_each_participants_two_heatmaps(tmp_path, monkeypatch, participants, grid):
    """A participant's weight map and its salience below it are one block: the gap between them was the gap between
    two participants (0.68 in both on the shipped 4-participant page and 6 of 4 × 8; 6 of 28 × 28: 0.83 in), so
    the eye could pair a salience with the next participant's weights, as Figure 2's maps were before. The gap
    inside a block (axes to axes, in inches) is now under half the gap between blocks, and the page stays readable
    as before."""
    import matplotlib.pyplot as plt

    import figures.merge as fm

    figs = []
    monkeypatch.setattr(fm, "save_png_pdf", lambda fig, d, stem: figs.append(fig) or [])
    fm.draw_merge(write_merge(tmp_path / "merge", participants, *grid))
    fig, = figs
    fig.canvas.draw()
    columns: dict[float, list] = {}
    for ax in fig.axes:  # a participant's two axes (its base's lower one turned off), not the colour bars
        if ax.get_visible() and ax.get_label() != "<colorbar>":
            columns.setdefault(round(ax.get_position().x0, 3), []).append(ax)
    within, between = [], []
    for col in columns.values():
        col.sort(key=lambda ax: -ax.get_position().y1)
        for i, (upper, lower) in enumerate(zip(col, col[1:])):
            (within if i % 2 == 0 else between).append((upper.get_position().y0 - lower.get_position().y1)
                                                         * fig.get_figheight())
    assert len(within) == participants and len(between) == participants - len(columns)
    assert max(within) < 0.5 * min(between), (within, between)
    heatmap_page_is_readable(fig, 3 if participants > 4 else 2, 0.9)
    plt.close("all")


@pytest.mark.parametrize("models", [4, 6])
def test_figure2_of_a_clipped_scale_keeps_its_note_along_the_bar(tmp_path, monkeypatch, models):
    """A 7B-like sweep (28 × 28 heads, a few outlier heads) clips each colour scale, and its label gains a note
    ("scale clipped at the 99th percentile; 8 past it, up to 9"): in one line it ran far past the bar with 4 models;
    with 6, wrapping it narrowed the heatmap, which shortened its bar (20 times its width), and the first column's
    title was cut at the page's edge. The note lies along its bar and everything stays apart and on the page."""
    import matplotlib.pyplot as plt
    import pandas as pd

    import figures.report as fr

    figs = []
    monkeypatch.setattr(fr, "save_figure", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    rep = write_replication(tmp_path / "rep", models - 1, 28, 28)
    for d in (tmp_path / "rep" / "heads").iterdir():
        h = pd.read_csv(d / "heads.csv")
        h.loc[:7, "kl"] = 9.0  # outlier heads: past twice the 99th percentile
        h.loc[:7, "prob_accuracy"] = 0.1
        h["prob_accuracy_drop"] = 0.9 - h["prob_accuracy"]
        h.to_csv(d / "heads.csv", index=False)
    (tmp_path / "f").mkdir()
    fr.draw_figure2(rep, tmp_path / "f" / "figure2.png")
    labels = heatmap_page_is_readable(figs[0], 3 if models > 4 else 2, 0.9)
    assert len(labels) == 2 * models and all("clipped" in cb.ax.yaxis.label.get_text() for *_, cb in labels)
    plt.close("all")


@pytest.mark.parametrize("means", [{"organism-vl": 0.015, "organism-ov-si": 0.0037, "organism-video": 0.0077},
                                   {"organism-vl": 0.0081, "organism-ov-si": 0.00077, "organism-video": 0.0123}])
def test_shift_numbers_stay_inside_their_panel(tmp_path, monkeypatch, means):
    """Each model's number is centred over its dot; over the first or last dot a wide one ("0.0077 (2.1×)", the
    replication report's) ended on the panel's frame, or past it. The panel's x range now widens to hold them: each
    at least 1.5 pt inside its left and right edges, its dot still under its centre."""
    import matplotlib.pyplot as plt
    import pandas as pd

    import figures.shift as fs

    d = tmp_path / "s"
    d.mkdir()
    rows = [[m, f"layers.{l}.mlp.up_proj.weight", l, "mlp.up_proj.weight", 4096, v * (0.7 + 0.2 * l)]
            for m, v in means.items() for l in range(4)]  # per model, its four layers' mean is its mean
    pd.DataFrame(rows, columns=["model", "tensor", "layer", "module", "numel", "delta_avg"]).to_csv(
        d / "shift.csv", index=False)
    (d / "summary.json").write_text(json.dumps({"per_model": {m: {"n_tensors": 4, "numel": 4 * 4096}
                                                              for m in means}}), encoding="utf-8")
    figs = {}
    monkeypatch.setattr(fs, "save", lambda fig, path: figs.setdefault(path.name, fig) and [])
    fs.draw_shift(d)
    fig = figs["shift_models"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    frame = ax.get_window_extent(renderer)
    numbers = [t for t in ax.texts if "×" in t.get_text()]
    assert [float(t.get_text().split()[0]) for t in numbers] == [float(f"{v:.2g}") for v in means.values()]
    pad = 1.5 * fig.dpi / 72
    for i, t in enumerate(numbers):
        box = t.get_window_extent(renderer)
        assert box.x0 >= frame.x0 + pad and box.x1 <= frame.x1 - pad, (t.get_text(), box, frame)
        assert abs((box.x0 + box.x1) / 2 - ax.transData.transform((i, 1))[0]) < 1  # still over its dot
    plt.close("all")


@pytest.mark.parametrize("inches, dpi", [((7.0, 4.5), 150), ((7.0, 9.0), 110), ((7.0, 3.0), 300)])
def test_report_figures_keep_their_size_in_inches(tmp_path, inches, dpi):
    """The report's copy of a figure (figures.report._copy_png: downscaled past 1100 px) was saved without its
    resolution, so a paper took the 7 in figures at 72 dpi (pdfLaTeX's default), 14.6 in wide, and their 7 pt text
    at 3.4 pt once fitted to the page width. The copy keeps the figure's size in inches: its dpi, scaled with it."""
    import matplotlib.pyplot as plt

    from figures.report import MAX_WIDTH, _copy_png

    fig = plt.figure(figsize=inches, dpi=dpi)
    fig.text(0.5, 0.5, "x", fontsize=7)
    src = tmp_path / "src.png"
    fig.savefig(src, dpi=dpi)
    plt.close(fig)
    assert _copy_png(src, tmp_path / "copy.png")
    with Image.open(tmp_path / "copy.png") as im:
        assert im.width == min(round(inches[0] * dpi), MAX_WIDTH)
    assert saved_inches(tmp_path / "copy.png") == pytest.approx(inches, abs=0.01)


def test_lines_told_apart_by_colour_are_told_apart_by_marker_too(tmp_path, monkeypatch):
    """Figure 3's data sets (tab10's cyan and blue) and the shift-by-depth models (olive and green) were lines of
    one marker told apart by colour alone, which a red-green or blue-yellow colour-blind reader, or a greyscale
    print, cannot: each line of a panel now has its own marker, the legend shows it, and a data set or model keeps
    its marker in every panel and whatever the order it comes in."""
    import matplotlib.pyplot as plt

    import figures.shift as fs
    import figures.steps as fst

    figs: list = []
    monkeypatch.setattr(fst, "save_png_pdf", lambda fig, *a, **k: figs.append(fig) or [])
    monkeypatch.setattr(fs, "save", lambda fig, path: figs.append(fig) or [])
    sets = ["text", "image", "video", "image_single"]
    runs = [write_scores(tmp_path / f"run{k}", [f"runs/ft/checkpoint-{s}" for s in (0, 10, 30)], sets[k:] + sets[:k], seed=k)
            for k in range(3)]  # each run lists the sets in another order
    fst.draw_steps(runs)
    models = ["organism-vl", "organism-ov-si", "organism-video"]
    fs.draw_shift(write_shift(tmp_path / "s", models, 4, ["self_attn.q_proj.weight", "mlp.up_proj.weight"]))
    steps, shift = figs[0], figs[-1]
    for fig, axes, names in ((steps, [ax for ax in steps.axes if ax.get_visible()], sets), (shift, shift.axes[1:2],
                                                                                                models)):
        markers = {}
        for ax in axes:
            lines = [ln for ln in ax.get_lines() if ln.get_label() in names]
            assert sorted(ln.get_label() for ln in lines) == sorted(names)
            assert len({ln.get_marker() for ln in lines}) == len(names)  # apart within a panel
            for ln in lines:
                assert markers.setdefault(ln.get_label(), ln.get_marker()) == ln.get_marker()  # and across panels
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
        shown = {t.get_text(): h.get_marker() for lg in legends for t, h in zip(lg.get_texts(), lg.legend_handles)}
        assert shown == markers
    plt.close("all")


def test_eval_of_many_long_named_data_sets_goes_over_pages_with_its_text_apart(tmp_path, monkeypatch):
    """30 data sets of MMMU subjects' names went 6 rows of 1 in panels on one page: their titles, wrapped to fit
    their panels, took up to 6 lines, and tight_layout gave up ("cannot make Axes height small enough"), leaving
    titles over the tick labels of the row above and over the page's title. The data sets go over pages (here two
    of 15) where a page's rows would leave no room for a model; every page's text stays apart. 12 data sets of short
    names stay on one page."""
    import matplotlib.pyplot as plt

    import figures.eval as fe

    subjects = ["Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory",
                "Basic_Medical_Science", "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design",
                "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics", "Energy_and_Power", "Finance",
                "Geography", "History", "Literature", "Manage", "Marketing", "Materials", "Math",
                "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology", "Public_Health", "Sociology"]
    assert fe.set_pages([f"set{k}" for k in range(12)], 1.3) == [range(0, 12)]
    figs = []
    monkeypatch.setattr(fe, "save_png_pdf", lambda fig, d, stem: figs.append((stem, fig)) or [])
    fe.draw_eval(write_scores(tmp_path, ["organism-vl", "organism-base", "merged"], [f"mmmu_{s}" for s in subjects]))
    assert [stem for stem, _ in figs] == ["eval", "eval-2"]
    assert [len([ax for ax in fig.axes if ax.get_visible()]) for _, fig in figs] == [15, 15]
    for _, fig in figs:
        assert overlapping_texts(fig) == []
        renderer = fig.canvas.get_renderer()
        for ax in [ax for ax in fig.axes if ax.get_visible()]:  # each title over its own panel, its name all there
            title, frame = ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)
            assert frame.x0 - 1 <= title.x0 and title.x1 <= frame.x1 + 1, ax.get_title()
            assert ax.get_title().replace("\n", "").rsplit("(n=", 1)[0] in [f"mmmu_{s}" for s in subjects]
        w, h = fig.get_size_inches()
        assert w <= PAGE_WIDTH + 0.01 and h <= PAGE_HEIGHT + 0.01
    assert "data sets 16–30 of 30" in figs[1][1].texts[0].get_text()
    plt.close("all")


def test_shift_numbers_of_many_long_named_models_stay_apart_and_inside(tmp_path, monkeypatch):
    """12 models of 40-character names: their rotated names took half the panel's height, each number had 0.37 in
    beside the next, and separating them stacked them up over the panel's top and its title ("0.002 (2.2×)" over
    "parameter shift from the base"). Such models get a row each (the evaluation figure's layout), their numbers
    beside their dots: no number overlaps another, the title or the panel's frame, and no two tick labels of the
    log axis, minor ones included (2×10⁻³ … 6×10⁻³ ran together along x), overlap."""
    import matplotlib.pyplot as plt

    import figures.shift as fs

    figs = {}
    monkeypatch.setattr(fs, "save", lambda fig, path: figs.setdefault(path.name, fig) and [])
    names = [f"org/Qwen2-VL-7B-Instruct-merged-var{k:02d}-ab" for k in range(12)]
    fs.draw_shift(write_shift(tmp_path / "s", names, 2, ["mlp.up_proj.weight"]))
    fig = figs["shift_models"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    numbers = [t for t in ax.texts if "×" in t.get_text()]
    assert len(numbers) == 12
    boxes = [t.get_window_extent(renderer) for t in numbers]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    frame, title = ax.get_window_extent(renderer), ax.title.get_window_extent(renderer)
    for t, b in zip(numbers, boxes):
        assert not b.overlaps(title), t.get_text()
        assert frame.y0 <= b.y0 and b.y1 <= frame.y1, (t.get_text(), b, frame)
    assert overlapping_texts(fig) == []
    for axis in (ax.xaxis, ax.yaxis):
        lo, hi = sorted(axis.get_view_interval())
        ticks = [t.get_window_extent(renderer) for minor in (False, True)
                 for loc, t in zip(axis.get_ticklocs(minor=minor), axis.get_ticklabels(minor=minor))
                 if lo <= loc <= hi and t.get_visible() and t.get_text()]
        assert len(ticks) >= 2 and not any(a.overlaps(b) for i, a in enumerate(ticks) for b in ticks[i + 1:])
    plt.close("all")


@pytest.mark.parametrize("layers, heads", [(1, 1), (1, 4), (2, 2)])
def test_a_small_grid_of_a_long_named_model_keeps_its_title_on_the_page(tmp_path, monkeypatch, layers, heads):
    """A few heads of a 72B model (--layers 0 --heads 0..3) draw a 4.5 in figure, and its title's second line
    "Qwen/Qwen2-VL-72B-Instruct on image, train split (n=64 items)" (62 characters, under the 63 a line that the
    width was thought to hold) is 4.6 in at 9 pt, centred over the map, left of the figure's centre beside its colour
    bar: it ran past the figure's left edge, "Q" cut. Every title line now lies on the page, whole, each value
    with its unit."""
    import matplotlib.pyplot as plt

    import figures.heads as fh

    d = write_heads(tmp_path / "h", layers, heads)
    baseline = json.loads((d / "baseline.json").read_text())
    baseline.update(model="Qwen/Qwen2-VL-72B-Instruct", data="image", split="train")
    (d / "baseline.json").write_text(json.dumps(baseline))
    figs = []
    monkeypatch.setattr(fh, "save_figure", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    fh.draw_heads(d)
    assert len(figs) == 6  # png and pdf of the three maps
    for fig in figs[::2]:
        fig.canvas.draw()
        title = fig.axes[0].title
        box = title.get_window_extent(fig.canvas.get_renderer())
        assert box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, (box, fig.bbox)
        assert " ".join(title.get_text().split()).endswith("Qwen/Qwen2-VL-72B-Instruct on image, train split (n=64 "
                                                           "items)")
        # a value and its unit on one line ("(n=64" over "items)" was a wrap of 1 × 1's)
        assert not any(line.startswith(("items)", "%")) for line in title.get_text().split("\n"))
    plt.close("all")


def test_figure2_wraps_only_the_titles_that_need_it_and_keeps_a_number_with_its_unit(tmp_path, monkeypatch):
    """Three experts of 40-character names beside the base: the titles' first wrap took the nested grid's one
    column for the page's two (101 characters a line), so keep_titles_apart narrowed every title, the base's short
    one too, to "organism-base on text / (train) / baseline prob. acc. 90.0 / % (n=64)": 4 lines where 2 fit, and
    the number on one line, its % on the next. Only a title off the page or over another is narrowed, and a value
    keeps its unit."""
    import matplotlib.pyplot as plt

    import figures.report as fr
    from figures.results import Replication

    names = [f"Qwen2-VL-7B-Instruct-merged-variant-{k:02d}ab" for k in range(3)]
    for k, m in enumerate([*names, "organism-base"]):
        write_heads(tmp_path / "rep" / "heads" / m, 4, 8, seed=k)
    cfg = {"models": {"base": "organism-base", "experts": names,
                      "own": [f"image_single_long_set_{k}" for k in range(3)]}, "heads": {"split": "train"}}
    figs = []
    monkeypatch.setattr(fr, "save_figure", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    (tmp_path / "f").mkdir()
    fr.draw_figure2(Replication(tmp_path / "rep", {"config": cfg, "fingerprints": {}}), tmp_path / "f" / "figure2.png")
    fig = figs[0]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 4
    assert titles[3] == "organism-base on text (train)\nbaseline prob. acc. 90.0 % (n=64)"
    assert not any(line.lstrip().startswith("%") for t in titles for line in t.split("\n"))
    heatmap_page_is_readable(fig, 2, 0.9)
    plt.close("all")
