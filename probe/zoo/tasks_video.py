"""Short frame-sequence questions in MMMU format (a ``video`` column of PNG frames, ``<video>`` in the question).

Subjects: **Motion** (which way does a shape move), **Order** (shapes flash one per frame: which colour comes
first / last), **Change** (what colour is the shape first / last). Every frame carries a progress bar along
its bottom edge (length ∝ frame number, like a player's time bar): LLaVA-OneVision's tower sees each frame alone,
so without it a frame's tokens cannot say *when* they are. Options in a canonical order (see
``probe.zoo.tasks_image``). Four frames per video by default, drawn with PIL (no antialiasing, fixed palette,
deterministic PNG bytes). Deterministic per seed.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw

from probe.synthetic import BACKGROUND, COLOURS, MMMU_COLUMNS, RADIUS, SLOTS, _polygon, png_bytes, write_mmmu_parquet
from probe.zoo.tasks_image import COLOUR_OPTIONS, FRAME

SUBJECTS: tuple[str, ...] = ("Motion", "Order", "Change")
KINDS = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
N_FRAMES = 4
# (question, options, answer letter, frames: per frame its shapes as (kind, colour, x, y))
VideoQuestion = tuple[str, list[str], str, list[list[tuple[str, str, float, float]]]]


def _draw(draw: ImageDraw.ImageDraw, kind: str, colour: str, fx: float, fy: float, size: int) -> None:
    cx, cy, r, fill = fx * size, fy * size, RADIUS * size, COLOURS[colour]
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon(_polygon(cx, cy + r * 0.15, r, 3, -90), fill=fill)


BAR = FRAME  # the progress bar in the grey of the pictures' frame


def render_images(frames: list[list[tuple[str, str, float, float]]], size: int) -> list[Image.Image]:
    """Each frame is a list of (kind, colour, x, y) with x, y fractions of the side; frame t of n gets a
    progress bar (t + 1) / n of the width along the bottom (drawn over anything there)."""
    out = []
    for t, shapes in enumerate(frames):
        img = Image.new("RGB", (size, size), BACKGROUND)
        d = ImageDraw.Draw(img)
        for kind, colour, x, y in shapes:
            _draw(d, kind, colour, x, y, size)
        d.rectangle((0, size - max(2, size // 16), round((t + 1) / len(frames) * size) - 1, size - 1), fill=BAR)
        out.append(img)
    return out


def render(frames: list[list[tuple[str, str, float, float]]], size: int) -> list[bytes]:
    return [png_bytes(img) for img in render_images(frames, size)]


def q_motion(rng: random.Random, n_frames: int) -> VideoQuestion:
    direction = rng.choice(sorted(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    kind, other_kind = rng.sample(KINDS, 2)
    colour, other_colour = rng.sample(COLOUR_OPTIONS, 2)
    cross = rng.uniform(0.3, 0.7)  # coordinate across the motion axis
    frames = []
    for t in range(n_frames):
        along = 0.2 + 0.6 * t / (n_frames - 1)
        along = along if dx + dy > 0 else 1.0 - along
        x, y = (along, cross) if dx else (cross, along)
        frames.append([(kind, colour, x, y)])
    if rng.random() < 0.5:  # a static distractor in a corner away from the path
        ox, oy = rng.choice(((0.12, 0.12), (0.88, 0.88), (0.12, 0.88), (0.88, 0.12)))
        for f in frames:
            f.insert(0, (other_kind, other_colour, ox, oy))
    options = sorted(DIRECTIONS)
    answer = chr(ord("A") + options.index(direction))
    return f"<video> Which way does the {colour} {kind} move?", options, answer, frames


def q_order(rng: random.Random, n_frames: int) -> VideoQuestion:
    """One shape per frame, each in its own colour (colours repeat only past four frames) and slot."""
    n = len(COLOUR_OPTIONS)
    colours = [c for _ in range(0, n_frames, n) for c in rng.sample(COLOUR_OPTIONS, n)]
    slots = [rng.choice(sorted(SLOTS)) for _ in range(n_frames)]
    frames = [[(rng.choice(KINDS), colours[t], *SLOTS[slots[t]])] for t in range(n_frames)]
    which = rng.choice(("first", "last"))
    correct = colours[0] if which == "first" else colours[n_frames - 1]
    options = list(COLOUR_OPTIONS)
    answer = chr(ord("A") + options.index(correct))
    return f"<video> Which colour appears {which}?", options, answer, frames


def q_change(rng: random.Random, n_frames: int) -> VideoQuestion:
    kind = rng.choice(KINDS)
    start, end = rng.sample(COLOUR_OPTIONS, 2)
    at = rng.randint(1, n_frames - 1)
    x, y = SLOTS[rng.choice(sorted(SLOTS))]
    frames = [[(kind, start if t < at else end, x, y)] for t in range(n_frames)]
    which = rng.choice(("first", "last"))  # Order's words: the same reading (frame 1 / last frame) learnt once
    correct = start if which == "first" else end
    options = list(COLOUR_OPTIONS)
    return (f"<video> The {kind} changes colour. What colour is it {which}?", options,
            chr(ord("A") + options.index(correct)), frames)


BUILDERS: dict[str, Callable[[random.Random, int], VideoQuestion]] = {
    "Motion": q_motion, "Order": q_order, "Change": q_change,
}


def generate_rows(n: int, seed: int | str, subject: str, split: str, size: int = 64,
                  n_frames: int = N_FRAMES) -> list[dict[str, Any]]:
    rng = random.Random(f"omniprobe-video:{seed}:{split}:{subject}")
    rows = []
    for i in range(n):
        text, options, answer, frames = BUILDERS[subject](rng, n_frames)
        item_id = f"{split}_{subject}_{i + 1}"
        row: dict[str, Any] = {c: None for c in MMMU_COLUMNS}
        row.update(id=item_id, question=text, options=str(list(options)),
                   explanation=json.dumps({"frames": frames}), img_type="['Synthetic video']", answer=answer,
                   topic_difficulty="Easy", question_type="multiple-choice", subfield=subject.lower())
        row["video"] = [{"bytes": b, "path": f"{item_id}_frame_{k}.png"}
                        for k, b in enumerate(render(frames, size))]
        rows.append(row)
    return rows


def build_video_dataset(root: Path, n_per_subject: dict[str, int], seed: int = 0, size: int = 64,
                        subjects: tuple[str, ...] = SUBJECTS) -> None:
    for split, n in n_per_subject.items():
        write_mmmu_parquet({s: generate_rows(n, seed, s, split, size) for s in subjects}, root, split, video=True)
