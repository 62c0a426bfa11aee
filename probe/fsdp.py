"""Full fine-tuning sharded over a ``torchrun`` launch with torch's FSDP2 (``fully_shard``): the engine, not ours.

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

Checked against torch 2.13 (``torch.distributed.fsdp.fully_shard``, ``FSDPModule.set_reduce_scatter_unused_params``,
``torch.distributed.checkpoint.state_dict``, ``torch.distributed.tensor``) on the CPU with gloo.
"""
from __future__ import annotations

from typing import Any

import torch


def init(cpu: bool) -> tuple[int, int]:
    """The launch's process group (accelerate's ``PartialState``, which ``wait_for_everyone`` also uses); (rank,
    world)."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    return state.process_index, state.num_processes


def shard(model: torch.nn.Module, layers_path: str, device_type: str, world: int) -> torch.nn.Module:
    """Every decoder layer, then the root, under ``fully_shard`` (in place; the model's class becomes FSDP's
    subclass of it). Call before the optimiser is built."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    for layer in model.get_submodule(layers_path):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.set_reduce_scatter_unused_params(True)  # every rank reduces the same parameters (drop_unused_grads)
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
    used = torch.tensor([id(p) in used_here for p in with_grad], dtype=torch.uint8)
    if reached_ids and not bool(used.any()):  # FSDP2's private names moved: every gradient would be dropped
        raise RuntimeError(f"torch {torch.__version__}: none of the parameters this rank's backward reached maps to a "
                           "sharded parameter (FSDP2's _fsdp_param_group / _unsharded_param changed?): --fsdp would "
                           "drop every gradient and train nothing")
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    for p, u in zip(with_grad, used.tolist()):
        if not u:
            p.grad = None


def global_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s total norm as a float (a DTensor under FSDP2: its full value)."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


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
    found = torch.tensor([bad], dtype=torch.int64)
    dist.all_reduce(found, op=dist.ReduceOp.MIN)
    i = int(found)
    return named[i][0] if i < len(named) else None


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU, on rank 0 (``{}`` elsewhere); every rank takes part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
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
    each whole tensor is cut into this rank's shard of its parameter's layout."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    opt.load_state_dict(saved)
    for p, st in opt.state.items():
        if not isinstance(p, DTensor):
            continue
        for name, value in st.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                st[name] = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements)
