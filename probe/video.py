"""Video inputs from PIL frames without torchvision (HF video processors need it; it does not work here).

``add_video_inputs(loaded, batch, frames)`` takes the processor output of a prompt that holds the family's video
placeholder once and returns it with the pixel tensors the model needs and the video token expanded:

- LLaVA-OneVision: ``pixel_values_videos`` (1, F, 3, S, S), each frame resized to the vision tower's size and
  normalised exactly like the base view of the PIL image processor; the ``<video>`` token is expanded to
  F·⌈h/2⌉·⌈w/2⌉ + 1 tokens (h = w = image_size / patch_size; 2×2 pooling per frame, one newline token), as
  ``get_video_features`` produces. Any *further* ``<video>`` token (MMMU-style questions reference the video as
  ``<video>`` in their text, which the tokenizer maps to the same special token) is removed, since the
  placeholder before the question already carries the frames.
- Qwen2-VL: ``pixel_values_videos`` (patches, C·T·P·P) and ``video_grid_thw``, each frame made exactly as the PIL
  image processor makes an image (its smart_resize, resample, rescale, mean/std) and paired along time
  (temporal_patch_size; an odd last frame is repeated); ``<|video_pad|>`` is expanded to t·h·w / merge² tokens.

Both take the settings transformers' video processor would load (``frame_processor``): the checkpoint's video
config where it has one, over the video class's own defaults (Qwen2-VL's: 128·28² .. 768·28² pixels a frame).
"""
from __future__ import annotations

import copy
import json
import math
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image

from probe.errors import BadInput
from probe.upstream import anyres_base_views

if TYPE_CHECKING:  # annotations only
    from probe.models import LoadedModel


def _expand(batch: dict[str, Any], token_id: int, count: int, drop_extra: bool) -> dict[str, Any]:
    ids = batch["input_ids"]
    if ids.shape[0] != 1:
        raise RuntimeError("add_video_inputs expects a batch of one prompt")
    row = ids[0].tolist()
    where = [i for i, t in enumerate(row) if t == token_id]
    if not where:
        raise BadInput("the prompt has no video placeholder token; check the family's video_placeholder")
    if len(where) > 1 and not drop_extra:
        raise BadInput("more than one video placeholder in the prompt; one video per item is supported")
    first = where[0]
    keep = [i for i in range(len(row)) if i == first or row[i] != token_id]
    out_ids, out_mask = [], []
    mask = batch["attention_mask"][0].tolist() if "attention_mask" in batch else [1] * len(row)
    for i in keep:
        n = count if i == first else 1
        out_ids += [row[i]] * n
        out_mask += [mask[i]] * n
    batch = dict(batch)
    batch["input_ids"] = torch.tensor([out_ids], dtype=ids.dtype)
    batch["attention_mask"] = torch.tensor([out_mask], dtype=torch.long)
    return batch


def _normalise(frames: Sequence[Image.Image], height: int, width: int, ip) -> np.ndarray:
    """Each frame as the image processor ``ip`` makes an image of (height, width): RGB, resized by its resample,
    rescaled and normalised by its own settings and methods (a checkpoint's resample 2 or rescale_factor is
    followed, as its images follow it)."""
    arrs = []
    for f in frames:
        f = f.convert("RGB").resize((width, height), ip.resample)
        a = np.asarray(f).transpose(2, 0, 1)
        if ip.do_rescale:
            a = ip.rescale(a, ip.rescale_factor)
        if ip.do_normalize:
            a = ip.normalize(a, ip.image_mean, ip.image_std)
        arrs.append(np.asarray(a, dtype=np.float32))
    return np.stack(arrs)  # (F, C, H, W)


# Per anyres image processor, the frame kinds ((width, height), mode) whose fast base views (upstream.anyres_base_views)
# were found equal to the full call's; None once one differed (that processor then always makes the full call).
_CHECKED: weakref.WeakKeyDictionary[Any, set[tuple] | None] = weakref.WeakKeyDictionary()


def _full_call_views(ip, frames: Sequence[Image.Image]) -> torch.Tensor:
    return ip(images=list(frames), return_tensors="pt")["pixel_values"][:, 0]


def _base_views(ip, frames: Sequence[Image.Image]) -> torch.Tensor:
    """The base view of the anyres image processor for each frame (resized to the tower's size, normalised): view 0
    of its full call, computed without the tiles it drops where upstream.anyres_base_views can. The first frame of
    each kind (size and mode: all the base view depends on) a processor meets is checked against its own full call,
    tensor and dtype (a frame's views do not depend on the call's other images), so a release that makes the base
    view otherwise is followed, not missed: on a difference that processor goes back to the full call."""
    checked = _CHECKED.setdefault(ip, set())
    fast = None if checked is None else anyres_base_views(ip, frames)
    if fast is None:
        return _full_call_views(ip, frames)
    for i, f in enumerate(frames):
        kind = (f.size, f.mode)
        if kind in checked:
            continue
        want = _full_call_views(ip, [f])[0]
        if fast[i].dtype != want.dtype or not torch.equal(fast[i], want):
            _CHECKED[ip] = None
            return _full_call_views(ip, frames)
        checked.add(kind)
    return fast


# The video processor class's defaults where they differ from its image processor class's, applied under a
# checkpoint's video config as transformers applies them (their video modules need torchvision, so written here):
# Qwen2VLVideoProcessor sizes a frame to 128·28² .. 768·28² pixels against the image's 56² .. 1280·28²;
# LLaVA-OneVision's video processor has its image processor's defaults.
VIDEO_DEFAULTS: dict[str, dict[str, Any]] = {
    "llava_onevision": {},
    "qwen2_vl": {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}},
}
# Per loaded image processor, the one that makes the frames (None: itself, the video config saying nothing else).
_FRAME_PROCESSORS: weakref.WeakKeyDictionary[Any, Any | None] = weakref.WeakKeyDictionary()


def video_config(model_dir: Path) -> dict[str, Any] | None:
    """The checkpoint's video processor settings, found where transformers looks: processor_config.json's
    "video_processor", else video_preprocessor_config.json, else preprocessor_config.json; None without any."""
    nested = model_dir / "processor_config.json"
    for path, key in ((nested, "video_processor"), (model_dir / "video_preprocessor_config.json", None),
                      (model_dir / "preprocessor_config.json", None)):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise BadInput(f"{path}: unreadable processor config") from None
        if not isinstance(data, dict):
            raise BadInput(f"{path}: unreadable processor config (not a JSON object)")
        if key is None:
            return data
        if isinstance(data.get(key), dict):
            return data[key]
    return None


def _settings(ip) -> dict[str, Any]:
    keys = type(ip).valid_kwargs.__annotations__
    return {k: v for k, v in ip.to_dict().items() if k in keys}


def frame_processor(loaded, defaults: dict[str, Any]) -> Any:
    """The PIL image processor that makes a video's frames: one of the model's image processor class with the
    settings transformers' video processor would load (``video_config`` over the video class's ``defaults``), or
    the model's own where those are the same (the usual checkpoint: one preprocessor_config.json for both)."""
    ip = loaded.processor.image_processor
    if ip not in _FRAME_PROCESSORS:
        config = video_config(Path(loaded.ref.path))
        frames_ip = ip
        if config is not None:
            keys = type(ip).valid_kwargs.__annotations__
            # a copy: the class's __init__ writes min/max_pixels into the size dict it is given
            settings = copy.deepcopy({**defaults, **{k: v for k, v in config.items() if k in keys}})
            candidate = type(ip)(**settings)
            if _settings(candidate) != _settings(ip):
                frames_ip = candidate
        _FRAME_PROCESSORS[ip] = None if frames_ip is ip else frames_ip  # no value holding its own key alive
    return _FRAME_PROCESSORS[ip] or ip


def _llava_onevision(loaded, batch, frames):
    cfg = loaded.model.config
    vision = cfg.vision_config
    size = vision.image_size
    pix = _base_views(frame_processor(loaded, VIDEO_DEFAULTS["llava_onevision"]), frames)
    if pix.shape[-2:] != (size, size):
        raise BadInput(f"image processor size {tuple(pix.shape[-2:])} differs from the vision tower's {size}")
    side = size // vision.patch_size
    per_frame = math.ceil(side / 2) ** 2
    count = len(frames) * per_frame + 1
    batch = _expand(batch, _token_id(cfg, "video"), count, drop_extra=True)
    batch["pixel_values_videos"] = pix[None]
    return batch


def _qwen2_vl(loaded, batch, frames):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    cfg = loaded.model.config
    ip = frame_processor(loaded, VIDEO_DEFAULTS["qwen2_vl"])
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    w0, h0 = frames[0].size
    min_pixels = getattr(ip, "min_pixels", None) or ip.size["shortest_edge"]
    max_pixels = getattr(ip, "max_pixels", None) or ip.size["longest_edge"]
    h, w = smart_resize(h0, w0, factor=p * m, min_pixels=min_pixels, max_pixels=max_pixels)
    arr = _normalise(frames, h, w, ip)
    if arr.shape[0] % tp:
        arr = np.concatenate([arr, np.repeat(arr[-1:], tp - arr.shape[0] % tp, axis=0)])
    gt, gh, gw = arr.shape[0] // tp, h // p, w // p
    c = arr.shape[1]
    x = arr.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    x = x.reshape(gt * gh * gw, c * tp * p * p)
    batch = _expand(batch, _token_id(cfg, "video"), gt * gh * gw // (m * m), drop_extra=False)
    batch["pixel_values_videos"] = torch.from_numpy(np.ascontiguousarray(x))
    batch["video_grid_thw"] = torch.tensor([[gt, gh, gw]])
    # M-RoPE needs the modality of every token: text 0, image 1, video 2 (the processor would return these).
    ids = batch["input_ids"]
    types = torch.zeros_like(ids)
    types[ids == _token_id(cfg, "image")] = 1
    types[ids == _token_id(cfg, "video")] = 2
    batch["mm_token_type_ids"] = types
    return batch


def _seconds_per_grid(loaded) -> float:
    """The seconds one temporal patch spans at the 2 fps the frames are taken to be sampled at (qwen-vl-utils'
    default for a list of frames, and the Omni processor's; the data carries no timing)."""
    return frame_processor(loaded, VIDEO_DEFAULTS["qwen2_vl"]).temporal_patch_size / 2.0


def _qwen2_5_vl(loaded, batch, frames):
    """As Qwen2-VL, plus the seconds each temporal patch spans (M-RoPE time axis; ``_seconds_per_grid``)."""
    batch = _qwen2_vl(loaded, batch, frames)
    batch["second_per_grid_ts"] = torch.tensor([_seconds_per_grid(loaded)])
    return batch


def _qwen2_5_omni(loaded, batch, frames):
    batch = _qwen2_vl(loaded, batch, frames)
    del batch["mm_token_type_ids"]  # the thinker finds vision tokens by id
    batch["video_second_per_grid"] = torch.tensor([_seconds_per_grid(loaded)])
    return batch


# Family.video_inputs → builder.
BUILDERS = {"llava_onevision": _llava_onevision, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl,
            "qwen2_5_omni": _qwen2_5_omni}


def _token_id(cfg, kind: str) -> int:
    """``<kind>_token_id``, or ``<kind>_token_index`` (the Omni thinker's config)."""
    value = getattr(cfg, f"{kind}_token_id", None)
    return value if value is not None else getattr(cfg, f"{kind}_token_index")


def add_video_inputs(loaded: LoadedModel, batch: dict[str, Any], frames: Sequence[Image.Image]) -> dict[str, Any]:
    """Add the video tensors of ``frames`` to a processor output (batch of one) and expand its video token."""
    if not frames:
        return batch
    builder = BUILDERS.get(loaded.family.video_inputs or "")
    if builder is None:
        raise BadInput(f"video inputs are not supported for the {loaded.family.name} family")
    return builder(loaded, batch, frames)
