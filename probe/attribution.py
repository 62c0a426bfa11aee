"""Approximate sweep by attribution patching (DESIGN §4): one forward and one (batched) backward per item.

Every head gets a gate g (1 = kept) on its slice of the o_proj input. The option-letter logits z are linearised
in the gates at g = 1, so masking head (L, h) is estimated as z − ∂z/∂g_{L,h}; probability accuracy, p(answer)
and KL are then computed from the estimated logits. It is a first-order estimate, not the exact sweep: run.json
marks it approximate and `bench/sweep.py` reports its rank correlation with the exact engine. Accuracy needs
generation, which a linearisation cannot give, so its column is NaN.

On a model split over several devices (probe/dispatch.py) the forward and backward cross devices through
accelerate's hooks and autograd; the gates live on the first device and each layer's slice moves to its own.

Several items can share one forward and backward (``SweepConfig.attribution_items``, ``probe.heads
--attribution-items``): right-padded, so that no real token's position depends on the padding (in every family's
RoPE, M-RoPE's too), each row with its own gates, so rows stay independent and one backward gives every row's
Jacobian; tests/test_engines.py holds the batched numbers to the one-item ones. The default is one item a pass:
on an H200 (Qwen2-VL-7B, bf16, shapes warmed up) 8 items a pass cost 0.19 s an item against 0.17 s one at a time
(padding puts attention on its masked, slower kernels) and 77 GiB against 23 GiB; it may pay for many short
prompts. A pass that runs out of memory is halved and retried, and the rest of the run holds the smaller number of
items a pass (``probe.batch.run_halving``, as the exact engine and probe.eval do).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from probe.batch import BatchLimit, collate, pad_token, plan_batches, run_halving
from probe.masking import HeadMask
from probe.metrics import letter_log_probs
from probe.models import LoadedModel
from probe.prompting import ItemLike
from probe.sweep import BASELINE, Measurement, SweepConfig, measurement_row, prepare_item
from probe.upstream import head_must_run, logits_at


# attention implementations whose backward the batched backward (torch's vmap over it) cannot run: flash-attn's
# writes its gradients into preallocated dq/dk/dv (a custom op that mutates its arguments), which vmap's fallback
# refuses ("the fallback path doesn't work on out= or view ops"; reasoned from the sources, not run on a GPU)
UNBATCHED_BACKWARD = frozenset({"flash_attention_2"})


def option_logit_jacobians(
    loaded: LoadedModel, inputs: Sequence[dict[str, torch.Tensor]], letter_ids: Sequence[list[int]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per item, its option logits z [k] at the first generated position and dz/dgate [k, n_layers, n_heads], from
    one forward and one batched backward over all the items (right-padded, a gate tensor per row)."""
    g = loaded.geometry
    n = len(inputs)
    batch = inputs[0] if n == 1 else collate(inputs, pad_token(loaded), left=False)
    last = [x["input_ids"].shape[1] - 1 for x in inputs]
    keep = sorted(set(last))
    gates = torch.ones(n, g.n_layers, g.n_heads, device=loaded.device, requires_grad=True)
    model = loaded.model
    was = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # gradients w.r.t. the gates only
    try:
        with torch.enable_grad(), HeadMask(loaded, {layer: gates[:, layer] for layer in range(g.n_layers)}), \
                head_must_run(model, loaded.family.lm_head_path):
            if n == 1:
                rows = model(**batch, logits_to_keep=1).logits[:, -1]
            else:
                logits = logits_at(model, batch, keep)
                at = torch.tensor([keep.index(t) for t in last], device=logits.device)
                rows = logits[torch.arange(n, device=logits.device), at]
            k = max(len(ids) for ids in letter_ids)
            index = torch.tensor([ids + ids[:1] * (k - len(ids)) for ids in letter_ids], device=rows.device)
            z = rows.gather(1, index).float()  # [n, k]; a row's extra columns repeat its first letter, unread
            eye = torch.eye(k, device=z.device)[:, None, :].expand(k, n, k).contiguous()
            if loaded.attn_implementation in UNBATCHED_BACKWARD:  # one backward per option letter: same gradients
                jac = torch.stack([torch.autograd.grad(z, gates, grad_outputs=eye[j], retain_graph=j < k - 1)[0]
                                   for j in range(k)])
            else:
                (jac,) = torch.autograd.grad(z, gates, grad_outputs=eye, is_grads_batched=True)  # [k, n, L, H]
    finally:
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    return [(z[r, :len(ids)].detach(), jac[:len(ids), r]) for r, ids in enumerate(letter_ids)]


def option_logit_jacobian(
    loaded: LoadedModel, inputs: dict[str, torch.Tensor], letter_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Option logits z [k] at the first generated position and dz/dgate [k, n_layers, n_heads] of one item."""
    return option_logit_jacobians(loaded, [inputs], [letter_ids])[0]


def attribution_sweep(
    loaded: LoadedModel,
    items: Sequence[ItemLike],
    heads: Sequence[tuple[int, int]],
    cfg: SweepConfig,
    progress: Callable[[int], None] = lambda n: None,
    limit: BatchLimit | None = None,
) -> list[dict]:
    """Estimated rows in ``naive_sweep``'s order. ``limit``: items per forward + backward (default
    ``cfg.attribution_items``), halved where a pass runs out of memory and kept so for later calls given the same
    limit (``run_halving``); items are still prepared ``cfg.attribution_items`` at a time."""
    limit = limit if limit is not None else BatchLimit(cfg.attribution_items, scope="this sweep")
    rows: list[dict] = []
    n = cfg.attribution_items
    for start in range(0, len(items), n):
        chunk = items[start:start + n]
        # one processor call per item, not evaluate_items' one per window (encode_prompts): measured, it does not
        # pay here. CPU, 1 thread, organism-vl's image items: preparing took 1.1 ms an item of the sweep's 22 ms (5 %);
        # one call per 8 items saved 0.2 ms (1 %), per 32 items 0.5 ms (2 %); a random-config Qwen2-VL-7B (2 layers,
        # 224 px images) 3.6 ms of 11.6 s. At the default of one item a pass a chunk is one item: one call anyway
        prepared = [prepare_item(loaded, item, cfg) for item in chunk]
        inputs = [p[0] for p in prepared]
        got: list = [None] * len(chunk)

        def keep(idx: list[int], jacobians: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            for i, zj in zip(idx, jacobians):
                got[i] = zj

        run_halving(loaded, plan_batches(inputs, limit.rows, max_padding=None), limit,
                    lambda rows: option_logit_jacobians(loaded, [inputs[i] for i in rows],
                                                        [prepared[i][1] for i in rows]), keep)
        for item, (z, jac) in zip(chunk, got):
            # on the CPU once: one small op and one device sync per head would cost more than the backward (an H200
            # spent about 0.3 s an item on them for Qwen2-VL-7B's 784 heads)
            z, jac = z.cpu(), jac.cpu()
            base_logp = letter_log_probs(z)
            est = letter_log_probs(z - jac.permute(1, 2, 0))  # [layers, heads, k]: gate 1 → 0, first order
            rows.append(measurement_row(item, BASELINE, BASELINE, Measurement(base_logp, None), base_logp))
            for layer, head in heads:
                rows.append(measurement_row(item, layer, head, Measurement(est[layer, head], None), base_logp))
            progress(1 + len(heads))
    return rows
