"""The project's one training loop (DESIGN §10): items → rows with the probe's prompt → AdamW steps.

``encode`` builds every row through the probe's own prompt builder (``probe.prompting.build_inputs``), with the loss
on the answer letter and the end of the turn (``<|im_end|>`` in ChatML) only, so a trained model's first generated
token is the letter the probe reads. ``train`` samples batches with a seeded generator, warms the learning rate up
linearly to its peak, then decays it on a cosine to 5 % of the peak at the last step (``lr_factor``), clips
gradients at 1.0, and keeps the LM and the rest (vision tower, projector) in parameter groups with their own
learning rates (LM, projector, vision tower; a rate of 0 freezes its group, as staged VLM recipes do), each split in
two: AdamW's weight decay on its weights, none on its biases and normalisation weights (``decays``, transformers'
Trainer's rule, which LLaMA-Factory and the paper's authors' tooling follow). A step runs
its batch in modality parts, each padded to its own length, with logits only where a label is predicted, and
accumulates their gradients: transformers' loss and gradient of the whole batch (tested against it), at a third less
work when clips share a batch with longer two-view images. A step whose loss or gradient norm is not finite stops
the run (``BadInput`` naming the step) before its update. The organisms' builder (``probe.zoo``) turns its recipes
into a ``TrainConfig`` and calls it; nothing here imports ``probe.zoo``.
Half precision is mixed precision: the weights (and AdamW's update of them) stay float32 and the forward runs under
autocast (``TrainConfig.autocast``), since bfloat16 weights round away any update under half their last bit.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from probe.errors import BadInput
from probe.devices import rank_world
from probe.prompting import TOKEN_KEYS, TYPE_KEYS, PromptTemplate, answer_token_ids, build_inputs, turn_end_id
from probe.sweep import check_positions
from probe.upstream import UpstreamChanged, check_adapters_in_lm, logits_at

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState

    from probe.models import LoadedModel, ModelRef

SEQ_KEYS = (*TOKEN_KEYS, "labels")


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float  # parameters outside the LM (vision tower, and projector unless projector_lr is given); 0: frozen
    lm_lr: float  # 0: the LM is frozen (LLaVA's stage 1)
    projector_lr: float | None = None  # the projector between tower and LM on its own rate; None: ``lr``
    batch: int = 32
    warmup: int = 50
    seed: int = 0
    weight_decay: float = 0.01  # on the parameters ``decays`` names; biases and normalisation weights get none
    # weight decay on every parameter, biases and norms included (the organisms' recipes were trained so and keep
    # it, so they rebuild byte for byte); False: ``decays``' rule
    decay_all: bool = False
    betas: tuple[float, float] = (0.9, 0.98)
    clip: float = 1.0
    min_lr_fraction: float = 0.05  # the cosine decays to this share of the peak
    log_every: int = 100
    # "cosine": warm-up, then the cosine; "overlapped": the warm-up multiplies a cosine running from step 0 (the
    # organisms' recipes were trained so and keep it, so they rebuild byte for byte); see lr_factor
    schedule: str = "cosine"
    autocast: str | None = None  # "bfloat16": the forward in it, the float32 weights updated in float32
    # how a step is run, not what it computes (the same gradient to float tolerance): rows per forward and backward,
    # the step's gradient accumulated over them (None: each modality part at once), and activations recomputed in
    # the backward instead of kept (transformers' gradient checkpointing) — both trade time for memory
    micro_batch: int | None = None
    checkpointing: bool = False
    # under torchrun: each decoder layer and the root sharded over the processes with torch's FSDP2 (probe.fsdp)
    # instead of every process holding the whole model (accelerate's DDP); the same run to float tolerance
    fsdp: bool = False

    def __post_init__(self) -> None:
        # every caller (finetune, replicate, the organisms' recipes) gets the same refusal: a NaN or negative rate
        # would train to NaN weights or climb the loss (gradient ascent) and still finish with exit 0
        for name in ("lr", "lm_lr", "projector_lr", "weight_decay"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and 0 <= v <= torch.finfo(torch.float32).max):
                raise BadInput(f"training setting {name} = {v}: must be a finite number ≥ 0 (within float32's range)")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise BadInput(f"training setting clip = {self.clip}: must be a finite number > 0")
        if not 0 <= self.min_lr_fraction <= 1 or not all(0 <= b < 1 for b in self.betas):
            raise BadInput(f"training settings min_lr_fraction = {self.min_lr_fraction}, betas = {self.betas}: "
                           "must lie in [0, 1] and [0, 1)")
        for name, low in (("steps", 1), ("batch", 1), ("log_every", 1), ("warmup", 0), ("seed", 0),
                          ("micro_batch", 1)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise BadInput(f"training setting {name} = {getattr(self, name)}: must be ≥ {low}")
        if self.schedule not in ("cosine", "overlapped") or self.autocast not in (None, "bfloat16"):
            raise BadInput(f"training settings schedule = {self.schedule!r}, autocast = {self.autocast!r}: schedule "
                           "is 'cosine' or 'overlapped', autocast None or 'bfloat16' (float16 would need loss scaling)")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning rate's share of its peak at 0-based ``step``. "cosine": linear warm-up to the peak at step
    ``warmup - 1`` (step 0 with no warm-up), then a cosine down to ``min_lr_fraction`` at the last step.
    "overlapped": the warm-up times a cosine that starts at step 0, so a warm-up that is a large share of the run
    never reaches the peak (0.6 of it for a warm-up of half the steps)."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0  # warmup 0: the peak from the start
    floor = cfg.min_lr_fraction
    if cfg.schedule == "overlapped":
        return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.steps))))
    peak = max(cfg.warmup, 1) - 1
    if step < peak:
        return warm
    progress = (step - peak) / max(1, cfg.steps - 1 - peak)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def encode(loaded: LoadedModel, items: Sequence, with_answer: bool,
           template: PromptTemplate = PromptTemplate()) -> list[dict[str, torch.Tensor]]:
    """One row per item: the prompt's tensors (batch dim dropped), with the answer and labels when training;
    ``_last``, ``_letters`` and ``_answer`` say where and what to read when measuring."""
    end = turn_end_id(loaded)
    out = []
    for it in items:
        b = build_inputs(loaded, it, template)
        b = {k: v[0] if k in TOKEN_KEYS else v for k, v in b.items()}
        n_prompt = b["input_ids"].shape[0]
        # the answer letter and the turn's end follow the prompt when training (probe.eval refuses such an item too)
        check_positions(loaded, it, n_prompt + 2 * with_answer, f"{n_prompt} prompt" + " + 2 answer" * with_answer,
                        "shorten the item or leave it out of the training set", "trained on")
        letter_ids = answer_token_ids(loaded, it.letters, template)
        if with_answer:
            at = b["input_ids"].device  # the model's device (build_inputs puts them there): a GPU's, not the CPU
            ans = torch.tensor([letter_ids[it.letters.index(it.answer)], end], device=at)
            b["input_ids"] = torch.cat([b["input_ids"], ans])
            b["attention_mask"] = torch.cat([b["attention_mask"],
                                             torch.ones(2, dtype=b["attention_mask"].dtype, device=at)])
            for k in TYPE_KEYS:  # the answer's tokens are text (until 2026-12-04 Gemma 3's token_type_ids were
                if k in b:       # left a row short and unsqueezed: batches of two prompt lengths crashed in collate)
                    b[k] = torch.cat([b[k], torch.zeros(2, dtype=b[k].dtype, device=at)])
            labels = torch.full_like(b["input_ids"], -100)
            labels[n_prompt:] = ans
            b["labels"] = labels
        b["_last"] = torch.tensor(n_prompt - 1)
        b["_letters"] = torch.tensor(letter_ids + [-1] * (26 - len(it.letters)))
        b["_answer"] = torch.tensor(ord(it.answer) - ord("A"))
        out.append(b)
    return out


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the sequence tensors (labels with -100), concatenate pixel tensors, stack ``_`` metadata."""
    n = max(r["input_ids"].shape[0] for r in rows)
    out: dict[str, Any] = {}
    pad = {"input_ids": pad_id, "labels": -100}  # the mask and the type ids pad with 0
    for k in SEQ_KEYS:
        if any(k in r for r in rows):
            # only type ids may be missing: such a row has no vision tokens, type 0 (text) throughout
            seqs = [r.get(k, torch.zeros_like(r["input_ids"])) if k in TYPE_KEYS else r[k] for r in rows]
            out[k] = torch.stack([torch.nn.functional.pad(x, (0, n - x.shape[0]), value=pad.get(k, 0)) for x in seqs])
    keys = {k for r in rows for k in r if k not in SEQ_KEYS}
    for k in sorted(keys):
        present = [r[k] for r in rows if k in r]
        if k.startswith("_"):
            out[k] = torch.stack(present)
        else:
            out[k] = torch.cat(present, dim=0)
    return out


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def vision_keys(row: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """What a row carries besides its token sequence (pixel tensors and their sizes); () for a text row."""
    return tuple(sorted(k for k in row if k not in SEQ_KEYS and not k.startswith("_")))


def label_count(rows: Sequence[dict[str, torch.Tensor]]) -> int:
    """Label tokens of training rows (the answer letter and the turn's end, ``turn_end_id``: two per row)."""
    return sum(int((r["labels"] != -100).sum()) for r in rows)


def modality_parts(rows: list[dict]) -> dict[tuple, list[dict]]:
    """A batch's rows by modality and input shapes (probe.batch's ``signature`` of the ``vision_keys`` tensors;
    ``()`` for text), in order of first appearance: rows whose pixel tensors cannot be concatenated go through
    apart (Idefics3's [1, images, 3, H, W] of a one-image and a two-image item: a traceback before), and each part
    pads to its own longest row: a batch of clips (131 tokens) with a few two-view images (205) no longer pads every
    clip to 205 (LLaVA's modality grouping, but inside the batch: the same rows, the same gradient)."""
    from probe.batch import signature

    parts: dict[tuple, list[dict]] = {}
    for r in rows:
        parts.setdefault(signature({k: r[k] for k in vision_keys(r)}), []).append(r)
    return parts


def check_batch_splits(batch: int, world: int) -> None:
    """Every rank takes an equal share of each batch (data parallel and FSDP alike)."""
    if batch % world:
        raise BadInput(f"batch size {batch} does not split over {world} processes")


def even_out(chunks: list[list[dict]], n: int) -> list[list[dict]]:
    """``chunks`` cut further, the largest in halves, until there are ``n`` (at most their rows): under data
    parallel and FSDP every rank must run as many backward passes, each reducing gradients across the ranks,
    whatever its rows' modalities."""
    chunks = list(chunks)
    while len(chunks) < n:
        i = max(range(len(chunks)), key=lambda j: len(chunks[j]))
        if len(chunks[i]) < 2:
            raise ValueError(f"{sum(map(len, chunks))} rows cannot make {n} forward passes")
        half = (len(chunks[i]) + 1) // 2
        chunks[i:i + 1] = [chunks[i][:half], chunks[i][half:]]
    return chunks


def micro_batches(rows: list[dict], size: int | None) -> list[list[dict]]:
    """``rows`` in consecutive slices of at most ``size`` (all at once for None). Under data parallel every rank
    holds batch / WORLD_SIZE rows, so every rank runs as many backward passes."""
    size = size or len(rows)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def label_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], n_labels: int | None = None) -> torch.Tensor:
    """The causal-LM loss as transformers computes it (position t predicts token t + 1; cross-entropy summed over
    the label tokens and divided by ``n_labels``, by default this batch's label tokens, i.e. the mean), with logits
    only at the positions that predict a label (``logits_to_keep``, shared by the batch): rows carry two label
    tokens after a prompt of ~100, so the LM head and softmax skip the rest. With ``n_labels`` the label tokens of
    a whole batch, the parts of ``modality_parts`` sum to the whole batch's loss and gradient."""
    target = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    keep = (target != -100).any(0).nonzero()[:, 0]
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
    logits = logits_at(model, inputs, keep.tolist())
    want = target[:, keep].flatten().to(logits.device)
    total = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), want, ignore_index=-100, reduction="sum")
    return total / (int((target != -100).sum()) if n_labels is None else n_labels)


def is_lm_param(name: str, loaded: LoadedModel | ModelRef) -> bool:
    # names under DDP / FSDP wrappers and peft's LoRA wrapper (its adapters sit in the LM and train at lm_lr)
    name = name.replace("_fsdp_wrapped_module.", "").removeprefix("module.").removeprefix("base_model.model.")
    fam = loaded.family  # the LM is the module holding the decoder layers (all of a causal LM), and lm_head
    return name.startswith((fam.layers_path.rsplit(".", 1)[0] + ".", fam.lm_head_path + "."))


def is_projector_param(name: str, loaded: LoadedModel | ModelRef) -> bool:
    """A parameter of the projector between vision tower and LM (the family table's ``projector_markers``)."""
    return any(m in name for m in loaded.family.projector_markers)


# What trains without weight decay: biases and normalisation weights, by transformers' Trainer's rule
# (``Trainer.get_decay_parameter_names``, which LLaMA-Factory's optimisers call too): parameters of nn.LayerNorm
# modules, and those whose lower-cased name matches NO_DECAY_NAMES (biases, and RMSNorms named as LMs name them:
# input_layernorm, model.norm, q_norm, ...). Plus every module whose class is a normalisation (NO_DECAY_CLASSES): the
# Trainer's rule decays Qwen2.5-VL's and Qwen2.5-Omni's vision RMSNorms (norm1, norm2, ln_q: no nn.LayerNorm, and
# names it does not know). Data, not family branches: each family's own RMSNorm class matches by its name.
NO_DECAY_MODULES: tuple[type[torch.nn.Module], ...] = (torch.nn.LayerNorm,)
NO_DECAY_CLASSES = re.compile(r"(?:Layer|RMS|Group)Norm$")
NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def is_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` normalises (its weights, and those of any module inside it, are never decayed)."""
    return isinstance(module, NO_DECAY_MODULES) or bool(NO_DECAY_CLASSES.search(type(module).__name__))


def decays(model: torch.nn.Module) -> set[str]:
    """The names (``named_parameters``') of the parameters AdamW decays: all but biases and normalisation weights
    (``is_norm``, NO_DECAY_NAMES). Names under the DDP, FSDP and peft wrappers match as the bare model's do."""
    exempt = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) not in exempt and not NO_DECAY_NAMES.search(n.lower())}


def param_groups(model: torch.nn.Module, loaded: LoadedModel, cfg: TrainConfig) -> list[dict]:
    """Optimiser groups by role: LM (``lm_lr``), projector (``projector_lr`` when given), the rest (``lr``), each
    in two: its parameters AdamW decays (``decays``; all under ``cfg.decay_all``) at ``cfg.weight_decay``, and the
    rest (biases, normalisation weights) at 0. A role whose rate is 0 is frozen (no gradients, not in the
    optimiser); parameters already frozen (LoRA's base weights) stay frozen."""
    rates = _rates(cfg)
    decayed = None if cfg.decay_all else decays(model)
    groups: dict[tuple[str, bool], list] = {(r, d): [] for r in rates for d in (True, False)}
    for n, p in model.named_parameters():
        role = _role(n, loaded, cfg)
        if rates[role] == 0:
            p.requires_grad_(False)
        elif p.requires_grad:
            groups[role, decayed is None or n in decayed].append(p)
    return [{"params": ps, "lr": rates[r], "weight_decay": cfg.weight_decay if d else 0.0}
            for (r, d), ps in groups.items() if ps]


def _rates(cfg: TrainConfig) -> dict[str, float]:
    return {"lm": cfg.lm_lr, "projector": cfg.lr if cfg.projector_lr is None else cfg.projector_lr, "other": cfg.lr}


def _role(name: str, loaded: LoadedModel | ModelRef, cfg: TrainConfig) -> str:
    return ("lm" if is_lm_param(name, loaded) else
            "projector" if cfg.projector_lr is not None and is_projector_param(name, loaded) else "other")


def optimizer_bytes(model: torch.nn.Module, loaded: LoadedModel | ModelRef, cfg: TrainConfig) -> tuple[int, int]:
    """(parameters that train, bytes their training state takes beyond the weights): a gradient and AdamW's two
    moments per parameter ``param_groups`` would train, each in its parameter's dtype (12 bytes a float32
    parameter). Reads names, shapes and dtypes only, so a meta-device model answers before any weight loads.
    ``loaded``: anything with the model's ``family``."""
    train = trained_params(model, loaded, cfg)
    return sum(p.numel() for p in train), sum(3 * p.numel() * p.element_size() for p in train)


def trained_params(model: torch.nn.Module, loaded: LoadedModel | ModelRef,
                   cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """The parameters ``param_groups`` would train, without freezing anything: those not frozen already whose
    group's rate is above 0."""
    rates = _rates(cfg)
    return [p for n, p in model.named_parameters() if p.requires_grad and rates[_role(n, loaded, cfg)] > 0]


def anything_trains(model: torch.nn.Module, loaded: LoadedModel, cfg: TrainConfig) -> bool:
    """Whether ``param_groups`` would leave a parameter to train (without freezing anything): callers check it
    before writing, as rates of 0 on every group a model has (``--lm-lr 0`` on a text-only LM) train nothing."""
    return bool(trained_params(model, loaded, cfg))


def diverged(step: int, what: str, model: torch.nn.Module) -> BadInput:
    """The one-line error of a run whose numbers stopped being finite (``step``: 1-based, as train_log.csv)."""
    dtype = str(next(iter(model.parameters())).dtype).removeprefix("torch.")
    return BadInput(f"training diverged at step {step}: {what} is not finite (weights in {dtype}); no checkpoint of "
                    "it is written; train with a lower learning rate (or in float32, if the forward ran in half "
                    "precision)")


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """Before a checkpoint is written: every weight finite. An update can make NaN weights from a finite loss and
    gradient (AdamW's eps underflows in float16), which the next step's loss would only show after the save.
    Under FSDP a collective: every rank names the same weight, whichever shard holds it."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        from probe import fsdp

        if (name := fsdp.first_non_finite(model)) is not None:
            raise diverged(step, f"weight {name}", model)
        return
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise diverged(step, f"weight {name}", model)


@dataclass
class StepInfo:
    """What one optimiser step did (for train_log.csv and checkpoints)."""

    step: int  # 1-based: the number of updates done
    loss: float
    lr_factor: float  # every group's rate is its configured one times this (lr_factor)
    rows: list[int]  # the rows of its batch
    tokens: int  # label tokens in the batch


Sampler = Callable[[torch.Generator, int], list[int]]


def uniform_sampler(n_rows: int) -> Sampler:
    """Rows drawn uniformly with replacement (the organisms' recipes)."""
    return lambda gen, batch: torch.randint(n_rows, (batch,), generator=gen).tolist()


def fsdp_requested() -> bool:
    """Whether accelerate will be asked for FSDP: ``accelerate launch`` with ``distributed_type: FSDP`` sets
    ACCELERATE_USE_FSDP=true, which its Accelerator reads (accelerator.py and state.py compare to "true")."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def refuse_fsdp(device_type: str) -> None:
    """accelerate's FSDP launches are refused (exit 2, one line) before anything loads; FSDP runs as ``torchrun …
    --fsdp`` (``TrainConfig.fsdp``, torch's FSDP2 in probe.fsdp). On the CPU accelerate has no FSDP: its
    AcceleratorState sets FSDP only for GPU-like process groups (MULTI_GPU, MULTI_XPU, …), never MULTI_CPU, so the
    config stopped at the plugin's check that ``sync_module_states`` is "not supported on cpu" (a traceback after
    checkpoint-0), and with that check off ran plain data parallel, every process holding the whole model.
    Anywhere, accelerate's FSDP2 takes the model and its optimiser in one ``prepare`` call, where the loop prepares
    them apart (a ValueError at the optimiser's), and the loop's checkpoints gather shards only for ``--fsdp``."""
    if not fsdp_requested() or rank_world()[1] <= 1:
        return
    import accelerate

    fix = ("for FSDP launch torchrun --nproc-per-node K -m analyses.finetune … --fsdp (torch's FSDP2); for data "
           "parallel, torchrun or accelerate launch without the FSDP config")
    if device_type == "cpu":
        raise BadInput(f"FSDP through accelerate launch's config (distributed_type: FSDP) cannot run on the CPU: "
                       f"accelerate {accelerate.__version__} shards models only on GPUs (on the CPU it runs plain "
                       f"data parallel, or stops at sync_module_states); {fix}")
    raise BadInput("FSDP through accelerate launch's config (distributed_type: FSDP) is not supported here: "
                   "accelerate would shard the model without the loop gathering its checkpoints from the shards; "
                   f"{fix}")


def refuse_accelerate_settings() -> None:
    """Under several processes, an ``accelerate launch`` (or accelerate config) asking for mixed precision or
    gradient accumulation is refused (exit 2, one line, before anything loads): accelerate's Accelerator reads them
    from ACCELERATE_MIXED_PRECISION and ACCELERATE_GRADIENT_ACCUMULATION_STEPS (1.16), the latter even over an
    explicit ``gradient_accumulation_steps=1``, and ``acc.backward`` then divided every gradient by it (the clip and
    AdamW's eps saw 1/k of the step's gradient, exit 0); mixed precision ran the forward under an autocast run.json
    does not record. The tool's own settings do both: ``--dtype bfloat16`` and ``--micro-batch N``."""
    if rank_world()[1] <= 1:
        return
    asked = []
    if (mixed := os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()) != "no":
        asked.append(f"mixed_precision {mixed} (use --dtype bfloat16, mixed precision that the run records)")
    if (steps := os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1").strip()) != "1":
        asked.append(f"gradient_accumulation_steps {steps} (use --micro-batch N: each step's gradient accumulated "
                     "over its micro-batches, the same run)")
    if asked:
        raise BadInput(f"accelerate launch's {' and '.join(asked)} is not how this loop trains; launch without it")


def fsdp_launch(cfg: TrainConfig) -> bool:
    """Whether these steps run sharded (``cfg.fsdp`` under a launch of several processes; probe.fsdp)."""
    if not cfg.fsdp:
        return False
    if rank_world()[1] <= 1:
        raise BadInput("--fsdp shards the model over the processes of a launch: run it under torchrun "
                       "--nproc-per-node K (K ≥ 2), or drop --fsdp to train in one process")
    from probe.fsdp import unsupported

    if why := unsupported():  # before the model loads: shard would stop on it in every rank after the load
        raise BadInput(why)
    return True


def data_parallel(loaded: LoadedModel) -> Accelerator | None:
    """accelerate's Accelerator when launched on several processes (torchrun / accelerate launch), else None."""
    world = rank_world()[1]
    if world <= 1:
        return None
    refuse_fsdp(loaded.device.type)  # (run_finetune refuses both before the model loads)
    refuse_accelerate_settings()
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # find_unused_parameters: a rank's share (or micro-batch) of text rows leaves the vision tower without a
    # gradient, which DDP otherwise waits for: the next step's forward raised (or the ranks hung)
    process_state(loaded.device.type == "cpu")  # the process group, with our timeout, if no barrier set it up yet
    acc = Accelerator(cpu=loaded.device.type == "cpu", mixed_precision="no",
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if acc.gradient_accumulation_steps != 1 or acc.mixed_precision != "no":  # set some other way than the launch's
        raise BadInput(f"accelerate set up gradient accumulation {acc.gradient_accumulation_steps} and mixed "
                       f"precision {acc.mixed_precision!r}: acc.backward would scale the gradients; launch without "
                       "them")
    if acc.num_processes != world:  # each rank would train every row alone, the launch's work W times
        raise RuntimeError(f"accelerate runs {acc.num_processes} process(es), the launch {world}: its "
                           "process state was set up for another device kind before the Accelerator")
    return acc


def is_main_process() -> bool:
    return rank_world()[0] == 0


def wait_for_everyone(cpu: bool) -> None:
    """A barrier across the launched processes (accelerate's); nothing on a single process. ``cpu``: whether the
    model trains on the CPU, as ``data_parallel`` will say: the first call sets up accelerate's process state for
    the whole process, and one set up for GPUs on a machine without any is a single process (no barrier, and no
    data parallel: every rank would train every row)."""
    if rank_world()[1] > 1:
        process_state(cpu).wait_for_everyone()


# how long a rank waits at a barrier or collective for the others: under --fsdp the other ranks wait while rank 0
# alone reads the checkpoint (minutes for a 72B), where NCCL's default gives up after 10
PROCESS_GROUP_TIMEOUT_MIN = 60


def check_rendezvous(cpu: bool) -> None:
    """The processes of a launch (WORLD_SIZE > 1) meet at rank 0's MASTER_ADDR / MASTER_PORT, and on GPUs
    accelerate counts a process in only with its LOCAL_RANK: torchrun and accelerate launch set all three. Ranks
    started by hand with RANK / WORLD_SIZE alone resolved the model and read the data, then stopped on accelerate's
    ValueError traceback (measured on the CPU; on GPUs torch's env:// rendezvous raises its own); on GPUs without
    LOCAL_RANK accelerate's PartialState sets up no group (its _prepare_backend, read, not run here), each rank a
    world of one until ``data_parallel``'s RuntimeError after the load. Bad input on every rank, before any work
    (``cpu``: the run is on the CPU)."""
    world = rank_world()[1]
    if world <= 1:
        return
    needed = ("MASTER_ADDR", "MASTER_PORT") + (() if cpu else ("LOCAL_RANK",))
    if missing := [name for name in needed if not os.environ.get(name)]:
        raise BadInput(f"WORLD_SIZE {world} with {' and '.join(missing)} unset: the processes of a launch meet at "
                       f"rank 0's address and port, which torchrun sets (with each LOCAL_RANK); launch with torchrun "
                       f"--nproc-per-node {world} (or set {', '.join(needed)} on every rank), or unset RANK and "
                       "WORLD_SIZE to train in one process")


def process_state(cpu: bool) -> PartialState:
    """accelerate's process state, the launch's process group set up by its first call (``cpu``: gloo, else the
    GPUs' backend), with PROCESS_GROUP_TIMEOUT_MIN; refused first where the launch gives no way to set it up
    (``check_rendezvous``)."""
    from datetime import timedelta

    from accelerate import PartialState

    check_rendezvous(cpu)
    return PartialState(cpu=cpu, timeout=timedelta(minutes=PROCESS_GROUP_TIMEOUT_MIN))


@contextlib.contextmanager
def random_state_kept(devices: Sequence[str] = ()) -> Iterator[None]:
    """torch's global random generators as they were, after a block that seeds them (``--seed``: the training loop,
    LoRA's initialisation): a caller's notebook draws on after a run as if it had not run. The CPU's; those of the
    GPUs in ``devices`` (the run's placement: reading one starts CUDA there, as the run is about to); and, once
    CUDA is started, every GPU's (torch.manual_seed seeds them all). A CPU run with CUDA not started asks no GPU,
    which would start it; nor does a placement substituted where torch has no CUDA (tests of GPU checks). Only the
    GPUs started before the block were kept until 2026-12-07: a GPU run from a notebook that had not used CUDA yet
    left its GPU's generator seeded with --seed."""
    gpus = {int(d.split(":")[1]) if ":" in d else torch.cuda.current_device() for d in devices
            if d.startswith("cuda") and torch.cuda.is_available()}
    if torch.cuda.is_initialized():
        gpus |= set(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=sorted(gpus)):
        yield


def train(loaded: LoadedModel, rows: list[dict], cfg: TrainConfig, log: Callable[[str], None] = print,
          sampler: Sampler | None = None, on_step: Callable[[StepInfo, Any], None] | None = None,
          resume: dict | None = None) -> list[float]:
    """``cfg.steps`` AdamW steps on batches sampled (seeded) from ``rows``; the losses of the steps run here.

    ``on_step(info, state)`` runs after every update with ``state()`` giving what ``resume`` takes (optimiser
    and sampler state, step), so a run killed after a checkpoint continues with the same numbers.

    Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) accelerate's data parallel engine takes over:
    every rank draws the same global batch and trains on its share (rows rank, rank + W, …); gradients are
    averaged, so with equal label tokens per row (the letter and the turn's end) the updates and the logged
    (rank-averaged) losses are those of one process with the same global batch, to float tolerance.

    ``cfg.checkpointing`` is on for these steps only, however they end (a caller that catches an out-of-memory
    error and evaluates the model gets it as it was)."""
    model = loaded.model
    if cfg.checkpointing:  # before data parallel wraps it; non-reentrant: frozen inputs (LoRA) still get gradients
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise BadInput(f"{type(model).__name__} does not support gradient checkpointing; train without it")
        model.activation_checkpointing_enable({"use_reentrant": False})
    try:
        return _steps(loaded, rows, cfg, log, sampler, on_step, resume)
    finally:
        if cfg.checkpointing:
            model.activation_checkpointing_disable()
        model.eval()


def model_cuda_devices(model: torch.nn.Module) -> list[torch.device]:
    """The GPUs the model's parameters live on, in index order (one, or several under a device map)."""
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=lambda d: d.index)


def accelerator_rng(model: torch.nn.Module) -> list[torch.Tensor]:
    """The random state of each GPU the model runs on (dropout's masks there come from it, not from torch_rng):
    a resume that re-seeded it would train on other masks than the run it continues. Empty on the CPU."""
    return [torch.cuda.get_rng_state(d) for d in model_cuda_devices(model)]


def set_accelerator_rng(model: torch.nn.Module, states: list[torch.Tensor]) -> None:
    """``accelerator_rng``'s states back, paired with this process's GPUs in the same order. Exact for one process
    (one GPU or a device map). Under data parallel or FSDP only rank 0's state is saved and every rank gets it: the
    others' states had moved by their own batches' shapes, so their dropout masks after a resume differ from the
    uninterrupted run's (the supported families train without dropout: their configs set it to 0)."""
    for d, s in zip(model_cuda_devices(model), states):
        torch.cuda.set_rng_state(s, d)


def _steps(loaded: LoadedModel, rows: list[dict], cfg: TrainConfig, log: Callable[[str], None], sampler: Sampler | None,
           on_step: Callable[[StepInfo, Any], None] | None, resume: dict | None) -> list[float]:
    """The steps of ``train``."""
    model = loaded.model
    check_adapters_in_lm(model, lambda n: is_lm_param(n, loaded))  # before a wrapper (DDP) hides peft's
    # gradients left by whatever ran on the model before (the zoo's vision pretraining, an earlier stage) are none of
    # this run's: a step's zero_grad clears only the optimiser's parameters, and the clip sums every gradient there is
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(cfg.seed)
    sharded = fsdp_launch(cfg)
    acc = None if sharded else data_parallel(loaded)
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    from probe import fsdp  # its collectives serve data parallel's ranks too (most_over_ranks)

    if sharded:
        rank, world = fsdp.init(loaded.device.type == "cpu")
    check_batch_splits(cfg.batch, world)
    if sharded:  # the model first: FSDP replaces its parameters, which the optimiser must then hold
        fsdp.shard(model, loaded.family.layers_path, loaded.device, world)
    elif acc is not None:
        model = acc.prepare(model)
    groups = param_groups(model, loaded, cfg)
    if not groups:
        raise BadInput(f"nothing to train: every parameter is frozen (lr {cfg.lr}, lm_lr {cfg.lm_lr}, "
                       f"projector_lr {cfg.projector_lr}; a rate of 0 freezes its group)")
    opt = torch.optim.AdamW(groups, betas=cfg.betas)  # each group's weight decay its own (param_groups)
    if acc is not None:
        opt = acc.prepare(opt)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(cfg.seed)
    distributed = acc is not None or sharded
    first = 0
    if resume is not None:
        if sharded:
            fsdp.load_optimizer_state(opt, resume["optimizer"])
        else:
            opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        set_accelerator_rng(model, resume.get("accelerator_rng", []))
        first = int(resume["step"])
    sample = sampler or uniform_sampler(len(rows))
    lm_trains = any(p.requires_grad for n, p in model.named_parameters() if is_lm_param(n, loaded))
    pad = loaded.tokenizer.pad_token_id
    losses = []
    t0 = time.time()
    def autocast():
        if cfg.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(loaded.device.type, dtype=getattr(torch, cfg.autocast))

    def state(frozen: bool = True) -> dict:
        """What a resume takes. Under FSDP a collective (every rank calls it; rank 0 gets the whole optimiser
        state and, under "model", the whole model's weights for the checkpoint: without its frozen parameters
        unless ``frozen``)."""
        optimizer = fsdp.full_optimizer_state(opt, rank) if sharded else opt.state_dict()
        state = {"optimizer": optimizer, "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "accelerator_rng": accelerator_rng(model), "step": step + 1}
        return (state | {"model": fsdp.full_model_state(model, frozen)}) if sharded else state

    for step in range(first, cfg.steps):
        factor = lr_factor(step, cfg)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * factor
        idx = sample(gen, cfg.batch)
        mine = [rows[i] for i in idx[rank::world]]
        n_labels = label_count(mine)
        # the batch in modality parts (gradients accumulate), each in micro-batches; under data parallel and FSDP
        # every rank runs as many forwards and backwards (the most any rank needs), each reducing gradients
        parts = modality_parts(mine)
        # the LM frozen (a projector/tower stage): text rows reach no trained parameter, so with vision rows in the
        # batch to train on they run without a graph (no activations kept, no backward), for the logged loss only:
        # skipped, the step logged the vision rows' mean beside a tokens count of all rows (and a text-only step
        # the text rows'), one curve of two populations
        graphless_text = not lm_trains and len(parts) > 1 and not distributed
        chunks = [chunk for rows_of in parts.values() for chunk in micro_batches(rows_of, cfg.micro_batch)]
        if distributed:
            chunks = even_out(chunks, fsdp.most_over_ranks(len(chunks)))
        opt.zero_grad(set_to_none=True)
        loss_sum, ran, stepped = torch.zeros(()), 0, False
        reached: set[int] = set()  # FSDP: the parameters this rank's backward passes reach
        for part in chunks:
            graph = not (graphless_text and not vision_keys(part[0]))
            # backward: the dtypes recorded; a graph whatever the caller's grad mode (a notebook under no_grad)
            with autocast(), torch.enable_grad() if graph else torch.no_grad():
                part_loss = label_loss(model, collate(part, pad), n_labels)
            if lm_trains and not part_loss.requires_grad:
                # every row runs the LM: a loss outside autograd's graph (a forward run without gradients, or
                # checkpointing that cut the graph: reentrant with frozen inputs under LoRA) would skip the
                # backward and the update, and the run would go on (simulated, exit 0)
                raise UpstreamChanged(f"{type(model).__name__}'s loss at step {step + 1} does not depend on the LM's "
                                      "trained weights (no autograd graph reached them): the step would update "
                                      "nothing", naive_helps=False)
            if part_loss.requires_grad:
                if sharded:
                    reached |= fsdp.reached(part_loss)
                part_loss.backward() if acc is None else acc.backward(part_loss)  # FSDP: reduce-scatters
                stepped = True
            loss_sum += part_loss.detach().cpu() * n_labels
            ran += label_count(part)
        # a non-finite loss or gradient stops the run before its update reaches the weights (one host sync per
        # step, for the gradient norm; the loss is on the CPU already). Data parallel: the norm is global, so every
        # rank stops at the same step; a rank's own loss is judged only after the reduction below.
        if not distributed and not bool(torch.isfinite(loss_sum)):
            raise diverged(step + 1, "the loss", model)
        if sharded:  # every rank: its backward passes ran the same collectives whether or not they reached weights
            stepped = True
            fsdp.drop_unused_grads([p for g in opt.param_groups for p in g["params"]], model, reached)
        if stepped:
            if acc is None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            else:
                norm = acc.clip_grad_norm_(model.parameters(), cfg.clip)
            if norm is not None and not math.isfinite(fsdp.global_norm(norm) if sharded else float(norm)):
                raise diverged(step + 1, "the gradient norm", model)
            opt.step()
        loss = loss_sum / ran  # the mean over the label tokens that ran
        if acc is not None:
            loss = acc.reduce(loss.to(loaded.device), "mean")
        elif sharded:
            loss = fsdp.mean_over_ranks(loss.to(loaded.device), world)
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise diverged(step + 1, "the loss", model)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log(f"  step {step:5d}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}  ({time.time() - t0:.0f}s)")
        if on_step is not None:
            on_step(StepInfo(step + 1, losses[-1], factor, idx, n_labels * world), state)
    return losses
