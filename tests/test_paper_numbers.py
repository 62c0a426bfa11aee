"""The paper's numbers the report prints (figures/paper.py) and the claims its verdicts test (figures/findings.py),
checked against the paper itself.

The paper's text (``paper-full-text.txt``, an HTML-to-text extraction) is not in the repository: it lives beside the
checkout in ``../shared/paper`` (or wherever ``OMNIPROBE_PAPER`` points). Where it is absent the tests that read it
skip; the internal-consistency tests below them run everywhere. The extraction flattens each table into lines: a
header line of benchmark names, a line of metric names (HumanEval+ spans Pass@1/5/10), then one line per model with
its numbers, arrows written as ``\\uparrow``/``\\downarrow``/``=``; group lines without numbers ("Qwen2-7B based",
"Average", "Weighted Average") head the rows below them; the caption ("Table N: ...") closes the table.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from figures import paper
from figures.findings import CLAIMS, MERGE_LOSS

PAPER = Path(os.environ.get("OMNIPROBE_PAPER") or
             Path(__file__).resolve().parents[2] / "shared" / "paper" / "paper-full-text.txt")
NUMBER = re.compile(r"(?<![\w@.])\d+\.\d+")
HEADING = re.compile(r"^(\d+(?:\.\d+)*) [A-Z]")


@pytest.fixture(scope="module")
def lines() -> list[str]:
    if not PAPER.is_file():
        pytest.skip(f"the paper's text is not at {PAPER} (set OMNIPROBE_PAPER): only the internal checks run")
    # the extraction writes a no-break space after "Table", "Figure", "Section" and the like
    return PAPER.read_text(encoding="utf-8").replace("\xa0", " ").splitlines()


def table_region(lines: list[str], n: int) -> list[str]:
    """Table n's lines, header first: from the last 'Model ...' header line before its caption up to the caption."""
    end = next(i for i, x in enumerate(lines) if x.startswith(f"Table {n}:"))
    start = max(i for i in range(end) if lines[i].startswith("Model "))
    return lines[start:end]


def table_rows(region: list[str]) -> list[tuple[str, str, list[float]]]:
    """(group, row name, numbers) per model line of a table, in the paper's order; the group is the last line
    without numbers above it ('' before any)."""
    rows, group = [], ""
    for line in region[1:]:
        nums = [float(x) for x in NUMBER.findall(line)]
        if nums:
            rows.append((group, line.split(" ")[0], nums))
        elif not line.startswith("Acc "):  # the metric line of Tables 3 and 4
            group = line.strip()
    return rows


def section_of(lines: list[str], needle: str) -> str:
    """The number of the (sub)section whose text holds ``needle`` (exactly one line must)."""
    hits = [i for i, x in enumerate(lines) if needle in x]
    assert len(hits) == 1, f"{needle!r} occurs on {len(hits)} lines of the paper"
    return next(m.group(1) for x in reversed(lines[:hits[0]]) if (m := HEADING.match(x)))


# ---- paper.py against the paper's text --------------------------------------------------------------------------

def test_table3_rows_are_the_papers(lines: list[str]) -> None:
    rows = {name: nums for _, name, nums in table_rows(table_region(lines, 3))}
    for model, nums in paper.TABLE3.items():
        assert rows[model] == nums, model


def test_table3_columns_are_the_papers(lines: list[str]) -> None:
    """TABLE3_COLUMNS names the paper's columns in its order: a benchmark over several metrics (HumanEval+'s
    Pass@k) is one column per metric, named by the metric; the rest by the benchmark alone (HarmBench's ASR, lower
    is better, says so)."""
    region = table_region(lines, 3)
    metrics = region[1].split()
    assert len(metrics) == len(paper.TABLE3_COLUMNS) == len(paper.TABLE3["Qwen2-7B-Instruct"])
    benchmarks = region[0].split()[1:]
    expanded = [b for b in benchmarks for _ in range(3 if b == "HumanEval+" else 1)]
    for col, bench, metric in zip(paper.TABLE3_COLUMNS, expanded, metrics):
        assert col.split(" ")[0] == bench, (col, bench)
        if metric.startswith("Pass@"):
            assert col.endswith("P@" + metric.removeprefix("Pass@")), (col, metric)
        if metric.startswith("ASR"):
            assert "ASR" in col and col.endswith("↓") == metric.endswith("↓"), (col, metric)


def test_table4_rows_are_the_papers(lines: list[str]) -> None:
    """In the paper's order, group and name: its 'Average' rows are paper.py's 'Average: ...', its 'Weighted Average'
    row paper.py's 'Weighted (Eq. 4): ...'. The paper's 'Qwen2-VL/Vide/SI' is a typo for 'Qwen2-VL/Video/SI'."""
    rows = table_rows(table_region(lines, 4))
    assert len(rows) == len(paper.TABLE4)
    group_of = {"": "", "Average": "Average", "Weighted Average": "Weighted (Eq. 4)"}
    for (group, name, nums), (ours, our_nums) in zip(rows, paper.TABLE4.items()):
        want = name.replace("/Vide/", "/Video/")
        assert ours == (f"{group_of[group]}: {want}" if group else want), (group, name, ours)
        assert our_nums == nums, ours


def test_table5_rows_are_the_papers(lines: list[str]) -> None:
    region = table_region(lines, 5)
    assert region[0].split()[1:] == paper.TABLE5_COLUMNS
    rows = table_rows(region)
    assert len(rows) == len(paper.TABLE5)
    for (_, name, nums), (ours, our_nums) in zip(rows, paper.TABLE5.items()):
        assert ours.split(" ")[0] == name and our_nums == nums, (name, ours)


def test_the_texts_numbers_are_the_papers(lines: list[str]) -> None:
    """§5.2's MMMU baseline and §5.3's shift ratio, each found in the section the report cites for it."""
    model, data, acc = paper.HEADS_BASELINE
    assert section_of(lines, f"The baseline accuracy of {model} on {data} is {acc:.2f}%") == "5.2"
    assert section_of(lines, f"The average parameter shift of Qwen2-VL-7B-Instruct is {paper.SHIFT_RATIO:g} times "
                             "larger than those of LLaVA-Video-7B-Qwen2 and LLaVA-OneVision-Qwen2-7B-SI") == "5.3"


# ---- findings.py's claims against the paper's text --------------------------------------------------------------

# per claim, the paper's own words for it: the claim's cited section must be the one they stand in
WORDS = {
    "text_costs": "Modality fine-tuning harms instruction following, reasoning, and safety",
    "heads_all_matter": "masking any attention head results in a substantial performance drop",
    "shallow_layers": "attention heads in shallower layers (closer to the input) exert a greater influence",
    "shift_ratio": "is 10 times larger than those of",
    "merge_keeps_text": "except for reasoning, the merged model performs on par with or better than",
    "weighted_beats_average": "Weighted model merging preserves more model abilities",
    "carriers_fall_short": "the multimodal evaluation results are shown in Table 5",
    "steps_tradeoff": "exhibits a slight increase or peak performance within the initial 100 steps",
    "distinct_directions": "fine-tuning on different modalities propels the model weights in distinct directions",
    "merge_aggregates": "positions the resultant model in a region that aggregates the weights of the base models",
}


def test_every_claim_has_the_papers_words() -> None:
    assert set(WORDS) == set(CLAIMS)


@pytest.mark.parametrize("check", sorted(WORDS))
def test_each_claim_cites_the_section_that_says_it(lines: list[str], check: str) -> None:
    """A claim's '§x.y' is the section holding the paper's words for it (Table 5's carriers were cited as §5.4, the
    experimental setup, where the extraction floats the table; the paper reads Table 5 in §5.5, Results)."""
    cite = CLAIMS[check][0]
    cited = re.findall(r"§(\d+(?:\.\d+)*)", cite)
    assert cited, cite
    where = section_of(lines, WORDS[check])
    assert any(where == s or where.startswith(s + ".") for s in cited), (check, cite, where)


def test_text_costs_says_where_it_holds(lines: list[str]) -> None:
    """'IFEval, GPQA, MATH, HumanEval+ fall for every extension' is false of the paper's whole Table 3 (LLaVA-1.5-7B's
    MATH rises 6.1 → 19.6, Qwen2-VL-72B's Pass@10 93.4 → 96.7, Qwen2-Audio's HumanEval+ stays 0.0); it holds for the
    three Qwen2-7B extensions the report prints. The claim must name that family, and there it must hold."""
    claim = CLAIMS["text_costs"][1]
    named = ["IFEval", "GPQA", "MATH", "HumanEval+"]
    assert all(b in claim for b in named), claim
    region = table_region(lines, 3)
    metrics, benchmarks = region[1].split(), region[0].split()[1:]
    cols = [b for b in benchmarks for _ in range(3 if b == "HumanEval+" else 1)]
    idx = [i for i, b in enumerate(cols) if b in named]
    families: dict[str, list[list[float]]] = {}
    for group, _, nums in table_rows(region):
        families.setdefault(group, []).append(nums)
    assert len(cols) == len(metrics)

    def falls(fam: str) -> bool:
        base, *ext = families[fam]
        return all(e[i] < base[i] for e in ext for i in idx)

    assert not all(falls(f) for f in families)  # "every extension" of Table 3: false
    assert falls("Qwen2-7B based") and "Qwen2-7B" in claim, claim


# ---- internal consistency (runs without the paper) --------------------------------------------------------------

def test_tables_agree_with_each_other() -> None:
    """Table 4's first row is Table 3's base; §5.2's baseline is Table 5's expert on MMMU; every row has a number per
    column."""
    assert paper.TABLE4["Qwen2-7B-Instruct"] == paper.TABLE3["Qwen2-7B-Instruct"]
    model, data, acc = paper.HEADS_BASELINE
    expert = next(k for k in paper.TABLE5 if k.startswith(model + " "))
    assert paper.TABLE5[expert][paper.TABLE5_COLUMNS.index(data)] == acc
    for rows, cols in ((paper.TABLE3, paper.TABLE3_COLUMNS), (paper.TABLE4, paper.TABLE3_COLUMNS),
                       (paper.TABLE5, paper.TABLE5_COLUMNS)):
        assert all(len(v) == len(cols) for v in rows.values())


def table5_losses() -> dict[str, tuple[float, float]]:
    """Per Table 5 column: the expert minus its Eq. 1 and its Eq. 4 carrier, to the table's two decimals."""
    expert, avg, weighted = paper.TABLE5.values()
    return {c: (round(e - a, 2), round(e - w, 2)) for c, e, a, w in zip(paper.TABLE5_COLUMNS, expert, avg, weighted)}


def test_carrier_claim_and_bar_are_table5s_losses() -> None:
    """The carriers' claim prints Table 5's losses (expert minus Eq. 1 / Eq. 4 carrier) to the table's two decimals,
    and MERGE_LOSS is the largest of them, Video-MME's 62.84 − 56.89 = 5.95: it was a hand-written 6.0 (and the
    claim printed −6.0 beside it)."""
    losses = table5_losses()
    claim = CLAIMS["carriers_fall_short"][1]
    for col, (la, lw) in losses.items():
        assert f"{col} −{la:.2f}/−{lw:.2f}" in claim, (col, claim)
    assert MERGE_LOSS == max(max(v) for v in losses.values())


def test_the_carriers_bar_is_table5s_largest_loss_and_printed_so() -> None:
    """A carrier exactly Table 5's largest loss below its expert (Video-MME's 62.84 % against 56.89 %) keeps its
    skill; one item-rate step more (56.88 %) does not, though both were within the hand-written 6.0. The criterion
    prints the bar as Table 5 has it (two decimals), not '6'."""
    from figures.findings import carriers_fall_short

    expert, avg, _ = paper.TABLE5.values()
    i = paper.TABLE5_COLUMNS.index("Video-MME")
    scores = {"e": expert[i] / 100, "average/e": avg[i] / 100, "shift/e": (avg[i] - 0.01) / 100}
    t5 = SimpleNamespace(metric="accuracy", row=lambda model, data: {"accuracy": scores[model]})
    r = SimpleNamespace(experts=["e"], own=["video"], data=lambda label: label, eval=lambda *parts: t5,
                        carrier=lambda m, e: f"{m}/{e}")
    f = carriers_fall_short(r)
    largest = max(max(v) for v in table5_losses().values())
    assert f.verdict == "partly", f.line()
    assert f"at most {largest:.2f} points below" in f.criterion, f.criterion


def test_the_shift_note_gives_the_released_codes_ratios() -> None:
    """The report prints the released code's mean Δavg beside §5.3's "10 times": its note says what ratios those
    values give (Qwen2-VL's over each other's, recomputed here from paper.py), and that they are not 10×."""
    from figures.report import released_shift_note

    note = released_shift_note()
    vl = paper.SHIFT_RELEASED["Qwen2-VL-7B-Instruct"][0]
    for model, (d, _) in paper.SHIFT_RELEASED.items():
        if model != "Qwen2-VL-7B-Instruct":
            assert f"{vl / d:.1f}× {model}" in note, (model, note)
    assert f"not the {paper.SHIFT_RATIO:g}×" in note, note


def test_released_weights_share_the_non_base_half() -> None:
    """The authors' α (DESIGN §5): shares of the 0.5 non-base mass with α0 = 0.5, so they sum to 0.5, and the order
    of the weights follows the order of the shifts (softmax is monotone)."""
    shift = {m: d for m, (d, _) in paper.SHIFT_RELEASED.items()}
    weight = {m: a for m, (_, a) in paper.SHIFT_RELEASED.items()}
    assert abs(sum(weight.values()) - 0.5) < 1e-9
    assert sorted(shift, key=shift.get) == sorted(weight, key=weight.get)
    assert set(paper.SHIFT_RELEASED) == set(paper.TABLE3) - {"Qwen2-7B-Instruct"}
    # the values themselves, as DESIGN §5 states them (mean Δavg 0.0043 / 0.00087 / 0.00073, α 0.394 / 0.056 / 0.050):
    # the sum and the order above pass a Δavg typed 0.0034, which the report prints beside the measured shifts
    assert paper.SHIFT_RELEASED == {"Qwen2-VL-7B-Instruct": (0.0043, 0.394), "LLaVA-Video-7B-Qwen2": (0.00087, 0.056),
                                    "LLaVA-OneVision-Qwen2-7B-SI": (0.00073, 0.050)}


# (claim, the paper's qualifier its words carry, which the claim must keep): the paper saw Figure 3's gain on MMMU,
# its one multimodal set there (no video), and Figure 4b's aggregating region for the weighted merge
QUALIFIERS = [("steps_tradeoff", "Performance is evaluated on the MMLU and MMLU-Pro benchmarks and the MMMU benchmark",
               "MMMU"),
              ("merge_aggregates", "weighted model merging positions the resultant model", "weighted")]


@pytest.mark.parametrize("check, words, qualifier", QUALIFIERS)
def test_claims_keep_the_papers_qualifiers(lines: list[str], check: str, words: str, qualifier: str) -> None:
    cite, claim = CLAIMS[check]
    assert qualifier in words and section_of(lines, words).startswith(cite.split("§")[1])
    assert qualifier in claim, (check, claim)


def test_shipped_reports_paper_columns_are_paper_py() -> None:
    """figures/examples/report.md prints the paper's tables and released shift values from figures/paper.py and
    nothing else: a number changed in one and not the other (a stale example) fails here."""
    md = (Path(__file__).resolve().parents[1] / "figures" / "examples" / "report.md").read_text(
        encoding="utf-8").splitlines()

    def table(first: int) -> tuple[list[str], list[list[str]]]:
        rows = []
        for line in md[first:]:
            if not line.startswith("|"):
                break
            rows.append([c.strip() for c in line.strip("|").split("|")])
        return rows[0], rows[2:]  # header, body (past the |---| line)

    for caption, rows, cols in (("*Paper, Table 3 ", paper.TABLE3, paper.TABLE3_COLUMNS),
                                ("*Paper, Table 4 ", paper.TABLE4, paper.TABLE3_COLUMNS),
                                ("*Paper, Table 5*", paper.TABLE5, paper.TABLE5_COLUMNS)):
        at = next(i for i, x in enumerate(md) if x.startswith(caption))
        header, body = table(at + 2)
        assert header[1:] == cols and {r[0]: [float(x) for x in r[1:]] for r in body} == rows, caption
    header, body = table(next(i for i, x in enumerate(md) if x.startswith("| expert (stands for)")))
    pub = {re.search(r"\((.+)\)", r[0]).group(1): (float(r[-2]), float(r[-1])) for r in body}
    assert header[-2:] == ["paper: mean Δavg", "paper: mean weight"] and pub == paper.SHIFT_RELEASED


# ---- verdicts on the paper column a text set stands for (figures.findings) --------------------------------------

STANDS = ["Qwen2-VL-7B-Instruct", "LLaVA-OneVision-Qwen2-7B-SI", "LLaVA-Video-7B-Qwen2"]
MERGE_ROWS = {"average": "Average: Qwen2-Text/VL/Video/SI", "shift": "Weighted (Eq. 4): Qwen2-Text/VL/Video/SI"}
DIFF = ("diff_accuracy", "diff_lo", "diff_hi")
# measured paired differences (rates): an interval below 0, one above, one holding 0
FALLS, RISES, FLAT = (-0.05, -0.08, -0.02), (0.05, 0.02, 0.08), (0.0, -0.03, 0.03)
# a text set's accuracy can stand for any Table 3 column but an attack success rate (lower is better)
COLUMNS = [c for c in paper.TABLE3_COLUMNS if "↓" not in c]


def replication(column: str | None, rows: dict[str, tuple[float, float, float]]) -> SimpleNamespace:
    """Three experts standing for the paper's three Qwen2-7B extensions, whose text set stands for ``column`` (None:
    no column named, as the organisms' config); every eval run gives ``rows[model]`` as its paired difference."""
    experts = ["e0", "e1", "e2"]
    run = SimpleNamespace(diff_columns=DIFF, row=lambda model, data: dict(zip(DIFF, rows[model])))
    cfg = {"eval": {"text": "text"}, "models": {"paper": STANDS}}
    if column is not None:
        cfg["paper"] = {"text_column": column}
    return SimpleNamespace(experts=experts, cfg=cfg, data=lambda label: label, eval=lambda *parts: run,
                           paper_name=lambda e: STANDS[experts.index(e)], merge_dir=lambda m: m,
                           complete=lambda stage: False)


def way(delta: float, flip: bool = False) -> tuple[float, float, float]:
    """A measured interval going the way of the paper's ``delta`` (or, flipped, against it: no change → a rise)."""
    if flip:
        return RISES if delta <= 0 else FALLS
    return RISES if delta > 0 else FALLS if delta < 0 else FLAT


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("column", COLUMNS)
def test_text_costs_compares_with_the_papers_way_on_the_named_column(column: str, flip: bool) -> None:
    """With paper.text_column named, each expert's measured text difference is held to its paper model's Table 3
    difference on that column (a fall, a rise, or none), and the claim names the column. Oracle: Table 3's rows."""
    from figures.findings import text_costs

    i = paper.TABLE3_COLUMNS.index(column)
    base = paper.TABLE3["Qwen2-7B-Instruct"][i]
    rows = {e: way(paper.TABLE3[s][i] - base, flip) for e, s in zip(["e0", "e1", "e2"], STANDS)}
    f = text_costs(replication(column, rows))
    assert f.verdict == ("disagrees" if flip else "agrees"), f.line()
    assert column in f.short(), f.short()


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("column", COLUMNS)
def test_merge_keeps_text_compares_with_the_papers_way_on_the_named_column(column: str, flip: bool) -> None:
    """The same for the Eq. 1 and Eq. 4 merges against Table 4's rows merging the base and all three extensions."""
    from figures.findings import merge_keeps_text

    i = paper.TABLE3_COLUMNS.index(column)
    base = paper.TABLE4["Qwen2-7B-Instruct"][i]
    rows = {m: way(paper.TABLE4[row][i] - base, flip) for m, row in MERGE_ROWS.items()}
    f = merge_keeps_text(replication(column, rows))
    assert f.verdict == ("disagrees" if flip else "agrees"), f.line()
    assert column in f.short(), f.short()


def test_a_measured_mmlu_pro_loss_does_not_agree_with_the_paper() -> None:
    """paper-7b.toml's text set is MMLU-Pro, where Table 3 shows all three Qwen2-7B extensions gaining (40.0, 37.9,
    37.7 against 35.1) and Table 4 both merges too (37.4, 36.3): a measured loss on every row 'agreed' that fine-tuning
    costs text. Named, the column turns that verdict over; unnamed (the organisms), the general claim stays."""
    from figures.findings import CLAIMS, merge_keeps_text, text_costs

    i = paper.TABLE3_COLUMNS.index("MMLU-Pro")
    base = paper.TABLE3["Qwen2-7B-Instruct"][i]
    assert all(paper.TABLE3[s][i] > base for s in STANDS)
    assert all(paper.TABLE4[row][i] > base for row in MERGE_ROWS.values())
    losses = {k: FALLS for k in ["e0", "e1", "e2", *MERGE_ROWS]}
    assert text_costs(replication("MMLU-Pro", losses)).verdict == "disagrees"
    general = text_costs(replication(None, losses))
    assert general.verdict == "agrees" and general.claim == CLAIMS["text_costs"][1]
    assert merge_keeps_text(replication("MMLU-Pro", losses)).verdict == "disagrees"
    assert merge_keeps_text(replication(None, losses)).claim == CLAIMS["merge_keeps_text"][1]


def test_a_finding_not_measured_still_names_the_column() -> None:
    from figures.findings import findings

    lines = [f.short() for group in findings(replication("GPQA", {})).values() for f in group]
    named = [x for x in lines if "GPQA" in x]
    assert len(named) == 2 and all(x.startswith("**not measured**") for x in named), lines
