"""Head masking against two independent interpretability libraries (DESIGN §2, STYLE 9).

- TransformerLens 4.x TransformerBridge: ``blocks.L.attn.hook_z[:, :, h] = 0`` on a tiny Qwen2 text model,
  after checking that the bridge's clean logits (and the residual stream, layer by layer) match HF.
- nnsight 0.8: zero the head's slice of ``...language_model.layers[L].self_attn.o_proj.input`` inside a
  trace, on the tiny Qwen2-VL (and LLaVA-OneVision) with an image input.
Full-sequence logits are compared, fp32, eager attention.
"""
from __future__ import annotations

import pytest
import torch

from conftest import inputs_for, make_item, text_inputs
from probe.masking import mask_heads

PAIRS = [(0, 0), (1, 3), (2, 1), (3, 3)]


@pytest.fixture(scope="module")
def bridge_and_hf(tiny_dirs):
    """A TransformerBridge around its own (separately loaded) HF model, and our LoadedModel of the same dir."""
    tl = pytest.importorskip("transformer_lens.model_bridge", reason="transformer-lens 4.x not installed")
    from probe.models import load_model, resolve_model

    ref = resolve_model(str(tiny_dirs["qwen2"]))
    ours = load_model(ref, dtype="float32", attn_implementation="eager")
    theirs = load_model(ref, dtype="float32", attn_implementation="eager")
    bridge = tl.TransformerBridge.boot_transformers(
        str(ref.path), hf_model=theirs.model, tokenizer=theirs.tokenizer, device="cpu", dtype=torch.float32
    )
    bridge.eval()
    return bridge, ours


def bridge_ids(ours):
    return text_inputs(ours, "Question: Which shape is purple?\nChoices:\nA. circle\nB. square\nC. star\n")[
        "input_ids"]


def test_bridge_clean_matches_hf_layer_by_layer(bridge_and_hf):
    bridge, ours = bridge_and_hf
    assert bridge.model is not ours.model  # independent weights copies: nothing shared by accident
    ids = bridge_ids(ours)
    with torch.no_grad():
        hf_out = ours.model(ids, output_hidden_states=True)
        tl_logits, cache = bridge.run_with_cache(ids)
    n_layers = bridge.cfg.n_layers
    assert n_layers == ours.geometry.n_layers and bridge.cfg.n_heads == ours.geometry.n_heads
    for layer in range(n_layers):  # residual stream entering each block: cancelling errors would show here
        diff = (cache[f"blocks.{layer}.hook_resid_pre"] - hf_out.hidden_states[layer]).abs().max().item()
        assert diff <= 1e-5, f"resid_pre of layer {layer} differs by {diff}"
    diff = (tl_logits - hf_out.logits).abs().max().item()
    assert diff <= 1e-5, f"clean logits differ by {diff}"


@pytest.mark.parametrize("layer,head", PAIRS)
def test_mask_equals_transformer_lens_hook_z(bridge_and_hf, layer, head):
    bridge, ours = bridge_and_hf
    ids = bridge_ids(ours)
    seen = {}

    def zero_head(z, hook):
        seen["shape"] = tuple(z.shape)
        z = z.clone()
        z[:, :, head] = 0.0  # hook_z: [batch, pos, head, d_head]
        return z

    with torch.no_grad():
        tl_masked = bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])
        with mask_heads(ours, [(layer, head)]):
            our_masked = ours.model(ids).logits
        clean = ours.model(ids).logits
    g = ours.geometry
    assert seen["shape"] == (1, ids.shape[1], g.n_heads, g.head_dim), "hook_z did not fire with head axis"
    diff = (our_masked - tl_masked).abs().max().item()
    assert diff <= 1e-5, f"L{layer}H{head}: ours vs TransformerLens differ by {diff}"
    assert (tl_masked - clean).abs().max().item() > 1e-4, "the TL hook changed nothing"


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_mask_equals_nnsight_o_proj_input(load_tiny, family):
    nnsight = pytest.importorskip("nnsight", reason="nnsight not installed")
    m = load_tiny(family, "eager")
    inputs = inputs_for(m, make_item(with_image=True, seed=5))
    assert "pixel_values" in inputs
    wrapped = nnsight.NNsight(m.model)
    d = m.model.config.get_text_config().hidden_size // m.model.config.get_text_config().num_attention_heads
    with torch.no_grad():
        clean = m.model(**inputs).logits
    for heads in ([(0, 0)], [(1, 3)], [(3, 3)], [(2, 0), (2, 2), (3, 1)]):
        with torch.no_grad():
            with wrapped.trace(**inputs):
                for layer, head in heads:
                    x = wrapped.model.language_model.layers[layer].self_attn.o_proj.input
                    x[..., head * d:(head + 1) * d] = 0
                out = wrapped.output.save()
            with mask_heads(m, heads):
                ours = m.model(**inputs).logits
        theirs = out.logits if hasattr(out, "logits") else out[0]
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-5, f"{family} {heads}: ours vs nnsight differ by {diff}"
        assert (theirs - clean).abs().max().item() > 1e-4, f"{family} {heads}: nnsight edit changed nothing"
    with torch.no_grad():  # the nnsight wrapper left the module unchanged
        assert torch.equal(m.model(**inputs).logits, clean)
