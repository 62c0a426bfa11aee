"""The exact fast sweep (DESIGN §4): same numbers as the naive loop, far less work.

Per item: the inputs (image encoding included) are built once and one clean pass records the residual stream
entering every decoder layer together with the keyword arguments the layer received (rotary embeddings,
M-RoPE positions, causal mask), so the masked runs need no family-specific position logic. Masking a head of
layer L changes nothing before L, so a masked row starts at L from that cache; rows are stacked along the batch,
one head mask per row, and join the batch as the pass reaches their layer. Only the last position's logits are
computed. When accuracy is asked for, greedy decoding continues from a KV cache whose layers < L are the clean
ones (then a batch holds heads of one layer).

Calls into transformers internals (a decoder layer called directly, KV caches built by hand) go through
probe/upstream.py. As a run-time guard, the first item of every call also recomputes its deepest masked row with
the naive oracle and stops the run if the two disagree (``EngineDisagrees``), so an upstream change cannot
make a sweep silently wrong. A batch of masked rows whose forward or greedy continuation runs out of memory is
halved and retried, and the rest of the run stays at the smaller size (``probe.batch.run_halving``, shared with
probe.eval); out of memory at one row ends the run with one line, as before.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Callable, Sequence

import torch

from probe.batch import BatchLimit, pad_token, run_halving
from probe.errors import RunStopped
from probe.masking import HeadMask, mask_heads
from probe.metrics import option_log_probs
from probe.models import LoadedModel
from probe.prompting import ItemLike
from probe.sweep import (BASELINE, Measurement, SweepConfig, first_token_measure, measurement_row, oracle_mismatch,
                         overflow_steps, prepare_item)
from probe.upstream import (LayerCall, cache_kwarg, cache_layer_kv, call_layer, check_cache, full_length_cache,
                            model_call_with_cache, module_device, output_cache, prefix_cache, record_layer_call,
                            reset_position_state, check_decode_position, head_must_run, PositionWatch, UpstreamChanged)


@dataclass
class CleanPass:
    calls: list[LayerCall]  # what each decoder layer received: input residual [1, T, d] and keywords, no cache
    # What the model added to the residual between layer i's output and layer i+1's input (None: nothing).
    # Qwen3-VL's DeepStack adds vision features there; masked rows must receive the same addition.
    injected: list[torch.Tensor | None]
    cache: Any | None  # clean KV cache of the prompt (only kept when decoding)
    last_logits: torch.Tensor  # [V] at the last prompt position
    last_output: torch.Tensor  # [1, 1, d]: the last decoder layer's output at the last position
    last_position: torch.Tensor | None = None  # RoPE position of the last prompt token (kept when decoding)

    @property
    def length(self) -> int:
        return self.calls[0].hidden.shape[1]


def clean_pass(loaded: LoadedModel, inputs: dict[str, torch.Tensor], keep_cache: bool) -> CleanPass:
    n = loaded.geometry.n_layers
    calls: list[LayerCall | None] = [None] * n
    devices = loaded.layer_devices
    injected: list[torch.Tensor | None] = [None] * n
    previous: dict[int, torch.Tensor] = {}  # layer i - 1's output (a copy), kept only until layer i starts

    def recorder(i: int):
        def hook(module, args, kw):  # each layer's inputs kept on its own device (moved once, not per row)
            calls[i] = record_layer_call(args, kw, devices[i])
            if i > 0:
                if i - 1 not in previous:
                    raise UpstreamChanged(f"decoder layer {i} started before layer {i - 1} returned: the model no "
                                          "longer runs its layers one after another, as the exact engine replays them")
                out = previous.pop(i - 1).to(calls[i].hidden.device)
                if not torch.equal(calls[i].hidden, out):
                    injected[i - 1] = calls[i].hidden - out

        return hook

    def output_recorder(i: int):
        def hook(module, args, kw, out):
            # a copy: a model that edits the residual in place between layers must still show the edit
            h = out[0] if isinstance(out, tuple) else out
            previous[i] = h.clone() if i < n - 1 else h[:, -1:].clone()

        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True)
               for i, layer in enumerate(loaded.layers)]
    handles += [layer.register_forward_hook(output_recorder(i), with_kwargs=True)
                for i, layer in enumerate(loaded.layers)]
    cache = {cache_kwarg(type(loaded.model).forward): full_length_cache()} if keep_cache else {}
    reset_position_state(loaded.model)
    watch = PositionWatch(loaded.model, loaded.family.layers_path) if keep_cache else contextlib.nullcontext()
    try:
        with torch.no_grad(), watch, head_must_run(loaded.model, loaded.family.lm_head_path):
            out = loaded.model(**inputs, **cache, use_cache=keep_cache, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in calls) or n - 1 not in previous:
        raise UpstreamChanged(f"the model's forward did not run each of its {n} decoder layers (as modules, "
                              "through their own forward) as the exact engine replays them")
    clean = CleanPass(calls, injected, output_cache(out) if keep_cache else None, out.logits[0, -1], previous[n - 1],
                      watch.last if keep_cache else None)
    check_lm_tail(loaded, clean)
    return clean


def lm_tail(loaded: LoadedModel, h: torch.Tensor) -> torch.Tensor:
    """Logits [rows, V] at the last position of the residual ``h`` [rows, T, d] leaving the last decoder layer: the
    final norm, the LM head and, where the model class applies it to its logits, Gemma's final soft-capping (a
    Gemma3ForCausalLM reads ``final_logit_softcapping`` from its own config; the multimodal Gemma 3 does not)."""
    norm = loaded.model.get_submodule(loaded.family.norm_path)
    head = loaded.model.get_submodule(loaded.family.lm_head_path)
    last = norm(h[:, -1:].to(module_device(norm)))
    logits = head(last.to(module_device(head)))[:, -1].to(loaded.device)
    if cap := getattr(loaded.model.config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_lm_tail(loaded: LoadedModel, clean: CleanPass) -> None:
    """Masked rows end in ``lm_tail``, not in the model's forward: on the clean row it must give the model's own
    logits, else a model whose forward post-processes them (soft-capping, a logit scale) would be measured without."""
    with torch.no_grad():
        mine = lm_tail(loaded, clean.last_output)[0].float()
    want = clean.last_logits.float()
    if not bool(torch.isfinite(want).all()):  # the forward overflowed (bf16/fp16), not an upstream change: the
        return  # baseline row's measurement_row stops the run naming the item and the cure (--dtype float32)
    tol = 1e-4 if loaded.dtype == torch.float32 else 2e-2
    if not torch.allclose(mine, want, atol=tol * max(1.0, float(want.abs().max())), rtol=0):
        raise UpstreamChanged(f"{type(loaded.model).__name__}'s logits are not its final norm and LM head "
                              f"({loaded.family.norm_path}, {loaded.family.lm_head_path}) applied to the last "
                              f"decoder layer's output (max difference {float((mine - want).abs().max()):.3g}), "
                              "which the exact engine's masked rows rely on")


def head_gates(n_rows: int, n_heads: int, heads: Sequence[int], first_row: int = 0) -> torch.Tensor:
    """[n_rows, n_heads] ones, with head heads[k] removed in row first_row + k."""
    gates = torch.ones(n_rows, n_heads)
    gates[first_row + torch.arange(len(heads)), torch.tensor(list(heads))] = 0.0
    return gates


def run_rows(
    loaded: LoadedModel, clean: CleanPass, rows: Sequence[tuple[int, int]], cache: Any | None = None
) -> torch.Tensor:
    """Logits [len(rows), V] at the last position; row r has head rows[r] = (layer, head) removed.

    Rows (sorted by layer) join the batch at their own layer from the cached residual, so one pass over the
    layers serves heads of several layers. With a KV cache (for decoding) all rows must share one layer.
    On a model spread over several devices the residual moves to each layer's device as the layers do.
    """
    n_heads = loaded.geometry.n_heads
    first = rows[0][0]
    if cache is not None and any(layer != first for layer, _ in rows):
        raise ValueError("a KV cache needs rows of a single layer")
    h = clean.calls[first].hidden[:0]  # an empty batch; rows join below
    layers, devices = loaded.layers, loaded.layer_devices
    with torch.no_grad():
        for i in range(first, len(layers)):
            h = h.to(devices[i])  # no-op unless layer i sits on another device than layer i - 1
            joining = [head for layer, head in rows if layer == i]
            if joining:
                h = torch.cat([h, clean.calls[i].hidden.expand(len(joining), -1, -1)])
            gates = {i: head_gates(h.shape[0], n_heads, joining, h.shape[0] - len(joining))} if joining else {}
            with HeadMask(loaded, gates):
                h = call_layer(layers[i], h, clean.calls[i], cache)
            if clean.injected[i] is not None:
                h = h + clean.injected[i].to(h.device)
        if cache is not None:  # the rows' own cache, clean below `first` and masked from it: nothing else
            check_cache(cache, range(len(layers)), len(rows), clean.length)
        return lm_tail(loaded, h)


def greedy_continue(
    loaded: LoadedModel, first_logits: torch.Tensor, cache: Any, gates: dict[int, torch.Tensor],
    max_new_tokens: int, prompt_position: torch.Tensor,
) -> tuple[list[str], list[int | None]]:
    """Greedy decoding after the first position, like ``generate(do_sample=False)``: finished rows get pad.
    Per row its text and ``overflow_steps``' first position of non-finite logits. Every step must run at the
    prompt's last RoPE position (``prompt_position``, CleanPass.last_position) plus its step (run-time guard,
    probe/upstream.py ``check_decode_position``)."""
    eos = torch.tensor(sorted(loaded.eos_token_ids), device=first_logits.device)
    pad = pad_token(loaded)
    token = first_logits.argmax(-1)
    tokens, step_logits = [token], [first_logits]
    done = torch.isin(token, eos)
    prompt_length = cache_layer_kv(cache, 0)[0].shape[-2]
    for step in range(1, max_new_tokens):
        if bool(done.all()):
            break
        with torch.no_grad(), HeadMask(loaded, gates), PositionWatch(loaded.model, loaded.family.layers_path) as watch:
            out = model_call_with_cache(loaded.model, cache, input_ids=token[:, None], logits_to_keep=1)
        check_decode_position(watch, prompt_position, step)
        token = torch.where(done, torch.full_like(token, pad), out.logits[:, -1].argmax(-1))
        tokens.append(token)
        step_logits.append(out.logits[:, -1])
        done |= torch.isin(token, eos)
    check_cache(cache, range(loaded.geometry.n_layers), len(token), prompt_length + len(tokens) - 1)
    seqs = torch.stack(tokens, dim=1)
    return (loaded.tokenizer.batch_decode(seqs, skip_special_tokens=True),
            overflow_steps(step_logits, seqs, loaded.eos_token_ids))


class EngineDisagrees(RunStopped):
    """The exact engine's numbers differ from the naive oracle's on the same row: never report them."""


def check_against_naive(
    loaded: LoadedModel, item: ItemLike, inputs: dict[str, torch.Tensor], letter_ids: list[int],
    pair: tuple[int, int], got: Measurement, cfg: SweepConfig,
) -> None:
    """Run-time guard (one naive run per call): recompute one masked row with the oracle and compare.

    A transformers release that changes an internal the engine calls must not make a sweep silently wrong
    (transformers 5.24 did, with one row per batch): the first item of every call is checked on its deepest row.
    """
    with mask_heads(loaded, [pair]):
        want = first_token_measure(loaded, inputs, letter_ids, cfg)
    if detail := oracle_mismatch(loaded, got, want):
        import transformers

        raise EngineDisagrees(
            f"exact engine disagrees with the naive oracle on item {item.id}, head L{pair[0]}.H{pair[1]} ({detail}) "
            f"under transformers {transformers.__version__}: an internal it calls has probably changed "
            "(see probe/upstream.py). Nothing was written for this chunk; use --method naive meanwhile")


def measure_masked(loaded: LoadedModel, clean: CleanPass, batch: Sequence[tuple[int, int]], letter_ids: list[int],
                   cfg: SweepConfig) -> list[Measurement]:
    """One batch of masked rows (sorted by layer; one layer when generating): per row its option log-probs and, when
    generating, its greedy text. Builds its own KV cache from the clean one, so a retry starts afresh."""
    layer = batch[0][0]
    cache = prefix_cache(clean.cache, layer, len(batch)) if cfg.generate else None
    logits = run_rows(loaded, clean, batch, cache)
    texts: list[str | None] = [None] * len(batch)
    bad: list[int | None] = [None] * len(batch)
    if cfg.generate:
        gates = {layer: head_gates(len(batch), loaded.geometry.n_heads, [h for _, h in batch])}
        texts, bad = greedy_continue(loaded, logits, cache, gates, cfg.max_new_tokens, clean.last_position)
    logp = option_log_probs(logits, letter_ids).cpu()
    return [Measurement(logp[r], texts[r], bad[r]) for r in range(len(batch))]


def exact_sweep(
    loaded: LoadedModel,
    items: Sequence[ItemLike],
    heads: Sequence[tuple[int, int]],
    cfg: SweepConfig,
    progress: Callable[[int], None] = lambda n: None,
    limit: BatchLimit | None = None,
) -> list[dict]:
    """Rows of ``naive_sweep``'s order and numbers. ``limit``: masked rows per forward (default ``cfg.batch_size``),
    halved where a batch runs out of memory and kept so for later calls given the same limit (``run_halving``)."""
    limit = limit if limit is not None else BatchLimit(cfg.batch_size, unit="masked rows", scope="this sweep")
    ordered = sorted(heads)  # by layer, so rows join the batch as the pass reaches their layer
    # decoding needs a KV cache per batch, hence batches of a single layer; no heads, no batch (an empty one
    # would be run as a batch of masked rows)
    groups = [list(g) for _, g in groupby(ordered, key=lambda p: p[0])] if cfg.generate else (
        [ordered] if ordered else [])
    guarded = ordered[-1] if ordered else None  # the deepest row: it crosses the most engine-built state
    rows: list[dict] = []
    for n_item, item in enumerate(items):
        inputs, letter_ids = prepare_item(loaded, item, cfg)
        clean = clean_pass(loaded, inputs, keep_cache=cfg.generate)
        base_logp = option_log_probs(clean.last_logits, letter_ids).cpu()  # the CPU once, not one sync per row
        text, base_overflow = None, None
        if cfg.generate:
            cache = prefix_cache(clean.cache, loaded.geometry.n_layers, 1)
            (text,), (base_overflow,) = greedy_continue(loaded, clean.last_logits[None], cache, {}, cfg.max_new_tokens,
                                                        clean.last_position)
        rows.append(measurement_row(item, BASELINE, BASELINE, Measurement(base_logp, text, base_overflow), base_logp))
        progress(1)
        item_rows: dict[tuple[int, int], dict] = {}

        def keep(batch: list[tuple[int, int]], measured: list[Measurement]) -> None:
            for (layer, head), m in zip(batch, measured):  # the guard checks a row that ran, whatever its batch
                if n_item == 0 and (layer, head) == guarded:
                    check_against_naive(loaded, item, inputs, letter_ids, guarded, m, cfg)
                item_rows[(layer, head)] = measurement_row(item, layer, head, m, base_logp)
            progress(len(batch))

        run_halving(loaded, groups, limit, lambda batch: measure_masked(loaded, clean, batch, letter_ids, cfg), keep)
        rows.extend(item_rows[pair] for pair in heads)  # same row order as the naive loop
    return rows
