"""Model resolution (config only) and loading: aliases, bad dirs, head geometry, the o_proj width check."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES
from probe.errors import BadInput
from probe.families import ALIASES
from probe.lm_config import HeadGeometry
from probe.models import _check_geometry, given_size, resolve_model
from probe.tiny import TinySpec

SPEC = TinySpec()


def write_model_dir(path, config: dict, weights: bool = True):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if weights:
        save_file({"x": torch.zeros(2)}, str(path / "model.safetensors"))
    return path


def qwen2_config(**kw) -> dict:
    return {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3,
            "num_key_value_heads": 2} | kw


def test_unknown_alias_lists_known_ones():
    with pytest.raises(BadInput) as exc:
        resolve_model("qwen2-vl-7b-typo")
    msg = str(exc.value)
    assert "qwen2-vl-7b-typo" in msg
    for alias in ("qwen2", "qwen2-vl", "llava-ov-si", "tiny-qwen2-vl"):
        assert alias in msg
    assert "\n" not in msg


def test_dir_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(BadInput, match="config.json"):
        resolve_model(str(tmp_path))


def test_dir_without_weights(tmp_path):
    write_model_dir(tmp_path, qwen2_config(), weights=False)
    with pytest.raises(BadInput, match="weight"):
        resolve_model(str(tmp_path))


def test_config_without_model_type_or_unknown_type(tmp_path):
    write_model_dir(tmp_path / "a", {"hidden_size": 8})
    with pytest.raises(BadInput, match="model_type"):
        resolve_model(str(tmp_path / "a"))
    write_model_dir(tmp_path / "b", qwen2_config(model_type="mamba"))
    with pytest.raises(BadInput, match="mamba"):
        resolve_model(str(tmp_path / "b"))


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe{\x00"])  # a list, UTF-16: tracebacks before
def test_unreadable_config_json(tmp_path, raw):
    write_model_dir(tmp_path, qwen2_config())
    (tmp_path / "config.json").write_bytes(raw)
    with pytest.raises(BadInput, match="unreadable config.json"):
        resolve_model(str(tmp_path))


def test_corrupt_and_truncated_safetensors_found_at_resolve(tmp_path, tiny_dirs):
    src = tiny_dirs["qwen2"]
    good = (src / "model.safetensors").read_bytes()
    for name, data in (("garbage", bytes(range(256)) * 20), ("truncated", good[: len(good) // 2])):
        d = tmp_path / name
        shutil.copytree(src, d)
        (d / "model.safetensors").write_bytes(data)
        with pytest.raises(BadInput, match="model.safetensors"):
            resolve_model(str(d))


def test_head_dim_fallbacks(tmp_path):
    g = resolve_model(str(write_model_dir(tmp_path / "fallback", qwen2_config()))).geometry
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.hidden_size) == (3, 4, 2, 16, 64)
    g = resolve_model(str(write_model_dir(tmp_path / "explicit", qwen2_config(head_dim=32)))).geometry
    assert g.head_dim == 32  # explicit head_dim wins over hidden_size / heads
    # a null head_dim: Qwen2's attention takes it as its width and transformers builds no model (the oracle), so it
    # is refused by name, not read as hidden size ÷ heads (as until 2026-12-06)
    import transformers

    null = write_model_dir(tmp_path / "null", qwen2_config(head_dim=None))
    with pytest.raises(TypeError), torch.device("meta"):
        transformers.Qwen2ForCausalLM(transformers.AutoConfig.from_pretrained(null))
    with pytest.raises(BadInput, match=rf"^{null}: config head_dim is null, which transformers' Qwen2ForCausalLM "
                                       "builds no attention from"):
        resolve_model(str(null))
    # no GQA entry: the key/value heads the config class builds (class_kv_heads; oracle: transformers' own class):
    # Llama's are the attention heads; Qwen2's default 32 does not split 4 heads, which the layout took until
    # 2026-12-06 (transformers builds a k_proj of 32 heads, and refuses these tensors)
    from transformers import LlamaConfig, Qwen2Config

    for model_type, built in (("llama", LlamaConfig), ("qwen2", Qwen2Config)):
        cfg = qwen2_config(model_type=model_type)
        del cfg["num_key_value_heads"]
        kv = built(**{k: v for k, v in cfg.items() if k != "model_type"}).num_key_value_heads
        model = write_model_dir(tmp_path / f"mha-{model_type}", cfg)
        if 4 % kv == 0:
            assert resolve_model(str(model)).geometry.n_kv_heads == kv == 4
        else:
            with pytest.raises(BadInput, match=rf"^{model}: config: 4 attention heads of 16 in {kv} key/value groups "
                                               rf"is no head layout .*states no num_key_value_heads, and {kv} is "
                                               "what transformers' qwen2 config class builds then"):
                resolve_model(str(model))
    cfg = qwen2_config()
    del cfg["num_attention_heads"]
    with pytest.raises(BadInput, match="num_attention_heads"):
        resolve_model(str(write_model_dir(tmp_path / "noheads", cfg)))


def test_nested_text_config_of_multimodal_family(tmp_path):
    cfg = {"model_type": "qwen2_vl", "text_config": qwen2_config(num_hidden_layers=5, hidden_size=96,
                                                                 num_attention_heads=6)}
    g = resolve_model(str(write_model_dir(tmp_path, cfg))).geometry
    assert (g.n_layers, g.n_heads, g.head_dim) == (5, 6, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry_of_tiny_families(load_tiny, family):
    m = load_tiny(family)
    g = m.geometry
    want_head_dim = SPEC.hidden_size // SPEC.num_attention_heads
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.hidden_size) == (
        SPEC.num_hidden_layers, SPEC.num_attention_heads, SPEC.num_key_value_heads, want_head_dim, SPEC.hidden_size)
    # and the modules agree with the numbers
    assert len(m.layers) == g.n_layers
    attn = m.layers[0].self_attn
    assert attn.q_proj.out_features == g.n_heads * g.head_dim
    assert attn.k_proj.out_features == g.n_kv_heads * g.head_dim
    for layer in range(g.n_layers):
        o = m.o_proj(layer)
        assert isinstance(o, torch.nn.Linear) and o.in_features == g.n_heads * g.head_dim
        assert o.out_features == g.hidden_size
    # o_proj is the LLM decoder's, not the vision tower's
    names = {id(mod): name for name, mod in m.model.named_modules()}
    name = names[id(m.o_proj(g.n_layers - 1))]
    assert name.endswith(f"layers.{g.n_layers - 1}.self_attn.o_proj")
    assert "visual" not in name and "vision" not in name
    if family != "qwen2":
        assert "language_model" in name


# DESIGN §1's table of the paper's models: alias, checkpoint, transformers class (written out here, not read from
# probe.families). A mistyped hub id or family only showed when a GPU user's download failed or loaded another class.
PAPER_MODELS = [
    ("qwen2", "Qwen/Qwen2-7B-Instruct", "Qwen2ForCausalLM"),
    ("qwen2-vl", "Qwen/Qwen2-VL-7B-Instruct", "Qwen2VLForConditionalGeneration"),
    ("llava-ov-si", "llava-hf/llava-onevision-qwen2-7b-si-hf", "LlavaOnevisionForConditionalGeneration"),
    ("llava-video", "lmms-lab/LLaVA-Video-7B-Qwen2", "LlavaOnevisionForConditionalGeneration"),
    ("qwen2-audio", "Qwen/Qwen2-Audio-7B-Instruct", "Qwen2AudioForConditionalGeneration"),
    ("qwen2-72b", "Qwen/Qwen2-72B-Instruct", "Qwen2ForCausalLM"),
    ("qwen2-vl-72b", "Qwen/Qwen2-VL-72B-Instruct", "Qwen2VLForConditionalGeneration"),
]


@pytest.mark.parametrize("alias, checkpoint, model_class", PAPER_MODELS, ids=[a for a, _, _ in PAPER_MODELS])
def test_the_paper_model_aliases_are_design_s_table(alias, checkpoint, model_class):
    from probe.families import FAMILIES

    assert ALIASES[alias].source == checkpoint
    assert FAMILIES[ALIASES[alias].family].model_class == model_class


def test_alias_resolves_tiny_models(tiny_dirs):
    for alias, family in (("tiny-qwen2", "qwen2"), ("tiny-qwen2-vl", "qwen2_vl"), ("tiny-llava-ov",
                                                                                   "llava_onevision")):
        ref = resolve_model(alias)
        assert ALIASES[alias].family == ref.family.name == family
        assert ref.path == tiny_dirs[family]


def test_o_proj_width_check(load_tiny):
    m = load_tiny("qwen2")
    _check_geometry(m)  # the real geometry passes
    bad = dataclasses.replace(m.geometry, head_dim=8)
    wrong = dataclasses.replace(m, ref=dataclasses.replace(m.ref, geometry=bad))
    with pytest.raises(BadInput, match="o_proj takes 64 inputs"):
        _check_geometry(wrong)
    wrong_layers = dataclasses.replace(m, ref=dataclasses.replace(
        m.ref, geometry=dataclasses.replace(m.geometry, n_layers=5)))
    with pytest.raises(BadInput, match="5 layers"):
        _check_geometry(wrong_layers)


def test_load_model_bad_dtype(tiny_dirs):
    from probe.models import load_model

    with pytest.raises(BadInput, match="dtype"):
        load_model(resolve_model(str(tiny_dirs["qwen2"])), dtype="float8")


def test_a_context_length_stated_as_true_is_none():
    """A config's max_position_embeddings of JSON true was read as a context of 1 position (``isinstance(True,
    int)``): every item refused as past the positions the model was built for. Like every stated size
    (probe.errors.is_int), true is no size: not compared; a positive integer is the context itself."""
    import types

    from probe.families import FAMILIES
    from probe.models import LoadedModel

    def context(value):
        loaded = types.SimpleNamespace(ref=types.SimpleNamespace(config={"model_type": "qwen2",
                                                                         "max_position_embeddings": value}),
                                       family=FAMILIES["qwen2"])
        return LoadedModel.context_length.func(loaded)

    assert [context(v) for v in (4096, 1, True, False, 0, 4096.0, None)] == [4096, 1, None, None, None, None, None]


def test_head_geometry_from_text_config_is_int():
    """Counts are positive ints; anything else is bad input, as transformers' config classes refuse it (strict
    dataclasses: "4" is no int; 0 heads divides by zero), said before any weight loads."""
    g = HeadGeometry.from_text_config({"num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2,
                                       "head_dim": None, "num_key_value_heads": None})
    assert g == HeadGeometry(2, 4, 4, 16, 64) and all(type(v) is int for v in dataclasses.astuple(g))
    good = {"num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2}
    for key, value in (("num_attention_heads", "4"), ("num_attention_heads", 0), ("hidden_size", 4.0),
                       ("num_hidden_layers", -1), ("num_key_value_heads", 3), ("head_dim", True),
                       ("num_attention_heads", True)):  # JSON's true is 1 to isinstance(value, int)
        with pytest.raises(BadInput, match=key if key != "num_key_value_heads" else "key/value groups"):
            HeadGeometry.from_text_config(good | {key: value})
    with pytest.raises(BadInput, match="^config num_hidden_layers must be a positive integer, got True$"):
        HeadGeometry.from_text_config(good | {"num_hidden_layers": True})
    # a size the config states is compared only where it is an int (probe.errors.is_int): true is none
    assert [given_size({"hidden_size": v}, "hidden_size") for v in (64, True, [64, 64])] == [64, None, None]


def _fake_hub(monkeypatch, source: Path, snapshot: Path, calls: list):
    """A substituted huggingface_hub.snapshot_download serving ``source`` as the repo (no network)."""
    import fnmatch
    import shutil

    import huggingface_hub

    def download(repo_id, repo_type="model", allow_patterns=None, **kw):
        calls.append((repo_id, tuple(allow_patterns or ()), kw.get("local_files_only", False)))
        snapshot.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in allow_patterns or ["*"]):
                shutil.copy(f, snapshot / f.name)
        return str(snapshot)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)


def test_hub_alias_downloads_configs_first_then_weights_on_load(tiny_dirs, tmp_path, monkeypatch):
    from probe.hub import META_PATTERNS, WEIGHT_PATTERNS
    from probe.models import load_model

    calls: list = []
    snapshot = tmp_path / "snapshot"
    _fake_hub(monkeypatch, tiny_dirs["qwen2_vl"], snapshot, calls)
    ref = resolve_model("qwen2-vl")
    assert ref.hub_repo == "Qwen/Qwen2-VL-7B-Instruct" and ref.path == snapshot
    assert calls == [("Qwen/Qwen2-VL-7B-Instruct", META_PATTERNS, False)]  # validation reads configs only
    assert not list(snapshot.glob("*.safetensors"))
    loaded = load_model(ref)
    assert calls[-1] == ("Qwen/Qwen2-VL-7B-Instruct", WEIGHT_PATTERNS, False)
    assert loaded.geometry.n_layers == len(loaded.layers)


def test_hub_alias_offline_and_not_cached_says_so(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput, match=r"^Qwen/Qwen2-VL-7B-Instruct is not in the local Hugging Face cache and "
                                       r"HF_HUB_OFFLINE is set"):
        resolve_model("qwen2-vl")


def test_the_config_step_fetches_every_file_save_pretrained_writes_but_the_weights(tiny_dirs):
    """A hub model's first step (validation) fetches META_PATTERNS, the second adds the weights. Oracle: the files
    transformers' save_pretrained wrote for a tiny Qwen2-VL (config, generation config, tokenizer, processor, and
    transformers 5's chat_template.jinja); a pattern list without *.jinja left the chat template behind and passed
    every test (the fake hub served no template to miss)."""
    import fnmatch

    from probe.hub import META_PATTERNS, WEIGHT_PATTERNS

    written = [f.name for f in tiny_dirs["qwen2_vl"].iterdir() if f.is_file() and not f.name.startswith(".")]
    assert "chat_template.jinja" in written and "model.safetensors" in written
    for name in written:
        meta = any(fnmatch.fnmatch(name, p) for p in META_PATTERNS)
        assert meta != name.endswith(".safetensors"), name
        assert any(fnmatch.fnmatch(name, p) for p in WEIGHT_PATTERNS), name


def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(monkeypatch):
    """HF_HUB_OFFLINE as set now counts as huggingface_hub counts it (any case of its ENV_VARS_TRUE_VALUES:
    1, ON, YES, TRUE), unset it is huggingface_hub's own constant; offline, the snapshot is asked of the cache
    only. Oracle: huggingface_hub.constants (a mutant taking only "1", one ignoring the constant and one
    reaching the hub offline passed every test)."""
    import huggingface_hub
    from huggingface_hub import constants

    from probe.hub import hub_offline, hub_snapshot

    for value in sorted(constants.ENV_VARS_TRUE_VALUES):
        for spelt in (value, value.lower()):
            monkeypatch.setenv("HF_HUB_OFFLINE", spelt)
            assert hub_offline(), spelt
    for value in ("0", "false", "no", "off", ""):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert not hub_offline(), value
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for const in (True, False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", const)
        assert hub_offline() is const
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: calls.append(kw.get("local_files_only", False)) or "/nowhere")
    for value, cache_only in (("1", True), ("0", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        hub_snapshot("Org/Model")
        assert calls[-1] is cache_only


def test_hub_alias_download_error_is_bad_input(monkeypatch):
    import huggingface_hub

    def gated(*a, **k):
        raise PermissionError("401 Client Error: access to model is restricted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(BadInput, match="could not download Qwen/Qwen2-7B-Instruct .*PermissionError: 401"):
        resolve_model("qwen2")


@pytest.mark.parametrize("damage,needle", [
    ("drop", "model.layers.1.self_attn.o_proj.weight missing"),
    ("extra", "model.layers.9.mlp.up_proj.weight not in the model config.json describes"),
    ("deeper_config", "model.layers.4."),
    ("shape", "(shape (7, 128) in the file, (128, 128) by config.json)"),
])
def test_checkpoint_that_does_not_match_its_config_is_bad_input(tmp_path, damage, needle, capfd):
    """transformers fills missing (or wrongly shaped) tensors with random values, prints a report and runs: every
    number measured on it would be silently wrong. The load is refused with one line naming the first tensor."""
    from safetensors.torch import load_file, save_file

    from probe.models import load_model

    d = shutil.copytree(resolve_model("organism-base").path, tmp_path / "m")
    weights = d / "model.safetensors"
    sd = load_file(weights)
    if damage == "drop":
        del sd["model.layers.1.self_attn.o_proj.weight"]
    elif damage == "extra":
        sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    elif damage == "shape":
        sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:7]
    else:
        cfg = json.loads((d / "config.json").read_text())
        deeper = {"num_hidden_layers": 6, "layer_types": ["full_attention"] * 6}
        (d / "config.json").write_text(json.dumps(cfg | deeper))
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(BadInput, match="does not match its config.json") as exc:
        load_model(resolve_model(str(d)))
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' many-line report is not printed


def test_config_that_fails_its_own_validation_is_bad_input(tmp_path):
    """huggingface_hub validates configs (here: 6 layers but 4 layer_types) with its own exception type; the
    load names the reason in one line instead of a traceback. (An absurd count, past MAX_LAYERS, is refused before
    transformers builds the config: test_a_config_of_a_billion_layers_is_refused_at_once.)"""
    from probe.models import load_model

    d = shutil.copytree(resolve_model("organism-base").path, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 6}))
    with pytest.raises(BadInput, match=r"cannot load checkpoint .*`num_hidden_layers` \(6\) must be equal"):
        load_model(resolve_model(str(d)))


def _with_weight(src: Path, dest: Path, name_part: str, value: float) -> Path:
    """A copy of checkpoint ``src`` whose first tensor named like ``name_part`` has ``value`` at [0, 0]."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    f = dest / "model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if name_part in k)
    sd[key][0, 0] = value
    save_file(sd, f, metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("command", ["probe.eval", "probe.heads"])
def test_non_finite_weights_are_bad_input_before_anything_is_written(tmp_path, tiny_dirs, value, command, capsys):
    """A checkpoint with one NaN weight used to be evaluated at 0.0 % [0.0, 0.0] with exit 0 (NaN logits, every
    argmax 'A'). It is now refused when it loads: exit 2, the last stderr line names the tensor, nothing written,
    the checkpoint untouched. NaN runs each command as a real process (its exit code as a user sees it); Inf runs
    it in this process through cli_main (a process per case re-imported torch)."""
    import importlib
    import math
    import subprocess
    import sys

    from probe.errors import cli_main

    from conftest import REPO

    bad = _with_weight(tiny_dirs["qwen2"], tmp_path / "bad", "layers.1.mlp.down_proj", value)
    before = (bad / "model.safetensors").read_bytes()
    data = str(REPO / "probe" / "zoo" / "data" / "text")
    out = tmp_path / "out"
    args = (["--models", str(bad), "--data", data] if command == "probe.eval" else ["--model", str(bad), "--data", data]
            ) + ["--limit", "2", "--quiet", "--out", str(out)]
    if math.isnan(value):
        r = subprocess.run([sys.executable, "-m", command, *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        code, err = r.returncode, r.stderr
    else:
        capsys.readouterr()
        code = cli_main(importlib.import_module(command).main, args)
        err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"error: {bad}: non-finite weights (NaN or Inf) in model.layers.1.mlp.down_proj.weight: a damaged checkpoint")
    assert "Traceback" not in err and not out.exists()
    assert (bad / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_a_weight_stored_as_an_integer_is_a_damaged_checkpoint(tmp_path, tiny_dirs, dtype):
    """A norm weight re-saved as int8 (0.918 → 0, 1.016 → 1) loaded into the float model and was measured with exit
    0 by probe.heads, probe.eval and analyses.finetune (shift, merge and trajectory refused it). It is refused with
    the checkpoint's headers now, before anything loads; an integer buffer (position ids) still passes, and so does
    a checkpoint whose config says it is quantized."""
    from safetensors.torch import load_file, save_file

    from probe.lm_config import read_config_json
    from probe.models import check_weight_files

    d = shutil.copytree(tiny_dirs["qwen2"], tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    assert check_weight_files(d, read_config_json(d))
    sd["model.embed_positions.position_ids"] = torch.arange(8)[None]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    check_weight_files(d, read_config_json(d))  # an integer buffer: no weight
    sd["model.norm.weight"] = sd["model.norm.weight"].round().to(dtype)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInput, match=r"model.safetensors: tensor model.norm.weight is stored as (I8|I32|BOOL), not "
                                       r"a float dtype: a damaged checkpoint"):
        resolve_model(str(d))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"quantization_config": {"quant_method": "bitsandbytes"}}))
    check_weight_files(d, read_config_json(d))
    # declared in the LM's text_config, as analyses.checkpoints.check_not_quantized reads it too (one rule)
    (d / "config.json").write_text(json.dumps(cfg | {"text_config": {"quantization_config": {"quant_method": "gptq"}}}))
    check_weight_files(d, read_config_json(d))


def test_non_finite_parameters_names_them_and_never_overflows(tmp_path, tiny_dirs):
    from probe.models import NONFINITE_SHOWN, load_model, nonfinite_parameters

    loaded = load_model(resolve_model(str(tiny_dirs["qwen2"])))
    assert nonfinite_parameters(loaded.model) == []
    with torch.no_grad():
        p = loaded.model.model.norm.weight
        p.fill_(3e38)  # finite, but their fp32 sum is not: a float32 accumulator would call them broken
        assert nonfinite_parameters(loaded.model) == []
        p[1] = float("-inf")
        assert nonfinite_parameters(loaded.model) == ["model.norm.weight"]
        for q in list(loaded.model.parameters())[:5]:
            q.view(-1)[0] = float("nan")
        assert len(nonfinite_parameters(loaded.model)) == NONFINITE_SHOWN
    # a weight beyond float16's range becomes Inf when loaded in float16: refused, naming the dtype
    big = _with_weight(tiny_dirs["qwen2"], tmp_path / "big", "layers.0.mlp.up_proj", 1e6)
    assert load_model(resolve_model(str(big))).model is not None  # fine in float32
    with pytest.raises(BadInput, match=r"up_proj.weight: a damaged checkpoint, or values beyond float16's range"):
        load_model(resolve_model(str(big)), dtype="float16")


def test_an_overflow_in_the_forward_stops_the_run_naming_the_item():
    """Finite weights, non-finite log-probabilities (an activation overflowed in bf16/fp16): a RunStopped naming
    the item and the removed head, never a row computed from NaN."""
    from probe.errors import RunStopped
    from probe.mmmu import Item
    from probe.sweep import BASELINE, Measurement, measurement_row

    item = Item(id="v_1", subject="S", question="q", options=("a", "b"), answer="B", images=())
    good = torch.log_softmax(torch.tensor([0.0, 1.0]), -1)
    assert measurement_row(item, BASELINE, BASELINE, Measurement(good, "B"), good)["p_answer"] == pytest.approx(
        float(good[1].exp()))
    for bad in (torch.tensor([float("nan"), 0.0]), torch.tensor([float("-inf"), float("-inf")])):
        with pytest.raises(RunStopped, match=r"item v_1 with head 2\.3 removed: .* not finite .* --dtype float32"):
            measurement_row(item, 2, 3, Measurement(bad, None), good)
        with pytest.raises(RunStopped, match=r"^item v_1: "):
            measurement_row(item, BASELINE, BASELINE, Measurement(bad, None), bad)


@pytest.mark.parametrize("command", ["probe.eval", "probe.heads"])
def test_config_rejected_by_strict_validation_is_one_line_in_both_commands(tmp_path, command, capsys):
    """num_hidden_layers 3 with 4 layer_types: huggingface_hub's StrictDataclassClassValidationError used to escape
    from the tokenizer load (AutoTokenizer builds the config) as a 50-line traceback with exit 1. probe.eval runs
    as a real process (its exit code as a user sees it), probe.heads in this process through cli_main."""
    import subprocess
    import sys

    from probe.errors import cli_main
    from probe.heads import main

    from conftest import REPO

    d = shutil.copytree(resolve_model("organism-base").path, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    assert len(cfg["layer_types"]) == 4
    (d / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 3}))
    data, out = str(REPO / "probe" / "zoo" / "data" / "text"), tmp_path / "out"
    args = (["--models", str(d)] if command == "probe.eval" else ["--model", str(d), "--layers", "0", "--heads", "0"])
    args += ["--data", data, "--limit", "2", "--quiet", "--out", str(out)]
    if command == "probe.eval":
        r = subprocess.run([sys.executable, "-m", command, *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        code, err = r.returncode, r.stderr
    else:
        capsys.readouterr()
        code = cli_main(main, args)
        err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith(f"error: {d}/config.json is invalid: ")
    assert "`num_hidden_layers` (3) must be equal to the number of `layer_types` (4)" in lines[0]
    assert not out.exists()


def _sharded(src: Path, dest: Path, damage: str | None = None) -> tuple[Path, str, list[str]]:
    """``src`` saved as two safetensors shards with an index mapping each key to the shard it is in; then its first
    key (in shard 1 by the index) is also written with other values into shard 2 (``damage="copy"``) or moved
    there with the index unchanged (``damage="move"``)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    sd = load_file(src / "model.safetensors")
    keys = sorted(sd)
    halves = [{k: sd[k] for k in keys[: len(keys) // 2]}, {k: sd[k] for k in keys[len(keys) // 2:]}]
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    wmap = {k: names[i] for i, h in enumerate(halves) for k in h}
    key = keys[0]
    if damage == "copy":
        halves[1][key] = sd[key] + 1
    elif damage == "move":
        halves[1][key] = halves[0].pop(key)
    for h, n in zip(halves, names):
        save_file(h, dest / n, metadata={"format": "pt"})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return dest, key, names


def test_a_tensor_in_two_shards_or_in_a_shard_the_index_does_not_name_is_refused(tmp_path):
    """transformers loads the last shard's copy of a repeated key while analyses.shift reads the index's: the two
    measured different models without a word. Found from the headers when the model is resolved."""
    src = resolve_model("organism-base").path
    good, _, _ = _sharded(src, tmp_path / "good")
    resolve_model(str(good))  # a consistent sharded checkpoint resolves
    dup, key, names = _sharded(src, tmp_path / "dup", "copy")
    with pytest.raises(BadInput, match=rf"tensor {key} is in more than one shard \({names[0]}, {names[1]}; "
                                       rf"model.safetensors.index.json maps it to {names[0]}\)") as exc:
        resolve_model(str(dup))
    assert "\n" not in str(exc.value)
    moved, key, names = _sharded(src, tmp_path / "moved", "move")
    with pytest.raises(BadInput, match=rf"tensor {key} is in {names[1]}, but model.safetensors.index.json maps "
                                       rf"it to {names[0]}"):
        resolve_model(str(moved))


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused_by_the_probe_as_by_the_analyses(tmp_path):
    """An index.json that maps a tensor to a shard whose header does not hold it: the analyses refused it as a
    corrupt index, while the probe resolved and loaded it (transformers skips a name no module has), so one
    checkpoint was a model to one command and damaged to the other. Both refuse it now, in one line."""
    from analyses.checkpoints import open_checkpoint

    d, _, names = _sharded(resolve_model("organism-base").path, tmp_path / "phantom")
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.0.mlp.extra.weight"] = names[0]
    index.write_text(json.dumps(data))
    want = rf"model.layers.0.mlp.extra.weight.*{re.escape(names[0])}"
    with pytest.raises(BadInput, match=want) as exc:
        resolve_model(str(d))
    assert "\n" not in str(exc.value)
    with pytest.raises(BadInput, match=want):
        open_checkpoint(str(d)).close()

def test_bin_shards_are_checked_like_safetensors_by_the_probe_and_the_analyses(tmp_path):
    """The same damage in ``.bin`` shards: the probe reads each shard's pickle (no tensor data) and refuses it, and
    the analyses (--allow-bin) refuse it too instead of reading the index's copy while transformers runs the other."""
    from safetensors.torch import load_file

    from analyses.checkpoints import open_checkpoint

    src = resolve_model("organism-base").path
    for damage in (None, "copy", "move"):
        d, key, names = _sharded(src, tmp_path / f"st-{damage}", damage)
        b = tmp_path / f"bin-{damage}"
        shutil.copytree(d, b, ignore=shutil.ignore_patterns("*.safetensors*"))
        bins = [n.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for n in names]
        for n, bn in zip(names, bins):
            torch.save(load_file(d / n), b / bn)
        wmap = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        wmap = {k: bins[names.index(v)] for k, v in wmap.items()}
        (b / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
        for target in (d, b):
            if damage is None:
                resolve_model(str(target))
                with open_checkpoint(str(target), allow_bin=True) as ck:
                    assert key in ck.infos
                continue
            shards = names if target == d else bins
            index = "model.safetensors.index.json" if target == d else "pytorch_model.bin.index.json"
            want = (rf"tensor {key} is in more than one shard \({shards[0]}, {shards[1]}; {index} maps it to "
                    rf"{shards[0]}\)" if damage == "copy" else rf"tensor {key} is in {shards[1]}, but {index} maps it")
            with pytest.raises(BadInput, match=want):
                resolve_model(str(target))
            with pytest.raises(BadInput, match=want):
                open_checkpoint(str(target), allow_bin=True).close()


def test_an_index_is_read_once_per_load_by_the_probe_and_the_analyses(tmp_path, monkeypatch):
    """The probe's shard check and tie check, and the analyses' shard map and shard check, each parsed the same
    index.json (two readers of one file that could come to read it differently): one read a load now, counted at
    the file, and the loads still find every tensor where the index puts it."""
    from safetensors.torch import load_file

    from analyses.checkpoints import open_checkpoint

    d, _, names = _sharded(resolve_model("organism-base").path, tmp_path / "st")
    b = tmp_path / "bin"
    shutil.copytree(d, b, ignore=shutil.ignore_patterns("*.safetensors*"))
    wmap = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    bin_name = {n: n.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for n in names}
    for n in names:
        torch.save(load_file(d / n), b / bin_name[n])
    bin_wmap = {k: bin_name[v] for k, v in wmap.items()}
    (b / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": bin_wmap}))
    reads: list[str] = []
    read_text = Path.read_text

    def counted(self: Path, *args, **kwargs) -> str:
        reads.extend([self.name] if self.name.endswith(".index.json") else [])
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    for target, index, shards in ((d, "model.safetensors.index.json", wmap),
                                  (b, "pytorch_model.bin.index.json", bin_wmap)):
        reads.clear()
        resolve_model(str(target))
        assert reads == [index]
        reads.clear()
        with open_checkpoint(str(target), allow_bin=True) as ck:
            assert reads == [index]
            assert {k: info.file.name for k, info in ck.infos.items()} == shards


def test_a_vocab_size_the_weights_contradict_is_one_line_in_bin_and_safetensors_shards(tmp_path):
    """check_lm_sizes reads a .bin checkpoint's shapes from the pickles the shard check already read
    (``bin_shapes``): the same sharded model as safetensors and as .bin, its config.json's vocab_size 3 past the
    embedding's rows, is refused by the probe and the analyses with one line, the rows its weights hold (the
    oracle: the safetensors header) named."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from analyses.checkpoints import open_checkpoint

    src = resolve_model("organism-base").path
    d, _, names = _sharded(src, tmp_path / "st", None)
    b = tmp_path / "bin"
    shutil.copytree(d, b, ignore=shutil.ignore_patterns("*.safetensors*"))
    bins = [n.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for n in names]
    for n, bn in zip(names, bins):
        torch.save(load_file(d / n), b / bn)
    wmap = json.loads((d / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
    (b / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: bins[names.index(v)] for k, v in wmap.items()}}), encoding="utf-8")
    with safe_open(str(d / wmap["model.embed_tokens.weight"]), framework="pt") as fh:
        rows, width = fh.get_slice("model.embed_tokens.weight").get_shape()
    lines = []
    for target in (d, b):
        cfg = json.loads((target / "config.json").read_text(encoding="utf-8"))
        (target / "config.json").write_text(json.dumps(cfg | {"vocab_size": rows + 3}), encoding="utf-8")
        for read in (lambda: resolve_model(str(target)), lambda: open_checkpoint(str(target), allow_bin=True).close()):
            with pytest.raises(BadInput) as exc:
                read()
            lines.append(str(exc.value).replace(str(target), "MODEL"))
    assert len(set(lines)) == 1, lines
    assert f"(shape ({rows}, {width}) in the file, ({rows + 3}, {width}) by config.json)" in lines[0], lines[0]


def test_a_models_fingerprint_ignores_its_figures_and_merge_records(tmp_path):
    """A merged model's fingerprint hashed merge.json (its run time) and the figures drawn into its dir, so a
    redrawn figure or the same merge redone made every evaluation of it a different run, refused on resume.
    Loaded files still count: a changed config or weight file changes it."""
    import shutil

    from probe.models import local_fingerprint
    from probe.zoo import organism_dir

    d = tmp_path / "merged"
    shutil.copytree(organism_dir("base"), d)
    before = local_fingerprint(d)
    (d / "merge.json").write_text('{"seconds_total": 1.0}')
    (d / "merge_weights.csv").write_text("tensor,model,weight\n")
    for name in ("merge_heads.png", "merge_heads.pdf"):
        (d / name).write_bytes(b"figure")
    assert local_fingerprint(d) == before
    (d / "merge.json").write_text('{"seconds_total": 2.0}')
    assert local_fingerprint(d) == before
    cfg = (d / "config.json").read_text()
    (d / "config.json").write_text(cfg + " ")
    assert local_fingerprint(d) != before
    (d / "config.json").write_text(cfg)
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert local_fingerprint(d) != before


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_logits_are_the_fp32_product_of_the_heads_input_and_weights(tiny_dirs, family, dtype):
    """In bfloat16 the LM head rounded its logits to bfloat16 (up to 0.06 on logits of 10–30): on SmolLM2 that noise
    was most of a single head's KL (per-head KL vs fp32's, Spearman 0.22) and broke the exact/naive and batch guards.
    The logits are now the fp32 product of the head's half-precision input and weights (the direct formula here);
    fine-tuning (logits_fp32=False) keeps transformers' own head."""
    from probe.models import load_model

    ref = resolve_model(str(tiny_dirs[family]))
    loaded = load_model(ref, dtype=dtype)
    head = loaded.model.get_submodule(ref.family.lm_head_path)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        ids = torch.randint(0, head.weight.shape[0], (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits
    finally:
        handle.remove()
    want = seen[0].float() @ head.weight.float().T
    assert seen[0].dtype == getattr(torch, dtype) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    trained = load_model(ref, dtype=dtype, logits_fp32=False)
    assert trained.model(input_ids=ids).logits.dtype == getattr(torch, dtype)


@pytest.mark.parametrize("method", ["exact", "naive"])
def test_a_float16_overflow_in_the_head_sweep_is_named_as_one_not_as_an_upstream_change(tmp_path, tiny_dirs, capfd,
                                                                                         method):
    """Finite weights whose float16 forward overflows: the exact engine's check of its LM tail compared NaN logits
    and stopped with 'transformers …: logits are not its final norm and LM head … (max difference nan)', sending
    the user after an upstream change; both engines now stop naming the item and --dtype float32 (exit 1)."""
    from safetensors.torch import load_file, save_file

    from conftest import REPO
    from probe.errors import cli_main
    from probe.heads import main

    big = tmp_path / "big"
    shutil.copytree(tiny_dirs["qwen2"], big)
    sd = load_file(big / "model.safetensors")
    for part in ("layers.0.mlp.up_proj", "layers.0.mlp.down_proj"):  # finite in float16, their product is not
        key = next(k for k in sd if part in k)
        sd[key] = sd[key] / sd[key].abs().max() * 60000
    save_file(sd, big / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    args = ["--model", str(big), "--data", str(REPO / "probe" / "zoo" / "data" / "text"), "--limit", "1",
            "--layers", "1", "--heads", "0", "--no-generate", "--no-figures", "--quiet", "--method", method,
            "--out", str(out)]
    assert cli_main(main, args + ["--dtype", "float32"]) == 0  # the same model is fine in float32
    assert cli_main(main, args + ["--dtype", "float16", "--overwrite"]) == 1
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: item ") and "overflowed" in last and "--dtype float32" in last, last


@pytest.mark.parametrize("path", ["naive", "exact", "batch"])
def test_non_finite_logits_while_generating_stop_the_run_instead_of_scoring_the_text(load_tiny, item_factory, path):
    """Only the first position's option letters were checked for NaN: an overflow at a later generated token (bf16/
    fp16) left greedy decoding taking the argmax of NaN logits, and the text it spelled was scored as a wrong
    answer (accuracy 0, exit 0). Here the LM head gives NaN at every decoding step after the prompt."""
    from types import SimpleNamespace

    from probe.errors import RunStopped
    from probe.eval import DataSet, evaluate_pair
    from probe.sweep import SweepConfig, get_engine

    loaded = load_tiny("qwen2")
    items = [item_factory(with_image=False), item_factory(with_image=False, item_id="validation_Test_2",
                                                          question="Which one?")]
    cfg = SweepConfig(max_new_tokens=3)
    ds = DataSet("d", "d", "d", "", 2, 0, ["Test"])
    run = {"naive": lambda: get_engine("naive")(loaded, items[:1], [(1, 0)], cfg),
           "exact": lambda: get_engine("exact")(loaded, items[:1], [(1, 0)], cfg),
           "batch": lambda: evaluate_pair(loaded, "m", ds, items, cfg, 2, SimpleNamespace(update=lambda n: None))[0]
           }[path]
    rows = run()  # finite: the same run is measured, and generates past its first token
    assert all(len(loaded.tokenizer(r["response"])["input_ids"]) > 1 for r in rows), rows
    decoding = {"on": False}
    embed = loaded.model.get_input_embeddings()
    head = loaded.model.get_submodule(loaded.family.lm_head_path)
    hooks = [embed.register_forward_pre_hook(lambda m, args: decoding.update(on=args[0].shape[1] == 1)),
             head.register_forward_hook(lambda m, args, out: torch.full_like(out, float("nan")) if decoding["on"]
                                        else out)]
    try:
        with pytest.raises(RunStopped, match=r"item validation_Test_\d.*generated token 2 are not finite.*float32"):
            run()
    finally:
        for h in hooks:
            h.remove()


def test_a_config_transformers_cannot_build_is_read_tied_as_written(monkeypatch):
    """probe.models.ties_word_embeddings asks transformers (the class built on the meta device from the config) and
    falls back to ``probe.lm_config.says_tied`` when that build fails: tied where config.json says true, untied where
    it says false or nothing, even for Gemma 3, whose class ties by default (the skeleton's answer without the
    failure)."""
    import probe.dispatch
    import probe.models
    from probe.families import FAMILIES
    from probe.models import ties_word_embeddings

    gemma = FAMILIES["gemma3_text"]
    cfg = {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64, "vocab_size": 128}
    monkeypatch.setattr(probe.models, "_TIES", {})
    assert ties_word_embeddings(cfg, gemma) is True  # the class default, found by building it
    tried = []

    def refuse(*args, **kwargs):
        tried.append(args[0].__name__)
        raise ValueError("a config this transformers cannot build")

    monkeypatch.setattr(probe.dispatch, "meta_model", refuse)
    monkeypatch.setattr(probe.models, "_TIES", {})
    qwen = FAMILIES["qwen2"]
    for family, config, tied in ((qwen, qwen2_config(tie_word_embeddings=True), True),
                                 (qwen, qwen2_config(tie_word_embeddings=False), False),
                                 (qwen, qwen2_config(), False),
                                 (gemma, cfg | {"tie_word_embeddings": True}, True),
                                 (gemma, cfg, False)):
        assert ties_word_embeddings(config, family) is tied, (family.name, config)
    assert tried == ["Qwen2ForCausalLM"] * 3 + ["Gemma3ForCausalLM"] * 2  # each config tried once, then read


def test_same_values_compares_every_row_block_across_dtypes_and_slices(tmp_path):
    """probe.models.same_values, which the tie check reads lm_head and embed_tokens with ``TIE_CHECK_ROWS`` rows at
    a time: equal only when every block is (a difference in the last, partial block counts), values compared in the
    common dtype (bf16 stored vs float32 stored of the same numbers are equal), shapes first, 0-d tensors whole; the
    same answers on safetensors slices as on tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from probe.models import TIE_CHECK_ROWS, same_values

    rows = 2 * TIE_CHECK_ROWS + 5
    a = torch.randn(rows, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    last, first = a.clone(), a.clone()
    last[-1, 2] += 1
    first[0, 0] += 1
    tensors = {"a": a, "same": a.clone(), "wide": a.float(), "last": last, "first": first, "short": a[:-1].clone(),
               "flat": a.flatten().clone(), "s1": torch.tensor(1.5), "s2": torch.tensor(1.5, dtype=torch.float64),
               "s3": torch.tensor(2.5), "e0": torch.zeros(0, 3), "e1": torch.zeros(0, 3), "e2": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors")
    expect = {"same": True, "wide": True, "last": False, "first": False, "short": False, "flat": False}
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        for read in (tensors.__getitem__, f.get_slice):
            for other, equal in expect.items():
                assert same_values(read("a"), read(other)) is equal, other
                assert same_values(read(other), read("a")) is equal, other
            assert same_values(read("s1"), read("s2")) and not same_values(read("s1"), read("s3"))
            assert not same_values(read("s1"), read("a"))
            assert same_values(read("e0"), read("e1")) and not same_values(read("e0"), read("e2"))  # no rows to compare



def test_a_checkpoint_holding_its_vision_tower_in_two_layouts_is_refused(tiny_dirs, tmp_path):
    """A Qwen2-VL with its vision tower under visual. (as published) and again under model.visual. (as
    transformers 4 wrote it, other values): transformers loaded the model.visual. copy with an empty load report,
    so which tower ran could not be told (and the analyses would carry both). Refused when the model is resolved,
    before any load."""
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "two-towers")
    sd = load_file(d / "model.safetensors")
    sd |= {"model." + k: v + 1 for k, v in sd.items() if k.startswith("visual.")}
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInput, match=rf"^{re.escape(str(d))}: keys of two layouts.*model\.visual\..*"
                                       r"layout qwen2_vl_tf4") as exc:
        resolve_model(str(d))
    assert "\n" not in str(exc.value)

@pytest.mark.parametrize("equal", [False, True], ids=["head differs", "head equals the embedding"])
def test_a_tied_config_over_sharded_safetensors_is_checked_across_shards(tmp_path, equal):
    """probe.models.check_loaded_lm on a sharded checkpoint: lm_head and embed_tokens in different shards, found
    through the index's weight_map. Under a config tying them, an lm_head whose values differ from the embedding (the
    oracle: torch.equal of the two tensors as saved) is one BadInput naming the checkpoint and the head; the same
    values stored twice resolve."""
    from safetensors.torch import load_file, save_file

    src = resolve_model("organism-base").path
    d = tmp_path / "sharded-tied"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("model.safetensors"))
    sd = load_file(src / "model.safetensors")
    if equal:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]) is equal
    rest = sorted(k for k in sd if k not in ("lm_head.weight", "model.embed_tokens.weight"))
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards = [{"lm_head.weight": sd["lm_head.weight"]} | {k: sd[k] for k in rest[:10]},
              {"model.embed_tokens.weight": sd["model.embed_tokens.weight"]} | {k: sd[k] for k in rest[10:]}]
    for shard, name in zip(shards, names):
        save_file(shard, d / name, metadata={"format": "pt"})
    wmap = {k: name for shard, name in zip(shards, names) for k in shard}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": True}))
    if equal:
        assert resolve_model(str(d)).path == d
        return
    with pytest.raises(BadInput, match=rf"^{re.escape(str(d))}: config.json ties lm_head to embed_tokens.*"
                                       r"lm_head \(lm_head.weight\) that differs from the embedding "
                                       r"\(model.embed_tokens.weight\)"):
        resolve_model(str(d))


def test_same_values_sees_a_difference_in_any_row_of_a_block_and_compares_in_the_wider_dtype():
    """probe.models.same_values against torch.equal of the whole tensors (the oracle): one element changed at each
    row on both sides of a ``TIE_CHECK_ROWS`` block boundary (the last row of the first block, the first of the
    second), in the middle of a block, or in a last block of one row, is a difference; float64 values that float32
    cannot hold differ from their float32 rounding (compared in the common dtype, not squeezed into the narrower
    one)."""
    from probe.models import TIE_CHECK_ROWS, same_values

    a = torch.arange(3 * TIE_CHECK_ROWS * 2, dtype=torch.float32).reshape(-1, 2)
    rows = TIE_CHECK_ROWS
    for row in (rows - 1, rows, rows // 2, 2 * rows - 1, 3 * rows - 1):
        b = a.clone()
        b[row, 1] = -1.0
        assert not torch.equal(a, b)
        assert same_values(a, b) is False and same_values(b, a) is False, row
    assert same_values(a, a.clone()) is True
    one_over = torch.zeros(TIE_CHECK_ROWS + 1, 2)  # a last block of one row
    other = one_over.clone()
    other[-1, 0] = 1.0
    assert same_values(one_over, other) is False and same_values(other, one_over) is False
    fine = torch.full((TIE_CHECK_ROWS + 1, 2), 1 + 2.0 ** -40, dtype=torch.float64)
    rounded = fine.to(torch.float32)
    assert not torch.equal(fine, rounded.double())  # float32 cannot hold 1 + 2^-40
    assert same_values(rounded, fine) is False and same_values(fine, rounded) is False
    assert same_values(rounded, rounded.double()) is True


@pytest.mark.parametrize("equal", [False, True], ids=["head differs", "head equals the embedding"])
def test_the_tie_is_checked_in_a_layout_only_the_familys_class_reads(tiny_dirs, tmp_path, equal):
    """probe.models.check_loaded_lm on weights detect_layout knows no layout of: a Qwen2-VL checkpoint with its
    vision tower under ``model.visual.`` and its LM under ``model.layers.`` (neither the hub's layout nor
    transformers 4's), which transformers' key mapping loads whole. The check returned unchecked there, and a
    config tying lm_head to a differing embedding loaded with the file's head; now the two tensors are found by
    their names. Oracles: torch.equal of the saved tensors, and the weights the loaded model holds."""
    from safetensors.torch import load_file, save_file

    from probe.families import detect_layout
    from probe.models import load_model

    d = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "mixed-layout")
    sd = {("model." + k if k.startswith("visual.") else k): v for k, v in load_file(d / "model.safetensors").items()}
    if equal:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]) is equal
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInput, match="unknown checkpoint layout"):  # the branch under test
        detect_layout("qwen2_vl", sd)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)  # tied by its text_config alone, as Qwen2-VL's hub configs say
    (d / "config.json").write_text(json.dumps(cfg | {"text_config": cfg["text_config"] | {"tie_word_embeddings": True}}))
    if not equal:
        with pytest.raises(BadInput, match=rf"^{re.escape(str(d))}: config.json ties lm_head to embed_tokens.*"
                                           r"lm_head \(lm_head.weight\) that differs from the embedding "
                                           r"\(model.embed_tokens.weight\)"):
            resolve_model(str(d))
        return
    model = load_model(resolve_model(str(d)), dtype="float32", attn_implementation="eager").model
    held = model.state_dict()
    visual = next(k for k in sd if k.startswith("model.visual."))
    assert torch.equal(held[visual], sd[visual])  # a layout transformers reads whole
    assert torch.equal(model.get_output_embeddings().weight, sd["lm_head.weight"])


def test_a_tied_config_over_weights_without_the_embedding_leaves_the_head_unchecked(tmp_path):
    """probe.models.check_loaded_lm compares lm_head with embed_tokens only when the weights hold both: a tied
    config over weights holding an lm_head and no embedding has nothing to compare it with, and resolving it is no
    KeyError traceback from the tie check (the load itself reports the missing tensor)."""
    from safetensors.torch import load_file, save_file

    src = resolve_model("organism-base").path
    d = shutil.copytree(src, tmp_path / "no-embedding")
    sd = load_file(d / "model.safetensors")
    del sd["model.embed_tokens.weight"]
    assert "lm_head.weight" in sd
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": True}))
    assert resolve_model(str(d)).path == d


def test_the_tie_check_follows_the_class_a_config_builds_not_the_key_alone(tiny_dirs, tmp_path):
    """probe.models.check_tied_head on an lm_head that differs from the embedding, per config, against what
    transformers' classes themselves say (the oracle, read here from the classes, not from probe): Qwen2 with the key
    unset takes Qwen2Config's default (untied: no conflict); Gemma 3 with it unset takes Gemma3TextConfig's (tied: a
    conflict); Qwen2-Audio ties no weights at all (_tied_weights_keys None) even when its text_config says true;
    Qwen2-VL ties when only its text_config says so."""
    import transformers

    from probe.families import FAMILIES
    from probe.models import check_tied_head

    head, embed = torch.zeros(4, 2), torch.ones(4, 2)
    tensors = {"lm_head.weight": head, "model.embed_tokens.weight": embed}
    gemma = {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
             "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64, "vocab_size": 128}
    small = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
             "intermediate_size": 64, "vocab_size": 128}
    audio = {"model_type": "qwen2_audio", "text_config": {"model_type": "qwen2", **small, "tie_word_embeddings": True},
             "audio_config": {"model_type": "qwen2_audio_encoder", "encoder_layers": 1, "d_model": 32,
                              "encoder_attention_heads": 2, "encoder_ffn_dim": 32}}
    vl = json.loads((tiny_dirs["qwen2_vl"] / "config.json").read_text())
    vl.pop("tie_word_embeddings", None)
    vl["text_config"] = vl["text_config"] | {"tie_word_embeddings": True}
    assert transformers.Qwen2Config().tie_word_embeddings is False
    assert transformers.Gemma3TextConfig().tie_word_embeddings is True
    assert transformers.Qwen2AudioForConditionalGeneration._tied_weights_keys is None
    cases = [("qwen2", qwen2_config(), False), ("qwen2", qwen2_config(tie_word_embeddings=True), True),
             ("gemma3_text", gemma, True), ("gemma3_text", gemma | {"tie_word_embeddings": False}, False),
             ("qwen2_audio", audio, False), ("qwen2_vl", vl, True)]
    for family, config, conflict in cases:
        if conflict:
            with pytest.raises(BadInput, match="ties lm_head to embed_tokens"):
                check_tied_head(tmp_path, config, FAMILIES[family], "lm_head.weight", "model.embed_tokens.weight",
                                tensors.__getitem__)
        else:
            check_tied_head(tmp_path, config, FAMILIES[family], "lm_head.weight", "model.embed_tokens.weight",
                            tensors.__getitem__)
        # the same weights stored twice are never a conflict
        check_tied_head(tmp_path, config, FAMILIES[family], "lm_head.weight", "lm_head.weight", tensors.__getitem__)


TOWER_LAYERS = ("depth", "num_hidden_layers", "encoder_layers")  # a vision or audio config's number of layers


def towers_of_one_layer(nodes: dict, fam) -> None:
    """Each vision or audio config beside the text config its family's default with one layer, written into the
    config dict that holds the text config: what ties is the LM's embedding and head, and the default towers (up to
    32 layers each, the Omni thinker's two) were most of the time of every meta-device build of a composite model."""
    from transformers import AutoConfig, PretrainedConfig

    config = AutoConfig.for_model(**json.loads(json.dumps(nodes["top"])))
    parent, holder = (getattr(config, fam.config_path), nodes["thinker"]) if fam.config_path else (config, nodes["top"])
    for name in ("vision_config", "audio_config"):
        if isinstance(tower := getattr(parent, name, None), PretrainedConfig):
            holder[name] = tower.to_dict() | {k: 1 for k in TOWER_LAYERS if k in tower.to_dict()}


def test_loads_tied_is_the_tie_transformers_builds_wherever_the_key_is_set(tmp_path):
    """probe.models.loads_tied answered "untied" from config.json alone wherever it said false and nowhere true,
    while Gemma 3's and InternVL's classes ignore a text config's false and tie by their own default: a tied Gemma 3
    checkpoint (no lm_head) whose text config alone says false was refused by the analyses as lacking its lm_head,
    which transformers' load ties to the embedding. Oracle: the model transformers builds from each config on the
    meta device, its lm_head the embedding's own Parameter after tie_weights; every family, tie_word_embeddings
    unset, false or true at the top level, in the text config and (the Omni thinker) the thinker config."""
    import itertools

    import transformers
    from transformers import AutoConfig

    from analyses.checkpoints import open_checkpoint
    from probe.families import FAMILIES
    from probe.lm_config import transformers_errors_only
    from probe.models import loads_tied

    small = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1, "num_key_value_heads": 2,
             "intermediate_size": 64, "vocab_size": 128}
    wrong = []
    for name, fam in FAMILIES.items():
        levels = ("top", "text", "thinker")[:3 if fam.config_path else 2 if fam.text_config_attr else 1]
        for ties in itertools.product((None, False, True), repeat=len(levels)):
            nodes: dict = {"top": {"model_type": fam.model_types[0]}}
            if fam.text_config_attr:
                *outer, last = fam.text_config_attr.split(".")
                node = nodes["top"]
                for part in outer:
                    node = nodes["thinker"] = node.setdefault(part, {})
                node[last] = nodes["text"] = dict(small)
            else:
                nodes["top"].update(small)
            towers_of_one_layer(nodes, fam)
            for level, tie in zip(levels, ties):
                if tie is not None:
                    nodes[level]["tie_word_embeddings"] = tie
            config = AutoConfig.for_model(**json.loads(json.dumps(nodes["top"])))
            if fam.config_path:
                config = getattr(config, fam.config_path)
            with torch.device("meta"), transformers_errors_only():
                model = getattr(transformers, fam.model_class)(config)
                model.tie_weights()
            built = model.get_output_embeddings().weight is model.get_input_embeddings().weight
            if loads_tied(nodes["top"], fam) != built:
                wrong.append((name, ties, built))
    assert wrong == []
    # a tied Gemma 3 whose text config alone says false: transformers loads it tied, the analyses open it
    d = shutil.copytree(resolve_model("tiny-gemma3").path, tmp_path / "g")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg.pop("tie_word_embeddings", None)
    cfg["text_config"]["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with transformers_errors_only():
        m = transformers.Gemma3ForConditionalGeneration.from_pretrained(d)
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert open_checkpoint(str(d)).tied


def test_a_composite_config_transformers_cannot_build_is_tied_by_its_text_config(monkeypatch):
    """The fallback of probe.models.ties_word_embeddings (``probe.lm_config.says_tied``) reads tie_word_embeddings
    where transformers does for a composite model, its text_config too: a Qwen2-VL config tying there alone is tied,
    one setting it false there or nowhere is not."""
    import probe.dispatch
    import probe.models
    from probe.families import FAMILIES
    from probe.models import ties_word_embeddings

    def refuse(*args, **kwargs):
        raise ValueError("a config this transformers cannot build")

    monkeypatch.setattr(probe.dispatch, "meta_model", refuse)
    monkeypatch.setattr(probe.models, "_TIES", {})
    text = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    vl = FAMILIES["qwen2_vl"]
    for tie, tied in ((True, True), (False, False), (None, False)):
        sub = text if tie is None else text | {"tie_word_embeddings": tie}
        assert ties_word_embeddings({"model_type": "qwen2_vl", "text_config": sub}, vl) is tied, tie


def test_fingerprints_leave_out_locks(tmp_path):
    """A lock names the process that last held it ("PID HOST", written by every claim and by a redraw): were it in a
    model's or data set's fingerprint, drawing figures into a fine-tuned model's dir, or rerunning a conversion,
    would make every later sweep or evaluation of it "a different run". The fingerprint still follows a weight."""
    from probe.models import local_fingerprint
    from probe.results import LOCK, content_fingerprint, lock_path

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    before = local_fingerprint(model), content_fingerprint(tmp_path)
    (model / LOCK).write_text("123 host-a\n", encoding="utf-8")
    lock_path(model / "sub", beside=True).write_text("456 host-b\n", encoding="utf-8")
    assert (local_fingerprint(model), content_fingerprint(tmp_path)) == before
    (model / LOCK).write_text("789 host-c\n", encoding="utf-8")
    assert (local_fingerprint(model), content_fingerprint(tmp_path)) == before
    (model / "model.safetensors").write_bytes(b"\1" * 64)
    after = local_fingerprint(model), content_fingerprint(tmp_path)
    assert after[0] != before[0] and after[1] != before[1]


def test_a_head_layout_narrower_than_one_is_refused():
    """A config stating no head_dim whose hidden size is below its head count (4 over 8 heads) gives heads of width
    hidden // heads = 0: BadInput, as a stated head_dim of 0 is (a mutant checking head_dim < 0 took the layout and
    every per-head slice was empty). Oracle: the integer division written out."""
    from probe.lm_config import HeadGeometry

    cfg = {"num_attention_heads": 8, "hidden_size": 4, "num_hidden_layers": 2}
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 0
    with pytest.raises(BadInput, match="at least 1 wide"):
        HeadGeometry.from_text_config(cfg)


def test_a_models_processor_config_json_overrides_the_processor_settings_its_config_implies(tiny_dirs, tmp_path):
    """load_processors builds the processor with the family's keywords resolved against config.json
    (probe.lm_config.processor_kwargs) and lets processor_config.json, as a hub checkpoint ships it, override those
    keywords and only those (mut48: a mutant ignoring the file passed every family and zoo test, whose files hold
    what the config implies). Oracle: the values written into the file by hand, and the config's for a file without
    them."""
    from probe.models import load_processors

    model = shutil.copytree(tiny_dirs["llava_onevision"], tmp_path / "model")
    path = model / "processor_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    assert saved["vision_feature_select_strategy"] == config["vision_feature_select_strategy"] == "full"
    _, implied = load_processors(resolve_model(str(model)))
    assert (implied.num_image_tokens, implied.vision_feature_select_strategy) == (saved["num_image_tokens"], "full")
    edited = saved | {"num_image_tokens": saved["num_image_tokens"] + 3, "vision_feature_select_strategy": "default",
                      "not_a_keyword": 1}
    path.write_text(json.dumps(edited), encoding="utf-8")
    _, ours = load_processors(resolve_model(str(model)))
    assert (ours.num_image_tokens, ours.vision_feature_select_strategy) == (edited["num_image_tokens"], "default")
    assert not hasattr(ours, "not_a_keyword")


def test_the_processor_keywords_a_config_implies_are_the_hub_processors():
    """probe.lm_config.processor_kwargs against the processor_config.json of published checkpoints, written out:
    llava-hf/llava-1.5-7b-hf (CLIP: patch 14, one CLS token), a LLaVA on SigLIP (no CLS token: 0, which must still
    be passed, mut48: a mutant keeping only truthy values dropped it, and a processor_config.json could no longer
    set it), HuggingFaceTB/SmolVLM-256M-Instruct (512 px / 16 px patches, scale factor 4: image_seq_len 64),
    OpenGVLab/InternVL3-1B-hf (448 / 14, downsample 0.5: image_seq_length 256), google/gemma-3-4b-it (256)."""
    from probe.families import FAMILIES
    from probe.lm_config import processor_kwargs

    clip = {"model_type": "clip_vision_model", "patch_size": 14, "image_size": 336}
    siglip = {"model_type": "siglip_vision_model", "patch_size": 14, "image_size": 384}
    cases = [
        ("llava", {"vision_config": clip, "vision_feature_select_strategy": "default"},
         {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}),
        ("llava", {"vision_config": siglip, "vision_feature_select_strategy": "full"},
         {"patch_size": 14, "vision_feature_select_strategy": "full", "num_additional_image_tokens": 0}),
        ("idefics3", {"vision_config": {"patch_size": 16, "image_size": 512}, "scale_factor": 4}, {"image_seq_len": 64}),
        ("internvl", {"vision_config": {"patch_size": [14, 14], "image_size": [448, 448]}, "downsample_ratio": 0.5},
         {"image_seq_length": 256}),
        ("gemma3", {"mm_tokens_per_image": 256}, {"image_seq_length": 256}),
    ]
    for family, config, want in cases:
        assert processor_kwargs(FAMILIES[family], config) == want, family
