"""Tiny random-weight models of each family, built from configs with a fixed seed (tests and fallbacks).

They are ordinary HF model directories (config, safetensors, tokenizer, image-processor config), so they go
through exactly the loading path of a real checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from probe.errors import drop_partial
from probe.families import FAMILIES, family_of_model_type
from probe.lm_config import processor_kwargs, read_config_json
from probe.tokenizer import build_tokenizer, media_ids, special_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Enough text for BPE merges on the prompt vocabulary; the tokenizer is byte-level so nothing is unknown.
_CORPUS = [
    "Answer with the option's letter from the given choices directly.",
    "Question: What colour is the circle?\nChoices:\nA. red\nB. blue\nC. green\nD. yellow\n",
    "Which shape is purple? How many shapes are there? Where is the orange square?",
    "left right top bottom circle square triangle star one two three four",
]


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    seed: int = 0


def _text_config(spec: TinySpec, vocab: int, special: dict[str, int]) -> dict:
    return dict(special,
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def _vision(**over) -> dict:
    """A 2-layer vision tower of 32 channels on 32×32 images of 8×8 patches."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8) | over


def _qwen_vision(spec: TinySpec, **over) -> dict:
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=spec.hidden_size,
                patch_size=8, spatial_merge_size=2, temporal_patch_size=2) | over


def _mrope(head_dim: int, **over) -> dict:
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]  # M-RoPE split of the rotary half-dim
    return {"rope_parameters": {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0} | over}


def _qwen_image_processor(patch: int = 8):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=patch, merge_size=2,
                                    temporal_patch_size=2)


# One builder per family: (spec, text config, token→id) → (model, image processor or None). Text families set
# their own quirks: an explicit head_dim ≠ hidden/heads (Qwen3, Gemma 3), sliding-window layers and tied
# embeddings (Gemma 3), so the table's fallbacks are exercised.
def _b_qwen2(spec, text, ids):
    import transformers as tf

    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**text)), None


def _b_qwen3(spec, text, ids):
    import transformers as tf

    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**text, head_dim=24)), None


def _b_llama(spec, text, ids):
    import transformers as tf

    return tf.LlamaForCausalLM(tf.LlamaConfig(**text)), None


def _b_qwen2_audio(spec, text, ids):
    import transformers as tf

    cfg = tf.Qwen2AudioConfig(text_config=dict(model_type="qwen2") | text, audio_token_index=ids("<|endoftext|>"),
                              audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                                encoder_ffn_dim=32, num_mel_bins=8, max_source_positions=20))
    return tf.Qwen2AudioForConditionalGeneration(cfg), None


def _b_mistral(spec, text, ids):
    import transformers as tf

    return tf.MistralForCausalLM(tf.MistralConfig(**text, sliding_window=None)), None


def _gemma3_text(text: dict) -> dict:
    """Sliding and full layers alternating, a window (8) shorter than every prompt, so both kinds are exercised."""
    kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(text["num_hidden_layers"])]
    return text | dict(head_dim=24, query_pre_attn_scalar=24, sliding_window=8, tie_word_embeddings=True,
                       layer_types=kinds)


def _b_gemma3_text(spec, text, ids):
    import transformers as tf

    return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_gemma3_text(text))), None


def _b_qwen2_vl(spec, text, ids):
    import transformers as tf

    head_dim = spec.hidden_size // spec.num_attention_heads
    cfg = tf.Qwen2VLConfig(
        text_config=text | _mrope(head_dim),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=spec.hidden_size, num_heads=2, mlp_ratio=2,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        **_special(text), **media_ids("qwen2_vl", ids),
    )
    return tf.Qwen2VLForConditionalGeneration(cfg), _qwen_image_processor()


def _b_qwen2_5_vl(spec, text, ids):
    import transformers as tf

    head_dim = spec.hidden_size // spec.num_attention_heads
    cfg = tf.Qwen2_5_VLConfig(
        text_config=text | _mrope(head_dim),
        vision_config=_qwen_vision(spec, window_size=32, fullatt_block_indexes=[1]),
        **_special(text), **media_ids("qwen2_5_vl", ids),
    )
    return tf.Qwen2_5_VLForConditionalGeneration(cfg), _qwen_image_processor()


def _b_qwen3_vl(spec, text, ids):
    import transformers as tf

    cfg = tf.Qwen3VLConfig(
        text_config=text | dict(head_dim=24) | _mrope(24, mrope_interleaved=True),
        vision_config=_qwen_vision(spec, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        **_special(text), **media_ids("qwen3_vl", ids),
    )
    return tf.Qwen3VLForConditionalGeneration(cfg), _qwen_image_processor()


def _b_qwen2_5_omni_thinker(spec, text, ids):
    """The whole Omni model without talker (as published, minus the speech side): keys ``thinker.…``."""
    import transformers as tf

    head_dim = spec.hidden_size // spec.num_attention_heads
    thinker = dict(
        text_config=text | _mrope(head_dim),
        vision_config=_qwen_vision(spec, window_size=32, fullatt_block_indexes=[1]),
        audio_config=dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, output_dim=spec.hidden_size, max_source_positions=20, n_window=4),
        image_token_index=ids("<|IMAGE|>"), video_token_index=ids("<|VIDEO|>"), audio_token_index=ids("<|AUDIO|>"),
        vision_start_token_id=ids("<|vision_bos|>"), vision_end_token_id=ids("<|vision_eos|>"),
        audio_start_token_id=ids("<|audio_bos|>"), audio_end_token_id=ids("<|audio_eos|>"),
        **_special(text),
    )
    cfg = tf.Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)
    return tf.Qwen2_5OmniForConditionalGeneration(cfg), _qwen_image_processor()


def _clip() -> dict:
    return dict(model_type="clip_vision_model", projection_dim=32) | _vision()


def _b_llava(spec, text, ids):
    import transformers as tf
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg = tf.LlavaConfig(text_config=dict(model_type="llama") | text, vision_config=_clip(),
                         image_token_index=ids("<image>"), vision_feature_select_strategy="default",
                         vision_feature_layer=-2, **_special(text))
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tf.LlavaForConditionalGeneration(cfg), ip


def _b_llava_next(spec, text, ids):
    import transformers as tf
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    cfg = tf.LlavaNextConfig(text_config=dict(model_type="mistral", sliding_window=None) | text, vision_config=_clip(),
                             image_token_index=ids("<image>"), vision_feature_select_strategy="default",
                             vision_feature_layer=-2, image_grid_pinpoints=pinpoints, **_special(text))
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pinpoints)
    return tf.LlavaNextForConditionalGeneration(cfg), ip


def _b_gemma3(spec, text, ids):
    import transformers as tf
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    cfg = tf.Gemma3Config(text_config=_gemma3_text(text),
                          vision_config=dict(model_type="siglip_vision_model") | _vision(),
                          mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"),
                          eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"),
                          tie_word_embeddings=True, **_special(text))
    model = tf.Gemma3ForConditionalGeneration(cfg)
    # transformers zero-initialises the projector's weight (a trained checkpoint overwrites it): left so, every image
    # became a zero embedding and the tiny model saw none of its pixels (a row fed another row's image gave the same
    # numbers, which no test could tell)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=cfg.text_config.initializer_range)
    return model, Gemma3ImageProcessorPil(size={"height": 32, "width": 32})


def _b_idefics3(spec, text, ids):
    import transformers as tf
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    cfg = tf.Idefics3Config(text_config=dict(model_type="llama") | text, vision_config=_vision(), scale_factor=2,
                            image_token_id=ids("<image>"), **_special(text))
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    return tf.Idefics3ForConditionalGeneration(cfg), ip


def _b_internvl(spec, text, ids):
    import transformers as tf
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    cfg = tf.InternVLConfig(text_config=dict(model_type="qwen2") | text,
                            vision_config=_vision(image_size=[32, 32], patch_size=[8, 8]),
                            downsample_ratio=0.5, image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=4,
                            tie_word_embeddings=False,
                            **_special(text))
    return tf.InternVLForConditionalGeneration(cfg), GotOcr2ImageProcessorPil(size={"height": 32, "width": 32})


def _b_llava_onevision(spec, text, ids):
    import transformers as tf
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    cfg = tf.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2") | text,
        vision_config=dict(model_type="siglip_vision_model") | _vision(),
        **_special(text),
        **media_ids("llava_onevision", ids),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
    )
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints,
                                         crop_size=None)
    return tf.LlavaOnevisionForConditionalGeneration(cfg), ip


def _special(text: dict) -> dict:
    return {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


BUILDERS: dict[str, Callable] = {
    "qwen2": _b_qwen2, "qwen2_vl": _b_qwen2_vl, "llava_onevision": _b_llava_onevision,
    "llama": _b_llama, "qwen2_audio": _b_qwen2_audio, "qwen3": _b_qwen3, "mistral": _b_mistral,
    "gemma3_text": _b_gemma3_text, "qwen2_5_vl": _b_qwen2_5_vl,
    "qwen3_vl": _b_qwen3_vl, "qwen2_5_omni_thinker": _b_qwen2_5_omni_thinker, "llava": _b_llava,
    "llava_next": _b_llava_next, "gemma3": _b_gemma3, "idefics3": _b_idefics3, "internvl": _b_internvl,
}
# The families added with issue 21 are built with 2 layers (their tests sweep every head).
SPECS: dict[str, TinySpec] = {f: TinySpec(num_hidden_layers=2) for f in BUILDERS
                              if f not in ("qwen2", "qwen2_vl", "llava_onevision")}


# Named tiny models that are not a family's default: the 2-layer Qwen2.5 base whose LM shape matches the tiny
# Qwen2.5-VL and Omni thinker (the README's Table 7 recipe on CPU).
VARIANTS: dict[str, tuple[str, TinySpec]] = {"qwen2_5": ("qwen2", TinySpec(num_hidden_layers=2))}


def build_tiny(family: str, out_dir: Path, spec: TinySpec | None = None, text: dict | None = None) -> Path:
    """Write a tiny random model of ``family`` (any key of BUILDERS, or of VARIANTS) to ``out_dir``; ``text`` adds
    keys to its text config (tests of unusual configs: rope scaling, soft-capping, sliding windows, ...)."""
    if family in VARIANTS:
        family, default = VARIANTS[family]
        spec = spec or default
    if family not in BUILDERS:
        raise ValueError(f"no tiny builder for family {family!r}")
    spec = spec or SPECS.get(family, TinySpec())
    fam = FAMILIES[family]
    tok = build_tokenizer(_CORPUS, spec.vocab_size, fam.image_placeholder, fam.video_placeholder,
                          extra_special=fam.special_tokens, named_tokens=dict(fam.named_tokens))
    vocab = len(tok)
    ids = tok.convert_tokens_to_ids
    special = special_ids(tok)
    torch.manual_seed(spec.seed)
    model, image_processor = BUILDERS[family](spec, _text_config(spec, vocab, special) | (text or {}), ids)
    return save_model_dir(model, tok, image_processor, Path(out_dir))


def save_model_dir(model: torch.nn.Module, tok: PreTrainedTokenizerBase, image_processor: Any, out_dir: Path) -> Path:
    """Write an ordinary HF model dir: greedy generation config, weights, tokenizer, image-processor config."""
    import transformers

    from probe.results import set_file_modes

    transformers.utils.logging.disable_progress_bar()  # a tiny model's one shard: a bar would only clutter stderr
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.do_sample = False
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if image_processor is not None:
        image_processor.save_pretrained(out_dir)
        write_processor_config(out_dir)
    set_file_modes(out_dir)  # save_pretrained writes the weights 0o600
    return out_dir


def write_processor_config(model_dir: Path) -> None:
    """processor_config.json with the keywords the probe builds the family's processor with (``processor_kwargs``),
    as a hub checkpoint has it: without it a plain ``AutoProcessor`` built LLaVA-OV's with num_image_tokens None,
    which failed on the first image. (The processor itself cannot save_pretrained: its video processor is None.)"""
    config = read_config_json(model_dir)
    fam = family_of_model_type(config["model_type"])
    if fam.processor_class is not None:
        saved = {"processor_class": fam.processor_class, **processor_kwargs(fam, config)}
        (Path(model_dir) / "processor_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n",
                                                               encoding="utf-8")


def cache_root() -> Path:
    return Path(os.environ.get("OMNIPROBE_CACHE", Path.home() / ".cache" / "omniprobe"))


# A cached tiny model's record of what built it (``build_key``): a dir without it, or with another key, is built
# again.
BUILD_KEY_FILE = ".omniprobe_tiny.json"  # hidden: copy_side_files never carries it into a merge or fine-tune


def build_key() -> str:
    """What a tiny build's bytes depend on: the source of this module, of the tokenizer builder and of the family
    and config tables it reads, and the torch, transformers and tokenizers versions (initialisation and saving)."""
    import hashlib
    import importlib.metadata

    from probe import families, lm_config, tokenizer

    h = hashlib.sha256()
    for module in (__file__, tokenizer.__file__, families.__file__, lm_config.__file__):
        h.update(Path(module).read_bytes())
    for package in ("torch", "transformers", "tokenizers"):
        h.update(f"{package}={importlib.metadata.version(package)};".encode())
    return h.hexdigest()


def _cached_key(model_dir: Path) -> str | None:
    from probe.results import json_object

    return (json_object(model_dir / BUILD_KEY_FILE) or {}).get("key")


def tiny_dir(family: str) -> Path:
    """The cached directory of a tiny model, built atomically on first use and again whenever the code or libraries
    that build it changed (``build_key``: the cache was keyed by the family alone, so an earlier version's model was
    returned for good). A build missing its config or weights is never cached (transformers' save_pretrained writes
    nothing on a process other than rank 0 once a launch's process group is up: such a build left a dir of
    tokenizer files that every later call returned), and a cached dir without its config is built again."""
    target = cache_root() / "tiny" / family
    key = build_key()
    if (target / "config.json").is_file() and _cached_key(target) == key:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # not probe.results.partial_dir: a shared cache that concurrent processes fill, each in a dir of its own
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    try:
        build_tiny(family, tmp)
        (tmp / BUILD_KEY_FILE).write_text(json.dumps({"key": key}) + "\n", encoding="utf-8")
    except BaseException as exc:  # a full cache disk: the half-built dir went unremoved, a traceback said so
        drop_partial(tmp, target, exc)
    if not (tmp / "config.json").is_file() or not any(tmp.glob("*.safetensors")):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"building the tiny {family} model wrote no config or weights (save_pretrained writes "
                           "nothing on a process other than rank 0 of a launch): build it in one process first")
    try:
        tmp.rename(target)
    except OSError:
        if (target / "config.json").is_file() and _cached_key(target) == key:  # built concurrently: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # an incomplete dir left by an older build, or another version's model: replace it
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    return target
