"""probe/upstream.py: the transformers internals the exact engine calls, checked one by one on every family.

These fail with a message naming the API and probe/upstream.py (never a shape error deep inside transformers)
when a release changes what the engine relies on; the run-time guard of the exact engine is tested here too.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from conftest import FAMILIES, inputs_for, make_item, text_inputs


def _inputs(loaded, family):
    return text_inputs(loaded) if family == "qwen2" else inputs_for(loaded, make_item())


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_keyword_is_known_for_layers_and_models(family, load_tiny):
    from probe.upstream import CACHE_KWARGS, cache_kwarg

    loaded = load_tiny(family)
    assert cache_kwarg(loaded.layers[0].forward) in CACHE_KWARGS
    assert cache_kwarg(loaded.model.forward) in CACHE_KWARGS


def test_unknown_cache_keyword_fails_loudly():
    from probe.upstream import UpstreamChanged, cache_kwarg

    def forward(hidden_states, kv_store=None, **kwargs):  # a future rename
        return hidden_states

    with pytest.raises(UpstreamChanged, match=r"none of the cache keywords.*probe/upstream.py"):
        cache_kwarg(forward)


def test_a_cache_under_a_new_name_is_never_reused():
    """The 5.24 failure: the clean pass's cache arrived under a keyword the engine did not strip."""
    from transformers import DynamicCache

    from probe.upstream import UpstreamChanged, record_layer_call

    hidden = torch.zeros(1, 3, 8)
    call = record_layer_call((hidden,), {"past_key_values": DynamicCache(), "cache": DynamicCache(),
                                         "use_cache": True, "position_ids": torch.arange(3)})
    assert set(call.kwargs) == {"position_ids"}  # every known cache name and use_cache dropped
    with pytest.raises(UpstreamChanged, match=r"KV cache under \['kv_store'\]"):
        record_layer_call((hidden,), {"kv_store": DynamicCache()})
    with pytest.raises(UpstreamChanged, match="KV cache under"):  # nested in a container
        record_layer_call((hidden,), {"extras": {"kv": DynamicCache()}})


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_called_directly_reproduce_the_clean_pass(family, load_tiny):
    """Layer by layer: each recorded call, replayed through upstream.call_layer, gives the next layer's input
    exactly — with no cache, and with an engine-built cache that then holds exactly the prompt."""
    from probe.exact import clean_pass
    from probe.upstream import call_layer, check_cache, prefix_cache

    loaded = load_tiny(family)
    clean = clean_pass(loaded, _inputs(loaded, family), keep_cache=True)
    n = loaded.geometry.n_layers
    for i in range(n - 1):
        out = call_layer(loaded.layers[i], clean.calls[i].hidden, clean.calls[i], None)
        torch.testing.assert_close(out, clean.calls[i + 1].hidden, rtol=0, atol=1e-6)
    upto = n // 2
    cache = prefix_cache(clean.cache, upto, batch=2)
    check_cache(cache, range(upto), batch=2, length=clean.length)
    h = clean.calls[upto].hidden.expand(2, -1, -1)
    for i in range(upto, n):
        h = call_layer(loaded.layers[i], h, clean.calls[i], cache)
    check_cache(cache, range(n), batch=2, length=clean.length)


def test_check_cache_names_the_wrong_layer(load_tiny):
    from probe.exact import clean_pass
    from probe.upstream import UpstreamChanged, check_cache, prefix_cache

    loaded = load_tiny("qwen2")
    clean = clean_pass(loaded, text_inputs(loaded), keep_cache=True)
    cache = prefix_cache(clean.cache, 1, batch=1)
    with pytest.raises(UpstreamChanged, match="layer 0 holds"):
        check_cache(cache, [0], batch=1, length=clean.length + 1)
    with pytest.raises(UpstreamChanged, match=r"no longer exposes \.layers\[1\]"):
        check_cache(cache, [1], batch=1, length=clean.length)


@pytest.mark.parametrize("generate", [True, False])
def test_exact_engine_stops_when_it_disagrees_with_the_oracle(generate, load_tiny, monkeypatch):
    """The run-time guard: a corrupted engine (here a shifted logit) raises instead of writing wrong numbers."""
    import probe.exact as exact
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2")
    item = dataclasses.replace(make_item(with_image=False), id="validation_Test_guard")
    heads = [(0, 0), (1, 1)]
    cfg = SweepConfig(generate=generate, batch_size=2, max_new_tokens=2)
    assert len(exact.exact_sweep(loaded, [item], heads, cfg)) == 3  # the guard passes on a sound engine
    real = exact.run_rows

    def corrupted(*args, **kwargs):
        logits = real(*args, **kwargs)
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
        return logits + 10 * noise  # far from the oracle

    monkeypatch.setattr(exact, "run_rows", corrupted)
    with pytest.raises(exact.EngineDisagrees, match=r"item validation_Test_guard, head L1\.H1"):
        exact.exact_sweep(loaded, [item], heads, cfg)


def test_untested_release_warns(monkeypatch):
    import transformers

    from probe.upstream import TESTED_TRANSFORMERS, untested_warning

    monkeypatch.setattr(transformers, "__version__", TESTED_TRANSFORMERS[-1])
    assert untested_warning() is None
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    assert "transformers 5.99.0 is not one of the releases" in untested_warning()


def test_models_load_without_hub_kernels(tiny_dirs, monkeypatch):
    """transformers 5.25 kernelizes by default (hub kernels swap the forwards the engines hook): every load asks for
    the plain modules, and a release that ignored the request would be refused, never measured."""
    import transformers

    from probe import models
    from probe.upstream import UpstreamChanged

    ref = models.resolve_model(str(tiny_dirs["qwen2"]))
    seen: list = []
    real = transformers.Qwen2ForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("use_kernels"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.Qwen2ForCausalLM, "from_pretrained", classmethod(spy))
    loaded = models.load_model(ref)
    models.preflight(ref)
    assert seen == [False, False] and not getattr(loaded.model, "use_kernels", False)

    def ignores_it(cls, *args, **kwargs):
        model, info = real(cls, *args, **kwargs)
        model._use_kernels = True  # what a release that kernelized anyway would leave behind
        return model, info

    monkeypatch.setattr(transformers.Qwen2ForCausalLM, "from_pretrained", classmethod(ignores_it))
    with pytest.raises(UpstreamChanged, match=r"left hub kernels on.*probe/upstream.py"):
        models.load_model(ref)


def _mixed_items():
    """An image item, then a text item: M-RoPE's state (rope_deltas) from the first must not reach the second."""
    return [dataclasses.replace(make_item(with_image=True), id="validation_Test_image"),
            dataclasses.replace(make_item(with_image=False, seed=1), id="validation_Test_text")]


def test_exact_decoding_runs_at_the_positions_generate_uses(load_tiny, monkeypatch):
    """The exact engine decodes by hand (a cache and the new token, no positions): with Qwen2-VL's M-RoPE the model
    adds ``rope_deltas`` kept from the prompt's forward. A release that stops keeping it, or keeps it under a name
    ``reset_position_state`` does not know (so an image item's offset reaches the next text item), decoded at wrong
    positions: 11-33 of 132 organism-vl responses differed, exit 0, the guard item (the first) unaffected. Every
    decoding step must now run at the prompt's last position + its step."""
    import probe.exact as exact
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mq

    from probe.sweep import SweepConfig
    from probe.upstream import UpstreamChanged

    loaded = load_tiny("qwen2_vl")
    heads = [(0, 0), (1, 1)]
    cfg = SweepConfig(generate=True, batch_size=2, max_new_tokens=3)
    items = _mixed_items()
    sound = exact.exact_sweep(loaded, items, heads, cfg)
    assert sound == exact.exact_sweep(loaded, items, heads, cfg)  # the guard passes, and changes nothing

    with monkeypatch.context() as m:  # the state is kept under a new name: resetting it does nothing
        m.setattr(exact, "reset_position_state", lambda model: None)
        with pytest.raises(UpstreamChanged, match=r"decoded token 1 ran at RoPE position .*probe/upstream.py"):
            exact.exact_sweep(loaded, items, heads, cfg)
    exact.reset_position_state(loaded.model)

    real = mq.Qwen2VLModel.compute_3d_position_ids

    def not_kept(self, *args, **kwargs):  # the forward no longer keeps rope_deltas for later steps
        before = self.rope_deltas
        out = real(self, *args, **kwargs)
        self.rope_deltas = before
        return out

    with monkeypatch.context() as m:
        m.setattr(mq.Qwen2VLModel, "compute_3d_position_ids", not_kept)
        with pytest.raises(UpstreamChanged, match="not the prompt's last position"):
            exact.exact_sweep(loaded, items[::-1], heads, cfg)  # text first: the naive guard item is unaffected
    exact.reset_position_state(loaded.model)


def test_decode_position_check_needs_the_rotary_module(load_tiny):
    from probe.upstream import PositionWatch, UpstreamChanged

    loaded = load_tiny("qwen2")
    assert PositionWatch(loaded.model, loaded.family.layers_path).modules == [loaded.model.model.rotary_emb]
    with pytest.raises(UpstreamChanged, match="no rotary embedding module beside"):
        PositionWatch(loaded.model, "model.layers.0.self_attn.layers")  # a parent without one


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
@pytest.mark.parametrize("change", ["list", "renamed"])
def test_processor_outputs_the_model_would_not_read_stop_the_run(family, change, load_tiny, monkeypatch):
    """build_inputs used to drop what was not a tensor, and the forward's **kwargs swallow a key it does not name:
    pixel values returned as a list, or under a name the model no longer takes, ran the model without its images
    (organism-vl and organism-ov-si: every number changed, exit 0)."""
    import transformers

    from probe.upstream import UpstreamChanged

    loaded = load_tiny(family)
    item = make_item(with_image=True)
    inputs_for(loaded, item)  # the unchanged processor passes
    cls = getattr(transformers, loaded.family.processor_class)
    real = cls.__call__

    def changed(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        pixels = out.pop("pixel_values")
        if change == "list":
            out["pixel_values"] = list(pixels)
        else:
            out["images_pixel_values"] = pixels
        return out

    monkeypatch.setattr(cls, "__call__", changed)
    match = (r"pixel_values \(list\), not tensors" if change == "list"
             else "takes no parameter named images_pixel_values")
    with pytest.raises(UpstreamChanged, match=match):
        inputs_for(loaded, item)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_markup_read_as_plain_text_stops_the_run(family, load_tiny, monkeypatch):
    """A tokenizer that stopped reading special-token strings in text as special tokens (split_special_tokens on by
    default) would feed the chat markup in pieces: organism-base's numbers all changed, exit 0."""
    from transformers import PreTrainedTokenizerBase

    from probe.upstream import UpstreamChanged

    loaded = load_tiny(family)
    item = make_item(with_image=False)
    inputs_for(loaded, item)  # today's tokenizer passes
    real = PreTrainedTokenizerBase.__call__

    def splits(self, *args, **kwargs):
        kwargs.setdefault("split_special_tokens", True)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", splits)
    with pytest.raises(UpstreamChanged, match=r"read the special token '<\|im_start\|>' of the prompt as plain text"):
        inputs_for(loaded, item)


@pytest.mark.parametrize("engine", ["naive", "batched"])
def test_generate_stays_plain_greedy(engine, load_tiny, monkeypatch):
    """transformers 5 fills what a passed GenerationConfig leaves unset from the checkpoint's generation_config:
    a repetition_penalty, min_new_tokens or suppress_tokens there changed the "greedy" answers of the naive engine
    and of probe.eval (organism-vl, exit 0). The checkpoint's config is kept out, and a token that is not the argmax
    of its raw logits (a processor a later release applies anyway) stops the run."""
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor
    from transformers.generation.utils import GenerationMixin

    from probe.batch import measure_batch
    from probe.sweep import SweepConfig, first_token_measure, prepare_item
    from probe.upstream import UpstreamChanged

    loaded = load_tiny("qwen2")
    cfg = SweepConfig(generate=True, max_new_tokens=4)
    items = [make_item(with_image=False, seed=s, item_id=f"validation_Test_{s}") for s in (0, 1)]
    prepared = [prepare_item(loaded, it, cfg) for it in items]

    def run():
        if engine == "naive":
            return [first_token_measure(loaded, x, ids, cfg).response for x, ids in prepared]
        return [m.response for m in measure_batch(loaded, [p[0] for p in prepared], [p[1] for p in prepared], cfg)]

    plain = run()
    gen = loaded.model.generation_config
    with monkeypatch.context() as m:  # the checkpoint asks for what plain greedy decoding must not do
        m.setattr(gen, "min_new_tokens", 4)
        m.setattr(gen, "repetition_penalty", 5.0)
        m.setattr(gen, "no_repeat_ngram_size", 1)
        assert run() == plain

    real = GenerationMixin._get_logits_processor

    def forced(self, *args, **kwargs):  # a release that applies a processor nobody asked for
        procs = real(self, *args, **kwargs)
        suppress = SuppressTokensLogitsProcessor(list(range(loaded.model.config.vocab_size // 2)))
        return LogitsProcessorList([*procs, suppress])

    monkeypatch.setattr(GenerationMixin, "_get_logits_processor", forced)
    with pytest.raises(UpstreamChanged, match=r"chose generated token \d other than the argmax of its raw logits"):
        run()


def test_logits_that_bypass_the_fp32_head_stop_the_run(tiny_dirs):
    """In bfloat16 the LM head's forward hook (probe.models.fp32_logits) gives fp32 logits. Logits computed from the
    head's weight without calling the module (a fused or kernelized head) skip it: bf16-rounded logits, which
    generate's output upcasts so their dtype cannot tell (organism-vl: p moved by 0.017, exit 0)."""
    import torch.nn.functional as F
    from torch import nn

    from probe.batch import measure_batch
    from probe.exact import exact_sweep
    from probe.models import load_model, resolve_model
    from probe.sweep import SweepConfig, first_token_measure, prepare_item
    from probe.upstream import UpstreamChanged

    loaded = load_model(resolve_model(str(tiny_dirs["qwen2"])), dtype="bfloat16")
    item = make_item(with_image=False)
    cfg = SweepConfig(generate=True, max_new_tokens=2, batch_size=2)
    inputs, ids = prepare_item(loaded, item, cfg)
    runs = {"naive": lambda: first_token_measure(loaded, inputs, ids, cfg),
            "batched": lambda: measure_batch(loaded, [inputs, inputs], [ids, ids], cfg),
            "exact": lambda: exact_sweep(loaded, [item], [(0, 0)], cfg)}
    for run in runs.values():
        run()  # the head runs: they pass
    head = loaded.model.lm_head
    plain = type(head)
    head.__class__ = type("FusedHead", (nn.Linear,), {"__call__": lambda self, x: F.linear(x, self.weight, self.bias)})
    try:
        for name, run in runs.items():
            with pytest.raises(UpstreamChanged, match=r"without calling its LM head module \(lm_head\)"):
                run()
    finally:
        head.__class__ = plain


def test_generated_tokens_are_one_per_step_of_logits():
    """generate's sequences are the prompt and then one token per step of logits: sequences without the prompt
    would leave nothing after it (an empty answer, scored wrong, exit 0) and are refused."""
    from probe.upstream import UpstreamChanged, check_greedy

    logits = [torch.tensor([[0.0, 2.0, 1.0]]), torch.tensor([[3.0, 0.0, 1.0]])]
    check_greedy(logits, torch.tensor([[1, 0]]), eos=[2])
    with pytest.raises(UpstreamChanged, match="0 tokens after the prompt but logits for 2 steps"):
        check_greedy(logits, torch.zeros(1, 0, dtype=torch.long), eos=[2])
    with pytest.raises(UpstreamChanged, match="chose generated token 2 other than the argmax"):
        check_greedy(logits, torch.tensor([[1, 2]]), eos=[2])
    check_greedy([torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.0, 0.0, 9.0]])], torch.tensor([[2, 0]]),
                 eos=[2])  # after an end token the row is padding, not checked


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl"])
def test_a_model_whose_attention_runs_another_kernel_than_asked_is_refused(family, tiny_dirs, monkeypatch):
    """run.json records the attention kernel asked for beside the numbers: a release that loaded the model with
    another one (a silent eager fallback for sdpa) would measure with one kernel and record another. The kernel each
    layer runs is read where transformers reads it, the attention module's config."""
    import transformers

    from probe import models
    from probe.upstream import UpstreamChanged

    ref = models.resolve_model(str(tiny_dirs[family]))
    for attn in ("sdpa", "eager"):
        layers = models.load_model(ref, attn_implementation=attn).model.get_submodule(ref.family.layers_path)
        assert {layer.self_attn.config._attn_implementation for layer in layers} == {attn}
    cls = getattr(transformers, ref.family.model_class)
    real = cls.from_pretrained.__func__

    def falls_back(klass, *args, **kwargs):
        model, info = real(klass, *args, **kwargs)
        model.get_submodule(ref.family.layers_path)[0].self_attn.config._attn_implementation = "eager"
        return model, info

    monkeypatch.setattr(cls, "from_pretrained", classmethod(falls_back))
    with pytest.raises(UpstreamChanged, match=r"decoder layer 0's attention \(\w+\) runs 'eager', not the 'sdpa'"):
        models.load_model(ref, attn_implementation="sdpa")


class _Shrinks(torch.nn.Module):
    """A 'decoder layer' from a release whose layers return something else than the residual they were given."""

    def forward(self, hidden_states, position_ids=None, past_key_values=None, use_cache=False):
        return (hidden_states[:, :-1],)


class _NoWeights(torch.nn.Module):
    def forward(self, x):
        return x


def test_each_calling_convention_guard_names_what_changed():
    """The guards on how layers, caches, rotary embeddings and LM heads are called, each made to fire by a module
    or output built as a future release might hand it over (none of these happens on the tested releases, so the
    families' own tests never reach them): each stops the run with UpstreamChanged naming the change."""
    from types import SimpleNamespace

    from probe.upstream import (LayerCall, PositionWatch, UpstreamChanged, call_layer, check_decode_position,
                                check_head_positions, logits_at, module_device, output_cache, record_layer_call)

    hidden = torch.zeros(1, 3, 8)
    with pytest.raises(UpstreamChanged, match="called without its hidden states"):
        record_layer_call((), {"position_ids": torch.arange(3)})  # the residual under a new keyword
    assert record_layer_call((), {"hidden_states": hidden}).hidden is hidden  # the keyword it has today
    with pytest.raises(UpstreamChanged, match=r"_NoWeights has no weights and no accelerate hook"):
        module_device(_NoWeights())
    with pytest.raises(UpstreamChanged, match=r"a decoder layer returned Tensor \(1, 2, 8\) for input \(1, 3, 8\)"):
        call_layer(_Shrinks(), hidden, LayerCall(hidden, {}), None)
    with pytest.raises(UpstreamChanged, match="returned no KV cache although use_cache=True"):
        output_cache(SimpleNamespace(logits=hidden, kv=object()))
    with pytest.raises(UpstreamChanged, match=r"_NoWeights was called without position ids"):
        PositionWatch._hook(SimpleNamespace(last=None), _NoWeights(), (hidden,), {})
    watch = SimpleNamespace(last=None)  # a decoding step on which no rotary embedding ran
    with pytest.raises(UpstreamChanged, match="rotary embedding did not run on a decoding step"):
        check_decode_position(watch, torch.tensor([[4]]), step=1)
    with pytest.raises(UpstreamChanged, match="did not run as modules in the forward"):
        check_head_positions({"hidden": hidden}, [2])  # the head's input never seen
    with pytest.raises(UpstreamChanged, match=r"Linear has no get_decoder\(\) / get_output_embeddings\(\)"):
        logits_at(torch.nn.Linear(8, 8), {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, [2])


@pytest.mark.parametrize("order", ["skips_the_last", "swaps_the_first_two"])
def test_a_model_that_runs_its_layers_otherwise_stops_the_exact_engine(order, load_tiny):
    """The exact engine replays layer i + 1 on layer i's output: a release whose forward skips a layer (early exit)
    or runs them in another order would pair each layer with another's residual. The clean pass stops the run with
    UpstreamChanged (one line, exit 1) instead of a RuntimeError traceback."""
    from probe.exact import clean_pass
    from probe.upstream import UpstreamChanged

    loaded = load_tiny("qwen2")
    parent = loaded.model.get_submodule(loaded.family.layers_path.rpartition(".")[0])
    name = loaded.family.layers_path.rpartition(".")[2]
    layers = getattr(parent, name)
    changed = list(layers)[:-1] if order == "skips_the_last" else [layers[1], layers[0], *list(layers)[2:]]
    want = ("did not run each of its" if order == "skips_the_last" else "decoder layer 1 started before layer 0")
    setattr(parent, name, torch.nn.ModuleList(changed))
    try:
        with pytest.raises(UpstreamChanged, match=want):
            clean_pass(loaded, text_inputs(loaded), keep_cache=False)
    finally:
        setattr(parent, name, layers)
    clean_pass(loaded, text_inputs(loaded), keep_cache=False)  # restored: the same model runs as before


def _attention_reordered(order: str):
    """Qwen2Attention.forward as a release might compute it (eager attention, transformers' own functions), handing
    o_proj its heads in another order: ``dim_major`` flattens [head_dim, heads] (a fused kernel's layout),
    ``tiled_kv`` gives query head h value head h % kv_heads (keys and values tiled, not repeated per group)."""
    import transformers.models.qwen2.modeling_qwen2 as mq

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        shape = hidden_states.shape[:-1]
        q, k, v = (p(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = mq.apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        group = self.num_key_value_groups
        if order == "tiled_kv":  # q_proj's heads reordered to match (as a load conversion would: _column_order)
            q = q[:, _tiled_heads(q.shape[1], k.shape[1])]
            k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
            self.num_key_value_groups = 1  # eager_attention_forward's repeat_kv: nothing left to repeat
        try:
            out, weights = mq.eager_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling)
        finally:
            self.num_key_value_groups = group
        out = out.transpose(-1, -2) if order == "dim_major" else out  # [B, T, heads, d] → [B, T, d, heads]
        return self.o_proj(out.reshape(*shape, -1).contiguous()), weights

    return forward


def _tiled_heads(n_heads: int, n_kv: int) -> list[int]:
    """With keys and values tiled, position j pairs with value head j % n_kv: the query head of that group."""
    return [(j % n_kv) * (n_heads // n_kv) + j // n_kv for j in range(n_heads)]


def _column_order(order: str, n_heads: int, n_kv: int, d: int) -> torch.Tensor:
    """For each o_proj input column under ``_attention_reordered(order)``, the head-major column it holds."""
    cols = torch.arange(n_heads * d).view(n_heads, d)
    return (cols.t() if order == "dim_major" else cols[_tiled_heads(n_heads, n_kv)]).reshape(-1)


@pytest.mark.parametrize("order", ["dim_major", "tiled_kv"])
def test_heads_that_reach_o_proj_in_another_order_are_refused(order, load_tiny, tiny_dirs, monkeypatch):
    """A release whose attention hands o_proj its heads in another order, o_proj's weights permuted to match (a load
    conversion), computes the same clean logits, but every head mask (an o_proj input slice) removes other
    channels than the head it names. Oracle: removing head 1 of layer 0 is zeroing its o_proj weight columns in
    the released layout. Under the changed attention the hook's mask no longer matches it (the silent failure:
    shown first), and the check run at every load refuses the model (UpstreamChanged, one line, exit 1)."""
    import transformers.models.qwen2.modeling_qwen2 as mq

    from probe.masking import mask_heads
    from probe.models import load_model, resolve_model
    from probe.upstream import UpstreamChanged

    loaded = load_tiny("qwen2")
    g, ids = loaded.geometry, torch.tensor([[3, 7, 11, 5]])
    weights = [loaded.o_proj(i).weight for i in range(g.n_layers)]
    saved = [w.detach().clone() for w in weights]
    with torch.no_grad():
        weights[0][:, g.head_dim:2 * g.head_dim] = 0
        oracle = loaded.model(input_ids=ids).logits
        weights[0].copy_(saved[0])
        clean = loaded.model(input_ids=ids).logits
    monkeypatch.setattr(mq.Qwen2Attention, "forward", _attention_reordered(order))
    moved = _column_order(order, g.n_heads, g.n_kv_heads, g.head_dim)
    try:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s[:, moved])
            assert torch.allclose(loaded.model(input_ids=ids).logits, clean, atol=1e-5)  # the same clean model
            with mask_heads(loaded, [(0, 1)]):
                masked = loaded.model(input_ids=ids).logits
            assert (masked - oracle).abs().max() > 1e-3  # the mask misses head 1 without a word
    finally:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)
    with pytest.raises(UpstreamChanged, match=r"decoder layer 0's attention put query head \d+'s output elsewhere"):
        load_model(resolve_model(str(tiny_dirs["qwen2"])), attn_implementation="eager")


@pytest.mark.parametrize("engine", ["naive", "batched"])
def test_generate_that_returns_processed_logits_is_refused(engine, tiny_dirs, monkeypatch):
    """The option probabilities come from generate's first-step logits (``output_logits``: raw). A release that
    handed back processed scores there, by a transform that keeps each argmax (a temperature of 0.7), passes the
    greedy check, and moved the tiny Qwen2's option probabilities by 0.029, exit 0. Oracle: the plain forward's logits
    at the prompt's last position, compared on the first call of each model (a fresh load here: the session's
    cached model may have been checked already)."""
    from transformers.generation.utils import GenerationMixin

    from probe.batch import measure_batch
    from probe.models import load_model, resolve_model
    from probe.sweep import SweepConfig, first_token_measure, prepare_item
    from probe.upstream import UpstreamChanged

    real = GenerationMixin.generate

    def processed(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.logits = tuple(step / 0.7 for step in out.logits)
        return out

    cfg = SweepConfig(generate=True, max_new_tokens=2)
    items = [make_item(with_image=False, seed=s, item_id=f"validation_Test_{s}") for s in (0, 1)]
    for change in (None, processed):
        if change:
            monkeypatch.setattr(GenerationMixin, "generate", change)
        loaded = load_model(resolve_model(str(tiny_dirs["qwen2"])), attn_implementation="eager")
        prepared = [prepare_item(loaded, it, cfg) for it in items]
        with pytest.raises(UpstreamChanged, match="generate's first-step logits are not") if change else (
                contextlib.nullcontext()):
            if engine == "naive":
                first_token_measure(loaded, *prepared[0], cfg)
            else:
                measure_batch(loaded, [p[0] for p in prepared], [p[1] for p in prepared], cfg)


@pytest.mark.parametrize("change", ["drops_original_max_seq_len", "renames_rope_type"])
def test_a_length_dependent_rope_is_found_whatever_its_module_keeps(change, tmp_path):
    """A longrope model switches to its long factors for the whole call past original_max_position_embeddings
    (80 here, of 4096 positions), so such items are refused (``rope_position_limit``). That limit was found only on
    rotary modules that keep ``original_max_seq_len`` and ``rope_type``: transformers' longrope reads neither the
    former (5.25 reads the config) nor needs the latter's name, and a release without them made the limit None, a
    145-token item measured past it, exit 0. Oracle: the config's own rope_parameters."""
    from probe.models import load_model, resolve_model
    from probe.tiny import TinySpec, build_tiny
    from probe.upstream import UpstreamChanged, rope_position_limit

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
            "original_max_position_embeddings": 80}
    path = build_tiny("llama", tmp_path / "llama", TinySpec(num_hidden_layers=2),
                      {"rope_parameters": rope, "max_position_embeddings": 4096})
    model = load_model(resolve_model(str(path)), attn_implementation="eager").model
    assert rope_position_limit(model) == ("longrope", 80)
    for module in model.modules():
        if change == "drops_original_max_seq_len" and hasattr(module, "original_max_seq_len"):
            del module.original_max_seq_len
        if change == "renames_rope_type" and isinstance(getattr(module, "rope_type", None), str):
            module.rope_kind = module.rope_type
            del module.rope_type
    if change == "drops_original_max_seq_len":
        assert rope_position_limit(model) == ("longrope", 80)
    else:
        with pytest.raises(UpstreamChanged, match="config declares 'longrope' RoPE"):
            rope_position_limit(model)


def test_the_raw_first_step_check_builds_no_second_kv_cache(load_tiny, monkeypatch):
    """``check_first_step_raw`` runs a plain forward of generate's whole batch while generate's output still holds
    that batch's KV cache (``out.cache``). With the model's default ``use_cache`` that forward built a second cache of
    every layer's keys and values, so a run's first batch needed two at once (on a GPU it could run out of memory,
    and ``run_halving`` then keeps the halved batch for the rest of the run). The check needs the last position's
    logits only. Oracle: the cache updates counted while it runs: none; and it still passes on raw logits."""
    from transformers.cache_utils import Cache

    from probe.upstream import check_first_step_raw

    loaded = load_tiny("qwen2")
    inputs = {"input_ids": torch.tensor([[3, 7, 11, 5], [4, 8, 12, 6]]), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    with torch.no_grad():
        first = loaded.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
    updates = []
    real = Cache.update
    monkeypatch.setattr(Cache, "update", lambda self, *a, **k: (updates.append(1), real(self, *a, **k))[1])
    check_first_step_raw(loaded.model, inputs, first)
    assert updates == []


def test_a_gguf_header_parse_is_kept_per_version_of_the_file(tmp_path, monkeypatch):
    """``parse_gguf_headers_once`` in front of a counting stand-in for transformers' parser (no GGUF needed): a
    metadata read of the same file version parses once, each caller gets its own copy, a read of tensors always
    goes through, and the file rewritten with its size and mtime kept (its ctime moves) is parsed anew."""
    import os
    import time
    from pathlib import Path

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from probe.upstream import parse_gguf_headers_once

    calls: list[tuple] = []

    def parse(path, return_tensors=False, model_to_load=None, torch_dtype=None):
        calls.append((path, return_tensors))
        return {"config": {"bytes": Path(path).read_text()}, "tensors": {} if return_tensors else None}

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", parse)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    parse_gguf_headers_once()
    parse_gguf_headers_once()  # idempotent: one wrapper
    read = gguf_utils.load_gguf_checkpoint
    first = read(str(f), return_tensors=False)
    first["config"]["bytes"] = "edited by a caller"
    assert read(str(f))["config"]["bytes"] == "one" and calls == [(str(f), False)]
    read(str(f), return_tensors=True)
    read(str(f), return_tensors=True)
    assert calls.count((str(f), True)) == 2
    st = f.stat()
    time.sleep(0.05)  # past the kernel's coarse clock tick, which stamps ctime
    f.write_bytes(b"two")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert read(str(f))["config"]["bytes"] == "two" and calls.count((str(f), False)) == 2
