"""Fine-tuning sharded over a ``torchrun`` launch with torch's FSDP2 (``fully_shard``): the engine, not ours. Full
fine-tuning, or LoRA (peft's adapters train, the frozen weights are sharded beside them; a checkpoint gathers the
adapters only).

``shard`` puts every decoder layer (the family table's ``layers_path``) and then the root under ``fully_shard`` on a
one-dimensional mesh of the launch's processes (gloo on the CPU, NCCL on GPUs, as accelerate's ``PartialState``
sets the process group up), before the optimiser is built, so the optimiser holds the sharded parameters
(DTensors). Each rank keeps 1/W of every weight, gradient and AdamW moment; a layer's weights are gathered for its
forward and backward and its gradients reduce-scattered (averaged over the ranks, as DDP averages them).

What the training loop needs besides, each a collective every rank calls at the same point:

* ``drop_unused_grads``: one process leaves ``grad`` None on a parameter no row of the batch reached (the vision
  tower on a text-only batch), and AdamW skips it (no decay, no moment update). FSDP2 must reduce-scatter the same
  parameters on every rank (a rank whose rows are all text would otherwise skip the tower's reduce-scatter the
  other rank runs), so ``shard`` asks it to reduce zeros for unused ones, and this sets back to None the gradients
  of parameters no rank's autograd graph reached (``reached``): the update is then one process's. A parameter
  reached with a gradient of exactly 0.0 (the vision tower behind Gemma3's zero-initialised projector weight)
  keeps it, as in one process: AdamW decays it and counts the step.
* ``full_model_state`` / ``full_optimizer_state``: the whole model's weights (torch's
  ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``) and AdamW's state in one process's layout
  (``optimizer.state_dict()`` with each sharded tensor gathered), complete on rank 0 only, which writes the
  checkpoint: a checkpoint and its trainer state are those of one process, and either resumes the other.
* ``load_optimizer_state``: a one-process trainer state into the sharded optimiser (each rank keeps its shard).
* ``first_non_finite``: the first parameter with a non-finite element on any rank (the same answer on all).

Flags and indices exchanged between ranks are built on ``comm_device`` (NCCL takes CUDA tensors only).

Loading (``load_for_sharding``): rank 0 alone reads the checkpoint, into CPU memory; every other rank builds the
model on the meta device (no weight read, no memory). ``shard`` then allocates each rank's shards on its device and
fills them from rank 0's tensors, one whole tensor broadcast at a time (torch's ``set_model_state_dict`` with
``broadcast_from_rank0``), buffers included, and which parameters train (rank 0's, from the checkpoint's load): a
device never holds the whole model, and the machine's RAM holds one copy of it, not one per process.

Checked against torch 2.13 (``torch.distributed.fsdp.fully_shard``, ``FSDPModule.set_reduce_scatter_unused_params``,
``torch.distributed.checkpoint.state_dict``, ``torch.distributed.tensor``) on the CPU with gloo, and 2.14.1 and
2.15.0 (2026-12-06). ``set_reduce_scatter_unused_params`` is new in torch 2.13 (2.11.0's and 2.12.0's wheels lack
it; 2.6.0, the oldest torch pyproject allows, ran everything but ``--fsdp``): ``unsupported`` says so before the
model loads.
"""
from __future__ import annotations

from typing import Any

import torch

# the first torch whose FSDPModule has set_reduce_scatter_unused_params, which drop_unused_grads relies on
FSDP_TORCH = "2.13"


def unsupported() -> str | None:
    """Why this torch cannot run ``--fsdp`` (None: it can). Without ``set_reduce_scatter_unused_params`` a rank
    whose rows all left the vision tower unused would skip the reduce-scatter the other ranks run; ``shard`` stopped
    on an AttributeError in every rank after the model had loaded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without torch.distributed
        FSDPModule = None
    if hasattr(FSDPModule, "set_reduce_scatter_unused_params"):
        return None
    return (f"--fsdp needs torch >= {FSDP_TORCH} (FSDPModule.set_reduce_scatter_unused_params); this is torch "
            f"{torch.__version__}: upgrade torch, or train without --fsdp")


def init(cpu: bool) -> tuple[int, int]:
    """The launch's process group (accelerate's ``PartialState``, which ``wait_for_everyone`` also uses); (rank,
    world)."""
    from probe.train import process_state

    state = process_state(cpu)
    return state.process_index, state.num_processes


def comm_device() -> torch.device:
    """Where a tensor must be for the launch's collectives: NCCL takes CUDA tensors only (the rank's GPU, which
    accelerate's ``PartialState`` made current), gloo CPU ones. A flag or an index built on the CPU would make every
    NCCL collective of it fail."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def load_for_sharding(ref: Any, dtype: str, device: str, rank: int) -> Any:
    """The ``LoadedModel`` of an ``--fsdp`` rank, inputs going to ``device``: on rank 0 the checkpoint read into CPU
    memory (``load_model``: its checks, RAM checked against the weights); on any other rank the same model on the
    meta device, no weight read. ``shard`` puts each rank's shards on ``device``."""
    from dataclasses import replace

    from probe.devices import available_ram
    from probe.models import (DTYPES, LoadedModel, _check_geometry, exact_fp32_convolutions, load_model,
                              load_processors, skeleton_of)

    if dtype == "float32" and torch.device(device).type != "cpu":  # load_model's, which reads on the CPU here
        exact_fp32_convolutions()
    if rank == 0:
        ram = available_ram()
        loaded = load_model(ref, dtype=dtype, device="cpu", device_memory=(ram,) if ram else (), logits_fp32=False)
        return replace(loaded, device=torch.device(device))
    attn = "sdpa"  # load_model's default, which rank 0's model has (compared by check_same_structure)
    tokenizer, processor = load_processors(ref)
    loaded = LoadedModel(ref, skeleton_of(ref, DTYPES[dtype], attn), tokenizer, processor, DTYPES[dtype],
                         torch.device(device), attn)
    _check_geometry(loaded)
    return loaded


def structure(model: torch.nn.Module) -> list[tuple]:
    """What every rank's model must share for FSDP's collectives to pair up and rank 0's tensors to fit: the
    attention implementation, and each parameter's and buffer's name, shape and dtype, with the name of the first
    parameter it is (a tied head names the embeddings) and whether it trains (the ranks' optimisers and
    reduce-scatters must hold the same parameters)."""
    out: list[tuple] = [("attn", getattr(model.config, "_attn_implementation", None))]
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.append((name, tuple(p.shape), str(p.dtype), first.setdefault(id(p), name), p.requires_grad))
    out += [(name, tuple(b.shape), str(b.dtype)) for name, b in model.named_buffers(remove_duplicate=False)]
    return out


def check_same_structure(model: torch.nn.Module, when: str) -> None:
    """Every rank's ``structure`` is rank 0's, or every rank raises the same error, naming the first rank that
    differs and how (together: one rank stopping alone would leave the others waiting in a collective). Guards the
    meta-device build of ranks other than 0 against the model rank 0 read (a transformers release building either
    differently would load tensors into the wrong places)."""
    import torch.distributed as dist

    mine = structure(model)
    theirs = [mine]
    dist.broadcast_object_list(theirs, src=0)
    differ = next((f"{a} vs rank 0's {b}" for a, b in zip(mine, theirs[0]) if a != b),
                  None if len(mine) == len(theirs[0]) else f"{len(mine)} entries vs rank 0's {len(theirs[0])}")
    found: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, differ)
    rank, differ = next(((r, d) for r, d in enumerate(found) if d is not None), (None, None))
    if differ is not None:
        import transformers

        from probe.errors import RunStopped

        raise RunStopped(f"--fsdp: rank {rank}'s model differs from rank 0's {when} ({differ}): rank 0's tensors "
                         f"would not load into its shards (transformers {transformers.__version__}, torch "
                         f"{torch.__version__}); train without --fsdp")


def shard(model: torch.nn.Module, layers_path: str, device: torch.device, world: int) -> torch.nn.Module:
    """Every decoder layer, then the root, under ``fully_shard`` on ``device``'s type (in place; the model's class
    becomes FSDP's subclass of it), each rank's shards then filled from rank 0's model (``load_for_sharding``: rank 0
    holds the weights, in CPU memory; the others a meta-device model). Call before the optimiser is built."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    # which parameters train is rank 0's, as in one process: from_pretrained's loaded parameters all require grad,
    # where the config's build leaves some frozen (Qwen2-Audio's sinusoidal embed_positions), so the ranks' root
    # groups reduce-scattered gradients of different sizes (gloo aborted in the first backward)
    trains = [{n: p.requires_grad for n, p in model.named_parameters()}]
    dist.broadcast_object_list(trains, src=0)
    for n, p in model.named_parameters():
        p.requires_grad_(trains[0].get(n, p.requires_grad))
    check_same_structure(model, "as loaded")
    # rank 0's whole tensors, kept by reference: fully_shard copies each rank's share out of them
    full = model.state_dict() if rank == 0 else {}
    mesh = init_device_mesh(device.type, (world,))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's LoRA wrapper
    for layer in inner.get_submodule(layers_path):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.set_reduce_scatter_unused_params(True)  # every rank reduces the same parameters (drop_unused_grads)
    if rank != 0:
        model.to_empty(device=device)  # this rank's shards and the buffers, allocated, not yet filled
    check_same_structure(model, "sharded")  # (to_empty keeps a tied head tied)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for _, b in model.named_buffers():  # non-persistent ones too (RoPE's inv_freq), not in a state dict
        dist.broadcast(b, src=0)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def reached(loss: torch.Tensor) -> set[int]:
    """The ids of the leaf tensors ``loss``'s autograd graph reaches (under FSDP2 the unsharded parameters of the
    forward): the parameters this rank's backward gives a gradient, as one process's would, zero or not."""
    leaves: set[int] = set()
    seen: set = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # an AccumulateGrad node
        if var is not None:
            leaves.add(id(var))
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


def _sharded_of_unsharded(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """id of each FSDP parameter's unsharded tensor (the one the forward uses) → its sharded parameter."""
    from torch.distributed.fsdp import FSDPModule

    out = {}
    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            for fp in group.fsdp_params if group is not None else ():
                if hasattr(fp, "_unsharded_param"):
                    out[id(fp._unsharded_param)] = fp.sharded_param
    return out


def drop_unused_grads(params: list[torch.Tensor], model: torch.nn.Module, reached_ids: set[int]) -> None:
    """Gradients of the parameters no rank's backward reached (``reached`` of each of its losses) become None, as
    one process leaves them (see the module docstring); a reached parameter keeps its gradient, zero or not. One
    all-reduce."""
    import torch.distributed as dist

    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    used_here = {id(s) for u, s in _sharded_of_unsharded(model).items() if u in reached_ids} | reached_ids
    here = [id(p) in used_here for p in with_grad]
    if reached_ids and not any(here):  # FSDP2's private names moved: every gradient would be dropped
        raise RuntimeError(f"torch {torch.__version__}: none of the parameters this rank's backward reached maps to a "
                           "sharded parameter (FSDP2's _fsdp_param_group / _unsharded_param changed?): --fsdp would "
                           "drop every gradient and train nothing")
    used = torch.tensor(here, dtype=torch.uint8, device=comm_device())
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    for p, u in zip(with_grad, used.tolist()):
        if not u:
            p.grad = None


def global_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s total norm as a float (a DTensor under FSDP2: its full value)."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def most_over_ranks(count: int) -> int:
    """The largest of the ranks' ``count`` (every rank takes part)."""
    import torch.distributed as dist

    found = torch.tensor([count], dtype=torch.int64, device=comm_device())
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return int(found)


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """The ranks' mean of a scalar (a sum then a division: gloo has no average)."""
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world


def first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first floating-point parameter with a NaN or infinity on any rank's shard, or None."""
    import torch.distributed as dist

    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    bad = next((i for i, (_, p) in enumerate(named) if not bool(torch.isfinite(_local(p.detach())).all())),
               len(named))
    found = torch.tensor([bad], dtype=torch.int64, device=comm_device())
    dist.all_reduce(found, op=dist.ReduceOp.MIN)
    i = int(found)
    return named[i][0] if i < len(named) else None


def full_model_state(model: torch.nn.Module, frozen: bool = True) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU, on rank 0 (``{}`` elsewhere); every rank takes part. Without the
    ``frozen`` parameters (LoRA's checkpoint needs its adapters only: a 72B model's frozen weights would be gathered
    into rank 0's RAM at every save)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=not frozen))
    # names of one parameter (lm_head tied to embed_tokens) are gathered as separate copies; made one tensor again,
    # so save_pretrained drops the tied name as it does for one process's (else the checkpoint holds the head twice
    # and reads as untied)
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first.setdefault(id(p), name)]
    return state


def full_optimizer_state(opt: torch.optim.Optimizer, rank: int) -> dict[str, Any] | None:
    """The optimiser's ``state_dict()`` as one process holds it (parameter indices, whole tensors on the CPU), on
    rank 0 (None elsewhere); every rank gathers each sharded tensor in the same order."""
    from torch.distributed.tensor import DTensor

    saved = opt.state_dict()
    state = {}
    for key in sorted(saved["state"]):
        state[key] = {}
        for name, value in sorted(saved["state"][key].items()):
            if isinstance(value, DTensor):
                value = value.full_tensor()  # a collective: every rank, one tensor at a time; rank 0 keeps it
            if rank == 0:
                state[key][name] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    return {"state": state, "param_groups": saved["param_groups"]} if rank == 0 else None


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """A one-process optimiser state (``full_optimizer_state``'s, or one process's own) into the sharded optimiser:
    each whole tensor is cut into this rank's shard of its parameter's layout before the optimiser takes it, one at a
    time (torch's ``load_state_dict`` moves every state tensor to its parameter's device first: given whole ones, it
    put the whole AdamW state on each rank's GPU at once, two float32 copies of the model)."""
    from itertools import chain

    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(zip(chain.from_iterable(g["params"] for g in saved["param_groups"]),
                      chain.from_iterable(g["params"] for g in opt.param_groups)))
    state = {}
    for key, st in saved["state"].items():  # the same order on every rank (one file): distribute_tensor scatters
        p = params.get(key)
        state[key] = {name: distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                      if isinstance(p, DTensor) and isinstance(value, torch.Tensor) and value.shape == p.shape
                      else value for name, value in st.items()}
    opt.load_state_dict({**saved, "state": state})
