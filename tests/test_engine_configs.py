"""The engines on unusual but legal model configs, each a tiny random model built with extra text-config keys.

Oracles: the naive loop (the model's own forward with the head's o_proj input slice zeroed) for the exact engine,
and the model's own forward for the exact engine's LM tail.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import kl_nats, make_item, option_logp


def build_and_load(tmp_path, family: str, text: dict, attn: str = "sdpa"):
    from probe.models import load_model, resolve_model
    from probe.tiny import SPECS, TinySpec, build_tiny

    torch.set_num_threads(1)
    path = build_tiny(family, tmp_path / family, SPECS.get(family, TinySpec(num_hidden_layers=2)), text)
    return load_model(resolve_model(str(path)), dtype="float32", attn_implementation=attn)


def sweep(engine: str, m, items, generate: bool) -> pd.DataFrame:
    from probe.sweep import SweepConfig, get_engine

    g = m.geometry
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    return pd.DataFrame(get_engine(engine)(m, items, heads, SweepConfig(generate=generate, max_new_tokens=3)))


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3"])
def test_exact_engine_soft_caps_logits_as_the_model_does(family, tmp_path):
    """final_logit_softcapping: Gemma3ForCausalLM caps its logits (the multimodal class does not); the exact
    engine's masked rows, which end in norm + LM head, must give the naive loop's numbers either way."""
    m = build_and_load(tmp_path, family, {"final_logit_softcapping": 0.5})
    items = [make_item(with_image=False, item_id="validation_Test_1")]
    naive, exact = sweep("naive", m, items, False), sweep("exact", m, items, False)
    for col in ("kl", "p_answer"):
        np.testing.assert_allclose(exact[col], naive[col], atol=1e-5, rtol=0, err_msg=col)
    assert naive.loc[naive["layer"] >= 0, "kl"].max() > 1e-6  # masking changed something
    if family == "gemma3_text":  # the cap acts: uncapped logits would give other option probabilities
        from probe.prompting import PromptTemplate, build_inputs

        with torch.no_grad():
            out = m.model.model(**build_inputs(m, items[0], PromptTemplate())).last_hidden_state[0, -1]
            capped = m.model(**build_inputs(m, items[0], PromptTemplate())).logits[0, -1]
        assert (m.model.lm_head(out) - capped).abs().max() > 1e-3


def test_exact_engine_refuses_a_model_whose_logits_its_tail_does_not_reproduce(load_tiny):
    """A model class that post-processes its logits in a way the engine's tail does not know is refused at the
    clean pass (UpstreamChanged), never measured without it."""
    from probe.exact import clean_pass
    from probe.prompting import PromptTemplate, build_inputs
    from probe.upstream import UpstreamChanged

    m = load_tiny("qwen2", "sdpa")
    inputs = build_inputs(m, make_item(with_image=False), PromptTemplate())
    clean_pass(m, inputs, keep_cache=False)  # the plain model passes
    m.model.config.final_logit_softcapping = 0.5  # the tail now caps; Qwen2's forward never does
    try:
        with pytest.raises(UpstreamChanged, match="final norm and LM head"):
            clean_pass(m, inputs, keep_cache=False)
    finally:
        del m.model.config.final_logit_softcapping


ROPES = {"dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
         "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                      "long_factor": [4.0] * 8, "original_max_position_embeddings": 80}}


@pytest.mark.parametrize("kind", ROPES)
def test_length_dependent_rope_past_its_limit_is_refused(kind, tmp_path):
    """dynamic / longrope RoPE: past its original context transformers rescales by the longest row of the call
    (dynamic also keeps it for later calls), so one prompt's logits depend on its batch and on what ran before.
    Such an item is bad input in every engine and in batched evaluation; shorter ones are measured as usual."""
    from probe.batch import evaluate_items
    from probe.errors import BadInput
    from probe.prompting import PromptTemplate, build_inputs
    from probe.sweep import SweepConfig

    m = build_and_load(tmp_path, "llama", {"rope_parameters": ROPES[kind], "max_position_embeddings": 80})
    short = make_item(with_image=False, item_id="validation_Test_1")
    long = make_item(with_image=False, item_id="validation_Test_2", question="Which shape is purple? " * 12)
    n_short, n_long = (build_inputs(m, i, PromptTemplate())["input_ids"].shape[1] for i in (short, long))
    assert n_short + 2 <= 80 < n_long  # 3 new tokens: the short item's run stays within the limit
    # what is refused: a prompt within the limit batched with one past it gets other logits than alone
    with torch.no_grad():
        a, b = (build_inputs(m, i, PromptTemplate())["input_ids"] for i in (short, long))
        alone = m.model(a).logits[0, -1]
        pad = torch.full((1, n_long - n_short), m.tokenizer.pad_token_id)
        mask = torch.ones(2, n_long, dtype=torch.long)
        mask[0, :n_long - n_short] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batched = m.model(torch.cat([torch.cat([pad, a], 1), b]), attention_mask=mask,
                          position_ids=positions).logits[0, -1]
        assert (batched - alone).abs().max() > 1e-5
        m.model(a)  # a short call: dynamic RoPE drops its grown frequencies again
    cfg = SweepConfig(generate=True, max_new_tokens=3)
    for engine in ("naive", "exact", "attribution"):
        with pytest.raises(BadInput, match=rf"validation_Test_2: its run spans {n_long + 2} positions.*{kind}"):
            sweep(engine, m, [short, long], True)
    with pytest.raises(BadInput, match="validation_Test_2"):
        evaluate_items(m, [short, long], cfg, batch_size=2)
    naive, exact = sweep("naive", m, [short], True), sweep("exact", m, [short], True)
    np.testing.assert_allclose(exact["p_answer"], naive["p_answer"], atol=1e-5, rtol=0)
    assert (naive["response"] == exact["response"]).all()
    assert m.rope_limit == (kind, 80)


def test_a_run_past_the_models_context_is_refused(tmp_path):
    """Default RoPE has no length-dependent rescaling, so nothing stopped a prompt longer than the model's
    max_position_embeddings: a 6,000-token question on a 1,024-position organism was measured, exit 0. Every
    engine and batched evaluation refuse it now, naming the item and the lengths; shorter ones run as before."""
    from probe.batch import evaluate_items
    from probe.errors import BadInput
    from probe.prompting import PromptTemplate, build_inputs
    from probe.sweep import SweepConfig

    m = build_and_load(tmp_path, "llama", {"max_position_embeddings": 80})
    assert m.rope_limit is None and m.context_length == 80
    short = make_item(with_image=False, item_id="validation_Test_1")
    long = make_item(with_image=False, item_id="validation_Test_2", question="Which shape is purple? " * 12)
    n_short, n_long = (build_inputs(m, i, PromptTemplate())["input_ids"].shape[1] for i in (short, long))
    assert n_short + 2 <= 80 < n_long
    for engine in ("naive", "exact", "attribution"):
        with pytest.raises(BadInput, match=rf"validation_Test_2: its run spans {n_long + 2} positions \({n_long} "
                                           r"prompt \+ 2 generated\), past the 80 positions .* was built for"):
            sweep(engine, m, [short, long], True)
    with pytest.raises(BadInput, match="validation_Test_2: .* past the 80 positions"):
        evaluate_items(m, [short, long], SweepConfig(generate=True, max_new_tokens=3), batch_size=2)
    assert len(sweep("exact", m, [short], True)) > 0


def test_tiny_dir_never_caches_a_build_without_weights_and_rebuilds_an_incomplete_one(tmp_path, monkeypatch):
    """transformers' save_pretrained writes nothing on a process that is not rank 0 of a launch (its process group
    up): a tiny build there left a cache dir of tokenizer files only, which tiny_dir returned ever after (found under
    torchrun). Such a build now raises and caches nothing, and a cached dir without config.json is built again."""
    import probe.tiny as tiny

    monkeypatch.setenv("OMNIPROBE_CACHE", str(tmp_path))
    real = tiny.build_tiny

    def tokenizer_only(family, out_dir):  # what a rank other than 0 wrote
        (out_dir / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(tiny, "build_tiny", tokenizer_only)
    with pytest.raises(RuntimeError, match="wrote no config or weights"):
        tiny.tiny_dir("qwen2")
    assert not (tmp_path / "tiny" / "qwen2").exists() and list((tmp_path / "tiny").iterdir()) == []
    (tmp_path / "tiny" / "qwen2").mkdir()  # an incomplete dir, as the old code left
    (tmp_path / "tiny" / "qwen2" / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(tiny, "build_tiny", real)
    built = tiny.tiny_dir("qwen2")
    assert (built / "config.json").is_file() and any(built.glob("*.safetensors"))



# Head layouts of the families table that no other engine test builds (Llama, the Qwen2-Audio text side) and a
# window on a family other than Gemma 3 (Qwen2's use_sliding_window: layer 0 full, 1-2 sliding, window 6 shorter
# than the prompt), each with 3 layers so a head of the first, a middle and the last layer is masked.
GAPS = {"llama": ("llama", {}), "qwen2_audio": ("qwen2_audio", {}),
        "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1})}


def test_a_tiny_model_cached_by_other_builder_code_is_built_again(tmp_path, monkeypatch):
    """The cache (OMNIPROBE_CACHE/tiny/<family>) was keyed by the family alone: a model that an earlier version of
    the builders wrote there (another geometry, tokenizer or initialisation) was returned for good, and every
    command on tiny-<family> ran it silently. A cached dir now carries the key of the code and libraries that built
    it and is built again under any other. Oracle: a fresh build_tiny of the same family; the same code reuses its
    dir untouched."""
    import shutil

    import probe.tiny as tiny

    monkeypatch.setenv("OMNIPROBE_CACHE", str(tmp_path / "cache"))
    fresh = (tiny.build_tiny("qwen2", tmp_path / "fresh") / "model.safetensors").read_bytes()
    target = tiny.tiny_dir("qwen2")
    assert (target / "model.safetensors").read_bytes() == fresh
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert tiny.tiny_dir("qwen2") == target and (target / "model.safetensors").stat().st_mtime_ns == mtime
    shutil.rmtree(target)  # what an earlier version cached: other weights, and no key
    shutil.copytree(tiny.build_tiny("qwen2", tmp_path / "old", tiny.TinySpec(seed=5)), target)
    assert (target / "model.safetensors").read_bytes() != fresh
    assert tiny.tiny_dir("qwen2") == target and (target / "model.safetensors").read_bytes() == fresh
    assert [p.name for p in target.parent.iterdir()] == ["qwen2"]  # no build dir left beside it


@pytest.mark.parametrize("case", GAPS)
def test_exact_and_naive_equal_zeroed_o_proj_columns_in_the_first_middle_and_last_layer(case, tmp_path):
    """Oracle: the unmodified model with the head's o_proj input columns zeroed in its weight. The naive loop's
    p(answer) and KL are the zeroed model's (fp32, 1e-5), and the exact engine gives the naive loop's rows (1e-5, same
    texts), with generation at 3 rows a batch (4 heads a layer: one-row batches too) and without it at 5 rows a batch
    (batches across layers)."""
    from probe.prompting import PromptTemplate, build_inputs, letter_token_ids
    from probe.sweep import SweepConfig, get_engine

    family, text = GAPS[case]
    m = build_and_load(tmp_path, family, text | {"num_hidden_layers": 3})
    g = m.geometry
    item = make_item(n_options=5, answer="E", with_image=False, item_id="validation_Test_5")
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    frames = {}
    for generate, batch in ((True, 3), (False, 5)):
        cfg = SweepConfig(generate=generate, batch_size=batch, max_new_tokens=3)
        n, e = frames[generate] = [pd.DataFrame(get_engine(k)(m, [item], heads, cfg)) for k in ("naive", "exact")]
        for col in ("layer", "head", "pred", "prob_pred", "response"):
            assert (n[col] == e[col]).all(), (generate, col)
        for col in ("kl", "p_answer"):
            np.testing.assert_allclose(e[col], n[col], atol=1e-5, rtol=0, err_msg=f"{col}, generate={generate}")
    naive = frames[True][0].set_index(["layer", "head"])
    assert naive["kl"].max() > 1e-5  # masking moved the options
    inputs = build_inputs(m, item, PromptTemplate())
    ids = letter_token_ids(m.tokenizer, item.letters)
    with torch.no_grad():
        base = option_logp(m.model(**inputs).logits[0, -1], ids)
        for layer, head in [(0, 1), (1, g.n_heads - 1), (2, 0)]:
            w = m.o_proj(layer).weight
            saved = w.detach().clone()
            try:
                w[:, head * g.head_dim:(head + 1) * g.head_dim] = 0
                zeroed = option_logp(m.model(**inputs).logits[0, -1], ids)
            finally:
                w.copy_(saved)
            assert naive.loc[(layer, head), "p_answer"] == pytest.approx(float(zeroed[-1].exp()), abs=1e-5)
            assert naive.loc[(layer, head), "kl"] == pytest.approx(kl_nats(base, zeroed), abs=1e-5)
        if "sliding_window" in text:  # the window acts on this prompt: without it the logits differ
            m.model.config.sliding_window = 10_000
            wide = option_logp(m.model(**inputs).logits[0, -1], ids)
            assert (wide - base).abs().max() > 1e-4


def test_o_proj_bias_tied_embeddings_one_kv_head_and_one_layer(tmp_path):
    """A one-layer Llama with biases on its attention projections (o_proj's included), its LM head tied to the
    embedding and one KV head for its 4 query heads (MQA), attention weights scaled up and biases drawn so that a
    head moves the options (KL ~1e-3, the texts change). Removing a head keeps o_proj's bias (as zeroing its weight
    columns, and TransformerLens' hook_z, do): with every head removed o_proj gives its bias alone. Heads out of order
    and repeated: the exact engine's rows are the naive loop's, in its order, and each is the model's with the
    head's o_proj input columns zeroed in the weight (1e-6)."""
    from probe.masking import mask_heads
    from probe.prompting import PromptTemplate, build_inputs, letter_token_ids
    from probe.sweep import SweepConfig, get_engine

    m = build_and_load(tmp_path, "llama", {"attention_bias": True, "tie_word_embeddings": True,
                                           "num_hidden_layers": 1, "num_key_value_heads": 1})
    g = m.geometry
    assert (g.n_layers, g.n_heads, g.n_kv_heads) == (1, 4, 1)
    assert m.model.get_output_embeddings().weight is m.model.get_input_embeddings().weight
    attn, o_proj = m.layers[0].self_attn, m.o_proj(0)
    draw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, o_proj):
            proj.weight.mul_(8)
            proj.bias.copy_(0.5 * torch.randn(proj.bias.shape, generator=draw))
    item = make_item(n_options=5, answer="E", with_image=False, item_id="validation_Test_5")
    inputs = build_inputs(m, item, PromptTemplate())
    seen = []
    handle = o_proj.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        with torch.no_grad(), mask_heads(m, [(0, h) for h in range(g.n_heads)]):
            m.model(**inputs)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], o_proj.bias.expand_as(seen[0]), rtol=0, atol=0)
    heads = [(0, 3), (0, 1), (0, 1), (0, 0), (0, 2)]
    for generate, batch in ((True, 2), (False, 5)):
        cfg = SweepConfig(generate=generate, batch_size=batch, max_new_tokens=3)
        naive, exact = (pd.DataFrame(get_engine(k)(m, [item], heads, cfg)) for k in ("naive", "exact"))
        assert list(zip(exact["layer"], exact["head"])) == [(-1, -1), *heads]
        for col in ("layer", "head", "pred", "prob_pred", "response"):
            assert (naive[col] == exact[col]).all(), (generate, col)
        for col in ("kl", "p_answer"):
            np.testing.assert_allclose(exact[col], naive[col], atol=1e-6, rtol=0, err_msg=f"{col}, {generate}")
    assert naive["kl"].max() > 1e-4  # a head moves the options: far above the tolerance
    ids = letter_token_ids(m.tokenizer, item.letters)
    w, d = o_proj.weight, g.head_dim
    with torch.no_grad():
        base = option_logp(m.model(**inputs).logits[0, -1], ids)
        for row in naive[naive["layer"] >= 0].itertuples():
            saved = w.detach().clone()
            try:
                w[:, row.head * d:(row.head + 1) * d] = 0
                zeroed = option_logp(m.model(**inputs).logits[0, -1], ids)
            finally:
                w.copy_(saved)
            assert row.p_answer == pytest.approx(float(zeroed[-1].exp()), abs=1e-6), row.head
            assert row.kl == pytest.approx(kl_nats(base, zeroed), abs=1e-6), row.head
