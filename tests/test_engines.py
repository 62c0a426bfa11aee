"""The exact and attribution engines against the naive loop (the oracle kept in probe.sweep) — DESIGN §4."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FAMILIES, gate_slope, inputs_for, kl_nats, make_item, option_logp

NUMERIC = ("kl", "p_answer", "prob_correct", "correct")
EXACT_TEXT = ("item_id", "layer", "head", "pred", "prob_pred", "response")


def _items(family: str, data_dir):
    from probe.mmmu import load_items

    items = load_items(str(data_dir), limit=3)[0]
    if family == "qwen2":  # text model: same questions, no images
        items = [dataclasses.replace(i, images=(), question=i.question.replace("<image", "(image")) for i in items]
    # one item with five options, so a letter beyond D takes part
    items.append(make_item(n_options=5, answer="E", with_image=family != "qwen2", item_id="validation_Test_9"))
    return items


def _frame(engine: str, loaded, items, heads, generate: bool, batch_size: int = 3) -> pd.DataFrame:
    from probe.sweep import SweepConfig, get_engine

    cfg = SweepConfig(generate=generate, batch_size=batch_size, max_new_tokens=4)
    return pd.DataFrame(get_engine(engine)(loaded, items, heads, cfg))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_exact_equals_naive_items_and_heads(family, attn, load_tiny, data_dir):
    """items.parquet and heads.csv of the exact engine equal the naive loop's, every metric, to 1e-5."""
    from probe.results import summarize

    loaded = load_tiny(family, attn)
    g = loaded.geometry
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    items = _items(family, data_dir)
    naive = _frame("naive", loaded, items, heads, generate=True)
    exact = _frame("exact", loaded, items, heads, generate=True)
    assert len(exact) == len(items) * (len(heads) + 1)
    for col in EXACT_TEXT:
        assert (naive[col] == exact[col]).all(), col
    for col in NUMERIC:
        np.testing.assert_allclose(exact[col], naive[col], atol=1e-5, rtol=0, err_msg=col)
    hn, bn = summarize(naive)
    he, be = summarize(exact)
    pd.testing.assert_frame_equal(hn, he, check_exact=False, atol=1e-5, rtol=0)
    assert bn["n_items"] == be["n_items"] == len(items)
    # anti-tautology: masking did change something, so equality above is not trivially 0 == 0
    assert exact.loc[exact["layer"] >= 0, "kl"].max() > 1e-6


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_exact_without_generation_and_partial_selection(family, load_tiny, data_dir):
    """Prob-accuracy/KL-only mode, a subset of layers and heads, and batch sizes that split a layer."""
    loaded = load_tiny(family, "sdpa")
    items = _items(family, data_dir)[:2]
    heads = [(3, 0), (3, 3), (1, 2), (0, 1), (0, 0)]
    naive = _frame("naive", loaded, items, heads, generate=False)
    for bs in (1, 2, 8):
        exact = _frame("exact", loaded, items, heads, generate=False, batch_size=bs)
        assert list(zip(exact["layer"], exact["head"])) == list(zip(naive["layer"], naive["head"]))
        np.testing.assert_allclose(exact["kl"], naive["kl"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(exact["p_answer"], naive["p_answer"], atol=1e-5, rtol=0)
        assert exact["correct"].isna().all()  # no generation, no accuracy


def test_attribution_jacobian_matches_finite_differences(load_tiny):
    """dz/dgate from the batched backward equals a central finite difference of the gate (fp64 oracle)."""
    from probe.attribution import option_logit_jacobian
    from probe.prompting import letter_token_ids

    loaded = load_tiny("qwen2_vl", "eager")
    item = make_item(n_options=4)
    inputs = inputs_for(loaded, item)
    ids = letter_token_ids(loaded.tokenizer, item.letters)
    z, jac = option_logit_jacobian(loaded, inputs, ids)
    assert jac.shape == (len(ids), loaded.geometry.n_layers, loaded.geometry.n_heads)
    eps = 1e-2
    for layer, head in [(0, 0), (2, 3), (3, 1)]:
        fd = gate_slope(loaded, inputs, ids, layer, head, eps)
        np.testing.assert_allclose(jac[:, layer, head].double(), fd, atol=2e-4, rtol=1e-2)
    with torch.no_grad():
        clean = loaded.model(**inputs).logits[0, -1, ids]
    np.testing.assert_allclose(z, clean, atol=1e-5)


def test_attribution_under_flash_attention_runs_one_backward_per_letter(load_tiny, monkeypatch):
    """flash-attn's backward cannot run under the batched backward (vmap): for flash_attention_2 the Jacobian comes
    from one backward per option letter, the batched backward's numbers (here sdpa runs under that name: the loop
    is what is tested; flash-attn itself needs a GPU)."""
    import dataclasses

    from probe.attribution import option_logit_jacobian
    from probe.prompting import letter_token_ids

    loaded = load_tiny("qwen2_vl", "sdpa")
    item = make_item(n_options=4)
    inputs = inputs_for(loaded, item)
    ids = letter_token_ids(loaded.tokenizer, item.letters)
    batched = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **kw: batched.append(kw.get("is_grads_batched", False))
                        or real(*a, **kw))
    z, jac = option_logit_jacobian(loaded, inputs, ids)
    z2, jac2 = option_logit_jacobian(dataclasses.replace(loaded, attn_implementation="flash_attention_2"), inputs, ids)
    assert batched == [True] + [False] * len(ids)
    torch.testing.assert_close(z2, z, rtol=0, atol=0)
    torch.testing.assert_close(jac2, jac, rtol=1e-6, atol=1e-7)
    assert float(jac.abs().max()) > 1e-4


def assert_batched_attribution_equals_one_item(loaded, items, heads) -> None:
    """Several right-padded items per forward + backward (a GPU's choice) give the one-item numbers (fp32, 1e-5), and
    the batch did pad: items of different lengths shared a pass."""
    from probe.batch import plan_batches
    from probe.sweep import SweepConfig, get_engine, prepare_item

    one, many = (pd.DataFrame(get_engine("attribution")(loaded, items, heads, SweepConfig(
        generate=False, attribution_items=n))) for n in (1, len(items)))
    assert list(zip(one["item_id"], one["layer"], one["head"])) == list(zip(many["item_id"], many["layer"],
                                                                            many["head"]))
    for col in ("kl", "p_answer", "prob_correct"):
        np.testing.assert_allclose(many[col], one[col], atol=1e-5, rtol=0, err_msg=col)
    assert (one["pred"] == many["pred"]).all()
    cfg = SweepConfig(generate=False)
    inputs = [prepare_item(loaded, it, cfg)[0] for it in items]
    assert any(len({inputs[i]["input_ids"].shape[1] for i in b}) > 1 for b in plan_batches(inputs, len(items), None))
    assert one.loc[one["layer"] >= 0, "kl"].max() > 1e-6  # the gates did move the estimates


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_batched_over_items_equals_one_at_a_time(family, load_tiny, data_dir):
    loaded = load_tiny(family, "sdpa")
    g = loaded.geometry
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    assert_batched_attribution_equals_one_item(loaded, _items(family, data_dir), heads)


def test_attribution_rows_and_baseline(load_tiny, data_dir):
    """Same table layout as the exact engine; baseline identical; masked rows are estimates (KL ≥ 0)."""
    loaded = load_tiny("llava_onevision", "sdpa")
    items = _items("llava_onevision", data_dir)[:2]
    g = loaded.geometry
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    attr = _frame("attribution", loaded, items, heads, generate=False)
    exact = _frame("exact", loaded, items, heads, generate=False)
    assert list(attr.columns) == list(exact.columns)
    assert list(zip(attr["item_id"], attr["layer"], attr["head"])) == list(
        zip(exact["item_id"], exact["layer"], exact["head"]))
    base_a, base_e = attr[attr["layer"] < 0], exact[exact["layer"] < 0]
    np.testing.assert_allclose(base_a["p_answer"], base_e["p_answer"], atol=1e-5)
    assert (attr["kl"] >= 0).all() and attr["correct"].isna().all()


@pytest.mark.parametrize("generate", [True, False])
def test_every_engine_with_no_heads_gives_the_baseline_rows_alone(load_tiny, generate):
    """An empty selection: the naive loop (the oracle) gives each item's baseline row and nothing else; the exact
    engine without generation ran one empty batch of masked rows and stopped on an IndexError."""
    loaded = load_tiny("qwen2", "sdpa")
    items = [make_item(with_image=False), make_item(n_options=3, answer="C", with_image=False,
                                                    item_id="validation_Test_2")]
    naive = _frame("naive", loaded, items, [], generate=generate)
    assert list(naive["layer"]) == [-1, -1]
    for engine in ("exact", "attribution"):
        got = _frame(engine, loaded, items, [], generate=generate)
        assert list(got["item_id"]) == list(naive["item_id"]) and list(got["layer"]) == list(naive["layer"]), engine
        np.testing.assert_allclose(got["p_answer"], naive["p_answer"], atol=1e-5, rtol=0, err_msg=engine)


# --------------------------------------------------------------------------------------------------------
# The engines on trained organisms: removing one head of organism-vl moves its answer by up to KL ≈ 6 nats and flips
# it, where the random tiny models above move theirs by 1e-3 at most, so a 1e-5 tolerance there leaves little room
# for a wrong row to hide; here the same tolerance is 1e-5 of an effect of order 1.


@pytest.fixture(scope="module")
def organism() -> Callable:
    """``organism(alias)`` → (LoadedModel in fp32, eager attention, the first items of its bundled validation set)."""
    from probe.heads import default_data_for
    from probe.mmmu import load_items
    from probe.models import load_model, resolve_model

    torch.set_num_threads(1)
    cache: dict = {}

    def load(alias: str):
        if alias not in cache:
            cache[alias] = (load_model(resolve_model(alias), dtype="float32", attn_implementation="eager"),
                            load_items(str(default_data_for(alias)), limit=3)[0])
        return cache[alias]

    return load


@pytest.mark.parametrize("alias", ["organism-vl", "organism-video"])
def test_exact_equals_naive_and_zeroed_columns_on_a_trained_organism(organism, alias):
    """Image and video items (the vision tower run once per item by the exact engine, per head by the naive loop),
    heads given deepest first with one repeated, generation at 5 rows a batch (batches that split layers): every row
    the naive loop's, in its order, to 1e-5; the head that moves the answer most is the one whose o_proj input
    columns, zeroed in the weight, give that row's numbers."""
    from probe.sweep import SweepConfig, prepare_item

    m, items = organism(alias)
    g = m.geometry
    items = items[1:2]  # one item whose answer several heads flip
    heads = [(layer, h) for layer in reversed(range(g.n_layers)) for h in reversed(range(g.n_heads))] + [(0, 3)]
    naive = _frame("naive", m, items, heads, generate=True, batch_size=5)
    exact = _frame("exact", m, items, heads, generate=True, batch_size=5)
    for col in EXACT_TEXT:
        assert (naive[col] == exact[col]).all(), col
    for col in NUMERIC:
        np.testing.assert_allclose(exact[col], naive[col], atol=1e-5, rtol=0, err_msg=col)
    masked = naive[naive["layer"] >= 0]
    base = naive[naive["layer"] < 0].set_index("item_id")
    assert masked["kl"].max() > 1.0  # heads that matter: the tolerance is 1e-5 of an effect of order 1
    assert (masked["prob_pred"] != base.loc[masked["item_id"], "prob_pred"].to_numpy()).any()  # answers flip
    top = masked.loc[masked["kl"].idxmax()]
    item = next(it for it in items if it.id == top["item_id"])
    inputs, ids = prepare_item(m, item, SweepConfig(generate=False))
    layer, h, d = int(top["layer"]), int(top["head"]), g.head_dim
    w = m.o_proj(layer).weight
    saved = w.detach().clone()
    with torch.no_grad():
        clean = option_logp(m.model(**inputs).logits[0, -1], ids)
        try:
            w[:, h * d:(h + 1) * d] = 0
            zeroed = option_logp(m.model(**inputs).logits[0, -1], ids)
        finally:
            w.copy_(saved)
    assert top["kl"] == pytest.approx(kl_nats(clean, zeroed), abs=1e-5)
    assert top["p_answer"] == pytest.approx(float(zeroed[item.letters.index(item.answer)].exp()), abs=1e-5)


def test_attribution_on_a_trained_organism_is_the_first_order_step_and_ranks_like_exact(organism):
    """The attribution engine's masked rows are the option logits moved by minus their slope in the head's gate
    (gate 1 → 0): the slope from a central finite difference of plain gated forwards (conftest.gate_slope), on the
    heads of largest exact KL, where the slopes are of order 1 (a sign error or another head's slope is off by about
    as much); its KL ranks the heads as the exact engine's does; items of different lengths in one pass give the
    one-item rows."""
    from scipy.stats import spearmanr

    from probe.sweep import SweepConfig, get_engine, prepare_item

    m, items = organism("organism-vl")
    g = m.geometry
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    exact = _frame("exact", m, items, heads, generate=False)
    attr = _frame("attribution", m, items, heads, generate=False)
    assert list(zip(attr["item_id"], attr["layer"], attr["head"])) == list(
        zip(exact["item_id"], exact["layer"], exact["head"]))
    rows = attr["layer"] >= 0
    assert spearmanr(attr.loc[rows, "kl"], exact.loc[rows, "kl"]).statistic > 0.8
    # the items right-padded into one forward + backward (73 and 75 tokens, M-RoPE over an image) give the same rows
    lengths = {prepare_item(m, it, SweepConfig(generate=False))[0]["input_ids"].shape[1] for it in items}
    together = pd.DataFrame(get_engine("attribution")(m, items, heads, SweepConfig(generate=False,
                                                                                   attribution_items=len(items))))
    assert len(lengths) > 1 and (together["prob_pred"] == attr["prob_pred"]).all()
    for col in ("kl", "p_answer"):  # measured: 6e-6 at most, on KLs of order 1
        np.testing.assert_allclose(together[col], attr[col], atol=1e-5, rtol=1e-4, err_msg=col)
    item = items[1]
    inputs, ids = prepare_item(m, item, SweepConfig(generate=False))
    with torch.no_grad():
        z0 = m.model(**inputs).logits[0, -1, ids].double()
    on_item = exact[(exact["item_id"] == item.id) & rows]
    strongest = on_item.sort_values("kl").tail(3)
    idx = item.letters.index(item.answer)
    for layer, h in zip(strongest["layer"], strongest["head"]):
        slope = gate_slope(m, inputs, ids, layer, h, eps=2e-3)
        assert float(slope.abs().max()) > 0.5  # a slope of order 1
        want = torch.log_softmax((z0 - slope).float(), -1)
        got = attr[(attr["item_id"] == item.id) & (attr["layer"] == layer) & (attr["head"] == h)].iloc[0]
        assert got["p_answer"] == pytest.approx(float(want[idx].exp()), abs=2e-3), (layer, h)
        assert got["kl"] == pytest.approx(kl_nats(torch.log_softmax(z0.float(), -1), want), rel=1e-2, abs=1e-4)
