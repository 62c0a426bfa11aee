"""Tiny random checkpoints in every key layout of DESIGN §1, for tests and the benchmark.

LM weights are given as one canonical state dict (``embed_tokens.weight``, ``layers.{i}.…``) so the *same*
weights can be written in several layouts; experts are the base plus seeded noise of a chosen scale, so their
parameter shifts are known in advance.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from probe.families import LAYOUTS, canonical_lm_name
from probe.lm_config import read_config_json

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def text_kwargs(**over: Any) -> dict:
    return {**TEXT, **over}


def base_lm(seed: int = 0, **over: Any) -> dict[str, torch.Tensor]:
    """Canonical LM state dict of a random Qwen2ForCausalLM."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(Qwen2Config(**text_kwargs(**over)))
    sd = {k[len("model."):] if k.startswith("model.") else k: v.detach().clone() for k, v in m.state_dict().items()}
    return sd


def perturb(lm: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in lm.items()}


def resize_vocab(lm: dict[str, torch.Tensor], rows: int, seed: int = 99) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = dict(lm)
    for k in ("embed_tokens.weight", "lm_head.weight"):
        t = lm[k]
        extra = torch.randn((max(rows - t.shape[0], 0), t.shape[1]), generator=g) * 0.02
        out[k] = torch.cat([t, extra])[:rows].clone()
    return out


def _qwen2(tf, txt: dict, vocab: int):
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**txt))


def _qwen2_vl(tf, txt: dict, vocab: int):
    # M-RoPE sections sum to half the head width, or no forward runs: [2, 1, 1] for the default 8-wide heads
    half = txt["hidden_size"] // txt["num_attention_heads"] // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(
        text_config=dict(txt, rope_scaling={"type": "mrope", "mrope_section": section}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=vocab - 3, video_token_id=vocab - 2, vision_start_token_id=vocab - 4,
    ))


def _llava_onevision(tf, txt: dict, vocab: int):
    return tf.LlavaOnevisionForConditionalGeneration(tf.LlavaOnevisionConfig(
        text_config=dict(txt, model_type="qwen2"),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        image_token_index=vocab - 2, video_token_index=vocab - 1,
    ))


def _qwen2_audio(tf, txt: dict, vocab: int):
    return tf.Qwen2AudioForConditionalGeneration(tf.Qwen2AudioConfig(
        text_config=dict(txt, model_type="qwen2"),
        audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=8,
                          max_source_positions=20),
        audio_token_index=vocab - 1,
    ))


# One builder per kind (the published layout of each kind has the kind's name): (transformers, text config, vocab)
MODELS: dict[str, Callable] = {"qwen2": _qwen2, "qwen2_vl": _qwen2_vl, "llava_onevision": _llava_onevision,
                               "qwen2_audio": _qwen2_audio}


def _model(kind: str, vocab: int, seed: int, **text_over):
    import transformers as tf

    torch.manual_seed(seed)
    return MODELS[kind](tf, text_kwargs(**{**text_over, "vocab_size": vocab}), vocab)


def write_model(kind: str, out: Path, lm: dict[str, torch.Tensor], seed: int = 0,
                dtype: torch.dtype = torch.float32, max_shard_size: str | None = None, **text_over: Any) -> Path:
    """Save a tiny ``kind`` model with its LM tensors set to ``lm`` (canonical names), in the published layout."""
    out = Path(out)
    model = _model(kind, lm["embed_tokens.weight"].shape[0], seed, **text_over).to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    layout = LAYOUTS[kind]  # the published layout of each kind has the kind's name

    def set_lm(key: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        canon = canonical_lm_name(layout, key)
        return key, (lm[canon].to(dtype).contiguous() if canon in lm else t)

    _rewrite(out, set_lm)
    return out


def _rewrite(model_dir: Path, fn: Callable[[str, torch.Tensor], tuple[str, torch.Tensor]]) -> None:
    """Apply ``fn`` to every (key, tensor) of every shard, keeping the shard structure and index."""
    index = model_dir / "model.safetensors.index.json"
    shards = sorted(model_dir.glob("*.safetensors"))
    wmap: dict[str, str] = {}
    for shard in shards:
        sd = load_file(shard)
        new = dict(fn(k, v) for k, v in sd.items())
        save_file(new, shard, metadata={"format": "pt"})
        wmap.update({k: shard.name for k in new})
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = wmap
        index.write_text(json.dumps(data, indent=2), encoding="utf-8")


TF4_RENAMES = {
    "qwen2_vl": [("model.", "model.language_model."), ("visual.", "model.visual.")],
    "llava_onevision": [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                        ("vision_tower.", "model.vision_tower."),
                        ("multi_modal_projector.", "model.multi_modal_projector."),
                        ("image_newline", "model.image_newline")],
}
LMMS_RENAMES = [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                ("vision_tower.", "model.vision_tower.vision_tower."),
                ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                ("image_newline", "model.image_newline")]


def _rename(key: str, renames: list[tuple[str, str]]) -> str:
    for a, b in renames:
        if key.startswith(a):
            return b + key[len(a):]
    return key


def to_tf4_layout(model_dir: Path) -> Path:
    """Rewrite keys in place into the layout transformers 4.52-4.57 wrote (``model.language_model.…``)."""
    kind = read_config_json(model_dir)["model_type"]
    _rewrite(Path(model_dir), lambda k, t: (_rename(k, TF4_RENAMES[kind]), t))
    return Path(model_dir)


def to_lmms_layout(model_dir: Path) -> Path:
    """Rewrite a LLaVA-OneVision dir in place into the original LLaVA-NeXT (lmms-lab) layout and config."""
    model_dir = Path(model_dir)
    cfg = read_config_json(model_dir)
    flat = dict(cfg["text_config"])
    flat.update(model_type="llava_qwen", architectures=["LlavaQwenForCausalLM"], mm_projector_type="mlp2x_gelu",
                mm_vision_tower="google/siglip-so400m-patch14-384")
    (model_dir / "config.json").write_text(json.dumps(flat, indent=2), encoding="utf-8")
    _rewrite(model_dir, lambda k, t: (_rename(k, LMMS_RENAMES), t))
    return model_dir


def build_zoo(root: Path) -> dict[str, Path]:
    """The test set: a Qwen2 base and experts of every family with known shifts, plus layout rewrites."""
    import shutil

    root = Path(root)
    base = base_lm(0)
    zoo = {
        "base": write_model("qwen2", root / "base", base),
        "vl": write_model("qwen2_vl", root / "vl", perturb(base, 0.01, 1)),
        "ov": write_model("llava_onevision", root / "ov", perturb(base, 0.001, 2), max_shard_size="20KB"),
        "au": write_model("qwen2_audio", root / "au", perturb(base, 0.002, 3)),
        "q1": write_model("qwen2", root / "q1", perturb(base, 0.005, 4)),
    }
    for src, dst, fn in (("vl", "vl_tf4", to_tf4_layout), ("ov", "ov_tf4", to_tf4_layout), ("ov", "ov_lmms", to_lmms_layout)):
        shutil.copytree(zoo[src], root / dst)
        zoo[dst] = fn(root / dst)
    return zoo
