"""Every call into transformers' internals that the exact engine relies on, in one place (STYLE: upstream calls).

The exact engine (probe/exact.py) calls decoder layers directly and builds KV caches by hand. Those are internal
APIs that change between monthly releases: transformers 5.24 renamed the decoder layer's cache keyword
(``past_key_values`` → ``cache``), so kwargs recorded from a clean pass suddenly carried the clean prompt cache
into the masked rows — a shape error with several rows, a silently wrong answer with one. What is version
sensitive lives here, is checked loudly (``UpstreamChanged`` names the API and this file), and is tested in
``tests/test_upstream.py`` against every release the project declares.

Checked against transformers 5.23.0, 5.24.0 and 5.25.0 (``TESTED_TRANSFORMERS``); the device a dispatched module runs on
is read from accelerate's hook (checked with accelerate 1.15 and 1.16). 5.25 kernelizes models by default;
probe/models.py loads with hub kernels off (NO_HUB_KERNELS).

Beyond the exact engine, what every engine reads from transformers is checked here too, wherever an upstream change
had given numbers with exit 0 when simulated: the prompt's special tokens (``check_special_tokens_read``), the
processor's outputs against the forward's parameters (``check_model_inputs``), plain greedy ``generate``
(``greedy_generate``, with raw first-step logits: ``check_first_step_raw``), the fp32 LM head (``head_must_run``), the
positions of hand-decoded tokens (``PositionWatch``), where each head reaches o_proj (``check_head_layout``, at every
load) and the length-dependent RoPE limit (``rope_position_limit``, against the config).
"""
from __future__ import annotations

import copy
import functools
import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from probe.errors import RunStopped

TESTED_TRANSFORMERS = ("5.23.0", "5.24.0", "5.25.0")
TESTED = {"transformers": TESTED_TRANSFORMERS, "peft": ("0.21.2",)}  # what the guards of each were checked on

# The names a decoder layer / model has used for its KV cache argument, newest first.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")
# Keyword arguments of a recorded layer call that belong to the clean pass only, never to masked rows.
_PASS_ONLY = frozenset(CACHE_KWARGS) | {"use_cache", "hidden_states"}


class UpstreamChanged(RunStopped):
    """An internal API of transformers (or peft, for ``--lora``) that the code calls no longer behaves as
    probe/upstream.py expects."""

    def __init__(self, what: str, naive_helps: bool = True, library: str = "transformers"):
        """``naive_helps``: the naive engine does not rely on the changed API (False for what every engine reads:
        the prompt's tokens, the model's inputs). ``library``: the one whose change it is, named with the releases
        this file was checked against (a peft change named transformers and advised another transformers)."""
        from importlib.metadata import version

        tested = TESTED[library]
        super().__init__(
            f"{library} {version(library)}: {what}. probe/upstream.py was checked against {', '.join(tested)}; "
            f"install one of those (pip install '{library}=={tested[-1]}')"
            + (" or use --method naive until it is updated" if naive_helps else "")
        )


def untested_warning() -> str | None:
    """One line for stderr when the installed transformers is not a release this file was checked against."""
    import transformers

    if transformers.__version__ in TESTED_TRANSFORMERS:
        return None
    return (f"warning: transformers {transformers.__version__} is not one of the releases probe/upstream.py was "
            f"checked against ({', '.join(TESTED_TRANSFORMERS)}); the exact engine's run-time guard stays on")


# GGUF headers parsed in this process: (path, file version) → load_gguf_checkpoint's metadata-only result
_GGUF_HEADERS: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
GGUF_HEADERS_KEPT = 4  # each holds a vocabulary (SmolLM2's: 49,152 tokens and their merges, a few MB)


def gguf_file_version(path: str) -> tuple[int, ...]:
    """What tells two versions of a file at one path apart without reading it: its device, inode, size and
    modification and change times (a file replaced, rewritten or touched is another version; ``cp -p`` keeps the
    mtime but not the inode or ctime; the kernel stamps ctime to its clock tick, a few ms)."""
    import os

    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def parse_gguf_headers_once() -> None:
    """Make transformers parse a GGUF file's header once per process and version of the file, not at every read.

    transformers (checked on 5.25) reads a GGUF's config with ``modeling_gguf_pytorch_utils.load_gguf_checkpoint(
    path, return_tensors=False)``, which parses the whole header with gguf's ``GGUFReader`` (SmolLM2-135M's ~100 MB
    file: 2-4 s of CPU on a 2-core host, mostly its vocabulary), and does so in ``AutoConfig.from_pretrained``, in
    ``AutoTokenizer.from_pretrained`` (for the config naming the tokenizer class) and in a model's
    ``from_pretrained``: a rerun of a finished sweep parsed it twice, of ``probe.eval`` three times, a fresh
    ``probe.eval`` seven (one of them the tensors' read), measured with a spy on ``GGUFReader``. Both callers import the function from its module when they call it, so the module's attribute is
    replaced by a wrapper (idempotent) that keeps the parsed result per (path, ``gguf_file_version``) and hands out
    deep copies (a caller may edit its dict); a call that reads tensors, or passes anything more, goes to the
    original. A release that imports it otherwise just parses as often as before."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    parse = gguf_utils.load_gguf_checkpoint
    if getattr(parse, "parses_once", False):
        return

    @functools.wraps(parse)
    def once(gguf_checkpoint_path: Any, return_tensors: bool = False, *args: Any, **kwargs: Any) -> Any:
        if return_tensors or args or any(v is not None for v in kwargs.values()):
            return parse(gguf_checkpoint_path, return_tensors, *args, **kwargs)
        path = str(gguf_checkpoint_path)
        try:
            key = (path, gguf_file_version(path))
        except OSError:  # not there: the parser's own error
            return parse(gguf_checkpoint_path, return_tensors)
        if key not in _GGUF_HEADERS:
            parsed = parse(path, return_tensors=False)
            while len(_GGUF_HEADERS) >= GGUF_HEADERS_KEPT:
                del _GGUF_HEADERS[next(iter(_GGUF_HEADERS))]  # the oldest first
            _GGUF_HEADERS[key] = parsed
        return copy.deepcopy(_GGUF_HEADERS[key])

    once.parses_once = True  # type: ignore[attr-defined]
    gguf_utils.load_gguf_checkpoint = once


@functools.lru_cache(maxsize=None)
def cache_kwarg(fn: Any) -> str:
    """The name under which ``fn`` (a decoder layer's or model's forward, best passed unbound: ``type(m).forward``)
    takes its KV cache. Cached: it is asked on every layer call and every decoded token."""
    params = inspect.signature(fn).parameters  # follows functools.wraps (deprecate_kwarg keeps the new name)
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise UpstreamChanged(f"{getattr(fn, '__qualname__', fn)} takes none of the cache keywords {CACHE_KWARGS}")


def _contains_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    if isinstance(value, Cache):
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains_cache(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_cache(v) for v in value.values())
    return False


@dataclass
class LayerCall:
    """What a decoder layer received in the clean pass: its input residual and the keywords that masked rows
    reuse (rotary embeddings, M-RoPE positions, causal mask) — never the clean pass's cache."""

    hidden: torch.Tensor  # [1, T, d]
    kwargs: dict[str, Any]


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors inside ``value`` (nested tuples, lists, dicts) moved to ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def record_layer_call(args: tuple, kwargs: dict[str, Any], device: torch.device | None = None) -> LayerCall:
    """Split a forward-pre-hook's (args, kwargs) of a decoder layer into a reusable LayerCall, its tensors on
    ``device`` (the layer's, when the model is spread: a pre-hook sees them before accelerate moves them)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise UpstreamChanged("a decoder layer was called without its hidden states as first argument")
    kept = {k: v for k, v in kwargs.items() if k not in _PASS_ONLY}
    leaked = sorted(k for k, v in kept.items() if _contains_cache(v))
    if leaked:  # a renamed cache keyword: reusing it would feed the clean cache to the masked rows
        raise UpstreamChanged(f"decoder layers now receive a KV cache under {leaked}, a name not in {CACHE_KWARGS}")
    if device is not None:
        hidden, kept = hidden.to(device), to_device(kept, device)
    return LayerCall(hidden, kept)


@functools.lru_cache(maxsize=None)
def _named_params(fn: Any) -> frozenset[str]:
    return frozenset(name for name, p in inspect.signature(fn).parameters.items()
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def check_model_inputs(model: nn.Module, batch: dict[str, Any]) -> None:
    """What the processor (or probe.video) built for an item is what the model's forward reads by name.

    Every value must be a tensor: probe.prompting.build_inputs moves tensors to the device and nothing else, so a
    value a release returned in another form (a list of per-image tensors) would be dropped and the model run
    without it. Every key must be a named parameter of the forward (checked with 5.23-5.25's Qwen2, Qwen2-VL and
    LLaVA-OneVision classes): a key it does not name disappears into its ``**kwargs``, and a forward without
    ``generate`` (--no-generate, the attribution engine) runs without the images — a renamed ``pixel_values`` gave
    numbers, exit 0."""
    odd = sorted(f"{k} ({type(v).__name__})" for k, v in batch.items() if not isinstance(v, torch.Tensor))
    if odd:
        raise UpstreamChanged(f"the processor returned {', '.join(odd)}, not tensors, which the model would not get",
                              naive_helps=False)
    while callable(getattr(model, "get_base_model", None)):  # a peft wrapper (--lora) passes **kwargs on to it
        model = model.get_base_model()
    unknown = sorted(set(batch) - _named_params(type(model).forward))
    if unknown:
        raise UpstreamChanged(f"{type(model).__name__}.forward takes no parameter named {', '.join(unknown)}: the "
                              "model would run without those inputs", naive_helps=False)


def check_special_tokens_read(tokenizer: Any, text: str, input_ids: torch.Tensor, specials: Iterable[str]) -> None:
    """Every special-token string of the prompt we render (chat markup, BOS; media placeholders, which processors
    expand, are left out by the caller) must come out of tokenisation as its own token id, exactly as often as the
    text holds it, and a BOS the text does not hold must not appear. A release that read special-token strings in
    text as plain text (a ``split_special_tokens`` default turned on, as some tokenizer libraries do against prompt
    injection) would give the model its chat markup in pieces: organism-base's numbers all changed, exit 0. One
    that added a BOS despite ``add_special_tokens=False`` would shift every position of the prompt."""
    rest, want = text, {}
    for s in sorted(specials, key=len, reverse=True):  # longest first: one special may hold another
        if s in rest:
            want[s] = rest.count(s)
            rest = rest.replace(s, "\0")
    bos = getattr(tokenizer, "bos_token", None)
    if bos and bos in set(specials) and bos not in want:
        want[bos] = 0
    if not want:
        return
    ids = input_ids.reshape(-1).tolist()
    for s, n in want.items():
        i = tokenizer.convert_tokens_to_ids(s)
        if ids.count(i) < n:
            raise UpstreamChanged(f"the tokenizer read the special token {s!r} of the prompt as plain text "
                                  f"({ids.count(i)} of its {n} occurrences became token {i})", naive_helps=False)
        if ids.count(i) > n:
            raise UpstreamChanged(f"tokenisation added the special token {s!r} to the prompt ({ids.count(i)} as "
                                  f"token {i}, the text holds {n}; add_special_tokens=False ignored?)",
                                  naive_helps=False)


def check_attn_implementation(model: nn.Module, layers_path: str, o_proj_path: str, asked: str) -> None:
    """Every decoder layer's attention runs the kernel it was loaded with: transformers picks the kernel at each call
    from the attention module's ``config._attn_implementation`` (5.23-5.25), and run.json records the one asked for
    beside the numbers (STYLE 10). A release that fell back to another kernel without a word (eager for sdpa, sdpa
    for flash-attention-2) would record one kernel and measure with another."""
    attn_path = o_proj_path.rpartition(".")[0]
    for i, layer in enumerate(model.get_submodule(layers_path)):
        attn = layer.get_submodule(attn_path) if attn_path else layer
        got = getattr(getattr(attn, "config", None), "_attn_implementation", None)
        if got != asked:
            raise UpstreamChanged(f"decoder layer {i}'s attention ({type(attn).__name__}) runs {got!r}, not the "
                                  f"{asked!r} the model was loaded with (config._attn_implementation)")


def check_head_layout(model: nn.Module, layers_path: str, o_proj_path: str, n_heads: int, n_kv_heads: int,
                      head_dim: int, input_ids: torch.Tensor) -> None:
    """Every head's output reaches o_proj where the engines mask it: query head h at input columns
    [h·head_dim, (h+1)·head_dim), computed from key/value head h // (n_heads / n_kv_heads) (5.23-5.25: the
    attention output reshaped head-major, ``repeat_kv``'s consecutive repeats). Checked on one forward of
    ``input_ids`` (one unpadded row of text): at its first position causal attention sees that position alone, so
    each head's output is its value vector, whatever the RoPE, norms or kernel; the v_proj output there is the
    independent oracle. A release that flattened the heads otherwise (dim-major, from a fused kernel) or grouped
    query heads with other value heads, its o_proj weights permuted to match at load, would compute the same
    clean logits while every mask removed other channels than the head named (simulated on the tiny Qwen2:
    masking head 1 of layer 0 moved the logits 0.19 from zeroing that head's o_proj columns, exit 0)."""
    attn_path, _, _ = o_proj_path.rpartition(".")
    v_path = f"{attn_path}.v_proj" if attn_path else "v_proj"
    layers = model.get_submodule(layers_path)
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def keep(key: tuple[str, int], x: Any) -> None:
        seen.setdefault(key, x[..., 0, :].detach().float().reshape(-1))  # the first position of the one row

    handles = []
    try:
        for i, layer in enumerate(layers):
            try:
                v_proj, o_proj = layer.get_submodule(v_path), layer.get_submodule(o_proj_path)
            except AttributeError:
                raise UpstreamChanged(f"decoder layer {i} has no {v_path} beside {o_proj_path}: which value heads "
                                      "reach which o_proj columns cannot be checked", naive_helps=False) from None
            handles.append(v_proj.register_forward_hook(lambda m, a, out, i=i: keep(("v", i), out)))
            handles.append(o_proj.register_forward_pre_hook(lambda m, a, kw, i=i: keep(("o", i), a[0] if a
                                                            else kw["input"]), with_kwargs=True))
        with torch.no_grad():
            model(input_ids=input_ids, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    group = n_heads // n_kv_heads
    for i in range(len(layers)):
        v, o = seen.get(("v", i)), seen.get(("o", i))
        if v is None or o is None:
            raise UpstreamChanged(f"decoder layer {i}'s {v_path} or {o_proj_path} did not run as a module in the "
                                  "forward: which heads reach which o_proj columns cannot be checked",
                                  naive_helps=False)
        if v.numel() != n_kv_heads * head_dim or o.numel() != n_heads * head_dim:
            raise UpstreamChanged(f"decoder layer {i}'s {v_path} gave {v.numel()} values and its {o_proj_path} took "
                                  f"{o.numel()} inputs a position, not {n_kv_heads}×{head_dim} and {n_heads}×"
                                  f"{head_dim}", naive_helps=False)
        if not (bool(torch.isfinite(v).all()) and bool(torch.isfinite(o).all())):
            continue  # a half-precision overflow tells no order; the engines name it at the item it hits
        want = v.view(n_kv_heads, 1, head_dim).expand(n_kv_heads, group, head_dim).reshape(-1).to(o.device)
        scale = float(want.abs().max()) or 1.0
        if not torch.allclose(o, want, rtol=0, atol=2e-2 * scale):  # half precision rounds; a wrong order is O(1)
            bad = int((o - want).abs().view(n_heads, head_dim).amax(-1).argmax())
            raise UpstreamChanged(f"decoder layer {i}'s attention put query head {bad}'s output elsewhere than o_proj "
                                  f"input columns {bad * head_dim}..{(bad + 1) * head_dim - 1} (its value head "
                                  f"{bad // group}'s, at the first position): head masks would remove other "
                                  "channels than the heads they name", naive_helps=False)


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the execution device of its accelerate hook when the model is dispatched
    (accelerate 1.x ``AlignDevicesHook``, checked with 1.15), else the device of its first weight."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    raise UpstreamChanged(f"{type(module).__name__} has no weights and no accelerate hook: its device is unknown")


def call_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall, cache: Any | None) -> torch.Tensor:
    """Run one decoder layer on ``hidden`` with the recorded keywords and (optionally) a KV cache to extend."""
    kw = dict(call.kwargs, use_cache=cache is not None)
    kw[cache_kwarg(type(layer).forward)] = cache
    out = layer(hidden, **kw)
    out = out[0] if isinstance(out, tuple) else out
    if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
        raise UpstreamChanged(f"a decoder layer returned {type(out).__name__} "
                              f"{tuple(getattr(out, 'shape', ()))} for input {tuple(hidden.shape)}")
    return out


def output_cache(out: Any) -> Any:
    """The KV cache a model's forward returned (``cache`` from 5.24 on, ``past_key_values`` before)."""
    for name in CACHE_KWARGS:
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise UpstreamChanged("the model returned no KV cache although use_cache=True")


def cache_layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [batch, kv_heads, T, d] held for one layer."""
    try:
        entry = cache.layers[layer]
        return entry.keys, entry.values
    except (AttributeError, IndexError):
        raise UpstreamChanged(f"{type(cache).__name__} no longer exposes .layers[{layer}].keys/.values") from None


def reset_position_state(model: nn.Module) -> None:
    """Forget the M-RoPE offset a Qwen-VL-style model keeps from its last prompt (``rope_deltas`` on a submodule).

    Decoding steps add it to their positions; a text-only prompt does not overwrite it (Qwen3-VL, 5.24), so after an
    image item the next text item would decode at the image item's offsets. ``generate`` recomputes it; the exact
    engine's hand-driven decoding must start from a clean state instead."""
    for module in model.modules():
        if getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None


def rope_position_limit(model: nn.Module) -> tuple[str, int] | None:
    """(RoPE type, positions) when the model's rotary embedding changes its frequencies with the length of what it
    is run on: ``dynamic`` rescales once a call spans more positions than ``max_position_embeddings`` and keeps the
    grown frequencies for every later call (until one is short again); ``longrope`` switches to its long factors for
    the whole call once it passes ``original_max_position_embeddings``. Beyond that many positions a measurement
    depends on what ran before and on the longest row of its batch (checked on 5.25, modeling_rope_utils
    ``dynamic_rope_update``). None when no rotary embedding does so (default, linear, yarn, llama3, M-RoPE).
    UpstreamChanged where the config declares such a RoPE and no module says so by its ``rope_type``: a release
    keeping it under another name would otherwise let items past the limit through (simulated, exit 0); a module
    without ``original_max_seq_len`` (which 5.25's longrope never reads) takes the config's values."""
    limits = []
    for module in model.modules():
        kinds = getattr(module, "rope_type", None)
        if not isinstance(kinds, (str, dict)) or not isinstance(module, nn.Module):
            continue
        config = getattr(module, "config", None)
        # the limit as transformers reads it (5.25: dynamic from original_max_seq_len, set from the config's
        # max_position_embeddings; longrope from the config's rope parameters): what a module keeps, else the config
        kept = getattr(module, "original_max_seq_len", None) or getattr(config, "max_position_embeddings", None)
        by_layer = kinds if isinstance(kinds, dict) else {None: kinds}
        for layer_type, kind in by_layer.items():
            if not isinstance(kind, str):
                continue
            if "dynamic" in kind and kept:  # modeling_rope_utils' own test
                limits.append((kind, int(kept)))
            elif kind == "longrope":
                params = getattr(config, "rope_parameters", None) or {}
                params = params.get(layer_type, params) if layer_type is not None else params
                limit = params.get("original_max_position_embeddings", kept)
                if limit:
                    limits.append((kind, int(limit)))
    declared = _declared_length_ropes(model)
    if declared and not limits:
        raise UpstreamChanged(f"the config declares {declared[0]!r} RoPE, but no module of "
                              f"{type(model).__name__} holds a rotary embedding of that rope_type with its length "
                              "limit: items past it could not be refused", naive_helps=False)
    return min(limits, key=lambda x: x[1]) if limits else None


def _declared_length_ropes(model: nn.Module) -> list[str]:
    """The dynamic and longrope RoPE types the model's text config declares (``rope_parameters``, flat or per layer
    type): the oracle ``rope_position_limit`` is checked against, as the checkpoint states it."""
    try:
        params = model.config.get_text_config(decoder=True).rope_parameters
    except AttributeError:
        return []
    nodes = [params] if isinstance(params, dict) and "rope_type" in params else (
        [v for v in params.values() if isinstance(v, dict)] if isinstance(params, dict) else [])
    kinds = [node.get("rope_type") for node in nodes]
    return [k for k in kinds if isinstance(k, str) and ("dynamic" in k or k == "longrope")]


def full_length_cache() -> Any:
    """An empty DynamicCache built without the model's config, so every layer keeps every position — sliding-window
    layers (Gemma 3) included, whose own cache would keep only the last window. The exact engine copies prompt
    prefixes per layer from it; the attention masks still apply each layer's window (checked against the naive
    loop in tests/test_families.py)."""
    from transformers import DynamicCache

    return DynamicCache()


def prefix_cache(clean: Any, upto: int, batch: int) -> Any:
    """A new DynamicCache holding the clean K/V of layers < upto, repeated over ``batch`` rows; layers ≥ upto are
    filled as the masked rows run through them."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(upto):
        keys, values = cache_layer_kv(clean, i)
        cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), i)
    return cache


def check_cache(cache: Any, layers: Iterable[int], batch: int, length: int) -> None:
    """Every listed layer holds exactly ``batch`` rows of ``length`` positions — or the KV cache was not the one
    the engine built (the 5.24 failure mode), and every number after it would be wrong."""
    for i in layers:
        keys, values = cache_layer_kv(cache, i)
        if keys.shape[0] != batch or keys.shape[-2] != length or values.shape[-2] != length:
            raise UpstreamChanged(
                f"KV cache layer {i} holds {tuple(keys.shape)} after the engine's calls, expected {batch} rows "
                f"of {length} positions")


class PositionWatch:
    """Context manager that records the position ids each rotary embedding of the LM is called with (a forward
    pre-hook on the RoPE modules beside the decoder layers: ``model.rotary_emb`` of Qwen2 / Llama / Gemma 3,
    ``model.language_model.rotary_emb`` of Qwen2-VL and LLaVA-OneVision, checked on 5.23-5.25). ``last`` is the
    last position of the last call, [..., rows, 1] ([3, rows, 1] under M-RoPE).

    The exact engine decodes by hand (``model_call_with_cache`` with the new token and a cache, nothing else), so the
    positions of the decoded tokens are whatever the model derives from the cache and its own state (M-RoPE:
    ``rope_deltas`` kept from the prompt's forward, reset by ``reset_position_state``). A release that stops keeping
    that state, or keeps it under another name, decodes at wrong positions without an error; this watch lets
    ``check_decode_position`` see it on every step."""

    def __init__(self, model: nn.Module, layers_path: str):
        parent = model.get_submodule(layers_path.rpartition(".")[0])
        self.modules = [m for name, m in parent.named_children()
                        if "rotary" in name.lower() or "Rotary" in type(m).__name__]
        if not self.modules:
            raise UpstreamChanged(f"no rotary embedding module beside {layers_path} (children of "
                                  f"{type(parent).__name__}): the decoded tokens' positions cannot be checked")
        self.last: torch.Tensor | None = None
        self._handles: list = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if not isinstance(pos, torch.Tensor):
            raise UpstreamChanged(f"{type(module).__name__} was called without position ids")
        self.last = pos[..., -1:].detach().clone()

    def __enter__(self) -> "PositionWatch":
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def check_decode_position(watch: PositionWatch, prompt_last: torch.Tensor, step: int) -> None:
    """The ``step``-th decoded token (1 = the first one fed back) must run at the prompt's last position + ``step``
    in every RoPE dimension (M-RoPE's text tokens after an image too), on every row."""
    got = watch.last
    if got is None:
        raise UpstreamChanged("the LM's rotary embedding did not run on a decoding step")
    want = prompt_last.to(got.device) + step
    if got.dim() != want.dim() or not bool((got == want).all()):
        raise UpstreamChanged(
            f"decoded token {step} ran at RoPE position {got.flatten()[:6].tolist()}, not the prompt's last "
            f"position + {step} = {want.flatten()[:6].tolist()}: the model no longer derives decoding positions from "
            "a cache and its own state as the exact engine's decoding expects (M-RoPE: rope_deltas kept from the "
            "prompt's forward, see reset_position_state)")


def model_call_with_cache(model: nn.Module, cache: Any, **inputs: Any) -> Any:
    """One forward of the whole model that extends ``cache`` (greedy decoding after the first position)."""
    return model(**inputs, **{cache_kwarg(type(model).forward): cache}, use_cache=True)


def ties_lm_head(model: nn.Module) -> bool:
    """Whether ``from_pretrained`` ties ``model``'s lm_head to its token embedding (its class and config together):
    transformers' own mapping of the weights a load ties, over every sub-model (``get_expanded_tied_weights_keys``,
    a 5.x internal, the same in 5.23.0 and 5.25.0; ``model`` may be a meta-device skeleton)."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is None:
        raise UpstreamChanged("PreTrainedModel.get_expanded_tied_weights_keys (the weights a load ties) is gone",
                              naive_helps=False)
    return any(k.endswith("lm_head.weight") for pair in expand(all_submodels=True).items() for k in pair)


@contextmanager
def head_must_run(model: nn.Module, head_path: str) -> Iterator[None]:
    """Around a forward (or ``generate``) of a model whose LM head gives fp32 logits through a forward hook
    (probe.models.fp32_logits, in bfloat16 / float16): the head module must have run. A release that computed the
    logits from the head's weight directly (a fused or kernelized LM head) would skip the hook and give logits
    rounded to bfloat16 — in generate's output upcast back to fp32, so their dtype cannot tell (organism-vl in
    bf16: p moved by 0.017, exit 0). Without that hook (fp32 runs) nothing is checked."""
    head = model.get_submodule(head_path)
    if not getattr(head, "fp32_logits", False):
        yield
        return
    calls: list[int] = []
    handle = head.register_forward_hook(lambda *args: calls.append(1))
    try:
        yield
    finally:
        handle.remove()
    if not calls:
        raise UpstreamChanged(f"{type(model).__name__} computed its logits without calling its LM head module "
                              f"({head_path}), so its fp32 logits hook never ran", naive_helps=False)


def greedy_generate(model: nn.Module, inputs: dict[str, torch.Tensor], config: Any, eos: Iterable[int]) -> Any:
    """``model.generate(**inputs, generation_config=config)`` as plain greedy decoding, checked.

    transformers 5 fills every field that a passed GenerationConfig leaves unset (None) from the checkpoint's own
    ``model.generation_config`` (checked on 5.25, ``GenerationMixin._prepare_generation_config``), so a checkpoint's
    repetition_penalty (Qwen2-7B-Instruct publishes 1.05 with its sampling defaults), min_new_tokens, suppress_tokens or
    no_repeat_ngram_size would silently shape the "greedy" text (each changed organism-vl's answers, exit 0). The
    model's generation config is blank while generate runs, and every generated token must be the argmax of that
    step's raw logits (``check_greedy``): whatever a later release applies on top, a run never scores it."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        out = model.generate(**inputs, generation_config=config)
    finally:
        model.generation_config = saved
    check_greedy(out.logits, out.sequences[:, inputs["input_ids"].shape[1]:], eos)
    if model not in _RAW_FIRST_STEP:
        check_first_step_raw(model, inputs, out.logits[0])
    return out


_RAW_FIRST_STEP: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models whose generate logits were checked raw


def check_first_step_raw(model: nn.Module, inputs: dict[str, torch.Tensor], first: torch.Tensor) -> None:
    """generate's first-step logits ``first`` [B, V] (``output_logits``, which the option probabilities are read
    from) are the plain forward's logits at the prompt's last position, on the rows no padding shifts (a full
    attention mask). Checked once per model, on its first call with such a row: one more prefill a run. A release
    returning processed scores there by a transform that keeps every argmax (a temperature) passes
    ``check_greedy``; simulated with 0.7, the tiny Qwen2's option probabilities moved by 0.029, exit 0. Non-finite
    logits are the overflow check's to name (nothing is marked checked then)."""
    mask = inputs.get("attention_mask")
    rows = (torch.arange(first.shape[0]) if mask is None else mask.bool().all(-1).nonzero().flatten()).cpu()
    if not len(rows):
        return
    with torch.no_grad():  # no cache: generate's output still holds the batch's (a second one could run out of memory)
        plain = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
    got, want = first[rows.to(first.device)].float(), plain[rows.to(plain.device)].float().to(first.device)
    if not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all())):
        return
    # the same forward twice; half precision leaves room for another kernel's rounding, not for a rescaling
    tol = (1e-4 if getattr(model, "dtype", torch.float32) == torch.float32 else 1e-2) * (float(want.abs().max()) or 1.0)
    diff = float((got - want).abs().max())
    if diff > tol:
        raise UpstreamChanged(f"generate's first-step logits are not the forward's raw logits at the prompt's last "
                              f"position (max difference {diff:.3g}, scale {float(want.abs().max()):.3g}): it returned "
                              "processed scores as output_logits", naive_helps=False)
    _RAW_FIRST_STEP.add(model)


def check_greedy(step_logits: Sequence[torch.Tensor], tokens: torch.Tensor, eos: Iterable[int]) -> None:
    """``tokens`` [B, S] (what follows the prompt in generate's sequences) are S tokens, one per step of logits, and
    each is the argmax of its step's raw logits (S tensors [B, V]) on every row still
    generating (no end token before it) whose logits are finite (an overflow is refused where it is measured)."""
    if tokens.shape[1] != len(step_logits):  # sequences no longer prompt + generated tokens, or logits missing
        raise UpstreamChanged(f"generate returned {tokens.shape[1]} tokens after the prompt but logits for "
                              f"{len(step_logits)} steps", naive_helps=False)
    ended = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    ends = torch.tensor(sorted(eos), dtype=tokens.dtype, device=tokens.device)
    for s, logits in enumerate(step_logits[:tokens.shape[1]]):
        logits = logits.to(tokens.device)
        live = ~ended & torch.isfinite(logits).all(-1)
        if bool((live & (logits.argmax(-1) != tokens[:, s])).any()):
            raise UpstreamChanged(f"generate(do_sample=False, num_beams=1) chose generated token {s + 1} other than "
                                  "the argmax of its raw logits: a logits processor or sampling was applied that the "
                                  "passed GenerationConfig did not ask for", naive_helps=False)
        ended |= torch.isin(tokens[:, s], ends)


def check_adapters_in_lm(model: nn.Module, is_lm: Callable[[str], bool]) -> None:
    """With a peft wrapper (``--lora``) every parameter that trains is an adapter on an LM projection, so each must
    pass ``is_lm`` (probe.train's rule, which strips peft's ``base_model.model.`` prefix: peft 0.21). A release naming
    its parameters otherwise put the adapters outside the LM: they trained at ``--lr`` instead of ``--lm-lr``, and
    a mixed batch's text rows were skipped as reaching nothing that trains (simulated: organism-vl, exit 0)."""
    if not callable(getattr(model, "get_base_model", None)):
        return
    outside = [n for n, p in model.named_parameters() if p.requires_grad and not is_lm(n)]
    if outside:
        raise UpstreamChanged(f"it names a trainable parameter {outside[0]} (and {len(outside) - 1} more) outside "
                              "the LM's path: its adapters would train at the other parts' rate and text rows would "
                              "be skipped", naive_helps=False, library="peft")


def check_lora_targets(model: nn.Module, pattern: str) -> None:
    """The modules peft wrapped with LoRA adapters (``peft.tuners.lora.LoraLayer``, peft 0.21) are exactly those
    whose names in the base model fully match ``pattern`` (the ``target_modules`` regex ``analyses.finetune.add_lora``
    passes). A release that read a regex otherwise, or fell back to its per-model default (``q_proj`` and ``v_proj``
    for Qwen2: simulated, exit 0), would train other modules than the README's attention and MLP projections."""
    import re

    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {n for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    wanted = {n for n, _ in base.named_modules() if re.fullmatch(pattern, n)}
    if adapted != wanted:
        odd = sorted(adapted ^ wanted)
        raise UpstreamChanged(f"it put LoRA adapters on {len(adapted)} modules, not the {len(wanted)} named by "
                              f"target_modules (first difference: {odd[0]})", naive_helps=False, library="peft")


def logits_at(model: nn.Module, inputs: dict[str, torch.Tensor], positions: list[int]) -> torch.Tensor:
    """The logits at ``positions`` (sorted, the same for every row) [B, len(positions), V], asked for with
    ``logits_to_keep``. A list, not a tensor: accelerate's hooks would move a tensor of positions to a split model's
    first device while the hidden states it indexes sit on the last. A class that ignores ``logits_to_keep``
    (Qwen2.5-Omni's thinker) returns every position: the same values, kept here. Any other shape would pair logits
    and positions wrongly."""
    inner = getattr(model, "module", model)  # DDP's wrapper; peft's forwards these HF accessors to the model
    try:
        decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        decoder = head = None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        raise UpstreamChanged(f"{type(inner).__name__} has no get_decoder() / get_output_embeddings() module: the "
                              "positions its logits come from cannot be checked", naive_helps=False)
    seen: dict[str, torch.Tensor] = {}
    hooks = [decoder.register_forward_hook(lambda m, a, out: seen.__setitem__("hidden", out[0])),
             head.register_forward_pre_hook(lambda m, args: seen.__setitem__("head_in", args[0]))]
    try:
        logits = model(**inputs, logits_to_keep=positions).logits
    finally:
        for h in hooks:
            h.remove()
    if logits.shape[1] == inputs["input_ids"].shape[1] != len(positions):
        logits = logits[:, positions]
    if logits.shape[1] != len(positions):
        raise RuntimeError(f"{type(model).__name__} returned logits for {logits.shape[1]} positions, not the "
                           f"{len(positions)} asked for with logits_to_keep")
    check_head_positions(seen, positions)
    return logits


def check_head_positions(seen: dict[str, torch.Tensor], positions: list[int]) -> None:
    """The LM head ran on the decoder's last hidden states at ``positions`` (or at every position, which
    ``logits_at`` then picks from). 5.23-5.25 index the hidden states with the list (``slice_logits_to_keep``); a
    release reading a sequence otherwise (as "the last len(...) positions", as per-row positions) gives logits of
    the asked-for count from other positions: the loss of other tokens, exit 0 (simulated: organism-base's loss
    doubled)."""
    hidden, head_in = seen.get("hidden"), seen.get("head_in")
    if hidden is None or head_in is None:
        raise UpstreamChanged("the LM head or the decoder did not run as modules in the forward: the positions its "
                              "logits come from cannot be checked", naive_helps=False)
    with torch.no_grad():
        want = hidden if head_in.shape[1] == hidden.shape[1] != len(positions) else hidden[:, positions]
        # equal_nan: non-finite weights are the divergence check's to name (probe.train.diverged)
        if want.shape != head_in.shape or not torch.allclose(want.to(head_in.device, head_in.dtype), head_in,
                                                             rtol=0, atol=0, equal_nan=True):
            raise UpstreamChanged(f"the LM head ran on hidden states {tuple(head_in.shape)} that are not the "
                                  f"decoder's at the {len(positions)} positions asked for with logits_to_keep",
                                  naive_helps=False)


def anyres_patches(model_type: str, processor: Any, image_sizes: torch.Tensor, side: int) -> list[int] | None:
    """How many ``pixel_values`` patches each image of these (height, width) takes in an anyres processor's output
    (LLaVA-NeXT, -OneVision: the best grid of its image_grid_pinpoints in patches of the pixel tensor's side, plus
    the whole image), by transformers' own function for it: ``image_size_to_num_patches`` of the model's module,
    with which the model's ``get_image_features`` cuts the padding off each image again. The processor pads every
    image to the call's most patches (``_pad_for_batching``), so this is what tells an image's patches from its
    padding (``probe.prompting.encode_prompts``; checked on 5.23 and 5.25 by tests/test_families.py against each
    image's own call). None where a release has no such function or the processor no pinpoints: its items are then
    encoded one by one."""
    import importlib

    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return None
    count = getattr(module, "image_size_to_num_patches", None)
    pinpoints = getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None)
    if count is None or not isinstance(pinpoints, list):
        return None
    return [int(count(image_size=size, grid_pinpoints=pinpoints, patch_size=side)) for size in image_sizes.tolist()]


def processor_image_tokens(processor: Any, image_sizes: torch.Tensor) -> list[int] | None:
    """How many image tokens the processor expands each image of these (height, width) to, by its own count
    (``_get_num_multimodal_tokens``, which vLLM reads; 5.23's and 5.25's LLaVA-NeXT and -OneVision processors give the
    anyres count, unpadded features, newlines and base, that their ``replace_image_token`` expands a
    single-image prompt's placeholder to). None where a release does not give it: items are then encoded one by
    one (``probe.prompting.encode_prompts``)."""
    return _multimodal_counts(processor, image_sizes, "num_image_tokens")


def processor_image_patches(processor: Any, image_sizes: torch.Tensor) -> list[int] | None:
    """How many ``pixel_values`` rows (tiles, and the thumbnail where an image is tiled) the processor makes of
    each image of these (height, width), by its own count (``_get_num_multimodal_tokens``' ``num_image_patches``:
    the image processor's ``get_number_of_image_patches``, with which InternVL's processor cuts its pixel rows into
    images; 5.23 and 5.25 alike, where their ``num_image_tokens`` differ by the image's start and end tokens).
    InternVL's output does not say how many rows an image took; this tells a window's call's rows apart
    (``probe.prompting.encode_prompts``). None where a release does not give it: items are then encoded one by one."""
    return _multimodal_counts(processor, image_sizes, "num_image_patches")


def _multimodal_counts(processor: Any, image_sizes: torch.Tensor, key: str) -> list[int] | None:
    count = getattr(processor, "_get_num_multimodal_tokens", None)
    if count is None:
        return None
    try:
        counts = count(image_sizes=image_sizes.tolist())[key]
    except (AttributeError, KeyError, TypeError):
        return None
    return [int(t) for t in counts] if isinstance(counts, list) and len(counts) == len(image_sizes) else None


# get_image_patches' parameters in 5.23-5.25's PIL LLaVA-NeXT / -OneVision image processors (after self)
_IMAGE_PATCHES_PARAMS = ("image", "grid_pinpoints", "size", "patch_size", "resample")


@functools.lru_cache(maxsize=None)
def _patches_hook_fits(hook: Any) -> bool:
    """Whether ``hook`` (a class's ``get_image_patches``) takes ``_IMAGE_PATCHES_PARAMS``. Cached by the function
    itself (another class's hook, or one patched in, is another key): its signature was read for every video item
    (organism-video's base views 0.98 -> 0.95 ms an item: README, Performance)."""
    try:
        return tuple(inspect.signature(hook).parameters)[1:] == _IMAGE_PATCHES_PARAMS
    except (TypeError, ValueError):
        return False


def anyres_base_views(image_processor: Any, images: Sequence[Any]) -> torch.Tensor | None:
    """The base view of each image, ``image_processor(images=images)["pixel_values"][:, 0]``, without the anyres
    tiles the full call computes and drops (each resized, rescaled and normalised: half of organism-video's frame
    processing, more with a larger grid). The processor's own call runs on a shallow copy whose
    ``get_image_patches`` (an internal hook of the PIL anyres processors, 5.23-5.25: the base view, the image
    resized to ``size`` by ``self.resize``, then the tiles) returns the base view alone; everything around it
    (RGB conversion, the do_resize / center-crop / rescale / normalise steps, dtype, tensors) is transformers' own.
    None where the processor has no such hook by that signature (the torchvision backend, a later release):
    the caller makes the full call. probe.video checks the result against the full call at run time."""
    from transformers.image_utils import SizeDict

    hook = getattr(type(image_processor), "get_image_patches", None)
    if hook is None or not callable(getattr(image_processor, "resize", None)):
        return None
    try:
        if not _patches_hook_fits(hook):
            return None
    except TypeError:  # a hook no function (unhashable): no fast path
        return None
    fast = copy.copy(image_processor)  # per call, never cached: it must hold the processor's settings of now

    def base_only(image, grid_pinpoints, size, patch_size, resample):
        height, width = size
        return [fast.resize(image=image, size=SizeDict(height=height, width=width), resample=resample)]

    fast.get_image_patches = base_only
    pixels = fast(images=list(images), return_tensors="pt")["pixel_values"]
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5 or pixels.shape[1] != 1:
        return None  # one view an image, as base_only returns, or the hook was not what made them
    return pixels[:, 0]
