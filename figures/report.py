"""``python -m figures report DIR``: the report of a ``python -m analyses.replicate`` run, rebuilt from its saved
results alone — ``DIR/report.md`` (figures in ``DIR/report_figures/``) and ``DIR/report.html`` (self-contained:
the same figures embedded as data URIs, opens from disk).

Every table and figure of the run sits beside the paper's published numbers (figures/paper.py, cited by table),
and every finding of the paper gets one line saying whether the run agrees, by a stated criterion
(figures/findings.py). The document is built once as blocks and rendered twice, so the two files cannot differ.
"""
from __future__ import annotations

import base64
import html
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from figures import (NBSP, PAGE_HEIGHT, PAGE_WIDTH, bar_aspect, cells_per_page, drawn_as_written,
                     drop_stale_pages, even_pages, fill_lines, fit_bar_labels, fit_stack_gaps, heatmap_ticks,
                     heatmap_ticks_again, keep_titles_apart, number, page_caption, page_grid, page_panels, page_stem,
                     paper, read_json, reads_once, save_figure, stacked_maps_height)
from figures.findings import Finding, findings, interval
from figures.merge import current_info
from figures.results import METHOD_LABELS, EvalRun, Replication, short
from probe.errors import BadInput
from probe.stats import N_BOOT
from probe.eval import md_code, md_text
from probe.zoo import ORGANISMS, VALIDATION_NOTE

FIG_DIR = "report_figures"
MAX_WIDTH = 1100  # px: figures are downscaled to this so the committed example stays small


@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[str]], caption: str = "") -> None:
        self.blocks.append(("table", (header, rows, caption)))

    def img(self, rel: str, alt: str) -> None:
        self.blocks.append(("img", (rel, alt)))

    def markdown(self) -> str:
        out = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append(f"{'#' * v[0]} {v[1]}")
            elif kind == "p":
                out.append(v)
            elif kind == "ul":
                out.append("\n".join(f"- {x}" for x in v))
            elif kind == "table":
                header, rows, caption = v  # markdown, as every block: its names went through md_text
                lines = ([f"*{caption}*", ""] if caption else []) + [
                    "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{v[1]}]({v[0]})")
        return "\n\n".join(out) + "\n"

    def html(self, root: Path, title: str) -> str:
        body = []
        for kind, v in self.blocks:
            if kind == "h":
                body.append(f"<h{v[0]}>{_inline(v[1])}</h{v[0]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(v)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in v) + "</ul>")
            elif kind == "table":
                header, rows, caption = v
                cap = f'<p class="caption">{_inline(caption)}</p>' if caption else ""
                head = "".join(f"<th>{_inline(x)}</th>" for x in header)
                trs = "".join("<tr>" + "".join(f"<td>{_inline(x)}</td>" for x in r) + "</tr>" for r in rows)
                wide = ' class="wide"' if len(header) > 8 else ""
                body.append(f'{cap}<div class="scroll"><table{wide}><thead><tr>{head}</tr></thead><tbody>{trs}'
                            "</tbody></table></div>")
            elif kind == "img":
                data = base64.b64encode((root / v[0]).read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(v[1])}">'
                            f"<figcaption>{_inline(v[1])}</figcaption></figure>")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                f"</title><style>{CSS}</style></head><body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;line-height:1.45;color:#222;margin:0;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:1.5em 2em;background:#fff}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em} h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #eee}
h3{font-size:1.05em;margin-top:1.4em}
.scroll{overflow-x:auto;margin:.8em 0}
table{border-collapse:collapse;font-size:.88em} p.caption{font-style:italic;color:#555;margin:.9em 0 .2em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:left;white-space:nowrap} th{background:#f3f3f3;white-space:normal;vertical-align:bottom}
tbody tr:nth-child(even){background:#fbfbfb} table.wide{font-size:.78em}
figure{margin:1em 0} img{max-width:100%;height:auto;border:1px solid #eee} figcaption{font-size:.85em;color:#555}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px;font-size:.92em}
strong.agrees{color:#1a7f37} strong.disagrees{color:#c62828} strong.partly{color:#a66300} strong.not-measured{color:#666}
"""


# what the inline marks leave as written, as GFM does: a `code span`, and a backslash-escaped ASCII punctuation mark
# (probe.eval.md_text's escapes of a name's '*', '_', '<', ...)
_LITERAL = re.compile(r"`([^`]+)`|\\([!-/:-@\[-`{-~])")


def _inline(text: str) -> str:
    """The few inline marks the report uses: **bold** (verdicts coloured), *italics*, `code`, and a name's escapes
    (probe.eval.md_text) read as the characters they escape: a model named ``a*b*c`` showed as a<em>b</em>c, and
    one in a code span too (the marks were read inside it)."""
    kept: list[str] = []

    def keep(m: re.Match) -> str:
        kept.append(f"<code>{html.escape(m.group(1))}</code>" if m.group(1) is not None else html.escape(m.group(2)))
        return f"\0{len(kept) - 1}\0"

    t = html.escape(_LITERAL.sub(keep, text))
    t = re.sub(r"\*\*(agrees|disagrees|partly|not measured)\*\*",
               lambda m: f'<strong class="{m.group(1).replace(" ", "-")}">{m.group(1)}</strong>', t)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"\*(.+?)\*", r"<em>\1</em>", t)
    return re.sub("\0(\\d+)\0", lambda m: kept[int(m.group(1))], t)


def cell(run: EvalRun, model: str, data_spec: str, diff: bool = False) -> str:
    """An accuracy (or paired difference) in %, with its 95 % interval — probe.eval's table format; a difference's
    numbers keep their signs as the findings print them (a bound of 0.036 points read '+0.0' in the tables)."""
    from probe.eval import _cell

    r = run.row(model, data_spec)
    if not diff:
        return _cell(r, run.metric)
    if r["n_items"] == 0:
        return "n/a"
    d, lo, hi = run.diff_columns
    if r[d] != r[d]:
        return "—"
    return interval(r[d], r[lo], r[hi])


def exact_legend(cells: list[tuple[str, EvalRun, str, str]]) -> str | None:
    """The legend of a table's † cells (a rate of 0 % or 100 %, whose bootstrap interval has zero width however few
    the items): each one's exact 95 % interval (probe.stats.reported_interval), as table.md's note and the eval
    figure beside the table give it. ``cells``: (label, run, model, data spec) of every cell of the table."""
    from probe.eval import ALIKE_MARK
    from probe.stats import reported_interval

    exact = []
    for label, run, model, spec in cells:
        r = run.row(model, spec)
        v = r[run.metric]
        if r["n_items"] and v in (0.0, 1.0):  # the cells probe.eval's _cell marks †
            lo, hi = reported_interval(v, r[f"{run.metric}_lo"], r[f"{run.metric}_hi"], r["n_items"])
            exact.append(f"{md_text(label)} [{number(100 * lo, '.1f')}, {number(100 * hi, '.1f')}]")
    return f"{ALIKE_MARK}; exact 95 % Clopper-Pearson intervals: {'; '.join(exact)}." if exact else None


def mix_text(mix: dict[str, float]) -> str:
    """A fine-tuning run's data mix, as markdown (its set labels through md_text)."""
    if len(mix) == 1:
        return f"{md_text(next(iter(mix)))} only"
    return f"{':'.join(map(md_text, mix))} = {':'.join(number(v) for v in mix.values())}"


def _paper_table(d: Doc, rows: dict[str, list[float]], columns: list[str], caption: str) -> None:
    d.table(["paper model", *map(md_text, columns)], [[md_text(k), *map(number, v)] for k, v in rows.items()],
            caption)


def _copy_png(src: Path, dest: Path) -> bool:
    """The figure for the report: its PNG downscaled (report.md and the committed example stay small), and its
    PDF, when it has one, copied whole beside it for a paper."""
    if not src.is_file():
        return False
    from PIL import Image

    with Image.open(src) as im:
        # its resolution kept (scaled with a downscale), so it keeps its size in inches, and its text its size in
        # points, in a paper: saved without it, pdfLaTeX took a 7 in figure at 72 dpi, 14.6 in wide
        dpi = im.info.get("dpi")
        if im.width > MAX_WIDTH:
            dpi = dpi and tuple(d * MAX_WIDTH / im.width for d in dpi)
            im = im.resize((MAX_WIDTH, round(im.height * MAX_WIDTH / im.width)), Image.LANCZOS)
        im.save(dest, optimize=True, **({"dpi": dpi} if dpi else {}))
    if src.with_suffix(".pdf").is_file():
        shutil.copyfile(src.with_suffix(".pdf"), dest.with_suffix(".pdf"))
    return True


def _copy_pages(src: Path, dest: Path) -> list[Path]:
    """``_copy_png`` of a figure and of its further pages (``src-2.png``, ... as ``dest-2.png``, ...): the PNGs
    copied, none when ``src`` is missing."""
    out: list[Path] = []
    while _copy_png(src.with_name(page_stem(src.stem, len(out)) + ".png"),
                    page := dest.with_name(page_stem(dest.stem, len(out)) + ".png")):
        out.append(page)
    drop_stale_pages(dest.parent, dest.stem, [*out, *(p.with_suffix(".pdf") for p in out)])
    return out


def _finding_list(d: Doc, fs: list[Finding]) -> None:
    d.ul([f.line() for f in fs])


# inches: a model's column of two heatmaps at its narrowest where a page has 2 columns, and the figure's margin;
# a page holds up to FIG2_MOST models (2 rows × 3 columns, or 3 rows × 2 with fewer: figure2_per_page)
FIG2_WIDTH, FIG2_MARGIN, FIG2_MOST = 2.6, (1.2, 0.4), 6
# a page of 5 or 6 models goes 2 rows × 3 columns this narrow (3 rows × 2 left each heatmap 0.6 in high, the
# colour bars shorter than their labels); up to 4 models it stays 2 × 2
FIG2_NARROW = 1.9
# inches: a model's column where the page has room, the height each of its two maps gets of it (about, as laid
# out), and what a layer's row asks for: up to 36 layers that column holds them; a 72B grid's 80 rows got 0.02 in
# each, in maps 1.8 in high on a page 5.2 in high, so taller grids take the page's height they need
FIG2_HEIGHT, FIG2_MAP = 4.8, 1.8  # and MAP_LAYER a layer's row (figures)


def figure2_height(layers: int, rows: int) -> float:
    """Inches a Figure 2 column of two maps of ``layers`` rows asks for on a page of ``rows`` rows of models
    (``stacked_maps_height``): FIG2_HEIGHT, and for a tall grid its maps' extra height up to the page's share of a
    row; never less than FIG2_HEIGHT."""
    return stacked_maps_height(layers, rows, FIG2_HEIGHT, FIG2_MAP, FIG2_MARGIN[1])


# inches of a model's column that are not its maps, as laid out (measured on pages of 80 × 64 and 28 × 28 grids):
# across, the layer labels and the colour bar with its label; down, the title, tick labels and the gap between maps
FIG2_TEXT = (1.2, 1.15)
FIG2_COLUMN = 3.0  # inches: a model's column where the page has room


def _figure2_grid(models: int) -> tuple[float, int, int]:
    """A Figure 2 page of ``models``: its columns' least width, and its (rows, columns) of models (4: 2 × 2; 5 or
    6: 2 × 3, narrower)."""
    min_width = FIG2_WIDTH if models <= 4 else FIG2_NARROW
    return (min_width, *page_grid(models, min_width, FIG2_MARGIN[0]))


def figure2_per_page(layers: int, heads: int) -> int:
    """How many models a Figure 2 page of maps of ``layers`` × ``heads`` holds: the most (up to FIG2_MOST, down to
    2, which fit one row) whose page, as page_panels sizes it, leaves each cell MAP_CELL inches (2.75 pixels of
    the 110 dpi PNG) each way (``cells_per_page``)."""
    def room(k: int) -> tuple[float, float]:
        _, rows, cols = _figure2_grid(k)
        across = min(FIG2_COLUMN, (PAGE_WIDTH - FIG2_MARGIN[0]) / cols) - FIG2_TEXT[0]
        return across, (min(figure2_height(layers, rows), (PAGE_HEIGHT - FIG2_MARGIN[1]) / rows) - FIG2_TEXT[1]) / 2

    return cells_per_page(layers, heads, FIG2_MOST, room)


@drawn_as_written
def draw_figure2(r: Replication, dest: Path) -> list[Path]:
    """One panel per swept model (experts on their own data, the base on text): KL and probability-accuracy
    drop per (layer, head), from each sweep's heads.csv. ``dest`` is the first page's PNG; past 6 models further
    pages follow it (figure2-2.png, ...), each with its PDF. Returns the PNGs (none when no sweep is on disk)."""
    models = [m for m in [*r.experts, r.base] if (r.out / "heads" / short(m) / "heads.csv").is_file()]
    sweeps = [r.heads(m, need=("kl", "prob_accuracy_drop")) for m in models]
    # every page holds as many models, so a grid is drawn alike on each (the run's tallest and widest decide)
    per_page = figure2_per_page(*(max(heads[c].nunique() for heads, _ in sweeps) for c in ("layer", "head"))) \
        if models else 1
    pages = even_pages(len(models), per_page)
    written = []
    for k, page in enumerate(pages):
        fig, maps, titles = _figure2_page(r, [models[i] for i in page], [sweeps[i] for i in page])
        fig.suptitle("Figure 2: removing one head at a time" + page_caption(pages, k, "models"), fontsize=10)
        fig.tight_layout()
        if fit_bar_labels(fig, {"KL(orig‖masked)": "KL"}):  # 5 or 6 models: bars shorter than their labels
            fig.tight_layout()
        heatmap_ticks_again(fig, maps)  # at the heatmaps' size as laid out (5 or 6 models: narrower columns)
        keep_titles_apart(fig, titles)
        # a model's two heatmaps as one block: the gap between them only what their tick labels need, well under
        # the gap between models (title, labels); they were the same, so the eye paired the wrong maps. Its new
        # layout can leave a bar shorter than its label (a bar as wide as its heatmap allows): fitted again
        blocks = [(a, b) for (a, *_), (b, *_) in zip(maps[::2], maps[1::2])]
        for _ in range(3):
            fit_stack_gaps(fig, blocks)
            if not fit_bar_labels(fig, {"KL(orig‖masked)": "KL"}):
                break
            fig.tight_layout()
        png = dest.with_name(page_stem(dest.stem, k) + ".png")
        save_figure(fig, png)
        save_figure(fig, png.with_suffix(".pdf"))  # vector, for a paper; the PNG is what report.md shows
        written.append(png)
    drop_stale_pages(dest.parent, dest.stem, [*written, *(p.with_suffix(".pdf") for p in written)])
    return written


def _figure2_page(r: Replication, models: list[str], sweeps: list[tuple[Any, dict]]
                  ) -> tuple[Any, list[tuple[Any, list[int], list[int]]], list[tuple[Any, str]]]:
    """The page of ``models`` (``sweeps``: their heads.csv and baseline): its figure, its heatmaps ((axes, layers,
    heads) each) and its titles ((axes, title) each)."""
    from figures.heads import _grid, centred_limits, clip_note, extend_for, kl_limit

    # one column of two heatmaps per model, wrapped into rows on a page (4 models: 2 × 2; 5 or 6: 2 × 3)
    min_width, rows, _ = _figure2_grid(len(models))
    height = figure2_height(max(heads["layer"].nunique() for heads, _ in sweeps), rows)
    fig, panels = page_panels(len(models), FIG2_COLUMN, height, min_width=min_width, margin=FIG2_MARGIN, stack=2,
                              grouped=True, dpi=110)
    # titles wrapped to their column (about 16 characters an inch at 8 pt): a long model name ran into the next
    # (the page's columns: each panel's own grid, nested in the page's, has one)
    chars = int(14.5 * fig.get_figwidth() / panels[0][0].get_subplotspec().get_topmost_subplotspec()
                .get_gridspec().ncols)
    aspect = bar_aspect(len(models))
    if height > FIG2_HEIGHT:  # a tall grid's maps: the bars grow with them (left as they were, half the map high)
        aspect *= (height - FIG2_TEXT[1]) / (FIG2_HEIGHT - FIG2_TEXT[1])
    maps, titles = [], []
    for k, (m, (heads, base)) in enumerate(zip(models, sweeps)):
        for row, (metric, cmap, label) in enumerate((("kl", "magma_r", "KL(orig‖masked)\n[nats]"),
                                                     ("prob_accuracy_drop", "RdBu_r", "prob. accuracy drop\n[points]"))):
            grid, layers, hs = _grid(heads, metric)
            ax = panels[k][row]
            if metric == "kl":
                (vmax, clipped), vmin = kl_limit(grid), 0.0
            else:  # a signed drop: red where removing the head hurts, blue where it helps, white at no change
                grid = 100 * grid
                vmin, vmax, clipped = centred_limits(grid, 0.0)
            im = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
            heatmap_ticks(ax, layers, hs)
            maps.append((ax, layers, hs))
            if row == 1:  # the KL map above has the same heads: its "head" would only widen the gap in the block
                ax.set_xlabel("head", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, aspect=aspect, extend=extend_for(grid, vmin, vmax))
            cb.ax.tick_params(labelsize=7)
            cb.set_label(label + (clip_note(grid, vmin, vmax, ".3g" if metric == "kl" else "+.1f")
                                  if clipped else ""), fontsize=7)
            if row == 0:
                what = "text" if m == r.base else r.own[r.experts.index(m)]
                # a no-break space keeps the value with its % (textwrap put the % on a line of its own)
                title = (f"{m} on {what} ({r.cfg['heads']['split']})\nbaseline prob. acc. "
                         f"{number(100 * base['prob_accuracy'], '.1f')}{NBSP}% (n={base['n_items']})")
                ax.set_title(fill_lines(title, chars), fontsize=8)
                titles.append((ax, title))
    return fig, maps, titles


def build(r: Replication, figdir: Path, state: RunState | None = None) -> Doc:
    """The report of ``r``, its figures drawn into ``figdir``; ``state``: the run's (``run_state``), when the caller
    has it already."""
    state = run_state(r) if state is None else state
    d = Doc()
    cfg = r.cfg
    fs = findings(r)
    text = r.data(cfg["eval"]["text"])
    d.h(1, "Is extending modality the right path? — the paper's pipeline, replicated")
    # every user-chosen name (model, set label, run, config file) goes in through md_text or md_code: the blocks are
    # markdown, and a name's '*', '_', '<', '[', '$' read as marks in report.md (GFM) and report.html (_inline)
    d.p(f"Config {md_code(Path(r.info.get('config_file', '')).name)}: base {md_code(r.base)}, experts "
        + ", ".join(map(md_code, r.experts)) + f"; device {md_code(cfg['device'])}, dtype {md_code(cfg['dtype'])}, seed "
        f"{cfg['seed']}. Accuracy in %, with 95 % bootstrap intervals over items ({N_BOOT:,} bootstrap resamples, "
        "percentile); differences are paired (same items). Each section sets the run beside the paper's published "
        "numbers (cited by table; the paper measured 7B models on MMLU, MMMU, Video-MME and the like, so compare "
        "directions, not values) and says, "
        "per finding, whether the run agrees and by which criterion. Rebuild with `python -m figures report DIR`.")
    if any(r.paper_name(e) for e in r.experts):
        d.p("Stand-ins: " + "; ".join(f"{md_code(e)} for {md_text(r.paper_name(e))}" for e in r.experts)
            + f"; {md_code(r.base)} for the "
            "base LLM (Qwen2-7B-Instruct).")
    if {r.base, *r.experts} <= {f"organism-{n}" for n in ORGANISMS}:
        d.p(VALIDATION_NOTE)
    if note := state.note():
        d.p(note)
    d.h(2, "Findings at a glance")
    d.p("Each line: the verdict, where the paper says it, and the paper's claim; the numbers and the criterion "
        "that decided it follow in the section.")
    d.ul([f.short() for group in fs.values() for f in group])

    # Table 3
    d.h(2, "Table 3: the base and its modality extensions on every data set")
    if r.complete("table3"):
        run = r.eval("table3")
        labels = list(cfg["data"])
        rows = [[md_text(m), *[cell(run, m, r.data(x)) for x in labels],
                 "reference" if m == r.base else cell(run, m, text, diff=True)] for m in [r.base, *r.experts]]
        d.table(["model", *map(md_text, labels), f"{md_text(cfg['eval']['text'])}: Δ vs base"], rows,
                f"This run ({run.metric.replace('_', ' ')}, %; {measured_on(r, [(x, run) for x in labels])}); n/a: the "
                "model cannot read that modality")
        if legend := exact_legend([(f"{m} on {x}", run, m, r.data(x)) for m in [r.base, *r.experts] for x in labels]):
            d.p(legend)
        for png in _copy_pages(run.dir / "eval.png", figdir / "table3.png"):
            d.img(f"{FIG_DIR}/{png.name}", "Table 3 as a figure: accuracy per data set with 95 % intervals")
    _paper_table(d, paper.TABLE3, paper.TABLE3_COLUMNS, "Paper, Table 3 (Qwen2-7B family, text benchmarks)")
    _finding_list(d, fs["table3"])

    # Figure 2
    d.h(2, "Figure 2: head salience (each expert on its own modality, the base on text)")
    hd = r.cfg["heads"]
    d.p(f"Each head of the LM decoder removed in turn (`probe.heads`, exact engine) on the {md_text(hd['split'])} "
        "split of "
        + ("the items generated for training (never the evaluation items)" if hd["data"] == "generated"
           else "each model's evaluation set") + ("" if hd["generate"] else "; no generation, so no accuracy column")
        + ".")
    if r.complete("heads"):
        rows = []
        for m in [*r.experts, r.base]:
            p = r.out / "heads" / short(m)
            if not (p / "heads.csv").is_file():
                continue
            h, b = r.heads(m, need=("kl",))
            h = h.sort_values("kl", ascending=False)
            top = ", ".join(f"L{x.layer}.H{x.head} ({number(x.kl, '.2f')})" for x in h.head(3).itertuples())
            acc = "—" if b["accuracy"] != b["accuracy"] else number(100 * b["accuracy"], ".1f")
            rows.append([md_text(m), str(b["n_items"]), acc, number(100 * b["prob_accuracy"], ".1f"), top])
        d.table(["model", "items", "accuracy", "prob. accuracy", "most salient heads (KL, nats)"], rows,
                "This run: unmasked baselines of the sweeps and their three most salient heads")
        for png in draw_figure2(r, figdir / "figure2.png"):
            d.img(f"{FIG_DIR}/{png.name}", "Figure 2 analogue: KL and probability-accuracy drop per removed head")
    d.p(f"Paper (§5.2): {paper.HEADS_BASELINE[0]} scores {paper.HEADS_BASELINE[2]} % on "
        f"{paper.HEADS_BASELINE[1]} unmasked; masking any head costs substantially; shallow layers matter most.")
    _finding_list(d, fs["heads"])

    # shift
    d.h(2, "Parameter shift (Eq. 3) and the Eq. 4 weights")
    if r.complete("shift"):
        per = r.shift_per_model()
        weight = eq4_weights(r)
        rows = []
        for e in r.experts:
            pub = paper.SHIFT_RELEASED.get(r.paper_name(e))
            # the header promises the paper model each expert stands for: it printed the expert's name alone
            stands = f"{e} ({r.paper_name(e)})" if r.paper_name(e) else e
            rows.append([md_text(stands), number(per[e]["mean_delta_avg"], ".4g"),
                         _times(per[e]["ratio_to_least_shifted"]), number(weight[e], ".3f") if e in weight else "—",
                         number(pub[0]) if pub else "—", number(pub[1], ".3f") if pub else "—"])
        d.table(["expert (stands for)", "mean Δavg", "× least shifted", "Eq. 4 mean weight", "paper: mean Δavg",
                 "paper: mean weight"], rows, weights_caption(cfg["merge"]["alpha0"]))
        if any(paper.SHIFT_RELEASED.get(r.paper_name(e)) for e in r.experts):  # the paper's values printed
            d.p(released_shift_note())
        if _copy_png(r.out / "shift" / "shift_models.png", figdir / "shift.png"):
            d.img(f"{FIG_DIR}/shift.png", "Mean Δavg per expert and module")
    _finding_list(d, fs["shift"])

    # merges
    d.h(2, "The merges")
    d.p(merges_paragraph(cfg["merge"], cfg.get("heads"), cfg["eval"]["split"]))
    pngs = _copy_pages(r.out / "merge" / "salience" / "merge_heads.png", figdir / "salience.png") \
        if r.complete("merge") else []
    for png in pngs:
        d.img(f"{FIG_DIR}/{png.name}", "Salience-guided merge: weight of each expert's head slices beside its "
              "salience")

    # Table 4
    d.h(2, "Table 4: the merged LMs on text")
    if r.complete("table4"):
        run = r.eval("table4")
        rows = [[md_text(r.base), cell(run, r.base, text), "reference"]]
        rows += [[METHOD_LABELS[m], cell(run, r.merge_dir(m), text), cell(run, r.merge_dir(m), text, diff=True)]
                 for m in r.methods]
        d.table(["model", md_text(cfg["eval"]["text"]), "Δ vs base"], rows,
                f"This run ({run.metric.replace('_', ' ')}, %; {measured_on(r, [(cfg['eval']['text'], run)])})")
        if legend := exact_legend([(name, run, m, text) for name, m in
                                   [(r.base, r.base), *((METHOD_LABELS[x], r.merge_dir(x)) for x in r.methods)]]):
            d.p(legend)
    _paper_table(d, paper.TABLE4, paper.TABLE3_COLUMNS, "Paper, Table 4 (merged Qwen2-7B LLMs)")
    _finding_list(d, fs["table4"])

    # Table 5
    d.h(2, "Table 5: the merged LMs inside each expert's carrier, on its modality")
    if r.complete("table5"):
        runs = {e: r.eval("table5", short(e)) for e in r.experts}
        header = ["model"] + [md_text(f"{l} ({e})") for e, l in zip(r.experts, r.own)]
        rows = [["expert alone"] + [cell(runs[e], e, r.data(l)) for e, l in zip(r.experts, r.own)]]
        for m in r.methods:
            rows.append([METHOD_LABELS[m]] + [cell(runs[e], r.carrier(m, e), r.data(l))
                                              for e, l in zip(r.experts, r.own)])
        d.table(header, rows, f"This run ({runs[r.experts[0]].metric.replace('_', ' ')}, %; "
                f"{measured_on(r, [(l, runs[e]) for e, l in zip(r.experts, r.own)])})")
        if legend := exact_legend([(f"{name} on {l} ({e})", runs[e], m, r.data(l)) for e, l in zip(r.experts, r.own)
                                   for name, m in [("expert alone", e),
                                                   *((METHOD_LABELS[x], r.carrier(x, e)) for x in r.methods)]]):
            d.p(legend)
        rows = [[METHOD_LABELS[m]] + [cell(runs[e], r.carrier(m, e), r.data(l), diff=True)
                                      for e, l in zip(r.experts, r.own)] for m in r.methods]
        d.table(header, rows, "Carrier minus expert, points (paired)")
    _paper_table(d, paper.TABLE5, paper.TABLE5_COLUMNS, "Paper, Table 5")
    _finding_list(d, fs["table5"])

    # Figure 3
    ft = cfg["finetune"]
    d.h(2, "Figure 3: fine-tuning the Eq. 4 merge")
    # finetune.lora trains adapters only: said, as the paper's Figure 3 trains every weight
    how = f"through rank-{ft['lora']} LoRA adapters (the paper trains every weight) for " if ft.get("lora") else ""
    d.p(f"The Eq. 4 merge inside {md_code(ft['carrier'])}'s carrier, fine-tuned {how}{ft['steps']} steps (batch "
        f"{ft['batch_size']}, LM lr {number(ft['lm_lr'])}) once per data choice: "
        + "; ".join(f"{md_text(n)} ({mix_text(mix)})" for n, mix in r.runs.items())
        + f". Checkpoints {r.saved_steps} evaluated on " + ", ".join(map(md_text, ft["eval_data"])) + ".")
    if r.complete("steps"):
        from figures.steps import draw_steps, metric_word

        rows, metrics, scored = [], [], []
        for name in r.runs:
            run, t = r.steps(name)
            metrics.append(run.metric)
            scored += [(lab, run) for lab in ft["eval_data"]]
            for lab in ft["eval_data"]:
                g = t[t["data"] == run.data_names[r.data(lab)]]  # in step order (Replication.steps)
                rows.append([md_text(name), md_text(lab), " → ".join("n/a" if n == 0 else number(100 * v, ".1f")
                                                   for v, n in zip(g[run.metric], g["n_items"]))])
        # a --no-generate run's are prob. accuracies: the header said "accuracy" whatever the runs scored
        d.table(["run", "data", f"{metric_word(metrics)} at steps " + ", ".join(map(str, r.saved_steps))], rows,
                f"This run ({measured_on(r, scored)}, at every checkpoint)")
        tmp = figdir / "_steps"
        tmp.mkdir(exist_ok=True)
        draw_steps([r.out / "steps" / n for n in r.runs], out=tmp)
        pngs = _copy_pages(tmp / "steps.png", figdir / "figure3.png")
        shutil.rmtree(tmp)
        for png in pngs:
            d.img(f"{FIG_DIR}/{png.name}", "Figure 3 analogue: accuracy against fine-tuning steps, one panel per run")
    d.p("Paper (Figure 3, §6.2): MMLU and MMLU-Pro rise slightly or peak within the first ~100 steps and tend to "
        "fall after ~1,000, while MMMU generally improves with fine-tuning (the paper measured no video set here).")
    _finding_list(d, fs["steps"])

    # Figure 4
    d.h(2, "Figure 4: where fine-tuning and merging move the weights")
    if r.complete("trajectory"):
        for fig, cap in (("fig4a", "Figure 4a analogue: each run's checkpoints, relative to the Eq. 4 merge"),
                         ("fig4b", "Figure 4b analogue: base, experts and every merge, relative to the base")):
            if _copy_png(r.out / "trajectory" / fig / "trajectory_sketch.png", figdir / f"{fig}.png"):
                d.img(f"{FIG_DIR}/{fig}.png", cap + " (random-projection sketch of the LM weights; PCA and t-SNE)")
    d.p("Paper (Figure 4, §6.2): t-SNE of the weights; fine-tuning on text, image and video moves the merged "
        "model in distinct directions (4a); the weighted merge sits among the models it merges (4b).")
    _finding_list(d, fs["trajectory"])

    # timing
    d.h(2, "Run time per stage")
    d.table(["stage", "wall s", "CPU s", "resumed"], timing_rows(r),
            "Time of the process that completed each stage (a resumed stage counts that process only); CPU "
            "seconds sum all its threads, so they do not grow when other jobs share the machine")
    return d


@drawn_as_written
def build_report(out: Path) -> list[Path]:
    from probe.results import atomic_write_bytes, partial_dir

    out = Path(out)
    with reads_once():  # each result file read and checked once in this build (its tables, findings and figures)
        r = Replication.read(out)
        figdir = out / FIG_DIR
        # figures are drawn aside: bad results leave the previous report whole; a full disk names the figures'
        # folder (PIL's error names no file)
        state = run_state(r)  # once: report.md's note and the warning below both say it
        with partial_dir(figdir) as tmp:
            doc = build(r, tmp, state)
    if note := state.note(markdown=False):  # the report is written all the same: what the finished stages
        print("warning: " + note, file=sys.stderr)  # hold, marked
    for name in ("report.md", "report.html"):  # a kill from here on leaves no report rather than the earlier
        (out / name).unlink(missing_ok=True)  # build's beside this one's, or pointing at figures no longer there
    if figdir.exists():
        shutil.rmtree(figdir)
    tmp.rename(figdir)
    atomic_write_bytes(out / "report.md", doc.markdown().encode())
    atomic_write_bytes(out / "report.html", doc.html(out, "omniprobe replication report").encode())
    return [out / "report.md", out / "report.html"]


@dataclass
class RunState:
    """What keeps the report from being one whole run (``run_state``), checked once per report: the check hashes
    every stage's outputs (``analyses.replicate.stale_reason``), and report.md's note and the stderr warning both
    say it."""
    out: Path
    missing: list[str]  # stages not completed with the run's settings
    stale: list[tuple[str, str, list[str]]]  # (stage, why it is stale, the stages after it)
    setups: dict[str, list[str]]  # software setup → the completed stages that ran under it

    def note(self, markdown: bool = True) -> str:
        """The note for the report's top (and, ``markdown`` False, as plain text for stderr): the stages not
        completed with its settings (their sections hold no numbers of this run, their findings read "not
        measured"), the stages whose outputs are not those their record says (edited by hand, or an upstream stage
        completed again since), naming the stages after them, and the software setups when there are several. ""
        for a whole run. The run's folder, a name the user chose, goes in through md_text / md_code (a --out named
        ``a*b*c`` showed in italics)."""
        text, code = (md_text, md_code) if markdown else (str, lambda s: f"`{s}`")
        bold = (lambda s: f"**{s}**") if markdown else str
        missing = self.missing
        parts = []
        if missing:
            parts.append(f"{bold('Unfinished run')}: stage{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                         f"{'have' if len(missing) > 1 else 'has'} not completed with this run's settings; "
                         f"{'their' if len(missing) > 1 else 'its'} tables and figures are left out and "
                         f"{'their' if len(missing) > 1 else 'its'} findings read \"not measured\".")
        for s, why, after in self.stale:
            parts.append(f"{bold('Not one consistent run')}: {s}: {text(why)}"
                         + (f"; the stages after it ({', '.join(after)}) were computed from other outputs." if after
                            else "."))
        if parts:
            parts.append(f"Run {code(f'python -m analyses.replicate --out {self.out}')} with this config to complete "
                         "and redo them.")
        if len(self.setups) > 1:
            # kept on purpose (the code digest moves with any edit; a fix that changes numbers changes the stages'
            # fingerprints), but not silently: a Table 3 of one code beside a Table 4 of another is said so
            parts.append(f"{bold('Stages of different software')}: " + "; ".join(
                f"{', '.join(names)} under {setup}" for setup, names in self.setups.items())
                + ". Their numbers are compared as one run's; delete a stage's record in `stages/` to run it again.")
        return " ".join(parts)


def run_state(r: Replication) -> RunState:
    """The run's state as its records and stage dirs have it now (``RunState``)."""
    from analyses.replicate import BY_NAME, stale_reason, upstream_closure

    stages = [s for s in r.info["stages"] if s != "report" and s in BY_NAME]
    missing = [s for s in stages if not r.recorded_complete(s)]
    stale = [(s, why, [t for t in stages if t != s and s in upstream_closure(t)])
             for s in stages if s not in missing and (why := stale_reason(r.out, s))]
    return RunState(r.out, missing, stale, software_setups(r, [s for s in stages if s not in missing]))


def software_setups(r: Replication, stages: list[str]) -> dict[str, list[str]]:
    """The torch, transformers and omniprobe source each completed stage ran under (its record), grouped: one key
    for a run of one setup. A record without versions counts as its own "unrecorded" setup."""
    from analyses.replicate import read_state
    from probe.heads import SOFTWARE

    setups: dict[str, list[str]] = {}
    for s in stages:
        v = read_state(r.out, s).get("versions")
        setup = (", ".join(f"{k} {v.get(k)}" for k in SOFTWARE if k in v) if isinstance(v, dict) and v
                 else "unrecorded software")
        setups.setdefault(setup, []).append(s)
    return setups


def timing_rows(r: Replication) -> list[list[str]]:
    """The run-time table: each stage's wall and CPU seconds from its record, "—" for a stage not completed with
    this run's settings (a record of earlier settings' stage gave its time, and the "all" row added it in), and
    their sum."""
    stages = [s for s in r.info["stages"] if s != "report" and r.recorded_complete(s)]
    fmt = lambda v: "—" if v is None else number(v, ".0f")  # noqa: E731
    rows = [[s, fmt(r.seconds(s)), fmt(r.seconds(s, "cpu_seconds")), "yes" if r.resumed(s) else ""]
            if s in stages else [s, "—", "—", ""] for s in r.info["stages"] if s != "report"]
    rows.append(["all", fmt(sum(r.seconds(s) or 0 for s in stages)),
                 fmt(sum(r.seconds(s, "cpu_seconds") or 0 for s in stages)), ""])
    return rows


def eq4_weights(r: Replication) -> dict[str, float]:
    """The Eq. 4 merge's mean weight per model (merge/shift/merge.json), {} unless the merge stage completed with
    this run's settings: the shift table read the file whenever it was there, so a run whose [merge] settings
    changed, stopped before its merge stage ran again, showed the earlier settings' weights as this run's."""
    merge_json = r.out / "merge" / "shift" / "merge.json"
    if not (r.complete("merge") and merge_json.is_file()):  # a merge.json from before 2026-12-06: mean_alpha
        return {}
    weight = current_info(read_json(merge_json)).get("mean_weight") or {}
    if not isinstance(weight, dict) or not all(isinstance(v, (int, float)) for v in weight.values()):
        raise BadInput(f"{merge_json}: mean_weight is not a number per model")
    return weight


def measured_on(r: Replication, sets: list[tuple[str, EvalRun]]) -> str:
    """What a table's scores were measured on, for its caption: the split and each set's items, by config label
    (``sets``: label and the probe.eval run that scored it; a label scored by several runs counts the most items
    any of them scored). Without it a reader of a table cannot tell 12 items from 900 behind an interval."""
    n: dict[str, int] = {}
    for label, run in sets:
        n[label] = max(n.get(label, 0), run.n_items(r.data(label)))
    split = next((run.split for _, run in sets if run.split), "")
    counts = [f"{md_text(label)} {k}" for label, k in n.items()]
    counts[0] += " items"
    return (f"{md_text(split)} split: " if split else "") + ", ".join(counts)


def weights_caption(alpha0: float) -> str:
    """The shift table's caption: the run's Eq. 4 expert weights (1 − α0)·α_i share its 1 − α0 of the mass (they
    sum to it in merge.json); the paper's column, the authors' release, shares 0.5. It said "the 0.5 non-base
    mass" whatever merge.alpha0 the run used."""
    paper_mass = "" if alpha0 == 0.5 else "; the paper's column: of the 0.5 of its α0 = 0.5"
    return ("This run beside the paper's (§5.3; the values are those of the authors' released code, weights "
            f"(1 − α0)·α_i: shares of the {number(1 - alpha0)} non-base mass{paper_mass})")


def released_shift_note() -> str:
    """What the shift table's paper column gives: the released code's mean Δavg values make the most shifted model
    (Qwen2-VL) about 5× the others, where §5.3 says 10 times; printed beside them, they read as bearing it out."""
    delta = {m: d for m, (d, _) in paper.SHIFT_RELEASED.items()}
    top = max(delta, key=delta.get)
    ratios = " and ".join(f"{number(delta[top] / d, '.1f')}× {m}'s" for m, d in delta.items() if m != top)
    return (f"The paper columns (the released code's values) make {top}'s mean Δavg {ratios}, not the "
            f"{number(paper.SHIFT_RATIO)}× §5.3 states.")


def _times(ratio: float | None) -> str:
    """× least shifted; shift writes null when some model did not move (no ratio to it is defined)."""
    return "—" if ratio is None else f"{number(ratio, '.2f')}×"


SALIENCE_METRIC_LABELS = {"kl": "mean KL", "accuracy_drop": "accuracy drop",
                          "prob_accuracy_drop": "probability-accuracy drop"}


def merges_paragraph(m: dict, heads: dict | None = None, eval_split: str = "validation") -> str:
    """What the merge stage ran, from its config: only the configured methods, and the salience merge with the
    metric and base rule it used (a fixed sentence described salience and TIES merges a run had not made). With
    ``heads`` (the config's heads section) whose sweeps read the evaluation sets in the split they are scored on
    (heads.data = "eval" and heads.split = ``eval_split``, as paper-7b.toml's Figure 2 on MMMU validation does),
    it says that the salience rows are scored on the items that set the salience merge's weights (until 2026-12-05
    the report did not say so); a sweep of those sets' other split (MMMU's dev) is held out."""
    said = ["Eq. 1 averages the base and every expert",
            f"Eq. 4 (α0 = {number(m['alpha0'])}, τ = {number(m['temperature'])}) weights the experts by "
            "softmax(Δavg/τ)"]
    if "salience" in m["methods"]:
        rule = ("the base (its sweep on text) and the experts compete by softmax(ŝ/τ_s)" if m["salience_base"]
                else f"the base keeps α0 = {number(m['alpha0'])} and the experts share the rest by softmax(ŝ/τ_s)")
        said.append("the salience-guided merge (ours) weights each head's slices by the Figure 2 sweeps' "
                    f"{SALIENCE_METRIC_LABELS[m['salience_metric']]} (ŝ: normalised per model; τ_s = "
                    f"{number(m['salience_temperature'])}; {rule}) and the rest by Eq. 4")
    if "ties" in m["methods"]:
        said.append(f"TIES trims each task vector to {number(m['density'])} of its entries (λ = {number(m['lam'])})")
    text = "; ".join(said) + ". Each merged LM is also transplanted into every expert's carrier."
    if "salience" in m["methods"] and heads is not None and heads.get("data") == "eval" \
            and heads.get("split") == eval_split:
        tables = "Tables 4 and 5" if m["salience_base"] else "Table 5"
        text += (f" **Not held out:** the salience sweeps ran on the evaluation sets themselves (heads.data = "
                 f"\"{heads.get('data')}\", split {heads.get('split')}), so the salience merge's rows of {tables} are "
                 "scored on the items that set its weights, and its comparison with the other merges is not a "
                 "held-out result (set heads.data = \"generated\", or sweep a training split).")
    return text
