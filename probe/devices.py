"""Where and in what precision a command runs: ``--device auto`` and ``--dtype auto`` (the defaults).

``auto`` picks what every HF tool picks: the visible GPU when there is one (under ``torchrun``, the rank's
``LOCAL_RANK`` GPU), else the CPU; bfloat16 on a GPU that supports it, float32 anywhere else — so the CPU
numbers the tests and the README quote stay fp32. Explicit choices are checked against the machine: ``--device
cuda`` without a GPU, or ``--dtype bfloat16`` where neither the GPU nor the CPU supports it, is bad input.
The machine is read through ``DeviceQuery`` so the tests can substitute one GPU, several, with or without bf16.

Several GPUs (DESIGN §12): ``auto`` gives a process *its share* of the visible GPUs — all of them without
``torchrun``; under ``torchrun`` with LOCAL_WORLD_SIZE = k ranks on n GPUs, rank r gets GPUs [r·n/k, (r+1)·n/k)
— and a share of more than one GPU spreads one model over them (a 72B model needs 2+ GPUs in bf16), split by
layers (probe/dispatch.py). ``--device cuda:0,cuda:1`` names the GPUs explicitly; ``--device cuda`` is one GPU.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from probe.errors import BadInput, ascii_int, counted

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


@dataclass(frozen=True)
class DeviceQuery:
    """What this machine offers (``DeviceQuery.probe()``), or a substitute in tests."""

    cuda_names: tuple[str, ...] = ()
    cuda_bf16: bool = False
    cpu_bf16: bool = True
    cpu_threads: int = 1
    cuda_memory: tuple[int, ...] = ()  # total bytes per GPU; () = unknown (then a device map is not checked for fit)
    flash_attn: bool = False  # the flash-attn package is installed (attn_implementation flash_attention_2)
    cpu_memory: int | None = None  # bytes of RAM available now (Linux MemAvailable); None = unknown (not checked)
    cuda_bf16_each: tuple[bool, ...] = ()  # native bf16 per GPU (a box may mix A100s and V100s); () = cuda_bf16 on all
    # GPU index → its free bytes now (None: unknown, its total is used). What other processes hold is not the run's:
    # fitting a model to the totals loaded it into an out-of-memory crash. Asked only of the GPUs a process is
    # given (resolve_placement): reading one makes a CUDA context there, which every rank would leave on every GPU
    cuda_free: Callable[[int], int | None] | None = None

    def gpu_bf16(self, index: int) -> bool:
        """Whether GPU ``index`` runs bfloat16 natively."""
        return self.cuda_bf16_each[index] if self.cuda_bf16_each else self.cuda_bf16

    @staticmethod
    def probe() -> "DeviceQuery":
        import torch

        names: tuple[str, ...] = ()
        memory: tuple[int, ...] = ()
        bf16 = False
        each: tuple[bool, ...] = ()
        if torch.cuda.is_available():
            names = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            memory = tuple(torch.cuda.get_device_properties(i).total_memory for i in range(len(names)))
            # native bf16 only: torch counts a V100's or T4's emulated bf16 as support, which runs slower than
            # float32 there (auto) and is not the precision asked for (explicit bfloat16); asked of each GPU, since
            # torch asks the current one only and a model may spread over an A100 and a V100
            each = tuple(_native_bf16(i) for i in range(len(names)))
            bf16 = all(each)
        try:
            cpu_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            cpu_bf16 = True  # no way to ask: torch's CPU kernels emulate bf16
        import importlib.util

        return DeviceQuery(names, bf16, cpu_bf16, torch.get_num_threads(), memory,
                           importlib.util.find_spec("flash_attn") is not None, available_ram(), each,
                           cuda_free_bytes if names else None)


def cuda_free_bytes(index: int) -> int | None:
    """GPU ``index``'s free bytes for this process: what the driver says every process leaves
    (``torch.cuda.mem_get_info``) plus the blocks torch's allocator here holds but no tensor uses (a model an earlier
    stage of analyses.replicate loaded in this process is gone, its blocks kept: the driver counts them used, and
    the next stage's fit checks saw that much less); None where the driver cannot say."""
    import torch

    try:
        cached = int(torch.cuda.memory_reserved(index)) - int(torch.cuda.memory_allocated(index))
        return int(torch.cuda.mem_get_info(index)[0]) + max(cached, 0)
    except (RuntimeError, AssertionError, AttributeError):
        return None


def _native_bf16(index: int) -> bool:
    import torch

    with torch.cuda.device(index):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def available_ram() -> int | None:
    """RAM a new allocation can get without swapping (``MemAvailable`` of /proc/meminfo), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu", "cuda:0", ...: where inputs go and the embeddings sit (the first of ``devices``)
    dtype: str  # "float32", "bfloat16", "float16"
    attn_implementation: str
    description: str  # the first line a command prints
    devices: tuple[str, ...] = ()  # every device the model is spread over, in layer order; () = (device,)
    device_memory: tuple[int, ...] = ()  # bytes per entry of ``devices`` where known (a device map must fit)
    memory_kind: str = ""  # what ``device_memory`` counts: "free" (GPUs' free memory, the CPU's free RAM) or "total"

    @property
    def all_devices(self) -> tuple[str, ...]:
        return self.devices or (self.device,)

    def record(self) -> dict[str, Any]:
        """What a run's record (run.json, replicate.json) says of where it ran."""
        return {"device": self.device, "devices": list(self.all_devices), "dtype": self.dtype,
                "attn_implementation": self.attn_implementation, "description": self.description}

    @property
    def spread(self) -> bool:
        """One model over several devices (accelerate device map), rather than on one."""
        return len(self.all_devices) > 1

    @property
    def device_type(self) -> str:
        """"cpu" or "cuda": what makes results comparable (the index differs between torchrun ranks)."""
        return self.device.split(":")[0]


def gpu_share(n_gpus: int, local_rank: int | None, local_world: int | None) -> list[int]:
    """The GPU indices ``--device auto`` gives this process: all of them, or under torchrun the rank's share.

    Without LOCAL_WORLD_SIZE (a rank number alone) a rank gets its own GPU, as HF tools do.
    """
    if local_rank is None or n_gpus == 0:
        return list(range(n_gpus))
    if local_rank >= n_gpus:
        raise BadInput(f"--device auto: rank {local_rank} has no GPU of its own ({n_gpus} visible); "
                       "run at most one process per GPU")
    if not local_world or local_world >= n_gpus:
        return [local_rank]
    if n_gpus % local_world:
        raise BadInput(f"--device auto: {n_gpus} GPUs cannot be shared evenly by {local_world} ranks "
                       "(run --nproc-per-node with a divisor of the GPU count, or set CUDA_VISIBLE_DEVICES)")
    per = n_gpus // local_world
    return list(range(local_rank * per, (local_rank + 1) * per))


def env_index(name: str) -> int | None:
    """A torchrun variable (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) as an integer ≥ 0, None when unset.
    Anything else is bad input: int() raised a traceback, and LOCAL_RANK=-1 picked the last GPU (cuda:-1 indexes
    from the end)."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        value = ascii_int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise BadInput(f"{name}={raw!r} in the environment: want an integer ≥ 0 (torchrun sets it)")
    return value


R = TypeVar("R")


def outside_inference_mode(run: Callable[..., R]) -> Callable[..., R]:
    """``run`` with autograd available whatever its caller's mode: a notebook's ``torch.inference_mode()`` would
    load the model as inference tensors, which no graph can use (the attribution engine's backward, a training
    step), and ``torch.enable_grad()`` inside cannot lift it. The caller's mode is its own again after. torch is
    imported when ``run`` runs: the commands' modules load without it."""
    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        import torch

        with torch.inference_mode(False):
            return run(*args, **kwargs)
    return wrapper


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (RANK / WORLD_SIZE as torchrun sets them; 0 and 1 alone)."""
    rank, world = env_index("RANK"), env_index("WORLD_SIZE")
    rank, world = 0 if rank is None else rank, 1 if world is None else world
    if not rank < world:  # RANK >= WORLD_SIZE took no chunk and exited 0 'waiting', with nothing done
        raise BadInput(f"RANK {rank} with WORLD_SIZE {world}: a rank is 0 .. WORLD_SIZE - 1")
    return rank, world


def resolve_placement(device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa",
                      query: DeviceQuery | None = None, local_rank: int | None = None,
                      local_world: int | None = None) -> Placement:
    q = query or DeviceQuery.probe()
    if local_rank is None:
        local_rank = env_index("LOCAL_RANK")
    if local_world is None:
        local_world = env_index("LOCAL_WORLD_SIZE")
    if local_rank is not None and local_world is not None and not local_rank < local_world:
        # as rank_world refuses RANK >= WORLD_SIZE: the share [r·n/k, (r+1)·n/k) lay past the last GPU (a traceback)
        raise BadInput(f"LOCAL_RANK {local_rank} with LOCAL_WORLD_SIZE {local_world}: a local rank is 0 .. "
                       "LOCAL_WORLD_SIZE - 1")
    n_gpus = len(q.cuda_names)
    per_rank = device == "auto" or "cuda" in [d.strip() for d in device.split(",")]
    if per_rank and n_gpus and local_world and local_world > n_gpus:
        # the launch's verdict, the same on every rank: ranks past the GPUs were refused while the others went on
        raise BadInput(f"--device {device}: {local_world} ranks on this machine, {n_gpus} GPU(s) visible: a rank "
                       "would have no GPU of its own; run at most one process per GPU")
    if device == "auto":
        devices = [f"cuda:{i}" for i in gpu_share(len(q.cuda_names), local_rank, local_world)] or ["cpu"]
    else:
        devices = [_check_device(d.strip(), q) for d in device.split(",")]
        if "cuda" in devices and (local_rank or 0) >= len(q.cuda_names):  # "cuda" is the rank's GPU: it must exist
            raise BadInput(f"--device {device}: rank {local_rank} has no GPU of its own ({len(q.cuda_names)} "
                           "visible); run at most one process per GPU")
        named = [d for d in devices if d.startswith("cuda:")]
        if named and ((local_world or 0) > 1 or (local_rank or 0) > 0):
            # every rank reads the same --device: named GPUs would hold every rank's copy of the model
            raise BadInput(f"--device {device}: under torchrun every rank would load its model on the same GPU(s) "
                           f"{','.join(named)}; use --device auto (each rank its share of the visible GPUs) or "
                           "cuda (the rank's own GPU), and CUDA_VISIBLE_DEVICES to choose them")
        devices = [f"cuda:{local_rank or 0}" if d == "cuda" else d for d in devices]
        if len(devices) > 1 and (len(set(devices)) < len(devices) or not all(d.startswith("cuda:") for d in devices)):
            raise BadInput(f"--device {device}: a list names distinct GPUs (cuda:0,cuda:1,…)")
    device = devices[0]
    on_gpu = device.startswith("cuda")
    no_bf16 = [d for d in devices if not q.gpu_bf16(int(d.split(":")[1]))] if on_gpu else []
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu and not no_bf16 else "float32"
    elif dtype not in DTYPE_NAMES:
        raise BadInput(f"unknown --dtype {dtype!r}; use auto or one of {', '.join(DTYPE_NAMES)}")
    dtype = DTYPE_NAMES[dtype]
    if dtype == "bfloat16" and (no_bf16 if on_gpu else not q.cpu_bf16):
        where = (f"this GPU ({no_bf16[0]})" if len(devices) == 1 else f"{', '.join(no_bf16)} of the GPUs"
                 ) if on_gpu else "this CPU"
        raise BadInput(f"--dtype bfloat16: {where} does not support bfloat16; use --dtype auto or float32")
    check_attention(attn_implementation, on_gpu, dtype, q)
    memory: tuple[int, ...] = ()
    kind = ""
    if on_gpu:
        index = [int(d.split(":")[1]) for d in devices]
        memory, kind = gpu_memory(q, index)
        gib = "" if not memory else "; " + " / ".join(f"{m / 2**30:.1f}" for m in memory) + (
            " GiB free" if kind == "free" else " GiB total, free unknown")
        if len(devices) == 1:
            where = f"device {device} ({q.cuda_names[index[0]]}{gib})"
        else:
            names = sorted({q.cuda_names[i] for i in index})
            where = (f"devices {','.join(devices)} ({len(devices)} × {' / '.join(names)}, "
                     f"one model split by layers{gib})")
    else:
        where = f"device cpu ({counted(q.cpu_threads, 'thread')})"
        memory, kind = ((q.cpu_memory,), "free") if q.cpu_memory else ((), "")
    return Placement(device, dtype, attn_implementation, f"{where}, dtype {dtype}, attention {attn_implementation}",
                     tuple(devices), memory, kind)


def gpu_memory(q: DeviceQuery, index: list[int]) -> tuple[tuple[int, ...], str]:
    """The bytes a model may take on GPUs ``index``, and which they are: each one's free memory where the driver
    says (``DeviceQuery.cuda_free``), else each one's total; () where neither is known."""
    free = [q.cuda_free(i) for i in index] if q.cuda_free else []
    if free and all(f is not None for f in free):
        return tuple(int(f) for f in free if f is not None), "free"
    return (tuple(q.cuda_memory[i] for i in index), "total") if q.cuda_memory else ((), "")


def check_attention(attn_implementation: str, on_gpu: bool, dtype: str, q: DeviceQuery) -> None:
    """flash_attention_2 needs a CUDA GPU, the flash-attn package and half precision: found before a weight loads
    (transformers' ImportError came as a traceback after the run had been planned)."""
    if attn_implementation != "flash_attention_2":
        return
    why = ("needs a CUDA GPU (this run is on the cpu)" if not on_gpu else
           "needs the flash-attn package, which is not installed" if not q.flash_attn else
           "runs in bfloat16 or float16, not float32" if dtype == "float32" else None)
    if why:
        raise BadInput(f"--attn-implementation flash_attention_2 {why}; use sdpa")


def _check_device(device: str, q: DeviceQuery) -> str:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInput(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu" and dev.index is not None:  # one CPU: "cpu:1" ran as the CPU but was taken for a GPU
        raise BadInput(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not q.cuda_names:
            raise BadInput(f"--device {device}: no CUDA GPU is visible on this machine (use --device auto or cpu)")
        if dev.index is not None and dev.index >= len(q.cuda_names):
            raise BadInput(f"--device {device}: only {len(q.cuda_names)} GPU(s) visible")
    elif dev.type != "cpu":
        raise BadInput(f"--device {device}: only cpu and cuda are supported")
    return device
