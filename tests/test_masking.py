"""Head masking (probe.masking) against independent computations on tiny random models, fp32 (DESIGN §2).

Oracles: zeroing the o_proj weight columns of the head; zeroing the whole o_proj input; causality of the
masked model under eager and sdpa attention (the authors' masking let masked runs attend to future tokens).
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from conftest import FAMILIES, VL_FAMILIES, inputs_for, make_item, text_inputs
from probe.errors import BadInput
from probe.masking import HeadMask, HookDidNotFire, mask_heads

# Several (layer, head) pairs per 4-layer × 4-head tiny model, including the last layer and the last head.
PAIRS = [(0, 0), (1, 2), (2, 1), (3, 3), (3, 0), (0, 3)]


def n_query_heads(loaded) -> int:
    """Query-head count straight from the HF config object (not from probe.lm_config)."""
    return loaded.model.config.get_text_config().num_attention_heads


def decoder_o_proj(loaded, layer: int) -> torch.nn.Linear:
    """The o_proj of LM decoder layer ``layer``, found by walking the HF module tree (not the family table)."""
    found = [m for name, m in loaded.model.named_modules()
             if name.endswith(f"layers.{layer}.self_attn.o_proj") and "visual" not in name
             and "vision" not in name]
    assert len(found) == 1, f"expected one LM o_proj for layer {layer}, found {len(found)}"
    return found[0]


@contextmanager
def zeroed_columns(loaded, heads):
    """Zero the o_proj weight columns [h*d, (h+1)*d) of each (layer, head); restore on exit."""
    saved = {}
    try:
        for layer, head in heads:
            w = decoder_o_proj(loaded, layer).weight
            d = w.shape[1] // n_query_heads(loaded)
            saved.setdefault(layer, w.detach().clone())
            with torch.no_grad():
                w[:, head * d:(head + 1) * d] = 0.0
        yield
    finally:
        with torch.no_grad():
            for layer, w0 in saved.items():
                decoder_o_proj(loaded, layer).weight.copy_(w0)


@contextmanager
def zeroed_o_proj_input(loaded, layer):
    """An independent hook: replace the whole input of o_proj with zeros."""
    handle = decoder_o_proj(loaded, layer).register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),))
    try:
        yield
    finally:
        handle.remove()


def logits(loaded, inputs) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**inputs).logits.float()


def family_inputs(loaded, family, seed=0):
    """Image + text inputs for VL families, text for Qwen2."""
    return inputs_for(loaded, make_item(with_image=family in VL_FAMILIES, seed=seed))


def assert_no_hooks(loaded):
    for layer in range(len(loaded.layers)):
        mod = decoder_o_proj(loaded, layer)
        assert not mod._forward_pre_hooks, f"layer {layer}: pre-hooks left behind"
        assert not mod._forward_hooks, f"layer {layer}: forward hooks left behind"


# --------------------------------------------------------------------------------------------------------
# masking == zeroing o_proj weight columns


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_equals_zeroed_o_proj_columns(load_tiny, family):
    m = load_tiny(family)
    inputs = family_inputs(m, family)
    if family in VL_FAMILIES:
        assert "pixel_values" in inputs, "VL families must be tested with an image input"
    clean = logits(m, inputs)
    worst = 0.0
    for pair in PAIRS:
        with mask_heads(m, [pair]):
            masked = logits(m, inputs)
        with zeroed_columns(m, [pair]):
            oracle = logits(m, inputs)
        diff = (masked - oracle).abs().max().item()
        worst = max(worst, diff)
        assert diff <= 1e-6, f"{family} {pair}: mask vs zeroed columns differ by {diff}"
        # Anti-tautology: the head matters on these inputs, so equality is not "nothing happened".
        assert (masked - clean).abs().max().item() > 1e-4, f"{family} {pair}: masking changed nothing"
    assert torch.equal(logits(m, inputs), clean), "weights or hooks not restored"
    assert_no_hooks(m)


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_head_multi_layer_mask_equals_zeroed_columns(load_tiny, family):
    m = load_tiny(family)
    inputs = family_inputs(m, family, seed=1)
    heads = [(0, 1), (0, 2), (2, 0), (3, 3)]
    with mask_heads(m, heads):
        masked = logits(m, inputs)
    with zeroed_columns(m, heads):
        oracle = logits(m, inputs)
    assert (masked - oracle).abs().max().item() <= 1e-6


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_mask_text_only_prompt_on_vl_family(load_tiny, family):
    """VL families also take text-only items; masking must still be the o_proj column zeroing."""
    m = load_tiny(family)
    inputs = family_inputs(m, "qwen2")
    assert "pixel_values" not in inputs
    with mask_heads(m, [(3, 3)]):
        masked = logits(m, inputs)
    with zeroed_columns(m, [(3, 3)]):
        oracle = logits(m, inputs)
    assert (masked - oracle).abs().max().item() <= 1e-6


def test_masked_generation_equals_zeroed_columns(load_tiny):
    """The sweep reads generate()'s first-step logits: the mask must act at every decoding step too."""
    m = load_tiny("qwen2_vl")
    inputs = family_inputs(m, "qwen2_vl", seed=2)
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=m.tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        with mask_heads(m, [(1, 3)]):
            a = m.model.generate(**inputs, **kw)
        with zeroed_columns(m, [(1, 3)]):
            b = m.model.generate(**inputs, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for step_a, step_b in zip(a.logits, b.logits):
        assert (step_a - step_b).abs().max().item() <= 1e-6


def test_per_row_gates_equal_separate_runs(load_tiny):
    """A [batch, n_heads] gate masks a different head in each batch row (what a batched engine relies on)."""
    m = load_tiny("qwen2")
    one = text_inputs(m)
    batch = {k: v.repeat(3, 1) for k, v in one.items()}
    gate = torch.ones(3, 4)
    gate[0, 1] = 0.0
    gate[1, 3] = 0.0  # row 2 keeps every head
    with HeadMask(m, {2: gate}):
        rows = logits(m, batch)
    for r, pair in ((0, (2, 1)), (1, (2, 3))):
        with zeroed_columns(m, [pair]):
            oracle = logits(m, one)[0]
        assert (rows[r] - oracle).abs().max().item() <= 1e-5, f"row {r}"
    assert (rows[2] - logits(m, one)[0]).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------------------
# all heads of a layer == zeroing the o_proj input == zeroing the o_proj weight


@pytest.mark.parametrize("family", FAMILIES)
def test_all_heads_of_layer_equals_zero_o_proj_input(load_tiny, family):
    m = load_tiny(family)
    inputs = family_inputs(m, family)
    layer = 2
    every = [(layer, h) for h in range(n_query_heads(m))]
    with mask_heads(m, every):
        masked = logits(m, inputs)
    with zeroed_o_proj_input(m, layer):
        zero_in = logits(m, inputs)
    with zeroed_columns(m, every):
        zero_w = logits(m, inputs)
    assert (masked - zero_in).abs().max().item() <= 1e-6
    assert (masked - zero_w).abs().max().item() <= 1e-6
    assert (masked - logits(m, inputs)).abs().max().item() > 1e-4


# --------------------------------------------------------------------------------------------------------
# causality under eager and sdpa


def perturb_after(inputs, t: int, seed: int = 0):
    """Copy of ``inputs`` with every token after position t replaced by random ordinary (non-special) ids."""
    g = torch.Generator().manual_seed(seed)
    ids = inputs["input_ids"].clone()
    n = ids.shape[1] - t - 1
    ids[:, t + 1:] = torch.randint(20, 250, (ids.shape[0], n), generator=g)  # byte-level tokens, no specials
    return dict(inputs, input_ids=ids)


def max_prefix_leak(m, inputs, t):
    """max |Δ logits| at positions ≤ t between the inputs and a copy whose tokens after t changed."""
    a, b = logits(m, inputs), logits(m, perturb_after(inputs, t))
    return (a[:, :t + 1] - b[:, :t + 1]).abs().max().item(), (a[:, t + 1:] - b[:, t + 1:]).abs().max().item()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl"])
def test_masked_model_is_causal(load_tiny, family, attn):
    m = load_tiny(family, attn)
    assert m.model.config.get_text_config()._attn_implementation == attn
    inputs = family_inputs(m, family, seed=3)
    n = inputs["input_ids"].shape[1]
    t = n - 8  # after the image tokens for VL inputs
    masks = {"one head": [(1, 2)], "last head": [(3, 3)],
             "all heads of layer 1": [(1, h) for h in range(n_query_heads(m))]}
    for name, heads in masks.items():
        with mask_heads(m, heads):
            leak, later = max_prefix_leak(m, inputs, t)
        assert leak <= 1e-6, f"{family}/{attn}/{name}: logits at positions ≤ {t} moved by {leak}"
        assert later > 1e-4, f"{family}/{attn}/{name}: the perturbation changed nothing after {t}"
        with mask_heads(m, heads):
            masked = logits(m, inputs)
        clean = logits(m, inputs)
        # anti-tautology: the hook changed the later positions (and everything else)
        assert (masked[:, t + 1:] - clean[:, t + 1:]).abs().max().item() > 1e-4, name


def test_causality_check_detects_a_leaky_mask(load_tiny):
    """The causality check above is not vacuous: a head 'mask' that mixes in future positions fails it."""
    m = load_tiny("qwen2", "sdpa")
    inputs = text_inputs(m)
    t = inputs["input_ids"].shape[1] - 5
    d = m.geometry.head_dim

    def leaky(mod, args):  # replace head 2's output by its mean over the whole sequence (future included)
        x = args[0].clone()
        x[..., 2 * d:3 * d] = x[..., 2 * d:3 * d].mean(dim=1, keepdim=True)
        return (x,)

    handle = decoder_o_proj(m, 1).register_forward_pre_hook(leaky)
    try:
        leak, _ = max_prefix_leak(m, inputs, t)
    finally:
        handle.remove()
    assert leak > 1e-4


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl"])
def test_mask_independent_of_attention_implementation(load_tiny, family):
    eager, sdpa = load_tiny(family, "eager"), load_tiny(family, "sdpa")
    inputs = family_inputs(eager, family, seed=4)
    for heads in ([(0, 1)], [(3, 3)], [(2, h) for h in range(4)]):
        with mask_heads(eager, heads):
            a = logits(eager, inputs)
        with mask_heads(sdpa, heads):
            b = logits(sdpa, inputs)
        assert (a - b).abs().max().item() <= 1e-4, heads


# --------------------------------------------------------------------------------------------------------
# hook lifecycle


def test_hook_did_not_fire_without_forward(load_tiny):
    m = load_tiny("qwen2")
    with pytest.raises(HookDidNotFire):
        with mask_heads(m, [(1, 1)]):
            pass
    assert_no_hooks(m)


def test_hook_did_not_fire_names_the_silent_layer(load_tiny):
    m = load_tiny("qwen2")
    x = torch.randn(1, 3, decoder_o_proj(m, 0).in_features)
    with pytest.raises(HookDidNotFire, match=r"\[3\]"):
        with mask_heads(m, [(0, 1), (3, 2)]):
            with torch.no_grad():
                decoder_o_proj(m, 0)(x)  # only layer 0's o_proj runs
    assert_no_hooks(m)


def test_a_mask_that_never_fired_stops_a_command_with_one_line(load_tiny, capfd):
    """A forward that computed a layer's attention without calling its o_proj module (a fused attention in a later
    release) leaves that layer unmasked: the run stops, as for any run-time check, with exit 1 and one line naming
    the layer, not a traceback."""
    from probe.errors import cli_main

    m = load_tiny("qwen2")

    def command(argv):
        with mask_heads(m, [(2, 1)]):
            pass
        return 0

    assert cli_main(command, []) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["error: head-mask hooks of layers [2] never fired: their o_proj modules did not run, so those "
                   "heads were not masked"], err
    assert_no_hooks(m)


def test_require_fired_false_allows_no_forward(load_tiny):
    m = load_tiny("qwen2")
    with HeadMask(m, {1: torch.ones(4)}, require_fired=False):
        pass
    assert_no_hooks(m)


def test_hooks_removed_after_exception(load_tiny):
    m = load_tiny("qwen2")
    inputs = text_inputs(m)
    clean = logits(m, inputs)
    with pytest.raises(ZeroDivisionError):  # the user's error, not HookDidNotFire
        with mask_heads(m, [(0, 0), (3, 3)]):
            logits(m, inputs)
            1 / 0
    assert_no_hooks(m)
    with pytest.raises(KeyError):  # and with no forward before the error
        with mask_heads(m, [(2, 2)]):
            raise KeyError("x")
    assert_no_hooks(m)
    assert torch.equal(logits(m, inputs), clean)


def test_hooks_removed_after_clean_exit_and_fire_once_per_forward(load_tiny):
    m = load_tiny("qwen2")
    inputs = text_inputs(m)
    with mask_heads(m, [(0, 0), (2, 1)]) as hm:
        logits(m, inputs)
        logits(m, inputs)
    assert hm.fired == {0: 2, 2: 2}
    assert_no_hooks(m)


def test_nested_masks_compose(load_tiny):
    m = load_tiny("qwen2")
    inputs = text_inputs(m)
    with mask_heads(m, [(1, 0)]), mask_heads(m, [(1, 3)]):
        nested = logits(m, inputs)
    with zeroed_columns(m, [(1, 0), (1, 3)]):
        oracle = logits(m, inputs)
    assert (nested - oracle).abs().max().item() <= 1e-6


def test_bad_heads_and_gates_rejected(load_tiny):
    m = load_tiny("qwen2")
    with pytest.raises(BadInput):
        mask_heads(m, [(4, 0)])
    with pytest.raises(BadInput):
        mask_heads(m, [(0, 4)])
    with pytest.raises(BadInput):
        mask_heads(m, [(-1, 0)])
    with pytest.raises(ValueError):
        HeadMask(m, {0: torch.ones(3)})
    with pytest.raises(ValueError):
        HeadMask(m, {0: torch.ones(1, 2, 4)})
    assert_no_hooks(m)


def test_a_layer_past_the_last_is_bad_input_for_head_mask_itself(load_tiny):
    """HeadMask's own layer check (not only zero_gates'): the model's layer count, read off its module tree, is out
    of range; a hand-made gate dict there is refused before any hook is made."""
    m = load_tiny("qwen2")
    n_layers = sum(1 for name, _ in m.model.named_modules() if name.endswith("self_attn.o_proj"))
    with pytest.raises(BadInput, match=f"layer {n_layers} out of range"):
        HeadMask(m, {n_layers: torch.ones(n_query_heads(m))})
    assert_no_hooks(m)


def test_an_enter_that_fails_part_way_leaves_no_hooks(load_tiny, monkeypatch):
    """A failure while registering (here: finding layer 2's o_proj) removes the hooks already made for layers 0
    and 1; __exit__ never runs for a failed __enter__, so nothing else would."""
    m = load_tiny("qwen2")
    real = type(m).o_proj

    def o_proj(self, layer):
        if layer == 2:
            raise RuntimeError("no o_proj")
        return real(self, layer)

    monkeypatch.setattr(type(m), "o_proj", o_proj)
    with pytest.raises(RuntimeError, match="no o_proj"):
        with mask_heads(m, [(0, 0), (1, 1), (2, 2)]):
            pass
    assert_no_hooks(m)
