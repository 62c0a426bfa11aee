"""Tests written against surviving mutants of a mutation-testing audit: each compares the code with an independent
oracle (a formula written out here, mergekit's own definition, a plain forward with weights zeroed), never with
the helper under test."""
from __future__ import annotations

import csv
import json
import math
import shutil
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


def test_attribution_restores_each_parameters_requires_grad_and_reports_every_row(load_tiny):
    """mut46: the gates-only backward freezes the model for its pass and gives each parameter its own flag back
    (a frozen vision tower stays frozen, a trainable LM stays trainable); progress counts the rows it returns."""
    from probe.attribution import attribution_sweep
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2", "eager")
    params = list(loaded.model.parameters())
    loaded_with = [p.requires_grad for p in params]
    before = [i % 3 != 0 for i in range(len(params))]  # a mix, not all one flag
    for p, w in zip(params, before):
        p.requires_grad_(w)
    try:
        items = [make_item(n_options=4, answer="B", seed=s, with_image=False) for s in (0, 1)]
        heads = [(0, 1), (3, 2)]
        counted: list[int] = []
        rows = attribution_sweep(loaded, items, heads, SweepConfig(generate=False), progress=counted.append)
        assert [p.requires_grad for p in params] == before
        assert sum(counted) == len(rows) == len(items) * (1 + len(heads))
    finally:
        for p, w in zip(params, loaded_with):
            p.requires_grad_(w)


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


# --------------------------------------------------------------------------------------------------------
# analyses.replicate: stale stages (mut43). Hand-built stages, each copying what the stage before it wrote; the
# oracle is that after any sequence of runs every stage holds exactly what the first one holds now.


def _chain(monkeypatch, out: Path, names: tuple[str, ...] = ("heads", "merge", "table4"), write_first=None):
    """Stages ``names`` in a chain, each reading the one before; the first writes ``first.csv`` stamped with its run
    count (an upstream run again has other outputs, as its run.json times it), each later one copies it."""
    import analyses.replicate as rep
    from analyses.replicate import Context
    from analyses.replicate_config import QUICK_CONFIG, parse_config

    runs = dict.fromkeys(names, 0)

    def first(ctx) -> None:
        runs[names[0]] += 1
        (ctx.out / names[0]).mkdir(exist_ok=True)
        if write_first is None:
            (ctx.out / names[0] / "first.csv").write_text(f"kl\n0.5\n# run {runs[names[0]]}\n", encoding="utf-8")
        else:
            write_first(ctx.out / names[0])

    def copier(name: str, src: str):
        def run(ctx) -> None:
            runs[name] += 1
            (ctx.out / name).mkdir(exist_ok=True)
            if (f := ctx.out / src / "first.csv").exists():
                shutil.copy(f, ctx.out / name / "first.csv")
        return run

    stages = {names[0]: rep.Stage(names[0], (), first, lambda c: None)}
    for src, name in zip(names, names[1:]):
        stages[name] = rep.Stage(name, (src,), copier(name, src), lambda c: None)
    monkeypatch.setattr(rep, "BY_NAME", stages)
    cfg = parse_config(QUICK_CONFIG)
    ctx = Context(cfg, out, True, {}, {})
    return stages, ctx, runs


def _consistent(out: Path, names) -> bool:
    held = [(out / n / "first.csv").read_bytes() for n in names]
    return all(h == held[0] for h in held)


def test_a_stage_two_steps_downstream_is_kept_when_nothing_changed(tmp_path, monkeypatch):
    """A stage's record holds the outputs of the stages it reads directly (Stage.needs); comparing the ones it reads
    through others (heads, for table4) with a record that never held them called every such stage stale, so a
    whole run reran from its third stage on each time. Then an edit two steps up reruns all after it."""
    import analyses.replicate as rep

    stages, ctx, runs = _chain(monkeypatch, tmp_path)
    assert [rep.run_stage(ctx, s, "fp") for s in stages.values()] == ["ran"] * 3
    assert [rep.stale_reason(tmp_path, s) for s in stages] == [None] * 3
    assert [rep.run_stage(ctx, s, "fp") for s in stages.values()] == ["skipped"] * 3
    (tmp_path / "heads" / "first.csv").write_text("kl\n5.0\n", encoding="utf-8")  # edited by hand
    assert [rep.run_stage(ctx, s, "fp") for s in stages.values()] == ["ran"] * 3
    assert _consistent(tmp_path, stages) and runs == {"heads": 2, "merge": 2, "table4": 2}


def test_records_from_before_outputs_were_recorded_are_kept_then_watched(tmp_path, monkeypatch):
    """A stage completed before its record held its outputs (no "outputs", no "upstream") has nothing to compare:
    it is kept (rerunning it would throw away a finished run's hours), and its record gains both, so an edit by hand
    or an upstream stage run again from then on reruns what reads it."""
    import analyses.replicate as rep

    stages, ctx, runs = _chain(monkeypatch, tmp_path, ("heads", "merge"))
    assert [rep.run_stage(ctx, s, "fp") for s in stages.values()] == ["ran"] * 2
    for s in stages:  # as an earlier omniprobe wrote them
        state = rep.read_state(tmp_path, s)
        rep.write_state(tmp_path, s, {k: v for k, v in state.items() if k not in ("outputs", "upstream")})
    assert [rep.stale_reason(tmp_path, s) for s in stages] == [None] * 2
    assert [rep.run_stage(ctx, s, "fp") for s in stages.values()] == ["skipped"] * 2
    assert {"outputs", "upstream"} <= set(rep.read_state(tmp_path, "merge"))
    assert rep.run_stage(ctx, stages["heads"], "other fp") == "ran"  # --only heads with another setting
    assert rep.run_stage(ctx, stages["heads"], "fp") == "ran"  # and back: other outputs (its stamp)
    assert rep.run_stage(ctx, stages["merge"], "fp") == "ran" and _consistent(tmp_path, stages)
    (tmp_path / "heads" / "first.csv").write_text("kl\n5.0\n", encoding="utf-8")  # then edited by hand
    assert [rep.run_stage(ctx, s, "fp") for s in stages.values()] == ["ran"] * 2
    assert _consistent(tmp_path, stages) and runs == {"heads": 4, "merge": 3}


def test_a_stage_that_wrote_nothing_is_kept_in_a_run_dir_moved_elsewhere(tmp_path, monkeypatch):
    """The data stage with nothing to make (given sets) leaves an empty dir; content_fingerprint names an empty dir
    by its path, so its recorded outputs held where the run was: a run dir moved or copied elsewhere reran it and
    every stage after it. Oracle: the same (no) files."""
    import analyses.replicate as rep

    old = tmp_path / "old"
    old.mkdir()
    stages, ctx, runs = _chain(monkeypatch, old, ("data", "heads"), write_first=lambda d: None)
    assert [rep.run_stage(ctx, s, "fp") for s in stages.values()] == ["ran"] * 2
    new = tmp_path / "new"
    shutil.move(old, new)
    ctx.out = new
    assert [rep.stale_reason(new, s) for s in stages] == [None] * 2
    assert [rep.run_stage(ctx, s, "fp") for s in stages.values()] == ["skipped"] * 2



def test_the_run_state_note_names_every_stage_after_an_edited_one_and_no_unfinished_one_as_inconsistent(
        tmp_path, monkeypatch):
    """The report's top note of a run whose heads output was edited by hand names the stages computed from it,
    directly or through others (merge, then table4, which reads merge), and a stage that never completed (table4
    here, killed after merge ran again) as unfinished only: its record's upstream outputs are not a result shown.
    Oracle: the chain as built here."""
    import analyses.replicate as rep
    from figures.report import run_state

    stages, ctx, runs = _chain(monkeypatch, tmp_path)
    assert [rep.run_stage(ctx, s, "fp") for s in stages.values()] == ["ran"] * 3

    class Run:  # the part of figures.results.Replication the note reads
        info = {"stages": [*stages, "report"]}
        out = tmp_path

        def recorded_complete(self, stage: str) -> bool:
            return rep.read_state(tmp_path, stage).get("status") == "complete"

    assert run_state(Run()).note() == ""
    (tmp_path / "heads" / "first.csv").write_text("kl\n5.0\n", encoding="utf-8")  # edited by hand
    note = run_state(Run()).note(markdown=False)
    assert "heads: its outputs in" in note and "the stages after it (merge, table4)" in note, note
    state = rep.read_state(tmp_path, "table4")
    rep.write_state(tmp_path, "table4", state | {"status": "running", "upstream": {"merge": "an earlier output"}})
    note = run_state(Run()).note(markdown=False)
    assert "stage table4 has not completed" in note and "table4: stage merge" not in note, note



def test_a_stage_killed_before_its_upstream_ran_again_starts_again(tmp_path, monkeypatch):
    """The record a stage writes when it starts holds the outputs of the stages it reads: killed, then continued
    after heads completed again with other outputs, merge would keep the parts it computed from the old ones.
    Oracle: merge's part from before the kill is gone and its output is heads' output of now."""
    import analyses.replicate as rep

    import dataclasses

    stages, ctx, runs = _chain(monkeypatch, tmp_path, ("heads", "merge"))  # stages is rep.BY_NAME
    whole = stages["merge"]

    def killed(ctx) -> None:
        (ctx.out / "merge").mkdir(exist_ok=True)
        (ctx.out / "merge" / "part-0").write_text("of the earlier heads", encoding="utf-8")
        raise KeyboardInterrupt

    stages["merge"] = dataclasses.replace(whole, run=killed)
    assert rep.run_stage(ctx, stages["heads"], "fp") == "ran"
    with pytest.raises(KeyboardInterrupt):
        rep.run_stage(ctx, stages["merge"], "fp")
    assert rep.run_stage(ctx, stages["heads"], "other fp") == "ran"  # --only heads with another setting
    assert rep.run_stage(ctx, stages["heads"], "fp") == "ran"  # and back: other outputs (its stamp)
    stages["merge"] = whole
    assert rep.run_stage(ctx, stages["merge"], "fp") == "ran"
    assert not (tmp_path / "merge" / "part-0").exists() and _consistent(tmp_path, stages)


# --------------------------------------------------------------------------------------------------------
# probe.upstream: the head-layout check on every layer, the RoPE limit from the config (mut43)


def test_heads_reaching_o_proj_in_another_order_in_the_last_layer_alone_are_refused(load_tiny):
    """Every decoder layer is checked, not the first alone: a model whose last layer hands o_proj its heads in
    another order (hybrid stacks build layers of several classes) masks other channels there. Oracle: a pre-hook
    that swaps the o_proj input blocks of the first and the last head (of two value heads) of the last layer only."""
    from probe.models import check_head_layout
    from probe.upstream import UpstreamChanged

    loaded = load_tiny("qwen2")
    g, last = loaded.geometry, loaded.geometry.n_layers - 1
    assert last > 0 and g.n_kv_heads >= 2  # heads 0 and n-1 read other values: swapped, the blocks differ
    d, h = g.head_dim, g.n_heads - 1

    def swap(module, args):
        x = args[0].clone()
        x[..., :d], x[..., h * d:] = args[0][..., h * d:], args[0][..., :d]
        return (x,)

    check_head_layout(loaded)  # as loaded: every layer head-major
    handle = loaded.o_proj(last).register_forward_pre_hook(swap)
    try:
        with pytest.raises(UpstreamChanged, match=f"decoder layer {last}'s attention put query head ({h}|0)'s"):
            check_head_layout(loaded)
    finally:
        handle.remove()


class _RopeConfig:
    """The parts of a transformers config rope_position_limit reads (``get_text_config``, rope_parameters)."""

    def __init__(self, rope_parameters=None, max_position_embeddings=None) -> None:
        self.rope_parameters = rope_parameters
        self.max_position_embeddings = max_position_embeddings

    def get_text_config(self, decoder: bool = False):
        return self


def _rope_model(config: _RopeConfig, *rotaries: tuple[object, dict]) -> torch.nn.Module:
    """A module tree holding rotary modules of the given rope_type, each with its own attributes."""
    model = torch.nn.Module()
    model.config = config
    for i, (kind, attrs) in enumerate(rotaries):
        rotary = torch.nn.Module()
        rotary.rope_type, rotary.config = kind, config
        for k, v in attrs.items():
            setattr(rotary, k, v)
        model.add_module(f"rotary{i}", rotary)
    return model


def test_the_rope_limit_is_the_smallest_and_read_per_layer_type_from_the_config():
    """rope_position_limit against the config's numbers, written out here: a per-layer-type longrope reads its own
    layer type's original_max_position_embeddings (not the config's 4096 positions); a dynamic RoPE whose module
    keeps no original_max_seq_len takes the config's max_position_embeddings; of several limits the smallest
    holds (past it one of the rotary embeddings already depends on the call)."""
    from probe.upstream import rope_position_limit

    per_layer = {"full_attention": {"rope_type": "longrope", "original_max_position_embeddings": 64},
                 "sliding_attention": {"rope_type": "default"}}
    cfg = _RopeConfig(per_layer, 4096)
    kinds = {"full_attention": "longrope", "sliding_attention": "default"}
    assert rope_position_limit(_rope_model(cfg, (kinds, {}))) == ("longrope", 64)
    dyn = _RopeConfig({"rope_type": "dynamic", "factor": 2.0}, 2048)
    assert rope_position_limit(_rope_model(dyn, ("dynamic", {}))) == ("dynamic", 2048)
    both = _rope_model(dyn, ("dynamic", {"original_max_seq_len": 300}), ("dynamic", {"original_max_seq_len": 100}))
    assert rope_position_limit(both) == ("dynamic", 100)
    both = _rope_model(dyn, ("dynamic", {"original_max_seq_len": 100}), ("dynamic", {"original_max_seq_len": 300}))
    assert rope_position_limit(both) == ("dynamic", 100)
    assert rope_position_limit(_rope_model(_RopeConfig({"rope_type": "default"}, 4096), ("default", {}))) is None


@pytest.mark.parametrize("params", [{"rope_type": "dynamic", "factor": 2.0},
                                    {"full_attention": {"rope_type": "longrope",
                                                        "original_max_position_embeddings": 64},
                                     "sliding_attention": {"rope_type": "default"}}])
def test_a_declared_length_dependent_rope_that_no_module_holds_is_refused(params):
    """The config declares a dynamic RoPE, or a longrope for one layer type, but no module says so by its rope_type
    (a release keeping it under another name): items past the limit could not be refused, so the model is."""
    from probe.upstream import UpstreamChanged, rope_position_limit

    model = _rope_model(_RopeConfig(params, 4096))
    kind = "dynamic" if "rope_type" in params else "longrope"
    with pytest.raises(UpstreamChanged, match=f"config declares '{kind}' RoPE"):
        rope_position_limit(model)



# --------------------------------------------------------------------------------------------------------
# probe.models / probe.families: a checkpoint matching two layouts equally is refused by the probe (mut43)


def test_a_checkpoint_matching_two_layouts_equally_is_refused_by_the_probe(tiny_dirs, tmp_path):
    """A Qwen2-VL holding both its published keys (visual., model.layers.) and transformers 4's (model.visual.,
    model.language_model.): both layouts match all their markers, so detect_layout cannot pick one. The probe falls
    back on the family's class for a layout no row names, which loads one copy of each tensor without a word; an
    ambiguous one must stop it as keys of two layouts do. Oracle: the keys as written here."""
    import re

    from safetensors.torch import load_file, save_file

    from probe.errors import BadInput
    from probe.models import resolve_model

    d = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "both")
    sd = load_file(d / "model.safetensors")
    assert any(k.startswith("visual.") for k in sd) and any(k.startswith("model.layers.") for k in sd)
    sd |= {"model." + k: v + 1 for k, v in sd.items() if k.startswith("visual.")}
    sd |= {"model.language_model." + k[len("model."):]: v + 1 for k, v in sd.items() if k.startswith("model.layers.")}
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInput, match=rf"^{re.escape(str(d))}: ambiguous checkpoint layout"):
        resolve_model(str(d))



def test_a_single_key_of_another_layout_is_refused():
    """One stray tensor of another layout (a transformers 4 copy of one vision block beside the published tower)
    is as much a second copy as many: transformers keeps one of the two without a word. Oracle: the key list
    written here, the published Qwen2-VL names and one model.visual. name."""
    from probe.families import LayoutConflict, detect_layout

    keys = ["visual.patch_embed.proj.weight", "visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight",
            "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
            "lm_head.weight"]
    assert detect_layout("qwen2_vl", keys).name == "qwen2_vl"
    with pytest.raises(LayoutConflict, match=r"keys of two layouts.*model\.visual\.blocks\.0\.attn\.qkv\.weight is a "
                                             r"tensor of layout qwen2_vl_tf4"):
        detect_layout("qwen2_vl", [*keys, "model.visual.blocks.0.attn.qkv.weight"], "ck")


# --------------------------------------------------------------------------------------------------------
# figures.findings: a text verdict on a named paper column (mut43)


@pytest.mark.parametrize("paper_delta, lo, hi, want", [
    (-1.0, -2.0, 0.0, False), (-1.0, -2.0, -1e-9, True), (-1.0, 0.5, 2.0, False),  # a fall: below 0, not touching it
    (1.0, 0.0, 2.0, False), (1.0, 1e-9, 2.0, True), (1.0, -2.0, -0.5, False),  # a rise: above 0, not touching it
    (0.0, 0.0, 1.0, True), (0.0, -1.0, 0.0, True), (0.0, 1e-9, 1.0, False), (0.0, -1.0, -1e-9, False),  # none: 0 held
])
def test_an_interval_goes_the_papers_way_by_its_stated_rule(paper_delta, lo, hi, want):
    """goes_as against column_criterion's words: "a fall needs a 95 % interval below 0, a rise one above 0, no
    change one holding 0": an interval ending at 0 exactly is no measurable fall or rise, and holds 0."""
    from figures.findings import goes_as

    assert goes_as(paper_delta, lo, hi) is want


# --------------------------------------------------------------------------------------------------------
# probe.parsing: "A"/"I" is an article or pronoun before a lowercase word only (mut43)


@pytest.mark.parametrize("response, expected", [
    ("Answer: A\nExplanation: the circle is red.", "A"), ("A\n\nThe answer is A because it is red.", "A"),
    ("The answer is A But I am unsure.", "A"), ("A Blue", "A"), ("A 5", "A"), ("A CIRCLE", "A"),
    ("A red circle, so C", "C"), ("I think it is C", "C"), ("A água, C", "C"),
])
def test_an_a_before_a_capitalised_word_or_a_line_break_is_the_choice(response, expected):
    """The module docstring's rule: an "A" or "I" followed by a lowercase word ("A red circle", "I think") is an
    article or pronoun; followed by a capitalised word, a number or a new line ("Answer: A\\nExplanation") it is
    the choice. Read as a word there, the commonest answer shape read nothing."""
    from probe.parsing import parse_choice

    assert parse_choice(response, ["red", "blue", "green", "yellow"]) == expected


# --------------------------------------------------------------------------------------------------------
# probe.eval.plan_identity: a model is its place and directory, whatever it is called (mut43)


def _plan(tmp_path: Path, names: tuple[str, str], na: str, unread: str) -> dict:
    """A plan as asdict(EvalPlan) keeps it (the fields plan_identity reads): two models, a text and an image set;
    ``na`` and ``unread`` name the not-applicable and the partly unreadable pair by "model|set"."""
    return {"models": [{"name": n, "path": str(tmp_path / p), "family": "qwen2_vl", "fingerprint": "f" + p}
                       for n, p in zip(names, ("m0", "m1"))],
            "data": [{"name": d, "spec": str(tmp_path / d)} for d in ("text", "image")],
            "not_applicable": {na: "no image input"}, "unreadable": {unread: {"art": 3}},
            "template": {}, "chat_formats": {names[0]: {"kind": "chatml"}, names[1]: {"kind": "none"}},
            "settings": {"reference": names[0]}}


def test_a_plan_is_the_same_run_under_other_model_names_and_another_with_other_pairs(tmp_path):
    """A resume naming its models otherwise (an alias, its directory) continues: the not-applicable and unreadable
    pairs, the chat formats and the reference are the models' places, not their names; the same names with another
    pair left out is another run. Oracle: two plans written here that differ only in the names, and one that
    leaves out the other model's pair."""
    from probe.eval import plan_identity

    a = _plan(tmp_path, ("tiny", "vl"), "tiny|image", "vl|image")
    b = _plan(tmp_path, ("runs/tiny", "./vl"), "runs/tiny|image", "./vl|image")
    assert plan_identity(a) == plan_identity(b)
    assert plan_identity(a) != plan_identity(_plan(tmp_path, ("tiny", "vl"), "vl|image", "vl|image"))
    assert plan_identity(a) != plan_identity(_plan(tmp_path, ("tiny", "vl"), "tiny|image", "tiny|image"))
    assert a == _plan(tmp_path, ("tiny", "vl"), "tiny|image", "vl|image")  # the plan given is left as it was


# --------------------------------------------------------------------------------------------------------
# mutation round of session 43 (mut43b): probe.stats, ...


def test_a_paired_difference_at_another_level_takes_its_percentiles_from_the_same_resamples():
    """figures.findings asks paired_differences for 90 % intervals: the level must reach the percentiles (a level
    dropped on the way gave the 95 % interval). Oracle: the paired resample written out, percentiles 5 and 95."""
    from probe.stats import paired_difference

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(40), rng.standard_normal(40)
    d = paired_difference(a, b, 11, "set|diff|accuracy", level=0.90)
    idx = np.random.default_rng([11, zlib.crc32(b"set|diff|accuracy")]).integers(0, 40, size=(2000, 40))
    lo, hi = np.percentile((a - b)[idx].mean(axis=1), [5, 95])
    assert (d.value, d.lo, d.hi) == (float((a - b).mean()), lo, hi)


def test_paired_samples_of_different_lengths_are_refused_not_broadcast():
    """A paired difference needs one value of each model per item: numpy broadcasts a one-item sample against
    any other, so without the check 1 vs 3 items gave a 'difference' with an interval. Oracle: the rule itself."""
    from probe.stats import paired_difference

    for a, b in ((np.ones(3), np.zeros(1)), (np.ones(1), np.zeros(3)), (np.ones(3), np.zeros(2))):
        with pytest.raises(ValueError, match="differ in length"):
            paired_difference(a, b, 0, "set|diff|accuracy")

def test_shift_stats_streamed_in_chunks_are_the_whole_tensors():
    """analyses.shift feeds ShiftStats a tensor in chunks (CHUNK elements); a tensor larger than one chunk whose
    largest |Δ| lies in an early chunk must still report it (a max kept per chunk said the last chunk's).
    Oracle: Eq. 3, max |Δ| and ‖Δ‖ / ‖θ_0‖ over the whole tensors in float64."""
    from analyses.formulas import ShiftStats

    g = torch.Generator().manual_seed(4)
    base = torch.randn(1000, generator=g)
    model = base + 0.01 * torch.randn(1000, generator=g)
    model[3] += 5.0  # the largest move, in the first chunk
    st = ShiftStats()
    for lo in range(0, 1000, 128):
        st.add(base[lo:lo + 128], model[lo:lo + 128])
    d = model.double() - base.double()
    assert st.numel == 1000
    assert st.delta_avg == pytest.approx(float(d.abs().mean()), rel=1e-6)  # Δ taken in fp32
    assert st.max_abs == pytest.approx(float(d.abs().max()), rel=1e-6)
    assert st.rel_l2 == pytest.approx(float(d.norm() / base.double().norm()), rel=1e-6)

def test_figures_merge_takes_task_arithmetics_affine_weights_outside_0_1():
    """Task arithmetic θ_0 + λ Σ (θ_i − θ_0) weights [θ_0, θ_1, θ_2] by [1 − 2λ, λ, λ]: at λ = 0.7 the base's is
    −0.4, which figures.merge's check must take (affine, not convex), while the same row of a shift merge is
    refused. Oracle: the coefficients of that definition, written out."""
    import pandas as pd

    from figures.merge import check_weights
    from probe.errors import BadInput

    lam = 0.7
    weights = {"base": 1 - 2 * lam, "a": lam, "b": lam}
    rows = pd.DataFrame({"tensor": ["layers.0.mlp.up_proj.weight"] * 3, "slice": ["all"] * 3, "model": list(weights),
                         "delta_avg": [float("nan")] * 3, "weight": list(weights.values()),
                         "trim_threshold": [float("nan")] * 3})
    info = {"method": "task_arithmetic", "models": ["a", "b"], "reference": "base", "n_tensors": 1,
            "mean_weight": weights}
    check_weights(Path("merge_weights.csv"), rows, info)
    with pytest.raises(BadInput, match=r"must be a weight in \[0, 1\]"):
        check_weights(Path("merge_weights.csv"), rows, info | {"method": "shift"})

def test_a_subject_row_that_left_items_out_counts_that_subjects_items():
    """scores.csv's note of a row scored on part of its items says 'N of M items …' with M that row's items (the
    subject's, on a subject row), not the whole set's. Oracle: the items built here, 3 read of subject T and 1 read
    of subject I, whose other 2 the model could not read."""
    import pandas as pd

    from probe.eval import DataSet, EvalPlan, ModelEntry, score_table

    rows = [{"model": "part", "data": "d", "item_id": str(i), "subject": s, "correct": float(i % 2),
             "prob_correct": float((i + 1) % 2), "p_answer": 0.3 + 0.1 * i} for s, n in (("T", 3), ("I", 1)) for i in range(n)]
    why = "not applicable: part cannot read them"
    plan = EvalPlan([ModelEntry("part", "part", "qwen2", "fp")], [DataSet("d", "d", "d", "fp", 6, 0, ["T", "I"])],
                    {"part|d": why}, {"part|d": {"I": 2}}, {}, {}, {"generate": True})
    scores = score_table(pd.DataFrame(rows), plan, None, 0).set_index("subject")
    assert scores.loc["I", "n_items"] == 1 and scores.loc["I", "note"].startswith(f"2 of 3 items {why}")
    assert scores.loc["all", "n_items"] == 4 and scores.loc["all", "note"].startswith(f"2 of 6 items {why}")
    assert scores.loc["T", "note"] == ""  # nothing of T left out (and its scores vary: no other note)

@pytest.mark.parametrize("n", [1, 2, 7])
def test_a_rate_of_0_or_1_is_reported_with_the_exact_interval_down_to_one_item(n):
    """reported_interval (scores.csv's note, table.md's †, the figures) gives a 0 % or 100 % rate the Clopper–Pearson
    interval for any n ≥ 1, a single item included (its bootstrap interval is [v, v]); a rate in between keeps its
    bootstrap bounds. Oracle: scipy's exact binomial interval."""
    from scipy.stats import binomtest

    from probe.stats import reported_interval

    for k, v in ((n, 1.0), (0, 0.0)):
        want = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert reported_interval(v, v, v, n) == pytest.approx((want.low, want.high), abs=1e-12)
    assert reported_interval(0.5, 0.2, 0.8, n) == (0.2, 0.8)

def test_combine_is_the_weighted_sum_it_documents():
    """analyses.formulas.combine, the in-memory θ = Σ c_j θ_j the docs name as the streaming merge's reference, with
    affine (task arithmetic's) coefficients and a bf16 input. Oracle: the sum written out in float64."""
    from analyses.formulas import combine

    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g).bfloat16(), torch.randn(3, 5, generator=g)]
    c = [1.6, -0.3, -0.3]
    want = sum(cj * t.double() for cj, t in zip(c, thetas))
    got = combine(thetas, c)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_kv_group_weights_average_the_query_heads_each_group_serves():
    """A k/v_proj slice of group g is weighted by the mean ŝ of query heads g·(H/H_kv) … (g+1)·(H/H_kv) − 1 (the
    heads that read it), for 8 heads in 2 groups (groups of 4, not a square 2 × 2 that a transposed grouping would
    leave unchanged) and 4 heads in 2 groups (where heads 0, 2 against 0, 1 tells a strided grouping apart).
    Oracle: ŝ, the group means and the softmax written out per group."""
    from analyses.salience import SalienceWeights
    from probe.lm_config import HeadGeometry

    for n_heads in (8, 4):
        n_kv, d = 2, 3
        geom = HeadGeometry(n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, head_dim=d, hidden_size=n_heads * d)
        g = torch.Generator().manual_seed(n_heads)
        tables = [torch.rand(2, n_heads, generator=g, dtype=torch.float64) for _ in range(3)]
        w = SalienceWeights.build(tables, geom, temperature=0.5, alpha0=0.2, with_base=False)
        per = n_heads // n_kv
        shat = [t / t.mean() for t in tables]  # all positive: the clamp changes nothing
        for layer in range(2):
            for grp in range(n_kv):
                z = [float(s[layer, grp * per:(grp + 1) * per].mean()) / 0.5 for s in shat]
                e = [math.exp(v - max(z)) for v in z]
                want = [0.2] + [0.8 * v / sum(e) for v in e]
                assert w.group[:, layer, grp].tolist() == pytest.approx(want, rel=1e-12)
            axis, vec = w.slice_coefficients(f"layers.{layer}.self_attn.k_proj.weight", (n_kv * d, 7))
            assert axis == 0 and vec.shape == (4, n_kv * d)  # the base and 3 experts
            for row in range(n_kv * d):  # row r of k_proj belongs to group r // head_dim
                assert torch.equal(vec[:, row], w.group[:, layer, row // d])


def test_the_exact_engines_guard_checks_the_deepest_row_of_the_first_item_once(load_tiny, monkeypatch):
    """probe.exact's run-time guard recomputes one row with the naive oracle: the deepest head asked for (it crosses
    the most engine-built state), on the first item only, whatever order the heads come in. Oracle: max() of the
    heads given, and the guard's own comparison run against the naive forward."""
    import probe.exact as exact
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2", "eager")
    checked = []
    real = exact.check_against_naive

    def spy(loaded, item, inputs, letter_ids, pair, got, cfg):
        checked.append((item.id, pair))
        return real(loaded, item, inputs, letter_ids, pair, got, cfg)

    monkeypatch.setattr(exact, "check_against_naive", spy)
    heads = [(2, 1), (3, 0), (0, 3), (1, 2)]
    items = [make_item(with_image=False, item_id=f"validation_Art_{i}") for i in (1, 2)]
    exact.exact_sweep(loaded, items, heads, SweepConfig(generate=False, batch_size=3))
    assert checked == [("validation_Art_1", max(heads))]


# --------------------------------------------------------------------------------------------------------
# mutation round of session 45 (mut45): probe.eval's paired differences, ...


def _paired_bootstrap(a, b, seed: int, key: str, level: float = 0.95) -> tuple[float, float, float]:
    """mean(a − b) and its percentile interval, the paired resample written out (DESIGN §8's stream)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    idx = np.random.default_rng([seed, zlib.crc32(key.encode())]).integers(0, d.size, size=(2000, d.size))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(d[idx].mean(axis=1), [tail, 100 - tail])
    return float(d.mean()), float(lo), float(hi)


def test_each_diff_column_and_level_is_its_own_metrics_paired_bootstrap():
    """scores.csv's diff_prob_lo / diff_prob_hi are probability accuracy's paired interval (accuracy's in their place
    passed every test), and paired_differences' ``level`` reaches both metrics (figures.findings asks for 90 %: the
    level dropped in probe.eval gave 95 % and passed too). Oracle: the paired resample written out."""
    import pandas as pd

    from probe.eval import DataSet, EvalPlan, ModelEntry, paired_differences, score_table

    rng = np.random.default_rng(8)
    n = 30
    cols = {m: {"correct": rng.integers(0, 2, n).astype(float), "prob_correct": rng.integers(0, 2, n).astype(float)}
            for m in ("ref", "b")}
    items = pd.DataFrame([{"model": m, "data": "d", "item_id": str(i), "subject": "S", "correct": c["correct"][i],
                           "prob_correct": c["prob_correct"][i], "p_answer": 0.5}
                          for m, c in cols.items() for i in range(n)])
    plan = EvalPlan([ModelEntry("ref", "ref", "qwen2", "fp"), ModelEntry("b", "b", "qwen2", "fp")],
                    [DataSet("d", "d", "d", "fp", n, 0, ["S"])], {}, {}, {}, {}, {})
    row = score_table(items, plan, "ref", 5).set_index(["model", "subject"]).loc[("b", "all")]
    want = {m: _paired_bootstrap(cols["b"][c], cols["ref"][c], 5, f"d|diff|{m}")
            for m, c in (("accuracy", "correct"), ("prob_accuracy", "prob_correct"))}
    assert want["accuracy"][1:] != want["prob_accuracy"][1:]  # the two intervals differ: a swap would show
    assert row[["diff_accuracy", "diff_lo", "diff_hi"]].tolist() == list(want["accuracy"])
    assert row[["diff_prob_accuracy", "diff_prob_lo", "diff_prob_hi"]].tolist() == list(want["prob_accuracy"])
    got, n_paired = paired_differences(items[items["model"] == "b"], items[items["model"] == "ref"], 5, "d", level=0.9)
    assert n_paired == n
    for m, c in (("accuracy", "correct"), ("prob_accuracy", "prob_correct")):
        assert (got[m].value, got[m].lo, got[m].hi) == _paired_bootstrap(cols["b"][c], cols["ref"][c], 5,
                                                                         f"d|diff|{m}", level=0.9)


# probe.batch: the tiny models' tokenizers pad with id 0, the attention mask's own fill: a mask filled with the pad
# id passed every test, and would let a real model (Qwen's pad 151643) attend to its padding


def test_a_nonzero_pad_id_fills_the_tokens_only_and_batched_rows_still_equal_their_items_alone(load_tiny, data_dir,
                                                                                              monkeypatch):
    """Oracle: each item run alone (no padding at all), its option probabilities to 1e-5, with padding of id 5."""
    import probe.batch
    from probe.batch import collate, evaluate_items, plan_batches
    from probe.sweep import SweepConfig, first_token_measure, prepare_item

    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "mm_token_type_ids": torch.ones(1, 3, dtype=torch.long)}
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
         "mm_token_type_ids": torch.ones(1, 1, dtype=torch.long)}
    out = collate([a, b], pad_id=9)
    assert out["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["mm_token_type_ids"].tolist() == [[1, 1, 1], [0, 0, 1]]
    loaded = load_tiny("qwen2", "sdpa")
    assert probe.batch.pad_token(loaded) == 0  # why the other tests could not see it
    monkeypatch.setattr(probe.batch, "pad_token", lambda loaded: 5)
    items = [make_item(with_image=False, n_options=n, item_id=f"validation_Art_{n}", seed=n) for n in (2, 4, 6)]
    cfg = SweepConfig(generate=False)
    prepared = [prepare_item(loaded, it, cfg) for it in items]
    plan = plan_batches([p[0] for p in prepared], 3, max_padding=None)
    assert len({prepared[i][0]["input_ids"].shape[1] for i in plan[0]}) > 1  # anti-tautology: rows were padded
    for got, (inputs, ids) in zip(evaluate_items(loaded, items, cfg, batch_size=3, max_padding=None), prepared,
                                  strict=True):
        torch.testing.assert_close(got.logp.exp(), first_token_measure(loaded, inputs, ids, cfg).logp.exp(),
                                   atol=1e-5, rtol=0)


# probe.train / analyses.finetune (mut45): a step's gradient, the log's rates, the resume point


def test_a_steps_gradient_is_its_own_batchs_not_the_sum_with_the_last_ones(tiny_dirs):
    """Without the step's zero_grad, step 2 ran on step 1's gradient plus its own and the hand-computed AdamW test
    still passed: both batches' answers flipped alike, so g1 ≈ g2 and Adam's m/√v barely moved (4 % of lr). Oracle:
    the gradient at step 2 (read in on_step, after its update) is autograd's gradient of the mean cross-entropy of
    step 2's rows, each run alone, at the weights step 1 left."""
    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, encode, train

    torch.set_num_threads(1)
    loaded = load_model(resolve_model(str(tiny_dirs["qwen2"])), dtype="float32")  # own copy: it is trained
    items = [make_item(with_image=False, answer=a, item_id=f"t{i}", seed=i) for i, a in enumerate("ABCD")]
    rows = encode(loaded, items, True)
    params = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def on_step(info, state) -> None:
        seen[info.step] = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in params.items()}

    batches = iter([[0, 1], [2, 3]])
    train(loaded, rows, TrainConfig(steps=2, lr=1e-2, lm_lr=1e-2, batch=2, warmup=0, clip=1e6),
          log=lambda m: None, sampler=lambda gen, n: next(batches), on_step=on_step)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(seen[1][n][0])  # the weights step 2 ran with
    loaded.model.train()
    total, count = 0.0, 0
    for r in (rows[2], rows[3]):
        logits = loaded.model(input_ids=r["input_ids"][None], attention_mask=r["attention_mask"][None]).logits[0]
        for t in (r["labels"] != -100).nonzero()[:, 0].tolist():
            total = total - torch.log_softmax(logits[t - 1].float(), -1)[r["labels"][t]]
            count += 1
    want = torch.autograd.grad(total / count, list(params.values()))
    for (n, (_, got)), w in zip(seen[2].items(), want):
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-4, msg=n)


def test_the_logs_rate_columns_are_each_groups_configured_rate_times_the_factor(tmp_path):
    """train_log.csv's lm_lr written from --lr passed every test (their runs give both rates alike). Oracle: the
    documented columns, lr = --lr × factor (0 under --lora) and lm_lr = --lm-lr × factor, with two distinct rates."""
    from analyses.finetune import FinetuneConfig, append_log
    from probe.train import StepInfo

    for lora, want_lr in ((None, 2e-4 * 0.25), (4, 0.0)):
        log = tmp_path / f"log{lora}.csv"
        cfg = FinetuneConfig(model="m", data={"text": "d"}, out=tmp_path / "o", steps=4, lr=2e-4, lm_lr=3e-5, lora=lora)
        append_log(log, StepInfo(step=3, loss=1.5, lr_factor=0.25, rows=[0, 1, 1], tokens=6), {0: "text", 1: "text"},
                   cfg)
        row = next(csv.reader(log.open(encoding="utf-8")))
        assert row == ["3", "text=3", "1.5", repr(want_lr), repr(3e-5 * 0.25), "6"]


def test_the_resume_point_is_the_latest_checkpoint_with_every_earlier_one_there(tmp_path):
    """Oracle: resume_point's rule on hand-built checkpoint dirs (a trainer state in each but the last step's,
    which needs none): the latest resumable one, unless a checkpoint the run writes before it is missing."""
    from analyses.finetune import STATE, FinetuneConfig, resume_point

    cfg = FinetuneConfig(model="m", data={"text": "d"}, out=tmp_path / "o", steps=6, save_steps=[2, 4])
    cfg.out.mkdir()
    for step in (0, 2, 4):
        (cfg.out / f"checkpoint-{step}").mkdir()
        (cfg.out / f"checkpoint-{step}" / STATE).write_bytes(b"")
    assert resume_point(cfg.out, cfg)[0] == 4
    (cfg.out / "checkpoint-6").mkdir()  # the last step's: done, no state needed
    assert resume_point(cfg.out, cfg)[0] == 6
    shutil.rmtree(cfg.out / "checkpoint-2")  # a killed --overwrite deleted it: the run goes back to step 0
    assert resume_point(cfg.out, cfg)[0] == 0


# analyses.trajectory.embed_2d (mut45): when t-SNE runs, and with which seed


def test_points_that_coincide_away_from_the_reference_get_no_tsne():
    """Identical points whose features are not all zero (a --ref other than them): t-SNE is skipped, as for points
    at the reference. The spread was read along each point's features (axis 1) in a mutant that every test passed:
    their coinciding points were all zeros. Oracle: the documented rule, all points one point."""
    from analyses.trajectory import embed_2d

    x = np.tile([1.0, 2.0, 5.0, 3.0], (4, 1))
    out, used, _ = embed_2d(x, 30.0, 0)
    assert used is None and set(out) == {"pca"}


def test_tsne_takes_the_runs_seed():
    """A 1-feature map (t-SNE's init is random there) with --seed 7 is sklearn's TSNE with random_state 7, not 0's
    (a fixed random_state passed the same-seed-twice test). Oracle: sklearn itself, called with the documented
    settings (perplexity clamped to n − 1, exact method)."""
    from sklearn.manifold import TSNE

    from analyses.trajectory import embed_2d

    x = np.array([[0.0], [1.0], [3.0], [7.0], [8.0]])
    want = {s: TSNE(n_components=2, perplexity=4.0, init="random", random_state=s, method="exact").fit_transform(x)
            for s in (0, 7)}
    assert not np.allclose(want[0], want[7])
    out, used, _ = embed_2d(x, 30.0, 7)
    assert used == 4.0
    np.testing.assert_array_equal(out["tsne"], want[7])


# --------------------------------------------------------------------------------------------------------
# analyses.writer (mut46): shards cut where huggingface_hub's own splitter cuts them, named as it names them


@pytest.mark.parametrize("numels, max_bytes", [((25, 25, 50, 10), 200), ((50, 10, 40, 50), 200), ((60,), 100),
                                              ((25, 25, 10), 200)])
def test_sharded_writer_cuts_and_names_shards_as_huggingface_hub(tmp_path, numels, max_bytes):
    """A shard that the next tensor would fill exactly (100 + 100 of 200 bytes) still takes it, a tensor past the
    limit gets a shard of its own, and shards are numbered from 00001; oracle: huggingface_hub's
    split_torch_state_dict_into_shards on the same float32 tensors, the split transformers' save_pretrained makes."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from analyses.writer import INDEX_NAME, Entry, ShardedWriter

    sd = {f"t{i}": torch.full((n,), float(i)) for i, n in enumerate(numels)}
    want = split_torch_state_dict_into_shards(sd, max_shard_size=max_bytes)
    with ShardedWriter(tmp_path, [Entry(k, v.dtype, tuple(v.shape)) for k, v in sd.items()], max_bytes) as w:
        for k, v in sd.items():
            with w.tensor(k) as sink:
                sink.write(v)
        w.close()
    from safetensors import safe_open

    for f in tmp_path.glob("*.safetensors"):  # as save_pretrained writes them: format pt, data 8-byte aligned
        with safe_open(str(f), "pt") as opened:
            assert opened.metadata() == {"format": "pt"}
        assert int.from_bytes(f.read_bytes()[:8], "little") % 8 == 0
    if not want.is_sharded:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
        return
    got = json.loads((tmp_path / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
    assert got == want.tensor_to_filename


@pytest.mark.parametrize("text", ["5GB", "2GiB", "500MB", "3MiB", "20KB", "7KiB"])
def test_parse_size_reads_units_as_transformers_does(text):
    """Oracle: transformers' own convert_file_size_to_int (save_pretrained's max_shard_size): SI for KB/MB/GB,
    binary for KiB/MiB/GiB."""
    from transformers.utils.hub import convert_file_size_to_int

    from analyses.writer import parse_size

    assert parse_size(text) == convert_file_size_to_int(text)


def test_a_tensor_written_short_of_its_size_is_an_error(tmp_path):
    """The header promised 16 bytes: 8 written would leave the next tensor's bytes read under this one's name."""
    from analyses.writer import Entry, ShardedWriter

    with ShardedWriter(tmp_path, [Entry("a", torch.float32, (4,)), Entry("b", torch.float32, (2,))], 10**9) as w:
        with pytest.raises(RuntimeError, match="a: wrote 8 bytes, expected 16"):
            with w.tensor("a") as sink:
                sink.write(torch.zeros(2))


# --------------------------------------------------------------------------------------------------------
# analyses.align.check_token_ids (mut46): the last common row, and tokens tokenizer.json adds beside its vocab


def _tokenizer_dir(path: Path, vocab: list[str], added: dict[str, int]) -> Path:
    path.mkdir()
    (path / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(vocab)}, "merges": []},
        "added_tokens": [{"id": i, "content": t, "special": True} for t, i in added.items()]}), encoding="utf-8")
    return path


@pytest.mark.parametrize("other_vocab, other_added", [
    ([f"t{i}" for i in range(9)] + ["x"], {"t9": 10}),  # row 9, the last compared, is another token
    ([f"t{i}" for i in range(9)], {"<b>": 9}),  # an added token (tokenizer.json's added_tokens) at row 9 differs
])
def test_token_ids_are_compared_up_to_the_last_common_row_added_tokens_included(tmp_path, other_vocab, other_added):
    """Oracle: row 9 of the reference is token t9 / <a> (its tokenizer.json says so); in the other it is not, and
    both have 10 rows, so merging row 9 would mix two tokens."""
    from types import SimpleNamespace

    from analyses.align import check_token_ids
    from probe.errors import BadInput

    ref_vocab, ref_added = ([f"t{i}" for i in range(10)], {}) if "t9" in other_added else \
        ([f"t{i}" for i in range(9)], {"<a>": 9})
    ref = SimpleNamespace(path=_tokenizer_dir(tmp_path / "ref", ref_vocab, ref_added))
    other = SimpleNamespace(path=_tokenizer_dir(tmp_path / "other", other_vocab, other_added))
    check_token_ids([ref, other], ["ref", "other"], 9)  # rows 0-8 agree
    with pytest.raises(BadInput, match=r"tokenizers differ: token '(t9|<a>)' is id 9 in ref"):
        check_token_ids([ref, other], ["ref", "other"], 10)


# --------------------------------------------------------------------------------------------------------
# analyses.checkpoints.SafetensorsFile (mut46): a range that is not its tensor's size, a gap between two ranges


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("header, size", [
    ({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}, 16),  # 8 bytes of F16 in a 16-byte range
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}, 32),  # 8 bytes between a and b
])
def test_a_range_off_its_tensors_size_or_a_gap_is_corrupt_as_safetensors_says(tmp_path, header, size):
    """Oracle: the safetensors library (transformers' reader) refuses both files; so does SafetensorsFile."""
    from safetensors import SafetensorError, safe_open

    from analyses.checkpoints import SafetensorsFile
    from probe.errors import BadInput

    f = _raw_safetensors(tmp_path / "model.safetensors", header, bytes(size))
    with pytest.raises(SafetensorError):
        with safe_open(str(f), "pt") as s:
            [s.get_tensor(k) for k in s.keys()]
    with pytest.raises(BadInput, match="corrupt"):
        SafetensorsFile(f)


def test_layer_module_reads_layer_numbers_of_any_width():
    """A 28-layer model's layers.12 is layer 12 (the tiny models' 4 layers never reach two digits)."""
    from analyses.checkpoints import layer_module

    for layer in (0, 9, 12, 27, 103):
        assert layer_module(f"layers.{layer}.self_attn.q_proj.weight") == (layer, "self_attn.q_proj.weight")
    assert layer_module("embed_tokens.weight") == (None, "embed_tokens.weight")


def test_reserve_descriptors_raises_the_soft_limit_when_the_files_pass_it(monkeypatch):
    """Need past the soft limit but within the hard one: the soft limit is raised to the need (not left, to fail
    with EMFILE hours in); past the hard one: BadInput. Oracle: the limits handed to a stand-in setrlimit."""
    import resource
    from types import SimpleNamespace

    from analyses import checkpoints
    from probe.errors import BadInput

    ck = SimpleNamespace(_files={Path(f"/x/{i}.safetensors"): None for i in range(100)})
    monkeypatch.setattr(checkpoints, "open_descriptors", lambda: 10)
    set_to = []
    monkeypatch.setattr(resource, "setrlimit", lambda what, limits: set_to.append(limits))
    monkeypatch.setattr(resource, "getrlimit", lambda what: (50, 1000))
    checkpoints.reserve_descriptors([ck])
    assert set_to == [(100 + checkpoints.FD_MARGIN + 10, 1000)]
    monkeypatch.setattr(resource, "getrlimit", lambda what: (50, 120))
    with pytest.raises(BadInput, match="may open at most 120"):
        checkpoints.reserve_descriptors([ck])
    monkeypatch.setattr(resource, "getrlimit", lambda what: (500, 1000))
    checkpoints.reserve_descriptors([ck])
    assert len(set_to) == 1  # within the soft limit: left as it is


def test_gpus_of_several_sizes_are_balanced_by_their_usable_memory():
    """Qwen2-VL-7B over an H100 and two 12 GB cards: the split is the evenest over what each device may give the
    weights (memory · 0.92 − 1 GiB), not over the raw memory. Oracle: test_dispatch's brute force over every
    contiguous split, with the usable bytes worked out here."""
    from test_dispatch import H100, _evenest_split, _meta, _ratios

    from probe.dispatch import plan_device_map

    model, fam = _meta("qwen2-vl-7b")
    memory = (H100, 12 * 10**9, 12 * 10**9)
    plan = plan_device_map(model, fam.layers_path, fam.norm_path, fam.lm_head_path, ["a", "b", "c"], memory)

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    sizes = [nbytes(layer) for layer in model.get_submodule(fam.layers_path)]
    last = nbytes(model.get_submodule(fam.norm_path)) + nbytes(model.get_submodule(fam.lm_head_path))
    first = nbytes(model) - sum(sizes) - last
    usable = [m * 0.92 - 2**30 for m in memory]
    ends = [b for _, b in plan.layer_blocks]
    assert _ratios(sizes, first, last, ends, usable) == _evenest_split(sizes, first, last, usable)


# --------------------------------------------------------------------------------------------------------
# probe.results (mut46): the identity rules their docstrings state, each checked directly


def test_json_digest_ignores_key_order_and_keeps_blob_boundaries():
    from probe.results import json_digest

    assert json_digest({"a": 1, "b": [2, 3]}) == json_digest({"b": [2, 3], "a": 1})
    assert json_digest({"a": 1}, b"ab") != json_digest({"a": 1}, b"a", b"b")


def test_result_json_is_strict_json_for_nan_inside_tuples_too():
    """A tuple holding NaN (a bootstrap interval) is written null, as a list's would be: strict parsers reject NaN."""
    from probe.results import json_text

    def strict(_: str):
        raise ValueError("non-finite number in strict JSON")

    assert json.loads(json_text({"ci": (0.5, float("nan")), "x": [float("inf")]}), parse_constant=strict) == \
        {"ci": [0.5, None], "x": [None]}


def test_as_computed_maps_paths_under_the_moved_folder_only(tmp_path):
    """/runs/a moved from /old/a: /runs/a/x was /old/a/x; /runs/ab (another folder sharing the prefix) is itself."""
    from probe.results import Moved, as_computed, moved_inputs

    with moved_inputs(Moved("/runs/a", "/old/a", "/runs/a", "/old/a")):
        assert as_computed({"m": ["/runs/a/x", "/runs/a", "/runs/ab/x"]}) == {"m": ["/old/a/x", "/old/a", "/runs/ab/x"]}


def test_content_fingerprint_sees_a_renamed_file(tmp_path):
    """A directory's fingerprint is its files' names and bytes: the same bytes under another name are another input."""
    from probe.results import content_fingerprint

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text("{}", encoding="utf-8")
    before = content_fingerprint(tmp_path / "d")
    (tmp_path / "d" / "a.json").rename(tmp_path / "d" / "b.json")
    assert content_fingerprint(tmp_path / "d") != before


def test_an_exact_interval_of_no_items_is_refused_by_name():
    """all_alike_interval(0, ...) is a ValueError naming the count, not a ZeroDivisionError from 1/n (a mutant
    checking n < 0 passed every test)."""
    from probe.stats import all_alike_interval

    for right in (True, False):
        with pytest.raises(ValueError, match="at least one item"):
            all_alike_interval(0, right)


def test_the_merge_formulas_against_their_written_out_definitions():
    """Mutants of analyses.formulas (mut47) every merge test passed: Eq. 3 dividing by numel − 1, the weights'
    normalisation without its division by the largest (1e308:1e308 overflowed to inf, shares 0) or without its
    finiteness check (an inf weight), and Eq. 4's softmax without its max subtracted (exp(1000) overflows).
    Oracles: numpy's mean, a 1:1 ratio, and softmax written out from Δ − max Δ."""
    import torch

    from analyses.formulas import delta_avg, normalised, shift_softmax

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
    assert delta_avg(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
        np.abs(a - b).astype(np.float64).mean(), rel=1e-12)  # the difference in fp32, the sum in fp64
    assert normalised([1e308, 1e308]) == [0.5, 0.5]
    assert normalised([3.0, 1.0]) == [0.75, 0.25]
    with pytest.raises(ValueError, match="finite"):
        normalised([math.inf, 1.0])
    deltas, tau = [1.0, 1.002, 0.999], 1e-3
    z = [(d - max(deltas)) / tau for d in deltas]
    want = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    assert shift_softmax(deltas, tau) == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------------------------------------
# mutation round of session 47 (mut47c): probe.exact, probe.prompting, analyses.salience, probe.tokenizer


def test_a_residual_edited_in_place_between_layers_reaches_the_exact_engines_masked_rows(load_tiny):
    """A model that edits the residual in place between layer 0 and layer 1 (inside its own forward only): the clean
    pass must see the edit as an addition (it keeps a copy of each layer's output), so rows masked at layer 0 get it
    too. Oracle: the model's own forward with the head's o_proj columns zeroed, the edit applied by the model."""
    from probe.exact import clean_pass, run_rows

    loaded = load_tiny("qwen2", "eager")
    g = loaded.geometry
    item = make_item(with_image=False, item_id="validation_Art_1")
    inputs = inputs_for(loaded, item)
    delta = torch.randn(loaded.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    inside = [False]

    def edit(module, args, kwargs):
        if inside[0]:  # the model's forward, not the engine calling the layer itself
            (args[0] if args else kwargs["hidden_states"]).add_(delta)

    handles = [loaded.model.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True)),
               loaded.model.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False)),
               loaded.layers[1].register_forward_pre_hook(edit, with_kwargs=True)]
    head = 1
    o_proj = loaded.o_proj(0).weight
    saved = o_proj.detach().clone()
    try:
        with torch.no_grad():
            clean = clean_pass(loaded, inputs, keep_cache=False)
            got = run_rows(loaded, clean, [(0, head)])[0]
            o_proj[:, head * g.head_dim:(head + 1) * g.head_dim] = 0
            want = loaded.model(**inputs).logits[0, -1]
    finally:
        o_proj.data.copy_(saved)
        for h in handles:
            h.remove()
    torch.testing.assert_close(clean.injected[0], delta.expand_as(clean.injected[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_a_row_whose_first_token_ends_the_answer_generates_nothing_more_in_the_exact_engine(load_tiny):
    """generate(do_sample=False) stops a row at its EOS, the first generated token included: greedy_continue must
    mark a row done when its first token (from the masked rows' first-position logits) is EOS, so its answer is
    empty. Oracle: the definition (an answer ending at once is ''), beside a row of the same prompt not forced to
    EOS, which does write text (so the forced row would too, continued)."""
    from probe.exact import clean_pass, greedy_continue
    from probe.upstream import prefix_cache

    loaded = load_tiny("qwen2", "eager")
    inputs = inputs_for(loaded, make_item(with_image=False, item_id="validation_Art_1"))
    clean = clean_pass(loaded, inputs, keep_cache=True)
    first = clean.last_logits[None].repeat(2, 1)
    first[0, min(loaded.eos_token_ids)] = first.max() + 10  # row 0 ends at once
    cache = prefix_cache(clean.cache, loaded.geometry.n_layers, 2)
    texts, bad = greedy_continue(loaded, first, cache, {}, 4, clean.last_position)
    assert texts[0] == "" and texts[1] != "" and bad == [None, None]


def test_each_masked_row_keeps_its_own_overflow_step(load_tiny, monkeypatch):
    """measure_masked hands row r the first non-finite position greedy_continue found for row r (rows overflow at
    different steps, or not at all). Oracle: the per-row positions greedy_continue returned, set here."""
    import probe.exact as exact
    from probe.prompting import letter_token_ids
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2", "eager")
    item = make_item(with_image=False, item_id="validation_Art_1")
    clean = exact.clean_pass(loaded, inputs_for(loaded, item), keep_cache=True)
    real = exact.greedy_continue
    steps = [None, 2, 1]

    def greedy(*a, **k):
        texts, _ = real(*a, **k)
        return texts, steps

    monkeypatch.setattr(exact, "greedy_continue", greedy)
    got = exact.measure_masked(loaded, clean, [(1, 0), (1, 1), (1, 2)], letter_token_ids(loaded.tokenizer, item.letters),
                               SweepConfig(generate=True, max_new_tokens=3))
    assert [m.overflow_step for m in got] == steps


def test_a_templates_assistant_prefix_ends_the_prompt_after_the_chat_templates_generation_prompt(load_tiny):
    """The prompt is the system and user turns, the assistant's turn opened, then the template's assistant_prefix
    (the letter follows it). Oracle: the tokenizer's own chat template (transformers' apply_chat_template) over the
    user text written out here, plus the prefix."""
    from probe.prompting import PromptTemplate, render_prompt

    loaded = load_tiny("qwen2", "eager")
    item = make_item(with_image=False, item_id="validation_Art_1")
    template = PromptTemplate(assistant_prefix="The answer is")
    user = f"Question: {item.question}\nChoices:\n" + "".join(f"{l}. {o}\n" for l, o in zip(item.letters, item.options))
    want = loaded.tokenizer.apply_chat_template(
        [{"role": "system", "content": template.system}, {"role": "user", "content": user}],
        tokenize=False, add_generation_prompt=True) + "The answer is"
    assert render_prompt(loaded, item, template).text == want


class _PieceTokenizer:
    """A vocabulary of whole pieces (the bare capitals and ' A' to ' D', no ' E'...): text is read greedily, longest
    piece first, a character not in it as its own unknown id."""

    unk_token_id = 0

    def __init__(self, pieces):
        self.vocab = {p: i + 1 for i, p in enumerate(pieces)}

    def encode(self, text, add_special_tokens=False):
        out, i = [], 0
        while i < len(text):
            piece = next((text[i:j] for j in range(len(text), i, -1) if text[i:j] in self.vocab), None)
            out.append(self.vocab[piece] if piece else self.unk_token_id)
            i += len(piece) if piece else 1
        return out


def test_a_vocabulary_lacking_some_spaced_capital_reads_every_letter_bare():
    """letter_token_ids with lead ' ': where any capital A-Z lacks a ' X' token, every item's letters are read bare,
    whatever letters this item uses (items of 4 and of 10 options read alike). Oracle: the bare letters' ids in the
    hand-built vocabulary."""
    import string

    from probe.prompting import letter_token_ids

    tok = _PieceTokenizer(list(string.ascii_uppercase) + [" A", " B", " C", " D", " "])
    bare = [tok.vocab[c] for c in "ABCD"]
    assert letter_token_ids(tok, "ABCD", lead=" ") == bare
    full = _PieceTokenizer(list(string.ascii_uppercase) + [" " + c for c in string.ascii_uppercase])
    assert letter_token_ids(full, "ABCD", lead=" ") == [full.vocab[" " + c] for c in "ABCD"]


def test_after_a_prefix_ending_in_a_newline_the_letter_is_written_bare():
    """answer_lead: a prefix ending in a line break ("Answer:\\n") is followed by "A", as one ending in an opening
    bracket; one ending in a word by " A" (the rule of its docstring, each case written out)."""
    from probe.prompting import CHAT_FORMATS, answer_lead

    fmt = CHAT_FORMATS["vicuna"]  # lead " " right after the format's own prompt
    assert [answer_lead(fmt, p) for p in ("Answer:\n", "Answer:\r\n", "Answer: (", "The answer is", "")] == \
        ["", "", "", " ", " "]


@pytest.mark.parametrize("prefix", ["Answer: ", "Answer:\t"])
def test_an_assistant_prefix_ending_in_a_space_or_tab_is_refused(prefix):
    """PromptTemplate.check refuses a prefix ending in blank space of either kind (the model writes the space with
    the letter, as one token), naming the field."""
    from probe.prompting import PromptTemplate

    with pytest.raises(ValueError, match="assistant_prefix"):
        PromptTemplate(assistant_prefix=prefix).check()
    PromptTemplate(assistant_prefix=prefix.rstrip()).check()


def test_a_video_marker_in_the_text_of_an_item_without_frames_is_refused():
    """check_item_text: only a video item's own "<video>" reference is the data's marker; in an item without frames
    it is text the model's tokenizer reads as its video token, refused like any special token."""
    from probe.errors import BadInput
    from probe.prompting import check_item_text

    item = make_item(question="Which <video> shows the circle?")
    with pytest.raises(BadInput, match="<video>"):
        check_item_text([item], ["<image>", "<video>"], "m")
    check_item_text([make_item()], ["<image>", "<video>"], "m")


@pytest.mark.parametrize("misread", [0, 1])
def test_an_anyres_cut_whose_patch_count_reaches_into_the_padding_is_not_kept(misread, monkeypatch):
    """_own_padding keeps a window's cut only where the patch count ends on a real patch: a count one too high (its
    last patch all zeros, the window's padding) is a misread, and the items are encoded one by one (None). Oracle:
    two images of 2 and 3 non-zero patches padded with zeros to 4, written here."""
    import types

    import probe.prompting as prompting

    pixels = torch.zeros(2, 4, 1, 2, 2)
    pixels[0, :2], pixels[1, :3] = 1.0, 2.0
    media = {"pixel_values": pixels, "image_sizes": torch.tensor([[8, 8], [8, 12]])}
    monkeypatch.setattr(prompting, "anyres_patches", lambda *a: [2 + misread, 3 + misread])
    layout = prompting.MediaLayout(prompting._anyres_rows, anyres="llava_onevision")
    got = prompting._own_padding(types.SimpleNamespace(processor=None), layout, media)
    if misread:
        assert got is None
    else:
        assert torch.equal(got["pixel_values"], pixels[:, :3])


def test_the_built_tokenizers_chat_template_writes_chatml_with_each_media_placeholder_in_its_place():
    """probe.tokenizer's chat template (saved with every tiny model and organism): ChatML turns, an image part as the
    image placeholder and a video part as the video one. Oracle: the ChatML text written out here."""
    import unicodedata

    from probe.tokenizer import build_tokenizer

    tok = build_tokenizer(["a small corpus of words"], 300, image_placeholder="[IMG]", video_placeholder="[VID]")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Q?"}]}]
    got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n[IMG][VID]Q?<|im_end|>\n"
                   "<|im_start|>assistant\n")
    # Qwen2's NFC: compatibility forms (a ligature, a circled digit, a full-width capital) are kept, not folded
    text = "ﬁ① Ａ"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == unicodedata.normalize("NFC", text) == text


@pytest.mark.parametrize("canon, shape", [("layers.0.self_attn.q_proj.weight", (6, 8)),
                                          ("layers.0.self_attn.o_proj.weight", (8, 6)),
                                          ("layers.0.self_attn.k_proj.weight", (4, 8))])
def test_a_head_owned_tensor_of_another_width_than_the_salience_geometry_is_refused(canon, shape):
    """SalienceWeights.slice_coefficients (check_tensors' check before anything is written): q_proj rows and o_proj
    columns must be heads x head_dim, k_proj rows kv_heads x head_dim. Oracle: 2 heads x 2 = 4 and 1 KV head x 2 = 2
    by hand; a tensor of 6 (or 4 KV) is refused with BadInput naming it, one of the right width is not."""
    from analyses.salience import SalienceWeights
    from probe.errors import BadInput
    from probe.lm_config import HeadGeometry

    geo = HeadGeometry(n_layers=1, n_heads=2, n_kv_heads=1, head_dim=2, hidden_size=8)
    w = SalienceWeights(torch.full((2, 1, 2), 0.5), torch.full((2, 1, 1), 0.5), torch.full((2, 1), 0.5), geo)
    with pytest.raises(BadInput, match=canon.replace(".", r"\.")):
        w.slice_coefficients(canon, shape)
    right = tuple(2 if n == 4 else 4 if n == 6 else n for n in shape)
    axis, vec = w.slice_coefficients(canon, right)
    assert vec.shape == (2, right[axis])
