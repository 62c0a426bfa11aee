"""Head masking at one named site: the input of each decoder layer's attention output projection (DESIGN §2).

Masking head h of layer L multiplies the slice [h·d_head, (h+1)·d_head) of the o_proj input by a gate (0 removes
the head; 1 keeps it). This is the same as zeroing those columns of o_proj.weight, or TransformerLens'
``hook_z[:, :, h] = 0``; it acts after the attention softmax, so it cannot touch the causal mask, and it does
not depend on the attention implementation (eager / sdpa / flash). With GQA, h indexes *query* heads.

Never reshape the *output* of o_proj into heads: heads are already mixed there (STYLE 3).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from probe.errors import BadInput, RunStopped
from probe.models import LoadedModel


class HookDidNotFire(RunStopped):
    """A mask was registered for a layer whose o_proj never ran: the result would silently be unmasked. A run-time
    check like the others: one line, exit 1 (a RuntimeError, it ended the command in a traceback)."""


def apply_head_gate(x: torch.Tensor, gate: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Scale each head's slice of an o_proj input ``x`` [..., n_heads*d_head] by ``gate``.

    ``gate`` is [n_heads] (same for every row) or [batch, n_heads] (one mask per batch row).
    """
    head_dim = x.shape[-1] // n_heads
    xs = x.unflatten(-1, (n_heads, head_dim))
    # non-blocking: a host→GPU copy of the (CPU-built) gate otherwise waits for every kernel queued before it, once
    # per masked layer; stream order still puts the copy before the multiply
    g = gate.to(dtype=x.dtype, device=x.device, non_blocking=True)
    if g.dim() == 2:  # per row: broadcast over positions
        g = g.view(g.shape[0], *([1] * (x.dim() - 2)), n_heads)
    return (xs * g.unsqueeze(-1)).flatten(-2)


class HeadMask:
    """Context manager that gates heads of chosen layers; hooks are always removed on exit (baukit style).

    ``gates`` maps layer → gate tensor ([n_heads] or [batch, n_heads]). On a clean exit, every hooked layer
    must have run at least once, else HookDidNotFire (nnsight replaced exactly such a silent failure).
    """

    def __init__(self, loaded: LoadedModel, gates: Mapping[int, torch.Tensor], require_fired: bool = True):
        self.loaded = loaded
        self.gates = dict(gates)
        self.require_fired = require_fired
        self.fired: dict[int, int] = {}
        self._handles: list = []
        n_layers, n_heads = loaded.geometry.n_layers, loaded.geometry.n_heads
        for layer, gate in self.gates.items():
            if not 0 <= layer < n_layers:
                raise BadInput(f"layer {layer} out of range 0..{n_layers - 1}")
            if gate.shape[-1] != n_heads or gate.dim() not in (1, 2):
                raise ValueError(f"gate for layer {layer} has shape {tuple(gate.shape)}, want [..., {n_heads}]")

    def _hook(self, layer: int):
        n_heads = self.loaded.geometry.n_heads

        def pre_hook(module, args, kwargs):
            self.fired[layer] = self.fired.get(layer, 0) + 1
            x = args[0] if args else kwargs.pop("input")
            return (apply_head_gate(x, self.gates[layer], n_heads), *args[1:]), kwargs

        return pre_hook

    def __enter__(self) -> "HeadMask":
        try:
            for layer in self.gates:
                mod = self.loaded.o_proj(layer)
                self._handles.append(mod.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        except BaseException:  # __exit__ never runs for a failed __enter__: the hooks made so far would stay
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove()
        if exc_type is None and self.require_fired:
            silent = sorted(set(self.gates) - set(self.fired))
            if silent:
                raise HookDidNotFire(f"head-mask hooks of layers {silent} never fired: their o_proj modules did not "
                                     "run, so those heads were not masked")


def zero_gates(loaded: LoadedModel, heads: Iterable[tuple[int, int]]) -> dict[int, torch.Tensor]:
    """Gates that remove the given (layer, query head) pairs and keep everything else."""
    g = loaded.geometry
    gates: dict[int, torch.Tensor] = {}
    for layer, head in heads:
        if not 0 <= layer < g.n_layers:
            raise BadInput(f"layer {layer} out of range 0..{g.n_layers - 1}")
        if not 0 <= head < g.n_heads:
            raise BadInput(f"head {head} out of range 0..{g.n_heads - 1}")
        gates.setdefault(layer, torch.ones(g.n_heads))[head] = 0.0
    return gates


def mask_heads(loaded: LoadedModel, heads: Iterable[tuple[int, int]]) -> HeadMask:
    """``with mask_heads(m, [(3, 5)]): ...`` runs the model with head 5 of layer 3 removed."""
    return HeadMask(loaded, zero_gates(loaded, heads))
