"""probe.video: frames → pixel_values_videos and an expanded video token, no torchvision."""
from __future__ import annotations

import math

import pytest
import torch

from probe.mmmu import load_mmmu
from probe.models import load_model, resolve_model
from probe.prompting import PromptTemplate, build_inputs
from probe.zoo.tasks_video import build_video_dataset


@pytest.fixture(scope="module")
def video_items(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    build_video_dataset(root, {"validation": 1}, seed=0)
    items, _ = load_mmmu(root, "validation")
    assert all(len(it.frames) == 4 for it in items)
    return items


def test_llava_onevision_video_forward(video_items):
    loaded = load_model(resolve_model("tiny-llava-ov"))
    item = video_items[0]
    assert "<video>" in item.question  # the question's own reference must not become a second video slot
    batch = build_inputs(loaded, item, PromptTemplate())
    cfg = loaded.model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    expected = 4 * math.ceil(side / 2) ** 2 + 1
    assert int((batch["input_ids"] == cfg.video_token_id).sum()) == expected
    assert batch["pixel_values_videos"].shape == (1, 4, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    with torch.no_grad():
        out = loaded.model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.logits).all()


def test_qwen2_vl_video_forward(video_items):
    loaded = load_model(resolve_model("tiny-qwen2-vl"))
    batch = build_inputs(loaded, video_items[0], PromptTemplate())
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert t == 2  # 4 frames paired along time
    merge = loaded.processor.image_processor.merge_size
    n_tokens = int((batch["input_ids"] == loaded.model.config.video_token_id).sum())
    assert n_tokens == t * h * w // merge**2
    assert batch["pixel_values_videos"].shape[0] == t * h * w
    with torch.no_grad():
        out = loaded.model(**batch)
    assert torch.isfinite(out.logits).all()


def test_video_frames_change_the_output(video_items):
    loaded = load_model(resolve_model("tiny-llava-ov"))
    batch = build_inputs(loaded, video_items[0], PromptTemplate())
    with torch.no_grad():
        a = loaded.model(**batch).logits[0, -1]
        b = loaded.model(**(batch | {"pixel_values_videos": batch["pixel_values_videos"].flip(1)})).logits[0, -1]
    assert not torch.allclose(a, b)


# --- LLaVA-OneVision frames: the anyres base view alone (probe.upstream.anyres_base_views) ---------------------------

def _frames() -> list:
    """Frames the data can hold: square, tall and wide strips, 1×1 and 2×1, larger than a 384-px grid's largest
    pinpoint (2304), and the modes a PNG/JPEG frame decodes to; random pixels (seeded)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(37)

    def frame(w, h, mode="RGB"):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        return im if mode == "RGB" else im.convert(mode)

    return [frame(64, 64), frame(10, 300), frame(300, 10), frame(1, 1), frame(2, 1), frame(3000, 500),
            frame(2600, 2600), frame(50, 40, "RGBA"), frame(33, 77, "L"), frame(80, 80, "P"), frame(41, 29, "LA"),
            frame(37, 53, "CMYK"), frame(97, 61)]


def _pil_processor(**kwargs):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return LlavaOnevisionImageProcessorPil(**kwargs)


# random-config processors: image size, pinpoints, mean/std, resample, rescale / normalise on and off, size by edge
_CONFIGS = {
    "organism-size": dict(size={"height": 64, "width": 64}, image_grid_pinpoints=[[64, 64]]),
    "tall-grid": dict(size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 96], [96, 32], [64, 64]],
                      image_mean=[0.1, 0.7, 0.3], image_std=[0.9, 0.2, 0.5], resample=0),
    "no-rescale-no-normalise": dict(size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 56], [56, 28]],
                                    do_rescale=False, do_normalize=False, resample=2),
    "rescale-only": dict(size={"height": 48, "width": 48}, image_grid_pinpoints=[[48, 48]], do_normalize=False,
                         rescale_factor=1 / 127.0, resample=1),
    "shortest-edge": dict(size={"shortest_edge": 40}, image_grid_pinpoints=[[40, 80]], resample=5),
    "no-resize": dict(size={"height": 36, "width": 36}, image_grid_pinpoints=[[36, 72]], do_resize=False),
}


def _processor(name: str):
    """A random-config processor of _CONFIGS, llava-ov-7b's published one built from its config (384 px, 36
    pinpoints), or a tiny / shipped model's own."""
    from probe.archs import build_config, image_processor_for

    if name in _CONFIGS:
        return _pil_processor(**_CONFIGS[name])
    if name == "llava-ov-7b":
        return image_processor_for(name, build_config(name))
    return load_model(resolve_model(name)).processor.image_processor


def _full_view_0(ip, frames) -> torch.Tensor:
    """Today's path, the oracle: the whole anyres call over the frames, view 0 of each."""
    return ip(images=list(frames), return_tensors="pt")["pixel_values"][:, 0]


@pytest.mark.parametrize("name", [*_CONFIGS, "llava-ov-7b", "tiny-llava-ov", "organism-video"])
def test_base_views_equal_the_full_calls_view_0(name):
    """Frame for frame the base view alone is view 0 of the full anyres call, tensor and dtype, for every frame
    kind and processor setting; and probe.video's path (with its run-time check) keeps the fast tensors."""
    from probe import video
    from probe.upstream import anyres_base_views
    from probe.zoo import organism_validation_dir

    ip = _processor(name)
    frames = _frames()
    if name == "organism-video":  # its own video set's frames too
        items, _ = load_mmmu(organism_validation_dir("video"), "validation")
        frames += [f for it in items[:6] for f in it.pil_frames()]
    want = _full_view_0(ip, frames)
    got = anyres_base_views(ip, frames)
    assert got is not None and got.dtype == want.dtype and torch.equal(got, want)
    assert got.dtype == (torch.uint8 if name == "no-rescale-no-normalise" else torch.float32)
    # the run-time check compares a frame's own call: its view 0 is the same in a call of many frames
    assert torch.equal(_full_view_0(ip, frames[5:6])[0], want[5])
    checked = video._base_views(ip, frames)
    assert torch.equal(checked, want) and video._CHECKED[ip] >= {(f.size, f.mode) for f in frames}
    assert "get_image_patches" not in vars(ip)  # the hook replaced on a copy, never on the model's processor


def test_onevision_video_inputs_equal_the_full_calls(video_items, monkeypatch):
    """Through build_inputs: pixel_values_videos of an organism-video item is the full call's view 0 of its
    frames (the path before the change), token expansion unchanged."""
    from probe import video

    loaded = load_model(resolve_model("organism-video"))
    item = video_items[0]
    batch = build_inputs(loaded, item, PromptTemplate())
    want = _full_view_0(loaded.processor.image_processor, item.pil_frames())
    assert batch["pixel_values_videos"].dtype == want.dtype and torch.equal(batch["pixel_values_videos"][0], want)
    monkeypatch.setattr(video, "_base_views", video._full_call_views)  # the path before
    before = build_inputs(loaded, item, PromptTemplate())
    assert before.keys() == batch.keys() and all(torch.equal(before[k], batch[k]) for k in batch)


def test_a_fast_path_that_differs_falls_back_to_the_full_call(monkeypatch):
    """A release whose base view differs from the fast path's (simulated: one pixel off in one frame kind): the
    run-time check sees it on the first frame of that kind, the item gets the full call's tensors and the processor
    makes the full call from then on. Frames of a kind already checked are not checked again (one call an item)."""
    from probe import upstream, video

    counted = []  # the images of each processor call, the fast path's (a copy of the processor) included

    class Counting(type(_pil_processor())):
        def __call__(self, *args, **kwargs):
            counted.append(len(kwargs["images"]))
            return super().__call__(*args, **kwargs)

    ip = Counting(**_CONFIGS["tall-grid"])
    frames = _frames()
    calls = []
    real_fast = upstream.anyres_base_views

    def fast(p, fr):
        calls.append(len(fr))
        out = real_fast(p, fr).clone()
        for i, f in enumerate(fr):
            if f.size == (10, 300):
                out[i, 0, 0, 0] += 1e-3
        return out

    monkeypatch.setattr(video, "anyres_base_views", fast)
    square = [f for f in frames if f.size == (64, 64)] * 3
    want_square, want = _full_view_0(ip, square), _full_view_0(ip, frames)
    counted.clear()
    assert torch.equal(video._base_views(ip, square), want_square)
    assert counted == [3, 1]  # the fast call, then the first frame's own full call
    counted.clear()
    video._base_views(ip, square)  # a kind checked before: the fast call alone
    assert counted == [3] and video._CHECKED[ip] == {((64, 64), "RGB")}
    got = video._base_views(ip, frames)  # holds the one kind the fast path gets wrong
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert video._CHECKED[ip] is None
    counted.clear()
    n = len(calls)
    assert torch.equal(video._base_views(ip, square), want_square)
    assert len(calls) == n and counted == [3]  # the full call only, the fast path no longer tried


def test_base_views_need_the_hook_they_replace(monkeypatch):
    """A processor without ``get_image_patches`` by 5.23-5.25's signature (the torchvision backend, a later
    release) gets no fast path: probe.video makes the full call, the same tensors."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from probe import video
    from probe.upstream import anyres_base_views

    class Renamed(LlavaOnevisionImageProcessorPil):
        def get_image_patches(self, image, grid_pinpoints, size, patch_size, resample, extra=None):
            return super().get_image_patches(image, grid_pinpoints, size, patch_size, resample)

    class Hookless(LlavaOnevisionImageProcessorPil):
        get_image_patches = None

    frames = _frames()[:4]
    for cls in (Renamed, Hookless):
        ip = cls(**_CONFIGS["organism-size"])
        assert anyres_base_views(ip, frames) is None
        if cls is Renamed:
            assert torch.equal(video._base_views(ip, frames), _full_view_0(_pil_processor(**_CONFIGS["organism-size"]),
                                                                          frames))


def test_organism_video_batched_eval_unchanged(monkeypatch):
    """organism-video on its own video set, batched: log-probs, predictions and texts bit for bit those of the
    full anyres call's frames (the path before the base view alone)."""
    from probe import video
    from probe.batch import evaluate_items
    from probe.mmmu import load_items
    from probe.sweep import SweepConfig
    from probe.zoo import organism_validation_dir

    loaded = load_model(resolve_model("organism-video"))
    items, _ = load_items(str(organism_validation_dir("video")))
    cfg = SweepConfig()
    new = evaluate_items(loaded, items, cfg, 32)
    monkeypatch.setattr(video, "_base_views", video._full_call_views)  # the path before
    old = evaluate_items(loaded, items, cfg, 32)
    assert len(new) == len(old) == len(items) == 96
    for a, b in zip(old, new):
        assert torch.equal(a.logp, b.logp) and a.response == b.response


def test_base_views_follow_the_processor_as_it_is_now(monkeypatch):
    """What anyres_base_views keeps between calls (the hook's signature check, per function) never serves another
    processor or setting: after a fast call, a processor of other settings (size, mean and std changed on the
    instance) gets the full call's view 0 of its own settings, and a hook patched onto the class by another
    signature gets no fast path (None: probe.video makes the full call)."""
    from probe.upstream import anyres_base_views

    ip = _pil_processor(**_CONFIGS["tall-grid"])
    frames = _frames()[:6]
    first = anyres_base_views(ip, frames)
    assert torch.equal(first, _full_view_0(ip, frames))
    monkeypatch.setattr(ip, "size", {"height": 48, "width": 48})
    monkeypatch.setattr(ip, "image_mean", [0.5, 0.5, 0.5])
    want = _full_view_0(ip, frames)
    got = anyres_base_views(ip, frames)
    assert got.shape[-1] == 48 != first.shape[-1] and torch.equal(got, want)
    real = type(ip).get_image_patches
    monkeypatch.setattr(type(ip), "get_image_patches",
                        lambda self, image, grid_pinpoints, size, patch_size, resample, extra=None:
                        real(self, image, grid_pinpoints, size, patch_size, resample))
    assert anyres_base_views(ip, frames) is None


# --- Qwen2-VL frames: the PIL image processor frame by frame, paired as the official video processor pairs them ----

def _qwen_oracle(ip, frames) -> tuple[torch.Tensor, list[int]]:
    """The oracle: each frame through the image processor's public call (its temporal copies are one frame),
    unpatchified, then padded (the last frame repeated) and patchified as transformers' Qwen2VLVideoProcessor does
    (its permutation, written out here since that module needs torchvision)."""
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    views = []
    for f in frames:
        out = ip(images=[f], return_tensors="pt")
        _, gh, gw = out["image_grid_thw"][0].tolist()
        x = out["pixel_values"].reshape(gh // m, gw // m, m, m, 3, tp, p, p)
        assert all(torch.equal(x[..., 0, :, :], x[..., k, :, :]) for k in range(tp))
        views.append(x[..., 0, :, :].permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p))
    v = torch.stack(views)[None]
    if pad := -v.shape[1] % tp:
        v = torch.cat((v, v[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
    _, n, c, h, w = v.shape
    gt, gh, gw = n // tp, h // p, w // p
    x = v.view(1, gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(gt * gh * gw, c * tp * p * p), [gt, gh, gw]


@pytest.mark.parametrize("settings", [
    {}, {"min_pixels": 56 * 56 * 4, "max_pixels": 28 * 28 * 20, "temporal_patch_size": 3},
    {"resample": 2, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1]},
    {"resample": 0, "rescale_factor": 1 / 127.0}, {"do_normalize": False}, {"do_rescale": False}])
def test_qwen2_vl_frames_follow_the_image_processor(settings, tmp_path):
    """pixel_values_videos, video_grid_thw and the token count equal the oracle's, exactly, for an odd frame count
    and the checkpoint's own settings (resample, rescale, normalise: before, the video path hard-coded bicubic,
    /255 and normalising, 0.58 off at resample 2 and 3.9 at rescale_factor 1/127)."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from probe import video

    ip = Qwen2VLImageProcessorPil(**settings)
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 256, (37, 100, 3), dtype=np.uint8)) for _ in range(5)]
    config = SimpleNamespace(video_token_id=7, image_token_id=8)
    loaded = SimpleNamespace(processor=SimpleNamespace(image_processor=ip), model=SimpleNamespace(config=config),
                             ref=SimpleNamespace(path=tmp_path))  # no processor files: the image processor's settings
    got = video._qwen2_vl(loaded, {"input_ids": torch.tensor([[1, 7, 2]]), "attention_mask": torch.ones(1, 3)}, frames)
    want, thw = _qwen_oracle(ip, frames)
    assert got["video_grid_thw"].tolist() == [thw]
    assert got["pixel_values_videos"].dtype == want.dtype == torch.float32
    assert torch.equal(got["pixel_values_videos"], want)
    assert int((got["input_ids"] == 7).sum()) == thw[0] * thw[1] * thw[2] // ip.merge_size ** 2


# the class settings that shape a frame
_FRAME_KEYS = ("size", "resample", "image_mean", "image_std", "do_resize", "do_rescale", "rescale_factor",
               "do_normalize", "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size")


def _class_defaults(module: str, cls: str) -> dict:
    """A transformers class's attribute defaults read from its source (the video modules import torchvision)."""
    import ast
    import importlib.util

    from transformers import image_utils

    path = importlib.util.find_spec(module.rpartition(".")[0]).submodule_search_locations[0]
    tree = ast.parse(open(f"{path}/{module.rpartition('.')[2]}.py", encoding="utf-8").read())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    values = {n.targets[0].id: n.value for n in body
              if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    return {k: eval(compile(ast.Expression(v), module, "eval"), vars(image_utils)) for k, v in values.items()
            if k in _FRAME_KEYS}


@pytest.mark.parametrize("family, module, cls, image_cls", [
    ("qwen2_vl", "transformers.models.qwen2_vl.video_processing_qwen2_vl", "Qwen2VLVideoProcessor",
     "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil"),
    ("llava_onevision", "transformers.models.llava_onevision.video_processing_llava_onevision",
     "LlavaOnevisionVideoProcessor",
     "transformers.models.llava_onevision.image_processing_pil_llava_onevision.LlavaOnevisionImageProcessorPil")])
def test_video_defaults_are_the_video_processors(family, module, cls, image_cls):
    """VIDEO_DEFAULTS is exactly where the installed video processor class's defaults differ from its image
    processor class's, for every setting that shapes a frame."""
    import importlib

    from probe.video import VIDEO_DEFAULTS

    video = _class_defaults(module, cls)
    mod, _, name = image_cls.rpartition(".")
    image = getattr(importlib.import_module(mod), name)
    differ = {k: v for k, v in video.items() if v != getattr(image, k, None)}
    assert differ == VIDEO_DEFAULTS[family]


@pytest.mark.parametrize("files, want", [
    ({}, {}),  # no processor files: the image processor as it is
    ({"preprocessor_config.json": {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 6}}, {"max_pixels": 28 * 28 * 6}),
    ({"preprocessor_config.json": {}}, {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}}),
    ({"video_preprocessor_config.json": {"max_pixels": 28 * 28 * 300, "image_mean": [0.5] * 3, "fps": 1.0},
      "preprocessor_config.json": {"max_pixels": 28 * 28 * 6}},
     {"min_pixels": 128 * 28 * 28, "max_pixels": 28 * 28 * 300, "image_mean": [0.5] * 3}),
    ({"processor_config.json": {"video_processor": {"min_pixels": 28 * 28 * 16, "max_pixels": 28 * 28 * 40}},
      "video_preprocessor_config.json": {"max_pixels": 28 * 28 * 300}},
     {"min_pixels": 28 * 28 * 16, "max_pixels": 28 * 28 * 40}),
    # a saved video processor's own "size" (as transformers writes it) over the class default's (mut46)
    ({"video_preprocessor_config.json": {"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 20}}},
     {"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 20}})])
def test_qwen2_vl_frames_follow_the_checkpoints_video_config(files, want, tmp_path):
    """Frames are sized and normalised by the settings transformers' video processor loads (nested
    processor_config.json, then video_preprocessor_config.json, then preprocessor_config.json, over the video class's
    defaults), not the image processor's (before: always the image's, 12 tokens for five 100×37 frames where the
    video processor's 128·28² minimum gives 399). Oracle: an image processor built from the expected settings."""
    import json
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from probe import video

    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data), encoding="utf-8")
    ip = Qwen2VLImageProcessorPil(max_pixels=28 * 28 * 6)  # the model's image processor: its own, smaller, sizes
    rng = np.random.default_rng(4)
    frames = [Image.fromarray(rng.integers(0, 256, (37, 100, 3), dtype=np.uint8)) for _ in range(5)]
    config = SimpleNamespace(video_token_id=7, image_token_id=8)
    loaded = SimpleNamespace(processor=SimpleNamespace(image_processor=ip), model=SimpleNamespace(config=config),
                             ref=SimpleNamespace(path=tmp_path))
    got = video._qwen2_5_vl(loaded, {"input_ids": torch.tensor([[1, 7, 2]]), "attention_mask": torch.ones(1, 3)},
                            frames)
    oracle = Qwen2VLImageProcessorPil(**want) if files else ip
    pix, thw = _qwen_oracle(oracle, frames)
    assert got["video_grid_thw"].tolist() == [thw] and torch.equal(got["pixel_values_videos"], pix)
    assert int((got["input_ids"] == 7).sum()) == thw[0] * thw[1] * thw[2] // 4
    assert got["second_per_grid_ts"].tolist() == [1.0]  # two frames a patch at 2 fps
    same = not files or want == {"max_pixels": 28 * 28 * 6}  # the video settings are the image processor's
    assert (video.frame_processor(loaded, video.VIDEO_DEFAULTS["qwen2_vl"]) is ip) == same


def test_llava_ov_7b_preprocessing_is_the_published_one():
    """probe.archs' llava-ov-7b image processor (random-weight builds) has the settings of
    llava-hf/llava-onevision-qwen2-7b-ov-hf's preprocessor_config.json (the HF conversion's: SigLIP's mean and std
    0.5, bicubic, 1/255, 384 px), not the class's CLIP defaults it had before (mean 0.481/0.458/0.408)."""
    from probe.archs import build_config, image_processor_for

    published = {"do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
                 "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}}
    got = image_processor_for("llava-ov-7b", build_config("llava-ov-7b")).to_dict()
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in got.items() if k in published} == published


def test_a_video_the_processor_refuses_is_bad_input_naming_the_item(load_tiny):
    """Frames one side 201 times the other: Qwen2-VL's smart_resize refuses them (ValueError, as it refuses such an
    image); the item is refused as an image is (BadInput naming it, exit 2), not a traceback (before: ValueError)."""
    import io

    from PIL import Image

    from probe.errors import BadInput
    from probe.mmmu import Item

    buf = io.BytesIO()
    Image.new("RGB", (402, 2), (9, 99, 200)).save(buf, "PNG")
    item = Item("validation_Motion_9", "Motion", "What moves? <video>", ("a", "b"), "A", (), (buf.getvalue(),) * 3)
    with pytest.raises(BadInput, match=r"item validation_Motion_9: .*processor refuses it \(absolute aspect ratio"):
        build_inputs(load_tiny("qwen2_vl"), item, PromptTemplate())


def test_onevision_frames_follow_the_checkpoints_video_config(tmp_path):
    """LLaVA-OneVision's frames too: a video_preprocessor_config.json of SigLIP's mean and std beside an image
    processor of CLIP's gives the frames view 0 of an image processor of the video config's settings (the oracle:
    its full call), and the token count of the tower's 64-px, patch-8 grid, pooled: 3·4² + 1."""
    import json
    from types import SimpleNamespace

    from probe import video

    video_cfg = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 64, "width": 64},
                 "image_grid_pinpoints": [[64, 64]],  # few tiles: a cheap full call
                 "video_processor_type": "LlavaOnevisionVideoProcessor"}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video_cfg), encoding="utf-8")
    ip = _pil_processor(**_CONFIGS["organism-size"])
    frames = _frames()[:3]
    vision = SimpleNamespace(image_size=64, patch_size=8)
    loaded = SimpleNamespace(processor=SimpleNamespace(image_processor=ip), ref=SimpleNamespace(path=tmp_path),
                             model=SimpleNamespace(config=SimpleNamespace(vision_config=vision, video_token_id=7)))
    got = video._llava_onevision(loaded, {"input_ids": torch.tensor([[1, 7, 2]]), "attention_mask": torch.ones(1, 3)},
                                 frames)
    want = _full_view_0(_pil_processor(**{k: v for k, v in video_cfg.items() if k != "video_processor_type"}), frames)
    assert torch.equal(got["pixel_values_videos"][0], want)
    assert not torch.equal(want, _full_view_0(ip, frames))  # the image processor's frames differ
    assert int((got["input_ids"] == 7).sum()) == 3 * 4 ** 2 + 1


@pytest.mark.parametrize("alias", ["tiny-qwen2-vl", "tiny-llava-ov"])
@pytest.mark.parametrize("n_frames", [1, 3])
def test_odd_and_single_frame_videos_give_the_tokens_the_models_embedding_takes(video_items, alias, n_frames):
    """One frame and an odd count (Qwen2-VL pairs frames along time, the last repeated): the prompt's video tokens
    are exactly as many as the model's own video features (oracle: the model's forward, which refuses a count that
    differs; one token fewer is refused, so the check is live), and Qwen2-VL's grid has ⌈F/2⌉ temporal patches."""
    import dataclasses

    loaded = load_model(resolve_model(alias))
    item = dataclasses.replace(video_items[0], frames=video_items[0].frames[:n_frames])
    batch = build_inputs(loaded, item, PromptTemplate())
    if "video_grid_thw" in batch:
        assert batch["video_grid_thw"][0, 0].item() == math.ceil(n_frames / 2)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**batch).logits).all()
    ids = batch["input_ids"][0]
    drop = int((ids == loaded.model.config.video_token_id).nonzero()[0])
    short = {**batch, "input_ids": torch.cat([ids[:drop], ids[drop + 1:]])[None],
             "attention_mask": batch["attention_mask"][:, 1:]}
    if "mm_token_type_ids" in batch:
        short["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"][0, :drop],
                                                batch["mm_token_type_ids"][0, drop + 1:]])[None]
    with pytest.raises(ValueError, match=r"(?i)video features and (video )?tokens do not match"), torch.no_grad():
        loaded.model(**short)


def _qwen_loaded(tmp_path):
    from types import SimpleNamespace

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = SimpleNamespace(video_token_id=7, image_token_id=8)
    return SimpleNamespace(processor=SimpleNamespace(image_processor=Qwen2VLImageProcessorPil()),
                           model=SimpleNamespace(config=config), ref=SimpleNamespace(path=tmp_path))


def test_a_second_qwen_video_placeholder_is_bad_input(tmp_path):
    """Qwen2-VL takes one video an item: a prompt holding its video token twice is refused (one line), not given
    one video's frames for the first and a bare token for the second (mut46: a check for more than two passed)."""
    from probe import video
    from probe.errors import BadInput

    frames = _frames()[:2]
    batch = {"input_ids": torch.tensor([[1, 7, 2, 7, 3]]), "attention_mask": torch.ones(1, 5)}
    with pytest.raises(BadInput, match="more than one video placeholder"):
        video._qwen2_vl(_qwen_loaded(tmp_path), batch, frames)


def test_a_fast_path_of_another_dtype_falls_back_to_the_full_call(monkeypatch):
    """The run-time check compares dtype too: a fast path giving the right values in float64 is not used; the item
    gets the full call's float32 tensors and the processor the full call from then on (mut46: a value-only check
    passed)."""
    from probe import upstream, video

    ip = _pil_processor(**_CONFIGS["organism-size"])
    frames = [f for f in _frames() if f.size == (64, 64)]
    real_fast = upstream.anyres_base_views
    monkeypatch.setattr(video, "anyres_base_views", lambda p, fr: real_fast(p, fr).double())
    got = video._base_views(ip, frames)
    want = _full_view_0(ip, frames)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    assert video._CHECKED[ip] is None


def test_onevision_video_tokens_for_an_odd_patch_grid_are_the_models(tmp_path):
    """A tower whose patch grid has an odd side (the 7B's 384 / 14 = 27; here 28 / 4 = 7): the model pools each
    frame to ⌈7/2⌉² = 16 tokens. Oracle: a random tiny LLaVA-OneVision's forward, which refuses a video token count
    other than its own features' (mut46: ⌊7/2⌋² = 9 passed every test, the tiny towers' grids being even)."""
    from types import SimpleNamespace

    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from probe import video

    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=4),
        text_config=dict(model_type="qwen2", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64),
        image_token_index=60, video_token_index=61, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    ip = _pil_processor(size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 28]])
    loaded = SimpleNamespace(processor=SimpleNamespace(image_processor=ip), ref=SimpleNamespace(path=tmp_path),
                             model=model)
    frames = _frames()[:3]
    batch = video._llava_onevision(loaded, {"input_ids": torch.tensor([[1, 61, 2]]),
                                            "attention_mask": torch.ones(1, 3, dtype=torch.long)}, frames)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] == 3 * 16 + 1 + 2
