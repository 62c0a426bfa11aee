"""Lazy, memory-mapped checkpoint reading, one tensor at a time, with layout resolution (DESIGN §1, STYLE 7).

Safetensors headers are parsed and checked eagerly (cheap); tensor data is a zero-copy view of a read-only
``mmap`` (so inputs can never be written) and its pages are dropped with ``madvise(DONTNEED)`` once the caller
is done, which keeps peak RSS at a few tensors whatever the model size. ``.bin`` checkpoints are read only when
asked for, with ``torch.load(weights_only=True, mmap=True)``.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import struct
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from probe.errors import BadInput, input_in_out, out_dir, out_inside
from probe.families import FAMILIES, Family, Layout, canonical_lm_name, check_layout_model_type, detect_layout
from probe.lm_config import (config_geometry, config_model_type, declared_quantization, read_config_json, says_untied,
                              text_config_dict)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)  # only quantized checkpoints store weights in 8 bits
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # dim 0 is the vocabulary (DESIGN §5)
_MAX_HEADER = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape, absolute byte range (safetensors) or key (.bin)."""

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def sizes(values: Any, count: int | None = None) -> tuple[int, ...]:
    """A header's shape or data_offsets: a list of non-negative integers (of ``count`` of them), as the safetensors
    library requires (it refuses 4.0, "4", true and -4, which ``int()`` took: a file transformers cannot load read
    with exit 0, or a negative shape's traceback). ValueError/TypeError otherwise."""
    if not isinstance(values, list) or (count is not None and len(values) != count):
        raise TypeError("not a list of sizes")
    if not all(type(v) is int and v >= 0 for v in values):
        raise ValueError("a size that is no non-negative integer")
    return tuple(values)


class SafetensorsFile:
    """One safetensors file: header validated on open, data memory-mapped read-only on first use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise BadInput(f"{self.path}: corrupt safetensors file (shorter than its header)")
                (n,) = struct.unpack("<Q", raw)
                if n > min(_MAX_HEADER, size - 8):
                    raise BadInput(f"{self.path}: corrupt safetensors file (bad header length)")
                header = json.loads(f.read(n))
        except OSError as exc:
            raise BadInput(f"{self.path}: cannot read ({exc.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadInput(f"{self.path}: corrupt safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise BadInput(f"{self.path}: corrupt safetensors file (header is not a mapping)")
        base = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise BadInput(f"{self.path}: corrupt safetensors file (__metadata__ is not a map of strings)")
        self.tensors: dict[str, TensorInfo] = {}
        for key, meta in header.items():
            try:
                name = meta["dtype"]
                shape = sizes(meta["shape"])
                lo, hi = sizes(meta["data_offsets"], 2)
            except (KeyError, TypeError, ValueError):
                raise BadInput(f"{self.path}: corrupt safetensors entry {key!r}") from None
            if name not in DTYPES:  # a dtype of the format torch has no tensor for (F4, F6_*, F8_E8M0, C64)
                raise BadInput(f"{self.path}: tensor {key!r} is stored as {name!r}, a dtype these analyses do not "
                               f"read ({', '.join(DTYPES)})")
            dtype = DTYPES[name]
            info = TensorInfo(key, self.path, dtype, shape, base + lo, base + hi)
            if hi < lo or base + hi > size or info.nbytes != hi - lo:
                raise BadInput(f"{self.path}: corrupt or truncated safetensors file (tensor {key!r})")
            self.tensors[key] = info
        # the tensors tile the data section, as the safetensors library requires before transformers loads a file:
        # overlapping ranges would read one tensor's bytes as another's, a gap or tail bytes belong to none
        end = base
        for info in sorted(self.tensors.values(), key=lambda i: (i.start, i.end)):
            if info.start != end:
                raise BadInput(f"{self.path}: corrupt safetensors file (tensor byte ranges overlap or leave a gap, "
                               f"at {info.key!r})")
            end = info.end
        if end != size:
            raise BadInput(f"{self.path}: corrupt safetensors file ({size - end} bytes after the last tensor)")

    def _map(self) -> mmap.mmap:
        if self._mm is None:  # the mapping keeps a descriptor of its own (a dup): one per mapped file, not two
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def view(self, info: TensorInfo) -> torch.Tensor:
        """Zero-copy, read-only tensor over the mapped bytes (writing to it would fault, never touch disk)."""
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "buffer is not writable": intended, inputs are read-only
            t = torch.frombuffer(self._map(), dtype=info.dtype, count=info.numel, offset=info.start)
        return t.view(info.shape)

    def raw(self, info: TensorInfo) -> memoryview:
        """The tensor's bytes as stored (for bit-exact copies)."""
        return memoryview(self._map())[info.start:info.end]

    def release(self, info: TensorInfo) -> None:
        """Drop the tensor's pages from this process's resident set (they stay in the page cache)."""
        if self._mm is None or info.end <= info.start:
            return
        lo = (info.start // _PAGE) * _PAGE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, info.end - lo)
        except (AttributeError, OSError, ValueError):
            pass  # advisory only

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a view is still alive; the mapping (and its descriptor) goes with it
            self._mm = None


class BinFile:
    """A PyTorch ``.bin`` state dict, loaded with ``weights_only=True`` and ``mmap=True`` (opt-in only)."""

    def __init__(self, path: Path):
        from probe.models import bin_state_dict

        self.path = Path(path)
        self._sd = bin_state_dict(self.path)  # the probe's reader: the same refusals (not a state dict, unnamed keys)
        self.metadata: dict[str, str] = {}
        self.tensors = {
            k: TensorInfo(k, self.path, v.dtype, tuple(v.shape), 0, v.numel() * v.element_size())
            for k, v in self._sd.items()
        }

    def view(self, info: TensorInfo) -> torch.Tensor:
        return self._sd[info.key].contiguous()

    def raw(self, info: TensorInfo) -> memoryview:
        t = self._sd[info.key].contiguous().reshape(-1)
        return memoryview(t.view(torch.uint8).numpy())

    def release(self, info: TensorInfo) -> None:
        pass

    def close(self) -> None:
        self._sd.clear()


def resolve_model_dir(spec: str) -> Path:
    """A local checkpoint dir, or an alias resolved by the probe's one resolver (hub cache, organisms, tiny)."""
    from probe.models import is_gguf, model_path

    path = model_path(spec)
    if is_gguf(path):  # e.g. the smollm2-135m alias: once "not a directory", as if unknown
        raise BadInput(f"{spec}: a GGUF file ({path.name}) holds quantized weights (codes and scales, not values to "
                       "compare or merge); dequantize it to a Hugging Face model directory (safetensors) first")
    if not path.is_dir():
        raise BadInput(f"{spec}: not a directory")
    return path


def _weight_files(model_dir: Path, allow_bin: bool) -> tuple[Path | None, dict[str, Path]]:
    """Map every tensor key to its file: the weights transformers loads (``probe.models.weights_entry``, so the
    analyses read what probe.eval and probe.heads run), from the index when that is it; check every shard exists.
    Returns the index followed (None: whole files, each keyed by its name) with the map."""
    from probe.models import read_weight_map, weights_entry

    entry = weights_entry(model_dir)
    if entry is not None and entry.name.endswith(".index.json"):
        if entry.name.startswith("pytorch_model") and not allow_bin:
            raise BadInput(f"{model_dir}: only .bin weights; pass --allow-bin to read them (weights_only)")
        wmap = read_weight_map(entry)  # shards by file name only: never read from outside model_dir
        files = {k: model_dir / v for k, v in wmap.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise BadInput(f"{model_dir}: missing shard {f.name} (listed in {entry.name})")
        return entry, files
    # no standard name: every *.safetensors file, else every pytorch_model*.bin
    single = [entry] if entry is not None else (sorted(model_dir.glob("*.safetensors"))
                                                or sorted(model_dir.glob("pytorch_model*.bin")))
    if single and single[0].suffix == ".bin" and not allow_bin:
        raise BadInput(f"{model_dir}: only .bin weights; pass --allow-bin to read them (weights_only)")
    if not single:
        raise BadInput(f"{model_dir}: no weight files (*.safetensors)")
    # every key of each of these files (one shared key kept only the last file: a dir of two loose files read
    # as its second alone)
    return None, {f.name: f for f in single}


@dataclass
class Checkpoint:
    """One HF checkpoint dir: its layout, its LM tensors under canonical names, the rest under disk names."""

    name: str
    path: Path
    config: dict[str, Any]
    layout: Layout
    family: Family
    infos: dict[str, TensorInfo]  # disk key -> where it lives
    lm: dict[str, str]  # canonical LM name -> disk key
    other: list[str]  # non-LM disk keys (vision tower, projector, ...), in file order
    _files: dict[Path, SafetensorsFile | BinFile] = field(default_factory=dict, repr=False)

    @property
    def text_config(self) -> dict[str, Any]:
        return text_config_dict(self.config, self.family)

    @property
    def tied(self) -> bool:
        """No lm_head on disk: the embedding doubles as the output projection."""
        return "lm_head.weight" not in self.lm

    def lm_key(self, canon: str) -> str | None:
        if canon in self.lm:
            return self.lm[canon]
        if canon == "lm_head.weight" and self.tied:
            return self.lm.get("embed_tokens.weight")
        return None

    def lm_info(self, canon: str) -> TensorInfo:
        key = self.lm_key(canon)
        if key is None:
            raise BadInput(f"{self.name}: LM tensor {canon!r} missing (layout {self.layout.name})")
        return self.infos[key]

    def file(self, info: TensorInfo) -> SafetensorsFile | BinFile:
        return self._files[info.file]

    def view(self, info: TensorInfo) -> torch.Tensor:
        return self.file(info).view(info)

    def release(self, info: TensorInfo) -> None:
        self.file(info).release(info)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checkpoint_fingerprint(ck: Checkpoint) -> str:
    """What the checkpoint's directory holds, as ``probe.eval`` fingerprints a local model
    (``probe.models.local_fingerprint``: its top-level files, not carriers or runs kept inside it)."""
    from probe.models import local_fingerprint

    return local_fingerprint(ck.path)


def open_checkpoint(spec: str, allow_bin: bool = False) -> Checkpoint:
    """Resolve, read config and headers, detect the layout; no tensor data is touched."""
    from probe.models import check_layer_counts, check_lm_sizes, check_shard_keys, check_tied_head, loads_tied

    path = resolve_model_dir(spec)
    config = read_config_json(path)
    model_type = config_model_type(path, config)  # as resolve_model reads it
    check_layout_model_type(model_type)
    check_not_quantized(path, config)
    files: dict[Path, SafetensorsFile | BinFile] = {}
    infos: dict[str, TensorInfo] = {}
    index, wmap = _weight_files(path, allow_bin)
    for f in sorted(set(wmap.values())):
        files[f] = BinFile(f) if f.suffix == ".bin" else SafetensorsFile(f)
    # each tensor in one file, the one the index names: else transformers runs one copy and we read the other
    # (the index's weight_map as read once above: shard names are plain file names, so f.name is the name it gives)
    check_shard_keys(path, index, None if index is None else {k: f.name for k, f in wmap.items()},
                     {f: list(fobj.tensors) for f, fobj in files.items()})
    if index is None:
        for fobj in files.values():
            infos.update(fobj.tensors)
    else:
        for key, f in wmap.items():  # each in its shard (check_shard_keys)
            infos[key] = files[f].tensors[key]
    check_layer_counts(path, config, list(infos))  # before a skeleton is built from it (check_tied_head)
    layout = detect_layout(model_type, infos, str(path))
    config_geometry(path, config, FAMILIES[layout.family])  # none: a damaged checkpoint, as for probe.heads/eval
    lm: dict[str, str] = {}
    other: list[str] = []
    for key in infos:
        canon = canonical_lm_name(layout, key)
        if canon is None:
            other.append(key)
        elif canon in lm:
            raise BadInput(f"{path}: two tensors map to LM name {canon!r} ({lm[canon]}, {key})")
        else:
            lm[canon] = key
    if "embed_tokens.weight" not in lm or not any(c.startswith("layers.") for c in lm):
        raise BadInput(f"{path}: no LM tensors found under layout {layout.name}")
    # probe.eval's load refuses an LM whose shapes contradict config.json: these readers refuse it alike
    check_lm_sizes(path, config, FAMILIES[layout.family], {c: (k, infos[k].shape) for c, k in lm.items()})
    # a text config's false that the class ignores (Gemma 3, InternVL tie by default) is asked of it (loads_tied)
    if "lm_head.weight" not in lm and says_untied(config, FAMILIES[layout.family]) and not loads_tied(
            config, FAMILIES[layout.family]):
        raise BadInput(f"{path}: no lm_head tensor, yet config.json unties it from embed_tokens "
                       "(tie_word_embeddings false): transformers would initialise it at random; a damaged checkpoint")
    if f8 := next((k for k in lm.values() if infos[k].dtype in FLOAT8), None):
        raise BadInput(f"{path}: LM tensor {f8} is {DTYPE_NAMES[infos[f8].dtype]}, a quantized checkpoint's codes "
                       "(their scales are separate tensors); dequantize it to bf16/fp16/fp32 first")
    if "lm_head.weight" in lm:  # config.json tying it: the file's differing lm_head is run by some loaders only
        head, embed = (infos[lm[c]] for c in ("lm_head.weight", "embed_tokens.weight"))
        try:
            check_tied_head(path, config, FAMILIES[layout.family], head.key, embed.key,
                            lambda key: files[infos[key].file].view(infos[key]))
        finally:
            for info in (head, embed):
                files[info.file].release(info)
    return Checkpoint(spec, path, config, layout, FAMILIES[layout.family], infos, lm, other, files)


# descriptors a command holds besides its mapped checkpoint files: the interpreter's, torch's, what it writes
FD_MARGIN = 64


def open_descriptors() -> int:
    """This process's open file descriptors (0 where the system does not list them)."""
    for fds in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(fds):
            return len(os.listdir(fds))
    return 0


def reserve_descriptors(ckpts: Iterable[Checkpoint]) -> None:
    """Room to map every weight file of ``ckpts`` at once: trajectory, shift and merge read their checkpoints side
    by side, and each mapped file holds an open descriptor until the command ends, so a trajectory over many
    checkpoints of a many-shard model passes the usual limit of 1,024 open files (``ulimit -n``) when the stream
    reaches the later shards, hours in. The soft limit is raised toward the hard one now; a hard limit that is too
    low is bad input before anything is read."""
    try:
        import resource
    except ImportError:  # no such limits here
        return
    files = {f for ck in ckpts for f in ck._files}
    need = len(files) + FD_MARGIN + open_descriptors()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise BadInput(f"the checkpoints' {len(files)} weight files are read side by side, one open file each "
                       f"(about {need} in all), but this process may open at most {hard} (ulimit -Hn); raise that "
                       "limit, or give fewer checkpoints")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def check_not_quantized(path: Path, config: dict[str, Any]) -> None:
    """A quantized checkpoint stores each weight as codes plus scale tensors (FP8 ``weight_scale_inv``, GPTQ/AWQ
    ``qweight``/``scales``): Δ, sums and sketches of those are not of the weights, and a merge of them is no model."""
    if method := declared_quantization(config):
        raise BadInput(f"{path}: a quantized checkpoint ({method}, config.json quantization_config): its "
                       "weights are codes and scales, not values to compare or merge; dequantize it first")


def layer_module(canon: str) -> tuple[int | None, str]:
    """``layers.3.self_attn.q_proj.weight`` -> (3, ``self_attn.q_proj.weight``); others -> (None, name)."""
    m = re.match(r"layers\.(\d+)\.(.+)$", canon)
    return (int(m.group(1)), m.group(2)) if m else (None, canon)


def chunks(numel: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, numel, size):
        yield lo, min(numel, lo + size)


def check_inputs_and_out(out: Path, inputs: Sequence[Checkpoint], others: Sequence[Checkpoint] = ()) -> None:
    """Each of ``inputs`` once (a model listed twice would count twice in every mean and merge), and ``out`` never
    one of ``inputs``/``others`` nor a folder holding one: ``--overwrite`` replaces the whole output dir."""
    check_each_once(inputs)
    if hit := input_in_out(out, [(ck.name, ck.path) for ck in [*inputs, *others]]):
        raise BadInput(f"--out {out} would replace the input {hit[0]} ({hit[1]}); pick another --out")


def check_each_once(inputs: Sequence[Checkpoint], kind: str = "model") -> None:
    """Each of ``inputs`` (checkpoints of one option) once, however its path is spelt: BadInput naming the first that
    is not."""
    seen: dict[Path, str] = {}
    for ck in inputs:
        p = Path(ck.path).resolve()
        if p in seen:
            # one name twice was said as "X and X are the same checkpoint"
            what = f"{ck.name} is listed twice" if ck.name == seen[p] else \
                f"{ck.name} and {seen[p]} are the same checkpoint"
            raise BadInput(f"{what} ({p}); list each {kind} once")
        seen[p] = ck.name


def check_out_outside(out: Path, inputs: Sequence[tuple[str, str | Path]]) -> None:
    """``out`` lies inside none of the input dirs ``inputs`` ((name, path)) whose fingerprint counts every file below
    them (a shift table's dir; a salience run's, fingerprinted whole when it lacks heads.csv or run.json): a merge
    written inside its --shift dir changed that input, so the same command again was refused as an output 'of other
    options or inputs'. A model's fingerprint counts its own files only: a folder inside it is fine, as for
    probe.eval."""
    if hit := out_inside(out, inputs):
        raise BadInput(f"--out {out} is inside the input {hit[0]} ({hit[1]}): a command never writes where it reads; "
                       "pick an --out outside it")


def add_output_args(p: argparse.ArgumentParser, out_help: str, figures: bool = True) -> None:
    """The options every analyses command shares: where to write, replacing it, reading .bin, figures, quiet."""
    p.add_argument("--out", type=out_dir, required=True, help=out_help)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this command there (nothing else is ever deleted)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--allow-bin", action="store_true", help="also read .bin checkpoints (weights_only)")
    if figures:
        p.add_argument("--no-figures", action="store_true", help="skip the figures")


_QUIET: ContextVar[bool] = ContextVar("quiet", default=False)


@contextmanager
def quiet_progress(quiet: bool) -> Iterator[None]:
    """``--quiet``: no progress bar from ``progress`` inside (shift, merge, trajectory; replicate's stages)."""
    token = _QUIET.set(quiet or _QUIET.get())
    try:
        yield
    finally:
        _QUIET.reset(token)


def progress(iterable: Iterable, **kwargs: Any) -> Iterable:
    """A tqdm bar over ``iterable`` on stderr, unless inside ``quiet_progress(True)``."""
    from tqdm import tqdm

    return tqdm(iterable, disable=_QUIET.get(), **kwargs)
