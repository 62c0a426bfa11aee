"""Image questions for the organisms, in MMMU format, with a *canonical option list* per question kind.

Scenes, drawing, rows and the parquet writer are ``probe.synthetic``'s; only the options differ: every
colour question lists the six colours in the same order, every shape question the six shapes, and so on.
Why: a ~1M-parameter LM trained for minutes on 2 CPU cores does not learn to *point* to a shuffled option
(the "find the matching option, copy its letter" circuit stayed at chance for 1000 steps in our runs), while
it learns content → fixed letter quickly. The organisms therefore answer fixed-order multiple choice; the
prompt format is exactly the probe's. Deterministic per seed.
"""
from __future__ import annotations

import random
from typing import Any, Callable

from probe.synthetic import COLOURS, MAX_SHAPES, SHAPES, SLOTS, Question, question_to_row, random_scene

COLOUR_OPTIONS = tuple(sorted(COLOURS))
SHAPE_OPTIONS = tuple(SHAPES)
COUNT_OPTIONS = tuple(str(i) for i in range(1, MAX_SHAPES + 1))
POSITION_OPTIONS = tuple(sorted(SLOTS))


def _q(kind: str, text: str, options: tuple[str, ...], correct: str, scenes) -> Question:
    return Question(kind, text, options, chr(ord("A") + options.index(correct)), tuple(scenes))


def q_colour(rng: random.Random) -> Question:
    scene = random_scene(rng)
    t = rng.choice(scene.shapes)
    return _q("colour", f"<image 1> What colour is the {t.kind}?", COLOUR_OPTIONS, t.colour, [scene])


def q_shape(rng: random.Random) -> Question:
    scene = random_scene(rng)
    t = rng.choice(scene.shapes)
    return _q("shape", f"<image 1> Which shape is {t.colour}?", SHAPE_OPTIONS, t.kind, [scene])


def q_count(rng: random.Random) -> Question:
    scene = random_scene(rng)
    return _q("count", "How many shapes are there in <image 1>?", COUNT_OPTIONS, str(len(scene.shapes)), [scene])


def q_position(rng: random.Random) -> Question:
    scene = random_scene(rng)
    t = rng.choice(scene.shapes)
    return _q("position", f"<image 1> Where is the {t.colour} {t.kind}?", POSITION_OPTIONS, t.slot, [scene])


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
