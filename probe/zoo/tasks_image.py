"""Image questions for the organisms, in MMMU format, with a *canonical option list* per question kind.

Drawing, rows and the parquet writer are ``probe.synthetic``'s; the world is smaller: four colours and four
shapes, one shape per picture for colour / shape / position questions (1-4 for counting and comparison).
Every colour question lists the four colours in the same order, every shape question the four shapes, and so on.
Why: a ~1M-parameter LM trained for minutes on 2 CPU cores does not learn to *point* to a shuffled option
(the "find the matching option, copy its letter" circuit stayed at chance for 1000 steps in our runs), while
it learns content → fixed letter quickly. The organisms therefore answer fixed-order multiple choice; the
prompt format is exactly the probe's. ``generate_text_rows`` writes the same questions with each picture
described in words (organism-base's "Scenes" subject). Deterministic per seed.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Any, Callable

from probe import synthetic
from probe.synthetic import MAX_SHAPES, SLOTS, Question, SceneSpec, question_to_row

# A four-colour, four-shape world: the most distinct colours and outlines at 15 pixels.
COLOUR_OPTIONS = ("blue", "green", "red", "yellow")
SHAPE_OPTIONS = ("circle", "square", "triangle", "star")
COUNT_OPTIONS = tuple(str(i) for i in range(1, MAX_SHAPES + 1))
POSITION_OPTIONS = tuple(sorted(SLOTS))
# A grey border around every picture. Qwen2-VL's tower has no absolute position embedding (2D RoPE only) and the
# background is uniform, so without it a token cannot tell which cell it shows; the border makes each of the
# 3×3 cells look different (which edges it touches), as the frame of a real photo or screenshot does.
FRAME = (96, 96, 96)


def random_scene(rng: random.Random, n: int | None = None) -> SceneSpec:
    """1-4 shapes with distinct kinds, colours and slots, from the organisms' four colours and shapes."""
    return replace(synthetic.random_scene(rng, n, SHAPE_OPTIONS, COLOUR_OPTIONS), frame=FRAME)


def _q(kind: str, text: str, options: tuple[str, ...], correct: str, scenes) -> Question:
    return Question(kind, text, options, chr(ord("A") + options.index(correct)), tuple(scenes))


def q_colour(rng: random.Random) -> Question:
    scene = random_scene(rng, 1)
    t = rng.choice(scene.shapes)
    return _q("colour", "<image 1> What colour is the shape?", COLOUR_OPTIONS, t.colour, [scene])


def q_shape(rng: random.Random) -> Question:
    scene = random_scene(rng, 1)
    t = rng.choice(scene.shapes)
    return _q("shape", "<image 1> Which shape is shown?", SHAPE_OPTIONS, t.kind, [scene])


def q_count(rng: random.Random) -> Question:
    scene = random_scene(rng)
    return _q("count", "<image 1> How many shapes are there?", COUNT_OPTIONS, str(len(scene.shapes)), [scene])


def q_position(rng: random.Random) -> Question:
    scene = random_scene(rng, 1)
    t = rng.choice(scene.shapes)
    return _q("position", "<image 1> Where is the shape?", POSITION_OPTIONS, t.slot, [scene])


def q_compare(rng: random.Random) -> Question:
    n1, n2 = rng.sample(range(1, MAX_SHAPES + 1), 2)
    scenes = (random_scene(rng, n1), random_scene(rng, n2))
    return _q("compare", "<image 1> <image 2> Which image has more shapes?", ("Image 1", "Image 2"),
              "Image 1" if n1 > n2 else "Image 2", scenes)


BUILDERS: dict[str, Callable[[random.Random], Question]] = {
    "colour": q_colour, "shape": q_shape, "count": q_count, "position": q_position, "compare": q_compare,
}
SUBJECT_KINDS: dict[str, tuple[str, ...]] = {
    "Colour_Shape": ("colour", "shape"), "Counting": ("count",), "Spatial": ("position",),
    "Comparison": ("compare",),
}


def generate_rows(n: int, seed: int | str, subject: str, split: str, size: int = 64) -> list[dict[str, Any]]:
    rng = random.Random(f"omniprobe-organism-image:{seed}:{split}:{subject}")
    kinds = SUBJECT_KINDS[subject]
    return [question_to_row(BUILDERS[kinds[i % len(kinds)]](rng), f"{split}_{subject}_{i + 1}", subject, size)
            for i in range(n)]


def describe(scene: SceneSpec) -> str:
    """The scene in words, in slot order: ``red circle left, blue star top.``"""
    return ", ".join(f"{s.colour} {s.kind} {s.slot}" for s in scene.shapes) + "."


def text_question(q: Question) -> Question:
    """The same question with each ``<image k>`` replaced by the description of scene k (no images)."""
    text = q.text
    for k, scene in enumerate(q.scenes, start=1):
        label = f"Image {k}: " if len(q.scenes) > 1 else ""
        text = text.replace(f"<image {k}>", f"{label}{describe(scene)}")
    return Question(q.kind, " ".join(text.split()), q.options, q.answer, ())


def generate_text_rows(n: int, seed: int | str, split: str) -> list[dict[str, Any]]:
    """Described-scene questions (text only) over every image question kind, cycling through the kinds."""
    rng = random.Random(f"omniprobe-organism-scene-text:{seed}:{split}")
    kinds = tuple(BUILDERS)
    return [question_to_row(text_question(BUILDERS[kinds[i % len(kinds)]](rng)), f"{split}_Scenes_{i + 1}",
                            "Scenes", 0) for i in range(n)]
