"""One model over several devices (DESIGN §12): a device map balanced by layers, applied through accelerate.

A 72B model (144 GB in bf16) fits on no single GPU. The map cuts the model into units — each decoder layer is
one unit, never split (its residual add and KV cache live on one device); everything the decoder reads before
its first layer (embeddings, vision or audio tower, projector, rotary embedding) goes to the first device, the
final norm and lm_head to the last (to the first when lm_head is tied to the embeddings) — and gives each device
a contiguous block of layers (possibly none) so that the largest device holds as few bytes as possible
(with the devices' memory known: as small a share of it). accelerate's hooks
(``dispatch_model``) then move every unit's inputs to its device; the engines, which call decoder layers
directly, move the residual stream themselves (probe/exact.py).

The plan is made from a model built on the meta device (no weights read), so a map that cannot fit the GPUs
is bad input before a 144 GB download is opened (STYLE 5). Everything family-specific comes from the family
table: ``layers_path``, ``norm_path``, ``lm_head_path``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn

from probe.errors import BadInput

# Room a device keeps for activations, the exact engine's stacked rows and KV caches: 8 % and 1 GiB.
HEADROOM_FRACTION = 0.92
HEADROOM_BYTES = 1 << 30


@dataclass(frozen=True)
class Unit:
    """A piece of the model that sits whole on one device: a module or a lone parameter (device-map key)."""

    name: str
    nbytes: int
    kind: Literal["pre", "layer", "post"]


@dataclass(frozen=True)
class DeviceMap:
    """Where every unit goes, and what that costs each device."""

    device_map: dict[str, str]  # unit name → device, as accelerate / from_pretrained take it
    devices: tuple[str, ...]
    layer_blocks: tuple[tuple[int, int], ...]  # per device: [first, last) decoder layer
    nbytes: tuple[int, ...]  # weight bytes per device

    def summary(self) -> str:
        parts = []
        for dev, (a, b), n in zip(self.devices, self.layer_blocks, self.nbytes):
            layers = f"layers {a}-{b - 1}" if b > a else "no layers"
            parts.append(f"{dev} {layers} ({n / 2**30:.1f} GiB)")
        return "device map: " + ", ".join(parts)


def module_nbytes(module: nn.Module) -> int:
    own = {id(t): t for t in [*module.parameters(), *module.buffers()]}  # tied tensors once
    return sum(t.numel() * t.element_size() for t in own.values())


def model_units(model: nn.Module, layers_path: str, post_paths: Sequence[str]) -> list[Unit]:
    """The model cut into units in forward order: pre units, one unit per decoder layer, post units."""
    pre: list[Unit] = []
    post: list[Unit] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, p in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            pre.append(Unit(f"{prefix}{name}", p.numel() * p.element_size(), "pre"))
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == layers_path:
                continue
            if layers_path.startswith(full + "."):
                walk(full + ".", child)  # an ancestor of the decoder layers: open it up
            elif module_nbytes(child) or any(True for _ in child.parameters()):
                target = post if full in post_paths else pre
                target.append(Unit(full, module_nbytes(child), "post" if full in post_paths else "pre"))

    walk("", model)
    layers = model.get_submodule(layers_path)
    units = [Unit(f"{layers_path}.{i}", module_nbytes(layer), "layer") for i, layer in enumerate(layers)]
    return pre + units + post


def balance_layers(layer_bytes: Sequence[int], first_extra: int, last_extra: int, n_devices: int,
                   capacity: Sequence[float] = ()) -> list[int]:
    """Split layers into n_devices contiguous blocks in device order (returned as block ends), as evenly as the
    devices allow: the device loads over their ``capacity`` (bytes alone when not given), sorted from the largest
    down, lexicographically least — the fullest device as light as possible, then the next fullest, and so on (a
    minimised maximum alone let the devices under a heavy tower take any split: the last one all it could). The
    first device also holds ``first_extra`` bytes and the last ``last_extra`` (exact DP; n is small). A block may
    be empty: the first device's when the embeddings and vision tower already are its share, the last's when the
    head is."""
    n = len(layer_bytes)
    k = n_devices
    cap = list(capacity) or [1] * k
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)
    # best[j][i]: the least sorted (descending) load vector putting layers [0, i) on devices [0, j). Adding the
    # same loads to two vectors keeps their order, so the prefix's best is part of the whole's best.
    best: list[list[tuple[float, ...] | None]] = [[None] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = ()
    for j in range(1, k + 1):
        extra = (first_extra if j == 1 else 0) + (last_extra if j == k else 0)
        for i in range(n if j == k else 0, n + 1):  # the last device ends at layer n
            for s in range(i + 1):  # s == i (an empty block) last: on a tie a device takes layers
                before = best[j - 1][s]
                if before is None:
                    continue
                value = tuple(sorted((*before, (prefix[i] - prefix[s] + extra) / cap[j - 1]), reverse=True))
                if best[j][i] is None or value < best[j][i]:
                    best[j][i], cut[j][i] = value, s
    ends, i = [], n
    for j in range(k, 0, -1):
        ends.append(i)
        i = cut[j][i]
    return ends[::-1]


def usable_bytes(memory: int) -> float:
    """What a device of ``memory`` bytes may give the weights: the rest is headroom (activations, caches)."""
    return memory * HEADROOM_FRACTION - HEADROOM_BYTES


def plan_device_map(model: nn.Module, layers_path: str, norm_path: str, lm_head_path: str,
                    devices: Sequence[str], memory: Sequence[int] = (), memory_kind: str = "total") -> DeviceMap:
    """The device map of ``model`` (usually on the meta device) over ``devices``, balanced by layers.

    ``memory`` (bytes per device, when known) weighs the balance (GPUs of several sizes each fill the same share
    of what they can hold) and is checked with headroom: a map that does not fit is BadInput — which it is only
    where no contiguous map fits. A middle device left without layers is left out of the map. ``memory_kind``
    names what ``memory`` counts in the refusal ("free": what other processes leave; "total").
    """
    units = model_units(model, layers_path, (norm_path, lm_head_path))
    head = model.get_submodule(lm_head_path)
    tied = any(p is q for p in head.parameters() for q in model.get_input_embeddings().parameters())
    if tied:  # the head is the embedding matrix, already counted with the embeddings: no bytes of its own
        units = [Unit(u.name, 0, u.kind) if u.name == lm_head_path else u for u in units]
    pre = [u for u in units if u.kind == "pre"] + ([u for u in units if u.name == lm_head_path] if tied else [])
    post = [u for u in units if u.kind == "post" and not (tied and u.name == lm_head_path)]
    layers = [u for u in units if u.kind == "layer"]
    if memory and len(memory) != len(devices):
        raise ValueError(f"memory of {len(memory)} devices for a map over {len(devices)}")
    capacity = [max(usable_bytes(m), 1.0) for m in memory]
    ends = balance_layers([u.nbytes for u in layers], sum(u.nbytes for u in pre), sum(u.nbytes for u in post),
                          len(devices), capacity)
    starts = [0, *ends[:-1]]
    kept = [j for j in range(len(devices)) if j in (0, len(devices) - 1) or ends[j] > starts[j]]
    used = tuple(devices[j] for j in kept)
    blocks = tuple((starts[j], ends[j]) for j in kept)
    device_map: dict[str, str] = {u.name: used[0] for u in pre}
    for dev, (a, b) in zip(used, blocks):
        device_map.update({layers[i].name: dev for i in range(a, b)})
    device_map.update({u.name: used[-1] for u in post})
    # per block, not per device name: the CPU test setups name several devices "cpu"
    load = tuple(sum(layers[i].nbytes for i in range(a, b)) + (sum(u.nbytes for u in pre) if j == 0 else 0)
                 + (sum(u.nbytes for u in post) if j == len(blocks) - 1 else 0) for j, (a, b) in enumerate(blocks))
    plan = DeviceMap(device_map, used, blocks, load)
    for dev, need, have in zip(used, load, [memory[j] for j in kept] if memory else ()):
        usable = usable_bytes(have)
        if need > usable:
            raise BadInput(f"the model does not fit on {len(devices)} device(s): {dev} would hold "
                           f"{need / 2**30:.1f} GiB of weights, {have / 2**30:.1f} GiB {memory_kind or 'total'} "
                           f"({usable / 2**30:.1f} usable); use more GPUs or --dtype bfloat16")
    return plan


def meta_model(cls: type, config: Any, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """The model's modules with no storage (the meta device): sizes and names, no weights, no memory."""
    from accelerate import init_empty_weights

    attn = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with init_empty_weights(include_buffers=True):
        return cls._from_config(config, dtype=dtype, **attn)


def dispatch(model: nn.Module, plan: DeviceMap) -> nn.Module:
    """Attach accelerate's device hooks per the plan unless from_pretrained already did (it skips a map naming
    one device, which is what the CPU tests use: several "cpu" devices still go through the hooks)."""
    import logging
    import warnings

    from accelerate import dispatch_model

    if getattr(model, "_hf_hook", None) is None:
        # accelerate warns about "offloaded" parameters whenever a map names "cpu" (here nothing is offloaded:
        # the main device is the CPU) and about lone parameters as map keys (LLaVA's image_newline): both noise
        log = logging.getLogger("accelerate.big_modeling")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The following device_map keys do not match")
                dispatch_model(model, device_map=plan.device_map, main_device=plan.devices[0], force_hooks=True)
        finally:
            log.setLevel(level)
    return model
