"""Where and in what precision a command runs: ``--device auto`` and ``--dtype auto`` (the defaults).

``auto`` picks what every HF tool picks: the visible GPU when there is one (under ``torchrun``, the rank's
``LOCAL_RANK`` GPU), else the CPU; bfloat16 on a GPU that supports it, float32 anywhere else — so the CPU
numbers the tests and the README quote stay fp32. Explicit choices are checked against the machine: ``--device
cuda`` without a GPU, or ``--dtype bfloat16`` where neither the GPU nor the CPU supports it, is bad input.
The machine is read through ``DeviceQuery`` so the tests can substitute one GPU, several, with or without bf16.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from probe.errors import BadInput

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


@dataclass(frozen=True)
class DeviceQuery:
    """What this machine offers (``DeviceQuery.probe()``), or a substitute in tests."""

    cuda_names: tuple[str, ...] = ()
    cuda_bf16: bool = False
    cpu_bf16: bool = True
    cpu_threads: int = 1

    @staticmethod
    def probe() -> "DeviceQuery":
        import torch

        names: tuple[str, ...] = ()
        bf16 = False
        if torch.cuda.is_available():
            names = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            bf16 = bool(torch.cuda.is_bf16_supported())
        try:
            cpu_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            cpu_bf16 = True  # no way to ask: torch's CPU kernels emulate bf16
        return DeviceQuery(names, bf16, cpu_bf16, torch.get_num_threads())


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "float32", "bfloat16", "float16"
    attn_implementation: str
    description: str  # the first line a command prints

    @property
    def device_type(self) -> str:
        """"cpu" or "cuda": what makes results comparable (the index differs between torchrun ranks)."""
        return self.device.split(":")[0]


def resolve_placement(device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa",
                      query: DeviceQuery | None = None, local_rank: int | None = None) -> Placement:
    q = query or DeviceQuery.probe()
    if local_rank is None and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
    if device == "auto":
        device = f"cuda:{local_rank or 0}" if q.cuda_names else "cpu"
    else:
        device = _check_device(device, q)
    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{local_rank or 0}"
    on_gpu = device.startswith("cuda")
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu and q.cuda_bf16 else "float32"
    elif dtype not in DTYPE_NAMES:
        raise BadInput(f"unknown --dtype {dtype!r}; use auto or one of {', '.join(DTYPE_NAMES)}")
    dtype = DTYPE_NAMES[dtype]
    if dtype == "bfloat16" and not (q.cuda_bf16 if on_gpu else q.cpu_bf16):
        raise BadInput(f"--dtype bfloat16: {'this GPU' if on_gpu else 'this CPU'} does not support bfloat16; "
                       "use --dtype auto or float32")
    if on_gpu:
        index = int(device.split(":")[1])
        where = f"device {device} ({q.cuda_names[index]})"
    else:
        where = f"device cpu ({q.cpu_threads} threads)"
    return Placement(device, dtype, attn_implementation, f"{where}, dtype {dtype}, attention {attn_implementation}")


def _check_device(device: str, q: DeviceQuery) -> str:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInput(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not q.cuda_names:
            raise BadInput(f"--device {device}: no CUDA GPU is visible on this machine (use --device auto or cpu)")
        if dev.index is not None and dev.index >= len(q.cuda_names):
            raise BadInput(f"--device {device}: only {len(q.cuda_names)} GPU(s) visible")
    elif dev.type != "cpu":
        raise BadInput(f"--device {device}: only cpu and cuda are supported")
    return device
