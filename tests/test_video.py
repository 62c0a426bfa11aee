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
