"""config.json read as transformers builds it, for one row of the family table (DESIGN §1, STYLE 2, 5).

The family table (probe/families.py) says where a family's text config sits; the readers here resolve what the
checkpoint's config.json states against it: the LM part (``text_config_dict``, nulls and absent keys as
transformers' config classes build them), the head layout (``HeadGeometry``, ``config_geometry``), the processor
keywords a row names, the chat format, the M-RoPE sections check and where ``tie_word_embeddings`` is read. They
import the table; the table imports none of them (no cycle: ``chat_format`` reads the text config, so it is here).
"""
from __future__ import annotations

import functools
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from probe.errors import BadInput, is_int
from probe.families import CAUSAL_LM, FAMILIES, Family


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
    if (bad := non_finite(config)) is not None:
        raise BadInput(f"{path}: {bad[0]} is {json.dumps(bad[1])}, which no setting of a model can be (nor is it a JSON number); "
                       "a damaged config.json")
    return config


def non_finite(value: Any, key: str = "") -> tuple[str, float] | None:
    """The first (dotted key, number) of a parsed JSON value that is NaN or infinite: Python's reader takes NaN,
    Infinity and 1e999, which JSON has no numbers for (an rms_norm_eps of NaN made every forward NaN, reported as an
    overflow of the run's dtype)."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if (hit := non_finite(v, f"{key}.{k}" if key else str(k))) is not None:
            return hit
    return None


def config_model_type(model_dir: Path, config: Mapping[str, Any]) -> str:
    """The config's ``model_type``: what the family and the checkpoint layout are read from (with the keys), so one
    without it is bad input for the probe and the analyses alike (matched against every layout, the keys alone had
    picked a family: a guess)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BadInput(f"{model_dir}/config.json has no model_type")
    return model_type


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
        layers[0]  # an empty or unindexable stack holds no decoder layer (each layer is looked at below)
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
    # the heads the commands read: q/k/v_proj rows and o_proj columns of one width per head (probe.heads masks o_proj
    # input columns of hidden ÷ heads or head_dim, the salience merge slices q/k/v rows); a latent attention (DeepSeek
    # V2/V3's kv_a/kv_b, o_proj input heads × v_head_dim), fused qkv_proj (Phi-3), attention sinks (gpt-oss' sinks),
    # differential (DiffLlama's lambdas) or gated heads hold other tensors, which were measured and merged as heads
    from torch import nn

    parts = dict(attn.named_children())
    projs = [parts.get(n) for n in (*_QKV, proj_name)]
    other = sorted(set(parts) - {*_QKV, proj_name, *_HEAD_NORMS}) + [n for n, _ in attn.named_parameters(recurse=False)]
    if other or not all(isinstance(m, nn.Linear) for m in projs) or projs[0].out_features != projs[3].in_features:
        held = ", ".join(other) or "projections of unequal widths"
        return f"{type(layer).__name__} whose {attn_name} is {type(attn).__name__} of {held}, not q/k/v_proj heads"
    return None


# the attention's parts besides the q/k/v projections that keep its heads the q/k/v rows and o_proj columns: per-head
# norms of Qwen3, Gemma 3, OLMo 2 (one head width, shared by every head), Llama 4's weightless one, a rotary module
_QKV = ("q_proj", "k_proj", "v_proj")
_HEAD_NORMS = ("q_norm", "k_norm", "qk_norm", "rotary_emb")


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
    sizes = {k: text[k] for k in ("head_dim", "num_key_value_heads") if is_int(text.get(k))}
    if isinstance(text.get("tie_word_embeddings"), bool):
        sizes["tie_word_embeddings"] = text["tie_word_embeddings"]
    error = _rotary_error(family.name, hidden, heads, json.dumps(sizes, sort_keys=True), key,
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
