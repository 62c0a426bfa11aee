"""Figures drawn only from saved result files (``python -m figures KIND DIR``)."""
from __future__ import annotations

import contextlib
import copy
import contextvars
import functools
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from probe.errors import BadInput, error_reason

NA_TEXT = ("", "nan")  # how a saved table spells a missing number (pandas writes NaN as an empty cell)
UNIT = (0.0, 1.0)  # bounds of an accuracy or a probability
# inches: the largest figure a paper page takes whole. Every figure is drawn at most this size with its text at
# 7-10 pt, so the text stays that size when the figure goes into a paper (a wider one would be scaled down)
PAGE_WIDTH, PAGE_HEIGHT = 7.0, 9.0
PDF_FONTS = {"pdf.fonttype": 42, "ps.fonttype": 42}  # rcParams every figure is saved under (save_figure)
PDF_DPI = 300  # the resolution of the rasters (heatmap cells) inside a PDF
PLAIN_TEXT = {"text.parse_math": False}  # rcParams every figure is drawn under (drawn_as_written)
SUPERSCRIPTS = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")

Draw = TypeVar("Draw", bound=Callable[..., Any])
Reader = TypeVar("Reader", bound=Callable[..., Any])

# what each ``read_once`` reader has read inside ``reads_once`` (None outside): (reader, its arguments) → result
_READ: contextvars.ContextVar[dict[tuple, Any] | None] = contextvars.ContextVar("omniprobe_read", default=None)


@contextlib.contextmanager
def reads_once() -> Any:
    """Inside: each ``read_once`` reader parses and checks a result file once, later calls get a copy. Its
    lifetime is the block (one report build: ``figures.report.build_report`` read and checked each stage's scores.csv
    up to 5 times), never longer, so a rerun's outputs are never read stale by a later build."""
    token = _READ.set({})
    try:
        yield
    finally:
        _READ.reset(token)


def read_once(reader: Reader) -> Reader:
    """``reader`` (a function of a result path and options, returning what it read) read once per ``reads_once``
    block: a deep copy of its first result each time (a caller may change what it gets), its errors raised each
    time (not kept). Outside a block, ``reader`` as it is."""
    @functools.wraps(reader)
    def once(*args: Any, **kwargs: Any) -> Any:
        key = (reader, *(str(a) if isinstance(a, Path) else a for a in args), *sorted(kwargs.items()))
        return read_cached(key, lambda: reader(*args, **kwargs))

    return once  # type: ignore[return-value]


def read_cached(key: tuple, read: Callable[[], Any]) -> Any:
    """``read()``, or inside ``reads_once`` a deep copy of what it returned the first time ``key`` (hashable: what
    names the file and how it is read) was asked there."""
    done = _READ.get()
    if done is None:
        return read()
    if key not in done:
        done[key] = read()
    return copy.deepcopy(done[key])


def drawn_as_written(draw: Draw) -> Draw:
    """``draw`` (a function that draws and saves figures) with every text of its figures drawn as written:
    matplotlib reads text between two '$' as mathtext, so a model, data set or run named 'a$_$b' ended a redraw in
    a ParseSyntaxException traceback and 'cost$5-$10' was drawn 'cost5-10' with an italic '5-'. A text reads
    ``text.parse_math`` when it is made (an axes' title and labels with the axes, a tick label at the first
    drawing, possibly while saving), so it is off while ``draw`` runs, and the caller's rcParams are as they were
    after. A text meant as mathtext says so (``parse_math=True``); a log axis' tick numbers are plain text
    (``plain_log_ticks``)."""
    @functools.wraps(draw)
    def plain(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(PLAIN_TEXT):
            return draw(*args, **kwargs)

    return plain  # type: ignore[return-value]


MINUS = "\u2212"  # the minus sign the paper typesets and matplotlib's axes draw (axes.unicode_minus)


def number(x: float, spec: str = "g") -> str:
    """``x`` formatted by ``spec`` (a format spec: "+.1f", ".3g") for the report's prose and tables and the figures'
    texts, its minus signs (the number's and an exponent's) as U+2212: the report printed "-12.5" in one finding
    and "−25.0" in the next. An exact zero is unsigned (-0.0 prints "+0.0", not "−0.0"). Machine-read outputs
    (CSV, JSON) keep the ASCII '-' their parsers read."""
    return format(x + 0, spec).replace("-", MINUS)  # x + 0: -0.0 becomes 0.0, an int stays an int


def plain_number(text: str) -> str:
    """A tick number as matplotlib's log formatter writes it in mathtext ('$\\mathdefault{2\\times10^{-3}}$') as
    the plain text it typesets ('2×10⁻³'); any other text as it is."""
    m = re.fullmatch(r"\$\\mathdefault\{(.*)\}\$", text)
    if not m:
        return text
    body = re.sub(r"\^\{(-?\d+)\}", lambda e: e[1].translate(SUPERSCRIPTS), m[1].replace("\\times", "×"))
    return body.replace("-", MINUS)


@functools.cache
def _plain_log_formatter() -> type:
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        """matplotlib's log-axis tick numbers (10⁻³, 2×10⁻³ where it labels between decades), as plain text."""

        def __call__(self, x: float, pos: int | None = None) -> str:
            return plain_number(super().__call__(x, pos))

    return PlainLogFormatter


def plain_log_ticks(target: Any) -> None:
    """The tick numbers of a base-10 log axis (``target``: an axes' xaxis or yaxis, or a colour bar of a LogNorm
    image) as plain text: matplotlib writes them as mathtext ('$\\mathdefault{10^{-3}}$'), drawn as those characters
    where mathtext is off (``drawn_as_written``). Call it after the axis' scale is set, which resets its
    formatters."""
    formatter = _plain_log_formatter()
    major, minor = formatter(), formatter(labelOnlyBase=False)  # as matplotlib's log scale sets them
    if hasattr(target, "minorformatter"):  # a colour bar: kept as its own, set again whenever it updates its ticks
        target.formatter, target.minorformatter = major, minor
    else:
        target.set_major_formatter(major)
        target.set_minor_formatter(minor)


def page_grid(n: int, min_width: float, margin: float = 0.0) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels on a page: as many columns as fit PAGE_WIDTH at ``min_width`` inches each
    beside ``margin`` (at least one), then as few rows as that allows, and for those rows as few columns (4 panels
    with room for 3 go 2 × 2, not 3 + 1)."""
    cols = max(1, min(n, int((PAGE_WIDTH - margin + 1e-9) // min_width)))
    rows = math.ceil(n / cols)
    return rows, math.ceil(n / rows)


SUBPLOTS_KEYS = ("sharex", "sharey", "squeeze", "width_ratios", "height_ratios", "subplot_kw", "gridspec_kw")


def new_figure(**figure: Any) -> Any:
    """A matplotlib ``Figure`` on an Agg canvas of its own, outside pyplot: drawing never calls
    ``matplotlib.use``, which switched a notebook's backend (inline) to Agg for the rest of its session, and pyplot
    never holds the figure (nothing to close, nothing shown in a notebook's cell)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**figure)
    FigureCanvasAgg(fig)  # the renderer layouts measure text with (canvas.get_renderer)
    return fig


def new_subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` on a ``new_figure``: the same keywords, split between the figure and its axes grid."""
    grid = {k: kwargs.pop(k) for k in SUBPLOTS_KEYS if k in kwargs}
    fig = new_figure(**kwargs)
    return fig, fig.subplots(nrows, ncols, **grid)


def page_panels(n: int, width: float, height: float, min_width: float, margin: tuple[float, float] = (0.0, 0.0),
                stack: int = 1, grouped: bool = False, **subplots: Any) -> tuple[Any, list[Any]]:
    """A figure of ``n`` panels wrapped into rows (``page_grid``) to fit a page: each panel ``width`` × ``height``
    inches, squeezed when the page is smaller (to ``min_width`` at the least, where one fits), plus ``margin``
    (width, height) for what the whole figure has once (labels of the first column, a suptitle, a legend). A panel
    is ``stack``
    axes above one another (e.g. two heatmaps of one model); the grid's unused axes in the last row are hidden.
    ``grouped``: each panel's stack is a grid nested in the page's (``subgridspec``), so the gap inside a panel is
    its own, set by ``fit_stack_gaps`` (``tight_layout`` sets only the gaps between panels), and a panel reads as
    one block (``**subplots`` then takes figure keywords only, e.g. ``dpi``). Returns the figure and, per panel in
    row-major order, its column of ``stack`` axes."""
    import numpy as np

    rows, cols = page_grid(n, min_width, margin[0])
    size = (min(margin[0] + width * cols, PAGE_WIDTH), min(margin[1] + height * rows, PAGE_HEIGHT))
    if grouped:
        fig = new_figure(figsize=size, **subplots)
        setattr(fig, STACKS, {})  # each axes' nested grid, for fit_stack_gaps
        outer = fig.add_gridspec(rows, cols)
        axes = np.empty((rows * stack, cols), dtype=object)
        for r in range(rows):
            for c in range(cols):
                # the axes in rows 0, 2, ...; the rows between them are the gaps, in axes heights
                inner = outer[r, c].subgridspec(2 * stack - 1, 1, hspace=0.0, height_ratios=stack_ratios(
                    stack, STACK_GAP))
                for i in range(stack):
                    axes[stack * r + i, c] = fig.add_subplot(inner[2 * i])
                    getattr(fig, STACKS)[axes[stack * r + i, c]] = inner
    else:
        fig, axes = new_subplots(rows * stack, cols, figsize=size, squeeze=False, **subplots)
    panels = [axes[stack * (k // cols):stack * (k // cols + 1), k % cols] for k in range(rows * cols)]
    for unused in panels[n:]:
        for ax in unused:
            ax.set_visible(False)
    return fig, panels[:n]


STACK_GAP = 0.2  # a grouped panel's gap between its axes, in axes heights, until fit_stack_gaps measures it
STACK_PAD = 4.0  # points: what fit_stack_gaps leaves between the text of two axes stacked in a panel
STACKS = "omniprobe_stacks"  # the figure attribute where page_panels(grouped=True) keeps each axes' nested grid


def lay_out(fig: Any) -> None:
    """``fig`` laid out as saving it draws it (``draw_without_rendering``), unless nothing changed since its last
    drawing (matplotlib marks a figure stale at any change, a measured tight box included): Figure 2's fitting
    steps each drew the page again on entry, right after the step before had drawn it and only measured."""
    if fig.stale:
        fig.draw_without_rendering()


def stack_ratios(stack: int, gap: float) -> list[float]:
    """Height ratios of a grouped panel's nested grid: ``stack`` axes of 1, a row of ``gap`` between two."""
    return [1.0, *([gap, 1.0] * (stack - 1))]


def fit_stack_gaps(fig: Any, panels: Sequence[Sequence[Any]], pad: float = STACK_PAD, tries: int = 5) -> None:
    """Set the gap inside each panel of ``page_panels(..., grouped=True)`` (``panels``: its columns of axes) to
    what the text between two stacked axes needs (tick labels, a colour bar's tick labels and its label, each axes
    with its colour bars) plus ``pad`` points, the same in every panel, and lay the figure out again
    (``tight_layout``), so call it after the layout is otherwise done. The gap between panels holds more (a title,
    the lower axes' labels), so a panel reads as one block: in Figure 2 the gap between a model's two heatmaps was
    the gap between two models'."""
    from matplotlib.transforms import Bbox

    lay_out(fig)
    renderer = fig.canvas.get_renderer()
    pad_px = pad * fig.dpi / 72

    def group(ax: Any) -> list[Any]:  # an axes and its colour bars
        return [ax] + [im.colorbar.ax for im in ax.images if im.colorbar is not None]

    grids = getattr(fig, STACKS, {})
    for _ in range(tries):
        was_stale = fig.stale
        boxes: dict[Any, Any] = {}  # each axes' tight box at this layout: measured once (it lays out every label)

        def tight(a: Any) -> Any:
            if a not in boxes:
                # an axes turned off (a merge page's note in place of the base's salience) draws only its texts:
                # its empty frame asked the gap above it to hold the tick labels of the map over it
                boxes[a] = a.get_tightbbox(renderer) if a.axison or not a.texts else Bbox.union(
                    [t.get_window_extent(renderer) for t in a.texts])
            return boxes[a]

        need = 0.0
        for panel in panels:
            for upper, lower in zip(panel, panel[1:]):
                gap = upper.get_window_extent(renderer).y0 - lower.get_window_extent(renderer).y1
                clear = math.inf  # between the upper axes' text (and its bars') and the lower's, one over the other
                for u in group(upper):
                    ub = tight(u)
                    for lo in group(lower):
                        lb = tight(lo)
                        if ub.x0 < lb.x1 and lb.x0 < ub.x1:
                            clear = min(clear, ub.y0 - lb.y1)
                need = max(need, gap - clear + pad_px)
        changed = False
        for panel in panels:
            grid, height = grids[panel[0]], panel[0].get_window_extent(renderer).height
            if abs(grid.get_height_ratios()[1] * height - need) > 0.5:  # pixels
                grid.set_height_ratios(stack_ratios(len(panel), need / height))
                changed = True
        if not changed:
            # measuring marks the figure stale (tight boxes update the tick labels) though nothing moved: left as
            # it was, so the next step's lay_out does not draw this same layout again
            fig.stale = was_stale
            return
        fig.tight_layout()
        fig.draw_without_rendering()


# inches a heatmap's cell (a layer's row, a head's column) keeps at the least on a page of several models' maps
# (Figure 2, a merge's weight maps): a page holds fewer models rather than go under (cells_per_page). On pages of 2
# rows a 72B grid's 80 layers got 0.018 to 0.02 in each, and in 3 columns its 64 heads 0.011 to 0.013 in each,
# neighbouring heads one blur; MAP_LAYER: the inches a tall map asks for a layer where its page has the height
MAP_CELL, MAP_LAYER = 0.025, 0.05


def stacked_maps_height(layers: int, rows: int, column: float, map_height: float, margin: float) -> float:
    """Inches a column of two stacked heatmaps of ``layers`` rows asks for on a page of ``rows`` rows (Figure 2's
    models, a merge page's participants): ``column``, where each map gets about ``map_height``, and for a tall grid
    its maps' extra height (MAP_LAYER a layer) up to the page's share of a row beside ``margin`` inches; never less
    than ``column`` (page_panels squeezes a page of rows that do not fit)."""
    want = column + 2 * max(0.0, MAP_LAYER * layers - map_height)
    return max(column, min(want, (PAGE_HEIGHT - margin) / rows))


def cells_per_page(layers: int, heads: int, most: int, room: Callable[[int], tuple[float, float]]) -> int:
    """How many models a page of heatmaps of ``layers`` × ``heads`` holds: the most (up to ``most``, down to 2,
    which fit one row) whose maps, ``room(k)`` inches (across, down) each on a page of k, leave each cell MAP_CELL
    inches each way."""
    for k in range(most, 2, -1):
        across, down = room(k)
        if across >= MAP_CELL * heads and down >= MAP_CELL * layers:
            return k
    return 2


def page_split(n: int, min_width: float, min_height: float, margin: tuple[float, float] = (0.0, 0.0)) -> list[range]:
    """``n`` panels over as few pages as keep each at least ``min_width`` × ``min_height`` inches beside ``margin``
    (``page_panels``' squeezing stops there), the pages as even as they can be (12 panels, 8 a page: 6 + 6)."""
    cols = max(1, int((PAGE_WIDTH - margin[0] + 1e-9) // min_width))
    rows = max(1, int((PAGE_HEIGHT - margin[1] + 1e-9) // min_height))
    return even_pages(n, cols * rows)


def even_pages(n: int, per_page: int) -> list[range]:
    """``n`` panels over as few pages of at most ``per_page`` as there can be, as even as they can be."""
    size = math.ceil(n / math.ceil(n / per_page))
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def page_stem(stem: str, k: int) -> str:
    """The file stem of page ``k`` (from 0) of a figure: ``stem``, then ``stem-2``, ``stem-3``, ..."""
    return stem if k == 0 else f"{stem}-{k + 1}"


def page_caption(pages: list[range], k: int, what: str) -> str:
    """" (what 1–6 of 12)" on a page of several, " (model 3 of 3)" on a page of one (``what`` less its plural s;
    it read "models 3–3 of 3"), else nothing."""
    if len(pages) == 1:
        return ""
    page, n = pages[k], pages[-1][-1] + 1
    return f" ({what.removesuffix('s')} {page[0] + 1} of {n})" if len(page) == 1 else \
        f" ({what} {page[0] + 1}–{page[-1] + 1} of {n})"


def drop_stale_pages(result_dir: Path, stem: str, written: list[Path]) -> None:
    """Remove ``stem-K.png/pdf`` pages an earlier drawing of more panels left that this one did not write."""
    import re

    for old in Path(result_dir).glob(f"{stem}-*.*"):
        if re.fullmatch(rf"{re.escape(stem)}-\d+\.(png|pdf)", old.name) and old not in written:
            old.unlink()


def fit_page(fig: Any, pad: float = 0.1) -> None:
    """A figure saved with ``bbox_inches="tight"`` is as big as what is drawn (plus ``pad`` each side), not its
    size: text past an axes' edge (a point's label, a long title) widens it. Shrink the figure until that fits the
    page, the layout's proportions kept."""
    for _ in range(5):
        box = fig.get_tightbbox(fig.canvas.get_renderer())
        over = box.width + 2 * pad - PAGE_WIDTH, box.height + 2 * pad - PAGE_HEIGHT
        if max(over) <= 0:
            return
        w, h = fig.get_size_inches()
        fig.set_size_inches(w - max(over[0], 0) - 0.01, h - max(over[1], 0) - 0.01)


NBSP = "\u00a0"  # a no-break space: where a title's wrap must not part a value from its unit ("90.0 %")


def fill_lines(text: str, width: int) -> str:
    """Each line of ``text`` wrapped to ``width`` characters (``textwrap.fill``), never at a no-break space, which
    is then drawn as a plain space (the text read back from the figure has none)."""
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in text.split("\n")).replace(NBSP, " ")


def keep_titles_apart(fig: Any, titles: list[tuple[Any, str]], tries: int = 6) -> None:
    """Wrap each (axes, title) of ``titles`` (each line of it on its own) into shorter lines than it has, and lay the
    figure out again, while one runs past the page's edge or into another: centred over a heatmap that a long
    colour-bar label beside it made narrow (a clipped scale's note, 5 or 6 models), the first column of Figure 2 had
    its title cut at the page's left edge; a merge page's 40-character participant names ran into each other."""
    renderer = fig.canvas.get_renderer()
    for _ in range(tries):
        lay_out(fig)
        boxes = [ax.title.get_window_extent(renderer) for ax, _ in titles]
        page = fig.bbox
        # only those off the page or over another: narrowing every title made a short one 4 lines where 2 fit
        wrong = [not (page.x0 <= b.x0 and b.x1 <= page.x1) or any(b.overlaps(o) for o in boxes if o is not b)
                 for b in boxes]
        if not any(wrong):
            return
        for (ax, text), narrow in zip(titles, wrong):
            if narrow:
                width = max(max(map(len, ax.get_title().split("\n"))) - 4, 12)
                ax.set_title(fill_lines(text, width), fontsize=8)
        fig.tight_layout()


def label_step(cell: float, gap: float = 0.15) -> int:
    """Label every k-th row or column of a heatmap whose cells are ``cell`` inches, so 7 pt labels stay ``gap``
    inches apart."""
    return max(1, math.ceil(gap / cell))


def heatmap_ticks(ax: Any, rows: list[Any], cols: list[Any], fontsize: float = 7) -> None:
    """Tick labels of a heatmap drawn on ``ax`` (``rows`` down, ``cols`` across): every one while they stay 0.15 in
    apart at the axes' present size (before ``tight_layout``, which mostly widens it), else every k-th."""
    across, down = _heatmap_steps(ax, rows, cols)
    ax.set_xticks(range(0, len(cols), across), [str(c) for c in cols[::across]], fontsize=fontsize)
    ax.set_yticks(range(0, len(rows), down), [str(r) for r in rows[::down]], fontsize=fontsize)


def _heatmap_steps(ax: Any, rows: list[Any], cols: list[Any]) -> tuple[int, int]:
    """``heatmap_ticks``' label steps across and down at the axes' present size."""
    box = ax.get_position()
    w, h = ax.figure.get_size_inches()
    return label_step(box.width * w / max(len(cols), 1)), label_step(box.height * h / max(len(rows), 1))


def heatmap_ticks_again(fig: Any, maps: Sequence[tuple[Any, list[Any], list[Any]]]) -> None:
    """``heatmap_ticks`` of each (axes, rows, columns) of ``maps`` again at the figure's present layout, so call it
    after ``tight_layout``; the layout is redone where the labels changed. A heatmap whose layout narrowed it (a
    colour bar and its label beside it in a page's narrower columns) had its 28 heads' labels run together
    ("121518"), spaced for the size before. A heatmap whose ticks stay as they are is left alone: set again, the
    same ticks marked the figure changed, and the next step drew the same layout once more."""
    was_stale, changed = fig.stale, False  # (reading an axes' position marks the figure stale, moving nothing)
    for ax, rows, cols in maps:
        across, down = _heatmap_steps(ax, rows, cols)
        if (ax.get_xticks().tolist(), ax.get_yticks().tolist()) != (list(range(0, len(cols), across)),
                                                                    list(range(0, len(rows), down))):
            heatmap_ticks(ax, rows, cols)
            changed = True
    if changed:
        fig.tight_layout()
    else:
        fig.stale = was_stale


def spaced_ticklabels(axes: Any, axis: str = "x", gap: float = 2.0) -> None:
    """Blank the tick labels of the ``axis`` of ``axes`` (one axes, or a list of axes that do not share that axis)
    that would touch a neighbour (``gap`` points apart at least) at the figure's present layout, so call it after
    ``tight_layout``: from the first on, each kept when clear of the last kept one, and the last label kept whatever
    (a run's final step), its crowded neighbours blanked instead. The tick marks stay. Steps 3000 and 5000 on a log
    axis ran together as "30005000". The figure is drawn once for all of ``axes`` (blanking one's labels moves no
    other's), not once per axes."""
    axes = list(axes) if isinstance(axes, (list, tuple)) else [axes]
    if not axes:
        return
    axes[0].figure.draw_without_rendering()  # tick labels where the layout puts them
    for ax in axes:
        _space_ticklabels(ax, axis, gap)


def _space_ticklabels(ax: Any, axis: str, gap: float) -> None:
    renderer = ax.figure.canvas.get_renderer()
    which = ax.xaxis if axis == "x" else ax.yaxis
    locs, labels = which.get_ticklocs(), which.get_ticklabels()
    shown = [i for i, t in enumerate(labels) if t.get_visible() and t.get_text()]
    if len(shown) < 2:
        return
    pad = gap * ax.figure.dpi / 72
    boxes = {i: labels[i].get_window_extent(renderer).padded(pad / 2) for i in shown}
    last = shown[-1]
    kept = [last]  # the final label first; then from the left, each clear of it and of the last kept
    for i in shown[:-1]:
        if not boxes[i].overlaps(boxes[last]) and (len(kept) == 1 or not boxes[i].overlaps(boxes[kept[-1]])):
            kept.append(i)
    which.set_ticks(locs, [t.get_text() if i in kept else "" for i, t in enumerate(labels)])


def spaced_minor_labels(ax: Any, axis: str = "x", gap: float = 2.0) -> None:
    """Blank the minor tick labels of ``ax``'s ``axis`` (a log axis' 2×10⁻³, 3×10⁻³, … between decades) that would
    touch a major one or a minor one kept before it (``gap`` points apart) at the figure's present layout, so call
    it after the layout is done. Along x, where a label is as wide as its number, matplotlib labelled 2, 3, 4 and
    6×10⁻³ less than a label's width apart ("2×10⁻³3×10⁻³4×10⁻³")."""
    ax.figure.draw_without_rendering()
    renderer = ax.figure.canvas.get_renderer()
    which = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = sorted(which.get_view_interval())
    pad = gap * ax.figure.dpi / 72

    def shown(minor: bool) -> list[tuple[float, Any]]:
        ticks = zip(which.get_ticklocs(minor=minor), which.get_ticklabels(minor=minor))
        return [(loc, t) for loc, t in ticks if lo <= loc <= hi and t.get_visible() and t.get_text()]

    kept = [t.get_window_extent(renderer).padded(pad / 2) for _, t in shown(False)]
    locs, texts = [], []
    for loc, t in shown(True):
        box = t.get_window_extent(renderer).padded(pad / 2)
        clear = not any(box.overlaps(k) for k in kept)
        if clear:
            kept.append(box)
        locs.append(loc)
        texts.append(t.get_text() if clear else "")
    if locs:
        which.set_ticks(locs, texts, minor=True)


def bar_aspect(n_panels: int) -> int:
    """The colour bars' length-to-width ratio on a page of ``n_panels`` heatmap panels (Figure 2, the merge page):
    matplotlib's 20 up to 4, 40 beyond, where the columns go narrow (2 × 3): at 20 the bars came out shorter than
    their heatmaps, and a clipped scale's note, wrapped along a bar, widened it and shortened it more."""
    return 20 if n_panels <= 4 else 40


def fit_bar_labels(fig: Any, shorter: Mapping[str, str] | None = None, slack: float = 3.0) -> bool:
    """Wrap the label of each vertical colour bar of ``fig``'s heatmaps (images) into shorter lines where it is longer
    than its bar (by more than ``slack`` points) at the figure's present layout, so call it after ``tight_layout``
    and, when it returns True (a label changed, and so its width beside the bar), lay the figure out again. Each
    line of the label is wrapped on its own at spaces (a note stays below its name), into as few lines as fit, as
    even as they get; where a word is longer than the bar, its line is replaced by its ``shorter`` form (line →
    line), if any. Heatmaps squeezed onto a page (5 models of Figure 2: bars 0.6 in high) had their labels run past
    both ends of the bar, into the panels above and below."""
    import textwrap

    bars = [im.colorbar for ax in fig.axes for im in ax.images
            if im.colorbar is not None and im.colorbar.orientation == "vertical"]
    if not bars:
        return False
    lay_out(fig)  # the bars' size as drawn (a colour bar's aspect is applied when drawn)
    renderer = fig.canvas.get_renderer()
    pad = slack * fig.dpi / 72
    changed = False
    for cb in bars:
        label = cb.ax.yaxis.label
        text = label.get_text()
        room = cb.ax.get_window_extent(renderer).height + pad

        def length(candidate: str) -> float:  # along the bar
            label.set_text(candidate)
            return label.get_window_extent(renderer).height

        def wrapped(lines: list[str], width: int) -> str:
            return "\n".join(textwrap.fill(line, width, break_long_words=False) for line in lines)

        def fit(lines: list[str]) -> tuple[bool, str]:
            """Whether ``lines`` fit, wrapped, and the wrapping that does (or the shortest there is)."""
            best = (math.inf, "")
            for width in range(max(map(len, lines)), 0, -1):
                if (along := length(wrapped(lines, width))) <= room:
                    n = wrapped(lines, width).count("\n")  # as many lines, as even as they get
                    while width > 1 and wrapped(lines, width - 1).count("\n") == n:
                        width -= 1
                    return True, wrapped(lines, width)
                if along < best[0]:
                    best = (along, wrapped(lines, width))
            return False, best[1]

        if not text or length(text) <= room:
            continue
        lines = text.split("\n")
        fits, best = fit(lines)
        if not fits and shorter and (short := [shorter.get(line, line) for line in lines]) != lines:
            best = fit(short)[1]
        label.set_text(best)
        changed |= best != text
    return changed


def separate_labels(texts: list[Any], gap: float = 1.0, sides: tuple[int, ...] = (-1, 1), tries: int = 20) -> None:
    """Move labels placed beside a point (``ax.annotate`` with ``textcoords="offset points"``) up or down, in
    order, until each overlaps none placed before it (``gap`` points apart) at the figure's present layout, so
    call it after ``tight_layout``: labels of points that sit close together (models of nearly one value) were
    drawn over one another. Each goes to the nearest free place: its own, a line below, a line above, two below,
    ... (``sides``: (1,) only above, where below is its point); where none is free within ``tries`` lines, where
    it was."""
    if not texts:
        return
    fig = texts[0].figure
    renderer = fig.canvas.get_renderer()
    pad = gap * fig.dpi / 72

    def box() -> Any:
        return t.get_window_extent(renderer).padded(pad / 2)

    placed: list[Any] = []
    for t in texts:
        x0, y0 = t.xyann
        line = box().height * 72 / fig.dpi  # points
        for dy in [0.0] + [k * side * line for k in range(1, tries + 1) for side in sides]:
            t.xyann = (x0, y0 + dy)
            if not any(box().overlaps(p) for p in placed):
                break
        else:
            t.xyann = (x0, y0)
        placed.append(box())


def widen_to_hold(ax: Any, texts: list[Any], pad: float = 2.0, tries: int = 5) -> None:
    """Widen ``ax``'s x range until each of ``texts`` (labels placed at data x, e.g. centred over a dot) lies at
    least ``pad`` points inside the axes' left and right edges at the figure's present layout, so call it after
    the layout is done; the y range is kept. A value centred over the last of three models' dots ("0.0077
    (2.1×)") ended on the panel's frame."""
    if not texts:
        return
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    pad_px = pad * fig.dpi / 72
    for _ in range(tries):
        fig.draw_without_rendering()
        frame = ax.get_window_extent(renderer)
        boxes = [t.get_window_extent(renderer) for t in texts]
        left = max(0.0, frame.x0 + pad_px - min(b.x0 for b in boxes))
        right = max(0.0, max(b.x1 for b in boxes) + pad_px - frame.x1)
        if left < 0.5 and right < 0.5:  # pixels
            return
        log = ax.get_xscale() == "log"  # grown in decades there (a log axis' pixels are even in log x)
        lo, hi = (math.log10(x) for x in ax.get_xlim()) if log else ax.get_xlim()
        per_px = (hi - lo) / frame.width  # data units a pixel, before the range grows (so a few rounds)
        lo, hi = lo - left * per_px, hi + right * per_px
        ax.set_xlim(*((10 ** lo, 10 ** hi) if log else (lo, hi)))


def marker_boxes(ax: Any, renderer: Any) -> list[Any]:
    """The display box of every marker drawn by ``ax``'s scatter plots (each PathCollection point: its marker's
    path at its size, plus half its edge line), as laid out now."""
    import numpy as np
    from matplotlib.collections import PathCollection
    from matplotlib.transforms import Affine2D, Bbox

    boxes = []
    for col in ax.collections:
        if not isinstance(col, PathCollection) or not col.get_visible() or not len(col.get_offsets()):
            continue
        paths, scales, widths = col.get_paths(), col.get_transforms(), col.get_linewidths()
        centres = col.get_offset_transform().transform(np.asarray(col.get_offsets(), dtype=float))
        for i, (x, y) in enumerate(centres):
            ext = paths[i % len(paths)].get_extents(Affine2D(scales[i % len(scales)]) if len(scales) else None)
            edge = (widths[i % len(widths)] if len(widths) else 0.0) * ax.figure.dpi / 72 / 2
            boxes.append(Bbox.from_extents(x + ext.x0 - edge, y + ext.y0 - edge, x + ext.x1 + edge, y + ext.y1 + edge))
    return boxes


def _overlap(a: Any, b: Any) -> Any:
    """The area two boxes share, for arrays of boxes (..., 4) as (x0, y0, x1, y1), broadcast."""
    import numpy as np

    w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    return np.where((w > 0) & (h > 0), w * h, 0.0)


def _apart(a: Any, b: Any) -> Any:
    """The distance between two boxes (0 where they touch or overlap), broadcast as ``_overlap``."""
    import numpy as np

    return np.hypot(np.maximum(np.maximum(a[..., 0] - b[..., 2], b[..., 0] - a[..., 2]), 0.0),
                    np.maximum(np.maximum(a[..., 1] - b[..., 3], b[..., 1] - a[..., 3]), 0.0))


def _crosses(box: Any, seg: Any) -> Any:
    """Whether a segment (..., 4) as (x0, y0, x1, y1) passes through a box (..., 4), broadcast (Liang-Barsky
    clipping)."""
    import numpy as np

    box, seg = np.broadcast_arrays(np.asarray(box, dtype=float), np.asarray(seg, dtype=float))
    lo, hi = np.zeros(box.shape[:-1]), np.ones(box.shape[:-1])
    ok = np.ones(box.shape[:-1], dtype=bool)
    for k in (0, 1):
        d = seg[..., 2 + k] - seg[..., k]
        for p, q in ((-d, seg[..., k] - box[..., k]), (d, box[..., 2 + k] - seg[..., k])):
            flat = p == 0
            ok &= ~(flat & (q < 0))
            r = q / np.where(flat, 1.0, p)
            lo = np.where(~flat & (p < 0), np.maximum(lo, r), lo)
            hi = np.where(~flat & (p > 0), np.minimum(hi, r), hi)
    return ok & (lo <= hi)


@dataclass
class _Candidates:
    """One label's places (``place_labels``), cheapest first: its text box there (display pixels, (x0, y0, x1, y1))
    and that box padded by half the gap, the offset in points and alignment that put it there, its cost on its own,
    the marker area the padded box covers, and its leader ((x0, y0, x1, y1), where ``lined``)."""
    text: Any
    box: Any
    offset: Any
    ha: list[str]
    cost: Any
    covered: Any
    line: Any
    lined: Any


def place_labels(ax: Any, texts: list[Any], gap: float = 2.0, step: float = 4.0, fine: float = 2.0,
                 reach: float = 64.0, far: float = 10.0, leader: float = 4.0, passes: int = 8, width: int = 32,
                 nodes: int = 50_000) -> None:
    """Place each label of a point (``ax.annotate`` with ``textcoords="offset points"``, ``xy`` its point) beside
    its marker, where its text covers no marker of ``ax`` (``marker_boxes``, its own included) and no other label,
    inside the axes, at the figure's present layout (so call it after the layout is done).

    Candidates: the text box right of, left of, above or below its marker (``gap`` points past its edge, then every
    ``fine`` points farther) and slid along that side every ``fine`` points, corners included, up to ``reach``
    points from the point. Each costs its distance from the point (to the text's nearest point) in ``step``s, plus
    the square of what it lies past ``far`` points in ``step``s (one far label is worse than two a little farther),
    1 for a leader (a label more than ``leader`` points from its marker gets a thin line to it, drawn to the label's
    nearest point), 3 where it lies nearer another marker than its own (it would read as that one's), 3 for each
    marker its leader crosses, 1 for each segment of ``ax``'s lines (a run's trajectory) under it, and a little for
    the side (right, left, above or below, in that order) and for sitting off the middle of it; two labels add 3 for
    each leader of one through the other, and a candidate over a marker or another label is taken only where
    nothing else is inside the axes. Labels go greedily from the most crowded point (most markers within 50
    points), each then moved to its cheapest place beside all the others while that helps (``passes`` rounds); the
    cheapest arrangement is then searched depth first from the most crowded label over each one's ``width``
    cheapest candidates at least 2 ``fine`` steps apart, a branch cut once it costs what the best found does
    (``nodes`` steps at most, the greedy one kept when nothing beats it), and the moves tried again. Deterministic:
    arithmetic on the laid-out page, no randomness, so the same results draw the same bytes.

    On Figure 4b's PCA map ``separate_labels`` (labels moved straight up or down only, leaders then drawn from the
    text's corner) left "organism-ov-si" over the merges' names, "organism-base" and "average" far from their markers,
    and names over other models' markers; with 12 fixed directions 4 points apart (until 2026-12-06) a name there
    still sat 20.5 points from its point."""
    import numpy as np
    from matplotlib.text import Text

    if not texts:
        return
    fig = ax.figure
    fig.draw_without_rendering()  # limits and positions as drawn (an equal-aspect map adjusts its limits then)
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72  # pixels a point
    area = ax.get_window_extent(renderer)
    # boxes and segments as arrays (..., 4) of (x0, y0, x1, y1): the search compares thousands of places at once
    markers = np.array([b.extents for b in marker_boxes(ax, renderer)], dtype=float).reshape(-1, 4)
    centres = (markers[:, :2] + markers[:, 2:]) / 2
    segments = np.array([[*a, *b] for line in ax.lines if line.get_visible()
                         for xy in [line.get_transform().transform(np.column_stack(line.get_data()).astype(float))]
                         for a, b in zip(xy[:-1], xy[1:])], dtype=float).reshape(-1, 4)
    points = [np.asarray(ax.transData.transform(t.xy), dtype=float) for t in texts]

    def under(p: Any) -> Any:  # the markers over a point
        return np.flatnonzero((markers[:, 0] - 0.5 <= p[0]) & (p[0] <= markers[:, 2] + 0.5)
                              & (markers[:, 1] - 0.5 <= p[1]) & (p[1] <= markers[:, 3] + 0.5))

    def own_marker(p: Any) -> int | None:  # the label's own: of the markers over its point, the one centred there
        over = under(p)
        if not len(over):
            return None
        return int(over[np.lexsort((over, np.round(np.hypot(*(centres[over] - p).T), 3)))[0]])

    def crowd(p: Any) -> int:
        return int((np.hypot(*(centres - p).T) < 50 * px).sum())

    pad, g, s = gap * px / 2, gap * px, fine * px  # each label keeps gap / 2 points around it clear
    options: list[_Candidates | None] = []
    at_of: list[dict[str, Any]] = []  # per label: where its text box starts at offset (0, 0), per alignment
    for t, p in zip(texts, points):
        k = own_marker(p)
        mine = markers[k] if k is not None else np.array([p[0] - 2 * px, p[1] - 2 * px, p[0] + 2 * px, p[1] + 2 * px])
        # markers that do not cover the point (a run's first checkpoint under the model it starts from does: no
        # label of either can keep off it, nor be told apart from it)
        others = np.delete(markers, under(p), axis=0)
        at_of.append({})
        t.set_verticalalignment("bottom")
        at = {}  # the text box's lower left corner, from the point, at offset (0, 0), per alignment
        for ha in ("left", "center", "right"):
            t.set_horizontalalignment(ha)
            t.xyann = (0.0, 0.0)
            e = Text.get_window_extent(t, renderer)
            at[ha], w, h = np.array([e.x0, e.y0]) - p, e.width, e.height
        m = mine - np.tile(p, 2)  # its marker, from the point
        n = np.arange(int(reach * px // s) + 1)

        def corners(lo: float, hi: float, size: float) -> Any:  # the box's low edge: past hi, before lo, or across
            return np.unique(np.concatenate([hi + g + s * n, lo - g - size - s * n,
                                             np.arange(lo - g - size + s, hi + g, s), [-size / 2, lo, hi - size]]))

        x, y = (a.ravel() for a in np.meshgrid(corners(m[0], m[2], w), corners(m[1], m[3], h)))
        text = np.column_stack([x, y, x + w, y + h]) + np.tile(p, 2)
        box = text + [-pad, -pad, pad, pad]
        dist = _apart(text, np.tile(p, 2))
        off_mine = _apart(text, mine)
        keep = ((area.x0 <= box[:, 0]) & (box[:, 2] <= area.x1) & (area.y0 <= box[:, 1]) & (box[:, 3] <= area.y1)
                & (off_mine >= g - 1e-6) & (dist <= reach * px))
        if not keep.any():
            options.append(None)
            continue
        x, y, text, box, dist, off_mine = x[keep], y[keep], text[keep], box[keep], dist[keep], off_mine[keep]
        ha = np.where(x >= m[0] - 1e-6, "left", np.where(x + w <= m[2] + 1e-6, "right", "center"))
        near = np.column_stack([np.clip(p[0], text[:, 0], text[:, 2]), np.clip(p[1], text[:, 1], text[:, 3])])
        line = np.column_stack([np.broadcast_to(p, near.shape), near])
        lined = off_mine > leader * px
        right, left = x >= m[2] + g - 1e-6, x + w <= m[0] - g + 1e-6
        # right, left, above or below; nearer the middle of that side first
        side = np.where(right, 0, np.where(left, 3, 6)) + abs(np.where(right | left, y + h / 2, x + w / 2)) / (w + h)
        cost = (dist / (step * px) + (np.maximum(dist - far * px, 0) / (step * px)) ** 2 + 0.01 * side + lined
                + _crosses(box[:, None], segments[None]).sum(axis=1)
                + 3 * (_apart(text[:, None], others[None]) < off_mine[:, None]).any(axis=1)
                + 3 * (lined[:, None] & _crosses(others[None], line[:, None])).sum(axis=1))
        order = np.argsort(cost, kind="stable")
        at_of[-1] = at
        options.append(_Candidates(text[order], box[order], np.column_stack([x, y])[order], [str(a) for a in ha[order]],
                                   cost[order], _overlap(box[:, None], markers[None]).sum(axis=1)[order],
                                   line[order], lined[order]))

    def priced(cost: Any, tangle: Any, covered: Any) -> Any:
        """A place's cost with the other labels': 3 a leader crossing, and far above any place clear of them where
        it covers one (by the area covered)."""
        return cost + 3 * tangle + np.where(covered > 0, 1e3 + covered, 0.0)

    def prices(i: int, chosen: dict[int, int | None]) -> tuple[Any, Any]:
        """Every candidate of label ``i`` beside the other labels' ``chosen`` ones: (area covered, cost)."""
        c = options[i]
        covered, tangle = c.covered.copy(), np.zeros(len(c.cost))
        for n, k in chosen.items():
            if n != i and k is not None:
                d = options[n]
                covered += _overlap(c.box, d.box[k])
                tangle += c.lined & _crosses(d.box[k], c.line)  # its leader through the other label, or the other's
                tangle += bool(d.lined[k]) & _crosses(c.box, d.line[k])  # through it
        return covered, priced(c.cost, tangle, covered)

    def total(chosen: dict[int, int | None]) -> float:
        return float(sum(prices(i, {n: d for n, d in chosen.items() if n < i})[1][k]
                         for i, k in chosen.items() if k is not None))

    def improve(chosen: dict[int, int | None]) -> None:  # each label in turn to its cheapest place while that helps
        for _ in range(passes):
            moved = False
            for i in order:
                if chosen[i] is not None:
                    cost = prices(i, chosen)[1]
                    k = int(np.argmin(cost))
                    if cost[k] < cost[chosen[i]] - 1e-9:
                        chosen[i], moved = k, True
            if not moved:
                break

    # greedy from the most crowded point, then moves (greedy had placed each before knowing where the later ones go)
    order = sorted(range(len(texts)), key=lambda i: (-crowd(points[i]), i))
    chosen: dict[int, int | None] = {}
    for i in order:
        chosen[i] = int(np.argmin(prices(i, chosen)[1])) if options[i] is not None else None
    improve(chosen)
    # then the best arrangement there is over each label's cheapest candidates apart from one another (the fine
    # grid's neighbours would fill the width with one place), searched depth first from the most crowded label,
    # cutting a branch once it costs what the best found so far does (at most ``nodes`` steps): moving one label
    # at a time cannot swap two names that block each other
    picks: list[list[int]] = []
    for i in order:
        c, got = options[i], []
        for k in range(len(c.cost) if c is not None else 0):
            if len(got) == width:
                break
            if c.covered[k] == 0 and not any((np.abs(c.offset[k] - c.offset[j]) < 2 * s).all() for j in got):
                got.append(k)
        picks.append(got or ([0] if c is not None else []))
    # what two labels' picks cost together: the area their boxes share, and how often a leader of one crosses the
    # other's box
    pair: dict[tuple[int, int], tuple[list, list]] = {}
    for a in range(len(order)):
        for b in range(a):
            if picks[a] and picks[b]:
                c, d = options[order[a]], options[order[b]]
                ca, cb = c.box[picks[a]][:, None], d.box[picks[b]][None]
                la, lb = c.line[picks[a]][:, None], d.line[picks[b]][None]
                cross = ((c.lined[picks[a]][:, None] & _crosses(cb, la)).astype(int)
                         + (d.lined[picks[b]][None] & _crosses(ca, lb)))
                pair[a, b] = (_overlap(ca, cb).tolist(), cross.tolist())
    best = [total(chosen), dict(chosen)]
    slot: list[int] = []  # the pick taken at each depth
    steps = 0

    def search(k: int, cost: float) -> None:
        nonlocal steps
        if k == len(order):
            if cost < best[0] - 1e-9:
                best[0], best[1] = cost, {order[j]: picks[j][slot[j]] if picks[j] else None for j in range(k)}
            return
        c = options[order[k]]
        if not picks[k]:
            slot.append(-1)
            search(k + 1, cost)
            slot.pop()
            return
        for a, cand in enumerate(picks[k]):
            steps += 1
            if steps > nodes or cost + c.cost[cand] >= best[0] - 1e-9:  # cheapest first: the rest cost more
                break
            covered, tangle = float(c.covered[cand]), 0
            for j in range(k):
                if slot[j] >= 0:
                    overlap, cross = pair[k, j]
                    covered, tangle = covered + overlap[a][slot[j]], tangle + cross[a][slot[j]]
            add = float(priced(c.cost[cand], tangle, covered))
            if cost + add < best[0] - 1e-9:
                slot.append(a)
                search(k + 1, cost + add)
                slot.pop()

    search(0, 0.0)
    chosen = best[1]
    improve(chosen)
    for i, (t, p) in enumerate(zip(texts, points)):
        k = chosen[i]
        if k is None:  # nowhere inside the axes (a label wider than its map): beside its point, as drawn first
            t.set_horizontalalignment("left")
            t.set_verticalalignment("bottom")
            t.xyann = (gap, gap)
            continue
        c, ha = options[i], options[i].ha[k]
        t.set_horizontalalignment(ha)
        t.set_verticalalignment("bottom")
        t.xyann = tuple(float(v) for v in (c.text[k, :2] - p - at_of[i][ha]) / px)
        if c.lined[k]:  # from the marker's edge (shrunk by its half-size) to the label's nearest point
            j = own_marker(p)
            half = max(markers[j, 2] - markers[j, 0], markers[j, 3] - markers[j, 1]) / 2 if j is not None else 2 * px
            ax.annotate("", t.xy, xycoords=t.xycoords, xytext=tuple(float(v) for v in (c.line[k, 2:] - p) / px),
                        textcoords="offset points", zorder=t.get_zorder() - 0.5,
                        arrowprops=dict(arrowstyle="-", color="0.5", lw=0.5, shrinkA=0, shrinkB=half / px))


def save_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """``fig`` saved to ``path`` (format from its suffix) whole or not at all: a kill never leaves a 0-byte
    figure that a finished-looking run would show."""
    from probe.results import atomic_write_with

    import matplotlib

    fmt = Path(path).suffix[1:]
    if fmt == "pdf":  # no creation date: the same figure is the same bytes (a rerun of a stage compares equal)
        # everything but a heatmap's cells is vector; the cells (imshow) are a raster at print resolution, not at
        # the figure's 110-150 dpi
        savefig = {"metadata": {"CreationDate": None}} | savefig | {"dpi": PDF_DPI}
    # fonts embedded as TrueType (Type 42), as journals and arXiv ask, instead of matplotlib's default Type 3
    with matplotlib.rc_context(PDF_FONTS):
        atomic_write_with(Path(path), lambda tmp: fig.savefig(tmp, format=fmt, **savefig))
    return Path(path)


def save_png_pdf(fig: Any, result_dir: Path, stem: str, **savefig: Any) -> list[Path]:
    """Write ``fig`` as ``stem.png`` and ``stem.pdf`` in ``result_dir`` (``save_figure``)."""
    return [save_figure(fig, Path(result_dir) / f"{stem}.{ext}", **savefig) for ext in ("png", "pdf")]


def _missing(path: Path, source: str) -> BadInput:
    return BadInput(f"{path.parent}: no {path.name}" + (f" (not a finished {source} output)" if source else ""))


def read_table(path: Path, columns: Mapping[str, type], optional: Mapping[str, type] | None = None,
               source: str = "", bounds: Mapping[str, tuple[float, float]] | None = None,
               finite: Sequence[str] = (), data: bytes | None = None, **read_csv: Any) -> Any:
    """A saved CSV table, checked before anything is drawn from it: the file parses, every column of ``columns``
    is there (``optional`` ones may be absent), at least one row, every number of a ``bounds`` column within its
    [low, high] (missing ones aside), and a ``finite`` column finite on every row, or missing on all of them (a value
    the run did not measure: accuracy without generation), never on some. Column kinds: ``str`` (kept as text),
    ``float`` (numbers, empty = missing) and ``int`` (a count or index: whole, ≥ 0, never missing). Any problem is one
    BadInput naming the file; ``source`` is the command that writes it. ``data``: the file's bytes, where the caller
    has read them already (parsed instead of reading ``path`` again)."""
    import numpy as np
    import pandas as pd

    path = Path(path)
    if data is None and not path.is_file():
        raise _missing(path, source)
    if int(pd.__version__.split(".")[0]) < 3:  # pandas 2 parses floats up to an ulp off what to_csv wrote; 3 is exact
        read_csv.setdefault("float_precision", "round_trip")
    try:
        df = pd.read_csv(path if data is None else io.BytesIO(data), **read_csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise BadInput(f"{path}: not a readable table ({error_reason(exc)})") from None
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        raise BadInput(f"{path}: missing column{'s' if len(lacking) > 1 else ''} {', '.join(lacking)}"
                       + (f" (not as {source} writes it)" if source else ""))
    if df.empty:
        raise BadInput(f"{path}: no rows")
    kinds = {**columns, **{c: k for c, k in (optional or {}).items() if c in df.columns}}
    for col, kind in kinds.items():
        raw = df[col]
        if kind is str:
            df[col] = raw.where(raw.isna(), raw.astype(str))
            continue
        num = pd.to_numeric(raw, errors="coerce")
        text = raw.astype(str).str.strip().str.lower()
        bad = num.isna() & raw.notna() & ~text.isin(NA_TEXT)
        what = "numbers"
        if kind is int:
            bad |= num.isna() | (num % 1 != 0) | (num < 0)
            what = "whole numbers ≥ 0"
        if bad.any():
            i = int(bad.to_numpy().argmax())
            cell = raw.iloc[i]
            shown = "an empty cell" if text.iloc[i] in NA_TEXT else repr(cell.item() if isinstance(cell, np.generic)
                                                                         else cell)
            raise BadInput(f"{path}: column {col} must hold {what}; line {i + 2} has {shown}")
        df[col] = num.astype(int) if kind is int else num.astype(float)
    for col, (lo, hi) in (bounds or {}).items():  # a probability above 1 or a negative KL: never drawn as if real
        if col in df.columns and (out := (df[col] < lo) | (df[col] > hi)).any():
            i = int(out.to_numpy().argmax())
            raise BadInput(f"{path}: column {col} must lie in [{lo:g}, {hi:g}]; line {i + 2} has {float(df[col].iloc[i]):g}")
    for col in finite:  # a NaN or inf cell among values: a blank or clipped cell, drawn as if measured
        if col in df.columns and df[col].notna().any() and (bad := ~np.isfinite(df[col])).any():
            i = int(bad.to_numpy().argmax())
            raise BadInput(f"{path}: column {col} must hold a finite number on every row (or be empty on all); line "
                           f"{i + 2} has {'no number (empty or nan)' if pd.isna(df[col].iloc[i]) else df[col].iloc[i]}")
    return df


def read_json(path: Path, source: str = "") -> dict[str, Any]:
    """A saved JSON object (run.json, baseline.json, ...); missing, unparsable or not an object is BadInput."""
    from probe.results import NO_FILE, parse_json_object

    path = Path(path)
    obj, why = parse_json_object(path)
    if obj is None:
        raise _missing(path, source) if why == NO_FILE else BadInput(f"{path}: {why}")
    return obj


def name_colours(names: list[str]) -> dict[str, Any]:
    """A colour per name that follows the name, not its place in a list: tab10's colour at crc32(name). Two names of
    a figure that meet there are settled in sorted order (the later one takes the next free colour), so the same
    names get the same colours whatever their order, and a name keeps its colour in every figure where it meets no
    such clash. Beyond 10 names the palette is tab10 and tab10 darkened (20 colours; then every colour differs
    from the ≤ 10 case): tab20's light half is too pale to read as a thin line or error bar on white."""
    import zlib

    import matplotlib

    base = [tuple(c) for c in matplotlib.colormaps["tab10"].colors]
    palette = base if len(set(names)) <= 10 else base + [(r * 0.55, g * 0.55, b * 0.55) for r, g, b in base]
    taken: set[int] = set()
    out = {}
    for name in sorted(set(map(str, names))):
        k = zlib.crc32(name.encode()) % len(palette)
        while k in taken and len(taken) < len(palette):
            k = (k + 1) % len(palette)
        taken.add(k)
        out[name] = (*palette[k], 1.0)
    return {n: out[str(n)] for n in names}


# line markers that tell series apart without their colour (tab10's olive and green, cyan and blue look alike to
# a red-green or blue-yellow colour-blind reader, and in greyscale print); "v" is left out: the shift figure's
# open triangle at a log axis' foot marks "did not move"
MARKERS = ("o", "s", "^", "D", "P", "X", "*", "h")


def name_markers(names: list[str]) -> dict[str, str]:
    """A marker per name (``MARKERS``, by the name's place in sorted order, cycling past 8), so the same names get
    the same markers whatever their order, as ``name_colours`` gives them colours."""
    order = {n: k for k, n in enumerate(sorted(set(map(str, names))))}
    return {n: MARKERS[order[str(n)] % len(MARKERS)] for n in names}


def short_name(name: Any, width: int = 32) -> str:
    """A model's or data set's name in at most ``width`` characters, for a tick label or a repr: a longer path
    keeps the most whole parts of its tail that fit behind "…/" (a carrier's keeps its method, ``carriers`` and
    its name: "…/shift/carriers/organism-ov-si"), never cutting inside a part where a whole one fits; only a
    last part too long by itself keeps its last ``width - 1`` characters behind "…"."""
    name = str(name)
    if len(name) <= width:
        return name
    parts = name.rstrip("/").split("/")  # a trailing '/' ends no part
    k = len(parts)  # the tail kept is parts[k:]
    while k and len("…/" + "/".join(parts[k - 1:])) <= width:
        k -= 1
    return "…/" + "/".join(parts[k:]) if k < len(parts) else "…" + name[-(width - 1):]
