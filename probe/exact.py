"""The exact fast sweep (DESIGN §4): same numbers as the naive loop, far less work.

Per item: the inputs (image encoding included) are built once and one clean pass records the residual stream
entering every decoder layer together with the keyword arguments the layer received (rotary embeddings,
M-RoPE positions, causal mask), so the masked runs need no family-specific position logic. Masking a head of
layer L changes nothing before L, so masked runs start at L from that cache, with the heads of L stacked along
the batch, one head mask per row. Only the last position's logits are computed. When accuracy is asked for,
greedy decoding continues from a KV cache whose layers < L are the clean ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from probe.masking import HeadMask
from probe.metrics import option_log_probs
from probe.models import LoadedModel
from probe.prompting import ItemLike
from probe.sweep import BASELINE, Measurement, SweepConfig, measurement_row, prepare_item


@dataclass
class CleanPass:
    layer_inputs: list[torch.Tensor]  # [1, T, d] entering each decoder layer
    layer_kwargs: list[dict[str, Any]]  # what each layer was called with, minus the cache
    cache: DynamicCache | None  # clean KV cache of the prompt (only kept when decoding)
    last_logits: torch.Tensor  # [V] at the last prompt position


def clean_pass(loaded: LoadedModel, inputs: dict[str, torch.Tensor], keep_cache: bool) -> CleanPass:
    n = loaded.geometry.n_layers
    hidden: list[torch.Tensor | None] = [None] * n
    kwargs: list[dict[str, Any] | None] = [None] * n

    def recorder(i: int):
        def hook(module, args, kw):
            hidden[i] = args[0] if args else kw["hidden_states"]
            kwargs[i] = {k: v for k, v in kw.items() if k not in ("past_key_values", "hidden_states")}

        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True)
               for i, layer in enumerate(loaded.layers)]
    try:
        with torch.no_grad():
            out = loaded.model(**inputs, use_cache=keep_cache, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    if any(h is None for h in hidden):
        raise RuntimeError("clean pass did not run every decoder layer")
    cache = out.past_key_values if keep_cache else None
    return CleanPass(hidden, kwargs, cache, out.logits[0, -1])


def _cache_prefix(clean: DynamicCache, upto: int, batch: int) -> DynamicCache:
    """A new cache holding the clean K/V of layers < upto, repeated over `batch` rows."""
    cache = DynamicCache()
    for i in range(upto):
        layer = clean.layers[i]
        cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), i)
    return cache


def run_from_layer(
    loaded: LoadedModel, clean: CleanPass, layer: int, gates: torch.Tensor, cache: DynamicCache | None
) -> torch.Tensor:
    """Logits [B, V] at the last position, with row r of layer `layer` gated by gates[r]."""
    rows = gates.shape[0]
    h = clean.layer_inputs[layer].expand(rows, -1, -1)
    layers = loaded.layers
    with torch.no_grad(), HeadMask(loaded, {layer: gates}):
        for i in range(layer, len(layers)):
            kw = dict(clean.layer_kwargs[i], past_key_values=cache, use_cache=cache is not None)
            h = layers[i](h, **kw)
            h = h[0] if isinstance(h, tuple) else h
        last = loaded.model.get_submodule(loaded.family.norm_path)(h[:, -1:])
        return loaded.model.get_submodule(loaded.family.lm_head_path)(last)[:, -1]


def greedy_continue(
    loaded: LoadedModel, first_logits: torch.Tensor, cache: DynamicCache, gates: dict[int, torch.Tensor],
    max_new_tokens: int,
) -> list[str]:
    """Greedy decoding after the first position, like ``generate(do_sample=False)``: finished rows get pad."""
    eos = torch.tensor(sorted(loaded.eos_token_ids), device=first_logits.device)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else int(eos[0])
    token = first_logits.argmax(-1)
    tokens = [token]
    done = torch.isin(token, eos)
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        with torch.no_grad(), HeadMask(loaded, gates):
            out = loaded.model(input_ids=token[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = torch.where(done, torch.full_like(token, pad), out.logits[:, -1].argmax(-1))
        tokens.append(token)
        done |= torch.isin(token, eos)
    seqs = torch.stack(tokens, dim=1)
    return loaded.tokenizer.batch_decode(seqs, skip_special_tokens=True)


def exact_sweep(
    loaded: LoadedModel,
    items: Sequence[ItemLike],
    heads: Sequence[tuple[int, int]],
    cfg: SweepConfig,
    progress: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    n_heads = loaded.geometry.n_heads
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    rows: list[dict] = []
    for item in items:
        inputs, letter_ids = prepare_item(loaded, item, cfg)
        clean = clean_pass(loaded, inputs, keep_cache=cfg.generate)
        base_logp = option_log_probs(clean.last_logits, letter_ids)
        text = None
        if cfg.generate:
            cache = _cache_prefix(clean.cache, loaded.geometry.n_layers, 1)
            text = greedy_continue(loaded, clean.last_logits[None], cache, {}, cfg.max_new_tokens)[0]
        rows.append(measurement_row(item, BASELINE, BASELINE, Measurement(base_logp, text), base_logp))
        progress(1)
        item_rows: dict[tuple[int, int], dict] = {}
        for layer, layer_heads in by_layer.items():
            for start in range(0, len(layer_heads), cfg.batch_size):
                chunk = layer_heads[start:start + cfg.batch_size]
                gates = torch.ones(len(chunk), n_heads)
                gates[torch.arange(len(chunk)), torch.tensor(chunk)] = 0.0
                cache = _cache_prefix(clean.cache, layer, len(chunk)) if cfg.generate else None
                logits = run_from_layer(loaded, clean, layer, gates, cache)
                texts: list[str | None] = [None] * len(chunk)
                if cfg.generate:
                    texts = greedy_continue(loaded, logits, cache, {layer: gates}, cfg.max_new_tokens)
                logp = option_log_probs(logits, letter_ids)
                for r, head in enumerate(chunk):
                    m = Measurement(logp[r], texts[r])
                    item_rows[(layer, head)] = measurement_row(item, layer, head, m, base_logp)
                progress(len(chunk))
        rows.extend(item_rows[pair] for pair in heads)  # same row order as the naive loop
    return rows
