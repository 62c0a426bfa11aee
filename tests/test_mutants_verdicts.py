"""Tests written against surviving mutants of a third mutation-testing audit (mut47b: the findings' verdicts, the
report's printed numbers, the paper's numbers, the replicate config's ranges, probe.heads' summary and
probe.sweep's rows). Each states the rule it checks as DESIGN, the report's criterion or the paper says it and
computes the expected verdict or number here, with stand-in results built by hand: no replication run, no helper
under test as the oracle."""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

DIFF = ("diff_accuracy", "diff_lo", "diff_hi")


# ----------------------------------------------------------------------------------------------------------------
# figures.findings: each verdict at the ends of its criterion (stand-in results, no run)

def _table3_run(intervals: dict[str, tuple[float, float, float]]) -> SimpleNamespace:
    """A replication whose experts' paired text differences to the base are ``intervals`` (value, lo, hi), with no
    paper column named (the organisms' config)."""
    run = SimpleNamespace(diff_columns=DIFF, row=lambda model, data: dict(zip(DIFF, intervals[model])))
    return SimpleNamespace(experts=list(intervals), cfg={"eval": {"text": "text"}, "models": {}},
                           data=lambda label: label, eval=lambda *parts: run, paper_name=lambda e: "")


def test_a_text_cost_whose_interval_ends_at_0_is_not_measurable() -> None:
    """text_costs' criterion: a cost is a paired 95 % interval *below* 0. An upper bound of exactly 0 (a bootstrap
    percentile on few items lands on 0 whenever enough resamples tie) holds 0, so that expert's cost is not
    measurable and the finding is 'partly'; a mutant counting hi <= 0 agreed."""
    from figures.findings import text_costs

    f = text_costs(_table3_run({"e1": (-0.05, -0.1, 0.0), "e2": (-0.05, -0.1, -0.01)}))
    assert f.verdict == "partly", f
    assert text_costs(_table3_run({"e1": (-0.05, -0.1, 0.0)})).verdict == "disagrees"


def _sweep(drops: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"layer": 0, "head": range(len(drops)), "prob_accuracy_drop": drops,
                         "kl": [1.0] * len(drops)})


def test_exactly_90_percent_of_heads_mattering_agrees() -> None:
    """heads_all_matter's criterion: 'at least 90 % of the heads' lower prob. accuracy by ≥ 2 points. 9 of 10 and 27
    of 30 heads are exactly 90 %: agrees (a mutant asking for more than 90 % disagreed); 8 of 10 does not."""
    from figures.findings import heads_all_matter

    sweeps = {"e1": _sweep([0.05] * 9 + [0.0]), "e2": _sweep([0.05] * 27 + [0.0] * 3)}
    r = SimpleNamespace(experts=list(sweeps), heads=lambda e, need=(): (sweeps[e], {}))
    assert heads_all_matter(r).verdict == "agrees"
    sweeps["e2"] = _sweep([0.05] * 8 + [0.0] * 2)
    assert heads_all_matter(r).verdict == "partly"


def test_mean_kl_tied_between_the_halves_is_not_shallow_mattering_more() -> None:
    """shallow_layers' criterion: the mean KL is *larger* in the first half of the layers. Equal means (by hand: 0.3
    in each half of a 2-layer sweep) are not, so the finding disagrees; a mutant counting a tie agreed."""
    from figures.findings import shallow_layers

    sweep = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "kl": [0.2, 0.4, 0.4, 0.2]})
    f = shallow_layers(SimpleNamespace(experts=["e1"], heads=lambda e, need=(): (sweep, {})))
    assert f.verdict == "disagrees" and "e1: 0.3 vs 0.3 nats" in f.evidence, f


STANDS_FOR = {"vl": "Qwen2-VL-7B-Instruct", "si": "LLaVA-OneVision-Qwen2-7B-SI", "v": "LLaVA-Video-7B-Qwen2"}


def _shift(means: dict[str, float]) -> SimpleNamespace:
    """shift_ratio's stand-in run: mean Δavg per expert, each standing for its paper model (models.paper), "vl" for
    Qwen2-VL-7B-Instruct."""
    return SimpleNamespace(experts=list(means), paper_name=STANDS_FOR.get,
                           shift_per_model=lambda: {e: {"mean_delta_avg": v} for e, v in means.items()})


@pytest.mark.parametrize("means, verdict", [
    ({"vl": 0.625, "si": 0.0625, "v": 0.03125}, "agrees"),  # exactly 10× (binary fractions: the ratio is 10.0)
    ({"vl": 0.004, "si": 0.004, "v": 0.001}, "disagrees"),  # a tie for the largest is not "shifts most"
    # the stand-in found by its paper model, not by the first name holding "Qwen2" (LLaVA-OneVision-Qwen2-7B-SI)
    ({"si": 0.001, "vl": 0.0125, "v": 0.001}, "agrees"),
])
def test_the_shift_findings_bar_of_10x_and_largest_at_their_ends(means, verdict) -> None:
    """§5.3's claim read by the shift finding's criterion: the Qwen2-VL stand-in 'has the largest mean Δavg and at
    least 10× every other expert's'. At exactly 10× it agrees (a mutant asking for more than 10× said 'partly'); tied
    with another expert it is not the largest (a mutant counting the tie said 'partly'). The stand-in is the expert
    whose paper model is Qwen2-VL: a mutant taking the first paper name holding 'qwen2' measured the SI expert."""
    from figures.findings import shift_ratio

    ratio = means["vl"] / max(v for e, v in means.items() if e != "vl")
    assert ratio in (10.0, 1.0, 12.5)  # the ends meant, and a clear 12.5×
    assert shift_ratio(_shift(means)).verdict == verdict


def _table4_run(intervals: dict[str, tuple[float, float, float]]) -> SimpleNamespace:
    """A replication whose Eq. 1 and Eq. 4 merged LMs ("average", "shift") have ``intervals`` (value, lo, hi) as their
    paired text differences to the base, no paper column named."""
    run = SimpleNamespace(diff_columns=DIFF, row=lambda model, data: dict(zip(DIFF, intervals[model])))
    return SimpleNamespace(experts=[], cfg={"eval": {"text": "text"}, "models": {}}, data=lambda label: label,
                           eval=lambda *parts: run, merge_dir=lambda m: m, paper_name=lambda e: "")


@pytest.mark.parametrize("intervals, verdict", [
    ({"average": (-0.02, -0.05, 0.0), "shift": (-0.01, -0.04, 0.02)}, "agrees"),  # both reach 0: no measurable loss
    ({"average": (-0.02, -0.05, 0.0), "shift": (-0.04, -0.07, -0.01)}, "partly"),  # Eq. 4's interval below 0
    ({"average": (-0.05, -0.08, -0.02), "shift": (-0.04, -0.07, -0.01)}, "disagrees"),
])
def test_merging_keeps_text_unless_an_interval_lies_below_0(intervals, verdict) -> None:
    """merge_keeps_text's criterion: each merged LM's paired difference to the base on text 'has a 95 % interval
    reaching 0 or above (no measurable loss)'. A point estimate below 0 with an interval up to 0 or past it keeps the
    text (mutants asking the lower bound to reach 0, or the upper bound to pass it, disagreed); both 'partly'."""
    from figures.findings import merge_keeps_text

    want = sum(hi >= 0 for _, _, hi in intervals.values())
    assert verdict == ("agrees" if want == 2 else "partly" if want else "disagrees")
    assert merge_keeps_text(_table4_run(intervals)).verdict == verdict


@pytest.mark.parametrize("text, image, video, verdict", [
    # modality gains whose intervals start at 0 are not measurable gains; text's interval holds 0: nothing measured
    ((0.0, -0.02, 0.02), (0.05, 0.0, 0.1), (0.05, 0.0, 0.1), "disagrees"),
    # text's interval ends at 0 (no measurable loss) and both modalities gain measurably
    ((-0.01, -0.03, 0.0), (0.05, 0.02, 0.08), (0.05, 0.02, 0.08), "agrees"),
    # one measurable gain of two is no majority
    ((0.0, -0.02, 0.02), (0.05, 0.02, 0.08), (0.0, -0.05, 0.05), "partly"),
    # a measurable text gain alone is 'partly'
    ((0.05, 0.02, 0.08), (0.0, -0.05, 0.05), (0.0, -0.05, 0.05), "partly"),
])
def test_eq4_against_eq1_by_the_criterion_at_its_ends(text, image, video, verdict) -> None:
    """weighted_beats_average's criterion, Eq. 4 minus Eq. 1 paired: 'on text a 95 % interval reaching 0 or above
    and on a majority of the experts' modalities one above 0; a measurable gain on some set but not so is
    partly'. At the ends: a modality interval starting at 0 is no gain (a mutant counting lo >= 0 agreed), text's
    upper bound of 0 reaches 0 (a mutant reading text's lower bound said 'partly'), one win of two is no majority,
    and text only holding 0 is no gain (a mutant reading its upper bound said 'partly')."""
    from figures.findings import weighted_beats_average

    sets = {"text": text, "image": image, "video": video}
    run = SimpleNamespace(paired=lambda model, ref, data: SimpleNamespace(**dict(zip(("value", "lo", "hi"),
                                                                                     sets[data]))))
    r = SimpleNamespace(cfg={"eval": {"text": "text"}}, experts=["e-image", "e-video"], own=["image", "video"],
                        data=lambda label: label, eval=lambda *parts: run, merge_dir=lambda m: m,
                        carrier=lambda m, e: f"{m}/{e}")
    wins = sum(lo > 0 for _, lo, _ in (image, video))
    want = ("agrees" if text[2] >= 0 and 2 * wins > 2 else "partly" if text[1] > 0 or wins else "disagrees")
    assert want == verdict
    assert weighted_beats_average(r).verdict == verdict


def test_two_runs_moving_at_a_cosine_of_exactly_the_bar_are_not_distinct() -> None:
    """distinct_directions' criterion: every pair of single-modality runs moves in directions whose cosine is *below*
    0.8. Moves (1, 0) and (4, 3) have a cosine of 4/5, the bar itself (exact in floats: norms 1 and 5): not below
    it, so 'disagrees' (a mutant taking ≤ agreed); (1, 0) and (3, 4), cosine 3/5, agrees."""
    import numpy as np

    from figures.findings import DISTINCT_COSINE, distinct_directions

    for b_move, verdict in (((4.0, 3.0), "disagrees"), ((3.0, 4.0), "agrees")):
        names = ["a@0", "a@10", "b@0", "b@10"]
        x = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 2.0], [2.0 + b_move[0], 2.0 + b_move[1]]])
        r = SimpleNamespace(runs={"a": {"text": 1.0}, "b": {"image": 1.0}}, sketch=lambda fig, x=x: (names, x))
        cos = b_move[0] / np.hypot(*b_move)
        assert (cos == DISTINCT_COSINE) == (verdict == "disagrees")
        assert distinct_directions(r).verdict == verdict


def _steps_run(runs: dict[str, dict[str, float]], text: dict[str, list[float]],
               intervals: dict[tuple[str, str], tuple[float, float, float]]) -> SimpleNamespace:
    """A replication of fine-tuning ``runs`` (name → data mix) scored at steps 0, 10, 20 on text and image (the
    carrier's own set): ``text[run]`` its text accuracies, image 0.5 → 0.6; ``intervals[(run, set)]`` the paired
    interval the finding asks for (last minus peak on text, last minus step 0 on image)."""
    def steps(name: str) -> tuple[SimpleNamespace, pd.DataFrame]:
        models = [f"{name}/checkpoint-{s}" for s in (0, 10, 20)]
        t = pd.DataFrame({"data": ["text"] * 3 + ["image"] * 3, "n_items": 100, "step": [0, 10, 20] * 2,
                          "model": models * 2, "accuracy": [*text[name], 0.5, 0.55, 0.6]})
        run = SimpleNamespace(metric="accuracy", data_names={"text": "text", "image": "image"},
                              paired=lambda m, ref, data, level=None: SimpleNamespace(
                                  **dict(zip(("value", "lo", "hi"), intervals[name, data]))))
        return run, t

    return SimpleNamespace(cfg={"eval": {"text": "text"}, "finetune": {"eval_data": ["text", "image"],
                                                                       "carrier": "vl"}},
                           experts=["vl"], own=["image"], runs=runs, data=lambda label: label, steps=steps)


MIXED = {"text": 3.0, "image": 2.0}
PEAKED = [0.6, 0.7, 0.6]  # text peaks at step 10, before the last
FALLS, GAINS = (-0.1, -0.2, -0.05), (0.1, 0.05, 0.15)  # intervals below and above 0


@pytest.mark.parametrize("runs, text, intervals, verdict", [
    # text's last-minus-peak interval ends at 0: not measurably below its peak
    ({"mixed": MIXED}, {"mixed": PEAKED}, {("mixed", "text"): (-0.1, -0.2, 0.0), ("mixed", "image"): GAINS},
     "partly"),
    # the carrier's own set rises, its interval reaching below 0: no measurable gain
    ({"mixed": MIXED}, {"mixed": PEAKED}, {("mixed", "text"): FALLS, ("mixed", "image"): (0.1, -0.02, 0.2)},
     "partly"),
    # a single-modality run meeting neither half is shown, not counted: the mixed run alone decides
    ({"text": {"text": 1.0}, "mixed": MIXED}, {"text": [0.7, 0.6, 0.8], "mixed": PEAKED},
     {("text", "image"): (0.0, -0.1, 0.1), ("mixed", "text"): FALLS, ("mixed", "image"): GAINS}, "agrees"),
])
def test_figure3s_finding_by_its_criterion_at_its_ends(runs, text, intervals, verdict) -> None:
    """steps_tradeoff's criterion: 'in every run trained on more than one modality, the carrier's own set gains
    measurably from step 0 to the last step (the paired interval above 0), and text peaks before the last step and
    ends measurably below its peak (the paired interval below 0)'. An upper bound of exactly 0 is not below 0 (a
    mutant taking ≤ agreed); a gain is read from its interval's lower bound (a mutant reading the upper one agreed);
    a run of one modality counts for nothing (a mutant holding it to both halves said 'partly')."""
    from figures.findings import steps_tradeoff

    assert steps_tradeoff(_steps_run(runs, text, intervals)).verdict == verdict


def test_a_merge_exactly_as_far_from_the_centroid_as_the_farthest_input_aggregates() -> None:
    """merge_aggregates' criterion: each merged model lies 'no farther from the centroid of the models it merges than
    the farthest of them'. Base (0, 0) and expert (2, 0) have centroid (1, 0), each 1 from it; a merge at (1, 1) is
    exactly 1 from it: no farther, 'agrees' (a mutant asking for strictly nearer disagreed); at (1, 1.5), farther."""
    import numpy as np

    from figures.findings import merge_aggregates

    for at, verdict in (((1.0, 1.0), "agrees"), ((1.0, 1.5), "disagrees")):
        names, x = ["base", "e", "m/shift"], np.array([[0.0, 0.0], [2.0, 0.0], at])
        r = SimpleNamespace(base="base", experts=["e"], methods=["shift"], merge_dir=lambda m: f"m/{m}",
                            sketch=lambda fig, x=x: (names, x))
        assert merge_aggregates(r).verdict == verdict


# ----------------------------------------------------------------------------------------------------------------
# figures.report: numbers printed beside the tables

def test_the_legend_gives_the_exact_interval_of_a_0_percent_cell_as_of_a_100_percent_one() -> None:
    """exact_legend lists every † cell (a rate of 0 % or 100 %, zero-width bootstrap interval) with its exact 95 %
    interval. The quick run has 100 % cells only, so a mutant listing 100 % cells alone passed; here 0 of 12 and 12
    of 12, against scipy's Clopper-Pearson; an empty cell (0 items) and a 50 % one get no entry."""
    from scipy.stats import binomtest

    from figures.report import exact_legend

    rows = {"zero": (0.0, 12), "all": (1.0, 12), "none": (0.0, 0), "half": (0.5, 12)}
    run = SimpleNamespace(metric="accuracy", row=lambda model, spec: {
        "accuracy": rows[model][0], "accuracy_lo": rows[model][0], "accuracy_hi": rows[model][0],
        "n_items": rows[model][1]})
    legend = exact_legend([(m, run, m, "text") for m in rows])
    want = []
    for label, k in (("zero", 0), ("all", 12)):
        ci = binomtest(k, 12).proportion_ci(confidence_level=0.95, method="exact")
        want.append(f"{label} [{100 * ci.low:.1f}, {100 * ci.high:.1f}]")
    assert legend is not None and legend.endswith("intervals: " + "; ".join(want) + "."), legend


def test_a_set_scored_by_several_runs_is_captioned_with_the_most_items_any_scored() -> None:
    """measured_on, a table's caption: 'a label scored by several runs counts the most items any of them scored'
    (a run whose models could not read the set scored none). Text scored by runs of 12 and 8 items, in either
    order, reads 'text 12 items'; a mutant keeping the last run's count printed 8 where the first run came first."""
    from figures.report import measured_on

    r = SimpleNamespace(data=lambda label: label)
    run = lambda n, split="validation": SimpleNamespace(n_items=lambda spec: n, split=split)  # noqa: E731
    for runs in ([run(12), run(8)], [run(8), run(12)]):
        assert measured_on(r, [("text", x) for x in runs] + [("image", run(5))]) == \
            "validation split: text 12 items, image 5"


# ----------------------------------------------------------------------------------------------------------------
# analyses.replicate_config: the ranges and cross-references as their messages state them

@pytest.mark.parametrize("section, changes", [
    ("merge", {"alpha0": 0.0}), ("merge", {"alpha0": 1.0}),  # [0, 1]: Eq. 4 all experts, or the base alone
    ("merge", {"density": 1.0}),  # (0, 1]: TIES keeping every entry
    ("finetune", {"warmup": 0}),  # ≥ 0: no warm-up
    ("finetune", {"warmup": 199}),  # below finetune.steps (200)
    ("finetune", {"save_steps": [0, 200]}),  # 0 .. finetune.steps, both ends
    ("finetune", {"lr": 0.0}), ("finetune", {"lm_lr": 0.0}),  # ≥ 0 each (0 freezes that part), not both
    ("finetune", {"lora": 1}),  # a LoRA rank ≥ 1
    ("train", {"seed": 0}),  # ≥ 0
    (None, {"seed": 2**32 - 1}), (None, {"seed": 0}),  # 0 .. 2^32 − 1
])
def test_each_config_range_accepts_its_stated_ends(section, changes) -> None:
    """check_values's ranges as its messages state them ('must be in [0, 1]', '(0, 1]', '≥ 0', 'below
    finetune.steps', '0..steps', '≥ 1'): each closed end is accepted on the shipped default (200 steps). The
    refusals past each end are test_replicate's test_each_config_range_and_cross_reference_is_checked; mutants
    refusing alpha0 = 0 or 1, density = 1, warmup = 0, lr = 0 passed every test."""
    import dataclasses

    from analyses.replicate_config import DEFAULT_CONFIG, check_values, parse_config

    cfg = parse_config(DEFAULT_CONFIG)
    assert cfg.finetune.steps == 200
    if section is None:
        cfg = dataclasses.replace(cfg, **changes)
    else:
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
    check_values(cfg)  # no BadInput


def test_the_base_llm_is_no_paper_model_an_expert_can_stand_for() -> None:
    """With paper.text_column named, each expert is compared with its paper model's Table 3 row (models.paper): the
    rows of the base's three extensions, not the base's own (Qwen2-7B-Instruct, the row every difference is taken
    from: an expert standing for it would be held to 'no change'). A mutant letting the base's row be named passed
    every test."""
    import dataclasses

    from analyses.replicate_config import DEFAULT_CONFIG, check_values, parse_config
    from figures.paper import BASE
    from probe.errors import BadInput

    cfg = parse_config(DEFAULT_CONFIG)
    cfg = dataclasses.replace(cfg, paper=dataclasses.replace(cfg.paper, text_column="GPQA"))
    check_values(cfg)  # the control: the organisms stand for the three extensions
    paper = [BASE, *cfg.models.paper[1:]]
    with pytest.raises(BadInput, match=r"^config key 'models.paper\[0\]': 'Qwen2-7B-Instruct' has no row"):
        check_values(dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, paper=paper)))


# ----------------------------------------------------------------------------------------------------------------
# probe.heads' printed summary and probe.sweep's rows

def test_the_sweep_summary_prints_each_heads_own_numbers_and_a_baseline_of_0(tmp_path, capsys) -> None:
    """probe.heads' printed summary, by hand: a baseline accuracy of 0 (every generated answer wrong) is 0.000, not
    'n/a' (no generation); each head line gives that head's own prob. accuracy (not the baseline's) and its drop
    with its sign (+ where removing the head hurts, − where it helps). Mutants printing 'n/a' for 0, the baseline's
    prob. accuracy on every head line, or the drop unsigned passed the summary's tests."""
    import json

    from probe.heads import _print_summary

    (tmp_path / "baseline.json").write_text(json.dumps({"accuracy": 0.0, "prob_accuracy": 0.5, "n_items": 8,
                                                        "n_skipped_open": 0, "method": "exact"}), encoding="utf-8")
    heads = pd.DataFrame({"layer": [0, 1], "head": [1, 0], "kl": [0.25, 0.125], "prob_accuracy": [0.25, 0.625],
                          "prob_accuracy_drop": [0.25, -0.125]})
    _print_summary(tmp_path, heads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "baseline: accuracy 0.000  prob_accuracy 0.500  n_items 8  (skipped open-ended: 0)"
    assert lines[1:3] == ["  L0.H1: prob_accuracy 0.250 (drop +0.250), KL 0.2500",
                          "  L1.H0: prob_accuracy 0.625 (drop -0.125), KL 0.1250"]


def test_a_sweep_row_keeps_the_generated_answer_the_probability_choice_and_the_answer_apart() -> None:
    """probe.sweep.measurement_row by hand, on an item whose generated answer (B, the right one), most probable letter
    (C) and answer (B) are not all one: correct 1 (generated B), prob_correct 0 (C), p_answer the probability of B
    (not of the most probable letter), KL(orig ‖ masked) summed here. With no generated text (--no-generate) correct
    is NaN, not 0 (an item nobody answered is no wrong answer). Mutants scoring prob_correct on the generated answer,
    giving the top letter's probability as p_answer or 0 for correct without generation passed every test."""
    import math

    import torch

    from conftest import make_item
    from probe.sweep import Measurement, measurement_row

    item = make_item(n_options=4, answer="B", with_image=False)
    z = [0.5, 1.0, 2.0, 0.0]
    logp = torch.log_softmax(torch.tensor(z), -1)
    base = torch.log_softmax(torch.tensor([1.0, 1.0, 0.0, 0.0]), -1)
    row = measurement_row(item, 0, 1, Measurement(logp, "B"), base)
    total = sum(math.exp(x) for x in z)
    assert (row["pred"], row["correct"], row["prob_pred"], row["prob_correct"]) == ("B", 1.0, "C", 0.0)
    assert row["p_answer"] == pytest.approx(math.exp(1.0) / total)
    want_kl = sum(math.exp(b) * (b - a) for a, b in zip(logp.tolist(), base.tolist()))
    assert row["kl"] == pytest.approx(want_kl, abs=1e-6)
    row = measurement_row(item, 0, 1, Measurement(logp, None), base)
    assert math.isnan(row["correct"]) and row["pred"] == "" and row["prob_correct"] == 0.0
