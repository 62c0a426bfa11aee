"""Salience metrics (DESIGN §3) against hand computations, plus letter-token and summary checks."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from conftest import inputs_for, make_item
from probe.errors import BadInput
from probe.metrics import kl_orig_masked, letter_log_probs, option_log_probs, prob_choice
from probe.prompting import letter_token_ids


def test_kl_hand_computation():
    # p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4): KL(p||q) = 1/2 ln 2 + 1/4 ln(1/2) = ln(2) / 4
    p = torch.tensor([0.5, 0.25, 0.25]).log()
    q = torch.tensor([0.25, 0.5, 0.25]).log()
    assert kl_orig_masked(p, q).item() == pytest.approx(math.log(2) / 4, abs=1e-7)
    # that pair is symmetric; this one pins the argument order: KL(orig || masked), not KL(masked || orig)
    p = torch.tensor([0.9, 0.1]).log()
    q = torch.tensor([0.5, 0.5]).log()
    want = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    reverse = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    got = kl_orig_masked(p, q).item()
    assert got == pytest.approx(want, abs=1e-6)
    assert abs(got - reverse) > 0.1


def test_kl_from_logits_matches_manual_sum():
    """On the option letters: KL = Σ p_o (log p_o − log p_m) with p = softmax over the letters only."""
    g = torch.Generator().manual_seed(0)
    orig, masked = torch.randn(50, generator=g) * 3, torch.randn(50, generator=g) * 3
    letters = [7, 3, 41, 12, 30]
    lo, lm = option_log_probs(orig, letters), option_log_probs(masked, letters)
    po = [math.exp(orig[i].item()) for i in letters]
    pm = [math.exp(masked[i].item()) for i in letters]
    po = [x / sum(po) for x in po]
    pm = [x / sum(pm) for x in pm]
    want = sum(a * math.log(a / b) for a, b in zip(po, pm))
    assert kl_orig_masked(lo, lm).item() == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("seed", range(200))
def test_kl_nonnegative_and_zero_on_identity(seed):
    g = torch.Generator().manual_seed(seed)
    n = 2 + seed % 9
    scale = [0.1, 1.0, 10.0, 60.0][seed % 4]  # includes nearly one-hot distributions
    a = option_log_probs(torch.randn(4, n, generator=g) * scale, list(range(n)))
    b = option_log_probs(torch.randn(4, n, generator=g) * scale, list(range(n)))
    kl = kl_orig_masked(a, b)
    assert kl.shape == (4,)
    assert bool((kl >= 0).all())
    assert bool((kl_orig_masked(a, a) == 0).all())  # exactly zero, not just small


def test_kl_exactly_zero_with_no_mask_on_a_model(load_tiny):
    m = load_tiny("qwen2_vl")
    item = make_item(n_options=5)
    inputs = inputs_for(m, item)
    ids = letter_token_ids(m.tokenizer, item.letters)
    with torch.no_grad():
        a = option_log_probs(m.model(**inputs).logits[0, -1], ids)
        b = option_log_probs(m.model(**inputs).logits[0, -1], ids)
    assert kl_orig_masked(a, b).item() == 0.0


def test_option_log_probs_restricted_to_given_letters():
    logits = torch.full((20,), -5.0)
    logits[19] = 100.0  # a non-letter token dominating the full vocabulary must not matter
    logits[4], logits[6], logits[2] = 1.0, 2.0, 0.5
    lp = option_log_probs(logits, [4, 6, 2])
    assert lp.shape == (3,)
    z = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5))
    assert lp.tolist() == pytest.approx([1.0 - z, 2.0 - z, 0.5 - z], abs=1e-6)
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert lp.dtype == torch.float32
    # bf16 logits are promoted to fp32 before the softmax
    assert option_log_probs(logits.bfloat16(), [4, 6, 2]).dtype == torch.float32


def test_option_metric_formulas_live_only_in_probe_metrics():
    """One metric module: no engine, analysis or bench script writes its own softmax over the option letters or
    its own KL (attribution once called torch.log_softmax itself); they call probe.metrics."""
    from conftest import REPO

    copies = [f"{path.relative_to(REPO)}:{n}" for folder in ("probe", "analyses", "bench")
              for path in sorted((REPO / folder).rglob("*.py")) if path != REPO / "probe" / "metrics.py"
              for n, line in enumerate(path.read_text().splitlines(), 1)
              if any(f in line for f in ("log_softmax(", "kl_div(", "[ids].argmax(", "logp.argmax("))]
    assert copies == []
    # the restricted softmax (attribution's) is option_log_probs' own: same numbers, bf16 promoted alike
    z = torch.randn(3, 7, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = letter_log_probs(z)
    assert got.dtype == torch.float32
    assert torch.equal(got, option_log_probs(torch.cat([torch.zeros(3, 2, dtype=z.dtype), z], -1), list(range(2, 9))))


def test_prob_choice_can_pick_beyond_d():
    ids = [10, 11, 12, 13, 14]  # A..E
    logits = torch.zeros(32)
    logits[10:14] = torch.tensor([1.0, 2.0, 3.0, 2.5])
    logits[14] = 3.5  # E wins
    logits[20] = 50.0  # not an option letter
    assert int(prob_choice(option_log_probs(logits, ids))) == 4
    other = logits.clone()
    other[10] = 9.0  # second row: A wins
    assert prob_choice(option_log_probs(torch.stack([logits, other]), ids)).tolist() == [4, 0]


def test_measurement_row_prob_pred_beyond_d():
    """The per-item row of the sweep marks E correct when E has the largest option probability."""
    from probe.sweep import Measurement, measurement_row

    item = make_item(n_options=6, answer="E", with_image=False)
    logp = torch.log_softmax(torch.tensor([0.0, 0.1, 0.2, 0.3, 2.0, 0.4]), -1)
    base = torch.log_softmax(torch.zeros(6), -1)
    row = measurement_row(item, 2, 1, Measurement(logp, "E"), base)
    assert row["prob_pred"] == "E" and row["prob_correct"] == 1.0
    assert row["pred"] == "E" and row["correct"] == 1.0
    z = sum(math.exp(x) for x in (0.0, 0.1, 0.2, 0.3, 2.0, 0.4))
    assert row["p_answer"] == pytest.approx(math.exp(2.0) / z)
    want_kl = float(sum(math.exp(b) * (b - a) for a, b in zip(logp.tolist(), base.tolist())))
    assert row["kl"] == pytest.approx(want_kl, abs=1e-6)


# --------------------------------------------------------------------------------------------------------
# option letters are single tokens and decode back to the letter


def test_letter_token_ids_single_tokens(load_tiny):
    for family in ("qwen2", "qwen2_vl", "llava_onevision"):
        tok = load_tiny(family).tokenizer
        letters = [chr(ord("A") + i) for i in range(26)]
        ids = letter_token_ids(tok, letters)
        assert len(set(ids)) == 26
        assert [tok.decode([i]) for i in ids] == letters
        assert not set(ids) & set(tok.all_special_ids)


def test_letter_token_ids_rejects_multi_token_letters():
    class Splitting:
        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text == "C" else [ord(text)]

    assert letter_token_ids(Splitting(), ["A", "B"]) == [65, 66]
    with pytest.raises(BadInput, match="'C'"):
        letter_token_ids(Splitting(), ["A", "B", "C"])


# --------------------------------------------------------------------------------------------------------
# results.summarize: heads.csv aggregates against a hand-built per-item table


def _rows():
    from probe.sweep import BASELINE

    rows = []
    # two items; baseline correct on item 0 only; head (1, 2) flips item 0 wrong; head (0, 0) changes nothing
    for item, subject in (("i0", "Art"), ("i1", "Music")):
        base_ok = 1.0 if item == "i0" else 0.0
        rows.append(dict(item_id=item, subject=subject, layer=BASELINE, head=BASELINE, answer="A", pred="A",
                         correct=base_ok, prob_pred="A", prob_correct=base_ok, p_answer=0.6, kl=0.0, response="A"))
        for (layer, head), ok, kl in (((0, 0), base_ok, 0.01), ((1, 2), 0.0, 0.5 if item == "i0" else 0.1)):
            rows.append(dict(item_id=item, subject=subject, layer=layer, head=head, answer="A", pred="B",
                             correct=ok, prob_pred="B", prob_correct=ok, p_answer=0.4, kl=kl, response="B"))
    return pd.DataFrame(rows)


def test_summarize_drops_and_means():
    from probe.results import summarize

    heads, base = summarize(_rows())
    assert base["n_items"] == 2 and base["accuracy"] == 0.5 and base["prob_accuracy"] == 0.5
    assert set(base["per_subject"]) == {"Art", "Music"}
    h = heads.set_index(["layer", "head"])
    assert list(h.index) == [(0, 0), (1, 2)]
    assert h.loc[(1, 2), "accuracy"] == 0.0 and h.loc[(1, 2), "accuracy_drop"] == 0.5
    assert h.loc[(1, 2), "prob_accuracy_drop"] == 0.5
    assert h.loc[(1, 2), "kl"] == pytest.approx(0.3)
    assert h.loc[(0, 0), "accuracy_drop"] == 0.0 and h.loc[(0, 0), "kl"] == pytest.approx(0.01)
    assert (h["n_items"] == 2).all()
    for col in ("layer", "head", "accuracy", "prob_accuracy", "kl", "n_items"):
        assert col in heads.columns


def test_summarize_keeps_accuracy_and_probability_accuracy_apart():
    """In ``_rows`` every row has correct == prob_correct, so a summary that took the probability-accuracy drop (or
    mean) from the generated answers passed it. Here the two disagree on every head, and p(answer) differs per row:
    each column against its value worked out by hand (3 items; baseline: accuracy 2/3, prob accuracy 1/3)."""
    from probe.results import summarize
    from probe.sweep import BASELINE

    rows = []
    table = {  # (layer, head): per item (correct, prob_correct, p_answer, kl)
        (BASELINE, BASELINE): [(1, 0, 0.5, 0.0), (1, 1, 0.9, 0.0), (0, 0, 0.1, 0.0)],
        (0, 1): [(0, 1, 0.7, 0.2), (0, 1, 0.8, 0.4), (0, 1, 0.6, 0.9)],
        (2, 0): [(1, 0, 0.2, 0.3), (1, 0, 0.3, 0.3), (1, 0, 0.1, 0.6)],
    }
    for (layer, head), per_item in table.items():
        for i, (ok, pok, p, kl) in enumerate(per_item):
            rows.append(dict(item_id=f"i{i}", subject="S" if i < 2 else "T", layer=layer, head=head, answer="A",
                             pred="A" if ok else "B", correct=float(ok), prob_pred="A" if pok else "B",
                             prob_correct=float(pok), p_answer=p, kl=kl, response=""))
    heads, base = summarize(pd.DataFrame(rows))
    assert (base["accuracy"], base["prob_accuracy"], base["n_items"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3), 3)
    assert base["p_answer"] == pytest.approx(0.5)
    assert base["per_subject"]["S"]["accuracy"] == 1.0 and base["per_subject"]["S"]["prob_accuracy"] == 0.5
    assert base["per_subject"]["T"] == {"accuracy": 0.0, "prob_accuracy": 0.0, "kl": 0.0,
                                        "p_answer": pytest.approx(0.1), "n_items": 1}
    h = heads.set_index(["layer", "head"])
    want = {(0, 1): dict(accuracy=0.0, prob_accuracy=1.0, accuracy_drop=2 / 3, prob_accuracy_drop=-2 / 3,
                         p_answer=0.7, kl=0.5),
            (2, 0): dict(accuracy=1.0, prob_accuracy=0.0, accuracy_drop=-1 / 3, prob_accuracy_drop=1 / 3,
                         p_answer=0.2, kl=0.4)}
    for pair, cols in want.items():
        for col, v in cols.items():
            assert h.loc[pair, col] == pytest.approx(v, abs=1e-12), (pair, col)


def test_bootstrap_intervals_cover_the_true_rate_about_95_percent_of_the_time():
    """The oracle is the truth itself: 400 data sets of 120 items drawn at a known accuracy (and, paired, two models
    at a known difference on the same items); the 95 % intervals must hold the true value in about 95 % of them
    (the percentile bootstrap runs a little under at this n: 90-98 % is accepted, the binomial noise of 400 draws
    alone being ±2 points). Also equal to scipy's percentile bootstrap within Monte Carlo noise."""
    import numpy as np
    from scipy.stats import bootstrap

    from probe.stats import bootstrap_mean, paired_difference

    rng = np.random.default_rng(123)
    p, n, trials = 0.7, 120, 400
    hits = paired_hits = 0
    for t in range(trials):
        x = (rng.random(n) < p).astype(float)
        iv = bootstrap_mean(x, seed=t, key="cover", n_boot=1000)
        hits += iv.lo <= p <= iv.hi
        # paired: model b is a with 10 % of its right answers turned wrong and 5 % of its wrong ones right
        flip = rng.random(n)
        b = np.where(x == 1, (flip >= 0.10).astype(float), (flip < 0.05).astype(float))
        true_diff = p * 0.10 - (1 - p) * 0.05  # E[a − b]
        d = paired_difference(x, b, seed=t, key="cover-pair", n_boot=1000)
        paired_hits += d.lo <= true_diff <= d.hi
    assert 0.90 <= hits / trials <= 0.98, hits / trials
    assert 0.90 <= paired_hits / trials <= 0.98, paired_hits / trials
    x = (rng.random(n) < p).astype(float)
    ours = bootstrap_mean(x, seed=0, key="scipy")
    ref = bootstrap((x,), np.mean, n_resamples=20000, method="percentile", rng=np.random.default_rng(1)).confidence_interval
    assert abs(ours.lo - ref.low) < 0.02 and abs(ours.hi - ref.high) < 0.02


def _bootstrap_one_table(v, seed: int, key: str, n_boot: int = 2000, level: float = 0.95):
    """The bootstrap as it was written before chunking: every resample index drawn at once, n_boot × n."""
    import zlib

    import numpy as np

    idx = np.random.default_rng([seed, zlib.crc32(key.encode())]).integers(0, v.size, size=(n_boot, v.size))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(v[idx].mean(axis=1), [tail, 100 - tail])
    return float(v.mean()), float(lo), float(hi)


@pytest.mark.parametrize("chunk", [None, 1000])  # the shipped chunk, and one that splits small sets too
def test_bootstrap_in_chunks_equals_the_one_table_bootstrap_bit_for_bit(monkeypatch, chunk):
    """Resampling chunk by chunk (bounded memory) draws the very indices of the one n_boot × n table: the same
    intervals to the last bit, for sizes inside one chunk, across several with a ragged last one, and above one
    chunk per resample; a 12k-item set (MMLU-Pro's size) runs in a small fraction of the table's memory."""
    import tracemalloc

    import numpy as np

    from probe import stats

    if chunk:
        monkeypatch.setattr(stats, "CHUNK", chunk, raising=False)
    ns = (1, 2, 7, 50, 1001, 12_000) if chunk is None else (1, 7, 50, 333, 1001, 1500)
    for n in ns:
        v = (np.random.default_rng(n).random(n) < 0.6).astype(float) + np.random.default_rng(n + 1).random(n)
        want = _bootstrap_one_table(v, 3, f"set{n}|accuracy")
        tracemalloc.start()
        iv = stats.bootstrap_mean(v, 3, f"set{n}|accuracy")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (iv.value, iv.lo, iv.hi) == want, n
        a, b = v[::-1].copy(), v
        d = stats.paired_difference(a, b, 3, f"set{n}|diff")
        assert (d.value, d.lo, d.hi) == _bootstrap_one_table(a - b, 3, f"set{n}|diff"), n
        if n == 12_000:  # the one table: 2000 × 12000 int64 indices and as many gathered values, 384 MB
            assert peak < 64 * 2**20, peak


@pytest.mark.parametrize("p", [0.05, 0.95])
def test_reported_intervals_cover_a_rate_near_0_or_1_on_few_items(p):
    """The oracle is the truth: 400 sets of 30 items at a known rate near an edge, where about a fifth of the sets
    come out all alike (0.95^30 = 21 %). The percentile bootstrap alone gives those a zero-width interval that
    misses the rate (it covered 77-78 % in 2,000 sets); the interval the scores report (``reported_interval``:
    exact Clopper-Pearson at 0 % or 100 %) must hold it about 95 % of the time or more (99.4 % measured)."""
    import numpy as np

    from probe.stats import bootstrap_mean, reported_interval

    rng = np.random.default_rng(7)
    n, trials = 30, 400
    raw = reported = 0
    for t in range(trials):
        x = (rng.random(n) < p).astype(float)
        iv = bootstrap_mean(x, seed=t, key="edge", n_boot=500)
        lo, hi = reported_interval(iv.value, iv.lo, iv.hi, n)
        raw += iv.lo <= p <= iv.hi
        reported += lo <= p <= hi
    assert raw / trials < 0.9, raw / trials  # the data tell the two apart: the all-alike sets are many
    assert reported / trials >= 0.93, reported / trials
