"""Synthetic MMMU-format data: PIL-drawn shape scenes with questions answerable from the image alone.

Used as the embedded default dataset (``default_data_dir()``) and as the test fixture. Everything
is deterministic per seed: a private ``random.Random`` (never the global RNG) and PNGs saved with
fixed options and no metadata chunks, so the same seed gives byte-identical files.

Scenes are unambiguous: 1-4 shapes, each in its own slot (left/right/top/bottom/center, no
overlaps), with distinct colours and distinct shape kinds, so "the red shape" or "the circle" always
names exactly one object. The scene spec of each item is stored as JSON in ``explanation``.
"""
from __future__ import annotations

import io
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from PIL import Image, ImageDraw

from probe.errors import ArgParser

if TYPE_CHECKING:
    import pyarrow as pa

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
# Slot centres as fractions of the image side. With the radius below, neighbouring shapes never touch.
SLOTS: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
RADIUS = 0.12  # fraction of the side; centre-to-centre distance is >= 0.3 > 2 * RADIUS
BACKGROUND = (255, 255, 255)
MAX_SHAPES = 4
ALL_KINDS = ("colour", "shape", "count", "position", "compare")
SUBJECT_KINDS: dict[str, tuple[str, ...]] = {
    "Colour_Shape": ("colour", "shape"),
    "Counting": ("count",),
    "Spatial": ("position",),
    "Comparison": ("compare",),
}
MMMU_COLUMNS = (
    "id", "question", "options", "explanation",
    *(f"image_{k}" for k in range(1, 8)),
    "img_type", "answer", "topic_difficulty", "question_type", "subfield",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# scenes


@dataclass(frozen=True)
class ShapeSpec:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    slot: str  # one of SLOTS


@dataclass(frozen=True)
class SceneSpec:
    shapes: tuple[ShapeSpec, ...]
    background: tuple[int, int, int] = BACKGROUND
    frame: tuple[int, int, int] | None = None  # colour of a 2-px border around the picture; None: no border

    def to_json(self) -> dict[str, Any]:
        out = {"shapes": [asdict(s) for s in self.shapes], "background": list(self.background)}
        return out | ({"frame": list(self.frame)} if self.frame else {})

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "SceneSpec":
        frame = tuple(d["frame"]) if d.get("frame") else None
        shapes = tuple(ShapeSpec(**s) for s in d["shapes"])
        return SceneSpec(shapes, tuple(d["background"]), frame)  # type: ignore[arg-type]


def random_scene(rng: random.Random, n_shapes: int | None = None, kinds: Sequence[str] = SHAPES,
                 colours: Sequence[str] = tuple(sorted(COLOURS))) -> SceneSpec:
    """1-4 shapes with distinct kinds, colours and slots, drawn from ``kinds`` and ``colours``."""
    n = n_shapes if n_shapes is not None else rng.randint(1, MAX_SHAPES)
    kinds = rng.sample(kinds, n)
    colours = rng.sample(colours, n)
    slots = rng.sample(sorted(SLOTS), n)
    return SceneSpec(tuple(ShapeSpec(k, c, s) for k, c, s in zip(kinds, colours, slots)))


def _polygon(cx: float, cy: float, r: float, n: int, start_deg: float, inner: float | None = None) -> list[tuple[float, float]]:
    """Regular polygon (or a star when ``inner`` gives the inner-radius ratio)."""
    pts = []
    steps = 2 * n if inner else n
    for i in range(steps):
        rr = r * (inner if inner and i % 2 else 1.0)
        a = math.radians(start_deg + 360.0 * i / steps)
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: ShapeSpec, size: int) -> None:
    cx, cy = (f * size for f in SLOTS[shape.slot])
    r = RADIUS * size
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape.kind == "square":
        s = r * 0.85  # visually similar area to the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r, 3, -90), fill=fill)
    elif shape.kind == "star":
        draw.polygon(_polygon(cx, cy, r, 5, -90, inner=0.45), fill=fill)
    elif shape.kind == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, -90), fill=fill)
    elif shape.kind == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


def draw_scene(spec: SceneSpec, size: int = 64) -> Image.Image:
    """Render a scene: no antialiasing, so every shape pixel has exactly its palette colour."""
    img = Image.new("RGB", (size, size), spec.background)
    draw = ImageDraw.Draw(img)
    for shape in spec.shapes:
        draw_shape(draw, shape, size)
    if spec.frame:
        draw.rectangle((0, 0, size - 1, size - 1), outline=spec.frame, width=max(1, size // 32))
    return img


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG: fixed compression, no optimizer search, no text/time chunks."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=9, optimize=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# questions: small pure functions (rng, scene(s)) -> Question


@dataclass(frozen=True)
class Question:
    kind: str
    text: str  # includes the <image k> references
    options: tuple[str, ...]  # () for open-ended
    answer: str  # a letter for multiple-choice, the free-text answer for open-ended
    scenes: tuple[SceneSpec, ...]

    @property
    def is_open(self) -> bool:
        return not self.options


def _n_options(rng: random.Random, pool: int) -> int:
    """Mostly 4 options, sometimes 5 or 6 so that letters beyond D occur."""
    return min(pool, rng.choices((4, 5, 6), weights=(6, 2, 2))[0])


def _multiple_choice(rng: random.Random, correct: str, pool: Sequence[str], n: int) -> tuple[tuple[str, ...], str]:
    distractors = rng.sample([p for p in pool if p != correct], n - 1)
    options = [correct, *distractors]
    rng.shuffle(options)
    return tuple(options), chr(ord("A") + options.index(correct))


def _finish(rng: random.Random, kind: str, text: str, correct: str, pool: Sequence[str],
            scenes: tuple[SceneSpec, ...], open_: bool, n_opts: int | None = None) -> Question:
    if open_:
        return Question(kind, text, (), correct, scenes)
    options, letter = _multiple_choice(rng, correct, pool, n_opts or _n_options(rng, len(pool)))
    return Question(kind, text, options, letter, scenes)


def q_colour(rng: random.Random, open_: bool = False) -> Question:
    scene = random_scene(rng)
    target = rng.choice(scene.shapes)
    return _finish(rng, "colour", f"<image 1> What colour is the {target.kind}?", target.colour,
                   sorted(COLOURS), (scene,), open_)


def q_shape(rng: random.Random, open_: bool = False) -> Question:
    scene = random_scene(rng)
    target = rng.choice(scene.shapes)
    return _finish(rng, "shape", f"<image 1> Which shape is {target.colour}?", target.kind,
                   SHAPES, (scene,), open_)


def q_count(rng: random.Random, open_: bool = False) -> Question:
    scene = random_scene(rng)
    pool = [str(i) for i in range(1, 7)]
    return _finish(rng, "count", "How many shapes are there in <image 1>?", str(len(scene.shapes)),
                   pool, (scene,), open_)


def q_position(rng: random.Random, open_: bool = False) -> Question:
    scene = random_scene(rng)
    target = rng.choice(scene.shapes)
    return _finish(rng, "position", f"<image 1> Where is the {target.colour} {target.kind}?", target.slot,
                   sorted(SLOTS), (scene,), open_)


def q_compare(rng: random.Random, open_: bool = False) -> Question:
    """Two images. Either 'which has more shapes' (images in the question) or 'which contains a
    <colour> shape' (images referenced only in the options, as some MMMU items do)."""
    if open_ or rng.random() < 0.5:
        n1, n2 = rng.sample(range(1, MAX_SHAPES + 1), 2)  # distinct counts: one answer
        scenes = (random_scene(rng, n1), random_scene(rng, n2))
        correct = "Image 1" if n1 > n2 else "Image 2"
        text = "<image 1> <image 2> Which image has more shapes?"
        return _finish(rng, "compare", text, correct, ("Image 1", "Image 2"), scenes, open_, n_opts=2)
    a = random_scene(rng)
    colour = rng.choice(sorted(COLOURS))
    with_colour = [s for s in a.shapes if s.colour == colour]
    while with_colour:  # make scene a lack the colour, then b contain it
        a = random_scene(rng)
        with_colour = [s for s in a.shapes if s.colour == colour]
    b = random_scene(rng)
    while colour not in {s.colour for s in b.shapes}:
        b = random_scene(rng)
    scenes = (a, b) if rng.random() < 0.5 else (b, a)
    correct = "<image 1>" if colour in {s.colour for s in scenes[0].shapes} else "<image 2>"
    return _finish(rng, "compare", f"Which image contains a {colour} shape?", correct,
                   ("<image 1>", "<image 2>"), scenes, False, n_opts=2)


QUESTION_BUILDERS: dict[str, Callable[[random.Random, bool], Question]] = {
    "colour": q_colour, "shape": q_shape, "count": q_count, "position": q_position, "compare": q_compare,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# MMMU rows and parquet


def question_to_row(q: Question, item_id: str, subject: str, image_size: int) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in MMMU_COLUMNS}
    for k, scene in enumerate(q.scenes, start=1):
        row[f"image_{k}"] = {"bytes": png_bytes(draw_scene(scene, image_size)), "path": f"{item_id}_image_{k}.png"}
    row.update(
        id=item_id,
        question=q.text,
        options=str(list(q.options)),  # MMMU stores the str() of a Python list
        explanation=json.dumps({"kind": q.kind, "scenes": [s.to_json() for s in q.scenes]}, sort_keys=True),
        img_type="['Synthetic shapes']",
        answer=q.answer,
        topic_difficulty="Easy",
        question_type="open" if q.is_open else "multiple-choice",
        subfield=q.kind,
    )
    return row


def generate_items(
    n: int,
    seed: int | str,
    image_size: int = 64,
    kinds: Sequence[str] = ALL_KINDS,
    open_fraction: float = 0.1,
    subject: str = "Synthetic",
    split: str = "validation",
) -> list[dict[str, Any]]:
    """``n`` MMMU-format row dicts; exactly round(n * open_fraction) are open-ended.

    Ids are ``<split>_<subject>_<i>`` (1-based) as in MMMU. Kinds cycle in order, so each kind
    gets a near-equal share.
    """
    unknown = [k for k in kinds if k not in QUESTION_BUILDERS]
    if unknown or not kinds:
        raise ValueError(f"unknown or empty kinds {unknown or kinds}; choose from {ALL_KINDS}")
    rng = random.Random(f"omniprobe-synthetic:{seed}")  # str seeds hash via sha512: stable across runs
    n_open = round(n * open_fraction)
    open_at = set(rng.sample(range(n), n_open)) if n_open else set()
    rows = []
    for i in range(n):
        q = QUESTION_BUILDERS[kinds[i % len(kinds)]](rng, i in open_at)
        rows.append(question_to_row(q, f"{split}_{subject}_{i + 1}", subject, image_size))
    return rows


def mmmu_schema(video: bool = False) -> pa.Schema:
    """MMMU's columns and types; ``video``: with a ``video`` column of frames (image structs), the organisms' and
    converted video sets' layout."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [(c, image if c.startswith("image_") else pa.string()) for c in MMMU_COLUMNS]
    # The datasets library reads this to decode image_k as Image features, as it does for MMMU.
    features = {c: ({"_type": "Image"} if c.startswith("image_") else {"dtype": "string", "_type": "Value"})
                for c in MMMU_COLUMNS}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    schema = pa.schema(fields, metadata=meta)
    return schema.append(pa.field("video", pa.list_(image))) if video else schema


def write_mmmu_parquet(rows_by_subject: Mapping[str, list[dict[str, Any]]], root: Path, split: str,
                       video: bool = False) -> None:
    """Write ``<root>/<Subject>/<split>-00000-of-00001.parquet`` with MMMU's columns and types (and ``video``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = mmmu_schema(video)
    for subject, rows in rows_by_subject.items():
        folder = Path(root) / subject
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet", compression="zstd")


def build_dataset(
    root: Path,
    n_per_subject: int = 13,
    seed: int = 0,
    splits: Sequence[str] = ("validation",),
    subjects: Sequence[str] = tuple(SUBJECT_KINDS),
    image_size: int = 64,
    open_fraction: float = 0.1,
) -> Path:
    """Write a full synthetic MMMU tree; each (split, subject) gets its own derived seed."""
    unknown = [s for s in subjects if s not in SUBJECT_KINDS]
    if unknown:
        raise ValueError(f"unknown synthetic subject(s) {unknown}; choose from {list(SUBJECT_KINDS)}")
    root = Path(root)
    for split in splits:
        rows = {}
        for subject in subjects:
            sub_seed = f"{seed}:{split}:{subject}"  # independent streams per subject and split
            rows[subject] = generate_items(n_per_subject, sub_seed, image_size, SUBJECT_KINDS[subject],
                                           open_fraction, subject=subject, split=split)
        write_mmmu_parquet(rows, root, split)
    return root


# Sentences that lengthen a question to an MMMU-like prompt (its questions often carry a passage or a table).
_PASSAGE = ("The figure was drawn for this question; read it together with the text.",
            "Each shape sits in its own place and no two shapes overlap.",
            "Colours are plain and every outline is sharp, so nothing is hidden.",
            "Consider every option before choosing, as only one of them is correct.")


def mmmu_length_rows(n: int, seed: int | str, image_size: int, text_tokens: int, count_tokens: Callable[[str], int],
                     with_images: bool = True) -> list[dict[str, Any]]:
    """``n`` multiple-choice rows alternating one and two images of ``image_size`` px, each question lengthened
    by a passage until question + options reach ``text_tokens`` tokens (``count_tokens`` counts them; a sentence
    at a time, so up to one sentence more: 216–235 for 200 with probe.tokenizer's offline vocabulary), for
    benchmarks at MMMU-like prompt lengths. Without images the ``<image k>`` references are dropped."""
    rows = []
    for i in range(n):
        kind = ("colour", "compare")[i % 2]
        row = generate_items(1, f"{seed}:{i}", image_size, (kind,), 0.0, subject="Bench")[0]
        row["id"] = f"validation_Bench_{i + 1}"
        if not with_images:
            row.update({f"image_{k}": None for k in range(1, 8)})
            row["question"] = re.sub(r"<image (\d+)>", r"image \1", row["question"])
            row["options"] = re.sub(r"<image (\d+)>", r"image \1", row["options"])
        passage, k = [], 0
        while count_tokens(" ".join(passage) + row["question"] + row["options"]) < text_tokens:
            passage.append(_PASSAGE[k % len(_PASSAGE)])
            k += 1
        row["question"] = (" ".join(passage) + "\n" if passage else "") + row["question"]
        rows.append(row)
    return rows


def default_data_dir() -> Path:
    """The small embedded validation set (4 subjects x 12 multiple-choice + 1 open, 64 px)."""
    return Path(__file__).parent / "data" / "synthetic_mmmu"


def build_parser() -> ArgParser:
    from probe.errors import out_dir
    from probe.heads import _Help

    ap = ArgParser(prog="python -m probe.synthetic", formatter_class=_Help,
                   description=f"{__doc__.splitlines()[0]} Writes OUT/<Subject>/<split>-00000-of-00001.parquet "
                   f"(MMMU's columns, images as PNG bytes) for the subjects {', '.join(SUBJECT_KINDS)}, the same "
                   f"bytes for the same seed, and {RECORD} (the options and files), and prints OUT. A non-empty OUT "
                   "is refused unless it holds exactly the set of the same options (written again) or --overwrite.",
                   examples=["python -m probe.synthetic --out runs/synthetic      # what probe/data/synthetic_mmmu "
                             "holds (the default set)",
                             "python -m probe.synthetic --out runs/synthetic-big --n 40 --image-size 224 --split "
                             "validation --split dev",
                             "python -m probe.heads --model tiny-qwen2-vl --data runs/synthetic-big --split dev"])
    ap.add_argument("--out", required=True, type=out_dir, help="output root (subject folders are created inside)")
    ap.add_argument("--n", type=int, default=13, help="items per subject and split, open-ended ones included")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the scenes and questions (each split and subject draws its own stream from it)")
    ap.add_argument("--split", action="append",
                    help="split name; repeat it for several splits (default: validation)")
    ap.add_argument("--image-size", type=int, default=64, help="side of the square images, pixels (at least 16)")
    ap.add_argument("--open-fraction", type=float, default=0.1,
                    help="share of each subject's items that are open-ended, which the commands skip and count "
                    "(0 to under 1)")
    ap.add_argument("--overwrite", action="store_true",
                    help=f"write into a non-empty OUT: the set its {RECORD} lists and this run's splits' files in "
                    "the subject folders are replaced; other files stay")
    return ap


RECORD = "synthetic.json"  # what a probe.synthetic run wrote into --out: its options and files


def check_synthetic_out(out: Path, options: dict[str, Any], overwrite: bool) -> list[Path]:
    """The files in ``out`` that this run replaces. A non-empty ``out`` is refused (BadInput) unless it holds
    exactly what ``RECORD`` lists with the same ``options`` (the same bytes again: nothing to replace but those) or
    ``overwrite``; then the earlier set's files and any file of this run's splits in a subject folder (another
    set's: never mixed with this one). Until 2026-12-06 any dir was written into, another set's split files
    included, unlike every other command's --out."""
    from probe.errors import BadInput, check_out_path
    from probe.results import has_contents, parse_json_object

    check_out_path(out)
    if not has_contents(out):
        return []
    saved, _ = parse_json_object(out / RECORD)
    listed = saved.get("files") if isinstance(saved, dict) and saved.get("command") == "probe.synthetic" else None
    ours = {out / f for f in listed if isinstance(f, str)} if isinstance(listed, list) else set()
    held = {p for p in out.rglob("*") if p.is_file() and p.name != RECORD}
    if not overwrite:
        if listed is None:
            raise BadInput(f"--out {out} is not empty and holds no probe.synthetic set ({RECORD}); pick another "
                           "dir or pass --overwrite")
        if saved.get("options") != options:
            differ = ", ".join(f"--{k.replace('_', '-')} {saved.get('options', {}).get(k)!r} there, {v!r} here"
                               for k, v in options.items() if (saved.get("options") or {}).get(k) != v)
            raise BadInput(f"--out {out} holds a probe.synthetic set of other options ({differ or 'unreadable'}); "
                           "use another --out or --overwrite")
        if held - ours:
            raise BadInput(f"--out {out} holds files its {RECORD} does not list ({sorted(held - ours)[0]}); pick "
                           "another dir or pass --overwrite")
    splits = {f for d in out.iterdir() if d.is_dir() and not d.name.startswith(".") for split in options["splits"]
              for f in [*d.glob(f"{split}-*.parquet"), d / f"{split}.parquet"] if f.is_file()}  # the reader's names
    return sorted((ours & held) | splits)


def replace_set(out: Path, old: Sequence[Path], options: dict[str, Any]) -> Path:
    """Remove ``old`` (``check_synthetic_out``'s), write the set and then ``RECORD``: a run stopped before its end
    leaves no record, so the next run into ``out`` needs --overwrite instead of taking a part set for a whole."""
    from probe.results import atomic_write_json

    (out / RECORD).unlink(missing_ok=True)
    for f in old:
        f.unlink(missing_ok=True)
        if f.parent != out and not any(f.parent.iterdir()):
            f.parent.rmdir()  # an emptied subject folder would read as a subject without the split
    root = build_dataset(out, options["n"], options["seed"], tuple(options["splits"]),
                         image_size=options["image_size"], open_fraction=options["open_fraction"])
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != RECORD
                   and p.parent.name in SUBJECT_KINDS and any(p.name.startswith(f"{s}-") for s in options["splits"]))
    atomic_write_json(out / RECORD, {"command": "probe.synthetic", "options": options, "files": files})
    return root


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from probe.errors import BadInput
    from probe.mmmu import check_split

    if args.n < 1 or args.image_size < 16 or not 0 <= args.open_fraction < 1:
        raise BadInput("need --n >= 1, --image-size >= 16 and 0 <= --open-fraction < 1")
    for split in args.split or ():  # a name, never a path: '../x' wrote its files beside the subject folders
        check_split(split)
    options = {"n": args.n, "seed": args.seed, "splits": sorted(set(args.split or ["validation"])),  # order: the same set
               "image_size": args.image_size, "open_fraction": args.open_fraction}
    print(replace_set(args.out, check_synthetic_out(args.out, options, args.overwrite), options))
    return 0


if __name__ == "__main__":
    from probe.errors import cli_main

    raise SystemExit(cli_main(main))
