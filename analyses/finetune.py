"""``python -m analyses.finetune``: small-step fine-tuning of a (merged) model on a modality mix (paper §6.2).

    python -m probe.zoo data --out runs/data          # the organisms' training items (24 per subject, seed 1)
    python -m analyses.finetune --model runs/merged/carriers/organism-vl \\
        --data text=runs/data/text image=runs/data/image video=runs/data/video --mix 3:2:1 \\
        --split train --steps 1000 --save-steps 0 10 30 100 300 1000 --out runs/ft/mixed

Full fine-tuning of any model the probe loads, with the project's one training loop (``probe.train``): the probe's
prompt, loss on the answer letter and the end of the turn (``<|im_end|>`` in ChatML); each batch row draws its
modality with probability ∝ ``--mix`` and then an item of it. Writes ``DIR/checkpoint-<step>/`` (loadable HF dirs;
step 0 is the start) with the optimiser and sampler state beside the weights, ``train_log.csv`` (step, modality,
loss, lr and lm_lr as they were at that step, tokens) and ``run.json`` (the run's identity: settings, the model's
weights and the items of each set). ``--dtype bfloat16`` (the default on a GPU) is
mixed precision: float32 weights, optimiser and checkpoints, the forward in bfloat16 (with ``--lora`` the frozen
weights are held in bfloat16, the adapters in float32). The same command after a
kill continues from the last checkpoint and ends with the same numbers. Items of a modality the model cannot
read, and rates, warm-up or seed out of range, are bad input, before anything is written; a run whose loss or
weights stop being finite stops with exit 2 before it writes a checkpoint of them, and run.json says "failed".
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from probe.errors import (ArgParser, BadInput, RunStopped, check_counts, check_out_apart, check_out_path, cli_main,
                          make_out_dir, out_dir, parse_options, releases_claims, says_out_of_memory)
from probe.devices import outside_inference_mode

if TYPE_CHECKING:  # annotations only: the command imports torch and the model code when it runs
    from probe.devices import Placement
    from probe.models import LoadedModel, ModelRef
    from probe.train import Sampler, StepInfo, TrainConfig

# lr: --lr's rate now (tower, projector; 0 under --lora, which freezes them)
LOG_COLUMNS = ["step", "modality", "loss", "lr", "lm_lr", "tokens"]
STATE = "trainer_state.pt"
# what the loop does with the settings, part of a run's identity here and in analyses.replicate's fine-tuning stage:
# runs made before the schedule fix (warm-up × cosine), on bfloat16 weights, or (before 2026-12-07) with weight decay
# on biases and normalisation weights too (probe.train.decays) are other runs: refused as an older omniprobe's here,
# rerun by replicate
LOOP_IDENTITY = {"schedule": "cosine", "weights": "float32", "no_decay": "biases and norms"}
# how a step runs, not what it computes: outside a run's identity here and in analyses.replicate's fine-tuning
# stage, so a run that ran out of memory resumes with them
RUN_ONLY_SETTINGS = ("micro_batch", "gradient_checkpointing", "fsdp")


def checkpoint_steps(save_steps: Sequence[int], steps: int) -> list[int]:
    """The steps a run writes ``checkpoint-<step>/`` at: 0 (the start, always), every --save-steps, and the last."""
    return sorted({0, *save_steps, steps})


@dataclass
class FinetuneConfig:
    model: str
    data: dict[str, str]  # modality label → MMMU-layout dir
    out: Path
    steps: int
    mix: dict[str, float] = field(default_factory=dict)  # default: equal
    save_steps: list[int] = field(default_factory=lambda: [0])
    split: str = "train"
    limit: int | None = None
    lr: float = 1e-4
    lm_lr: float = 1e-4
    batch: int = 16
    warmup: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    lora: int | None = None  # LoRA rank (peft) on the LM's attention and MLP projections; None = full fine-tuning
    quiet: bool = False  # no progress bar (not part of the run's identity)
    overwrite: bool = False  # replace the fine-tuning run in --out (not part of the run's identity)
    # RUN_ONLY_SETTINGS: rows per forward and backward, and gradient checkpointing (probe.train.TrainConfig)
    micro_batch: int | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False  # RUN_ONLY_SETTINGS too: the model sharded over a torchrun launch's processes (probe.fsdp)

    def __post_init__(self) -> None:
        self.out = out_dir(self.out)  # from Python a str too, ~ expanded as the CLI's --out
        for label in self.data:  # from Python too (the CLI's parse_data has checked them)
            check_data_label(label)
        # the CLI always names every set (parse_mix); from Python an empty mix is the documented "equal", and a mix
        # naming other sets than data would be a KeyError deep in the sampler
        if not self.mix:
            self.mix = {label: 1.0 for label in self.data}
        elif set(self.mix) != set(self.data):
            raise BadInput(f"mix {sorted(self.mix)} must name the data sets {sorted(self.data)}, each once")

    def fingerprint(self) -> dict[str, Any]:
        """The run's settings as run.json's config keeps them: the data sets by where they are, not as typed
        (``data_location``): a rerun that spells a path otherwise (relative, absolute, ``./x/``) was refused. The
        model here is its name (an alias, or a directory's resolved path), a label: ``run_finetune`` adds where
        it is (``model_path``), which ``config_identity`` compares instead."""
        from probe.mmmu import data_location
        from probe.models import model_location

        keep = asdict(self)
        for key in ("out", "quiet", "overwrite", *RUN_ONLY_SETTINGS):
            keep.pop(key)
        keep["save_steps"] = sorted(set(keep["save_steps"]))
        keep["model"] = model_location(self.model)
        keep["data"] = {label: data_location(path) for label, path in self.data.items()}
        return keep


# a data set's label: train_log.csv's modality column is "label=rows" joined by ';', so a label holding ';' or '='
# (or ',', whitespace) made it ambiguous ("a;text=2;image=2": sets a;text and image, or a, text and image?)
LABEL = re.compile(r"[\w.-]+")


def check_data_label(label: str, where: str = "--data") -> None:
    """BadInput unless ``label`` is ``LABEL``'s; ``where``: what the message names the labels as."""
    if not LABEL.fullmatch(label):
        raise BadInput(f"{where} label {label!r}: use letters, digits, '_', '-' and '.' only (train_log.csv's "
                       "modality column joins label=rows with ';')")


def parse_data(specs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for s in specs:
        label, sep, path = s.partition("=")
        if not sep or not label or not path:
            raise BadInput(f"--data {s!r}: use LABEL=DIR, e.g. text=probe/zoo/data/text")
        check_data_label(label)
        if label in out:
            raise BadInput(f"--data: {label} given twice")
        out[label] = path
    return out


def check_label(label: str, path: str, items: Sequence[Any]) -> None:
    """A set labelled by a modality holds that modality: train_log.csv and Figure 3 report each step's rows by
    label, so ``text=`` over an image set trained on images logged as text. Every item holds the label's modality
    alone (besides the question's text): an ``image=`` set with some text-only items passed until 2026-12-06 and
    logged those rows as image. Other labels are the user's own names (``mixed=DIR``)."""
    from probe.prompting import item_modalities

    if label not in ("text", "image", "video"):
        return
    held = [set(item_modalities(it)) - {"text"} for it in items]  # each item's media
    off = [h for h in held if h != {label} - {"text"}]
    if off:
        has = " / ".join(sorted({" and ".join(sorted(h)) or "text only" for h in off}))
        which = "its items" if len(off) == len(items) else f"{len(off)} of its {len(items)} items"
        raise BadInput(f"--data {label}={path}: {which} hold {has}, not {label}; label a set by what it holds, "
                       "or give it a name of your own (e.g. mixed=DIR)")


def parse_mix(spec: str | None, labels: Sequence[str]) -> dict[str, float]:
    if spec is None:
        return {m: 1.0 for m in labels}
    try:
        parts = [float(x) for x in spec.split(":")]
    except ValueError:
        raise BadInput(f"--mix {spec!r}: use numbers separated by ':' (e.g. 3:2:1)") from None
    if len(parts) != len(labels) or not all(math.isfinite(p) and p >= 0 for p in parts) or sum(parts) <= 0:
        raise BadInput(f"--mix {spec!r}: give {len(labels)} finite non-negative weights, one per --data, in order")
    return dict(zip(labels, parts))


def checkpoint_dirs(out: Path, where: str | None = None) -> dict[int, Path]:
    """A run's ``checkpoint-<step>`` dirs by step: the one scan of them (the resume, ``analyses.trajectory --runs``,
    ``figures.results.FinetuneRun``). An entry of that name that is no directory (a plain file, a broken link) or a
    second entry of one step (checkpoint-10 and checkpoint-010) is bad input, named after ``where`` (default:
    ``out``'s path): counted, it would be a step done (and the resume point) that holds nothing, or one of two."""
    where = f"{out}{os.sep}" if where is None else where
    found: dict[int, Path] = {}
    for sub in sorted(out.iterdir()):
        # [0-9], not \d: that (and int()) takes any Unicode digit, and a run writes its steps in ASCII (as HF's Trainer)
        if not (m := re.fullmatch(r"checkpoint-([0-9]+)", sub.name)):
            continue
        if not sub.is_dir():
            raise BadInput(f"{where}{sub.name} is not a directory (a run's checkpoint-<step> is a saved model's "
                           "folder); put the checkpoint there or move the file out of the run")
        if (step := int(m.group(1))) in found:
            raise BadInput(f"{where}{found[step].name} and {sub.name} are both step {step}")
        found[step] = sub
    return dict(sorted(found.items()))


def resume_point(out: Path, cfg: FinetuneConfig) -> tuple[int | None, dict[int, Path]]:
    """The checkpoint a rerun continues from: the latest with a trainer state (or the last step's), provided every
    checkpoint the run writes before it is there too (checkpoint-0 and the --save-steps below it); a resume from a
    later one would end "complete" without them (a killed --overwrite deletes checkpoints in any order)."""
    done = checkpoint_dirs(out) if out.is_dir() else {}
    resumable = {s: d for s, d in done.items() if (d / STATE).is_file() or s == cfg.steps}
    wanted = checkpoint_steps(cfg.save_steps, cfg.steps)
    ok = [s for s in resumable if all(w in done for w in wanted if w < s)]
    return (max(ok) if ok else None), resumable


def mixed_sampler(offsets: dict[str, range], mix: dict[str, float]) -> Sampler:
    """Each row: a modality with probability ∝ mix, then one of its rows uniformly (seeded generator); the
    modalities are drawn in their labels' order, whatever order --data gave them in."""
    import torch

    from analyses.formulas import normalised

    # by name, not in --data's order: the same sets listed in another order are the same training
    labels = sorted(m for m in offsets if mix[m] > 0)
    # normalised first: multinomial sums the weights, and 1e308:1e308 would sum to inf
    weights = torch.tensor(normalised([mix[m] for m in labels]), dtype=torch.float64)

    def sample(gen, batch: int) -> list[int]:
        which = torch.multinomial(weights, batch, replacement=True, generator=gen).tolist()
        return [offsets[labels[w]][int(torch.randint(len(offsets[labels[w]]), (1,), generator=gen))] for w in which]

    return sample


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(loaded: LoadedModel, rank: int, adapter: Path | None = None) -> LoadedModel:
    """Wrap the model's LM projections with LoRA adapters (peft); from ``adapter`` when resuming."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import SafetensorError

    from probe.upstream import check_lora_targets

    # the decoder layers' projections, wherever the family table puts the layers (Idefics3's model.text_model.layers
    # matched no fixed pattern: --lora on it was a traceback)
    targets = rf"^{re.escape(loaded.family.layers_path)}\.\d+\..*\.({'|'.join(LORA_TARGETS)})$"
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing: not ours to act on
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        # an --fsdp rank other than 0 holds a meta-device model: the adapter's tensors go nowhere (torch says so per
        # tensor), and the rank gets rank 0's when its shards are filled (probe.fsdp.shard)
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter in the checkpoint to a meta",
                                category=UserWarning)
        if adapter is not None:
            try:
                loaded.model = PeftModel.from_pretrained(loaded.model, adapter, is_trainable=True)
            except (OSError, ValueError, SafetensorError) as exc:  # a missing or damaged adapter of the checkpoint
                reason = str(exc).strip().split("\n")[0] or type(exc).__name__  # resumed (peft's, safetensors')
                raise BadInput(f"{adapter} is unreadable ({reason}); delete {adapter.parent} and rerun the same "
                               "command to resume from the checkpoint before it") from None
        else:
            loaded.model = get_peft_model(loaded.model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                                    target_modules=targets))
    check_lora_targets(loaded.model, targets)  # the projections README names, no more, no fewer
    return loaded


class _KeepsWriteError:
    """A binary file for ``torch.save`` that keeps the OSError its write raised: torch turns it into a RuntimeError
    ("unexpected pos …"), as it does a failed write of its own to a path, losing the errno a full disk has."""

    def __init__(self, f: Any):
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_state(state: dict, path: Path) -> None:
    """``torch.save(state, path)``; a write the disk stopped raises its own OSError (ENOSPC, EROFS)."""
    import torch

    with open(path, "wb") as f:
        sink = _KeepsWriteError(f)
        try:
            torch.save(state, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def save_checkpoint(loaded: LoadedModel, source: Path, dest: Path, state: dict | None,
                    weights: dict[str, Any] | None = None) -> None:
    """An HF model dir (configs and tokenizer files of the source) plus the trainer state, written to a hidden dir
    and renamed: a kill never leaves half a checkpoint. Full fine-tuning saves the model's weights in its dtype
    (``weights``: its whole state dict, gathered from FSDP's shards, instead of the model's own parameters);
    with LoRA the weights are the adapter merged into the source in float32 (``write_lora_merge``) and
    ``adapter/`` holds the adapter (``weights``: the adapters gathered from FSDP's shards)."""
    from analyses.writer import copy_side_files
    from probe.results import partial_dir, set_file_modes

    # a full disk, a refused LoRA merge (write_lora_merge, mid-stream): the partial copy is removed at once. Not
    # analyses.writer.atomic_dir: a checkpoint is no --out of its own (no lock, no manifest; the run's run.json says)
    with partial_dir(dest) as tmp:
        if hasattr(loaded.model, "merge_and_unload"):  # a peft model
            loaded.model.save_pretrained(tmp / "adapter", **({} if weights is None else {"state_dict": weights}))
            write_lora_merge(loaded, source, tmp, weights)
        else:
            loaded.model.save_pretrained(tmp, state_dict=weights)
            if loaded.family.config_path is not None:
                restore_whole_model(source, tmp, loaded.model.config)
        # tokenizer and processor files; the model's own config is written above. No weight file of the source:
        # its model.safetensors.index.json beside the model.safetensors just saved would be a second weight set.
        copy_side_files(source, tmp, keep_existing=True)
        if state is not None:
            save_state(state, tmp / STATE)
        set_file_modes(tmp)  # save_pretrained writes the weights 0o600
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def lora_updates(loaded: LoadedModel) -> dict[str, tuple[str, Any]]:
    """The LoRA-wrapped projections of a peft model (their names in the model, the modules) under the canonical LM
    names of their weights (``layers.<i>.self_attn.q_proj.weight``, as ``analyses.checkpoints`` names a
    checkpoint's LM tensors)."""
    from peft.tuners.lora import LoraLayer

    prefix = loaded.family.layers_path + "."
    found = {}
    for full, module in loaded.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = full.removeprefix("base_model.model.")
        if not name.startswith(prefix):  # LORA_TARGETS' pattern caught a module outside the decoder layers
            raise RuntimeError(f"LoRA adapter on {name}, outside {loaded.family.layers_path}: its merge has no "
                               "checkpoint tensor to go to")
        found["layers." + name.removeprefix(prefix) + ".weight"] = (full, module)
    return found


def lora_delta(module: Any, adapter: str, weights: dict[str, Any] | None, name: str) -> Any:
    """An adapted projection's update B·A·α/R by peft's own ``get_delta_weight``, from the module's adapters or,
    under FSDP (where they are shards), from ``weights``: the whole ``<name>.lora_A.<adapter>.weight`` and
    ``lora_B`` gathered from them, given to peft's function in a stand-in for the module."""
    from types import SimpleNamespace

    if weights is None:
        return module.get_delta_weight(adapter)
    whole = {part: {adapter: SimpleNamespace(weight=weights[f"{name}.{part}.{adapter}.weight"])}
             for part in ("lora_A", "lora_B")}
    return type(module).get_delta_weight(SimpleNamespace(**whole, fan_in_fan_out=module.fan_in_fan_out,
                                                         scaling=module.scaling), adapter)


def write_lora_merge(loaded: LoadedModel, source: Path, dest: Path, weights: dict[str, Any] | None = None) -> None:
    """The weights of a LoRA checkpoint: every tensor of the source checkpoint (under its names and layout) in
    float32 (integer and bool ones in their own dtype), each adapted projection plus its adapter's update (peft's
    ``get_delta_weight``: B·A·α/R), written one tensor at a time. A merged float32 copy of the whole model (peft's
    ``merge_and_unload``) needed 2× the weights' memory on the model's devices (a 72B model's 288 GB); this holds a
    few copies of the largest tensor in CPU memory (bench/lora_save.py: 0.92 GB against 3.39 GB for a 1.4 GB bf16
    model). A float32 source trained with bfloat16 frozen weights is merged at its own precision (checkpoint-0 is
    the source, not the bfloat16 rounding the run held). Raises when a frozen weight is not the source's tensor as
    loaded (a conversion on load, or a name mapped to the wrong tensor): the update would go to the wrong place.

    Under FSDP (``weights``: the adapters gathered whole, on rank 0) the frozen weights are shards and are not
    compared: the run's checkpoint-0 compared them, written from rank 0's unsharded model, and a resume loads the
    same source (its fingerprint, checked at every save) with the same software (refused otherwise)."""
    import torch

    from analyses.checkpoints import open_checkpoint
    from analyses.writer import SHARD_BYTES, Entry, ShardedWriter

    updates = lora_updates(loaded)
    # the path as a path: a relative one that reads as an alias (``--model ./organism-vl`` is Path("organism-vl"))
    # would open the alias's model, not the one trained
    with open_checkpoint(str(Path(source).absolute()), allow_bin=True) as ck:
        by_key = {}
        for canon, (name, module) in updates.items():
            key = ck.lm_key(canon)
            if key is None or key in by_key or tuple(ck.infos[key].shape) != tuple(module.base_layer.weight.shape):
                raise RuntimeError(f"{source}: no tensor of shape {tuple(module.base_layer.weight.shape)} for the "
                                   f"adapted {canon} (found {key!r}); its LoRA merge cannot be written")
            by_key[key] = name, module
        keys = sorted(ck.infos, key=lambda k: (str(ck.infos[k].file), ck.infos[k].start))
        # float32 for the floating point tensors; an integer or bool one (a tower's int64 position_ids) as it is:
        # written as float32 it was another dtype, rounded above 2^24
        dtypes = {k: torch.float32 if ck.infos[k].dtype.is_floating_point else ck.infos[k].dtype for k in keys}
        entries = [Entry(k, dtypes[k], tuple(ck.infos[k].shape)) for k in keys]
        write_source_config(source, dest, "float32")
        with ShardedWriter(dest, entries, SHARD_BYTES) as writer, torch.no_grad():
            for key in keys:
                info = ck.infos[key]
                stored = ck.view(info)
                tensor = stored.to(dtypes[key], copy=True)  # never the source's mapped bytes
                if key in by_key:
                    name, module = by_key[key]
                    held = module.base_layer.weight
                    if weights is None and not torch.equal(held.detach().cpu(), stored.to(held.dtype)):
                        raise RuntimeError(f"{source}: the frozen {key} in memory is not the checkpoint's tensor "
                                           "as loaded: the adapter's update would be merged into another tensor")
                    adapter = module.active_adapters[0]
                    if getattr(module, "lora_variant", {}).get(adapter) is not None:  # DoRA merges otherwise
                        raise RuntimeError(f"{key}: a LoRA variant's adapter; only plain LoRA is merged here")
                    tensor += lora_delta(module, adapter, weights, name).detach().float().cpu()
                ck.release(info)
                with writer.tensor(key) as sink:
                    sink.write(tensor)
            writer.close()


def write_source_config(source: Path, dest: Path, dtype: str) -> None:
    """The source's config.json naming ``dtype`` at the top level and in every sub-config (dicts with a
    model_type): training changes no other field of it."""
    from probe.lm_config import read_config_json

    config = read_config_json(source)

    def set_dtype(node: dict) -> None:
        node.pop("torch_dtype", None)  # transformers 4's name of it: two keys that disagree
        node["dtype"] = dtype
        for value in node.values():
            if isinstance(value, dict) and "model_type" in value:
                set_dtype(value)

    set_dtype(config)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def restore_whole_model(source: Path, saved: Path, part_config: Any) -> None:
    """A class built from a part of its checkpoint's config (the family table's ``config_path``: Qwen2.5-Omni's
    thinker) saves that part alone: config.json became the part's and the source's tensors outside it (talker,
    token2wav) were left out, so a checkpoint was no longer the source's kind of model (probe.eval refused its
    model_type, qwen2_5_omni_thinker). Puts the source's config.json back, naming the saved dtype, and copies the
    source tensors the part does not hold into one more shard of ``saved``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from analyses.checkpoints import open_checkpoint
    from analyses.writer import INDEX_NAME
    from probe.models import read_weight_map

    write_source_config(source, saved, str(part_config.dtype).removeprefix("torch."))
    index = saved / INDEX_NAME
    if index.is_file():
        weight_map = read_weight_map(index)  # the one reader of an index
    else:  # one file: it becomes the first of two shards
        (saved / "model.safetensors").rename(saved / "model-00001-of-00002.safetensors")
        with safe_open(saved / "model-00001-of-00002.safetensors", "pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model-00001-of-00002.safetensors")
    with open_checkpoint(str(Path(source).absolute())) as ck:  # never an alias of the same name
        rest = {k: ck.view(info).clone() for k, info in ck.infos.items() if k not in weight_map}
    if not rest:
        if not index.is_file():
            (saved / "model-00001-of-00002.safetensors").rename(saved / "model.safetensors")
        return
    name = "model-00002-of-00002.safetensors" if not index.is_file() else "model-rest.safetensors"
    save_file(rest, saved / name, metadata={"format": "pt"})
    weight_map |= dict.fromkeys(rest, name)
    total = sum(f.stat().st_size for f in {saved / n for n in weight_map.values()})
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                indent=2) + "\n", encoding="utf-8")


def clear_run(out: Path, cpu: bool) -> None:
    """``--overwrite``: delete the fine-tuning run in ``out`` (its checkpoints, partial ones, log and run.json) and
    nothing else there (``check_out_apart`` has refused an ``out`` holding an input). The caller holds ``out``'s
    lock (``run_finetune``, before the model loads). ``cpu``: whether the run trains on the CPU
    (``probe.train.wait_for_everyone``)."""
    from probe.train import is_main_process, wait_for_everyone

    # under torchrun every rank has looked at the out dir (has_contents, run.json) before rank 0 clears it: a rank
    # that looked after found it empty, skipped this function and its barrier, and the ranks' barriers went out of
    # step (a hang), or it read a run.json being deleted
    wait_for_everyone(cpu)
    if is_main_process():
        for d in out.iterdir():
            if d.is_dir() and re.fullmatch(r"\.?checkpoint-[0-9]+(\.partial)?", d.name):
                shutil.rmtree(d)
        for name in ("train_log.csv", "run.json"):
            (out / name).unlink(missing_ok=True)
    wait_for_everyone(cpu)  # no rank reads the out dir before it is cleared


def state_location(world: int, fsdp: bool, device: str) -> Any:
    """Where a resumed trainer state's tensors go (``torch.load``'s ``map_location``): one process, where they were
    saved. Under torchrun every rank reads the state rank 0 wrote, whose optimiser tensors name rank 0's GPU, so
    every rank put a whole copy of them on cuda:0 (and kept it for the run, beside rank 0's own): data parallel
    ranks take them to their own device, where their optimiser holds them; FSDP ranks to the CPU, as FSDP saves
    them, since each keeps only its shard (``probe.fsdp.load_optimizer_state``)."""
    if world <= 1:
        return None
    if fsdp:
        return "cpu"
    import torch

    index = torch.device(device).index

    def restore(storage, location: str):  # the RNG states are CPU tensors and must stay so (None: as saved)
        return storage.cuda(index) if location.startswith("cuda") else None

    return restore


def kept_log_rows(path: Path, start: int) -> list[dict[str, str]]:
    """train_log.csv's rows a resume from checkpoint-``start`` keeps: those of steps up to it (its later steps run
    again). Lines are appended one a step, so a kill or a full disk can tear only the last one: a row with a field
    missing ends the log there (a step number cut short, 12 of 123, was kept as step 12 with empty fields, and a cut
    to nothing was a traceback)."""
    keep = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if any(not row.get(c) for c in LOG_COLUMNS) or not row["step"].isdigit() or int(row["step"]) > start:
                break
            keep.append(row)
    return keep


def read_state(path: Path, map_location: Any = None, step: int | None = None) -> dict:
    """The trainer state a resume continues from (optimiser, sampler and torch RNG, step), read before anything
    runs: a damaged one is bad input naming the checkpoint to delete, never a traceback mid-run. ``step``: the
    checkpoint's own (its folder's name); a state of another step (one copied between checkpoint folders) would
    resume the sampler and the schedule there, while the weights, the log and the next saves follow the folder.
    ``map_location``: ``state_location``'s; given (several processes), the file is mapped, not read into each
    process's memory: every rank holds the whole AdamW state for the run (61 GB for a 7B), where an FSDP rank keeps
    only its shard of it, and a data parallel rank a copy on its GPU, so the mapped pages are shared and
    reclaimable."""
    import torch

    fix = f"delete {path.parent} and rerun the same command to resume from the checkpoint before it"
    try:
        # weights_only: tensors, numbers, strings and containers, all a state holds (optimiser state_dict, generator
        # and RNG byte tensors, the step); a pickle naming any other object (a run dir from elsewhere) is refused
        # unrun, where weights_only=False executed whatever code it named
        state = torch.load(path, weights_only=True, map_location=map_location, mmap=map_location is not None)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a damaged file
        if named := re.search(r"GLOBAL ([\w.]+)", str(exc)):  # torch's many-line advice is to load it unsafely
            raise BadInput(f"{path} names {named.group(1)}, which no trainer state holds (a file from elsewhere?); "
                           f"it is not loaded, as loading it could run code: {fix}") from None
        reason = str(exc).strip().split("\n")[0] or type(exc).__name__
        raise BadInput(f"{path} is unreadable ({reason}); {fix}") from None
    want = ("optimizer", "generator", "torch_rng", "step")
    if not isinstance(state, dict) or any(k not in state for k in want):
        raise BadInput(f"{path} is not a trainer state (it needs {', '.join(want)}); {fix}")
    if step is not None and state["step"] != step:
        raise BadInput(f"{path} is the trainer state of step {state['step']}, not of {path.parent.name} "
                       f"(copied from another checkpoint?); {fix}")
    return interned_keys(state)


def resumed_checkpoint(ckpt: Path) -> ModelRef:
    """The checkpoint full fine-tuning resumes from, its config and weight files checked (headers, names and shapes
    against the config) before it loads: a damaged one is bad input naming the checkpoint to delete, as a damaged
    trainer state is (a truncated model.safetensors was one line without it, and every rerun stopped on it again)."""
    from probe.models import preflight, resolve_model

    try:
        ref = resolve_model(str(ckpt))
        preflight(ref)
    except BadInput as exc:
        raise BadInput(f"{exc}; delete {ckpt} and rerun the same command to resume from the checkpoint before it"
                       ) from None
    return ref


def interned_keys(obj: Any) -> Any:
    """``obj`` with every dict's string keys interned, as a fresh run's optimiser has them: pickle memoises by
    identity, so a resumed run's unpickled "step" keys wrote its later trainer states in other bytes than the
    uninterrupted run's (the same values; the state's own "step" key pickled apart). Tensors are kept as they are."""
    if isinstance(obj, dict):
        return {sys.intern(k) if isinstance(k, str) else k: interned_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interned_keys(v) for v in obj]
    return obj


def check_numbers(cfg: FinetuneConfig) -> None:
    """The numeric settings only this command has, before anything is read or written (rates, warm-up and seed are
    the training loop's: ``TrainConfig`` refuses a NaN or negative one, which would train to NaN weights or climb
    the loss and still exit 0)."""
    check_counts(cfg, ("steps", "lora", "limit", "micro_batch"))  # steps first: the checks below compare with it
    if cfg.seed >= 2**64:  # torch's generators take 64-bit seeds (TrainConfig refuses negative ones)
        raise BadInput(f"--seed must be in 0 .. 2^64 - 1, got {cfg.seed}")
    bad = [s for s in cfg.save_steps if not 0 <= s <= cfg.steps]
    if bad:
        raise BadInput(f"--save-steps {bad}: outside 0..{cfg.steps}")
    if cfg.warmup >= cfg.steps:  # the rate would never reach its peak, nor decay
        raise BadInput(f"--warmup {cfg.warmup} must be below --steps {cfg.steps} (0: no warm-up)")


def finish(out: Path, run_info: dict[str, Any], status: str, **extra: str) -> None:
    """run.json's last state: complete, or failed with the error (a run left "running" reads as a kill)."""
    from probe.results import atomic_write_json

    run_info |= {"status": status, **extra, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(out / "run.json", run_info)


def weights_dtype(placement: Placement, lora: int | None) -> str:
    """The dtype a fine-tuning run on ``placement`` holds its weights in, or BadInput for
    a precision the loop cannot train with. analyses.replicate asks it before its first stage."""
    if placement.dtype == "float16":
        raise BadInput("--dtype float16: fine-tuning in float16 needs loss scaling, which the training loop does not "
                       "do; use bfloat16 (mixed precision, float32 weights) or float32")
    # half precision is mixed precision: float32 weights and updates, the forward under autocast (probe.train);
    # with LoRA the frozen weights get no updates to lose, so they are held in bfloat16 (half the memory)
    return "bfloat16" if lora is not None and placement.dtype == "bfloat16" else "float32"


def check_launch(cfg: FinetuneConfig, placement: Placement, world: int, tcfg: TrainConfig) -> None:
    """How the run is launched (processes, FSDP, accelerate's settings, the device spread), checked before the
    model loads and checkpoint-0 is written."""
    from probe.train import (check_batch_splits, check_rendezvous, fsdp_launch, refuse_accelerate_settings,
                             refuse_fsdp)

    refuse_fsdp(placement.device_type)
    refuse_accelerate_settings()
    if world > 1 and cfg.lm_lr == 0:  # a rank whose rows reach no trained weight would skip its backward
        raise BadInput(f"--lm-lr 0 under {world} processes is not supported: a rank whose rows are all text would run "
                       "no backward pass while the others reduce their gradients (and wait for it); train a "
                       "frozen-LM stage in one process")
    fsdp_launch(tcfg)  # --fsdp in one process
    check_batch_splits(cfg.batch, world)
    if placement.spread and world > 1:
        raise BadInput(f"--device {cfg.device}: each of the {world} processes would spread the model "
                       f"over {len(placement.all_devices)} GPUs, which data parallelism cannot wrap; launch one process "
                       "per GPU, or one process alone to train the model split over them")
    check_rendezvous(placement.device_type == "cpu")  # last: the refusals above need no launch to be told


def read_data(cfg: FinetuneConfig, ref: ModelRef) -> tuple[dict[str, list], list[list[str]]]:
    """Each --data set's items (by label, in --data order) and its [label, content fingerprint], the model's
    modalities and prompts checked against them."""
    from probe.mmmu import load_items
    from probe.prompting import check_modalities, check_prompts

    items, contents = {}, []
    for label, path in cfg.data.items():
        its, report = load_items(path, split=cfg.split, limit=cfg.limit)
        contents.append([label, report.fingerprint])
        try:
            check_modalities(ref, its)
        except BadInput:
            raise BadInput(f"--data {label}={path}: {ref.spec} ({ref.family.name}) cannot read its items") from None
        check_label(label, path, its)
        items[label] = its
    check_prompts(ref, [it for its in items.values() for it in its])
    return items, contents


def load_trainee(cfg: FinetuneConfig, ref: ModelRef, frozen: str, placement: Placement, tcfg: TrainConfig,
                 world: int, adapter: Path | None) -> LoadedModel:
    """The model to train, checked to fit and to have something that trains: ``ref``'s weights in ``frozen``
    dtype, with ``--lora``'s adapters (``adapter``: the resumed checkpoint's, else freshly initialised)."""
    import torch

    from probe.devices import rank_world
    from probe.models import load_model
    from probe.train import anything_trains

    # one process's device holds the whole training state, as does each data parallel rank's GPU; an --fsdp rank's
    # GPU its share. Not checked for several processes on the CPU: they share one RAM
    if cfg.lora is None and not placement.spread and (world == 1 or placement.device_type != "cpu"):
        from probe.models import check_trains_fits

        check_trains_fits(ref, frozen, placement.device, next(iter(placement.device_memory), None), tcfg,
                          shards=world if cfg.fsdp else 1)
    elif cfg.lora is None and placement.spread:  # one process, the model split over its GPUs: each one's share
        from probe.models import check_spread_trains_fits

        check_spread_trains_fits(ref, frozen, placement.all_devices, placement.device_memory, tcfg)
    if cfg.fsdp:  # rank 0 reads the weights (into RAM), the other ranks build the model on the meta device
        from probe.fsdp import load_for_sharding

        loaded = load_for_sharding(ref, frozen, placement.device, rank_world()[0])
    else:
        loaded = load_model(ref, dtype=frozen, device=placement.device, devices=placement.all_devices,
                            device_memory=placement.device_memory, memory_kind=placement.memory_kind,
                            logits_fp32=False)  # trains the head as transformers does (no hook under FSDP/LoRA)
    if cfg.lora is not None:  # LoRA resumes from the original weights plus the checkpoint's adapter
        torch.manual_seed(cfg.seed)  # the adapters' random initialisation
        add_lora(loaded, cfg.lora, adapter)
    if not anything_trains(loaded.model, loaded, tcfg):  # e.g. --lm-lr 0 on a text-only model: it is all LM
        raise BadInput(f"--lr {cfg.lr} and --lm-lr {cfg.lm_lr} freeze every parameter of {ref.spec}: nothing would "
                       "train (a rate of 0 freezes its part; --lm-lr is the LM's, --lr the vision tower's and "
                       "projector's)")
    return loaded


def run_sessions(cfg: FinetuneConfig, saved: Any, start: int | None, world: int) -> list[dict[str, Any]]:
    """run.json's "sessions": the saved ones that ran steps before ``start`` (later ones' steps run again), then
    this invocation's way of running its steps."""
    kept = [s for s in (saved if isinstance(saved, list) and start is not None else [])
            if isinstance(s, dict) and isinstance(s.get("from_step"), int) and s["from_step"] < start]
    return [*kept, {"from_step": start or 0, "micro_batch": cfg.micro_batch,
                    "gradient_checkpointing": cfg.gradient_checkpointing, "processes": world, "fsdp": cfg.fsdp}]


def config_identity(config: Any) -> Any:
    """What a run's config (run.json's, as ``run_finetune`` writes it) is as its identity, by probe.eval's and
    probe.heads' rule: the model by where it is (``model_path``, ``model_location`` of its resolved directory), not
    by its name (``model``: it decides no number, the weights are ``model_fingerprint``'s), so a resume naming it
    otherwise (its alias or its directory) continues, labelled as now: it was refused as "a different run (model
    differ)". A config that is not an object is compared as it is. Paths inside a moved analyses.replicate run
    are named where its parts named them (``probe.results.as_computed``)."""
    from probe.results import as_computed

    return as_computed({k: v for k, v in config.items() if k != "model"}) if isinstance(config, dict) else config


def check_previous_run(cfg: FinetuneConfig, fingerprint: dict[str, Any]) -> bool:
    """A non-empty --out must hold this very run (resumed) or be one --overwrite may clear (one holding the model or
    a data set was refused before, by ``check_out_apart``, --overwrite or not); anything else is refused. True: the
    run there is to be cleared (``clear_run``), once every check has passed: cleared here, a rerun refused later
    (rates that freeze every weight, a training state that does not fit) exited 2 with the previous run deleted and
    nothing in its place."""
    from probe.results import different_run, has_contents, read_run_json

    out = cfg.out
    if not has_contents(out):
        return False
    try:
        previous = read_run_json(out)["config"]
    except (KeyError, TypeError):  # TypeError: missing or unreadable (None), or JSON but no object ([1])
        raise BadInput(f"--out {out} is not empty and holds no fine-tuning run.json") from None
    if cfg.overwrite:
        return True
    if config_identity(previous) != config_identity(fingerprint):
        raise different_run(out, previous, fingerprint, config_identity)
    return False


def append_log(log_path: Path, info: StepInfo, modality_of: dict[int, str], cfg: FinetuneConfig) -> None:
    """One train_log.csv row for a step: its rows per modality, loss, both rates and tokens."""
    counts: dict[str, int] = {}
    for i in info.rows:
        counts[modality_of[i]] = counts.get(modality_of[i], 0) + 1
    # --lora freezes everything outside the LM's adapters: the tower's rate is 0 there, whatever --lr says
    lr = 0.0 if cfg.lora is not None else cfg.lr * info.lr_factor
    with open(log_path, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow([info.step, ";".join(f"{k}={v}" for k, v in sorted(counts.items())),
                                repr(info.loss), repr(lr), repr(cfg.lm_lr * info.lr_factor), info.tokens])


@releases_claims
@outside_inference_mode  # a notebook's torch.inference_mode(): training needs a graph
def run_finetune(cfg: FinetuneConfig) -> Path:
    """``python -m analyses.finetune`` from Python: trains, writing ``checkpoint-<step>/``, train_log.csv and
    run.json into ``cfg.out`` (a killed run continues), and returns ``cfg.out``;
    ``figures.results.FinetuneRun.read(cfg.out)`` reads the run back (its log as a frame, step → checkpoint dir);
    ``finetune(**options)`` takes the command's options as keywords and returns it so. Bad input raises
    ``probe.errors.BadInput``. --seed seeds torch's random generators for the run only
    (``probe.train.random_state_kept``), the CPU's and those of the GPUs the run trains on: it forks them once its
    placement names them, not before (a GPU whose CUDA is not started yet could not be kept without starting it)."""
    from probe.devices import rank_world, resolve_placement
    from probe.train import random_state_kept

    check_numbers(cfg)
    check_out_path(cfg.out)  # before the model loads: an --out below a file is a one-line error
    local = [d for d in cfg.data.values() if d.lower() != "mmmu"]  # mmmu: the hub's cache
    # a set's own dir (or one holding it) is never a run's: said so, not "holds no fine-tuning run.json"
    check_out_apart(cfg.out, [("data set", d) for d in local], data=local)
    world = rank_world()[1]  # RANK 1 of WORLD_SIZE 1 trained, wrote nothing (not rank 0) and exited 0
    placement = resolve_placement(cfg.device, cfg.dtype)
    with random_state_kept(placement.all_devices):
        return _run_placed(cfg, placement, world)


def _run_placed(cfg: FinetuneConfig, placement: Placement, world: int) -> Path:
    """``run_finetune`` once the run's placement is known, under ``random_state_kept``."""
    from probe.devices import rank_world
    from probe.heads import check_out_apart_from_inputs, check_same_software, saved_run_info, versions
    from probe.lm_config import declared_quantization
    from probe.models import model_fingerprint, model_location, resolve_model
    from probe.results import (atomic_write_json, atomic_write_with, check_same_run_on_every_rank, claim_out_dir,
                               has_contents, lock_out_dir, read_run_json, remove_stale_temps, stop_recorded)
    from probe.train import TrainConfig, check_finite_weights, encode, is_main_process, process_state
    from probe.train import train as train_loop
    from probe.train import wait_for_everyone

    on_cpu = placement.device_type == "cpu"  # how the ranks' barriers set accelerate up (wait_for_everyone)
    frozen = weights_dtype(placement, cfg.lora)
    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, lm_lr=cfg.lm_lr, batch=cfg.batch, warmup=cfg.warmup,
                       seed=cfg.seed, log_every=max(1, cfg.steps // 10),  # checks its numbers now, not mid-run
                       autocast="bfloat16" if placement.dtype == "bfloat16" else None,
                       schedule=LOOP_IDENTITY["schedule"], micro_batch=cfg.micro_batch,
                       checkpointing=cfg.gradient_checkpointing, fsdp=cfg.fsdp)
    check_launch(cfg, placement, world, tcfg)
    ref = resolve_model(cfg.model)
    # the model's own dir (or one holding it) is never a run's: said so, not "holds no fine-tuning run.json"
    check_out_apart_from_inputs(cfg.out, [ref.path], [], None)  # its data sets were checked before
    if ref.gguf_file is not None:  # save_pretrained refuses a model loaded from GGUF: checkpoint-0 would be a traceback
        raise BadInput(f"{cfg.model}: a GGUF model cannot be fine-tuned here (transformers cannot save its "
                       "checkpoints); fine-tune a Hugging Face model directory (safetensors) of it instead")
    if method := declared_quantization(ref.config):  # codes and scales: checkpoint-0's save (LoRA) or the
        # save_pretrained (full) stopped only after run.json and the log were written, and the fixed rerun was refused
        raise BadInput(f"{cfg.model}: a quantized checkpoint ({method}, config.json quantization_config) cannot be "
                       "fine-tuned here; fine-tune a dequantized copy (float weights, no quantization_config)")
    items, contents = read_data(cfg, ref)
    # what decides the numbers: resolved precision and device type, not the "auto" typed, the model's weights
    # (a model re-merged at the same path is another run, never one whose checkpoints a resume continues) and the
    # items of each set in --data order (the order the sampler draws modalities in): a set regenerated at its path,
    # or given from another working dir, would otherwise be trained on from the resumed step on
    fingerprint = cfg.fingerprint() | {"dtype": placement.dtype, "device": placement.device_type,
                                       "model_path": model_location(str(ref.path)),
                                       "model_fingerprint": model_fingerprint(ref), "items": contents,
                                       **LOOP_IDENTITY}
    if frozen != "float32":  # LoRA runs from before frozen weights were held in bfloat16 are other runs
        fingerprint["frozen_weights"] = frozen
    fingerprint = json.loads(json.dumps(fingerprint))  # as run.json holds it
    if world > 1:  # every rank trains the same run, checked over the launch's process group before --out is read
        process_state(on_cpu)
        check_same_run_on_every_rank(config_identity(fingerprint))
    out = cfg.out
    clear = check_previous_run(cfg, fingerprint)
    if has_contents(out):  # this run's to resume (or to clear): claimed at once, as probe.heads claims a resume, so
        lock_out_dir(out, shared=world > 1)  # a command running there is refused in one line before the model loads
        remove_stale_temps(out)  # a SIGKILL before an atomic write's rename left its temp file (a live rank's stay)
    start, resumable = (None, {}) if clear else resume_point(out, cfg)  # --overwrite: a run from the start
    if start == cfg.steps and (out / "train_log.csv").is_file():
        saved = read_run_json(out)  # an object: check_previous_run has vouched for it
        if saved.get("status") != "complete" and is_main_process():  # killed after its last checkpoint
            finish(out, saved, "complete")
        print(f"already complete: {out}")
        return out
    software = versions()
    if start is not None:  # steps trained under other torch/transformers/omniprobe code: not the run it claims
        check_same_software(out, saved_run_info(out).get("versions"), software)
    source, source_ref = ref.path, ref

    def check_source() -> None:
        """A LoRA checkpoint is the adapter merged into the source's files, read again at every save
        (write_lora_merge checks the adapted weights only): a source rewritten during the run would give the
        checkpoint the new files' other tensors (vision tower, embeddings) without a word."""
        if cfg.lora is not None and model_fingerprint(source_ref) != fingerprint["model_fingerprint"]:
            raise BadInput(f"{source} changed on disk during the run: its LoRA checkpoints merge the adapter into "
                           "the source's files, which are no longer the weights it trained on; put them back and "
                           "rerun to resume, or start another run (--overwrite)")

    if start is not None and cfg.lora is None:
        ref = resumed_checkpoint(resumable[start])  # full fine-tuning resumes from the checkpoint's weights
    loaded = load_trainee(cfg, ref, frozen, placement, tcfg, world,
                          resumable[start] / "adapter" if start is not None and cfg.lora is not None else None)
    resume = (read_state(resumable[start] / STATE, state_location(world, cfg.fsdp, placement.device), start)
              if start else None)
    print(placement.description, flush=True)  # on stdout, as probe.heads: a refusal after it is stderr's one line
    rows, offsets = [], {}
    for label, its in items.items():
        enc = encode(loaded, its, True)
        offsets[label] = range(len(rows), len(rows) + len(enc))
        rows += enc
    modality_of = {i: label for label, r in offsets.items() for i in r}
    if clear:  # the last refusal before anything is written has passed (a processor refusing an item: encode)
        clear_run(out, on_cpu)
    writer = is_main_process()  # under torchrun only rank 0 writes, once every rank has read the out dir
    wait_for_everyone(on_cpu)
    make_out_dir(out)
    # how each invocation ran its steps (not the run's identity, so a resume may change it): a researcher reads
    # which steps ran in micro-batches or with recomputed activations; sessions past the resumed checkpoint are
    # dropped, as their steps run again
    sessions = run_sessions(cfg, saved_run_info(out).get("sessions") if start is not None else None, start, world)
    run_info = {"config": fingerprint, "placement": asdict(placement), "n_rows": {k: len(v) for k, v in offsets.items()},
                "sessions": sessions, "versions": software, "status": "running",
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    log_path = out / "train_log.csv"
    keep = kept_log_rows(log_path, start) if start is not None and log_path.is_file() else []
    saves = set(checkpoint_steps(cfg.save_steps, cfg.steps))  # 0 is written before the loop
    if writer:
        claim_out_dir(out, config_identity(fingerprint), lambda saved: config_identity(saved.get("config")))
        atomic_write_json(out / "run.json", run_info)
        def write_log(tmp: str) -> None:  # the kept lines, swapped in whole: a kill here loses none of them
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, LOG_COLUMNS)
                w.writeheader()
                w.writerows(keep)

        atomic_write_with(log_path, write_log)
        if start is None:
            check_source()
            save_checkpoint(loaded, source, out / "checkpoint-0", None)
    from probe.mmmu import EVALUATION_SPLITS

    # after the claim and the processor's checks of the items: a refusal before it stays stderr's one line
    if cfg.split in EVALUATION_SPLITS and rank_world()[0] == 0:  # probe.eval's default split (until 2026-12-05 silent)
        print(f"warning: --split {cfg.split} trains on the items probe.eval scores by default: checkpoints evaluated "
              f"on them are not held out (train on a training split)", file=sys.stderr)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start or 0, desc="finetune", unit="step", file=sys.stderr, disable=not writer or cfg.quiet)

    def on_step(info, state) -> None:
        bar.update(1)
        if info.step in saves:  # on every rank (their weights are equal), so all stop together
            check_finite_weights(loaded.model, info.step)  # the step's loss was finite, its update may not be
            check_source()
        # under FSDP every rank gathers the whole weights (with LoRA: the adapters) and optimiser state for rank 0
        gathered = state(frozen=cfg.lora is None) if cfg.fsdp and info.step in saves else None
        if not writer:
            return
        append_log(log_path, info, modality_of, cfg)
        if info.step in saves:
            loaded.model.eval()
            if gathered is None:
                save_checkpoint(loaded, source, out / f"checkpoint-{info.step}", state())
            else:
                weights = gathered.pop("model")
                save_checkpoint(loaded, source, out / f"checkpoint-{info.step}", gathered, weights=weights)
            loaded.model.train()

    try:  # a check that stops the run (RunStopped) says so in run.json, as in probe.heads and probe.eval
        with stop_recorded(out, run_info) if writer else contextlib.nullcontext():
            train_loop(loaded, rows, tcfg, log=lambda m: None, sampler=mixed_sampler(offsets, cfg.mix),
                       on_step=on_step, resume=resume)
    except (BadInput, RunStopped) as exc:
        bar.close()
        if writer and isinstance(exc, BadInput):  # diverged: run.json says so ("running" reads as a kill, to resume)
            finish(out, run_info, "failed", error=str(exc))
        raise
    bar.close()
    if not writer:
        return out
    finish(out, run_info, "complete")
    print(f"{cfg.steps} steps; checkpoints {sorted(saves)} in {out}/")
    return out


def build_parser() -> argparse.ArgumentParser:
    from probe.heads import _Help

    p = ArgParser(prog="python -m analyses.finetune", formatter_class=_Help, examples=[
        "python -m probe.zoo data --out runs/data    # training items of the organisms' tasks",
        "python -m analyses.finetune --model runs/eq4/carriers/organism-vl --data text=runs/data/text "
        "image=runs/data/image video=runs/data/video --mix 3:2:1 --steps 200 --save-steps 0 10 50 100 "
        "--out runs/ft/mixed",
        "python -m analyses.finetune --model organism-vl --data image=runs/data/image --steps 50 --lora 8 "
        "--out runs/ft-lora",
        "python -m probe.eval --models runs/ft/mixed/checkpoint-* --data probe/zoo/data/text --out runs/steps/text"
        "   # Figure 3: each checkpoint scored",
        "python -m figures steps runs/steps/text     # accuracy against steps, steps.png/pdf"],
                                description="Small-step fine-tuning of a (merged) model on a modality mix (paper "
                                "§6.2). Writes OUT/checkpoint-<step>/ dirs, train_log.csv and run.json; resumable after a kill.")
    p.add_argument("--model", required=True, help="alias or HF dir (a merged carrier, an organism, a real VLM)")
    p.add_argument("--data", nargs="+", required=True, metavar="LABEL=DIR",
                   help="MMMU-layout training sets by modality, e.g. text=DIR image=DIR video=DIR")
    p.add_argument("--mix", default=None, help="sampling weights per --data, in order, e.g. 3:2:1 (default: equal)")
    p.add_argument("--split", default="train", help="split of the data sets to train on")
    p.add_argument("--limit", type=int, default=None,
                   help="first N multiple-choice items of each data set (default: all)")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps")
    p.add_argument("--save-steps", type=int, nargs="+", default=[0], help="steps to checkpoint, besides the last (default: 0, the start)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate outside the LM (vision tower, projector; default: 1e-4); no effect with --lora")
    p.add_argument("--lm-lr", type=float, default=1e-4, help="learning rate of the LM (with --lora: of the adapters) (default: 1e-4)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per step")
    p.add_argument("--micro-batch", type=int, default=None, metavar="N",
                   help="rows per forward and backward; the step's gradient is accumulated over them, so the run "
                   "is the same as without (to float tolerance) in less memory, and a resume may change it "
                   "(default: each modality of the step's rows at once)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward instead of keeping them: less memory, ~1/3 more "
                   "time, the same run (a resume may change it)")
    p.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up steps to the peak rate, then a cosine down to 5 %% of it at the last step; "
                   "must be below --steps (default: 10, or --steps - 1 for shorter runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, adapters and the optimiser's run (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--lora", type=int, default=None, metavar="R",
                   help="train LoRA adapters of rank R (peft) on the LM's projections instead of all weights (the "
                   "vision tower and projector stay frozen); "
                   "checkpoints hold the merged weights (float32) and the adapter; under bfloat16 the frozen "
                   "weights are held in bfloat16, half the memory, and the adapters in float32 (default: none, every "
                   "weight trains)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun --nproc-per-node K: shard every weight, gradient and AdamW moment over the K "
                   "processes (torch's FSDP2, each decoder layer and the root), instead of each process holding the "
                   "whole model (data parallel); only rank 0 reads the checkpoint (into RAM), the others receive "
                   "their shards from it; the same run to float tolerance, checkpoints gathered whole by "
                   "every rank and written by rank 0 (with --lora: the adapters, merged into the source's files); a "
                   "resume may change it")
    p.add_argument("--device", default="auto",
                   help="auto (this process's GPUs, several → one model split by layers; else cpu), cpu, cuda, "
                        "cuda:0,cuda:1")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, else float32), float32, bfloat16; "
                   "bfloat16 is mixed precision: the forward in it, float32 weights, updates and checkpoints")
    p.add_argument("--out", type=out_dir, required=True, help="output dir (checkpoint-<step>/, train_log.csv, run.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the fine-tuning run in --out (its checkpoints, log and run.json; nothing else)")
    return p


def config(a: argparse.Namespace) -> FinetuneConfig:
    """The FinetuneConfig of parsed arguments (``build_parser``'s): the command line's and ``finetune(**options)``'s
    (--data and --mix parsed, --warmup's default below --steps, --lr's 1e-4)."""
    data = parse_data(a.data)
    warmup = a.warmup if a.warmup is not None else min(10, max(0, a.steps - 1))  # below --steps, as it must be
    from probe.devices import rank_world

    # peft freezes all but the adapters: --lr would be ignored (said once, not by every rank of a launch)
    if a.lora is not None and a.lr is not None and rank_world()[0] == 0:
        print(f"warning: --lr {a.lr} has no effect with --lora (only the LM's adapters train, at --lm-lr)",
              file=sys.stderr)
    return FinetuneConfig(model=a.model, data=data, out=a.out, steps=a.steps, mix=parse_mix(a.mix, list(data)),
                          save_steps=a.save_steps, split=a.split, limit=a.limit,
                          lr=1e-4 if a.lr is None else a.lr, lm_lr=a.lm_lr,
                          batch=a.batch_size, warmup=warmup, seed=a.seed, device=a.device, dtype=a.dtype,
                          lora=a.lora, quiet=a.quiet, overwrite=a.overwrite, micro_batch=a.micro_batch,
                          gradient_checkpointing=a.gradient_checkpointing, fsdp=a.fsdp)


# probe.errors.cli_main's out-of-memory advice, and finetune()'s: --batch-size and --dtype are the run's identity
# (the rerun would be refused as another run), these two are not
MEMORY_HINT = (
    "run each step in micro-batches (--micro-batch N, e.g. half the rows so far) or with --gradient-checkpointing, "
    "then rerun the command with them: it goes on from its last checkpoint (a smaller --batch-size or another "
    "--dtype is another run)")


@says_out_of_memory(MEMORY_HINT)
def finetune(**options: Any) -> Any:
    """The fine-tuning run from Python, e.g. ``finetune(model="organism-vl", data=["text=probe/zoo/data/text"],
    split="validation", steps=20, save_steps=[0, 10], out="runs/ft")``: the options of ``python -m
    analyses.finetune --help`` as keywords (``batch_size=8`` for ``--batch-size 8``, a list for several values, True
    for a flag). A killed run continues and a finished one is kept, as the command does. Returns the finished run
    read back, a ``figures.results.FinetuneRun`` (``.log``, ``.info``, ``.checkpoints``); under ``torchrun`` that is
    rank 0's answer, once it has written the last checkpoint and run.json, and every other rank returns None (its
    share of the training done; rank 0 writes the files). A refused value raises ``probe.errors.BadInput``, an
    unknown keyword ``TypeError``, memory running out ``probe.errors.OutOfMemory`` with the command line's line."""
    from figures.results import FinetuneRun
    from probe.train import is_main_process

    out = run_finetune(config(parse_options(build_parser(), options)))
    return FinetuneRun.read(out) if is_main_process() else None


def main(argv: Sequence[str] | None = None) -> int:
    run_finetune(config(build_parser().parse_args(argv)))
    return 0


main.memory_hint = MEMORY_HINT  # type: ignore[attr-defined]  # read by cli_main


if __name__ == "__main__":
    sys.exit(cli_main(main))
