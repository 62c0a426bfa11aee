"""Approximate sweep by attribution patching (DESIGN §4): one forward and one (batched) backward per item.

Every head gets a gate g (1 = kept) on its slice of the o_proj input. The option-letter logits z are linearised
in the gates at g = 1, so masking head (L, h) is estimated as z − ∂z/∂g_{L,h}; probability accuracy, p(answer)
and KL are then computed from the estimated logits. It is a first-order estimate, not the exact sweep: run.json
marks it approximate and `bench/sweep.py` reports its rank correlation with the exact engine. Accuracy needs
generation, which a linearisation cannot give, so its column is NaN.

On a model split over several devices (probe/dispatch.py) the forward and backward cross devices through
accelerate's hooks and autograd; the gates live on the first device and each layer's slice moves to its own.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from probe.masking import HeadMask
from probe.metrics import letter_log_probs
from probe.models import LoadedModel
from probe.prompting import ItemLike
from probe.sweep import BASELINE, Measurement, SweepConfig, measurement_row, prepare_item


def option_logit_jacobian(
    loaded: LoadedModel, inputs: dict[str, torch.Tensor], letter_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Option logits z [k] at the first generated position and dz/dgate [k, n_layers, n_heads]."""
    g = loaded.geometry
    gates = torch.ones(g.n_layers, g.n_heads, device=loaded.device, requires_grad=True)
    model = loaded.model
    was = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # gradients w.r.t. the gates only
    try:
        with torch.enable_grad(), HeadMask(loaded, {layer: gates[layer] for layer in range(g.n_layers)}):
            logits = model(**inputs, logits_to_keep=1).logits[0, -1]
            z = logits[letter_ids].float()
            eye = torch.eye(len(letter_ids), device=z.device)
            (jac,) = torch.autograd.grad(z, gates, grad_outputs=eye, is_grads_batched=True)
    finally:
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    return z.detach(), jac


def attribution_sweep(
    loaded: LoadedModel,
    items: Sequence[ItemLike],
    heads: Sequence[tuple[int, int]],
    cfg: SweepConfig,
    progress: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    rows: list[dict] = []
    for item in items:
        inputs, letter_ids = prepare_item(loaded, item, cfg)
        z, jac = option_logit_jacobian(loaded, inputs, letter_ids)
        base_logp = letter_log_probs(z)
        rows.append(measurement_row(item, BASELINE, BASELINE, Measurement(base_logp, None), base_logp))
        for layer, head in heads:
            est = letter_log_probs(z - jac[:, layer, head])  # gate 1 → 0, first order
            rows.append(measurement_row(item, layer, head, Measurement(est, None), base_logp))
        progress(1 + len(heads))
    return rows
