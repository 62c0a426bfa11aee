"""Match the LM tensors of several checkpoints by canonical name, with shape checks and the vocabulary rule.

DESIGN §5: vocabulary sizes can differ; the common leading rows are merged (each model is compared with the
reference on the rows both have) and the rest is kept from the reference (base or carrier), and reported. Any
other shape difference is bad input (exit 2).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from analyses.checkpoints import VOCAB_TENSORS, Checkpoint, TensorInfo, chunks, layer_module
from probe.errors import BadInput
from probe.lm_config import HeadGeometry


@dataclass(frozen=True)
class TensorPlan:
    """One canonical LM tensor across checkpoints; ``infos[0]`` is the reference."""

    canon: str
    infos: tuple[TensorInfo, ...]
    common: int  # leading flat elements present in every input (row-major: the common vocab rows)

    @property
    def ref(self) -> TensorInfo:
        return self.infos[0]

    @property
    def vocab_rows(self) -> tuple[int, ...]:
        return tuple(i.shape[0] for i in self.infos)

    def common_with(self, j: int) -> int:
        """Leading flat elements the reference and input ``j`` both have: Eq. 3 compares model j with the base on
        these, so its Δ does not depend on which other models (of fewer rows) share the run."""
        return leading_common((self.infos[0], self.infos[j]))


def paired_chunks(plan: TensorPlan, views: Sequence[torch.Tensor], size: int
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(j, reference chunk as float32, input j's chunk)`` over the flat elements input ``j`` (1-based, as in
    ``plan.infos``) shares with the reference, chunk by chunk: each reference chunk is read and converted once."""
    ends = [plan.common_with(j) for j in range(1, len(views))]
    for lo, hi in chunks(max(ends, default=0), size):
        b = views[0][lo:hi].float()
        for j, (v, end) in enumerate(zip(views[1:], ends), start=1):
            if lo < end:
                yield j, b[:min(hi, end) - lo], v[lo:min(hi, end)]


def leading_common(infos: Sequence[TensorInfo]) -> int:
    """Leading flat elements present in every one of ``infos`` (row-major: their common vocabulary rows)."""
    r = infos[0]
    if not r.shape or not r.shape[0]:
        return r.numel
    return min(i.shape[0] for i in infos) * (r.numel // r.shape[0])


@dataclass
class Alignment:
    tensors: list[TensorPlan]
    vocab: dict[str, Any] = field(default_factory=dict)  # what the vocabulary rule did, for reports
    head: dict[str, Any] = field(default_factory=dict)  # what the tied-head rule did (tied and untied mixed)

    @property
    def tied(self) -> bool:
        """No participant has its own lm_head: a merged LM of these ties it to its embedding too."""
        return all(t.canon != "lm_head.weight" for t in self.tensors)


def canon_order(canon: str) -> tuple:
    layer, module = layer_module(canon)
    group = {"embed_tokens.weight": 0, "norm.weight": 2, "lm_head.weight": 3}.get(canon, 1)
    return (group, layer if layer is not None else -1, module)


# What each command does with vocabulary rows that differ (``{ref}``: the reference, ``{rows}``: the rows all have),
# as its record says it: shift compares each model on the rows it shares with the reference, trajectory needs one
# set of coordinates for every point, the merge also keeps the rest.
VOCAB_RULES = {
    "merge": "each model compared with {ref} on the rows both have; the merged LM has {ref}'s {ref_rows} rows: the "
             "first {rows}, which all have, merged, {beyond}",
    "shift": "each model compared with {ref} on the rows both have; rows beyond are in no Δ",
    "features": "every checkpoint compared with {ref} on the first {rows} rows, which all have; rows beyond are in "
                "no feature",
}


def beyond_rows(ref: str, rows: Sequence[int]) -> str:
    """What a merge does with the rows past the common ones (``rows``: each participant's, the reference first): the
    reference's are kept, anyone else's past the reference's count are in no merged LM (a carrier keeps its own)."""
    kept = f"the rest kept from {ref}" if rows[0] > min(rows) else "none beyond"
    dropped = ("; rows others have beyond it are not in the merged LM (a carrier keeps its own)"
               if max(rows) > rows[0] else "")
    return kept + dropped


def align(ckpts: Sequence[Checkpoint], names: Sequence[str] | None = None, use: str = "merge") -> Alignment:
    """Plan the LM tensors of ``ckpts[0]`` (reference) against every other checkpoint; checks headers only.
    ``use`` (a ``VOCAB_RULES`` key) is what the caller does with differing vocabulary rows, for its record."""
    ref = ckpts[0]
    names = names or [c.name for c in ckpts]
    # lm_head is planned when any participant has its own: a tied one's head is its embedding (Checkpoint.lm_key),
    # so an untied expert's head is compared and merged whichever of them is the reference
    own_head = any(not ck.tied for ck in ckpts)
    canons = sorted(set(ref.lm) | ({"lm_head.weight"} if own_head else set()), key=canon_order)
    plans: list[TensorPlan] = []
    for canon in canons:
        infos = []
        for ck, nm in zip(ckpts, names):
            key = ck.lm_key(canon)
            if key is None:
                raise BadInput(f"LM tensor sets differ: {canon} is in {names[0]} but not in {nm}")
            infos.append(ck.infos[key])
        r = infos[0]
        for info, nm in zip(infos, names):
            if not info.dtype.is_floating_point:
                raise BadInput(f"{nm}: LM tensor {info.key} has non-float dtype {info.dtype}")
            same_rest = info.shape[1:] == r.shape[1:] and len(info.shape) == len(r.shape)
            if info.shape != r.shape and not (canon in VOCAB_TENSORS and same_rest):
                raise BadInput(
                    f"LM shapes differ: {canon} is {list(r.shape)} in {names[0]} but {list(info.shape)} in {nm}"
                )
        plans.append(TensorPlan(canon, tuple(infos), leading_common(infos)))
    for ck, nm in zip(ckpts[1:], names[1:]):  # both ways: a deeper expert's extra layers must not vanish
        extra = sorted(set(ck.lm) - set(ref.lm) - ({"lm_head.weight"} if ref.tied else set()), key=canon_order)
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise BadInput(f"LM tensor sets differ: {extra[0]}{more} is in {nm} but not in {names[0]}")
    check_head_geometry(ckpts, names)  # after the shapes, which name a wider or deeper LM more precisely
    vocab = {}
    for p in plans:
        if p.canon in VOCAB_TENSORS and len(set(p.vocab_rows)) > 1:
            vocab[p.canon] = {
                "rows": dict(zip(names, p.vocab_rows)),
                "common_rows": min(p.vocab_rows),
                "rule": VOCAB_RULES[use].format(ref=names[0], rows=min(p.vocab_rows), ref_rows=p.vocab_rows[0],
                                                beyond=beyond_rows(names[0], p.vocab_rows)),
            }
    embed = next((p for p in plans if p.canon == "embed_tokens.weight"), None)
    if embed is not None:
        check_token_ids(ckpts, names, min(embed.vocab_rows))
    head = {}
    if own_head and any(ck.tied for ck in ckpts):
        tied = list(dict.fromkeys(nm for ck, nm in zip(ckpts, names) if ck.tied))  # the base may be in --models too
        head = {"own_lm_head": list(dict.fromkeys(nm for ck, nm in zip(ckpts, names) if not ck.tied)), "tied": tied,
                "rule": f"lm_head compared/merged; tied {', '.join(tied)} contribute embed_tokens as lm_head"}
    return Alignment(plans, vocab, head)


def lm_geometry(ck: Checkpoint) -> HeadGeometry | None:
    """The head layout config.json gives the checkpoint's LM (None where it does not say: shapes are then all
    there is to check); one it gives wrong (0 heads) is bad input, as for probe.heads."""
    cfg = ck.text_config
    if any(k not in cfg for k in ("num_attention_heads", "hidden_size", "num_hidden_layers")):
        return None
    try:
        return HeadGeometry.from_text_config(cfg)
    except BadInput as exc:
        raise BadInput(f"{ck.name}: {exc}") from None


def check_head_geometry(ckpts: Sequence[Checkpoint], names: Sequence[str]) -> None:
    """Every LM splits its attention into the reference's heads. Equal tensor shapes do not say so: 4 heads of 8
    and 8 heads of 4 both make a 32x32 q_proj, so a merge of the two mixed unrelated rows with exit 0, and a carrier
    of the other layout got an LM its config splits wrongly."""
    ref = lm_geometry(ckpts[0])
    for ck, nm in zip(ckpts[1:], names[1:]):
        g = lm_geometry(ck)
        if ref is not None and g is not None and g != ref:
            raise BadInput(f"LM architectures differ: {nm} has {g.describe()} (config.json), {names[0]} "
                           f"{ref.describe()}; their weights cannot be compared or merged")


def check_token_ids(ckpts: Sequence[Checkpoint], names: Sequence[str], rows: int) -> None:
    """Row i of every vocabulary tensor must be the same token in every checkpoint: each token the reference's
    tokenizer maps below ``rows`` (the common rows that are compared/merged) must have the same id in the
    others'. Tokens only a carrier has (extra special tokens) are fine; a checkpoint without a tokenizer file
    (tiny random models) is not compared. The reference is the first checkpoint that has a tokenizer, so a base
    without one does not leave the others unchecked."""
    found = [(ids, nm) for ck, nm in zip(ckpts, names) if (ids := token_ids(ck.path)) is not None]
    if not found:
        return
    (ref, ref_name), others = found[0], found[1:]
    for ids, nm in others:
        if ids is ref:
            continue
        for tok, i in ref.items():
            if i < rows and ids.get(tok) != i:
                other = "absent" if tok not in ids else f"id {ids[tok]}"
                raise BadInput(f"tokenizers differ: token {tok!r} is id {i} in {ref_name} but {other} in {nm} "
                               f"(rows of different tokens would be compared/merged)")


def token_ids(model_dir: Path) -> dict[str, int] | None:
    """token -> id of a checkpoint dir's tokenizer (tokenizer.json, else vocab.json + added_tokens.json), read
    as JSON (no transformers import); None where it has none."""
    files = [model_dir / n for n in ("tokenizer.json", "vocab.json", "added_tokens.json")]
    key = tuple((str(f), st.st_mtime_ns, st.st_size) if f.is_file() and (st := f.stat()) else None for f in files)
    return _token_ids(key)


@functools.lru_cache(maxsize=16)
def _token_ids(key: tuple) -> dict[str, int] | None:
    tok_json, vocab_json, added_json = (Path(k[0]) if k else None for k in key)
    try:
        if tok_json is not None:
            t = json.loads(tok_json.read_text(encoding="utf-8"))
            vocab = (t.get("model") or {}).get("vocab")
            ids = ({p[0]: i for i, p in enumerate(vocab)} if isinstance(vocab, list)  # Unigram: [piece, score]
                   else dict(vocab) if isinstance(vocab, dict) else {})
            ids.update({a["content"]: a["id"] for a in t.get("added_tokens") or []})
            return ids
        if vocab_json is not None:
            ids = dict(json.loads(vocab_json.read_text(encoding="utf-8")))
            if added_json is not None:
                ids.update(json.loads(added_json.read_text(encoding="utf-8")))
            return ids
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise BadInput(f"{(tok_json or vocab_json).parent}: unreadable tokenizer ({exc})") from None
    return None


def check_finite(t: torch.Tensor, who: str, key: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise BadInput(f"{who}: tensor {key} contains NaN/Inf")


def check_delta_finite(ref: torch.Tensor, ref_name: str, ref_key: str, t: torch.Tensor, name: str, key: str) -> None:
    """After a non-finite sum over θ − θ_ref: the input that holds a NaN/Inf named, else (finite weights whose
    difference overflows fp32, past ±1.7e38) that: either is bad input, never an infinite Δ, norm or α."""
    check_finite(ref, ref_name, ref_key)
    check_finite(t, name, key)
    raise BadInput(f"{name}: tensor {key} differs from {ref_name}'s by more than fp32 holds (weights past ±1.7e38)")
