"""Sweep engines: measure every item with no mask (baseline) and with each selected head masked.

Every engine returns the same table (one row per item × (baseline | head)), so the naive loop below stays in
the code as the oracle the faster engines are tested against (DESIGN §4).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from probe.errors import BadInput, RunStopped
from probe.masking import mask_heads
from probe.metrics import kl_orig_masked, option_log_probs, prob_choice
from probe.models import LoadedModel
from probe.parsing import parse_choice
from probe.prompting import Encoded, ItemLike, PromptTemplate, answer_token_ids, build_inputs
from probe.results import BASELINE  # defined beside the files it marks rows of, torch-free
from probe.upstream import greedy_generate, head_must_run

if TYPE_CHECKING:
    from transformers import GenerationConfig


@dataclass(frozen=True)
class SweepConfig:
    template: PromptTemplate = field(default_factory=PromptTemplate)
    generate: bool = True  # accuracy needs greedy generation; prob-accuracy and KL do not
    max_new_tokens: int = 5
    image_max_side: int | None = None
    batch_size: int = 8  # rows stacked per forward by the exact engine
    attribution_items: int = 1  # items per forward + backward of the attribution engine (probe.attribution)


@dataclass
class Measurement:
    """What one run of the model on one item gives: option log-probs and (optionally) the generated text."""

    logp: torch.Tensor  # [n_options], fp32
    response: str | None
    overflow_step: int | None = None  # the first generated position whose logits were not finite (overflow_steps)


def overflow_steps(step_logits: Sequence[torch.Tensor], tokens: torch.Tensor, eos: Iterable[int]) -> list[int | None]:
    """Per row of ``tokens`` [B, S] (greedy tokens from ``step_logits``, S tensors [B, V]), the first position whose
    logits were not finite while the row was still generating, or None. The argmax of NaN logits is a token all the
    same: the text it spells would be scored as a wrong answer (the option letters are checked at position 0 only)."""
    finite = torch.stack([torch.isfinite(x).all(-1).cpu() for x in step_logits], 1)  # [B, S] (a spread model's
    # first position comes from another device than the later ones)
    ended = torch.isin(tokens[:, :finite.shape[1]].cpu(), torch.tensor(sorted(eos), dtype=tokens.dtype))
    finished = (ended.int().cumsum(1) - ended.int()) > 0  # an end token earlier in the row: the rest is padding
    bad = ~finite & ~finished
    return [int(r.nonzero()[0]) if bool(r.any()) else None for r in bad]


# Max |Δp| over the option letters between a fast path (exact engine, batched evaluation) and its one-item oracle
# on one row, by dtype: fp32 differs only in summation order (≈1e-6); half precision also by batch composition.
# A broken path is off by ≫ 0.05.
GUARD_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.05, torch.float16: 0.05}


def oracle_mismatch(loaded: LoadedModel, got: Measurement, want: Measurement) -> str | None:
    """Why ``got`` (a fast path's measurement) is not ``want`` (the oracle's on the same item), or None when they
    agree: option probabilities within GUARD_TOLERANCE, and in fp32 the same generated text."""
    dp = float((got.logp.float().cpu().exp() - want.logp.float().cpu().exp()).abs().max())
    tol = GUARD_TOLERANCE.get(loaded.dtype, 0.05)
    if loaded.dtype == torch.float32 and got.response != want.response:
        return f"generated {got.response!r} vs {want.response!r}"
    if dp > tol:
        return f"max |Δp| over the options {dp:.3g} > {tol:g}"
    return None


def greedy_config(loaded: LoadedModel, max_new_tokens: int) -> GenerationConfig:
    """Plain greedy decoding: checkpoints' own generation configs may carry sampling or repetition penalties (run it
    with probe.upstream.greedy_generate, which keeps them out)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        eos_token_id=sorted(loaded.eos_token_ids), pad_token_id=loaded.tokenizer.pad_token_id,
        return_dict_in_generate=True, output_logits=True,
    )


def first_token_measure(
    loaded: LoadedModel, inputs: dict[str, torch.Tensor], letter_ids: list[int], cfg: SweepConfig
) -> Measurement:
    """Greedy generation (if asked) whose first-step raw logits give the option probabilities."""
    model = loaded.model
    with torch.no_grad(), head_must_run(model, loaded.family.lm_head_path):
        if cfg.generate:
            out = greedy_generate(model, inputs, greedy_config(loaded, cfg.max_new_tokens), loaded.eos_token_ids)
            first = out.logits[0][0]
            new = out.sequences[0, inputs["input_ids"].shape[1]:]
            text = loaded.tokenizer.decode(new, skip_special_tokens=True)
            bad = overflow_steps(out.logits, new[None], loaded.eos_token_ids)[0]
            return Measurement(option_log_probs(first, letter_ids), text, bad)
        logits = model(**inputs, logits_to_keep=1).logits[0, -1]  # the head (fp32 in half precision) at one row
        return Measurement(option_log_probs(logits, letter_ids), None)


def measurement_row(
    item: ItemLike, layer: int, head: int, m: Measurement, base_logp: torch.Tensor
) -> dict:
    logp, base_logp = m.logp.detach().float().cpu(), base_logp.detach().float().cpu()  # one copy each, no more syncs
    removed = "" if layer == BASELINE else f" with head {layer}.{head} removed"
    if not bool(torch.isfinite(logp).all()):  # finite weights (checked at load) and still NaN/Inf: an overflow
        raise RunStopped(f"item {item.id}{removed}: the option letters' log-probabilities are not finite (NaN or Inf) "
                         "although every weight is: the forward overflowed in this dtype. Nothing was written for "
                         "this part; rerun with --dtype float32")
    if m.overflow_step is not None:
        raise RunStopped(f"item {item.id}{removed}: the logits of generated token {m.overflow_step + 1} are not finite "
                         "(NaN or Inf) although every weight is: the forward overflowed in this dtype, and its text "
                         "would be scored as a wrong answer. Nothing was written for this part; rerun with --dtype "
                         "float32")
    m = Measurement(logp, m.response)
    letters = item.letters
    idx = letters.index(item.answer)
    prob_pred = letters[int(prob_choice(m.logp))]
    pred = parse_choice(m.response, item.options) if m.response is not None else None
    return {
        "item_id": item.id,
        "subject": getattr(item, "subject", ""),
        "layer": layer,
        "head": head,
        "answer": item.answer,
        "pred": pred or "",
        "correct": float(pred == item.answer) if m.response is not None else float("nan"),
        "prob_pred": prob_pred,
        "prob_correct": float(prob_pred == item.answer),
        "p_answer": float(m.logp[idx].exp()),
        "kl": float(kl_orig_masked(base_logp, m.logp)),
        "response": m.response or "",
    }


def prepare_item(loaded: LoadedModel, item: ItemLike, cfg: SweepConfig, encoded: Encoded | None = None,
                 ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Model inputs of an item (images encoded once) and the token ids of its option letters; ``encoded``: its
    prompt already encoded (probe.prompting.encode_prompts, batched evaluation)."""
    inputs = build_inputs(loaded, item, cfg.template, cfg.image_max_side, encoded)
    check_run_length(loaded, item, inputs["input_ids"].shape[1], cfg)
    return inputs, answer_token_ids(loaded, item.letters, cfg.template)


def check_run_length(loaded: LoadedModel, item: ItemLike, n_prompt: int, cfg: SweepConfig) -> None:
    """Refuse an item whose run would pass the positions where the model's RoPE starts to depend on the length of
    the call (``probe.upstream.rope_position_limit``): transformers would then rescale it by the longest sequence
    run so far and by the batch's longest row, so its baseline, masked and batched numbers would not be comparable.
    Refuse one past the model's context (max_position_embeddings) too: transformers runs it without a word (a
    6,000-token question on a 1,024-position organism gave numbers, exit 0)."""
    n = n_prompt + (cfg.max_new_tokens - 1 if cfg.generate else 0)  # the last generated token is never fed back
    generated = f" + {cfg.max_new_tokens - 1} generated" if cfg.generate else ""
    check_positions(loaded, item, n, f"{n_prompt} prompt{generated}",
                    "shorten the prompt (--image-max-side) or --max-new-tokens, or leave the item out")


def check_positions(loaded: LoadedModel, item: ItemLike, n: int, parts: str, advice: str,
                    use: str = "measured") -> None:
    """``check_run_length``'s refusals of a run of ``n`` positions (``parts``: what they are), shared with training
    (probe.train.encode, which trained on such items without a word); ``advice``: how to shorten it; ``use``: what
    the run does with the item ("trained on" for training)."""
    spans = f"item {item.id}: its run spans {n} positions ({parts}), past the"
    if loaded.rope_limit is not None and n > (limit := loaded.rope_limit[1]):
        kind = loaded.rope_limit[0]
        kept = ", and keeps it for later calls" if "dynamic" in kind else ""
        raise BadInput(f"{spans} {limit} beyond which transformers rescales {loaded.ref.spec}'s RoPE ({kind}) by the "
                       f"longest row of the call{kept}: its masked, batched and one-item numbers would not be "
                       f"comparable; {advice}")
    if loaded.context_length is not None and n > loaded.context_length:
        raise BadInput(f"{spans} {loaded.context_length} positions {loaded.ref.spec} was built for "
                       f"(max_position_embeddings): it would be {use} where it never learnt anything; {advice}")


def naive_sweep(
    loaded: LoadedModel,
    items: Sequence[ItemLike],
    heads: Sequence[tuple[int, int]],
    cfg: SweepConfig,
    progress: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """The oracle: for every item, one full run unmasked and one per head with that head removed."""
    rows: list[dict] = []
    for item in items:
        inputs, letter_ids = prepare_item(loaded, item, cfg)
        base = first_token_measure(loaded, inputs, letter_ids, cfg)
        rows.append(measurement_row(item, BASELINE, BASELINE, base, base.logp))
        progress(1)
        for layer, head in heads:
            with mask_heads(loaded, [(layer, head)]):
                m = first_token_measure(loaded, inputs, letter_ids, cfg)
            rows.append(measurement_row(item, layer, head, m, base.logp))
            progress(1)
    return rows


# name → "module:function"; resolved lazily so engines can build on this module without import cycles.
ENGINES: dict[str, str] = {
    "naive": "probe.sweep:naive_sweep",
    "exact": "probe.exact:exact_sweep",
    "attribution": "probe.attribution:attribution_sweep",
}


def get_engine(name: str) -> Callable[..., list[dict]]:
    import importlib

    module, func = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), func)
