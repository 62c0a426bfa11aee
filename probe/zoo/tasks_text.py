"""Text multiple-choice tasks in MMMU format: knowledge, two-step reasoning and instruction following.

- **Knowledge**: facts about a small generated world (country → capital, country → animal, country → river).
  The world is fixed by ``WORLD_SEED``; train and validation ask the *same* 36 facts (closed-book recall, like
  the knowledge benchmarks of the paper's question 1), each with its own fixed four options.
- **Reasoning**: two-step arithmetic stories ("Ann has 3 coins. Bob has 2 more coins than Ann. ..."), the
  options always 1-6 in order.
- **Instruction**: answer-format instructions ("Answer with the letter C.", "choose the first / last option"
  with 3-6 options).

Options come in a canonical order per question (see ``probe.zoo.tasks_image`` for why: tiny models trained for
minutes do not learn to point to a shuffled option).

Deterministic per seed: a private ``random.Random`` seeded with a string (stable across runs), no global RNG.
Rows use ``probe.synthetic``'s MMMU columns, with no image columns set.
"""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any, Callable

from probe.synthetic import MMMU_COLUMNS, write_mmmu_parquet

WORLD_SEED = "omniprobe-world-v1"
SUBJECTS: tuple[str, ...] = ("Knowledge", "Reasoning", "Instruction")
_SYL = ("ka", "lo", "mi", "ra", "zu", "te", "vo", "ni", "sa", "do", "be", "gu")
NAMES = ("Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lia")
WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "candle", "forest", "window", "silver",
         "garden", "rocket", "pencil", "island", "mirror", "bottle")
ANIMALS = ("fox", "owl", "bear", "wolf", "hare", "lynx", "crow", "seal", "deer", "frog", "swan", "mole")
N_COUNTRIES = 12


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(n)).capitalize()


@functools.lru_cache(maxsize=1)
def world() -> dict[str, dict[str, str]]:
    """country → {capital, animal, river}: 12 countries, 36 facts, fixed by WORLD_SEED."""
    rng = random.Random(WORLD_SEED)
    names: list[str] = []
    while len(names) < 3 * N_COUNTRIES:
        w = _word(rng, 2 + len(names) % 2)
        if w not in names:
            names.append(w)
    countries, capitals, rivers = names[:N_COUNTRIES], names[N_COUNTRIES:2 * N_COUNTRIES], names[2 * N_COUNTRIES:]
    animals = list(ANIMALS)
    rng.shuffle(animals)
    return {c: {"capital": capitals[i], "animal": animals[i], "river": rivers[i]} for i, c in enumerate(countries)}


_RELATIONS = {
    "capital": "What is the capital of {c}?",
    "animal": "Which animal is the symbol of {c}?",
    "river": "Which river flows through {c}?",
}


def _mc(rng: random.Random, correct: str, pool: list[str], n: int = 4) -> tuple[list[str], str]:
    options = [correct, *rng.sample(sorted(set(pool) - {correct}), n - 1)]
    rng.shuffle(options)
    return options, chr(ord("A") + options.index(correct))


def q_knowledge(rng: random.Random) -> tuple[str, list[str], str, dict]:
    w = world()
    country = rng.choice(sorted(w))
    rel = rng.choice(sorted(_RELATIONS))
    pool = [facts[rel] for facts in w.values()]
    # Fixed options per fact: distractors and order drawn from a generator seeded by the fact itself.
    options, answer = _mc(random.Random(f"{WORLD_SEED}:{country}:{rel}"), w[country][rel], pool)
    return _RELATIONS[rel].format(c=country), options, answer, {"country": country, "relation": rel}


def q_reasoning(rng: random.Random) -> tuple[str, list[str], str, dict]:
    a, b = rng.sample(NAMES, 2)
    d = rng.randint(1, 2)
    y = rng.randint(1, 6)
    if rng.random() < 0.5 and y > d:
        x, rel = y - d, "more"
    elif y + d <= 6:
        x, rel = y + d, "fewer"
    else:
        x, rel = y - d, "more"
    thing = rng.choice(("coins", "books", "cards"))
    text = f"{a} has {x} {thing}. {b} has {d} {rel} {thing} than {a}. How many {thing} does {b} have?"
    options = [str(i) for i in range(1, 7)]
    return text, options, chr(ord("A") + options.index(str(y))), {"x": x, "d": d, "rel": rel}


def q_instruction(rng: random.Random) -> tuple[str, list[str], str, dict]:
    kind = rng.choice(("last", "letter", "first"))
    words = rng.sample(WORDS, rng.randint(3, 6))
    if kind == "last":
        return "Ignore the meaning and choose the last option.", words, chr(ord("A") + len(words) - 1), {"kind": kind}
    if kind == "first":
        return "Ignore the meaning and choose the first option.", words, "A", {"kind": kind}
    letter = chr(ord("A") + rng.randrange(len(words)))
    return f"Answer with the letter {letter}.", words, letter, {"kind": kind}


BUILDERS: dict[str, Callable[[random.Random], tuple[str, list[str], str, dict]]] = {
    "Knowledge": q_knowledge, "Reasoning": q_reasoning, "Instruction": q_instruction,
}


def generate_rows(n: int, seed: int | str, subject: str, split: str) -> list[dict[str, Any]]:
    rng = random.Random(f"omniprobe-text:{seed}:{split}:{subject}")
    rows = []
    for i in range(n):
        text, options, answer, meta = BUILDERS[subject](rng)
        row: dict[str, Any] = {c: None for c in MMMU_COLUMNS}
        row.update(id=f"{split}_{subject}_{i + 1}", question=text, options=str(list(options)),
                   explanation=json.dumps(meta, sort_keys=True), img_type="[]", answer=answer,
                   topic_difficulty="Easy", question_type="multiple-choice", subfield=subject.lower())
        rows.append(row)
    return rows


def build_text_dataset(root: Path, n_per_subject: dict[str, int], seed: int = 0,
                       subjects: tuple[str, ...] = SUBJECTS) -> None:
    """``<root>/<Subject>/<split>-00000-of-00001.parquet`` for each split in ``n_per_subject``."""
    for split, n in n_per_subject.items():
        write_mmmu_parquet({s: generate_rows(n, seed, s, split) for s in subjects}, root, split)
