"""The exact fast sweep (DESIGN §4): same numbers as the naive loop, far less work.

Per item: the inputs (image encoding included) are built once and one clean pass records the residual stream
entering every decoder layer together with the keyword arguments the layer received (rotary embeddings,
M-RoPE positions, causal mask), so the masked runs need no family-specific position logic. Masking a head of
layer L changes nothing before L, so a masked row starts at L from that cache; rows are stacked along the batch,
one head mask per row, and join the batch as the pass reaches their layer. Only the last position's logits are
computed. When accuracy is asked for, greedy decoding continues from a KV cache whose layers < L are the clean
ones (then a batch holds heads of one layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
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


def head_gates(n_rows: int, n_heads: int, heads: Sequence[int], first_row: int = 0) -> torch.Tensor:
    """[n_rows, n_heads] ones, with head heads[k] removed in row first_row + k."""
    gates = torch.ones(n_rows, n_heads)
    gates[first_row + torch.arange(len(heads)), torch.tensor(list(heads))] = 0.0
    return gates


def run_rows(
    loaded: LoadedModel, clean: CleanPass, rows: Sequence[tuple[int, int]], cache: DynamicCache | None = None
) -> torch.Tensor:
    """Logits [len(rows), V] at the last position; row r has head rows[r] = (layer, head) removed.

    Rows (sorted by layer) join the batch at their own layer from the cached residual, so one pass over the
    layers serves heads of several layers. With a KV cache (for decoding) all rows must share one layer.
    """
    n_heads = loaded.geometry.n_heads
    first = rows[0][0]
    if cache is not None and any(layer != first for layer, _ in rows):
        raise ValueError("a KV cache needs rows of a single layer")
    h = clean.layer_inputs[first][:0]  # an empty batch; rows join below
    layers = loaded.layers
    with torch.no_grad():
        for i in range(first, len(layers)):
            joining = [head for layer, head in rows if layer == i]
            if joining:
                h = torch.cat([h, clean.layer_inputs[i].expand(len(joining), -1, -1)])
            kw = dict(clean.layer_kwargs[i], past_key_values=cache, use_cache=cache is not None)
            gates = {i: head_gates(h.shape[0], n_heads, joining, h.shape[0] - len(joining))} if joining else {}
            with HeadMask(loaded, gates):
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
    ordered = sorted(heads)  # by layer, so rows join the batch as the pass reaches their layer
    # decoding needs a KV cache per batch, hence batches of a single layer
    groups = [list(g) for _, g in groupby(ordered, key=lambda p: p[0])] if cfg.generate else [ordered]
    batches = [g[s:s + cfg.batch_size] for g in groups for s in range(0, len(g), cfg.batch_size)]
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
        for batch in batches:
            layer = batch[0][0]
            cache = _cache_prefix(clean.cache, layer, len(batch)) if cfg.generate else None
            logits = run_rows(loaded, clean, batch, cache)
            texts: list[str | None] = [None] * len(batch)
            if cfg.generate:
                gates = {layer: head_gates(len(batch), n_heads, [h for _, h in batch])}
                texts = greedy_continue(loaded, logits, cache, gates, cfg.max_new_tokens)
            logp = option_log_probs(logits, letter_ids)
            for r, (layer, head) in enumerate(batch):
                item_rows[(layer, head)] = measurement_row(item, layer, head, Measurement(logp[r], texts[r]),
                                                           base_logp)
            progress(len(batch))
        rows.extend(item_rows[pair] for pair in heads)  # same row order as the naive loop
    return rows
