"""Load MMMU (or anything in its Hugging Face parquet layout) into validated, deterministic items.

Layout after a hub download of ``MMMU/MMMU``: ``<root>/<Subject>/<split>-XXXXX-of-XXXXX.parquet``.
A directory that directly holds ``<split>-*.parquet`` (or ``<split>.parquet``) files is accepted as a single
subject named after the directory. Only multiple-choice items are kept; open-ended ones are skipped and counted.
Every problem the user can fix is raised as :class:`probe.errors.BadInput` with one line naming
the file and row id.
"""
from __future__ import annotations

import ast
import hashlib
import io
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from probe.errors import BadInput, error_reason, in_path
from probe.parsing import option_letters

MAX_IMAGES = 7
REQUIRED_COLUMNS = ("id", "question", "options", "answer", "question_type")
QUESTION_TYPES = ("multiple-choice", "open")  # MMMU's two values; anything else is refused, not guessed
# splits that evaluation reads (probe.eval's and probe.heads' default is validation): tuning on one (a salience
# sweep, fine-tuning) uses the items a merge or checkpoint is then scored on
EVALUATION_SPLITS = frozenset({"validation", "test", "val", "eval"})
_IMAGE_REF = re.compile(r"<image (\d+)>")
VIDEO_REF = "<video>"
_HUB_REPO = "MMMU/MMMU"


ORIENTATION = 0x0112  # the EXIF tag


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (a phone photo stored sideways), as the datasets library's
    Image feature and transformers' ``load_image`` show it to a model; an image without the tag is returned as is."""
    if img.getexif().get(ORIENTATION, 1) == 1:
        return img
    return ImageOps.exif_transpose(img)


# PIL's own limit on the pixels of an image (its DecompressionBombWarning; twice as many is its error): a picture
# past it is a decompression bomb or a scan no model sees at that size, refused while loading with its size said
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# modes _decode shows as they look: any other (32-bit float 'F', 'LAB', 'HSV') has no one reading as RGB, and
# convert("RGB") made a float image in 0..1 black and a LAB one false colours without a word
SHOWN_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LA", "La", "PA",
                         "I", "I;16", "I;16B", "I;16L", "I;16N"})


def _decode(data: bytes, max_side: int | None) -> Image.Image:
    """The image as the model is shown it: the first frame (an animated GIF, PNG or WebP shows its first, as the
    datasets library and transformers' load_image do), turned upright, RGB, fitted within ``max_side``. A mode with
    no RGB reading is BadInput (the loader calls this on every image, so a run never meets one)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode not in SHOWN_MODES:
        raise BadInput(f"its mode {img.mode!r} has no RGB reading to show the model; save it as an 8-bit RGB or "
                       "greyscale PNG or JPEG")
    img = upright(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit greyscale: convert("RGB") clips >255 to white
        tones = np.asarray(img.convert("I"), dtype=np.float64)
        if tones.size and not (tones.min() >= 0 and tones.max() <= 65535):  # 32-bit: /257 clipped it to white
            raise BadInput(f"a 32-bit integer image (values {tones.min():.0f}..{tones.max():.0f}, past 16 bits) has "
                           "no one greyscale reading; save it as an 8- or 16-bit PNG")
        img = Image.fromarray(np.clip(np.rint(tones / 257), 0, 255).astype(np.uint8))  # 0..65535 -> 0..255
    # Composite transparency onto white: a bare convert("RGB") turns transparent pixels black.
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:  # alpha, or a tRNS colour key
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    else:
        img = img.convert("RGB")
    return fit_within(img, max_side)


def fit_within(img: Image.Image, max_side: int | None) -> Image.Image:
    """``img`` shrunk (bicubic, aspect kept) so its longest side is at most ``max_side``; never enlarged."""
    if max_side is None or max(img.size) <= max_side:
        return img
    w, h = img.size
    scale = max_side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class Item:
    """One multiple-choice item. ``images`` are the referenced ones (``<image k>`` in the question or options)
    in the order of their numbers, whatever order the text names them in (lmms-eval's order; MMMU's own items
    reference them in that order anyway). An image column the text never references is not shown."""

    id: str
    subject: str
    question: str
    options: tuple[str, ...]
    answer: str
    images: tuple[bytes, ...]
    frames: tuple[bytes, ...] = ()

    @property
    def letters(self) -> tuple[str, ...]:
        return option_letters(len(self.options))

    def pil_images(self, max_side: int | None = None) -> list[Image.Image]:
        """Decoded RGB images, downscaled (aspect kept) so the longer side is <= max_side."""
        return [_decode(b, max_side) for b in self.images]

    def pil_frames(self, max_side: int | None = None) -> list[Image.Image]:
        return [_decode(b, max_side) for b in self.frames]


@dataclass
class LoadReport:
    n_multiple_choice: int
    n_skipped_open: int  # open-ended items skipped among the rows the run covers (up to --limit's cut)
    subjects: list[str]
    files: list[str]
    fingerprint: str  # sha256 over ids, questions, options, answers, image and frame bytes


# ---------------------------------------------------------------------------------------------
# discovery


_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.parquet$")
_SPLIT = re.compile(r"\w+(\.\w+)*")  # a Hugging Face split name


def _split_files(folder: Path, split: str) -> list[Path]:
    """The split's files in ``folder``: ``<split>-*.parquet`` (the hub's shards) or one ``<split>.parquet`` (what
    ``DataFrame.to_parquet`` users write), never both (a whole file beside its shards would count items twice)."""
    named = sorted(folder.glob(f"{split}-*.parquet"))
    whole = folder / f"{split}.parquet"
    if dangling := next((p for p in [*named, whole] if p.is_symlink() and not p.exists()), None):
        raise BadInput(f"{dangling} is a link to a missing file ({os.readlink(dangling)}): an incomplete download "
                       "(the hub cache's blob is gone?); download the split again")
    if odd := next((p for p in [*named, whole] if p.exists() and not p.is_file()), None):  # read as if absent
        what = "directory" if odd.is_dir() else "special file"
        raise BadInput(f"{odd} is a {what}, not a parquet file (a Spark-style dataset folder?); write the split as "
                       "<split>.parquet or <split>-NNNNN-of-NNNNN.parquet files")
    files = [p for p in named if p.is_file()]
    if whole.is_file():
        if files:
            raise BadInput(f"{folder} holds both {whole.name} and {files[0].name}: the same split twice? keep one")
        return [whole]
    _check_shards(files)
    return files


def _check_shards(files: Sequence[Path]) -> None:
    """Files named ``<prefix>-NNNNN-of-MMMMM.parquet`` must come as all MMMMM parts (a missing part would score
    a fraction of the subject without a word). A file without that pattern stands alone, as it is."""
    groups: dict[tuple[str, int], set[int]] = {}
    for p in files:
        m = _SHARD.search(p.name)
        if m:
            groups.setdefault((p.name[: m.start()], int(m.group(2))), set()).add(int(m.group(1)))
    totals: dict[str, int] = {}
    for prefix, total in sorted(groups):  # two complete shardings (an old download beside a re-sharded one)
        if (other := totals.setdefault(prefix, total)) != total:
            raise BadInput(f"{files[0].parent}: holds {prefix}-*-of-{other:05d} and {prefix}-*-of-{total:05d}.parquet "
                           "files, two shardings of one split that would count its items twice; keep one")
    for (prefix, total), parts in sorted(groups.items()):
        folder = files[0].parent
        if total < 1 or any(k >= total for k in parts):
            bad = max(parts)
            raise BadInput(f"{folder / f'{prefix}-{bad:05d}-of-{total:05d}.parquet'}: part {bad} of {total} "
                           f"is out of range (parts are numbered 00000-{total - 1:05d})")
        missing = [k for k in range(total) if k not in parts]
        if missing:
            name = f"{prefix}-{missing[0]:05d}-of-{total:05d}.parquet"
            raise BadInput(f"{folder}: shard {name} is missing ({len(missing)} of {total} parts absent); "
                           f"a partial download would score only part of the subject")


def check_split(split: str, flag: str = "--split") -> None:
    """A split is a name, never a pattern: ``*`` or ``val*`` would read the files of several splits as one set.
    ``flag`` is the option the name came from, which the refusal names."""
    if not _SPLIT.fullmatch(split):
        raise BadInput(f"{flag} {split!r} is not a split name (letters, digits, '_' and '.' only)")


def unfinished_conversion(root: Path, split: str) -> Path:
    """The file ``python -m probe.convert`` holds in its work folder while it replaces ``split``'s files in
    ``root`` subject by subject: while it is there, that split is part written (a killed conversion)."""
    return root / f".convert-{split}" / "replacing"


def discover(root: str | Path, split: str) -> dict[str, list[Path]]:
    """Map subject -> its parquet files for ``split``, sorted by subject."""
    check_split(split)
    root = in_path(root)
    if not root.exists():
        raise BadInput(f"MMMU data directory not found: {root}")
    if not root.is_dir():
        raise BadInput(f"MMMU data path is not a directory: {root}")
    if (marker := unfinished_conversion(root, split)).is_file():  # some subjects written, others not (yet)
        raise BadInput(f"{root}: a python -m probe.convert stopped while it wrote split '{split}' there ({marker}), "
                       "so that split is incomplete; rerun the same command to finish it")
    folders = [d for d in sorted(root.iterdir()) if d.is_dir()]
    found = {d.name: _split_files(d, split) for d in folders}
    found = {k: v for k, v in found.items() if v}
    # An empty subject folder beside complete ones is an interrupted download; one with only other splits' files is
    # a subject this split lacks, and hidden folders (hf download's .cache) are no subjects.
    subjects = [d for d in folders if not d.name.startswith(".")]
    empty = [d for d in subjects if not any(d.glob("*.parquet"))]
    if found and empty:
        raise BadInput(f"{empty[0]}: a subject folder with no .parquet files, beside {len(found)} with "
                       f"'{split}[-*].parquet' files (an interrupted download?); complete it or remove it")
    direct = _split_files(root, split)
    if direct and found:  # read together, a combined file beside its per-subject parts would count every item twice
        raise BadInput(f"{root} holds '{split}[-*].parquet' files ({direct[0].name}) and subject folders with them "
                       f"({', '.join(found)}); point --data at the subject folders' parent or at one subject folder")
    if direct:  # a single-subject directory
        found = {root.resolve().name: direct}
    if not found:  # say which splits are there: a set converted under another name (probe.convert gpqa: train)
        there = sorted({name for d in [root, *subjects] for f in d.glob("*.parquet")
                        if _SPLIT.fullmatch(name := f.name.removesuffix(".parquet").split("-")[0])})
        raise BadInput(f"no '{split}.parquet' or '{split}-*.parquet' files in {root} or its subject folders"
                       + (f" (the split{'s' if len(there) > 1 else ''} there: {', '.join(map(repr, there))})"
                          if there else ""))
    if not direct and (lacking := [d.name for d in subjects if d.name not in found]):
        print(f"warning: {len(lacking)} subject folder(s) of {root} have no {split!r} files and are left out: "
              f"{', '.join(lacking[:5])}{' …' if len(lacking) > 5 else ''}", file=sys.stderr)
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------------------------
# row validation


def _id_key(item_id: str) -> tuple[int, int, str]:
    """Sort by the numeric suffix of the id ("validation_Art_10" after "..._9"); fall back to text."""
    tail = item_id.rsplit("_", 1)[-1]
    return (0, int(tail), item_id) if tail.isdigit() else (1, 0, item_id)


_MMMU_SPLITS = ("dev", "validation", "test", "train")


def _check_split_of_id(item_id: str, subject: str, split: str, where: str) -> None:
    """MMMU ids read ``<split>_<Subject>_<n>``: one naming this subject and another split is a row of that split
    (dev rows appended to a validation file would be scored as validation items). Other id styles pass."""
    for other in _MMMU_SPLITS:
        if other != split and re.fullmatch(rf"{other}_{re.escape(subject)}_\d+", item_id):
            raise BadInput(f"{where}: the id names split '{other}', but the file holds split '{split}'; "
                           f"keep each split's rows in its own files (<split>-*.parquet or <split>.parquet)")


def _parse_options(raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, (list, tuple)):
        value: Any = list(raw)
    elif isinstance(raw, str):
        try:
            value = ast.literal_eval(raw)  # a Python literal, never eval()
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise BadInput(f"{where}: 'options' is not a Python list literal: {raw[:80]!r}") from None
    else:
        raise BadInput(f"{where}: 'options' must be a string holding a list, got {type(raw).__name__}")
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise BadInput(f"{where}: 'options' must be a list of strings, got {str(raw)[:80]!r}")
    return tuple(value)


def _cell_bytes(cell: Any) -> Any:
    """An image cell's bytes: HF parquet stores {bytes, path} structs; plain bytes are taken as they are."""
    return cell.get("bytes") if isinstance(cell, dict) else cell


# formats whose images may hold several frames: animations, and TIFF's pages (a scan's later pages); a phone's MPO
# JPEG holds a second, preview picture, no other frame of the image
ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP", "TIFF"})


def _image_bytes(cell: Any, where: str, what: str, animated: list[tuple[str, int]] | None = None) -> bytes:
    """An image cell's bytes, checked to decode as the run will (``_decode``): else BadInput naming the row. An
    animation (GIF, APNG, WebP of several frames) or a multi-page TIFF is appended to ``animated`` as (row and
    column, frames): the run shows its first frame only, which the loader says once per file (``warn_animated``)."""
    data = _cell_bytes(cell)
    named = data if isinstance(data, str) else cell.get("path") if isinstance(cell, dict) and not data else None
    if named:  # a path only (datasets' Image feature before its files are embedded), or a column of file names
        name = str(named) if len(str(named)) <= 240 else str(named)[:239] + "…"  # a cell of any length: one line
        raise BadInput(f"{where}: {what} names a file ({name!r}) but holds no image bytes; images are read "
                       "from the parquet file itself, never from files a row names: store each image's bytes in it")
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BadInput(f"{where}: {what} is referenced but empty or null")
    data = bytes(data)
    try:
        with warnings.catch_warnings():  # past MAX_IMAGE_PIXELS: refused below, in one line, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                frames = getattr(img, "n_frames", 1) if img.format in ANIMATED_FORMATS else 1
                img.verify()  # chunk CRCs (PNG), which load() does not check
        if width * height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"Image size ({width * height} pixels)")
        _decode(data, None)  # pixels (verify() reads none: a JPEG cut short passes it), EXIF, mode
    except BadInput as exc:
        raise BadInput(f"{where}: {what}: {exc}") from None
    except Image.DecompressionBombError as exc:  # Image.open's own refusal (twice the limit) or the check above
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{width}×{height} = {width * height:,} pixels" if "width" in locals() else (
            f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels")
        raise BadInput(f"{where}: {what} is {size}, past the {MAX_IMAGE_PIXELS:,} an image may have (PIL's "
                       "decompression-bomb limit); downscale it") from None
    except MemoryError:  # this host's memory, not the bytes: not bad input (exit 1, as any failure of the host)
        raise
    except Image.UnidentifiedImageError:  # its message names a BytesIO object's address
        raise BadInput(f"{where}: {what} is not a decodable image (no format PIL reads: SVG, HEIC, or not an "
                       "image at all)") from None
    except Exception as exc:  # PIL raises many types for bad bytes
        reason = f"{type(exc).__name__}: {error_reason(exc)}"
        raise BadInput(f"{where}: {what} is not a decodable image ({reason})") from None
    if frames > 1 and animated is not None:
        animated.append((f"{where} {what}", frames))
    return data


def warn_animated(path: Path, animated: Sequence[tuple[str, int]]) -> None:
    """One warning line for the animated or multi-page images of the file ``path`` (``_image_bytes``): each is shown
    as its first frame (as the datasets library and transformers' load_image read it), the rest of its frames
    unseen."""
    if animated:
        (first, frames), more = animated[0], len(animated) - 1
        print(f"warning: {path}: {len(animated)} animated or multi-page image(s) are shown as their first frame "
              f"only, the other frames unseen ({first} has {frames} frames{f'; and {more} more' if more else ''}); "
              "store a still image (or the frames as a <video>) if more is meant", file=sys.stderr)


def unclear_options(item: Item) -> str | None:
    """Why ``item``'s options are hard to tell apart, None when they are not: one empty (its letter is shown with
    nothing after it) or two of one text, as probe.parsing compares texts (stripped, any case: an answer giving that
    text reads as the first of them). Loaded as given, with a warning (``warn_unclear_options``): MMMU's image
    options read "<image 2>", never empty, and a set's data is its author's to fix."""
    texts = [o.strip().casefold() for o in item.options]
    letters = option_letters(len(texts))
    if "" in texts:
        return f"option {letters[texts.index('')]} is empty"
    for j, text in enumerate(texts):
        if (i := texts.index(text)) < j:
            shown = item.options[i].strip()
            shown = shown if len(shown) <= 40 else shown[:39] + "…"  # one line, whatever the option's length
            return f"options {letters[i]} and {letters[j]} both read {shown!r}"
    return None


def warn_unclear_options(path: Path, items: Sequence[Item]) -> None:
    """One warning line for the items of the file ``path`` whose options are empty or repeated
    (``unclear_options``): how many, and the first."""
    unclear = [(it.id, why) for it in items if (why := unclear_options(it)) is not None]
    if unclear:
        (first, why), more = unclear[0], len(unclear) - 1
        print(f"warning: {path}: {len(unclear)} item(s) with an empty or repeated option ({first!r}: {why}"
              f"{f'; and {more} more' if more else ''}); scored as given, by letter (a generated answer giving a "
              "repeated text reads as its first option)", file=sys.stderr)


def _shown_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image as ``_decode`` shows it, from its header: EXIF orientations 5-8 swap them."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        return (h, w) if img.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)


def _referenced(texts: Sequence[str]) -> list[int]:
    """The image numbers the texts reference, in number order."""
    return sorted({int(m.group(1)) for text in texts for m in _IMAGE_REF.finditer(text)})


def _filled(cell: Any) -> bool:
    """Whether an image or frame cell holds bytes."""
    b = _cell_bytes(cell)
    return isinstance(b, (bytes, bytearray)) and len(b) > 0


def _filled_images(row: dict[str, Any]) -> list[int]:
    """The image columns that hold bytes, referenced or not."""
    return [k for k in range(1, MAX_IMAGES + 1) if _filled(row.get(f"image_{k}"))]


def _filled_frames(video: Any) -> int:
    """How many cells of a 'video' column hold bytes (0 for a null or empty column)."""
    return sum(map(_filled, video)) if isinstance(video, (list, tuple)) else 0


def _make_item(row: dict[str, Any], subject: str, where: str, animated: list[tuple[str, int]] | None = None) -> Item:
    question = row["question"]
    if not isinstance(question, str):
        raise BadInput(f"{where}: 'question' is not a string")
    options = _parse_options(row["options"], where)
    if not options:
        raise BadInput(f"{where}: multiple-choice item has no options")
    if len(options) == 1:  # p(answer) over the options would be 1 and every head's KL 0, whatever the model does
        raise BadInput(f"{where}: multiple-choice item has one option: nothing to choose between")
    if len(options) > 26:
        raise BadInput(f"{where}: {len(options)} options, but letters run only A-Z (at most 26)")
    letters = option_letters(len(options))
    answer = row["answer"]
    answer = answer.strip() if isinstance(answer, str) else answer
    if answer == "?":
        raise BadInput(f"{where}: answer '?' is hidden (MMMU's test split keeps its answers private); this split "
                       "cannot be scored, use --split validation or dev")
    if answer not in letters:
        raise BadInput(f"{where}: answer {answer!r} is not one of the option letters {letters[0]}-{letters[-1]}")
    images = []
    referenced = _referenced([question, *options])
    for k in referenced:
        if not 1 <= k <= MAX_IMAGES:
            raise BadInput(f"{where}: references <image {k}>, but only image_1..image_{MAX_IMAGES} exist")
        images.append(_image_bytes(row.get(f"image_{k}"), where, f"image_{k}", animated))
    frames: tuple[bytes, ...] = ()
    video = row.get("video")
    if VIDEO_REF in question:
        if not isinstance(video, (list, tuple)) or not video:
            raise BadInput(f"{where}: references <video>, but the 'video' column is missing or empty")
        frames = tuple(_image_bytes(f, where, f"video frame {i}", animated) for i, f in enumerate(video))
        sizes = [_shown_size(f) for f in frames]  # Qwen2-VL's frames were all stretched to frame 0's size
        if odd := next((i for i, size in enumerate(sizes) if size != sizes[0]), None):
            raise BadInput(f"{where}: video frame {odd} is {sizes[odd][0]}×{sizes[odd][1]} but frame 0 is "
                           f"{sizes[0][0]}×{sizes[0][1]}; a video's frames share one size")
    elif n_frames := _filled_frames(video):  # the image rule for frames: data the text never references runs blind
        raise BadInput(f"{where}: the 'video' column holds {n_frames} frame(s) but the question "
                       f"references no {VIDEO_REF}; only referenced frames are shown, so put '{VIDEO_REF}' in the "
                       "question (or empty the column)")
    filled = _filled_images(row)
    if filled and frames and not referenced:
        raise BadInput(f"{where}: a video item also fills image_{filled[0]}, which would not be shown (one modality "
                       "per item); empty that column")
    if filled and not referenced:  # data in another convention (untagged, LLaVA's bare <image>) would run blind
        raise BadInput(f"{where}: image_{filled[0]} is filled but the question and options reference no "
                       f"<image k>; only referenced images are shown, so tag each image where it belongs "
                       f"('<image {filled[0]}>')")
    if frames and images:
        raise BadInput(f"{where}: references both images and <video>; one modality per item is supported")
    return Item(str(row["id"]), subject, question, options, answer, tuple(images), frames)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for corrupt files
        raise BadInput(f"cannot read parquet file {path}: {error_reason(exc)}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise BadInput(f"{path}: missing required column(s) {', '.join(missing)}")
    if table.num_rows == 0:  # its subject would drop out of the run without a word
        raise BadInput(f"{path}: holds no rows (a failed download or conversion?); complete it or remove its subject")
    return table.to_pylist()


# ---------------------------------------------------------------------------------------------
# public entry points


def _fingerprint(items: Sequence[Item]) -> str:
    h = hashlib.sha256()

    def put(b: bytes) -> None:  # length-prefixed, so field boundaries cannot collide
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for it in items:
        for s in (it.id, it.question, *it.options, it.answer):
            put(s.encode("utf-8"))
        put(len(it.options).to_bytes(4, "little"))
        for b in (*it.images, b"--frames--", *it.frames):
            put(b)
    return h.hexdigest()


def load_mmmu(
    root: str | Path,
    split: str = "validation",
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
) -> tuple[list[Item], LoadReport]:
    """Load the multiple-choice items of ``split``.

    Items are sorted by (subject, numeric id suffix). ``limit`` keeps the first N multiple-choice
    items overall after sorting (so a small limit covers only the first subjects; filter with
    ``subjects`` for another slice). Every row of the selected subjects is validated, including
    rows past the limit, so a malformed file is reported whatever the limit.
    """
    if limit is not None and limit < 1:
        raise BadInput(f"limit must be >= 1, got {limit}")
    found = discover(root, split)
    if subjects is not None:
        unknown = [s for s in subjects if s not in found]
        if unknown:
            raise BadInput(f"unknown subject(s) {', '.join(unknown)}; available: {', '.join(found)}")
        found = {s: found[s] for s in sorted(set(subjects))}
    items: list[Item] = []
    open_keys: list[tuple[str, tuple[int, int, str]]] = []  # (subject, id order) of each skipped open item
    files: list[str] = []
    for subject, paths in found.items():
        sub_items: list[Item] = []
        for path in paths:
            files.append(str(path))
            animated: list[tuple[str, int]] = []
            first = len(sub_items)
            for i, row in enumerate(_read_rows(path)):
                rid = row.get("id")
                where = f"{path.name} ({subject}) row {i} id={rid!r}"
                if not isinstance(rid, (str, int)) or isinstance(rid, bool) or not str(rid).strip():
                    raise BadInput(f"{where}: 'id' must be a non-empty string (or an integer)")  # null: was 'None'
                _check_split_of_id(str(rid), subject, split, where)
                kind = row.get("question_type")
                if kind not in QUESTION_TYPES:  # "Multiple-Choice", "mcq", null: never silently taken as open
                    raise BadInput(f"{where}: question_type {kind!r} is not one of "
                                   f"{', '.join(repr(t) for t in QUESTION_TYPES)}")
                if kind == "open":
                    open_keys.append((subject, _id_key(str(rid))))
                    continue
                sub_items.append(_make_item(row, subject, where, animated))
            warn_animated(path, animated)
            warn_unclear_options(path, sub_items[first:])
        seen: set[str] = set()
        for it in sub_items:  # results are keyed by (subject, id): a repeated id would pair wrong answers
            if it.id in seen:
                raise BadInput(f"subject {subject}: item id {it.id!r} appears more than once "
                               f"({', '.join(p.name for p in paths)})")
            seen.add(it.id)
        items.extend(sorted(sub_items, key=lambda it: _id_key(it.id)))
    if not items:
        raise BadInput(f"no multiple-choice items in split '{split}' under {root} "
                       f"(skipped {len(open_keys)} open-ended)")
    n_open = len(open_keys)
    if limit is not None and len(items) > limit:
        items = items[:limit]  # the open items counted are those the cut reaches, in the same order
        n_open = sum(1 for key in open_keys if key <= (items[-1].subject, _id_key(items[-1].id)))
    report = LoadReport(
        n_multiple_choice=len(items),
        n_skipped_open=n_open,
        subjects=sorted({it.subject for it in items}),
        files=files,
        fingerprint=_fingerprint(items),
    )
    return items, report


def resolve_data(data: str | Path, split: str = "validation", subjects: Sequence[str] | None = None) -> Path:
    """A directory as given, or the alias ``"mmmu"``: the hub dataset's snapshot, only the split (and subjects)
    asked for, downloaded when missing unless HF_HUB_OFFLINE is set (probe.hub)."""
    check_split(split)  # before a download
    if str(data).lower() != "mmmu":
        return in_path(data)
    from probe.hub import hub_snapshot

    patterns = [f"{s}/{split}-*" for s in subjects] if subjects else [f"*/{split}-*"]
    return hub_snapshot(_HUB_REPO, repo_type="dataset", patterns=patterns)


def data_spec(data: str | Path) -> str:
    """A --data as given, but the hub alias in one spelling: ``resolve_data`` takes ``MMMU`` as ``mmmu``, so a label,
    a bootstrap stream (probe.eval) or an identity taken from the spelling would make them two sets."""
    return "mmmu" if str(data).lower() == "mmmu" else str(data)


def data_location(data: str | Path) -> str:
    """A data set as a run's identity names it: ``mmmu`` (``data_spec``), a folder by its absolute path with ``~``,
    ``..`` and links resolved, so ``text``, ``./text/``, its absolute path and a link to it are one set (a rerun typed
    from another working dir resumes), and another folder is another set."""
    spec = data_spec(data)
    return spec if spec == "mmmu" else str(in_path(spec).resolve())


def load_items(
    data: str | Path,
    split: str = "validation",
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
) -> tuple[list[Item], LoadReport]:
    """:func:`load_mmmu` on a directory or the ``"mmmu"`` alias."""
    return load_mmmu(resolve_data(data, split, subjects), split=split, subjects=subjects, limit=limit)
