"""The families added as table rows (issue 21), each on a tiny random model built from its config.

Oracles: masking a head == zeroing its o_proj columns; the exact engine == the naive loop (text, image and, where
the family takes it, video items); the checkpoint layout's canonical LM names == the loaded model's own LM modules;
merges == the formula on the loaded modules' tensors, carriers loadable by their class.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import VL_FAMILIES, make_item, png_bytes
from probe.errors import BadInput
from probe.families import ALIASES, CAUSAL_LM, FAMILIES, LAYOUTS, causal_lm_type, detect_layout, canonical_lm_name
from probe.models import NO_HUB_KERNELS

NEW = ("qwen3", "mistral", "gemma3_text", "qwen2_5_vl", "qwen3_vl", "qwen2_5_omni_thinker", "llava", "llava_next",
       "gemma3", "idefics3", "internvl")
VIDEO = ("qwen2_5_vl", "qwen2_5_omni_thinker")
COMPOSITE = tuple(name for name, fam in FAMILIES.items() if fam.text_config_attr)  # a nested text config


@pytest.fixture(scope="module")
def dirs(omniprobe_cache, shared_root) -> dict[str, Path]:
    from filelock import FileLock

    from probe.tiny import tiny_dir

    with FileLock(str(shared_root / "tiny.lock")):
        return {f: tiny_dir(f) for f in NEW}


@pytest.fixture(scope="module")
def loaded(dirs):
    from probe.models import load_model, resolve_model

    torch.set_num_threads(1)
    cache: dict = {}

    def load(family: str):
        if family not in cache:
            cache[family] = load_model(resolve_model(str(dirs[family])), attn_implementation="sdpa")
        return cache[family]

    return load


@pytest.fixture(scope="module")
def video_item(tmp_path_factory):
    from probe.mmmu import load_mmmu
    from probe.zoo.tasks_video import build_video_dataset

    root = tmp_path_factory.mktemp("video")
    build_video_dataset(root, {"validation": 1}, seed=0)
    return load_mmmu(root, "validation")[0][0]


def items_for(m, video_item) -> list:
    """A text item with five options (a letter beyond D), plus an image item and a video item where supported."""
    items = [make_item(n_options=5, answer="E", with_image=False, item_id="validation_Test_5")]
    if "image" in m.family.modalities:
        items.append(make_item(item_id="validation_Test_1"))
    if "video" in m.family.modalities:
        items.append(video_item)
    return items


def test_table_rows_are_consistent():
    from probe.tiny import BUILDERS

    for fam in FAMILIES.values():
        assert fam.name in BUILDERS, f"{fam.name}: no tiny builder (adding a family = a row + a tiny model)"
    for lay in LAYOUTS.values():
        assert lay.family in FAMILIES and set(lay.model_types) - {"llava_qwen"} <= {
            t for f in FAMILIES.values() for t in f.model_types}, lay.name
    for alias in ALIASES.values():
        assert alias.family in FAMILIES, alias.alias
    types = [t for f in FAMILIES.values() for t in f.model_types]
    assert len(types) == len(set(types)), "a model_type in two rows"


@pytest.mark.parametrize("family", NEW)
def test_masking_equals_zeroed_o_proj_columns(family, loaded, video_item):
    from probe.masking import mask_heads
    from probe.prompting import PromptTemplate, build_inputs

    m = loaded(family)
    g = m.geometry
    assert m.o_proj(0).in_features == g.n_heads * g.head_dim
    item = items_for(m, video_item)[-1]  # the richest modality the family takes
    inputs = build_inputs(m, item, PromptTemplate())
    heads = [(0, 1), (g.n_layers - 1, g.n_heads - 1)]
    with torch.no_grad():
        clean = m.model(**inputs).logits[0, -1]
        with mask_heads(m, heads):
            masked = m.model(**inputs).logits[0, -1]
        saved = {layer: m.o_proj(layer).weight.detach().clone() for layer, _ in heads}
        try:
            for layer, h in heads:
                m.o_proj(layer).weight[:, h * g.head_dim:(h + 1) * g.head_dim] = 0
            zeroed = m.model(**inputs).logits[0, -1]
        finally:
            for layer, w in saved.items():
                m.o_proj(layer).weight.copy_(w)
    torch.testing.assert_close(masked, zeroed, atol=1e-5, rtol=0)
    assert (masked - clean).abs().max() > 1e-6  # the mask did something


@pytest.mark.parametrize("family", NEW)
def test_exact_equals_naive(family, loaded, video_item):
    from probe.sweep import SweepConfig, get_engine

    m = loaded(family)
    g = m.geometry
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    items = items_for(m, video_item)
    cfg = SweepConfig(generate=True, batch_size=3, max_new_tokens=3)
    naive = pd.DataFrame(get_engine("naive")(m, items, heads, cfg))
    exact = pd.DataFrame(get_engine("exact")(m, items, heads, cfg))
    for col in ("item_id", "layer", "head", "pred", "prob_pred", "response"):
        assert (naive[col] == exact[col]).all(), col
    for col in ("kl", "p_answer"):
        np.testing.assert_allclose(exact[col], naive[col], atol=1e-5, rtol=0, err_msg=col)
    assert exact.loc[exact["layer"] >= 0, "kl"].max() > 1e-7


def module_lm(m) -> dict[str, torch.Tensor]:
    """The LM tensors of a loaded model under canonical names, read from its modules (not from any key table)."""
    fam = m.family
    out = {f"layers.{k}": v for k, v in m.layers.state_dict().items()}
    out["embed_tokens.weight"] = m.model.get_input_embeddings().weight
    out["norm.weight"] = m.model.get_submodule(fam.norm_path).weight
    out["lm_head.weight"] = m.model.get_submodule(fam.lm_head_path).weight
    return {k: v.detach() for k, v in out.items()}


EXPECTED_LAYOUT = {"qwen2_5_omni_thinker": "qwen2_5_omni"}


@pytest.mark.parametrize("family", NEW)
def test_layout_names_the_models_own_lm_tensors(family, dirs, loaded):
    """What transformers writes for the family is read as the model's LM: every module tensor, nothing else."""
    from analyses.checkpoints import open_checkpoint

    m = loaded(family)
    want = module_lm(m)
    with open_checkpoint(str(dirs[family])) as ck:
        assert ck.layout.name == EXPECTED_LAYOUT.get(family, family)
        names = set(ck.lm) | ({"lm_head.weight"} if ck.tied else set())
        assert names == set(want)
        for canon in want:
            torch.testing.assert_close(ck.view(ck.lm_info(canon)), want[canon], atol=0, rtol=0)
    assert causal_lm_type(m.family, m.model.config.get_text_config().to_dict()) in CAUSAL_LM


# Key names as the real checkpoints publish them (safetensors index of each hub repo), one LM, one non-LM key.
PUBLISHED = {
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", "qwen2_5_vl", ["model.layers.0.self_attn.q_proj.weight",
                                    "model.embed_tokens.weight", "lm_head.weight", "visual.blocks.0.attn.qkv.weight"]),
    "Qwen/Qwen3-VL-8B-Instruct": ("qwen3_vl", "qwen3_vl", ["model.language_model.layers.0.self_attn.q_norm.weight",
                                  "model.language_model.embed_tokens.weight", "lm_head.weight",
                                  "model.visual.blocks.0.attn.qkv.weight"]),
    "Qwen/Qwen2.5-Omni-7B": ("qwen2_5_omni", "qwen2_5_omni", ["thinker.model.layers.0.self_attn.q_proj.weight",
                             "thinker.model.embed_tokens.weight", "thinker.lm_head.weight",
                             "thinker.visual.blocks.0.attn.qkv.weight", "thinker.audio_tower.conv1.weight",
                             "talker.model.layers.0.self_attn.q_proj.weight", "token2wav.code2wav_dit_model.x"]),
    "llava-hf/llava-1.5-7b-hf": ("llava", "llava", ["language_model.model.layers.0.self_attn.q_proj.weight",
                                 "language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                                 "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                                 "multi_modal_projector.linear_1.weight"]),
    "llava-hf/llava-v1.6-mistral-7b-hf": ("llava_next", "llava_next", [
        "language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight", "image_newline", "vision_tower.vision_model.post_layernorm.weight"]),
    "google/gemma-3-4b-it": ("gemma3", "gemma3", ["language_model.model.layers.0.self_attn.q_norm.weight",
                             "language_model.model.embed_tokens.weight",
                             "multi_modal_projector.mm_input_projection_weight",
                             "vision_tower.vision_model.embeddings.patch_embedding.weight"]),
    "HuggingFaceTB/SmolVLM-Instruct": ("idefics3", "idefics3", ["model.text_model.layers.0.self_attn.q_proj.weight",
                                       "model.text_model.embed_tokens.weight", "lm_head.weight",
                                       "model.vision_model.encoder.layers.0.mlp.fc1.weight",
                                       "model.connector.modality_projection.proj.weight"]),
    "OpenGVLab/InternVL3-8B-hf": ("internvl", "internvl_tf4", ["model.language_model.layers.0.self_attn.q_proj.weight",
                                  "model.language_model.embed_tokens.weight", "lm_head.weight",
                                  "model.vision_tower.encoder.layer.0.attention.q_proj.weight",
                                  "model.multi_modal_projector.linear_1.weight"]),
    "google/gemma-3-1b-it": ("gemma3_text", "gemma3_text", ["model.layers.0.self_attn.k_norm.weight",
                             "model.embed_tokens.weight", "model.norm.weight"]),
}


@pytest.mark.parametrize("repo", PUBLISHED)
def test_published_key_names(repo):
    model_type, layout, keys = PUBLISHED[repo]
    lay = detect_layout(model_type, keys)
    assert lay.name == layout
    canon = {k: canonical_lm_name(lay, k) for k in keys}
    assert {c for c in canon.values() if c} == {
        "layers.0.self_attn." + k.rsplit("self_attn.", 1)[1] for k in keys[:1]} | {
        "embed_tokens.weight"} | ({"lm_head.weight"} if any("lm_head" in k for k in keys) else set()) | (
        {"norm.weight"} if "model.norm.weight" in keys else set())
    assert all(canon[k] is None for k in keys if any(s in k for s in ("visual", "vision", "audio", "projector",
                                                                      "connector", "talker", "token2wav", "newline")))



_Q = "self_attn.q_proj.weight"


@pytest.mark.parametrize("model_type, keys, stray, other", [
    # Qwen2-VL as published, plus transformers 4.52-4.57's copy of its LM or of its vision tower
    ("qwen2_vl", ["model.embed_tokens.weight", f"model.layers.0.{_Q}", "visual.patch_embed.proj.weight"],
     f"model.language_model.layers.0.{_Q}", "qwen2_vl_tf4"),
    ("qwen2_vl", ["model.embed_tokens.weight", f"model.layers.0.{_Q}", "visual.patch_embed.proj.weight"],
     "model.visual.patch_embed.proj.weight", "qwen2_vl_tf4"),
    ("qwen2_vl", ["model.language_model.embed_tokens.weight", f"model.language_model.layers.0.{_Q}",
                  "model.visual.patch_embed.proj.weight"], f"model.layers.0.{_Q}", "qwen2_vl"),
    # LLaVA-OneVision -hf, plus transformers 4's lm_head or LM (a layout of the family is named first)
    ("llava_onevision", ["language_model.model.embed_tokens.weight", f"language_model.model.layers.0.{_Q}",
                         "vision_tower.vision_model.post_layernorm.weight"], "lm_head.weight", "llava_onevision_tf4"),
    ("llava_onevision", ["language_model.model.embed_tokens.weight", f"language_model.model.layers.0.{_Q}",
                         "vision_tower.vision_model.post_layernorm.weight"],
     f"model.language_model.layers.0.{_Q}", "llava_onevision_tf4"),
    # the original LLaVA-NeXT layout (lmms-lab), plus an -hf conversion's LM
    ("llava_qwen", ["model.embed_tokens.weight", f"model.layers.0.{_Q}", "model.mm_projector.0.weight"],
     f"language_model.model.layers.0.{_Q}", "llava_onevision"),
    # Qwen2-Audio plus a plain LM; a Qwen2 config over a Qwen2-VL's keys (config and keys disagree)
    ("qwen2_audio", ["language_model.model.embed_tokens.weight", f"language_model.model.layers.0.{_Q}",
                     "audio_tower.conv1.weight"], f"model.layers.0.{_Q}", "qwen2"),
    ("qwen2", ["model.embed_tokens.weight", f"model.layers.0.{_Q}"], "visual.patch_embed.proj.weight", "qwen2_vl"),
])
def test_keys_of_two_layouts_in_one_checkpoint_are_refused(model_type, keys, stray, other):
    """A checkpoint holding keys of a second layout (two copies of its LM, of its vision tower; a config whose
    model_type is not the keys' family) read as the layout its markers picked, the other keys put aside as vision
    tower: transformers maps both sets onto one model and keeps one copy of each tensor without a word (a Qwen2-VL
    with a second, different LM under model.language_model. loaded the first, with an empty load report), so which
    weights were measured could not be told. The keys alone read as their layout; with the stray key, refused."""
    assert detect_layout(model_type, keys).name  # the layout's own keys are read
    with pytest.raises(BadInput, match=rf"keys of two layouts.*{re.escape(stray)}.*layout {other}\b"):
        detect_layout(model_type, [*keys, stray])


# DESIGN §1's key lists written out: (layout, canonical LM name, its safetensors key on disk)
DISK_KEYS = [
    ("qwen2", "lm_head.weight", "lm_head.weight"),
    ("qwen2", "layers.3.self_attn.o_proj.weight", "model.layers.3.self_attn.o_proj.weight"),
    ("qwen2", "embed_tokens.weight", "model.embed_tokens.weight"),
    ("qwen2_vl", "norm.weight", "model.norm.weight"),
    ("llava_onevision", "lm_head.weight", "language_model.lm_head.weight"),
    ("llava_onevision", "layers.0.mlp.down_proj.weight", "language_model.model.layers.0.mlp.down_proj.weight"),
    ("llava_onevision_tf4", "lm_head.weight", "lm_head.weight"),
    ("llava_onevision_tf4", "layers.1.self_attn.q_proj.bias", "model.language_model.layers.1.self_attn.q_proj.bias"),
    ("qwen2_vl_tf4", "embed_tokens.weight", "model.language_model.embed_tokens.weight"),
    ("llava_next_original", "layers.0.input_layernorm.weight", "model.layers.0.input_layernorm.weight"),
    ("qwen2_audio", "lm_head.weight", "language_model.lm_head.weight"),
]


@pytest.mark.parametrize("layout, canon, disk", DISK_KEYS)
def test_lm_disk_key_writes_design_s_key_and_refuses_a_name_that_is_no_lm_tensor(layout, canon, disk):
    """lm_disk_key (the key a merged or carried lm_head is written under) gives DESIGN §1's key for each layout,
    which canonical_lm_name reads back; a name no layout reads as an LM tensor (a vision tower's, a rotary buffer's)
    is a ValueError, not a key under the LM's prefix (a mutant without the read-back check wrote
    model.visual.patch_embed.proj.weight for qwen2 and passed every test)."""
    from probe.families import lm_disk_key

    lay = LAYOUTS[layout]
    assert lm_disk_key(lay, canon) == disk
    assert canonical_lm_name(lay, disk) == canon
    for not_lm in ("visual.patch_embed.proj.weight", "layers.0.self_attn.rotary_emb.inv_freq"):
        with pytest.raises(ValueError, match="no disk key"):
            lm_disk_key(lay, not_lm)



@pytest.mark.parametrize("model_type, keys", [
    ("qwen2_audio", ["language_model.model.embed_tokens.weight", "language_model.model.layers.0.mlp.up_proj.weight",
                     "language_model.lm_head.weight"]),
    ("qwen2_vl", ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]),
    ("llava_onevision", ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                         "language_model.model.layers.0.mlp.up_proj.weight"]),
])
def test_a_multimodal_config_over_an_lm_without_its_tower_is_no_layout(model_type, keys):
    """DESIGN §1: a Qwen2-Audio checkpoint holds audio_tower.…, a Qwen2-VL one visual.…, a LLaVA-OneVision one
    vision_tower.… beside its LM. A config of that type over the LM's keys alone is a checkpoint of another kind
    (transformers would start the tower from random weights), refused as an unknown layout rather than read
    (a qwen2_audio row whose markers lacked audio_tower. read it, and no test saw it)."""
    with pytest.raises(BadInput, match="unknown checkpoint layout"):
        detect_layout(model_type, keys)


@pytest.mark.parametrize("model_type", ["llava", "llava_qwen"])
def test_the_original_llava_next_layout_is_read_under_either_model_type_its_code_writes(model_type):
    """lmms-lab's LLaVA-NeXT checkpoints (LLaVA-Video-7B-Qwen2, llava-onevision-qwen2-*) come from the original
    LLaVA code, whose configs state model_type 'llava' (LlavaConfig) or 'llava_qwen' (LlavaQwenConfig); DESIGN §1's
    keys: the Qwen2 LM's plus model.vision_tower. and model.mm_projector.. Both types read as that layout, with the
    LM keys as the canonical names and the tower and projector left out (a table row without 'llava' refused the
    first as an unknown layout, and no test saw it)."""
    keys = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
            "lm_head.weight", "model.mm_projector.0.weight", "model.image_newline",
            "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"]
    lay = detect_layout(model_type, keys)
    assert lay.name == "llava_next_original" and lay.family == "llava_onevision"
    assert [canonical_lm_name(lay, k) for k in keys] == [
        "embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "norm.weight", "lm_head.weight", None, None, None]

def _pair(family: str, root: Path) -> tuple[Path, Path]:
    """Two tiny models of one family with different random weights (seeds 0 and 1)."""
    from probe.tiny import SPECS, TinySpec, build_tiny

    spec = SPECS.get(family, TinySpec())
    return (build_tiny(family, root / f"{family}-a", spec),
            build_tiny(family, root / f"{family}-b", dataclasses.replace(spec, seed=1)))


@pytest.mark.parametrize("family", [f for f in NEW if FAMILIES[f].processor_class])
def test_weighted_merge_transplanted_into_carrier(family, tmp_path):
    """Eq. 2 on the loaded modules' tensors; the merged LM loads as its causal LM class; the carrier loads with
    its family class, holds the merged LM and the first model's vision tower unchanged."""
    import transformers as tf

    from analyses import merge, shift
    from probe.errors import cli_main
    from probe.models import load_model, resolve_model

    a, b = _pair(family, tmp_path)
    out = tmp_path / "merged"
    assert cli_main(merge.main, ["--models", str(a), str(b), "--method", "weighted", "--weights", "1", "3",
                                 "--carrier", str(a), "--out", str(out)]) == 0
    ma, mb = (load_model(resolve_model(str(p))) for p in (a, b))
    la, lb = module_lm(ma), module_lm(mb)
    lm = tf.AutoModelForCausalLM.from_pretrained(out, **NO_HUB_KERNELS)
    assert type(lm).__name__ == CAUSAL_LM[causal_lm_type(ma.family, ma.model.config.get_text_config().to_dict())]
    got = {f"layers.{k}": v for k, v in lm.model.layers.state_dict().items()}
    got |= {"embed_tokens.weight": lm.model.embed_tokens.weight, "norm.weight": lm.model.norm.weight,
            "lm_head.weight": lm.lm_head.weight}
    assert set(got) == set(la)
    for k in la:
        torch.testing.assert_close(got[k].detach(), 0.25 * la[k] + 0.75 * lb[k])
    carrier = load_model(resolve_model(str(out / "carriers" / a.name)))
    lc = module_lm(carrier)
    for k in la:
        torch.testing.assert_close(lc[k], got[k].detach())
    vision = {k: v for k, v in carrier.model.state_dict().items() if not k.startswith(ma.family.layers_path)
              and "language_model" not in k and "text_model" not in k and "lm_head" not in k}
    orig = ma.model.state_dict()
    assert vision and all(torch.equal(v, orig[k]) for k, v in vision.items())
    # Eq. 3 on the same pair: Δavg per tensor from the loaded modules
    assert cli_main(shift.main, ["--base", str(a), "--models", str(b), "--out", str(tmp_path / "s"),
                                 "--no-figures"]) == 0
    rows = pd.read_csv(tmp_path / "s" / "shift.csv")
    for r in rows.itertuples():
        assert r.delta_avg == pytest.approx(float((la[r.tensor] - lb[r.tensor]).abs().mean()), rel=1e-5)


def test_unknown_model_type_is_bad_input_before_loading(tmp_path, dirs, capsys):
    """exit 2, one line naming the model_type and pointing at the table; nothing written, no weight file read."""
    import shutil

    from analyses import merge, shift
    from probe import eval as probe_eval
    from probe import heads
    from probe.errors import cli_main

    model = tmp_path / "m"
    shutil.copytree(dirs["qwen3"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg | {"model_type": "mamba9"}))
    (model / "model.safetensors").write_bytes(b"not read")  # opening it would be a different error
    out = tmp_path / "o"
    for main, argv in ((heads.main, ["--model", str(model), "--limit", "1"]),
                       (probe_eval.main, ["--models", str(model), "--data", "probe/zoo/data/text"]),
                       (shift.main, ["--base", str(model), "--models", str(model)]),
                       (merge.main, ["--models", str(model), str(model), "--method", "average"])):
        assert cli_main(main, [*argv, "--out", str(out)]) == 2, main.__module__
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "'mamba9'" in err[0] and "probe/families.py" in err[0], err
        assert not out.exists()


def oracle_load(fam, model: Path, cfg: dict, meta: bool = True):
    """transformers' own load of ``model`` on the meta device (``meta``; else its weights in float32), as the
    family's class builds it (the Omni thinker from its thinker config): the model and its loading info
    (mismatched_keys: tensors of the wrong shape)."""
    import transformers

    from probe.lm_config import config_value

    cls = getattr(transformers, fam.model_class)
    part = {"config": cls.config_class(**config_value(cfg, fam.config_path))} if fam.config_path else {}
    where = {"device_map": "meta"} if meta else {"dtype": torch.float32}
    return cls.from_pretrained(model, ignore_mismatched_sizes=True, output_loading_info=True, **where,
                               key_mapping=dict(fam.key_mapping) if fam.key_mapping else None, **part,
                               **NO_HUB_KERNELS)


# A damaged size per text-config key: GQA's key/value heads moved to another divisor of the heads, twice the heads
# (k/v rows or q/o rows change, as head_dim is derived or explicit), twice the hidden size, 3 more of the others
DAMAGE = {"num_key_value_heads": lambda t: t["num_attention_heads"] if t["num_key_value_heads"] != t[
              "num_attention_heads"] else t["num_attention_heads"] // 2,
          "num_attention_heads": lambda t: 2 * t["num_attention_heads"],
          "hidden_size": lambda t: 2 * t["hidden_size"]}


@pytest.mark.parametrize("size", ["vocab_size", "intermediate_size", *DAMAGE])
@pytest.mark.parametrize("family", ("qwen2", "qwen2_vl", "llava_onevision", "qwen2_audio") + NEW)
def test_a_config_size_its_tensors_contradict_is_refused_alike(family, size, tmp_path, capsys):
    """A text config whose vocab_size, intermediate_size, hidden_size or head counts contradict the LM's tensors
    (embedding and lm_head, MLP matrices, q/k/v/o projections and their biases, norms; GQA's k/v rows of the
    key/value heads): transformers' own load (the oracle: its mismatched keys, which probe.eval refused) finds
    tensors of the wrong shape, and probe.eval, analyses.shift and analyses.merge refuse the checkpoint with one
    and the same line (analyses.shift never builds the model and measured it, per head by the config's counts).
    The Omni thinker's is its thinker's text config (its talker's sizes differ)."""
    import shutil

    from analyses import merge, shift
    from probe import eval as probe_eval
    from probe.errors import BadInput, cli_main
    from probe.lm_config import config_value
    from probe.models import check_loading_info, resolve_model
    from probe.tiny import tiny_dir

    fam = FAMILIES[family]
    model = shutil.copytree(tiny_dir(family), tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    text = config_value(cfg, fam.text_config_attr) if fam.text_config_attr else cfg
    text = text if isinstance(text, dict) and size in text else cfg
    text[size] = DAMAGE[size](text) if size in DAMAGE else text[size] + 3
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")

    built, info = oracle_load(fam, model, cfg)
    assert info["mismatched_keys"], "the oracle finds the config consistent: the damage is no damage"
    capsys.readouterr()  # transformers' load report of the oracle
    ref = dataclasses.replace(resolve_model(str(tiny_dir(family))), path=model, config=cfg)
    with pytest.raises(BadInput, match="of the wrong shape; it does not match its config.json"):
        check_loading_info(ref, info)  # the refusal probe.eval's load gave before the shared check

    with pytest.raises(BadInput) as exc:
        resolve_model(str(model))
    line = str(exc.value)
    assert "of the wrong shape; it does not match its config.json" in line and "\n" not in line
    tc = built.config.get_text_config()  # head_dim as the load built it (explicit, derived or the class default)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    want = ({n * head_dim for n in (text["num_attention_heads"], text["num_key_value_heads"])} if size in DAMAGE
            and size != "hidden_size" else {text[size]})
    assert any(re.search(rf"in the file, \([^)]*\b{w}\b[^)]*\) by config\.json", line) for w in want), line
    out = tmp_path / "o"
    for main, argv in ((probe_eval.main, ["--models", str(model), "--data", "probe/zoo/data/text"]),
                       (shift.main, ["--base", str(model), "--models", str(tiny_dir(family)), "--no-figures"]),
                       (merge.main, ["--models", str(tiny_dir(family)), str(model), "--method", "average"])):
        assert cli_main(main, [*argv, "--out", str(out)]) == 2, main.__module__
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {line}"], (main.__module__, err)
        assert not out.exists()


@pytest.mark.parametrize("family", ("qwen2", "qwen2_vl", "llava_onevision", "qwen2_audio") + NEW)
def test_a_config_without_head_dim_is_checked_as_its_class_builds_it(family, tmp_path, capsys):
    """A text config that leaves head_dim out: the head width is the class's (Llama and Mistral derive
    hidden_size // num_attention_heads, Qwen3 and Gemma 3 default to 128 and 256, whose tiny heads are 24 wide).
    Oracle transformers' load: the checkpoint is refused exactly when it finds tensors of the wrong shape, and
    then the line counts as many as it does; accepted otherwise (never stricter)."""
    import shutil

    from probe.errors import BadInput
    from probe.lm_config import config_value
    from probe.models import resolve_model
    from probe.tiny import tiny_dir

    fam = FAMILIES[family]
    model = shutil.copytree(tiny_dir(family), tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    text = config_value(cfg, fam.text_config_attr) if fam.text_config_attr else cfg
    text = text if isinstance(text, dict) and "num_attention_heads" in text else cfg
    text.pop("head_dim", None)
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    _, info = oracle_load(fam, model, cfg)
    capsys.readouterr()
    mismatched = len(info["mismatched_keys"])
    if not mismatched:
        resolve_model(str(model))
        return
    with pytest.raises(BadInput) as exc:
        resolve_model(str(model))
    more = re.search(r"and (\d+) more of the wrong shape", str(exc.value))
    assert (int(more.group(1)) + 1 if more else 1) == mismatched, (str(exc.value), info["mismatched_keys"])


@pytest.mark.parametrize("kv", [4, 8, 32])
@pytest.mark.parametrize("family, untyped", [(f, False) for f in ("qwen2", "llama", "mistral", "qwen2_vl",
                                                                   "gemma3_text")] + [(f, True) for f in COMPOSITE])
def test_a_config_without_num_key_value_heads_is_checked_as_its_class_builds_it(family, untyped, kv, tmp_path,
                                                                                capsys):
    """A tiny checkpoint of 32 attention heads whose k/v tensors hold ``kv`` key/value heads, its text config
    stating no num_key_value_heads: transformers' load builds its class's count (Qwen2 32, Llama the attention
    heads, Mistral and Qwen2-VL's text 8, Gemma 3 4) and refuses other k/v rows. ``untyped``: a composite's nested
    text config states no model_type either, and transformers builds it with its parent class's text sub-config
    (Qwen2-VL's and Qwen2.5-VL's 8, the Omni thinker's and Gemma 3's 4) or the type it names (LLaVA's llama,
    LLaVA-OneVision's qwen2), where the head layout took the attention heads and the size check compared no k/v
    rows. Oracle that load: exactly what it accepts, probe.eval's checks (resolve_model) and analyses.shift accept
    (which measured every one of them per head by 32 key/value groups); what it refuses, both refuse with the one
    line, counting the tensors it finds of the wrong shape, before anything is written (analyses.merge alike)."""
    import shutil

    import transformers

    from analyses import merge, shift
    from probe.errors import BadInput, cli_main
    from probe.lm_config import config_value
    from probe.models import resolve_model
    from probe.tiny import TinySpec, build_tiny

    fam = FAMILIES[family]
    spec = TinySpec(hidden_size=256, num_attention_heads=32, num_key_value_heads=kv, num_hidden_layers=2)
    model = build_tiny(family, tmp_path / "m", spec)
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    text = config_value(cfg, fam.text_config_attr) if fam.text_config_attr else cfg
    del text["num_key_value_heads"]
    if untyped:
        del text["model_type"]
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    other = shutil.copytree(model, tmp_path / "other")
    _, info = oracle_load(fam, model, cfg)
    capsys.readouterr()  # transformers' load report of the oracle
    mismatched = len(info["mismatched_keys"])
    runs = ((shift.main, ["--base", str(model), "--models", str(other), "--no-figures"]),
            (merge.main, ["--models", str(model), str(other), "--method", "average"]))
    if not mismatched:
        assert resolve_model(str(model)).geometry.n_kv_heads == kv
        for i, (main, argv) in enumerate(runs):
            assert cli_main(main, [*argv, "--out", str(tmp_path / f"o{i}")]) == 0, capsys.readouterr().err
        # the merged LM, written as its causal-LM class (Qwen2 for Qwen2-VL, whose own default is 32 key/value
        # heads), loads in transformers with these k/v rows: none of the wrong shape
        lm, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "o1", output_loading_info=True, ignore_mismatched_sizes=True, device_map="meta",
            **NO_HUB_KERNELS)
        assert not info["mismatched_keys"], sorted(info["mismatched_keys"])[:2]
        attn = lm.model.layers[0].self_attn
        assert attn.k_proj.out_features * 32 == attn.q_proj.out_features * kv
        return
    with pytest.raises(BadInput) as exc:
        resolve_model(str(model))
    line = str(exc.value)
    more = re.search(r"and (\d+) more of the wrong shape; it does not match its config.json", line)
    assert (int(more.group(1)) + 1 if more else 1) == mismatched, (line, info["mismatched_keys"])
    for main, argv in runs:
        assert cli_main(main, [*argv, "--out", str(tmp_path / "o")]) == 2, main.__module__
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {line}"], main.__module__
        assert not (tmp_path / "o").exists()


# M-RoPE sections of a text config's rope_parameters without its theta: the theta its class builds (Qwen2-VL's 1e6,
# Qwen3-VL's 5e5), which the merged LM's plain RoPE must take
MROPE = {"qwen2_vl": [2, 1, 1], "qwen2_5_vl": [2, 1, 1], "qwen3_vl": [4, 4, 4], "qwen2_5_omni_thinker": [2, 1, 1]}


def _nested(fam, text: dict) -> dict:
    """A config.json dict of ``fam`` holding ``text`` as its text config (a text family's: ``text`` itself)."""
    cfg: dict = {"model_type": fam.model_types[0]}
    if fam.text_config_attr is None:
        return cfg | text
    node = cfg
    *outer, last = fam.text_config_attr.split(".")
    for part in outer:
        node = node.setdefault(part, {})
    node[last] = text
    return cfg


@pytest.mark.parametrize("family, variant", [(f, "sizes") for f in FAMILIES] + [(f, "typed") for f in COMPOSITE]
                         + [(f, "mrope") for f in MROPE])
def test_the_merged_lm_config_builds_the_reference_text_config(family, variant, tmp_path):
    """The merged LM's config.json is the reference's text config written as the family table's causal-LM class
    (Qwen2 for Qwen2-VL, Qwen2.5-VL and the Omni thinker, Qwen3 for Qwen3-VL), whose defaults differ from the
    reference's own class: a text config stating only its sizes (``typed``: and its model_type; ``mrope``: and
    M-RoPE sections without a theta) built a Qwen2 of rope theta 1e4, RMS eps 1e-6 and 22016 intermediate rows
    for Qwen2-VL's 1e6, 1e-5 and 29568 (Qwen3-VL: theta 1e4 for 5e5, or 1e6 from the M-RoPE conversion), a
    model that refused its tensors or loaded them and computed other logits. Oracle: transformers' config of the
    reference's text config (its parent class builds it from the config.json dict) and the config transformers
    reads from the written config.json agree on every key both have, but the dtype (M-RoPE: plain RoPE of the
    same theta)."""
    import types

    from transformers import AutoConfig

    from analyses.merge import merged_config
    from probe.lm_config import text_config_dict

    fam = FAMILIES[family]
    text: dict = {"hidden_size": 256, "num_attention_heads": 32, "num_hidden_layers": 2}
    cfg = _nested(fam, text)
    if variant == "typed":
        text["model_type"] = text_config_dict(cfg, fam)["model_type"]
    if variant == "mrope":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": MROPE[family]}
    ref = AutoConfig.for_model(**cfg)
    for part in fam.text_config_attr.split(".") if fam.text_config_attr else ():
        ref = getattr(ref, part)
    reference = types.SimpleNamespace(text_config=text_config_dict(cfg, fam), family=fam)
    written = merged_config(reference, torch.float32, ref.vocab_size, bool(getattr(ref, "tie_word_embeddings", 0)))
    (tmp_path / "config.json").write_text(json.dumps(written), encoding="utf-8")
    got = AutoConfig.from_pretrained(tmp_path).to_dict()
    want = ref.to_dict()
    if variant == "mrope":
        want["rope_parameters"] = {k: v for k, v in want["rope_parameters"].items() if not k.startswith("mrope")}
    differ = {k: (want[k], got[k]) for k in sorted(set(want) & set(got))
              if want[k] != got[k] and k not in ("model_type", "architectures", "dtype", "_name_or_path")}
    assert not differ, (family, variant, ref.model_type, got["model_type"], differ)
    assert got["model_type"] == causal_lm_type(fam, text_config_dict(cfg, fam))


# composites whose text sub-config transformers builds as its own class where it states "model_type": null (the
# others' AutoConfig lookup refuses a null type: no reference to compare with)
NULL_TYPED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2_5_omni_thinker", "gemma3")
# rope_parameters null: the class's default rope. Qwen2-VL's, Qwen2.5-VL's and the Omni thinker's default M-RoPE
# sections need 128-wide heads (a tiny model's 16 refuse them): the reference itself does not run
ROPE_NULL = tuple(f for f in FAMILIES if f not in ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni_thinker"))


@pytest.mark.parametrize("family, variant", [(f, "sizes") for f in FAMILIES] + [(f, "rope_null") for f in ROPE_NULL]
                         + [(f, "untyped") for f in COMPOSITE] + [(f, "null_type") for f in NULL_TYPED]
                         + [(f, "flat") for f in ("qwen2_vl", "qwen2_5_vl")])
def test_a_merged_lm_computes_the_reference_lms_logits_from_a_minimal_text_config(family, variant, tmp_path,
                                                                                   capsys):
    """A tiny random model whose text config states only its sizes (M-RoPE: its sections, no theta), merged with
    itself by Eq. 1 (the average of identical models is the model): the merged LM, which AutoModelForCausalLM
    loads as the family table's causal-LM class, gives the logits the reference's own class gives on a text
    prompt. Written as Qwen2 from a Qwen2-VL text config, it took Qwen2's rope theta and RMS eps (Qwen3-VL's: a
    theta of 1e6 for its class's 5e5) and computed other logits. Every family of the table, and the ways a text
    config leaves a key to its class: absent (``sizes``), null (``rope_null``: rope_parameters null, which every
    class reads as its own default rope, Qwen2-VL's theta 1e6, Qwen2's 1e4), a nested text config without its
    model_type (``untyped``) or with a null one (``null_type``), and the released Qwen2-VL layout: the LM's keys at
    the top level, M-RoPE as a legacy rope_scaling without a theta (``flat``). Oracle: transformers' load of the
    reference by its family class, text only."""
    import shutil

    import transformers

    from analyses import merge
    from probe.errors import cli_main
    from probe.lm_config import config_value
    from probe.tiny import SPECS, TinySpec, build_tiny

    fam = FAMILIES[family]
    model = build_tiny(family, tmp_path / "m", SPECS.get(family, TinySpec()))
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    text = config_value(cfg, fam.text_config_attr) if fam.text_config_attr else cfg
    kept = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim")
    rope = text.get("rope_parameters", {})
    text_min = {k: text[k] for k in kept if k in text} | (
        {"rope_parameters": {k: v for k, v in rope.items() if k != "rope_theta"}} if "mrope_section" in rope else {})
    if variant == "rope_null":
        text_min["rope_parameters"] = None
    if variant in ("untyped", "null_type"):
        text_min["model_type"] = None
        if variant == "untyped":
            del text_min["model_type"]
    text.clear()
    text.update(text_min)
    if variant == "flat":
        del cfg["text_config"], text_min["model_type"]
        sections = text_min.pop("rope_parameters")["mrope_section"]
        cfg |= text_min | {"rope_scaling": {"type": "mrope", "mrope_section": sections}}
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    other = shutil.copytree(model, tmp_path / "other")
    out = tmp_path / "merged"
    assert cli_main(merge.main, ["--models", str(model), str(other), "--method", "average", "--out", str(out)]) == 0
    reference, info = oracle_load(fam, model, cfg, meta=False)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    lm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **NO_HUB_KERNELS)
    capsys.readouterr()
    ids = transformers.AutoTokenizer.from_pretrained(model)("The quick brown fox jumps over the lazy dog",
                                                            return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, lm(input_ids=ids).logits
    assert ids.shape[1] > 8 and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)



def test_a_merge_whose_reference_text_class_transformers_cannot_build_exits_2_before_writing(tmp_path, capsys,
                                                                                          monkeypatch):
    """Where transformers builds no text config of the reference's own class from its text config, which values the
    merged LM (written as another class: Qwen2 for Qwen2-VL) must state for the keys it leaves out is unknown: the
    merge wrote none, so an M-RoPE config stating no theta took Qwen2's 1e4 for Qwen2-VL's 1e6 and the merged LM
    loaded and computed other logits. Now one line naming the checkpoint, exit 2, before any tensor is merged
    (transformers' refusal simulated: no real config of the supported families reaches it)."""
    import shutil

    from analyses import merge
    from probe import lm_config
    from probe.errors import cli_main
    from probe.tiny import SPECS, TinySpec, build_tiny

    model = build_tiny("qwen2_vl", tmp_path / "m", SPECS.get("qwen2_vl", TinySpec()))
    other = shutil.copytree(model, tmp_path / "other")
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    real = lm_config._built_text_config
    monkeypatch.setattr(lm_config, "_built_text_config",
                        lambda model_type, text: None if model_type == "qwen2_vl_text" else real(model_type, text))
    out = tmp_path / "merged"
    capsys.readouterr()
    assert cli_main(merge.main, ["--models", str(model), str(other), "--method", "average", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(model) in err and "'qwen2_vl_text' config class" in err, err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    monkeypatch.setattr(lm_config, "_built_text_config", real)
    assert cli_main(merge.main, ["--models", str(model), str(other), "--method", "average", "--out", str(out)]) == 0

def test_readme_family_table_is_generated_from_the_table():
    from probe.families import supported_families_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin, end = "<!-- families:begin -->\n", "<!-- families:end -->"
    assert begin in readme and end in readme
    assert readme.split(begin, 1)[1].split(end, 1)[0] == supported_families_markdown(), \
        "README's family table drifted: paste `python -m probe.families` between the markers"


@pytest.mark.parametrize("family", [f for f in NEW if FAMILIES[f].processor_class])
def test_batched_evaluation_equals_one_item_path(family, loaded, video_item):
    """probe.eval's batches (left padding, concatenated pixel tensors) give what one item at a time gives."""
    from probe.batch import evaluate_items
    from probe.sweep import SweepConfig, first_token_measure, prepare_item

    m = loaded(family)
    items = items_for(m, video_item) + [make_item(item_id="validation_Test_2", seed=1, question="Which shape?"),
                                        make_item(n_options=3, with_image=False, item_id="validation_Test_3")]
    cfg = SweepConfig(generate=True, max_new_tokens=3)
    got = evaluate_items(m, items, cfg, batch_size=4)
    for item, g in zip(items, got, strict=True):  # every item measured
        inputs, letters = prepare_item(m, item, cfg)
        want = first_token_measure(m, inputs, letters, cfg)
        assert g.response == want.response, item.id
        torch.testing.assert_close(g.logp.exp(), want.logp.exp(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", [f for f in VL_FAMILIES + NEW if "image" in FAMILIES[f].modalities])
def test_every_image_familys_tiny_model_sees_its_image(family, loaded, load_tiny):
    """The batching tests hold a batched row to its item alone within 1e-4 in p; a row fed another row's pixels
    must miss that by far, or they (and the run-time guard) cannot tell. Oracle: the same item with another image,
    each alone, moves p over its option letters by > 1e-3. Tiny Gemma 3 once saw none of its images (its
    projector weight is zero-initialised by transformers), so every Gemma 3 image test passed whatever pixels a row
    got."""
    from probe.sweep import SweepConfig, first_token_measure, prepare_item

    m = load_tiny(family, "sdpa") if family in VL_FAMILIES else loaded(family)
    cfg = SweepConfig(generate=False)
    item = make_item(seed=0)
    other = dataclasses.replace(item, images=(png_bytes(colour=(10, 200, 90), seed=10),))
    p = [first_token_measure(m, *prepare_item(m, it, cfg), cfg).logp.exp() for it in (item, other)]
    assert float((p[0] - p[1]).abs().max()) > 1e-3


@pytest.mark.parametrize("generate", [True, False])
@pytest.mark.parametrize("family", [f for f in NEW if not FAMILIES[f].processor_class])
def test_batched_evaluation_of_a_text_family_equals_one_item_path(family, generate, loaded):
    """The text rows (Qwen3, Mistral, Gemma 3 text with its 8-token sliding window) through probe.eval's
    left-padded batches: the same generated text and p within 1e-4 (fp32) as one item at a time (issue 14: every
    family). The test above covers the rows with a processor only."""
    from probe.batch import evaluate_items, plan_batches
    from probe.sweep import SweepConfig, first_token_measure, prepare_item

    m = loaded(family)
    long = "Which shape is drawn on the left, and in what colour, given the hint below? " * 3
    items = [make_item(n_options=5, answer="E", with_image=False, item_id="validation_Test_5"),
             make_item(n_options=3, with_image=False, item_id="validation_Test_3"),
             make_item(with_image=False, question=long, item_id="validation_Test_2"),
             make_item(n_options=6, answer="B", with_image=False, question="Pick one.", item_id="validation_Test_4")]
    cfg = SweepConfig(generate=generate, max_new_tokens=3)
    prepared = [prepare_item(m, it, cfg) for it in items]
    # anti-tautology: rows of different lengths share a forward, so the short ones are left-padded (by > 100 tokens)
    lengths = [inputs["input_ids"].shape[1] for inputs, _ in prepared]
    plan = plan_batches([p[0] for p in prepared], 4, max_padding=None)
    assert len(plan) == 1 and sorted(plan[0]) == [0, 1, 2, 3]
    assert max(lengths) - min(lengths) > 100
    got = evaluate_items(m, items, cfg, batch_size=4, max_padding=None)
    for item, (inputs, letters), g in zip(items, prepared, got, strict=True):  # every item measured
        want = first_token_measure(m, inputs, letters, cfg)
        assert g.response == want.response, item.id
        torch.testing.assert_close(g.logp.exp(), want.logp.exp(), atol=1e-4, rtol=0)


# the processors whose output for several prompts is each prompt's own, padded and concatenated (MEDIA_ROWS)
ONE_CALL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2_5_omni_thinker", "llava", "llava_next", "llava_onevision",
            "gemma3", "internvl")
ANYRES = ("llava_next", "llava_onevision")  # their patches padded to the call's most (MediaLayout.anyres)


@pytest.mark.parametrize("family", [f for f in VL_FAMILIES + NEW if FAMILIES[f].processor_class])
def test_one_processor_call_gives_each_item_the_tensors_of_its_own_call(family, loaded, load_tiny, video_item,
                                                                        monkeypatch):
    """Batched evaluation encodes a window's prompts with one processor call and cuts it apart again
    (probe.prompting.encode_prompts: the per-call overhead was half of organism-vl's input building). Each item must
    get what its own call gives (the oracle): the same keys in the same order, dtypes and values of input ids,
    masks, type ids, pixel values, grid and image sizes, over items of 0, 1 and 2 images of different sizes (other
    grids, other patch counts: LLaVA-NeXT's and -OneVision's pixel values padded to the item's own most patches, not
    the call's), beside a video item where the family takes video (encoded alone by probe.video). The other
    processor (Idefics3's pads the images across prompts) leaves every item to its own call."""
    from probe.prompting import PromptTemplate, encode_prompt, encode_prompts, render_prompt

    m = load_tiny(family, "sdpa") if family in VL_FAMILIES else loaded(family)
    two = (png_bytes(size=(90, 30), seed=3), png_bytes(size=(20, 70), seed=4))
    items = [make_item(item_id="validation_Test_1"), make_item(with_image=False, item_id="validation_Test_2"),
             dataclasses.replace(make_item(item_id="validation_Test_3", question="Which two?"), images=two),
             dataclasses.replace(make_item(item_id="validation_Test_4", n_options=5),
                                 images=(png_bytes(size=(200, 130), seed=5),))]
    if "video" in m.family.modalities:
        items.insert(2, video_item)
    calls: list[int] = []
    cls = type(m.processor)
    real = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: calls.append(len(k["text"])) or real(self, *a, **k))
    got = encode_prompts(m, items, PromptTemplate())
    n_batched = len(items) - ("video" in m.family.modalities)
    # anti-tautology: one call served them (then two items alone, the run-time check of the cuts)
    assert calls == ([n_batched, 1, 1] if family in ONE_CALL else []), calls
    for item, enc in zip(items, got, strict=True):
        assert (enc is not None) == (family in ONE_CALL and not item.frames), item.id
        if enc is None:
            continue
        want = encode_prompt(m, item, render_prompt(m, item, PromptTemplate()))
        assert enc.prompt == render_prompt(m, item, PromptTemplate())
        assert list(enc.batch) == list(want), item.id
        for k, v in want.items():
            assert enc.batch[k].dtype == v.dtype and torch.equal(enc.batch[k], v), (item.id, k)


def _window_item(i: int, sizes: tuple = (), question: str = "Which shape?", n_options: int = 4):
    """An item of ``len(sizes)`` images of those (width, height) sizes (seeded per item and image)."""
    item = make_item(item_id=f"validation_Test_{i}", question=question, n_options=n_options,
                     with_image=bool(sizes), seed=i)
    return dataclasses.replace(item, images=tuple(png_bytes(size=s, seed=10 * i + k) for k, s in enumerate(sizes)))


LONG = "Which of the shapes, drawn in which colour, is left of the other one, given the hint? " * 4
# windows built to fool a cut checked only at the window's first and last item with images: text-only items at both
# ends and between, 0 to 3 images an item, same-size images in different items (a fast image processor groups
# images by size), a long prompt beside short ones (padding of over 100 tokens), MMMU's <image k> references; and
# extreme images: 1×1, tall and wide strips (30:1), larger than any anyres grid pinpoint, between text-only items
ADVERSARIAL = {
    "extreme": [(), ((1, 1),), ((10, 300), (300, 10)), (), ((1500, 900),), ((700, 2000), (1, 1)), ((48, 40),)],
    "mixed": [(), ((48, 40), (48, 40)), (), (), ((90, 30), (20, 70), (48, 40)), (), ((200, 130),), ((48, 40),),
              ("long",)],
    "same_size": [((48, 40),)] * 5,
    "text_only": [(), ("long",), (), ()],
    "one_image_between": [(), (), ((33, 97),), (), ()],
}


@pytest.mark.parametrize("window", ADVERSARIAL)
@pytest.mark.parametrize("family", ONE_CALL)
def test_every_item_of_an_adversarial_window_gets_its_own_calls_tensors(family, window, loaded, load_tiny,
                                                                         monkeypatch):
    """encode_prompts' run-time check compares only the window's first and last item with images with their own
    processor calls; this checks every item (the middle ones above all) against its own call, tensor for tensor,
    over windows built to break a cut that is right at the ends only. Also with images shrunk (--image-max-side),
    which reaches the cut through render_prompt."""
    from probe.prompting import PromptTemplate, encode_prompt, encode_prompts, render_prompt

    m = load_tiny(family, "sdpa") if family in VL_FAMILIES else loaded(family)
    items = [_window_item(i, () if spec == ("long",) else spec, question=LONG if spec == ("long",) else
                          f"Which of <image 1> and <image 2> is item {i}?", n_options=3 + i % 4)
             for i, spec in enumerate(ADVERSARIAL[window])]
    calls: list[int] = []
    cls = type(m.processor)
    real = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: calls.append(len(k["text"])) or real(self, *a, **k))
    for side in (None, 24):
        calls.clear()
        got = encode_prompts(m, items, PromptTemplate(), side)
        assert calls[0] == len(items), calls  # anti-tautology: one call served the window, none fell back
        assert all(enc is not None for enc in got), [enc is None for enc in got]
        lengths = []
        for item, enc in zip(items, got, strict=True):
            prompt = render_prompt(m, item, PromptTemplate(), side)
            want = encode_prompt(m, item, prompt)
            assert enc.prompt == prompt, item.id
            assert list(enc.batch) == list(want), (item.id, list(enc.batch), list(want))
            for k, v in want.items():
                assert enc.batch[k].dtype == v.dtype and torch.equal(enc.batch[k], v), (side, item.id, k)
            lengths.append(want["input_ids"].shape[1])
        assert window == "same_size" or max(lengths) - min(lengths) > 20, lengths  # real padding inside the call


@pytest.mark.parametrize("family", ONE_CALL)
def test_an_item_holding_the_processors_image_token_cannot_enter_a_window(family, loaded, load_tiny):
    """A processor expands its image token wherever the text holds it, and Qwen's take each one's grid from the
    next image of the whole call: an item whose question held the token as plain text would take its neighbour's
    image in one call (and more tokens than images alone). The token must be one the tokenizer reads as special,
    so the item is refused by its text check; the window's items before it keep their own calls' tensors, it and
    the ones after are left to build_inputs, which names it."""
    from probe.errors import BadInput
    from probe.prompting import PromptTemplate, build_inputs, encode_prompt, encode_prompts, render_prompt

    m = load_tiny(family, "sdpa") if family in VL_FAMILIES else loaded(family)
    token = m.processor.image_token
    assert token in m.special_tokens, (family, token)
    items = [_window_item(0, ((48, 40),)), _window_item(1, ()),
             _window_item(2, ((90, 30),), question=f"What is {token} here?"), _window_item(3, ((20, 70),))]
    got = encode_prompts(m, items, PromptTemplate())
    assert [enc is None for enc in got] == [False, False, True, True]
    for item, enc in zip(items[:2], got):
        want = encode_prompt(m, item, render_prompt(m, item, PromptTemplate()))
        assert list(enc.batch) == list(want) and all(torch.equal(enc.batch[k], v) for k, v in want.items())
    with pytest.raises(BadInput, match=f"^item validation_Test_2: its text holds {re.escape(repr(token))}"):
        build_inputs(m, items[2], PromptTemplate())


def test_a_cut_that_is_not_the_items_own_call_falls_back_to_one_call_an_item(load_tiny, monkeypatch):
    """encode_prompts checks, every window, the first and the last item with images against their own calls: a
    processor whose layout MEDIA_ROWS misreads (here: the pixel rows of a window's first two images swapped, all
    sums still right) would give items their neighbours' pixels, which the forward's guard cannot see (it measures
    the same inputs alone). Every item is then encoded alone, and the numbers are the oracle's."""
    from probe import prompting
    from probe.batch import evaluate_items
    from probe.sweep import SweepConfig, first_token_measure, prepare_item

    m = load_tiny("qwen2_vl", "sdpa")
    items = [make_item(item_id="validation_Test_1", seed=1),
             dataclasses.replace(make_item(item_id="validation_Test_2", seed=2), images=(png_bytes(size=(90, 30)),)),
             make_item(item_id="validation_Test_3", seed=3)]
    real = prompting.MEDIA_ROWS["Qwen2VLProcessor"]
    assert all(e is not None for e in prompting.encode_prompts(m, items, prompting.PromptTemplate()))

    def swapped(batch, counts):
        rows = real.rows(batch, counts)
        rows["pixel_values"][:2] = rows["pixel_values"][1::-1]  # item 1's rows where item 0's were
        return rows

    monkeypatch.setitem(prompting.MEDIA_ROWS, "Qwen2VLProcessor", dataclasses.replace(real, rows=swapped))
    assert prompting.encode_prompts(m, items, prompting.PromptTemplate()) == [None] * len(items)
    # the two calls alone catch it too (the token count of each cut catches it first: the images differ in size)
    with monkeypatch.context() as patch:
        patch.setattr(prompting, "_cuts_hold_their_media", lambda loaded_, cuts, layout: True)
        assert prompting.encode_prompts(m, items, prompting.PromptTemplate()) == [None] * len(items)
    cfg = SweepConfig(max_new_tokens=2)
    for item, got in zip(items, evaluate_items(m, items, cfg, batch_size=4), strict=True):
        want = first_token_measure(m, *prepare_item(m, item, cfg), cfg)
        assert got.response == want.response
        torch.testing.assert_close(got.logp.exp(), want.logp.exp(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", *ANYRES, "gemma3", "internvl"])
def test_a_misread_of_middle_items_that_leaves_the_ends_right_falls_back_to_one_call_an_item(family, loaded,
                                                                                              load_tiny, monkeypatch):
    """The run-time check's two calls (the window's first and last item with images) cannot see a layout misread
    that gives the items between them their neighbours' media while the ends stay right (here: the media rows of
    items 1-3 rotated, every sum still right; Qwen's grid rows left in place). Each item's cut must also hold as many
    image tokens as its media rows give (the window's tokens per row; LLaVA-NeXT, -OneVision: as many pixel rows as
    image sizes, each with the patches its size gives and zeros after), which a misread between items of other
    image counts or sizes breaks: every item is then encoded alone, and the numbers are the oracle's."""
    from probe import prompting
    from probe.batch import evaluate_items
    from probe.sweep import SweepConfig, first_token_measure, prepare_item

    m = load_tiny(family, "sdpa") if family in VL_FAMILIES else loaded(family)
    items = [_window_item(0, ((48, 40),)), _window_item(1, ()), _window_item(2, ((90, 30), (20, 70))),
             _window_item(3, ((200, 130),)), _window_item(4, ((48, 40),))]
    name = type(m.processor).__name__
    real = prompting.MEDIA_ROWS[name]
    assert all(e is not None for e in prompting.encode_prompts(m, items, prompting.PromptTemplate()))

    seen = []

    def rotated(batch, counts):
        rows = real.rows(batch, counts)
        px = rows["pixel_values"]
        rows["pixel_values"] = px[:1] + px[2:4] + px[1:2] + px[4:]
        seen.append((px, rows["pixel_values"]))
        return rows

    monkeypatch.setitem(prompting.MEDIA_ROWS, name, dataclasses.replace(real, rows=rotated))
    assert prompting.encode_prompts(m, items, prompting.PromptTemplate()) == [None] * len(items)
    # anti-tautology: the ends' rows as read right (what the two calls check), every middle item's other
    (was, now), = seen
    assert was[0] == now[0] and was[-1] == now[-1] and all(a != b for a, b in zip(was[1:4], now[1:4])), seen
    cfg = SweepConfig(max_new_tokens=2)
    for item, got in zip(items, evaluate_items(m, items, cfg, batch_size=8), strict=True):
        want = first_token_measure(m, *prepare_item(m, item, cfg), cfg)
        assert got.response == want.response
        torch.testing.assert_close(got.logp.exp(), want.logp.exp(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, tiled", [("gemma3", False), ("internvl", False), ("internvl", True)])
def test_batched_evaluation_from_one_processor_call_equals_one_item_path(family, tiled, loaded, monkeypatch):
    """Gemma 3's processor takes a call's images as one list per prompt (MediaLayout.nested; a flat list is one
    prompt's, refused beside several prompts), an empty one for a text-only prompt; InternVL's gives a call's images'
    patches as one run of rows without saying how many an image took (MediaLayout.patches; tiled: crop_to_patches
    on, 1 to 13 rows an image here). A window of items of 0, 1, 2 and 3 images of other sizes, text-only ones
    between, through probe.eval's batches: the same generated text and p within 1e-4 (fp32) as one item at a time.
    Anti-tautology: one processor call served every item (then the two of its run-time check), and the call held
    prompts with and without images."""
    from probe import batch
    from probe.sweep import SweepConfig, first_token_measure, prepare_item

    m = loaded(family)
    if tiled:
        monkeypatch.setattr(m.processor.image_processor, "crop_to_patches", True)
    specs = [((48, 40),), (), ((90, 30), (20, 70)), (), ((200, 130), (30, 30), (48, 40)), ((33, 97),), ()]
    items = [_window_item(i, spec, n_options=3 + i % 3) for i, spec in enumerate(specs)]
    served: list[bool] = []
    real = batch.encode_prompts
    monkeypatch.setattr(batch, "encode_prompts",
                        lambda *a, **k: (out := real(*a, **k), served.extend(e is not None for e in out))[0])
    calls = _spy_calls(m, monkeypatch)
    cfg = SweepConfig(generate=True, max_new_tokens=3)
    got = batch.evaluate_items(m, items, cfg, batch_size=len(items))
    assert served == [True] * len(items) and calls[:3] == [len(items), 1, 1], (served, calls)
    for item, g in zip(items, got, strict=True):
        want = first_token_measure(m, *prepare_item(m, item, cfg), cfg)
        assert g.response == want.response, item.id
        torch.testing.assert_close(g.logp.exp(), want.logp.exp(), atol=1e-4, rtol=0)


def _own_call(m, item):
    from probe.prompting import PromptTemplate, encode_prompt, render_prompt

    return encode_prompt(m, item, render_prompt(m, item, PromptTemplate()))


def _assert_own_calls(m, items, got) -> list[dict]:
    """Each item's cut of a window's call is its own call's, tensor for tensor (keys, dtypes, values); the own calls."""
    wants = []
    for item, enc in zip(items, got, strict=True):
        want = _own_call(m, item)
        assert enc is not None and list(enc.batch) == list(want), item.id
        for k, v in want.items():
            assert enc.batch[k].dtype == v.dtype and torch.equal(enc.batch[k], v), (item.id, k)
        wants.append(want)
    return wants


def _spy_calls(m, monkeypatch) -> list[int]:
    """The prompts of each processor call from now on."""
    calls: list[int] = []
    cls = type(m.processor)
    real = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: calls.append(len(k["text"])) or real(self, *a, **k))
    return calls


@pytest.mark.parametrize("family", ANYRES)
def test_an_anyres_cut_has_the_patch_padding_of_its_own_call(family, loaded, load_tiny, monkeypatch):
    """LLaVA-NeXT's and -OneVision's processors pad every image's patches to the call's most: a window's call pads
    an item's images to the window's most, its own call to its own images' most (none for one image). Each cut must
    be its own call's, tensor for tensor, over a window of text-only items and items of 1 and 2 images of other
    patch counts; anti-tautology: the window's call padded more than the 2-image item's own call, which padded its
    smaller image. The patch and image-token counts the cut and its check take from transformers
    (probe.upstream.anyres_patches, processor_image_tokens) are those of each image's own one-image call."""
    from probe import prompting
    from probe.upstream import anyres_patches, processor_image_tokens

    m = load_tiny(family, "sdpa") if family in VL_FAMILIES else loaded(family)
    specs = [(), ((48, 40),), (), ((90, 30), (30, 30)), ((200, 130),), ()]
    items = [_window_item(i, spec) for i, spec in enumerate(specs)]
    sizes = ((48, 40), (90, 30), (30, 30), (200, 130))
    calls = _spy_calls(m, monkeypatch)
    got = prompting.encode_prompts(m, items, prompting.PromptTemplate())
    assert calls == [len(items), 1, 1], calls  # one call served the window (and the two checks)
    _assert_own_calls(m, items, got)
    own = {size: _own_call(m, _window_item(10 + i, (size,))) for i, size in enumerate(sizes)}  # each image alone
    patches = {size: enc["pixel_values"].shape[1] for size, enc in own.items()}
    token = m.processor.image_token_id
    for enc in own.values():
        side = enc["pixel_values"].shape[-1]
        assert anyres_patches(family, m.processor, enc["image_sizes"], side) == [enc["pixel_values"].shape[1]]
        assert processor_image_tokens(m.processor, enc["image_sizes"]) == [int((enc["input_ids"] == token).sum())]
    two = got[3].batch["pixel_values"]
    small, large = sorted(patches[size] for size in specs[3])
    window = m.processor(**prompting.processor_kwargs([p.prompt.text for p in got],
                                                      [im for p in got for im in p.prompt.images]))
    assert small < large == two.shape[1] < window["pixel_values"].shape[1] == max(patches.values())
    assert not two[int(np.argmin([patches[size] for size in specs[3]])), small:].any()
    assert got[1].batch["pixel_values"].shape[1] == patches[specs[1][0]]  # alone: no padding


@pytest.mark.parametrize("family", ANYRES)
def test_a_misread_of_anyres_image_sizes_is_caught_by_the_image_token_count(family, loaded, load_tiny,
                                                                            monkeypatch):
    """A misread that moves every media row of the middle items together (pixel values, image sizes, OneVision's
    batch_num_images), the ends right, items of one image each: each cut's patches match its image sizes, so only
    the image-token count of its size (the processor's own, one count a call) can see it. Every item is then encoded
    alone; with that check off, the cuts would reach the model wrong (anti-tautology)."""
    from probe import prompting

    m = load_tiny(family, "sdpa") if family in VL_FAMILIES else loaded(family)
    items = [_window_item(i, (size,)) for i, size in enumerate(((48, 40), (90, 30), (200, 130), (30, 30), (48, 40)))]
    cls = type(m.processor)
    call = cls.__call__

    def misread(self, *a, **k):  # a window's call: the media rows of items 1-3 are those of items 2, 3 and 1
        out = call(self, *a, **k)
        if len(k["text"]) > 1:
            for key in [key for key in out if key not in prompting.TOKEN_KEYS]:
                v = out[key]
                out[key] = torch.cat([v[:1], v[2:4], v[1:2], v[4:]])
        return out

    monkeypatch.setattr(cls, "__call__", misread)
    assert prompting.encode_prompts(m, items, prompting.PromptTemplate()) == [None] * len(items)
    with monkeypatch.context() as patch:
        patch.setattr(prompting, "_cuts_hold_their_media", lambda loaded_, cuts, layout: True)
        got = prompting.encode_prompts(m, items, prompting.PromptTemplate())
    assert all(enc is not None for enc in got)
    assert torch.equal(got[0].batch["pixel_values"], _own_call(m, items[0])["pixel_values"])
    assert not all(torch.equal(got[i].batch["pixel_values"], _own_call(m, items[i])["pixel_values"]) for i in (1, 2, 3))


def test_gemma3_pan_and_scan_crops_leave_their_items_to_their_own_calls(loaded, monkeypatch):
    """Gemma 3's processor gives one pixel row per image only with pan-and-scan off (MediaLayout.nested's note):
    its crops add rows, and an image's rows can no longer be told apart. With pan-and-scan on in every call (the
    window's and each item's own), a window holding an image that is cropped is left to the items' own calls; a
    window of images too square to crop is still cut, each item its own call's tensors, tensor for tensor.
    Anti-tautology: the wide image's own call has more pixel rows than images."""
    from probe import prompting

    m = loaded("gemma3")
    real = prompting.processor_kwargs
    pan = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=4,
               pan_and_scan_min_ratio_to_activate=1.2)
    monkeypatch.setattr(prompting, "processor_kwargs", lambda texts, images: real(texts, images) | pan)
    square = [_window_item(0, ((40, 40),)), _window_item(1, ()), _window_item(2, ((30, 30), (44, 44))),
              _window_item(3, ((33, 33),))]
    wide = square[:2] + [_window_item(4, ((900, 100),))] + square[2:]
    assert _own_call(m, wide[2])["pixel_values"].shape[0] > 1
    assert prompting.encode_prompts(m, wide, prompting.PromptTemplate()) == [None] * len(wide)
    calls = _spy_calls(m, monkeypatch)
    got = prompting.encode_prompts(m, square, prompting.PromptTemplate())
    assert calls == [len(square), 1, 1], calls
    _assert_own_calls(m, square, got)


@pytest.mark.parametrize("least, most", [(1, 1), (2, 2), (6, 6), (2, 1), (1, 40)])
def test_an_internvl_cut_at_the_edges_of_its_tile_counts(least, most, loaded, monkeypatch):
    """InternVL's tiling at the edges of min_patches / max_patches (one tile, so no thumbnail; more tiles than some
    images' shapes give; the least above the most; more than any image here takes): the processor's own count of
    an image's rows (probe.upstream.processor_image_patches) still cuts every item of a window of 0 to 3 images to
    its own call's tensors, tensor for tensor, one call serving the window."""
    from probe import prompting

    m = loaded("internvl")
    ip = m.processor.image_processor
    for name, value in (("crop_to_patches", True), ("min_patches", least), ("max_patches", most)):
        monkeypatch.setattr(ip, name, value)
    specs = [(), ((48, 40),), ((900, 100), (20, 70)), (), ((200, 130), (1, 1), (130, 200)), ((64, 64),)]
    items = [_window_item(i, spec) for i, spec in enumerate(specs)]
    calls = _spy_calls(m, monkeypatch)
    got = prompting.encode_prompts(m, items, prompting.PromptTemplate())
    assert calls == [len(items), 1, 1], calls
    rows = [want["pixel_values"].shape[0] if "pixel_values" in want else 0
            for want in _assert_own_calls(m, items, got)]
    assert most == 1 or least > most or max(rows) > max(map(len, specs)), rows  # tiles made where a grid fits


def test_an_internvl_cut_takes_each_images_tiles_by_the_processors_own_count(loaded, monkeypatch):
    """InternVL's processor tiles an image into as many patches as its size gives (crop_to_patches: tiles of its
    size, max_patches at most, and a thumbnail), one pixel row each, concatenated over the call's images, and its
    output does not say how many an image took: a cut takes its prompt's rows by the processor's own count for its
    images' sizes (probe.upstream.processor_image_patches). With tiling on, over a window of text-only items and
    items of 1 to 3 images of other tile counts, every item's cut is its own call's, tensor for tensor, and the
    count is what each image's own call gives (the oracle). A misread of that count that moves rows between middle
    items, every sum and both ends right, is caught by their image tokens (image_seq_length a row): every item is
    then encoded alone. Anti-tautology: the images' tile counts differ, and one call served the window."""
    from probe import prompting
    from probe.upstream import processor_image_patches

    m = loaded("internvl")
    monkeypatch.setattr(m.processor.image_processor, "crop_to_patches", True)
    specs = [(), ((48, 40),), ((200, 130), (20, 70)), (), ((90, 30), (30, 30), (130, 200)), ((64, 64),)]
    items = [_window_item(i, spec) for i, spec in enumerate(specs)]
    calls = _spy_calls(m, monkeypatch)
    got = prompting.encode_prompts(m, items, prompting.PromptTemplate())
    assert calls == [len(items), 1, 1], calls
    _assert_own_calls(m, items, got)
    sizes = [size for spec in specs for size in spec]
    rows = [_own_call(m, _window_item(10 + i, (size,)))["pixel_values"].shape[0] for i, size in enumerate(sizes)]
    assert processor_image_patches(m.processor, torch.tensor([[h, w] for w, h in sizes])) == rows
    assert len(set(rows)) >= 3, rows

    real = prompting.processor_image_patches
    moved = []

    def misread(processor, image_sizes):  # item 2's first image takes a tile of item 4's first
        counts = real(processor, image_sizes)
        if len(counts) == len(sizes):
            counts[1] += 1
            counts[3] -= 1
            moved.append(counts)
        return counts

    monkeypatch.setattr(prompting, "processor_image_patches", misread)
    assert prompting.encode_prompts(m, items, prompting.PromptTemplate()) == [None] * len(items)
    assert moved and sum(moved[0]) == sum(rows) and moved[0] != rows
    with monkeypatch.context() as patch:  # the ends' own calls alone do not see it
        patch.setattr(prompting, "_cuts_hold_their_media", lambda loaded_, cuts, layout: True)
        served = prompting.encode_prompts(m, items, prompting.PromptTemplate())
    assert all(enc is not None for enc in served)
    assert not torch.equal(served[2].batch["pixel_values"], got[2].batch["pixel_values"])


@pytest.mark.parametrize("window", ADVERSARIAL)
def test_every_item_of_an_adversarial_window_gets_its_own_calls_tiles(window, loaded, monkeypatch):
    """The adversarial windows through InternVL's processor with tiling on (1x1 images, 30:1 strips, images of more
    tiles than max_patches allows): every item's cut is its own call's, tensor for tensor, with and without
    --image-max-side; one call served the window."""
    from probe.prompting import PromptTemplate, encode_prompt, encode_prompts, render_prompt

    m = loaded("internvl")
    monkeypatch.setattr(m.processor.image_processor, "crop_to_patches", True)
    items = [_window_item(i, () if spec == ("long",) else spec, question=LONG if spec == ("long",) else
                          f"Which of <image 1> and <image 2> is item {i}?", n_options=3 + i % 4)
             for i, spec in enumerate(ADVERSARIAL[window])]
    calls = _spy_calls(m, monkeypatch)
    for side in (None, 24):
        calls.clear()
        got = encode_prompts(m, items, PromptTemplate(), side)
        assert calls[0] == len(items) and all(enc is not None for enc in got), (calls, got)
        for item, enc in zip(items, got, strict=True):
            want = encode_prompt(m, item, render_prompt(m, item, PromptTemplate(), side))
            assert list(enc.batch) == list(want), item.id
            for k, v in want.items():
                assert enc.batch[k].dtype == v.dtype and torch.equal(enc.batch[k], v), (side, item.id, k)


def test_a_onevision_window_is_encoded_in_calls_of_at_most_call_items_prompts(load_tiny, monkeypatch):
    """LLaVA-OneVision's processor expands each image's placeholder by walking the call's batch_num_images from its
    start: its time grows with the square of the call's images, so a window goes to it in calls of at most
    MediaLayout.call_items prompts, each checked as a window was (its two ends alone). Each item still gets its own
    call's tensors; a last call of one prompt is that item's own call (build_inputs')."""
    from probe import prompting

    m = load_tiny("llava_onevision", "sdpa")
    size = prompting.MEDIA_ROWS[type(m.processor).__name__].call_items
    assert size == 32
    sizes = ((48, 40), (90, 30), (30, 30), (200, 130))
    items = [_window_item(i, (sizes[i % 4],) if i % 3 else ()) for i in range(2 * size + 1)]
    calls = _spy_calls(m, monkeypatch)
    got = prompting.encode_prompts(m, items, prompting.PromptTemplate())
    assert calls == [size, 1, 1, size, 1, 1], calls
    assert got[-1] is None
    _assert_own_calls(m, items[:-1], got[:-1])


@pytest.mark.parametrize("family", [f for f in NEW if FAMILIES[f].processor_class])
def test_batched_attribution_equals_one_item_path(family, loaded, video_item):
    """The attribution engine's right-padded batches of items (its choice on a GPU) give the one-item numbers."""
    from test_engines import assert_batched_attribution_equals_one_item

    m = loaded(family)
    items = items_for(m, video_item) + [make_item(item_id="validation_Test_2", seed=1, question="Which shape?"),
                                        make_item(n_options=3, with_image=False, item_id="validation_Test_3")]
    assert_batched_attribution_equals_one_item(m, items, [(0, 0), (0, 1), (m.geometry.n_layers - 1, 0)])


def test_table7_cpu_recipe_runs_as_written(tmp_path, dirs, monkeypatch):
    """The README's CPU recipe, line by line (runs/ → a tmp dir): Δavg of the VL and Omni models, the Eq. 4 merge
    transplanted into the Qwen2.5-VL and Omni carriers, and probe.eval of base, Omni, merge and the Omni carrier."""
    import re
    import shlex

    from analyses import merge, shift
    from probe import eval as probe_eval
    from probe.errors import cli_main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- table7:cpu -->\n```\n", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    mains = {"analyses.shift": shift.main, "analyses.merge": merge.main, "probe.eval": probe_eval.main}
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    for ln in lines:
        argv = shlex.split(re.sub(r"\bruns/", f"{tmp_path}/", ln))
        assert argv[:2] == ["python", "-m"] and argv[2] in mains, ln
        assert cli_main(mains[argv[2]], argv[3:]) == 0, ln
    rows = pd.read_csv(tmp_path / "t7" / "shift" / "shift.csv")
    assert set(rows["model"]) == {"tiny-qwen2.5-vl", "tiny-qwen2.5-omni"}
    assert (tmp_path / "t7" / "merged" / "carriers" / "tiny-qwen2.5-omni" / "config.json").is_file()
    scores = pd.read_csv(tmp_path / "t7" / "eval" / "scores.csv")
    allrows = scores[scores["subject"] == "all"].set_index(["model", "data"])
    omni_carrier = str(tmp_path / "t7" / "merged" / "carriers" / "tiny-qwen2.5-omni")
    text, image = "text", "image"
    assert allrows.loc[("tiny-qwen2.5", text), "n_items"] == 8
    assert allrows.loc[("tiny-qwen2.5", image), "n_items"] == 0  # a text LM on images: n/a, not 0 %
    assert allrows.loc[(omni_carrier, image), "n_items"] == 8
    assert not np.isnan(allrows.loc[("tiny-qwen2.5-omni", text), "diff_accuracy"])
    # The merged LM answers text items alike bare and inside the Omni thinker (M-RoPE on text = RoPE).
    items = pd.read_parquet(tmp_path / "t7" / "eval" / "items.parquet")
    bare = items[(items["model"] == str(tmp_path / "t7" / "merged")) & (items["data"] == text)]
    inside = items[(items["model"] == omni_carrier) & (items["data"] == text)]
    np.testing.assert_allclose(bare["p_answer"].to_numpy(), inside["p_answer"].to_numpy(), atol=1e-4)


def test_nested_text_config_with_class_defaults_only():
    """llava-1.5-7b-hf's config.json stores only the text config's non-default fields: geometry from LlamaConfig."""
    from probe.lm_config import HeadGeometry, text_config_dict

    published = {"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": 32064,
                                                        "max_position_embeddings": 4096}}
    g = HeadGeometry.from_text_config(text_config_dict(published, FAMILIES["llava"]))
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.hidden_size) == (32, 32, 32, 128, 4096)
    # one stating 16 heads and not the rest: Llama derives its key/value heads and head width from the heads and
    # the hidden size it is built with (the layout filled the default instance's 32 key/value heads of 128, and
    # refused 16 heads in 32 groups). Oracle: LlavaConfig's own text config
    from transformers import LlavaConfig

    sixteen = {"model_type": "llava", "text_config": {"model_type": "llama", "num_attention_heads": 16}}
    t = LlavaConfig(**{k: v for k, v in sixteen.items() if k != "model_type"}).text_config
    g = HeadGeometry.from_text_config(text_config_dict(sixteen, FAMILIES["llava"]))
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.hidden_size) == (
        t.num_hidden_layers, 16, t.num_key_value_heads, t.head_dim, t.hidden_size) == (32, 16, 16, 256, 4096)


def test_chat_formats_follow_the_row_and_the_lm():
    """Each family's turn markup (and BOS where its tokenizer has one); LLaVA-NeXT on Mistral uses its llava-hf
    template's [INST] with a <<SYS>> block."""
    from probe.lm_config import chat_format
    from probe.prompting import CHAT_FORMATS, PromptTemplate, render_chat

    item = make_item(with_image=False)
    t = PromptTemplate()
    mistral_next = {"model_type": "llava_next", "text_config": {"model_type": "mistral", "num_attention_heads": 32,
                                                                "hidden_size": 4096, "num_hidden_layers": 32}}
    assert chat_format(FAMILIES["llava_next"], mistral_next) == "llava_mistral"
    assert chat_format(FAMILIES["llava_next"], mistral_next | {"text_config": {"model_type": "llama"}}) == "vicuna"
    ends = {"chatml": "<|im_start|>assistant\n", "vicuna": " ASSISTANT:", "mistral": " [/INST]",
            "gemma": "<start_of_turn>model\n", "idefics3": "<end_of_utterance>\nAssistant:",
            "llava_mistral": " [/INST]", "qwen3_nothink": "<|im_start|>assistant\n<think>\n\n</think>\n\n"}
    for fam in FAMILIES.values():
        fmt = chat_format(fam, {})
        bos = CHAT_FORMATS[fmt].bos
        text = render_chat(t, item, "", fmt, "<s>" if bos else "")
        assert text.endswith(ends[fmt]) and t.system in text and "A. red\n" in text, fam.name
        assert text.startswith("<s>") == bos and bos == (fmt not in ("chatml", "qwen3_nothink")), fam.name
        assert set(fam.chat_fallbacks) | set(fam.chat_by_tokenizer) <= set(CHAT_FORMATS)


@pytest.mark.parametrize("family", NEW)
def test_layers_called_directly_reproduce_the_clean_pass(family, loaded, video_item):
    """probe/upstream.py on every new family: each recorded layer call, replayed, gives the next layer's input
    (plus what the model added between layers: DeepStack for Qwen3-VL, nothing elsewhere), and an engine-built
    cache holds exactly the prompt in every layer (sliding-window layers included)."""
    from probe.exact import clean_pass
    from probe.prompting import PromptTemplate, build_inputs
    from probe.upstream import call_layer, check_cache, prefix_cache

    m = loaded(family)
    clean = clean_pass(m, build_inputs(m, items_for(m, video_item)[-1], PromptTemplate()), keep_cache=True)
    n = m.geometry.n_layers
    for i in range(n - 1):
        out = call_layer(m.layers[i], clean.calls[i].hidden, clean.calls[i], None)
        if clean.injected[i] is not None:
            out = out + clean.injected[i]
        torch.testing.assert_close(out, clean.calls[i + 1].hidden, rtol=0, atol=1e-5)
    assert (clean.injected[0] is not None) == (family == "qwen3_vl")  # DeepStack at layer 0 of the tiny model
    check_cache(clean.cache, range(n), batch=1, length=clean.length)
    cache = prefix_cache(clean.cache, 1, batch=2)
    h = clean.calls[1].hidden.expand(2, -1, -1)
    for i in range(1, n):
        h = call_layer(m.layers[i], h, clean.calls[i], cache)
    check_cache(cache, range(n), batch=2, length=clean.length)


@pytest.fixture(scope="module")
def qwen25_trio(tmp_path_factory, dirs, omniprobe_cache):
    """Tiny Qwen2.5 base, a Qwen2.5 text fine-tune (other seed), and the tiny Qwen2.5-VL and Omni thinker (whose
    vocabulary has 7 more rows, as the real Omni's special tokens come after the base's)."""
    from probe.models import model_path
    from probe.tiny import TinySpec, build_tiny

    root = tmp_path_factory.mktemp("trio")
    ft = build_tiny("qwen2_5", root / "ft", TinySpec(num_hidden_layers=2, seed=1))
    return {"base": model_path("tiny-qwen2.5"), "ft": ft, "vl": dirs["qwen2_5_vl"],
            "omni": dirs["qwen2_5_omni_thinker"]}


@pytest.mark.parametrize("method", ["average", "weighted", "shift", "task_arithmetic", "ties", "salience"])
def test_every_merge_method_on_qwen2_5_with_vl_and_omni_carriers(method, qwen25_trio, tmp_path):
    """Issue 21's ask: merge Qwen2.5-7B, a text fine-tune, Qwen2.5-VL and the Omni thinker by every method, the
    merged LM transplanted into the VL and Omni carriers (each loads with its class and holds the merged LM);
    Eq. 1 and task arithmetic also against their formulas on the loaded tensors."""
    import transformers as tf

    from analyses import merge
    from probe import heads
    from probe.errors import cli_main
    from probe.models import load_model, resolve_model

    t = {k: str(v) for k, v in qwen25_trio.items()}
    models = [t["ft"], t["vl"], t["omni"]]
    argv = ["--base", t["base"], "--models", *models, "--method", method, "--carrier", t["vl"], t["omni"]]
    if method == "weighted":
        argv += ["--weights", "1", "2", "1"]
    if method == "salience":  # one probe.heads run per expert on its own modality
        runs = []
        for name, data in (("ft", "text"), ("vl", "image"), ("omni", "image")):
            runs.append(tmp_path / f"heads-{name}")
            assert cli_main(heads.main, ["--model", t[name], "--data", f"probe/zoo/data/{data}", "--limit", "2",
                                         "--no-generate", "--quiet", "--no-figures", "--out", str(runs[-1])]) == 0
        argv += ["--salience", *map(str, runs)]
    out = tmp_path / "merged"
    assert cli_main(merge.main, [*argv, "--out", str(out)]) == 0
    lm = tf.AutoModelForCausalLM.from_pretrained(out, **NO_HUB_KERNELS)
    got = {f"layers.{k}": v.detach() for k, v in lm.model.layers.state_dict().items()}
    got["norm.weight"] = lm.model.norm.weight.detach()
    rows = lm.model.embed_tokens.weight.shape[0]
    got["embed_tokens.weight"] = lm.model.embed_tokens.weight.detach()
    lms = {k: module_lm(load_model(resolve_model(t[k]))) for k in ("base", "ft", "vl", "omni")}
    common = min(v["embed_tokens.weight"].shape[0] for v in lms.values())
    assert rows == lms["base"]["embed_tokens.weight"].shape[0]
    for name in ("vl", "omni"):
        carrier = module_lm(load_model(resolve_model(str(out / "carriers" / Path(t[name]).name))))
        for k, v in got.items():
            torch.testing.assert_close(carrier[k][:common], v[:common], atol=1e-6, rtol=0)
    formula = {"average": lambda a, b, c, d: (b + c + d) / 3,
               "task_arithmetic": lambda a, b, c, d: a + (b - a) + (c - a) + (d - a)}.get(method)
    if formula is not None:
        for k, v in got.items():
            want = formula(*(lms[n][k][:common] for n in ("base", "ft", "vl", "omni")))
            torch.testing.assert_close(v[:common], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base, expert", [("qwen3", "qwen3_vl"), ("gemma3_text", "gemma3"), ("mistral", "llava_next")])
def test_text_base_and_its_vlm_shift_and_merge(base, expert, dirs, loaded, tmp_path):
    """A text LM and a VLM built on that LM type: Δavg per tensor, an Eq. 4 merge (α0 = 0.5, one expert) written as
    the base's class, transplanted into the VLM (vocabularies of different sizes: common rows merged, the carrier keeps the rest)."""
    import transformers as tf

    from analyses import merge, shift
    from probe.errors import cli_main
    from probe.models import load_model, resolve_model

    b, e = str(dirs[base]), str(dirs[expert])
    assert cli_main(shift.main, ["--base", b, "--models", e, "--out", str(tmp_path / "s"), "--no-figures"]) == 0
    lb, le = module_lm(loaded(base)), module_lm(loaded(expert))
    common = min(lb["embed_tokens.weight"].shape[0], le["embed_tokens.weight"].shape[0])
    for r in pd.read_csv(tmp_path / "s" / "shift.csv").itertuples():
        want = (lb[r.tensor][:common] - le[r.tensor][:common]).abs().mean()
        assert r.delta_avg == pytest.approx(float(want), rel=1e-5)
    out = tmp_path / "m"
    assert cli_main(merge.main, ["--base", b, "--models", e, "--method", "shift", "--shift", str(tmp_path / "s"),
                                 "--carrier", e, "--out", str(out)]) == 0
    lm = tf.AutoModelForCausalLM.from_pretrained(out, **NO_HUB_KERNELS)
    assert type(lm).__name__ == FAMILIES[base].model_class
    carrier = module_lm(load_model(resolve_model(str(out / "carriers" / Path(e).name))))
    merged = {f"layers.{k}": v.detach() for k, v in lm.model.layers.state_dict().items()}
    for k, v in merged.items():  # Eq. 4 with one expert: its softmax weight is 1, so θ = α0 θ_0 + (1 − α0) θ_1
        torch.testing.assert_close(v, 0.5 * lb[k] + 0.5 * le[k])
        torch.testing.assert_close(carrier[k], v)
    emb = carrier["embed_tokens.weight"]
    torch.testing.assert_close(emb[:common], lm.model.embed_tokens.weight.detach()[:common])
    assert torch.equal(emb[common:], le["embed_tokens.weight"][common:])  # the carrier's own extra rows


# The projector between each family's encoder and its LM, read off transformers' module definitions (the modules
# whose output the LM receives): param_groups gives them --projector-lr, never the tower's rate.
PROJECTORS = {
    "qwen2_5_vl": ("model.visual.merger.",),
    "qwen3_vl": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
    "qwen2_5_omni_thinker": ("model.visual.merger.", "model.audio_tower.proj."),
    "llava": ("model.multi_modal_projector.",),
    "llava_next": ("model.multi_modal_projector.", "model.image_newline"),
    "gemma3": ("model.multi_modal_projector.",),
    "idefics3": ("model.connector.",),
    "internvl": ("model.multi_modal_projector.",),
}


@pytest.mark.parametrize("family", sorted(PROJECTORS))
def test_projector_parameters_are_exactly_the_families_projector(family, loaded):
    from probe.train import is_lm_param, is_projector_param

    m = loaded(family)
    names = [n for n, _ in m.model.named_parameters()]
    want = {n for n in names if n.startswith(PROJECTORS[family])}
    assert want and {n for n in names if is_projector_param(n, m)} == want
    assert not any(is_lm_param(n, m) for n in want)


def test_modality_refusal_names_what_the_row_lacks():
    """An item is read by a model when its family row probes every modality the item has (Family.modalities,
    the README table's column); a refusal names the missing one and what the model does read. A video item given
    to LLaVA was refused as if LLaVA were 'text-only'."""
    from types import SimpleNamespace

    from probe.errors import BadInput
    from probe.prompting import can_read, check_modalities

    image = make_item()
    video = dataclasses.replace(make_item(with_image=False, item_id="validation_Test_9"), frames=(b"x",))
    for fam in FAMILIES.values():
        ref = SimpleNamespace(spec=f"m-{fam.name}", family=fam)
        for item, needs in ((image, "image"), (video, "video")):
            assert can_read(ref, item) == (needs in fam.modalities), (fam.name, needs)
            if needs in fam.modalities:
                check_modalities(ref, [item])
                continue
            with pytest.raises(BadInput) as exc:
                check_modalities(ref, [item])
            assert str(exc.value) == (f"item {item.id} has {needs} but m-{fam.name} ({fam.name}) reads "
                                      f"{' and '.join(fam.modalities)} only")


@pytest.mark.parametrize("family", NEW)
def test_every_row_fine_tunes_and_its_checkpoints_load_as_the_source(family, dirs, loaded, tmp_path):
    """analyses.finetune on every row (Qwen2.5-Omni's thinker stopped at its first step, and its checkpoints were
    the thinker alone, of a model_type no command read): a step trains, and checkpoint-0 loads through the probe's
    loader to the source's parameters, bit for bit, under the source's model_type."""
    from analyses.finetune import main
    from probe.errors import cli_main
    from probe.models import load_model, resolve_model
    from probe.zoo import validation_dir

    data = "image" if "image" in FAMILIES[family].modalities else "text"
    out = tmp_path / "run"
    assert cli_main(main, ["--model", str(dirs[family]), "--data", f"{data}={validation_dir(data)}", "--split",
                           "validation", "--steps", "1", "--batch-size", "2", "--limit", "2", "--lr", "1e-2",
                           "--lm-lr", "1e-2", "--device", "cpu", "--dtype", "float32", "--out", str(out),
                           "--quiet"]) == 0
    source = dict(loaded(family).model.named_parameters())
    for step in (0, 1):
        ck = out / f"checkpoint-{step}"
        assert json.loads((ck / "config.json").read_text())["model_type"] == \
            json.loads((dirs[family] / "config.json").read_text())["model_type"]
        params = dict(load_model(resolve_model(str(ck))).model.named_parameters())
        assert params.keys() == source.keys()
        moved = [n for n in params if not torch.equal(params[n], source[n])]
        assert (moved == []) == (step == 0), (step, moved[:3])


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft, in the oracle
@pytest.mark.parametrize("held", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ("qwen2", "qwen2_vl", "llava_onevision") + NEW)
def test_lora_checkpoint_is_pefts_own_merge_into_the_source(family, held, tmp_path):
    """A LoRA checkpoint is written tensor by tensor from the source's files (no merged float32 copy of the model
    in memory): loaded through the probe's loader it is, bit for bit, peft's own merge_and_unload of its adapter/
    into the source loaded in float32 — with the frozen weights held in float32 or in bfloat16, on every row
    (Qwen2.5-Omni's thinker: its talker and token2wav tensors kept beside it)."""
    from peft import PeftModel

    from analyses.finetune import add_lora, save_checkpoint
    from probe.models import load_model, resolve_model
    from probe.tiny import tiny_dir

    source = tiny_dir(family)
    ref = resolve_model(str(source))
    torch.manual_seed(0)
    trained = add_lora(load_model(ref, dtype=held, logits_fp32=False), 4)
    with torch.no_grad():  # B starts at 0: give every adapter an update to merge
        for name, p in trained.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    save_checkpoint(trained, source, tmp_path / "checkpoint-1", None)
    ck = tmp_path / "checkpoint-1"
    oracle = PeftModel.from_pretrained(load_model(ref).model, ck / "adapter").merge_and_unload()
    want = dict(oracle.named_parameters())
    got = dict(load_model(resolve_model(str(ck))).model.named_parameters())
    assert got.keys() == want.keys()
    assert all(p.dtype == torch.float32 for p in got.values())
    differ = [n for n in want if not torch.equal(got[n], want[n])]
    assert differ == [], differ[:3]
    base = dict(load_model(ref).model.named_parameters())
    moved = [n for n in want if not torch.equal(want[n], base[n])]
    assert len(moved) >= 7 and all(n.endswith("proj.weight") for n in moved), moved[:5]  # the merge did something
    assert json.loads((ck / "config.json").read_text())["model_type"] == \
        json.loads((source / "config.json").read_text())["model_type"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_ranks_build_the_model_rank_0_reads(family, dtype):
    """Under --fsdp only rank 0 reads the checkpoint; every other rank builds the model from its config on the meta
    device and receives rank 0's tensors into its shards by name. On every row that build has the loaded model's
    parameters and buffers — names, shapes, dtypes, ties (a tied head) — and attention implementation, and it
    holds no storage (probe.fsdp.structure, which every rank compares at run time as well). Which parameters train
    may differ (Qwen2-Audio's embed_positions: frozen in the build, not once loaded): probe.fsdp.shard takes rank
    0's (test_fsdp_trains_the_parameters_one_process_trains). With LoRA adapters added (--fsdp --lora) the two
    models still agree, trainable flags included: the adapters, on the meta device in the build."""
    from types import SimpleNamespace

    from analyses.finetune import add_lora
    from probe.fsdp import structure
    from probe.models import DTYPES, load_model, resolve_model, skeleton_of
    from probe.tiny import tiny_dir

    ref = resolve_model(str(tiny_dir(family)))
    built = skeleton_of(ref, DTYPES[dtype], "sdpa")
    read = load_model(ref, dtype=dtype, logits_fp32=False).model
    def named(s):  # without whether each parameter trains
        return [e[:4] if len(e) == 5 else e for e in s]

    assert named(structure(built)) == named(structure(read))
    assert all(t.is_meta for t in [*built.parameters(), *built.buffers()])
    assert len(structure(read)) > 10 and structure(read)[0] == ("attn", "sdpa")
    torch.manual_seed(0)
    built, read = (add_lora(SimpleNamespace(model=m, family=ref.family), 4).model for m in (built, read))
    assert structure(built) == structure(read)
    adapters = [p for n, p in built.named_parameters() if p.requires_grad]
    assert len(adapters) >= 14 and all(p.is_meta and p.dtype == torch.float32 for p in adapters)


@pytest.mark.parametrize("family", [f for f in ("qwen2_vl", "llava_onevision") + NEW
                                    if f not in ("qwen3", "mistral", "gemma3_text")])
def test_images_are_processed_by_the_pil_backend_where_torchvision_is_installed(family, monkeypatch):
    """transformers picks an image processor's torchvision backend whenever torchvision is importable (GPU boxes
    usually have it), and its resizing gives other pixel values than the PIL backend CI and the published numbers
    use. The probe asks for PIL: on a box where torchvision counts as installed, the backend transformers resolves
    for every multimodal row's processor is "pil" (it resolved "torchvision" for most rows before)."""
    import transformers.models.auto.image_processing_auto as auto

    from probe.models import load_processors, resolve_model
    from probe.tiny import tiny_dir

    resolved = []
    real = auto._resolve_backend
    monkeypatch.setattr(auto, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(auto, "_resolve_backend", lambda *a: resolved.append(real(*a)) or resolved[-1])
    _, processor = load_processors(resolve_model(str(tiny_dir(family))))
    assert processor is not None and resolved == ["pil"]
    assert real(None, None, "Qwen2VLImageProcessor") == "torchvision"  # what the patch makes of the default


def test_a_trained_answer_ends_with_the_chat_formats_turn_end():
    """Fine-tuning labelled every answer letter followed by ``<|im_end|>``, whatever the family: a Gemma, Mistral,
    Vicuna or Llama tokenizer reads that string as its unknown token (or nothing), so the model learned to end its
    answer on <unk>. The label is now the chat format's turn end (ChatML <|im_end|>, Gemma <end_of_turn>, Idefics3
    <end_of_utterance>; Vicuna and Mistral end with EOS), else EOS, else bad input."""
    from types import SimpleNamespace

    from probe.errors import BadInput
    from probe.prompting import turn_end_id

    class Tok:  # a tokenizer's token → id lookup: unknown strings map to the unk id, as sentencepiece ones do
        def __init__(self, vocab: dict[str, int], eos: str | None, unk: str | None = "<unk>"):
            self.vocab, self.eos_token, self.unk_token = vocab, eos, unk
            self.unk_token_id = vocab.get(unk) if unk else None

        def convert_tokens_to_ids(self, text: str) -> int | None:
            return self.vocab.get(text, self.unk_token_id)

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:  # a known token is one id
            return [self.convert_tokens_to_ids(text)]

    def end(family: str, vocab: dict[str, int], eos: str | None, config: dict | None = None) -> int:
        ref = SimpleNamespace(family=FAMILIES[family], config=config or {}, spec=family)
        return turn_end_id(SimpleNamespace(tokenizer=Tok({"<unk>": 0} | vocab, eos), family=FAMILIES[family], ref=ref))

    gemma = {"<eos>": 1, "<end_of_turn>": 106}
    assert end("gemma3", gemma, "<eos>") == 106  # was <|im_end|> → <unk> (0)
    assert end("mistral", {"</s>": 2}, "</s>") == 2
    assert end("llava", {"</s>": 2}, "</s>") == 2  # Vicuna's turn ends with EOS
    llama3 = {"<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009,
              "<|end_of_text|>": 128001}
    assert end("llava_next", llama3, "<|end_of_text|>") == 128009  # LLaVA-NeXT on Llama 3: its turn end, not EOS
    assert end("idefics3", {"<end_of_utterance>": 49279, "<|endoftext|>": 0}, "<|endoftext|>") == 49279
    assert end("qwen2", {"<|im_end|>": 151645, "<|endoftext|>": 151643}, "<|endoftext|>") == 151645
    assert end("gemma3", {"<eos>": 1}, "<eos>") == 1  # a vocabulary without the turn token: its EOS
    with pytest.raises(BadInput, match="neither"):
        end("gemma3", {}, None)


@pytest.mark.parametrize("family", NEW)
def test_training_rows_batch_as_they_run_alone(family, loaded):
    """Every token-aligned tensor of a training row (input ids, mask, Qwen2-VL's mm_token_type_ids, Gemma 3's
    token_type_ids) covers the prompt and the answer, and rows of different lengths batched together give the loss
    of each row run alone (the oracle). Gemma 3's token_type_ids were left a row short and unsqueezed: a batch of
    two prompt lengths crashed in collate, one row ran with type ids shorter than its tokens."""
    from probe.mmmu import load_items
    from probe.prompting import TOKEN_KEYS
    from probe.train import collate, encode, label_count, label_loss
    from probe.zoo import validation_dir

    m = loaded(family)
    data = "image" if "image" in FAMILIES[family].modalities else "text"
    items = load_items(str(validation_dir(data)), split="validation", limit=12)[0]
    rows = encode(m, items, with_answer=True)
    by_len = {int(r["input_ids"].shape[0]): r for r in rows}
    assert len(by_len) >= 2  # anti-tautology: rows of different lengths, so the batch pads
    rows = list(by_len.values())[:3]
    for r in rows:
        assert all(r[k].shape == r["input_ids"].shape for k in TOKEN_KEYS if k in r), {k: r[k].shape for k in r}
    n = label_count(rows)
    pad = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        batched = label_loss(m.model, collate(rows, pad), n)
        alone = sum(label_loss(m.model, collate([r], pad), n) for r in rows)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_training_rows_of_idefics3_end_on_end_of_utterance(loaded):
    """The tiny Idefics3's vocabulary has <end_of_utterance>, the turn end of its chat format: a training row's two
    label tokens are the answer letter and that token (they were the letter and <|im_end|>)."""
    from probe.prompting import letter_token_ids
    from probe.train import encode

    m = loaded("idefics3")
    item = make_item(with_image=False)
    [row] = encode(m, [item], with_answer=True)
    labels = row["labels"][row["labels"] != -100].tolist()
    assert labels == [letter_token_ids(m.tokenizer, [item.answer])[0],
                      m.tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    assert labels[1] != m.tokenizer.convert_tokens_to_ids("<|im_end|>")



@pytest.mark.parametrize("family", ["mistral", "qwen3"])  # a chat format that starts with the BOS, one without
def test_a_bos_added_despite_add_special_tokens_false_stops_the_run(family, loaded, monkeypatch):
    """The prompt builder writes the BOS its chat format starts with (none for Qwen) and tokenises with
    add_special_tokens=False; a release that added the tokenizer's BOS anyway would put one more at the front
    (every position one further on, numbers changed, exit 0). The special-token check counts exactly."""
    import copy

    from transformers import PreTrainedTokenizerBase

    from probe.prompting import CHAT_FORMATS, PromptTemplate, build_inputs, model_chat_format
    from probe.upstream import UpstreamChanged

    tok = copy.deepcopy(loaded(family).tokenizer)
    tok.bos_token = "<|endoftext|>"  # the tiny vocabularies have no BOS: lend them one of their special tokens
    m = dataclasses.replace(loaded(family), tokenizer=tok)
    bos, holds = tok.bos_token_id, int(CHAT_FORMATS[model_chat_format(m)].bos)
    item = make_item(with_image=False)
    assert build_inputs(m, item, PromptTemplate())["input_ids"][0].tolist().count(bos) == holds  # today
    real = PreTrainedTokenizerBase.__call__

    def adds_bos(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        for key in ("input_ids", "attention_mask"):
            out[key] = torch.cat([torch.full_like(out[key][:, :1], bos if key == "input_ids" else 1), out[key]], 1)
        return out

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", adds_bos)
    with pytest.raises(UpstreamChanged, match=rf"added the special token '<\|endoftext\|>' to the prompt "
                                              rf"\({holds + 1} as token {bos}, the text holds {holds};"):
        build_inputs(m, item, PromptTemplate())


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "mistral", "qwen3", "gemma3_text", "gemma2", "no-such-type"])
def test_a_head_layout_without_head_dim_takes_the_width_transformers_builds(model_type):
    """A text config that states no head_dim: the analyses' head layout (HeadGeometry) took hidden_size //
    num_attention_heads, while transformers' Qwen3 and Gemma 2/3 classes build 128- and 256-wide heads, so a
    checkpoint it loads was refused as heads of another width (probe.heads' o_proj check, the salience merge's). Now the width the config
    class builds (the oracle: AutoConfig.for_model's head_dim), the quotient where the class has none; the load's
    size check (config_head_dim) reads the same resolution."""
    from transformers import AutoConfig

    from probe.lm_config import HeadGeometry
    from probe.models import config_head_dim

    text = {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "num_key_value_heads": 2}
    try:
        built = AutoConfig.for_model(model_type, hidden_size=64, num_attention_heads=4).head_dim
    except (ValueError, AttributeError):  # no such model_type, or a class without head_dim (Qwen2)
        built = None
    want = built if isinstance(built, int) else 64 // 4
    assert HeadGeometry.from_text_config(text).head_dim == config_head_dim(text) == want
    assert want != 16 or model_type not in ("qwen3", "gemma3_text", "gemma2")  # the case that was wrong


def _composite_config(fam, text: dict) -> dict:
    """A config.json dict of composite family ``fam`` holding ``text`` as its text config (the Omni thinker's under
    thinker_config)."""
    cfg: dict = {"model_type": fam.model_types[0]}
    node = cfg
    *outer, last = fam.text_config_attr.split(".")
    for part in outer:
        node = node.setdefault(part, {})
    node[last] = text
    return cfg


def _built_attention(fam, cfg: dict):
    """transformers' own build of ``cfg`` (the oracle): (its text config, layer 0's attention on the meta device)."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.for_model(**cfg)
    if fam.config_path:  # the Omni thinker: its class is built from the thinker config
        config = getattr(config, fam.config_path)
    with torch.device("meta"):
        attn = getattr(transformers, fam.model_class)(config).get_submodule(fam.layers_path)[0].self_attn
    return config.get_text_config(decoder=True), attn


@pytest.mark.parametrize("model_type", [["qwen2"], {"type": "qwen2"}, "", 7, None])
@pytest.mark.parametrize("family", COMPOSITE)
def test_a_text_config_whose_model_type_is_no_name_is_read_as_transformers_builds_it_or_refused(family, model_type):
    """A damaged text config whose model_type is a list, an object, "" or a number was read as of no class (the
    attention heads in as many groups, hidden size ÷ heads wide, k/v rows not compared, a size left out refused as
    missing), a null one as absent (LLaVA's default Llama). transformers, the oracle, splits: a class whose text sub-config is its own (Qwen2-VL, Qwen2.5-VL,
    Qwen3-VL, Gemma 3, the Omni thinker) ignores the value and builds its text class; one that looks the type up
    (LLaVA, LLaVA-OneVision, InternVL, Idefics3, Qwen2-Audio) raises. The shared reader does the same: the built
    class's key/value heads and head width (meta-built k/q projections), its defaults for a size left out, or
    BadInput naming the key."""
    from probe.errors import BadInput
    from probe.lm_config import HeadGeometry, text_config_dict
    from probe.models import config_head_dim, config_kv_heads

    fam = FAMILIES[family]
    kind = {list: "a list", dict: "an object", str: "an empty string", int: "a number",
            type(None): "null"}[type(model_type)]
    for text in ({"model_type": model_type, "hidden_size": 256, "num_attention_heads": 32, "num_hidden_layers": 1},
                 {"model_type": model_type, "hidden_size": 256, "num_attention_heads": 32}):  # layers left out
        cfg = _composite_config(fam, text)
        try:
            built, attn = _built_attention(fam, cfg)
        except (TypeError, ValueError):
            with pytest.raises(BadInput, match=rf"^config {re.escape(fam.text_config_attr)}\.model_type is {kind}; "
                                               "it must be a model type name"):
                text_config_dict(cfg, fam)
            assert family in ("llava", "llava_next", "llava_onevision", "internvl", "idefics3", "qwen2_audio")
            continue
        ours = text_config_dict(cfg, fam)
        width = attn.q_proj.out_features // 32
        assert ours["model_type"] == type(built).model_type and ours["num_hidden_layers"] == built.num_hidden_layers
        assert (config_kv_heads(ours), config_head_dim(ours)) == (attn.k_proj.out_features // width, width)
        g = HeadGeometry.from_text_config(ours)
        assert (g.n_kv_heads, g.head_dim, g.n_layers) == (config_kv_heads(ours), width, built.num_hidden_layers)


def _text_config_not_nested(fam, how: str) -> dict:
    """A config.json dict of composite family ``fam`` whose LM sizes (256 wide, 32 heads, 2 layers; ``bare``: none)
    sit where its text config should (the top level, the Omni thinker's thinker_config) and whose text config is
    absent (``flat``, ``bare``), null, or the JSON text of an object (``string``)."""
    sizes = {"hidden_size": 256, "num_attention_heads": 32, "num_hidden_layers": 2, "num_key_value_heads": 8}
    cfg: dict = {"model_type": fam.model_types[0]}
    *outer, last = fam.text_config_attr.split(".")
    node = cfg
    for part in outer:
        node = node.setdefault(part, {})
    if how != "bare":
        node.update(sizes)
    if how in ("null", "string"):
        node[last] = None if how == "null" else json.dumps({"model_type": "qwen2", **sizes})
    return cfg


@pytest.mark.parametrize("how", ["flat", "bare", "null", "string"])
@pytest.mark.parametrize("family", COMPOSITE)
def test_a_text_config_absent_null_or_no_object_is_read_as_transformers_builds_it_or_refused(family, how):
    """A composite config.json of the family's own type without a text config (absent or null) and the LM sizes at
    its top level: Qwen2-VL's and Qwen2.5-VL's classes take them into their text config (their flat hub configs),
    the others ignore them and build their default text config (LLaVA's Llama 7B, LLaVA-OneVision's Qwen2 7B,
    Gemma 3's 26 layers of 2304, the Omni thinker's 28 of 3584). The shared reader took the top level for all of
    them (the analyses measured and merged an LM transformers never builds from that config.json, whose load the
    probe refused), and refused an Omni thinker without one as lacking sizes. A text config given as JSON text
    (a string) is refused by every class and was read as absent. Oracle: transformers' own build (layer count,
    heads, meta-built k/q projections, hidden width) or its refusal."""
    from probe.errors import BadInput
    from probe.lm_config import HeadGeometry, text_config_dict
    from probe.models import config_head_dim, config_kv_heads

    fam = FAMILIES[family]
    cfg = _text_config_not_nested(fam, how)
    try:
        built, attn = _built_attention(fam, cfg)
    except Exception:  # noqa: BLE001 - transformers' strict dataclass validation of a string sub-config
        assert how == "string"
        with pytest.raises(BadInput, match=rf"^config {re.escape(fam.text_config_attr)} is a string; it must be an "
                                           "object"):
            text_config_dict(cfg, fam)
        return
    ours = text_config_dict(cfg, fam)
    g = HeadGeometry.from_text_config(ours)
    width = attn.q_proj.out_features // built.num_attention_heads
    want = (built.num_hidden_layers, built.num_attention_heads, attn.k_proj.out_features // width, width,
            attn.q_proj.in_features)
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.hidden_size) == want, family
    assert (config_kv_heads(ours), config_head_dim(ours)) == want[2:4]
    assert ours.get("vocab_size", built.vocab_size) == built.vocab_size


@pytest.mark.parametrize("family, key", [(f, k) for f in FAMILIES for k in ("decoder", "generator", "text_config")
                                         if k != "text_config" or not FAMILIES[f].text_config_attr])
def test_a_second_text_config_key_is_refused_where_transformers_builds_no_model(family, key):
    """A "decoder", "generator" or (a causal LM's) "text_config" key beside the LM's own config: transformers'
    get_text_config takes it for the text config (a dict or a string, no config: an AttributeError) or finds two
    (a ValueError), and builds no model, so probe.eval's load ended in a traceback while the analyses read the LM as
    if the key were absent. Refused now, naming the key, where set on the config the class is built from (the Omni
    thinker's); null there, or set on the Omni's outer config, builds and is read as before. Oracle: transformers'
    model built on the meta device from the config, or its error."""
    from probe.errors import BadInput
    from probe.lm_config import HeadGeometry, text_config_dict

    fam = FAMILIES[family]
    text = {"hidden_size": 256, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 1}
    for value, level in (({"hidden_size": 64}, "own"), ("x", "own"), (None, "own"), ({"hidden_size": 64}, "outer")):
        cfg = _composite_config(fam, dict(text)) if fam.text_config_attr else {"model_type": family, **text}
        own = cfg[fam.config_path] if fam.config_path and level == "own" else cfg
        if level == "outer" and not fam.config_path:
            continue
        own[key] = value
        try:
            _built_attention(fam, cfg)
        except Exception:  # noqa: BLE001 - AttributeError, ValueError, or the strict dataclass validation's wrapper
            with pytest.raises(BadInput, match=rf"^config {re.escape(fam.config_path + '.' if own is not cfg else '')}"
                                               rf"{key} is set, which transformers' {fam.model_class} takes for its "
                                               "text config"):
                text_config_dict(cfg, fam)
            assert value is not None and level == "own"
            continue
        g = HeadGeometry.from_text_config(text_config_dict(cfg, fam))
        assert (g.n_heads, g.n_kv_heads, g.hidden_size) == (32, 8, 256)
        assert value is None or level == "outer"


@pytest.mark.parametrize("family", COMPOSITE)
def test_the_text_type_a_family_builds_whatever_is_stated_is_transformers(family):
    """Family.text_model_type (read without importing transformers) against transformers' own build: the class of a
    text config stating a type no class has is that type where the parent's class ignores what is stated; a class
    that looks the type up refuses it (None)."""
    from transformers import AutoConfig

    fam = FAMILIES[family]
    try:
        built = AutoConfig.for_model(**_composite_config(fam, {"model_type": "no-such-type"}))
    except (KeyError, ValueError):
        built = None
    else:
        for part in fam.text_config_attr.split("."):
            built = getattr(built, part)
    assert fam.text_model_type == (type(built).model_type if built is not None else None)


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "mistral", "qwen9", "not_a_model"])
@pytest.mark.parametrize("family", COMPOSITE)
def test_a_text_config_naming_a_type_its_class_ignores_is_read_as_the_class_it_builds(family, model_type):
    """A text config naming a type its parent's class does not build: Qwen2-VL's, Qwen2.5-VL's, Qwen3-VL's, Gemma 3's
    and the Omni thinker's classes build their own text class whatever it states (Qwen2-VL's text config saying
    "qwen2" is a qwen2_vl_text of 8 key/value heads, where Qwen2's class defaults to 32, which was read; "qwen9"
    too); the classes that look the type up (LLaVA, LLaVA-NeXT, LLaVA-OneVision, InternVL, Idefics3, Qwen2-Audio)
    build the one named, another class than their default (Mistral's 8 key/value heads inside a LLaVA-OneVision),
    and refuse a name transformers does not know (a ValueError), which was read as a text config of no class (the
    attention heads in as many groups, hidden size ÷ heads wide): BadInput naming the key and the value. Oracle:
    transformers' built text config and the meta-built k/q projections, or its refusal."""
    from probe.errors import BadInput
    from probe.lm_config import HeadGeometry, text_config_dict
    from probe.models import config_head_dim, config_kv_heads

    fam = FAMILIES[family]
    cfg = _composite_config(fam, {"model_type": model_type, "hidden_size": 256, "num_attention_heads": 32,
                                  "num_hidden_layers": 1})
    try:
        built, attn = _built_attention(fam, cfg)
    except ValueError:
        with pytest.raises(BadInput, match=rf"^config {re.escape(fam.text_config_attr)}\.model_type is "
                                           rf"'{model_type}', a model type transformers does not know: "
                                           rf"transformers' '{fam.model_types[0]}' config class builds no text"):
            text_config_dict(cfg, fam)
        assert fam.text_model_type is None and model_type in ("qwen9", "not_a_model")
        return
    ours = text_config_dict(cfg, fam)
    width = attn.q_proj.out_features // 32
    assert ours["model_type"] == type(built).model_type
    assert (config_kv_heads(ours), config_head_dim(ours)) == (attn.k_proj.out_features // width, width)
    g = HeadGeometry.from_text_config(ours)
    assert (g.n_kv_heads, g.head_dim) == (attn.k_proj.out_features // width, width)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava", "whisper", "t5", "clip_text_model", "gpt2", "bert",
                                        "eurobert", "embedding_gemma2_text", "qwen3_vl_text", "gemma3_text",
                                        *CAUSAL_LM])
@pytest.mark.parametrize("family", [f for f in COMPOSITE if not FAMILIES[f].text_model_type])
def test_a_text_type_transformers_builds_as_no_decoder_lm_at_the_layers_path_is_refused(family, model_type):
    """A class that looks the text type up (LLaVA, LLaVA-NeXT, LLaVA-OneVision, InternVL, Idefics3, Qwen2-Audio) builds
    whatever transformers knows by the name: a Qwen2-VL, a LLaVA, a Whisper, a T5 model in the LM's place, or no model
    at all (its class calls the text model's embed_tokens: an AttributeError). The analyses measured and merged such a
    checkpoint's tensors (exit 0), the probe ended in a traceback. Oracle: transformers' model built on the meta device
    from the config, and the decoder layers' o_proj, the final norm and lm_head at the family's paths (what the
    commands read), and, where it holds them, a forward of that LM (one tiny layer, random weights, CPU) whose
    outputs before the last token must not change with it: EuroBERT's and EmbeddingGemma's encoders have the
    decoder's layout but see the later tokens. BadInput naming the key and the value where it holds no causal
    decoder; the type as built where it does (Qwen3-VL's or Gemma 3's text model where the class builds it, and every
    causal LM a merged LM is written as, which the reader does not ask transformers about: held by every such
    family)."""
    import transformers
    from transformers import AutoConfig

    from probe.errors import BadInput
    from probe.lm_config import text_config_dict

    fam = FAMILIES[family]
    cfg = _composite_config(fam, {"model_type": model_type, "num_hidden_layers": 1})
    try:
        with torch.device("meta"):
            model = getattr(transformers, fam.model_class)(AutoConfig.for_model(**cfg))
        for path in (fam.norm_path, fam.lm_head_path):
            model.get_submodule(path)
        model.get_submodule(fam.layers_path)[0].get_submodule(fam.o_proj_path)
        tiny = AutoConfig.for_model(**_composite_config(fam, {
            "model_type": model_type, "num_hidden_layers": 1, "hidden_size": 256, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 64, "vocab_size": 64, "pad_token_id": 0}))
        torch.manual_seed(0)  # the class the family's model holds at the LM's path, alone (no vision tower)
        lm = type(model.get_submodule(fam.layers_path.rsplit(".", 1)[0]))(tiny.get_text_config(decoder=True)).eval()
        with torch.no_grad():
            a, b = (lm(input_ids=torch.tensor([[1, 2, 3, 4, last]])).last_hidden_state[0, :-1] for last in (5, 9))
        if not torch.allclose(a, b, atol=1e-5):
            raise AttributeError("no causal LM: the earlier positions see the last token")
    except (AttributeError, ValueError):
        assert model_type not in CAUSAL_LM
        with pytest.raises(BadInput, match=rf"^config text_config\.model_type is '{model_type}'(, not a decoder LM the "
                                           rf"family's layers path \({re.escape(fam.layers_path)}\) holds: "
                                           rf"transformers' {fam.model_class} builds|: transformers' '{family}' config "
                                           "class builds no text config)"):
            text_config_dict(cfg, fam)
        return
    assert text_config_dict(cfg, fam)["model_type"] == model_type


# text types whose layers are not all softmax attention (linear or lightning attention, Mamba, convolution,
# recurrence), as far as the installed transformers knows them (5.23.0 lacks some)
HYBRID = ("qwen3_next", "qwen3_5_text", "olmo_hybrid", "minimax", "kimi_linear", "bailing_hybrid", "lfm2",
          "granitemoehybrid", "jamba", "bamba", "nemotron_h", "falcon_h1", "zamba", "zamba2", "recurrent_gemma")
SOFTMAX_KINDS = ("full_attention", "sliding_attention", "chunked_attention", "attention")
# the keys that put attention at layer 0 where the class has no layer_types of its own to state
ATTENTION_FIRST = {"jamba": {"attn_layer_offset": 0, "attn_layer_period": 2}, "bamba": {"attn_layer_indices": [0, 2]},
                   "zamba": {"attn_layer_offset": 0, "attn_layer_period": 2},
                   "recurrent_gemma": {"block_types": ["attention", "recurrent"]},
                   "lfm2": {"layer_types": ["full_attention", "conv"] * 2}}
LOOKUP = tuple(f for f in COMPOSITE if not FAMILIES[f].text_model_type)


def _attention_first(model_type: str) -> dict | None:
    """Text config keys of ``model_type`` (4 layers) whose layer 0 is softmax attention and whose later layers are
    not all: the case a check of layer 0 alone let through. None where the class states no such pattern."""
    from transformers import AutoConfig

    if model_type in ATTENTION_FIRST:
        return ATTENTION_FIRST[model_type]
    try:
        kinds = AutoConfig.for_model(model_type).layer_types  # the class's default depth: its kinds of layer
    except Exception:  # noqa: BLE001 - a class whose default config does not build, or has no layer_types
        return None
    other = next((k for k in kinds or () if k not in SOFTMAX_KINDS), None)
    return {"layer_types": ["full_attention", other] * 2} if other else None


def _stated_kinds(config) -> list | None:
    """The kind of each layer transformers' text config states (the oracle; no model is read): layer_types,
    layers_block_type, block_types (cycled, RecurrentGemma), or Jamba's and Zamba's attention period and offset,
    Bamba's attention indices."""
    text = config.get_text_config(decoder=True)
    n = text.num_hidden_layers
    for key in ("layer_types", "layers_block_type", "block_types"):
        kinds = getattr(text, key, None)
        if isinstance(kinds, (list, tuple)) and kinds:
            return [kinds[i % len(kinds)] for i in range(n)]
    if getattr(text, "attn_layer_period", None):
        return ["attention" if i % text.attn_layer_period == text.attn_layer_offset else "mamba" for i in range(n)]
    if getattr(text, "attn_layer_indices", None) is not None:
        return ["attention" if i in text.attn_layer_indices else "mamba" for i in range(n)]
    return None


def _plain_heads(attn) -> bool:
    """Whether ``attn`` holds q/k/v/o_proj Linears with q_proj's output as wide as o_proj's input (the oracle's
    standard layout; no latent k/v, no gate folded into q_proj)."""
    from torch import nn

    projs = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return all(isinstance(m, nn.Linear) for m in projs) and projs[0].out_features == projs[3].in_features


@pytest.mark.parametrize("family, model_type, first", [
    *(("llava_next", t, first) for t in HYBRID for first in (False, True)),
    *((f, "minimax", True) for f in LOOKUP if f != "llava_next")])
def test_a_hybrid_text_type_is_refused_naming_its_first_layer_of_no_softmax_attention(family, model_type, first):
    """A hybrid text type (Qwen3-Next's gated delta layers, MiniMax's lightning attention, Jamba's Mamba, LFM2's
    convolutions) in a family that looks the text type up: the check built one layer and read layer 0 alone, so one
    whose layer 0 is attention (MiniMax's default, or layer_types stating it first) was accepted and the commands
    read its other layers as softmax heads (Kimi-Linear's and Bailing's delta attentions even hold an o_proj). Oracle:
    the layer kinds transformers' config states (layer_types, block types, attention period and offset): the line
    names the first layer that is no softmax attention, and its stated kind (or an earlier softmax layer whose heads
    are no q/k/v_proj rows: Qwen3-Next's gated, Kimi-Linear's latent attention); where transformers builds no such
    model, or no final norm at the family's path (Jamba's, Bamba's, LFM2's), the LM as a whole is refused."""
    import transformers
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from probe.errors import BadInput
    from probe.lm_config import text_config_dict

    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} does not know {model_type}")
    extra = _attention_first(model_type) if first else {}
    if extra is None:
        pytest.skip(f"{model_type} states no layer pattern to put attention first")
    fam = FAMILIES[family]
    cfg = _composite_config(fam, {"model_type": model_type, "num_hidden_layers": 4, **extra})
    with pytest.raises(BadInput, match=rf"^config text_config\.model_type is '{model_type}', not a decoder LM the "
                                       rf"family's layers path \({re.escape(fam.layers_path)}\) holds: transformers' "
                                       rf"{fam.model_class} builds ") as refused:
        text_config_dict(cfg, fam)
    line = str(refused.value)
    try:
        config = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = getattr(transformers, fam.model_class)(config)
        model.get_submodule(fam.norm_path)
    except (AttributeError, TypeError, ValueError, StrictDataclassError):  # strict configs: their own errors
        assert "builds no model with it" in line or "without the decoder layers'" in line, line
        return
    kinds, layers = _stated_kinds(config), model.get_submodule(fam.layers_path)
    assert kinds is not None and len(kinds) == len(layers) == 4
    other = next(i for i, k in enumerate(kinds) if k not in SOFTMAX_KINDS)
    assert not first or (kinds[0] in SOFTMAX_KINDS and other > 0)  # the case layer 0 alone let through
    # a softmax layer before it whose heads are no q/k/v_proj rows of o_proj's input width (Qwen3-Next's gated
    # q_proj twice as wide, Kimi-Linear's and Bailing's latent attention, no k_proj) is the one named
    odd = next((i for i in range(other) if not _plain_heads(layers[i].self_attn)), None)
    want = other if odd is None else odd
    assert f" builds layer {want} of the " in line, (kinds, line)
    assert odd is None or "not q/k/v_proj heads" in line, line
    if isinstance(getattr(config.get_text_config(decoder=True), "layer_types", None), list):
        assert f"as a {kinds[want]!r} layer, " in line


@pytest.mark.parametrize("nulls", [("head_dim",), ("num_key_value_heads",), ("head_dim", "num_key_value_heads")])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_null_head_dim_or_key_value_count_is_what_transformers_builds_from_it_or_refused(family, nulls):
    """A (text) config stating "head_dim": null or "num_key_value_heads": null was read as one leaving them out: the
    class's default or hidden ÷ heads, and the attention heads where its class refuses the null. transformers, the
    oracle, refuses some (Qwen3's, Mistral's and Gemma 3's strict configs; Qwen2's attention takes a null head_dim
    as its width: LLaVA-OneVision's, InternVL's, Qwen2-Audio's and the Omni thinker's Qwen2 LMs too) and builds
    others (Qwen2's null key/value heads are its attention heads, not its default 32; Qwen2-VL's attention ignores
    head_dim). The shared reader refuses the first, naming the key, and reads the second as the meta-built k/q
    projections."""
    from probe.errors import BadInput
    from probe.lm_config import HeadGeometry, text_config_dict
    from probe.models import config_head_dim, config_kv_heads

    fam = FAMILIES[family]
    text = {"hidden_size": 256, "num_attention_heads": 32, "num_hidden_layers": 1, **dict.fromkeys(nulls)}
    cfg = _composite_config(fam, text) if fam.text_config_attr else {"model_type": family, **text}
    try:
        _, attn = _built_attention(fam, cfg)
    except Exception:  # noqa: BLE001 - strict configs raise their own validation errors, Qwen2's attention a TypeError
        where = f"{fam.text_config_attr}." if fam.text_config_attr else ""
        with pytest.raises(BadInput, match=rf"^config {re.escape(where)}(head_dim|num_key_value_heads) is null, "
                                           "which transformers"):
            text_config_dict(cfg, fam)
        return
    ours = text_config_dict(cfg, fam)
    width = attn.q_proj.out_features // 32
    kv = attn.k_proj.out_features // width
    assert (config_kv_heads(ours), config_head_dim(ours)) == (kv, width), family
    g = HeadGeometry.from_text_config(ours)
    assert (g.n_heads, g.n_kv_heads, g.head_dim) == (32, kv, width)


@pytest.mark.parametrize("family, flat", [*((f, False) for f in FAMILIES), ("qwen2_vl", True), ("qwen2_5_vl", True)])
def test_a_stated_head_dim_other_than_hidden_over_heads_is_the_width_transformers_builds_or_refused(family, flat):
    """A (text) config stating head_dim 16 where hidden ÷ heads is 8 (Qwen3's and Gemma 3's explicit widths): most
    classes build 16-wide heads and run; Qwen2-VL's and Qwen2.5-VL's attention derives hidden ÷ heads and ignores it
    while their rotary embedding takes it, so no forward runs. The shared reader took the stated 16 for every class
    (their tensors refused as of the wrong shape, for a reason that is not the config's); it now reads the width
    transformers builds and refuses, naming the key, what it builds no running model from. Oracle: transformers'
    model on the meta device (q_proj rows ÷ heads, k_proj rows ÷ that width) and its LM's forward on meta tensors
    (M-RoPE sections that fit 16-wide heads); ``flat``: the sizes at the top level of a composite config (Qwen2-VL's
    flat hub configs, which its class takes into its text config)."""
    from probe.errors import BadInput
    from probe.lm_config import HeadGeometry, text_config_dict
    from probe.models import config_head_dim, config_kv_heads

    fam = FAMILIES[family]
    text = {"hidden_size": 256, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 16,
            "num_hidden_layers": 1, "vocab_size": 300}
    if family in MROPE:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]}
    cfg = ({"model_type": fam.model_types[0], **text} if not fam.text_config_attr or flat
           else _composite_config(fam, text))
    built, attn = _built_attention(fam, cfg)
    assert (built.hidden_size, built.num_attention_heads) == (256, 32)
    width = attn.q_proj.out_features // 32
    kv = attn.k_proj.out_features // width
    try:
        with torch.device("meta"):
            _built_lm(fam, cfg)(input_ids=torch.zeros(1, 5, dtype=torch.long))
    except RuntimeError:  # rotary tables of one width, heads of another
        where = f"{fam.text_config_attr}." if fam.text_config_attr and not flat else ""
        with pytest.raises(BadInput, match=rf"^config {re.escape(where)}head_dim is 16, which transformers' "
                                           rf"{fam.model_class} does not build: its attention's heads are "
                                           rf"{width} wide"):
            text_config_dict(cfg, fam)
        assert family in ("qwen2_vl", "qwen2_5_vl") and width == 8
        return
    ours = text_config_dict(cfg, fam)
    g = HeadGeometry.from_text_config(ours)
    assert (g.n_kv_heads, g.head_dim, config_kv_heads(ours), config_head_dim(ours)) == (kv, width, kv, width), family
    assert width == 16


@pytest.mark.parametrize("section", [[2, 1, 1], [4, 4, 4], [1, 1, 1]])
@pytest.mark.parametrize("family, key", [*((f, "rope_parameters") for f in MROPE), ("qwen2_vl", "rope_scaling"),
                                         ("qwen2_5_vl", "rope_scaling")])
def test_mrope_sections_transformers_runs_no_forward_with_are_refused(family, section, key):
    """M-RoPE sections that do not sum to half the head width (8-wide heads here: [2, 1, 1] fits): Qwen2-VL's,
    Qwen2.5-VL's and the Omni thinker's rotary embedding splits its tables by them and raises at the first forward
    (probe.eval's and probe.heads' traceback after the load); Qwen3-VL's interleaved sections (heads 128 wide by its
    class's default) run with any. Oracle: transformers' LM built on the meta device from the config, run on three
    tokens; the older rope_scaling spelling of the published Qwen2-VL and Qwen2.5-VL configs alike. The check
    (probe.lm_config.check_rotary_sections) runs in the LM size check, after the tensors fit the sizes."""
    from probe.errors import BadInput
    from probe.lm_config import check_rotary_sections

    fam = FAMILIES[family]
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": section}
    if key == "rope_scaling":
        rope = {"type": "mrope", "mrope_section": section}
    cfg = _composite_config(fam, {"hidden_size": 256, "num_attention_heads": 32, "num_key_value_heads": 8,
                                  "num_hidden_layers": 1, key: rope})
    try:
        with torch.device("meta"):
            _built_lm(fam, cfg)(input_ids=torch.zeros(1, 3, dtype=torch.long))
    except RuntimeError:
        want = f"config {fam.text_config_attr}.{key}.mrope_section is {section} (sum {sum(section)}), which"
        with pytest.raises(BadInput, match="^" + re.escape(want)):
            check_rotary_sections(cfg, fam)
        assert section != [2, 1, 1] and family != "qwen3_vl"
        return
    check_rotary_sections(cfg, fam)
    assert section == [2, 1, 1] or family == "qwen3_vl"


@pytest.mark.parametrize("heads", [2, 16])  # 128- and 16-wide heads of 256
@pytest.mark.parametrize("family, text_type", [*((f, None) for f in MROPE),
                                               *((f, t) for f in ("llava_next", "internvl", "llava_onevision", "llava")
                                                 for t in ("qwen2_vl_text", "qwen2_5_vl_text"))])
def test_mrope_sections_left_to_the_class_default_are_refused_where_they_do_not_fit_the_heads(family, text_type,
                                                                                                heads):
    """A text config stating no M-RoPE sections: Qwen2-VL's, Qwen2.5-VL's and the Omni thinker's rotary embedding
    then split by their class default [16, 24, 24], which fits 128-wide heads alone; a LLaVA-NeXT or InternVL around a
    qwen2_vl_text or qwen2_5_vl_text text model of 16-wide heads was accepted and probe.eval, probe.heads and finetune
    ended in a traceback at the first forward (the check read stated sections only). Oracle: transformers' LM built
    on the meta device from the config, run on three tokens; Qwen3-VL's interleaved sections run with any."""
    from probe.errors import BadInput
    from probe.lm_config import check_rotary_sections

    fam = FAMILIES[family]
    text = {"hidden_size": 256, "num_attention_heads": heads, "num_key_value_heads": 2, "num_hidden_layers": 1,
            "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
            **({"model_type": text_type} if text_type else {})}
    cfg = _composite_config(fam, text)
    try:
        with torch.device("meta"):
            _built_lm(fam, cfg)(input_ids=torch.zeros(1, 3, dtype=torch.long))
    except RuntimeError:
        want = (f"config {fam.text_config_attr}.rope_parameters.mrope_section is not stated, so its rotary embedding "
                "takes its class's default sections")
        with pytest.raises(BadInput, match="^" + re.escape(want) + r".*half the head width, 8$"):
            check_rotary_sections(cfg, fam)
        assert heads == 16 and family != "qwen3_vl"
        return
    check_rotary_sections(cfg, fam)
    assert heads == 2 or family == "qwen3_vl"


@pytest.mark.parametrize("text_type", ["qwen2_vl_text", "qwen2_5_vl_text"])
def test_a_llava_next_around_a_qwen2_vl_text_model_measures_what_its_qwen2_reading_does(dirs, tmp_path, capsys,
                                                                                         text_type):
    """A LLaVA-NeXT whose text model is Qwen2-VL's or Qwen2.5-VL's (128-wide heads, the class's default sections, random
    weights) was accepted but never run. LLaVA-NeXT gives its LM one row of positions, which their M-RoPE repeats for
    its three sections: plain RoPE. Oracle: the same weights and sizes with the text config written as Qwen2 (every
    value its class built, no sections): probe.eval's scores and probe.heads' per-head numbers must be the same.
    analyses.merge refuses it (no causal-LM class for its LM type), naming the checkpoint."""
    import shutil

    import pandas as pd
    import transformers
    from transformers import AutoConfig

    from conftest import REPO
    from probe import eval as probe_eval
    from probe import heads
    from probe.errors import cli_main

    if text_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} does not know {text_type}")
    model = shutil.copytree(dirs["llava_next"], tmp_path / "vl")
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    keep = ("intermediate_size", "vocab_size", "num_hidden_layers", "pad_token_id", "bos_token_id", "eos_token_id",
            "tie_word_embeddings", "max_position_embeddings")
    cfg["text_config"] = {**{k: cfg["text_config"][k] for k in keep if k in cfg["text_config"]},
                          "model_type": text_type, "hidden_size": 256, "num_attention_heads": 2,
                          "num_key_value_heads": 1}
    for f in [model / "config.json", *model.glob("*.safetensors")]:
        f.unlink()
    torch.manual_seed(0)
    transformers.LlavaNextForConditionalGeneration(AutoConfig.for_model(**cfg)).save_pretrained(model)
    as_qwen2 = shutil.copytree(model, tmp_path / "qwen2")
    text = AutoConfig.from_pretrained(model).text_config.to_dict()
    text["rope_parameters"].pop("mrope_section", None)
    saved = json.loads((as_qwen2 / "config.json").read_text(encoding="utf-8"))
    saved["text_config"] = {**{k: v for k, v in text.items() if k not in ("layer_types", "dtype")},
                            "model_type": "qwen2"}
    (as_qwen2 / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    data = str(REPO / "probe/zoo/data/image_single")
    tables = {}
    for m in (model, as_qwen2):
        for main, argv, table in ((probe_eval.main, ["--models", str(m)], "scores.csv"),
                                  (heads.main, ["--model", str(m)], "heads.csv")):
            out = tmp_path / f"{m.name}-{table}"
            assert cli_main(main, [*argv, "--data", data, "--limit", "2", "--quiet", "--out", str(out)]) == 0
            tables[m.name, table] = pd.read_csv(out / table)
    for table in ("scores.csv", "heads.csv"):
        ours, oracle = tables["vl", table], tables["qwen2", table]
        numbers = [c for c in ours.columns if ours[c].dtype.kind == "f"]
        assert len(ours) == len(oracle) > 0 and numbers
        np.testing.assert_allclose(ours[numbers].to_numpy(), oracle[numbers].to_numpy(), rtol=1e-5, atol=1e-6)
    assert len(tables["vl", "heads.csv"]) == 2 * 2  # 2 layers of 2 heads
    # its LM has no class a merged LM is written as (CAUSAL_LM): refused, in one line naming the checkpoint
    from analyses import merge

    capsys.readouterr()
    out = tmp_path / "merged"
    twin = shutil.copytree(model, tmp_path / "vl-twin")
    assert cli_main(merge.main, ["--method", "average", "--models", str(model), str(twin), "--out", str(out),
                                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(model) in err and f"LM model_type {text_type!r}" in err, err
    assert not out.exists()


@pytest.mark.parametrize("tie", ["absent", False, True])
@pytest.mark.parametrize("family", LOOKUP)
def test_a_qwen2_vl_text_model_is_read_where_transformers_builds_it_in_a_look_up_family(family, tie):
    """LLaVA's and LLaVA-OneVision's config classes read their text config's tie_word_embeddings, which Qwen2-VL's
    text class does not define: transformers builds a qwen2_vl_text text model there only where the text config states
    it (else an AttributeError); LLaVA-NeXT and InternVL build it either way. The reader asked transformers with the
    model_type alone and refused it everywhere in LLaVA and LLaVA-OneVision, a real checkpoint (save_pretrained
    states the key) included. Oracle: transformers' config class built from the same dict."""
    import transformers
    from transformers import AutoConfig

    from probe.errors import BadInput
    from probe.lm_config import text_config_dict

    fam = FAMILIES[family]
    text = {"model_type": "qwen2_vl_text", "hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
            "num_hidden_layers": 1, **({} if tie == "absent" else {"tie_word_embeddings": tie})}
    cfg = _composite_config(fam, text)
    try:
        built = AutoConfig.for_model(**cfg).get_text_config(decoder=True)
        with torch.device("meta"):
            getattr(transformers, fam.model_class)(AutoConfig.for_model(**cfg)).get_submodule(fam.layers_path)
    except (AttributeError, TypeError, ValueError):
        with pytest.raises(BadInput, match=r"^config text_config\.model_type is 'qwen2_vl_text': transformers' "
                                           rf"'{family}' config class builds no text config from it"):
            text_config_dict(cfg, fam)
        assert tie == "absent" and family in ("llava", "llava_onevision")
        return
    assert text_config_dict(cfg, fam)["model_type"] == type(built).model_type == "qwen2_vl_text"


def _built_lm(fam, cfg: dict):
    """The decoder stack (its parent module: embeddings, layers, norm) of transformers' build of ``cfg``, on the
    meta device."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.for_model(**cfg)
    if fam.config_path:
        config = getattr(config, fam.config_path)
    with torch.device("meta"):
        model = getattr(transformers, fam.model_class)(config)
    return model.get_submodule(fam.layers_path.rsplit(".", 1)[0])


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "mistral", "qwen3", "gemma3_text", "qwen2_vl", "llava",
                                        "no-such-type"])
def test_a_head_layout_without_num_key_value_heads_takes_the_count_transformers_builds(model_type):
    """A text config that states no num_key_value_heads (or states null): the head layout took the attention heads
    for every class and the size check compared no k/v rows, while transformers' classes build their own default
    (Mistral's and Qwen2-VL's 8, Gemma 3's 4 key/value heads of 32 attention heads). Oracle: the attention
    transformers builds from that config (on the meta device; its k_proj rows over one head's width, q_proj rows /
    heads). Where it builds none of these sizes (an unknown model_type, LLaVA's top-level sizes, which build its
    default Llama 7B) the layout keeps the attention heads and the size check (config_kv_heads, the same
    resolution) compares no k/v rows, as before: never stricter. A stated null: the shared reader's
    (test_a_null_head_dim_or_key_value_count_is_what_transformers_builds_from_it_or_refused)."""
    import transformers
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from probe.lm_config import HeadGeometry
    from probe.models import config_kv_heads

    stated = {"hidden_size": 256, "num_attention_heads": 32, "num_hidden_layers": 1}
    text = {"model_type": model_type, **stated}
    try:
        config = AutoConfig.for_model(model_type, **stated)
    except (ValueError, StrictDataclassError):  # no such model_type
        attn = None
    else:
        fam = FAMILIES[model_type]
        with torch.device("meta"):
            attn = getattr(transformers, fam.model_class)(config).get_submodule(fam.layers_path)[0].self_attn
    built = (attn.k_proj.out_features // (attn.q_proj.out_features // 32)
             if attn is not None and attn.q_proj.in_features == 256 else None)
    g = HeadGeometry.from_text_config(text)
    assert (g.n_kv_heads, config_kv_heads(text)) == (built or 32, built), (model_type, built)
    if model_type in ("mistral", "gemma3_text"):  # defaults not the heads: the layout took 32 for them
        assert built not in (None, 32)



@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"])
def test_a_nested_text_config_whose_model_type_is_null_is_of_its_parent_class_type(family):
    """A text config stating "model_type": null is built by transformers as one stating none (the parent class's
    text sub-config: Qwen2-VL's 8 key/value heads, Gemma 3's 4 heads of 256). The parent's type was filled in
    only where the key was absent, so a null one was read as of no class: the attention heads, hidden size ÷ heads
    (Gemma 3's 8-wide heads for transformers' 256), k/v rows not compared. Oracle: transformers' text config built
    from that config.json dict."""
    from transformers import AutoConfig

    from probe.lm_config import text_config_dict
    from probe.models import config_head_dim, config_kv_heads

    fam = FAMILIES[family]
    cfg = {"model_type": fam.model_types[0],
           fam.text_config_attr: {"model_type": None, "hidden_size": 256, "num_attention_heads": 32,
                                  "num_hidden_layers": 1}}
    built = AutoConfig.for_model(**cfg).get_text_config(decoder=True)
    width = getattr(built, "head_dim", None) or 256 // 32
    ours = text_config_dict(cfg, fam)
    assert (config_kv_heads(ours), config_head_dim(ours)) == (built.num_key_value_heads, width)
    assert (built.num_key_value_heads, width) != (32, 8) or family == "qwen3_vl"  # not the no-class reading


@pytest.mark.parametrize("heads", [32, 16, None])
@pytest.mark.parametrize("family", COMPOSITE)
def test_a_nested_text_config_without_model_type_takes_the_sizes_its_parent_class_builds(family, heads):
    """A composite config whose text config states no model_type, no num_key_value_heads and no head_dim (``None``:
    nor its hidden size and heads): transformers builds it with the parent class's text sub-config (Qwen2-VL's and
    Qwen2.5-VL's text 8 key/value heads, the Omni thinker's and Gemma 3's 4, Gemma 3's and Qwen3-VL's heads 256 and
    128 wide) or the default type it names (LLaVA's llama, LLaVA-OneVision's qwen2: 32 key/value heads). The head
    layout and the size check read such a text config as of no class: the attention heads, hidden size ÷ heads, k/v
    rows not compared, and the sizes it leaves out refused as missing. Oracle: the model transformers builds from
    that config.json dict (on the meta device; k_proj rows over one head's width, q_proj rows / heads); a count that
    does not split the heads (Qwen2's 32 of 16) is refused by the layout, naming the class, and compared by the size
    check."""
    import transformers
    from transformers import AutoConfig

    from probe.errors import BadInput
    from probe.lm_config import HeadGeometry, config_value, text_config_dict
    from probe.models import config_head_dim, config_kv_heads

    fam = FAMILIES[family]
    text: dict = {"num_hidden_layers": 1} | ({"hidden_size": 256, "num_attention_heads": heads} if heads else {})
    cfg: dict = {"model_type": fam.model_types[0]}
    node = cfg
    *outer, last = fam.text_config_attr.split(".")
    for part in outer:
        node = node.setdefault(part, {})
    node[last] = text
    config = AutoConfig.for_model(**cfg)
    if fam.config_path:  # the Omni thinker: its class is built from the thinker config
        config = getattr(config, fam.config_path)
    with torch.device("meta"):
        attn = getattr(transformers, fam.model_class)(config).get_submodule(fam.layers_path)[0].self_attn
    built = config_value(config.to_dict(), fam.text_config_attr.removeprefix(f"{fam.config_path}."))
    n_heads = built["num_attention_heads"]
    width = attn.q_proj.out_features // n_heads
    kv = attn.k_proj.out_features // width
    assert (attn.q_proj.in_features, n_heads) == ((256, heads) if heads else (attn.q_proj.in_features, n_heads))
    ours = text_config_dict(cfg, fam)
    assert (config_kv_heads(ours), config_head_dim(ours)) == (kv, width), (family, heads)
    if n_heads % kv:
        with pytest.raises(BadInput, match=rf"{n_heads} attention heads of {width} in {kv} key/value groups .*"
                                           rf"transformers' {built['model_type']} config class builds then"):
            HeadGeometry.from_text_config(ours)
        return
    g = HeadGeometry.from_text_config(ours)
    assert (g.n_heads, g.n_kv_heads, g.head_dim, g.hidden_size) == (n_heads, kv, width, attn.q_proj.in_features)


# text types whose attention passes as softmax (a scaling, an o_proj) but whose heads are no q/k/v_proj rows and o_proj
# columns of one width: the part the line names. MLA (DeepSeek V2/V3, MiniCPM3): a q_a/q_b or q_proj and a shared
# kv_a/kv_b, o_proj input heads × v_head_dim; gpt-oss' attention sinks; DiffLlama's lambdas; Phi-3's fused qkv_proj
NOT_QKV_HEADS = (("deepseek_v2", "kv_b_proj"), ("deepseek_v3", "kv_b_proj"), ("minicpm3", "kv_b_proj"),
                 ("gpt_oss", "sinks"), ("diffllama", "lambda_q1"), ("phi3", "qkv_proj"))


@pytest.mark.parametrize("model_type, part", NOT_QKV_HEADS)
@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_a_text_type_whose_attention_heads_are_not_q_k_v_rows_is_refused(family, model_type, part):
    """A class that looks the text type up builds a multi-head latent attention (DeepSeek V2/V3: no k_proj or v_proj,
    o_proj's input heads × v_head_dim, not hidden ÷ heads), attention sinks (gpt-oss: a per-head logit outside the
    projections), differential attention (DiffLlama) or a fused qkv_proj (Phi-3): it holds a scaling and an o_proj, so
    it passed, and probe.heads masked o_proj columns of the wrong width, the salience merge sliced q/k/v rows that do
    not exist, shift and merge measured the latent tensors as heads. Oracle: transformers' meta-built layer 0
    attention holds ``part`` and not the three q/k/v_proj Linears of the o_proj input's width (and, for MLA, the o_proj
    input is heads × v_head_dim, another width than hidden ÷ heads). BadInput naming the key, the value and the
    part."""
    from torch import nn

    from probe.errors import BadInput
    from probe.lm_config import text_config_dict

    fam = FAMILIES[family]
    # MLA: a head width other than hidden ÷ heads (DeepSeek V2's and MiniCPM3's defaults have it equal)
    mla = {"v_head_dim": 96} if part == "kv_b_proj" else {}
    cfg = _composite_config(fam, {"model_type": model_type, "num_hidden_layers": 2, **mla})
    config, attn = _built_attention(fam, cfg)
    parts = {**dict(attn.named_children()), **dict(attn.named_parameters(recurse=False))}
    assert part in parts
    qkv = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    assert part in ("sinks", "lambda_q1") or not all(isinstance(m, nn.Linear) for m in qkv)
    if part == "kv_b_proj":
        heads = config.num_attention_heads
        assert attn.o_proj.in_features == heads * 96 != config.hidden_size
    with pytest.raises(BadInput, match=rf"^config text_config\.model_type is '{model_type}', not a decoder LM the "
                                       rf"family's layers path \({re.escape(fam.layers_path)}\) holds: transformers' "
                                       rf"{fam.model_class} builds layer 0 .* self_attn is \w+ of [\w, ]*\b{part}\b"
                                       r"[\w, ]*, not q/k/v_proj heads"):
        text_config_dict(cfg, fam)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral", "qwen3_moe", "llama4_text", "qwen3_vl_text"])
def test_a_text_type_of_q_k_v_heads_and_moe_layers_is_read_as_its_attention(model_type):
    """MoE text types (Qwen2-MoE, Mixtral, Qwen3-MoE, Llama 4's) hold standard q/k/v_proj heads (Qwen3's per-head
    norms, Llama 4's weightless qk_norm): not refused by the heads check. Oracle: transformers' meta-built attention,
    its q_proj and k_proj widths against the head geometry read."""
    from probe.lm_config import HeadGeometry, text_config_dict

    fam = FAMILIES["llava_next"]
    cfg = _composite_config(fam, {"model_type": model_type, "num_hidden_layers": 2})
    config, attn = _built_attention(fam, cfg)
    g = HeadGeometry.from_text_config(text_config_dict(cfg, fam))
    assert (g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim) == (attn.q_proj.out_features, attn.k_proj.out_features)
    assert attn.o_proj.in_features == attn.q_proj.out_features


def test_a_processors_tokenizer_that_adds_a_bos_by_default_is_called_without_it(load_tiny):
    """The processor call asks for no special tokens (prompting.processor_kwargs: the chat format writes its own BOS,
    none for Qwen). The tiny tokenizers add none either way, so a mutant dropping add_special_tokens=False passed
    every test (mut48); a real Llama or Gemma tokenizer prepends its BOS by default. Here the tiny Qwen2-VL's
    tokenizer is given a post-processor that prepends <|endoftext|> as a BOS: the probe's ids must be the prompt's
    tokens alone. Oracle: the tokenizer called on the rendered text with add_special_tokens=False, and its default
    call giving one token more (anti-tautology)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from probe.prompting import PromptTemplate, build_inputs, render_prompt

    m = load_tiny("qwen2_vl", "sdpa")
    processor = copy.deepcopy(m.processor)
    tok = processor.tokenizer
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                              special_tokens=[("<|endoftext|>", bos)])
    m = dataclasses.replace(m, processor=processor, tokenizer=tok)
    item = make_item(with_image=False)
    text = render_prompt(m, item, PromptTemplate(), None).text
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert tok(text)["input_ids"] == [bos] + want
    assert build_inputs(m, item, PromptTemplate())["input_ids"][0].tolist() == want
