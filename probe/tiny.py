"""Tiny random-weight models of each family, built from configs with a fixed seed (tests and fallbacks).

They are ordinary HF model directories (config, safetensors, tokenizer, image-processor config), so they go
through exactly the loading path of a real checkpoint.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from probe.families import FAMILIES
from probe.tokenizer import build_tokenizer

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


def build_tiny(family: str, out_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a tiny random model of `family` (qwen2, qwen2_vl, llava_onevision) to `out_dir`."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    fam = FAMILIES[family]
    tok = build_tokenizer(_CORPUS, spec.vocab_size, fam.image_placeholder, fam.video_placeholder)
    vocab = len(tok)
    ids = tok.convert_tokens_to_ids
    special = {"bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
               "pad_token_id": ids("<|endoftext|>")}
    torch.manual_seed(spec.seed)
    image_processor = None
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_text_config(spec, vocab, special)))
    elif family == "qwen2_vl":
        head_dim = spec.hidden_size // spec.num_attention_heads
        half = head_dim // 2
        section = [half - 2 * (half // 3), half // 3, half // 3]  # M-RoPE split of the rotary half-dim
        text = _text_config(spec, vocab, special) | {
            "rope_parameters": {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}
        }
        cfg = Qwen2VLConfig(
            text_config=text,
            vision_config=dict(
                depth=2, embed_dim=32, hidden_size=spec.hidden_size, num_heads=2, mlp_ratio=2,
                patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_chans=3,
            ),
            **special,
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
        model = Qwen2VLForConditionalGeneration(cfg)
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2, temporal_patch_size=2
        )
    elif family == "llava_onevision":
        pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
        cfg = LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2") | _text_config(spec, vocab, special),
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
            ),
            **special,
            image_token_id=ids("<image>"),
            video_token_id=ids("<video>"),
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=pinpoints,
        )
        model = LlavaOnevisionForConditionalGeneration(cfg)
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints, crop_size=None
        )
    else:
        raise ValueError(f"no tiny builder for family {family!r}")
    return save_model_dir(model, tok, image_processor, Path(out_dir))


def save_model_dir(model, tok, image_processor, out_dir: Path) -> Path:
    """Write an ordinary HF model dir: greedy generation config, weights, tokenizer, image-processor config."""
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.do_sample = False
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if image_processor is not None:
        image_processor.save_pretrained(out_dir)
    return out_dir


def cache_root() -> Path:
    return Path(os.environ.get("OMNIPROBE_CACHE", Path.home() / ".cache" / "omniprobe"))


def tiny_dir(family: str) -> Path:
    """The cached directory of a tiny model, built atomically on first use."""
    target = cache_root() / "tiny" / family
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    build_tiny(family, tmp)
    try:
        tmp.rename(target)
    except OSError:  # built concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target
