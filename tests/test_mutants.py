"""Tests written against surviving mutants of a mutation-testing audit: each compares the code with an independent
oracle (a formula written out here, mergekit's own definition, a plain forward with weights zeroed), never with
the helper under test."""
from __future__ import annotations

import csv
import json
import math
import statistics
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import canonical, gate_slope, inputs_for, make_item

# --------------------------------------------------------------------------------------------------------
# probe.attribution: the masked-row estimate is z − ∂z/∂g (first order), computed here by finite differences


def _first_order_rows(loaded, item, heads, eps=1e-2):
    """Per head: (KL(p_orig ‖ p_est), p_answer) with est = z − dz/dg, dz/dg by a central finite difference of
    the head's gate (plain gated forwards), everything in float64."""
    from probe.prompting import letter_token_ids

    inputs = inputs_for(loaded, item)
    ids = letter_token_ids(loaded.tokenizer, item.letters)
    with torch.no_grad():
        z0 = loaded.model(**inputs).logits[0, -1, ids].double()
    lp0 = torch.log_softmax(z0, -1)
    idx = item.letters.index(item.answer)
    out = []
    for layer, head in heads:
        slope = gate_slope(loaded, inputs, ids, layer, head, eps)
        lp = torch.log_softmax(z0 - slope, -1)  # gate 1 → 0 to first order
        out.append((float((lp0.exp() * (lp0 - lp)).sum()), float(lp[idx].exp())))
    return out


def test_attribution_rows_equal_the_first_order_estimate_and_rank_like_exact(load_tiny):
    from scipy.stats import spearmanr

    from probe.attribution import attribution_sweep
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2_vl", "eager")
    g = loaded.geometry
    item = make_item(n_options=4, answer="B")
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    rows = attribution_sweep(loaded, [item], heads, SweepConfig(generate=False))
    masked = [r for r in rows if r["layer"] >= 0]
    assert [(r["layer"], r["head"]) for r in masked] == heads
    some = [0, 1, 6, 10, 15]
    want = _first_order_rows(loaded, item, [heads[i] for i in some])
    for i, (kl, p_answer) in zip(some, want):
        assert masked[i]["kl"] == pytest.approx(kl, rel=0.01, abs=1e-7), heads[i]
        assert masked[i]["p_answer"] == pytest.approx(p_answer, abs=1e-5), heads[i]
    assert max(kl for kl, _ in want) > 1e-4  # not a trivial 0 == 0
    # exact KL: a plain forward with the head's o_proj columns zeroed
    inputs = inputs_for(loaded, item)
    from probe.prompting import letter_token_ids

    ids = letter_token_ids(loaded.tokenizer, item.letters)

    def logp():
        with torch.no_grad():
            return torch.log_softmax(loaded.model(**inputs).logits[0, -1, ids].double(), -1)

    lp0, d, exact = logp(), g.head_dim, []
    for layer, h in heads:
        w = loaded.o_proj(layer).weight
        keep = w[:, h * d:(h + 1) * d].clone()
        with torch.no_grad():
            w[:, h * d:(h + 1) * d] = 0
        try:
            exact.append(float((lp0.exp() * (lp0 - logp())).sum()))
        finally:
            with torch.no_grad():
                w[:, h * d:(h + 1) * d] = keep
    assert spearmanr([r["kl"] for r in masked], exact).statistic > 0.5


# --------------------------------------------------------------------------------------------------------
# probe.stats: the bootstrap, written out


def test_bootstrap_on_continuous_data_against_its_definition():
    from probe.stats import bootstrap_mean, paired_difference

    v = np.random.default_rng(123).standard_normal(50)
    iv = bootstrap_mean(v, seed=7, key="data|accuracy")
    rng = np.random.default_rng([7, zlib.crc32(b"data|accuracy")])  # seeded by the run's seed and the key
    idx = rng.integers(0, 50, size=(2000, 50))  # items resampled with replacement, any of the 50
    lo, hi = np.percentile(v[idx].mean(axis=1), [2.5, 97.5])
    assert (iv.value, iv.lo, iv.hi) == (v.mean(), lo, hi)
    # another key (another data set or metric) draws another resample; the same key the same one
    other = bootstrap_mean(v, seed=7, key="data|prob_accuracy")
    assert (other.lo, other.hi) != (iv.lo, iv.hi)
    assert bootstrap_mean(v.copy(), 7, "data|accuracy") == iv
    w = np.random.default_rng(5).standard_normal(50)
    d = paired_difference(v, w, 7, "data|diff")
    rng = np.random.default_rng([7, zlib.crc32(b"data|diff")])
    idx = rng.integers(0, 50, size=(2000, 50))
    lo, hi = np.percentile((v - w)[idx].mean(axis=1), [2.5, 97.5])
    assert (d.value, d.lo, d.hi) == (float((v - w).mean()), lo, hi)


# --------------------------------------------------------------------------------------------------------
# probe.parsing: the rules its docstring states


@pytest.mark.parametrize("response, options, expected", [
    ("Answer: B. answer: C", ["red", "blue", "green", "yellow"], "B"),  # first occurrence within a tier
    ("(B) or (C)", ["red", "blue", "green", "yellow"], "B"),
    ("maybe B or C", ["red", "blue", "green", "yellow"], "B"),
    ("red car, not dark red", ["red", "dark red", "blue", "green"], "B"),  # the longest option text wins
    ("dark red or red", ["red", "dark red", "blue", "green"], "B"),
    ("blue or red", ["red", "blue", "green"], "B"),  # same length: the earliest position
    ("C. no, (B)", ["red", "blue", "green", "yellow"], "B"),  # tier 3 "(B)" before tier 4 "C."
    ("I'm unsure; maybe C", [str(i) for i in range(9)], "C"),  # "I'm" is no choice I, even with 9 options
])
def test_parse_choice_documented_rules(response, options, expected):
    from probe.parsing import parse_choice

    assert parse_choice(response, options) == expected


# --------------------------------------------------------------------------------------------------------
# analyses.formulas: TIES' sign election, mergekit's convention (ties → +)


def _ties_oracle(base, thetas, density, lam):
    """mergekit's ties on whole tensors: magnitude trim (top k = ⌊density·n⌋ by |δ|), sign by the sum (≥ 0 → +,
    ``mergekit.merge_methods.generalized_task_arithmetic.get_mask``), disjoint mean; fp32 like ``dtype: float32``."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    deltas = []
    for t in thetas:
        d = (t.float() - base.float()).flatten()
        k = max(1, int(density * d.numel()))
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[d.abs().argsort(descending=True, stable=True)[:k]] = True
        deltas.append(d * keep)
    delta = torch.stack(deltas)
    mask = get_mask(delta, method="sum")
    count = mask.sum(0).float()
    mixed = (delta * mask).sum(0) / torch.where(count == 0, torch.ones_like(count), count)
    return (base.float().flatten() + lam * mixed).reshape(base.shape)


def test_ties_sign_of_exactly_cancelling_deltas_is_plus():
    from analyses.formulas import ties_merge

    base = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, 3.0])
    e1 = base + torch.tensor([1.0, -1.0, 0.25, 2.0, 0.0, -0.5])
    e2 = base + torch.tensor([-1.0, 1.0, -0.25, -3.0, 0.0, 0.5])
    got = ties_merge(base, [e1, e2], density=1.0, lam=1.0)
    # cancelling pairs (entries 0, 1, 2, 5) elect +: the positive delta alone; entry 3: sum −1 → −3; entry 4: none
    want = base + torch.tensor([1.0, 1.0, 0.25, -3.0, 0.0, 0.5])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, _ties_oracle(base, [e1, e2], 1.0, 1.0), rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, generator=g)
    d = torch.randn(40, generator=g)
    thetas = [base + d, base - d, base + 0.5 * torch.randn(40, generator=g)]
    torch.testing.assert_close(ties_merge(base, thetas, 0.5, 0.8), _ties_oracle(base, thetas, 0.5, 0.8),
                               rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# analyses.merge / analyses.shift / analyses.salience on a tiny zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    from analyses import tiny

    root = tmp_path_factory.mktemp("mutzoo")
    z = tiny.build_zoo(root)
    # a base with more vocabulary rows (136) than the experts (128)
    z["big_base"] = tiny.write_model("qwen2", root / "big_base", tiny.resize_vocab(tiny.base_lm(0), 136))
    return z


def _run(main, *argv) -> int:
    from probe.errors import cli_main

    return cli_main(main, [str(a) for a in argv])


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_shift_merge_of_a_base_with_more_vocab_rows_uses_the_common_rows(zoo, tmp_path):
    """Eq. 4 with Δavg over the rows every input has; the base's extra rows are copied; merge_weights.csv and
    merge.json say the same."""
    from analyses import merge

    experts = [zoo["vl"], zoo["q1"]]
    out = tmp_path / "m"
    assert _run(merge.main, "--base", zoo["big_base"], "--models", *experts, "--method", "shift", "--alpha0", 0.3,
                "--out", out) == 0
    base, exps, got = canonical(zoo["big_base"]), [canonical(e) for e in experts], canonical(out)
    rows = _csv(out / "merge_weights.csv")
    want_delta = {}
    for name, t0 in base.items():
        c = min([t0.shape[0]] + [e[name].shape[0] for e in exps]) if t0.dim() else None
        b = t0[:c].double()
        d = [float((e[name][:c].double() - b).abs().mean()) for e in exps]
        a = torch.softmax(torch.tensor(d, dtype=torch.float64) / 1e-3, 0)
        want = 0.3 * b + 0.7 * sum(ai * e[name][:c].double() for ai, e in zip(a, exps))
        torch.testing.assert_close(got[name][:c].double(), want, rtol=1e-5, atol=1e-6, msg=name)
        if name in ("embed_tokens.weight", "lm_head.weight"):
            assert got[name].shape[0] == 136 and torch.equal(got[name][128:], t0[128:])
        r = {x["model"]: x for x in rows if x["tensor"] == name}
        assert r[str(zoo["big_base"])]["delta_avg"] == ""  # the base has no shift from itself
        assert float(r[str(zoo["big_base"])]["weight"]) == pytest.approx(0.3)
        for e, de, ai in zip(experts, d, a.tolist()):
            assert float(r[str(e)]["delta_avg"]) == pytest.approx(de, rel=1e-6)
            assert float(r[str(e)]["weight"]) == pytest.approx(0.7 * ai, rel=1e-6)
        want_delta[name] = d
    report = json.loads((out / "merge.json").read_text())
    for m in [zoo["big_base"], *experts]:
        weights = [float(x["weight"]) for x in rows if x["model"] == str(m)]
        assert len(weights) == len(base) and all(x["trim_threshold"] == "" for x in rows)
        assert report["mean_weight"][str(m)] == pytest.approx(sum(weights) / len(weights), rel=1e-12)
    assert report["mean_trim_threshold"] is None


def test_task_arithmetic_with_a_negative_lambda(zoo, tmp_path):
    """θ = θ0 + λ Σ (θi − θ0), λ < 0 (task negation), computed directly."""
    from analyses import merge

    experts = [zoo["vl"], zoo["q1"]]
    out = tmp_path / "neg"
    assert _run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "task_arithmetic",
                "--lambda", "-0.5", "--out", out) == 0
    base, exps, got = canonical(zoo["base"]), [canonical(e) for e in experts], canonical(out)
    for name, t0 in base.items():
        want = t0.double() - 0.5 * sum(e[name].double() - t0.double() for e in exps)
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method, extra", [("average", []), ("weighted", ["--weights", 3, 1])])
def test_average_and_weighted_with_a_base_write_no_base_rows(zoo, tmp_path, method, extra):
    """--base only supplies config, tokenizer and extra vocabulary rows for average/weighted (``--help``): it has
    no weight, so merge_weights.csv and merge.json's mean_weight list the models only."""
    from analyses import merge

    experts = [zoo["vl"], zoo["q1"]]
    out = tmp_path / method
    assert _run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", method, *extra,
                "--out", out) == 0
    rows = _csv(out / "merge_weights.csv")
    assert {r["model"] for r in rows} == {str(e) for e in experts}
    want = [0.5, 0.5] if method == "average" else [0.75, 0.25]
    report = json.loads((out / "merge.json").read_text())
    assert report["mean_weight"] == pytest.approx({str(e): w for e, w in zip(experts, want)})
    for r in rows:
        assert r["delta_avg"] == "" and float(r["weight"]) == pytest.approx(want[experts.index(Path(r["model"]))])


def test_shift_summary_recomputed_from_the_tensors(zoo, tmp_path):
    """Every field of summary.json's per-model entries, from the raw tensors (and shift.csv's rows)."""
    from analyses import shift

    models = [zoo["vl"], zoo["ov"], zoo["q1"]]
    out = tmp_path / "s"
    assert _run(shift.main, "--base", zoo["base"], "--models", *models, "--no-figures", "--out", out) == 0
    per = json.loads((out / "summary.json").read_text())["per_model"]
    rows = _csv(out / "shift.csv")
    base = canonical(zoo["base"])
    want = {}
    for m in models:
        lm = canonical(m)
        d = {n: lm[n].double() - b.double() for n, b in base.items()}
        avgs = [float(x.abs().mean()) for x in d.values()]
        rels = [float(x.norm() / base[n].double().norm()) for n, x in d.items() if float(base[n].norm()) > 0]
        numel = sum(x.numel() for x in d.values())
        want[str(m)] = {
            "n_tensors": len(d), "numel": numel,
            "mean_delta_avg": sum(avgs) / len(avgs),
            "weighted_delta_avg": sum(float(x.abs().sum()) for x in d.values()) / numel,
            "median_delta_avg": float(np.median(avgs)),
            "max_delta": max(float(x.abs().max()) for x in d.values()),
            "mean_rel_l2": sum(rels) / len(rels),
        }
        mine = [r for r in rows if r["model"] == str(m)]  # the CSV's rows say the same
        assert len(mine) == len(d)
        assert statistics.fmean(float(r["delta_avg"]) for r in mine) == pytest.approx(want[str(m)]["mean_delta_avg"],
                                                                                      rel=1e-6)
    low = min(w["mean_delta_avg"] for w in want.values())
    low_w = min(w["weighted_delta_avg"] for w in want.values())
    for w in want.values():
        w["ratio_to_least_shifted"] = w["mean_delta_avg"] / low
        w["weighted_ratio_to_least_shifted"] = w["weighted_delta_avg"] / low_w
    assert set(per) == set(want)
    for m, w in want.items():
        assert set(per[m]) == set(w), m
        for k, v in w.items():
            assert per[m][k] == pytest.approx(v, rel=1e-5), (m, k)
    # the statistics differ enough here that a swapped one would show
    some = want[str(zoo["vl"])]
    assert some["ratio_to_least_shifted"] != pytest.approx(some["weighted_ratio_to_least_shifted"], rel=1e-4)


# ---- salience: --rest layer and negative accuracy drops, against the in-memory oracle of DESIGN §9


def _in_memory_salience(base, experts, tables, tau, alpha0, base_table=None, rest="shift"):
    """``test_analyses_salience.in_memory_salience`` (head slices written out head by head) with ``--rest layer``:
    a tensor of layer L that no head owns gets softmax over participants of (mean over L's heads of ŝ) / τ_s, the
    base keeping α0 unless it has its own run; tensors outside the layers stay Eq. 4."""
    import re

    from test_analyses_salience import in_memory_salience

    out = in_memory_salience(base, experts, tables, tau, alpha0, base_table)
    if rest == "layer":
        shat = [t.double().clamp_min(0) / t.double().clamp_min(0).mean()
                for t in ([base_table] if base_table is not None else []) + tables]
        thetas = [base] + experts
        for name in out:
            m = re.match(r"layers\.(\d+)\.", name)
            parts = name.split(".")
            owned = (len(parts) >= 5 and parts[2] == "self_attn" and parts[3] in ("q_proj", "k_proj", "v_proj", "o_proj")
                     and not (parts[3] == "o_proj" and parts[4] == "bias"))
            if m is None or owned:
                continue
            layer = int(m.group(1))
            w = torch.softmax(torch.tensor([float(t[layer].mean()) for t in shat], dtype=torch.float64) / tau, 0)
            w = w.tolist() if base_table is not None else [alpha0] + [(1 - alpha0) * x for x in w.tolist()]
            out[name] = sum(c * th[name].double() for c, th in zip(w, thetas)).float()
    return out


@pytest.mark.parametrize("with_base", [False, True])
def test_salience_rest_layer_equals_in_memory(zoo, tmp_path, with_base):
    from analyses import merge
    from test_analyses_salience import L, H, write_run

    experts = [zoo["vl"], zoo["ov"], zoo["au"]]
    g = torch.Generator().manual_seed(1)
    tables = [torch.rand(L, H, generator=g) * 3 for _ in range(3)]
    tables[0][1] *= 8  # layer 1 matters most to expert 0, layer 0 to expert 2
    tables[2][0] *= 8
    dirs = [write_run(tmp_path / f"e{i}", t) for i, t in enumerate(tables)]
    base_table = torch.rand(L, H, generator=g)
    extra = ["--base-salience", write_run(tmp_path / "b", base_table)] if with_base else []
    out = tmp_path / "m"
    assert _run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience", "--salience", *dirs,
                *extra, "--rest", "layer", "--salience-temperature", 0.5, "--alpha0", 0.4, "--out", out) == 0
    got = canonical(out)
    want = _in_memory_salience(canonical(zoo["base"]), [canonical(e) for e in experts], tables, 0.5, 0.4,
                               base_table if with_base else None, rest="layer")
    for name, t in want.items():
        torch.testing.assert_close(got[name].float(), t, rtol=1e-6, atol=1e-7, msg=name)
    rows = _csv(out / "merge_weights.csv")
    up = {r["model"]: float(r["weight"]) for r in rows if r["tensor"] == "layers.1.mlp.up_proj.weight"}
    assert sum(up.values()) == pytest.approx(1.0) and up[str(zoo["vl"])] > up[str(zoo["au"])]


def test_salience_accuracy_drop_clamps_negative_drops(zoo, tmp_path):
    """An accuracy drop can be negative (removing the head helped): ŝ clamps it to 0 before normalising."""
    from analyses import merge
    from test_analyses_salience import L, H, write_run

    experts = [zoo["vl"], zoo["ov"]]
    g = torch.Generator().manual_seed(2)
    tables = [torch.rand(L, H, generator=g) * 3 - 1.5 for _ in range(2)]  # write_run: accuracy_drop = value / 2
    assert all((t < 0).any() and (t > 0).any() for t in tables)
    dirs = [write_run(tmp_path / f"e{i}", t) for i, t in enumerate(tables)]
    out = tmp_path / "m"
    assert _run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience", "--salience", *dirs,
                "--salience-metric", "accuracy_drop", "--alpha0", 0.2, "--out", out) == 0
    got = canonical(out)
    want = _in_memory_salience(canonical(zoo["base"]), [canonical(e) for e in experts],
                               [t.double() / 2 for t in tables], 1.0, 0.2)
    for name, t in want.items():
        torch.testing.assert_close(got[name].float(), t, rtol=1e-6, atol=1e-7, msg=name)


# --------------------------------------------------------------------------------------------------------
# analyses.sketch / analyses.trajectory: every chunk its own hashes


def test_sketch_of_a_repeated_vector_preserves_its_norm(monkeypatch):
    """d = x repeated 8 times, one chunk per copy: with the same hashes in every chunk S d = 8 S x, so ‖S d‖ would
    be √8 ‖d‖; independent hashes per chunk keep ‖S d‖ ≈ ‖d‖."""
    import analyses.sketch as sketch

    monkeypatch.setattr(sketch, "SKETCH_CHUNK", 4096)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    d = x.repeat(8)
    ratio = float(sketch.CountSketch(256, seed=1).project("layers.0.mlp.up_proj.weight", d).norm() / d.double().norm())
    assert 0.5 < ratio < 1.5


def test_streamed_sketch_over_many_chunks_equals_the_in_memory_one(zoo, tmp_path, monkeypatch):
    import analyses.sketch as sketch
    import analyses.trajectory as trajectory

    monkeypatch.setattr(sketch, "SKETCH_CHUNK", 500)  # every tensor of 2048+ elements spans several chunks
    monkeypatch.setattr(trajectory, "SKETCH_CHUNK", 500)
    out = tmp_path / "t"
    assert _run(trajectory.main, "--base", zoo["base"], "--experts", zoo["vl"], "--merged", zoo["q1"],
                "--sketch-dim", 32, "--seed", 3, "--no-figures", "--out", out) == 0
    feats = np.load(out / "features.npz")
    base = canonical(zoo["base"])
    assert sorted(feats["tensors"]) == sorted(base)  # or the sum below would not be over the same tensors
    cs = sketch.CountSketch(32, seed=3)
    for i, m in enumerate(feats["names"]):
        lm = canonical(Path(str(m)))
        want = sum(cs.project(n, lm[n].float() - b.float()) for n, b in base.items())
        np.testing.assert_allclose(feats["sketch"][i], want.numpy(), rtol=1e-6, atol=1e-9)
        total = math.sqrt(sum(float((lm[n].double() - b.double()).pow(2).sum()) for n, b in base.items()))
        if total > 0:
            assert 0.5 < float(np.linalg.norm(feats["sketch"][i])) / total < 1.5


# --------------------------------------------------------------------------------------------------------
# probe.train


def test_overlapped_schedule_is_its_written_formula():
    from probe.train import TrainConfig, lr_factor

    for steps, warmup in ((20, 10), (100, 50), (7, 0), (30, 3)):
        cfg = TrainConfig(steps=steps, lr=1e-3, lm_lr=1e-3, warmup=warmup, schedule="overlapped")
        for step in range(steps):
            warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
            want = warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            assert lr_factor(step, cfg) == pytest.approx(want, rel=1e-12, abs=0), (steps, warmup, step)
    # the docstring's example: a warm-up of half the run never reaches the peak (about 0.55-0.6 of it)
    cfg = TrainConfig(steps=100, lr=1e-3, lm_lr=1e-3, warmup=50, schedule="overlapped")
    assert 0.5 < max(lr_factor(s, cfg) for s in range(100)) < 0.62


def test_label_loss_is_transformers_loss(load_tiny):
    from probe.train import collate, encode, label_loss, model_inputs

    loaded = load_tiny("qwen2_vl", "eager")
    items = [make_item(answer="B"), make_item(answer="C", question="Which shape is shown here, please?", seed=1)]
    batch = collate(encode(loaded, items, True), loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        want = loaded.model(**model_inputs(batch)).loss
        got = label_loss(loaded.model, batch)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_a_frozen_lms_logged_loss_is_the_mean_over_the_whole_batch(tiny_dirs):
    """LM frozen: the text rows of a mixed batch run without autograd's graph (no backward: they reach no trained
    weight), and the logged loss is the mean cross-entropy over all the batch's label tokens (transformers' own
    loss of the four rows padded together), neither the image rows' alone (before 2026-12-06) nor a sum."""
    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, collate, encode, model_inputs, train

    torch.set_num_threads(1)
    loaded = load_model(resolve_model(str(tiny_dirs["qwen2_vl"])), dtype="float32")  # own copy: it is trained
    text = encode(loaded, [make_item(with_image=False, answer="A", item_id="t1"),
                           make_item(with_image=False, answer="C", item_id="t2", question="Which colour?")], True)
    image = encode(loaded, [make_item(answer="B", item_id="i1"), make_item(answer="D", item_id="i2", seed=3)], True)
    rows = text + image
    loaded.model.train()
    with torch.no_grad():
        want = float(loaded.model(**model_inputs(collate(rows, loaded.tokenizer.pad_token_id))).loss)
    calls = []
    hook = loaded.model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(("pixel_values" in kw, torch.is_grad_enabled())), with_kwargs=True)
    try:
        losses = train(loaded, rows, TrainConfig(steps=1, lr=1e-3, lm_lr=0.0, batch=4, warmup=0),
                       log=lambda m: None, sampler=lambda gen, batch: [0, 2, 1, 3])
    finally:
        hook.remove()
    assert sorted(calls) == [(False, False), (True, True)]  # the text part without a graph, the image part with
    assert losses[0] == pytest.approx(want, rel=1e-5)
