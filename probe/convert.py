"""``python -m probe.convert``: the paper's text and video benchmarks, as published on the hub, in MMMU's layout.

Every command that reads items (probe.heads, probe.eval, analyses.finetune, analyses.replicate) reads MMMU's
parquet layout, ``<root>/<Subject>/<split>-*.parquet``. The paper's multiple-choice text and video benchmarks
are MMLU, MMLU-Pro, MMMLU, GPQA and Video-MME; this turns a local snapshot of each (``hf download --repo-type
dataset REPO --local-dir SRC``) into that layout once, checking every row, so an answer key is never shifted or
guessed:

- ``mmlu`` (cais/mmlu): ``SRC/<subject>/<split>-*.parquet`` (or ``SRC/all/``), columns question, subject, choices,
  answer (the index 0-3); one subject per MMLU subject.
- ``mmlu-pro`` (TIGER-Lab/MMLU-Pro): ``SRC/data/<split>-*.parquet``, columns question_id, question, options (up to
  10), answer (a letter), answer_index, category; one subject per category.
- ``mmmlu`` (openai/MMMLU): ``SRC/<split>/mmlu_<LOCALE>.csv``, columns Question, A-D, Answer, Subject; one subject
  per locale (14 languages).
- ``gpqa`` (Idavidrein/gpqa, gated): ``SRC/gpqa_<set>.csv`` (``--gpqa-set main|diamond|extended``), columns
  Question, Correct Answer, Incorrect Answer 1-3, Record ID, High-level domain; the four answers in an order seeded
  by the Record ID (sha256: the same on every machine and Python), one subject per domain.
- ``video-mme`` (lmms-lab/Video-MME): ``SRC/videomme/<split>-*.parquet`` (video_id, duration, domain,
  sub_category, videoID, question_id, task_type, question, options ``"A. …"``, answer) and the videos,
  ``<videoID>.mp4`` (or .MP4, .mkv, .webm) from the unzipped ``videos_chunked_*.zip`` (``SRC/data/``, or
  ``--videos``); each question becomes a ``<video>`` item of ``--frames`` frames sampled uniformly in time (PyAV:
  ``pip install av``). Frames are cached per video under ``DIR/.convert-<split>/``, so a killed conversion
  resumes.

The result is read back with the probe's own loader before the command ends; ``DIR/convert-<split>.json`` records
the source, the counts, the rows left out (a question whose text holds ``<image k>`` or ``<video>``, which the
prompt would read as a missing picture) and, for MMLU and MMMLU, the subjects or locales of the whole set that the
snapshot lacks (also a warning: a mean over the rest is not the benchmark's score).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from probe.errors import (ArgParser, BadInput, RunStopped, check_counts, check_out_path, cli_main, counted,
                          error_reason, in_path, input_in_out, is_int, out_dir, out_inside, releases_claims)
from probe.mmmu import VIDEO_REF, _IMAGE_REF, check_split, fit_within, unfinished_conversion
from probe.mmmu import _make_item as make_item  # the reader's check of one row
from probe.mmmu import _split_files as split_files  # the reader's rule: shards complete, never two forms
from probe.parsing import option_letters

REPOS = {"mmlu": "cais/mmlu", "mmlu-pro": "TIGER-Lab/MMLU-Pro", "mmmlu": "openai/MMMLU", "gpqa": "Idavidrein/gpqa",
         "video-mme": "lmms-lab/Video-MME"}
KINDS = tuple(REPOS)
SPLITS = {"mmlu": "validation", "mmlu-pro": "test", "mmmlu": "test", "gpqa": "train", "video-mme": "test"}  # defaults
GPQA_SETS = ("main", "diamond", "extended")
VIDEO_SUBJECTS = ("duration", "domain", "task_type")  # Video-MME's breakdowns; short/medium/long is its headline
_LETTER_PREFIX = re.compile(r"^\s*([A-Z])\s*[.)]\s*")
_VIDEO_ID = re.compile(r"[A-Za-z0-9_-]+")
VIDEO_EXTS = (".mp4", ".MP4", ".mkv", ".webm")  # Video-MME ships .mp4; the others as lmms-eval also looks for them
MMMLU_LOCALES = ("AR_XY", "BN_BD", "DE_DE", "ES_LA", "FR_FR", "HI_IN", "ID_ID", "IT_IT", "JA_JP", "KO_KR", "PT_BR",
                 "SW_KE", "YO_NG", "ZH_CN")  # openai/MMMLU's test/mmlu_<LOCALE>.csv
MMLU_SUBJECTS = (  # cais/mmlu's subject configs ('all' and 'auxiliary_train' aside); each has dev, validation, test
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions")
# the subject folders a whole snapshot gives, and what they are: one missing is warned of, not refused (a subset may
# be converted on purpose), since a mean over the rest would read as the benchmark's own score
WHOLE_SET: dict[str, tuple[str, tuple[str, ...]]] = {"mmmlu": ("locales", MMMLU_LOCALES),
                                                     "mmlu": ("subjects", MMLU_SUBJECTS)}
NAMED_AT_MOST = 14  # missing subjects a warning names (every MMMLU locale); convert-<split>.json lists them all


@dataclass(frozen=True)
class ConvertConfig:
    kind: str
    src: Path
    out: Path
    split: str
    out_split: str
    frames: int = 16
    max_side: int = 448
    subject_by: str = "duration"
    gpqa_set: str = "main"
    videos: Path | None = None
    overwrite: bool = False
    quiet: bool = False


@dataclass
class ConvertReport:
    kind: str
    repo: str
    src: str
    split: str
    out_split: str
    n_items: dict[str, int] = field(default_factory=dict)  # per subject
    skipped: list[dict[str, str]] = field(default_factory=list)  # rows left out, with why
    frames: int | None = None
    max_side: int | None = None
    missing_subjects: list[str] = field(default_factory=list)  # of the whole set (WHOLE_SET), not converted


def subject_name(text: str) -> str:
    """A folder name for a subject or category ("computer science" -> "computer_science")."""
    name = re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_")
    if not name:
        raise BadInput(f"subject {text!r} has no letters or digits to name its folder by")
    return name


def read_rows(files: Sequence[Path], need: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every row of ``files`` (parquet or CSV) with where it came from; BadInput naming a file that lacks a column
    of ``need`` or holds no rows (the reader's rule)."""
    import pyarrow.parquet as pq

    rows = []
    for f in files:
        try:
            if f.suffix == ".csv":  # cells stay strings ("0042" is an answer's text, not the number 42)
                with open(f, newline="", encoding="utf-8-sig") as fh:  # a BOM would prefix the first column
                    reader = csv.DictReader(fh)
                    records, columns = list(reader), list(reader.fieldnames or ())
            else:
                table = pq.read_table(f)
                records, columns = table.to_pylist(), table.column_names
        except (OSError, ValueError, csv.Error) as exc:  # pyarrow's ArrowInvalid and UnicodeDecodeError: ValueError
            raise BadInput(f"{f}: not a readable {f.suffix[1:]} file ({error_reason(exc)})") from None
        if missing := [c for c in need if c not in columns]:
            raise BadInput(f"{f}: no column {missing[0]!r} (has {', '.join(columns)}); not a snapshot of the "
                           "benchmark this converter reads?")
        if not records:  # its subject (an MMLU subject, an MMMLU locale) would drop out of the set without a word
            raise BadInput(f"{f}: holds no rows (a failed download?); download it again")
        # csv keeps a longer row's extra cells under the key None and gives a shorter one's missing cells as None:
        # either way its cells sit under other columns (an unquoted comma: option D's text read as the answer key)
        for i, r in enumerate(records if f.suffix == ".csv" else ()):
            if None in r or None in r.values():
                n = len(columns) + len(r.get(None, ())) if None in r else sum(v is not None for v in r.values())
                raise BadInput(f"{f.name} row {i}: {n} cells, but the header names {len(columns)} columns (an "
                               "unquoted comma, or a line cut short?); its cells would be read under other columns")
        rows += [(f"{f.name} row {i}", r) for i, r in enumerate(records)]
    return rows


def find_files(src: Path, split: str, subdirs: Sequence[str]) -> list[Path]:
    """The split's files in the first of ``subdirs`` of ``src`` (``""`` = src itself) that has any."""
    for sub in subdirs:
        if files := split_files(src / sub, split):
            return files
    where = " or ".join(str(src / sub) if sub else str(src) for sub in subdirs)
    raise BadInput(f"no {split}-*.parquet files in {where}")


def options_list(raw: Any, where: str) -> list[str]:
    if not isinstance(raw, (list, tuple)) or not raw or not all(isinstance(o, str) for o in raw):
        raise BadInput(f"{where}: options/choices must be a non-empty list of strings, got {str(raw)[:80]!r}")
    if len(raw) > 26:
        raise BadInput(f"{where}: {len(raw)} options, but letters run only A-Z")
    return list(raw)


def answer_letter(options: Sequence[str], where: str, index: Any = None, letter: Any = None) -> str:
    """The answer's letter from an index, a letter, or both (which must agree: a key off by one is a silently
    wrong score on every item)."""
    letters = option_letters(len(options))
    by_index = by_letter = None
    if index is not None:
        if not is_int(index) or not 0 <= index < len(options):
            raise BadInput(f"{where}: answer index {index!r} is not 0-{len(options) - 1}")
        by_index = letters[index]
    if letter is not None:
        if not isinstance(letter, str) or letter.strip() not in letters:
            raise BadInput(f"{where}: answer {letter!r} is not one of {letters[0]}-{letters[-1]}")
        by_letter = letter.strip()
    if by_index and by_letter and by_index != by_letter:
        raise BadInput(f"{where}: answer {by_letter!r} and answer_index {index} ({by_index!r}) disagree")
    if not (by_index or by_letter):
        raise BadInput(f"{where}: no answer")
    return by_letter or by_index  # type: ignore[return-value]


def strip_letters(options: Sequence[str], where: str) -> list[str]:
    """Video-MME writes options as "A. text"; the prompt adds the letters itself. Either every option carries its
    own letter in order, or none does."""
    marks = [_LETTER_PREFIX.match(o) for o in options]
    if not any(marks):
        return list(options)
    letters = option_letters(len(options))
    if not all(m and m.group(1) == letters[i] for i, m in enumerate(marks)):
        raise BadInput(f"{where}: options {list(options)!r} are not lettered A, B, … in order")
    return [o[m.end():].strip() for o, m in zip(options, marks)]


def reads_as_media(texts: Sequence[str]) -> str | None:
    """Text the prompt would read as a picture or video that is not there."""
    for t in texts:
        if _IMAGE_REF.search(t):
            return "its text holds '<image k>', which the prompt reads as a missing picture"
        if VIDEO_REF in t:
            return "its text holds '<video>', which the prompt reads as a missing video"
    return None


def mmmu_row(item_id: str, question: str, options: Sequence[str], answer: str, source: dict[str, Any],
             subfield: str = "") -> dict[str, Any]:
    return {"id": item_id, "question": question, "options": str(list(options)), "answer": answer,
            "question_type": "multiple-choice", "explanation": json.dumps(source, sort_keys=True, default=str),
            "subfield": subfield, "img_type": "[]"}


@dataclass
class Planned:
    """The rows to write, checked, per subject; a video set's rows name their video (frames come later)."""
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    videos: dict[str, Path] = field(default_factory=dict)  # videoID -> file
    named: dict[str, tuple[str, str]] = field(default_factory=dict)  # folder, casefolded -> (source name, its row)

    def subject(self, name: Any, where: str) -> str:
        """The folder of a source subject; two source names that would share one folder ("computer science" and
        "computer_science"; "Physics" and "physics" on a case-insensitive file system) are refused, never merged."""
        if not isinstance(name, str):  # a null category would become the subject "None"
            raise BadInput(f"{where}: the subject/category is {name!r}, not text")
        folder = subject_name(name)
        same = " ".join(name.split())  # whitespace alone does not make another subject
        first, at = self.named.setdefault(folder.casefold(), (same, where))
        if first != same:
            raise BadInput(f"{where}: subject {same!r} and {first!r} ({at}) would share the folder {folder!r}; "
                           "the two would be scored as one subject")
        return folder


def convert_mmlu(cfg: ConvertConfig, report: ConvertReport, plan: Planned) -> None:
    folders = [d for d in sorted(cfg.src.iterdir()) if d.is_dir() and d.name not in ("all", "auxiliary_train")
               and not d.name.startswith(".") and split_files(d, cfg.split)]
    files = [f for d in folders for f in split_files(d, cfg.split)] or find_files(cfg.src, cfg.split, ("all", ""))
    if folders and (whole := split_files(cfg.src / "all", cfg.split)):  # every subject again: a check of the folders
        import pyarrow.parquet as pq

        n, n_all = (sum(pq.read_metadata(f).num_rows for f in fs) for fs in (files, whole))
        if n != n_all:
            raise BadInput(f"{cfg.src}: its subject folders hold {n} '{cfg.split}' rows but all/ holds {n_all} "
                           "(subjects missing: a partial download?); complete it, or convert a folder of only the "
                           "subjects wanted")
    for f in files:
        folder = f.parent.name if f.parent in folders else None  # 'all' or SRC itself: the subject column says
        for where, r in read_rows([f], ("question", "choices", "answer")):
            if not (subject := r.get("subject") or folder):
                raise BadInput(f"{where}: no subject (an empty 'subject' outside a subject folder)")
            options = options_list(r["choices"], where)
            answer = answer_letter(options, where, index=r["answer"])
            add_row(cfg, report, plan, subject, where, r["question"], options, answer,
                    {"source": "cais/mmlu"})


def convert_mmlu_pro(cfg: ConvertConfig, report: ConvertReport, plan: Planned) -> None:
    need = ("question_id", "question", "options", "answer", "category")
    for where, r in read_rows(find_files(cfg.src, cfg.split, ("data", "")), need):
        options = options_list(r["options"], where)
        answer = answer_letter(options, where, index=r.get("answer_index"), letter=r["answer"])
        options, answer = drop_na(options, answer, where)
        add_row(cfg, report, plan, r["category"], where, r["question"], options, answer,
                {"source": "TIGER-Lab/MMLU-Pro", "question_id": r["question_id"], "src": r.get("src")})


def drop_na(options: Sequence[str], answer: str, where: str) -> tuple[list[str], str]:
    """MMLU-Pro pads some rows to ten options with "N/A", which its own evaluation drops before asking; dropped here
    too (a model could pick one), the key following its option to the new letter."""
    keep = [k for k, o in enumerate(options) if o.strip() != "N/A"]
    at = option_letters(len(options)).index(answer)
    if at not in keep:
        raise BadInput(f"{where}: the answer {answer!r} is an 'N/A' option")
    return [options[k] for k in keep], option_letters(len(keep))[keep.index(at)]


def convert_mmmlu(cfg: ConvertConfig, report: ConvertReport, plan: Planned) -> None:
    """openai/MMMLU: ``SRC/<split>/mmlu_<LOCALE>.csv`` (Question, A-D, Answer, Subject), one subject per locale
    (the paper prints one MMMLU accuracy and does not say how it pools the languages; --subjects picks some)."""
    files = sorted((cfg.src / cfg.split).glob("mmlu_*.csv"))
    if not files:
        raise BadInput(f"no mmlu_*.csv files in {cfg.src / cfg.split}")
    for f in files:
        locale = f.stem.removeprefix("mmlu_")
        for where, r in read_rows([f], ("Question", "A", "B", "C", "D", "Answer")):
            options = [r[k] for k in "ABCD"]
            add_row(cfg, report, plan, locale, where, r["Question"], options,
                    answer_letter(options, where, letter=r["Answer"]),
                    {"source": "openai/MMMLU", "locale": locale, "subject": r.get("Subject")},
                    subfield=str(r.get("Subject") or ""))


def gpqa_options(correct: str, wrong: Sequence[str], record: str) -> tuple[list[str], str]:
    """GPQA lists the correct answer apart from three wrong ones; the options are their order under a permutation
    seeded by the question's Record ID, and the answer is where the correct one landed. The permutation sorts the
    options by sha256 keys (a uniform one), so it is the same on every machine and Python: random.shuffle's draws
    are not promised to stay (Python keeps only random()'s sequence for a seed)."""
    import hashlib

    options = [correct, *wrong]
    order = sorted(range(len(options)),
                   key=lambda i: hashlib.sha256(f"omniprobe-gpqa:{record}:{i}".encode("utf-8")).digest())
    return [options[i] for i in order], option_letters(len(options))[order.index(0)]


def convert_gpqa(cfg: ConvertConfig, report: ConvertReport, plan: Planned) -> None:
    """Idavidrein/gpqa (gated): ``SRC/gpqa_<set>.csv``; one subject per high-level domain."""
    f = cfg.src / f"gpqa_{cfg.gpqa_set}.csv"
    if not f.is_file():
        raise BadInput(f"{f}: not found (the gated Idavidrein/gpqa snapshot holds gpqa_main.csv, gpqa_diamond.csv, "
                       "gpqa_extended.csv)")
    wrong_cols = [f"Incorrect Answer {k}" for k in (1, 2, 3)]
    records: dict[str, str] = {}
    for where, r in read_rows([f], ("Question", "Correct Answer", *wrong_cols, "Record ID", "High-level domain")):
        record = (r["Record ID"] or "").strip()
        if not record:  # the order's seed: rows without one would all put the correct answer at the same letter
            raise BadInput(f"{where}: no Record ID (it seeds the order of the options)")
        if record in records:
            raise BadInput(f"{where}: Record ID {record!r} again (first at {records[record]}): a question twice?")
        records[record] = where
        texts = [r["Correct Answer"], *(r[c] for c in wrong_cols)]
        if any(not (t or "").strip() for t in texts):
            raise BadInput(f"{where}: an empty answer option")
        if len({t.strip() for t in texts}) < len(texts):  # two equal options: the key could not tell them apart
            raise BadInput(f"{where}: two answer options are the same text")
        options, answer = gpqa_options(texts[0].strip(), [t.strip() for t in texts[1:]], record)
        add_row(cfg, report, plan, r["High-level domain"], where, r["Question"].strip(), options,
                answer, {"source": f"Idavidrein/gpqa gpqa_{cfg.gpqa_set}", "record_id": record},
                subfield=str(r.get("Subdomain") or ""))


def convert_video_mme(cfg: ConvertConfig, report: ConvertReport, plan: Planned) -> None:
    need = ("videoID", "question_id", "question", "options", "answer", cfg.subject_by)
    rows = read_rows(find_files(cfg.src, cfg.split, ("videomme", "")), need)
    videos = cfg.videos or next((cfg.src / d for d in ("data", "video", "videos") if (cfg.src / d).is_dir()), None)
    if videos is None or not videos.is_dir():
        raise BadInput(f"no video folder: give --videos DIR (the unzipped videos_chunked_*.zip; looked in "
                       f"{cfg.src}/data, video, videos)")
    for where, r in rows:
        vid = r["videoID"]
        if not isinstance(vid, str) or not _VIDEO_ID.fullmatch(vid):  # it names a file: never a path
            raise BadInput(f"{where}: videoID {vid!r} is not a video id (letters, digits, '-', '_')")
        options = strip_letters(options_list(r["options"], where), where)
        answer = answer_letter(options, where, letter=r["answer"])
        source = {"source": "lmms-lab/Video-MME", **{k: r.get(k) for k in
                  ("question_id", "videoID", "duration", "domain", "sub_category", "task_type")}}
        if add_row(cfg, report, plan, r[cfg.subject_by], where, r["question"], options, answer,
                   source, video=vid, subfield=str(r.get("sub_category") or "")):
            plan.videos[vid] = next((f for ext in VIDEO_EXTS if (f := videos / f"{vid}{ext}").is_file()),
                                    videos / f"{vid}.mp4")
    if absent := sorted(v for v, p in plan.videos.items() if not p.is_file()):
        raise BadInput(f"{len(absent)} of {len(plan.videos)} videos are not in {videos} (first: {absent[0]}.mp4; "
                       f"{', '.join(VIDEO_EXTS[1:])} are taken too); unzip every videos_chunked_*.zip there")
    # a video is read from the folder only, as its id is a file name and never a path: a link leading out of it
    # (to /etc, another user's files) would be decoded and its frames written into the converted set
    for vid, path in sorted(plan.videos.items()):
        if out_inside(path, [("--videos", videos)]) is None:
            raise BadInput(f"{path} is a link to {path.resolve()}, outside the video folder {videos.resolve()}: "
                           "videos are read from that folder only; copy the video there (or give --videos its folder)")


def add_row(cfg: ConvertConfig, report: ConvertReport, plan: Planned, subject: Any, where: str, question: Any,
            options: list[str], answer: str, source: dict[str, Any], video: str | None = None,
            subfield: str = "") -> bool:
    """Plan one item of the source subject ``subject`` (False: left out, and said why in the report)."""
    if not isinstance(question, str) or not question.strip():
        raise BadInput(f"{where}: the question is not a non-empty string")
    if why := reads_as_media([question, *options]):
        report.skipped.append({"row": where, "why": why})
        return False
    subject = plan.subject(subject, where)
    rows = plan.rows.setdefault(subject, [])
    item_id = f"{cfg.out_split}_{subject}_{len(rows) + 1}"  # MMMU's id form: the loader checks it names the split
    # the reader's own rule on the row (its text; a video's frames come later): a row it refuses (one option) would
    # be refused only by the read-back, after the split was written into --out, naming that file and not this row
    make_item(mmmu_row(item_id, question, options, answer, source, subfield), subject, where)
    row = mmmu_row(item_id, question if video is None else f"{VIDEO_REF} {question}", options, answer, source,
                   subfield)
    if video is not None:
        row["video"] = video  # replaced by its frames once they are sampled
    rows.append(row)
    return True


def sample_frames(path: Path, n: int, max_side: int) -> list[bytes]:
    """``n`` frames, one at the middle of each of ``n`` equal spans of the video's duration (the decoded frame
    nearest that time), as JPEG with the longest side ≤ ``max_side``. Seeks to each time: an hour-long video is
    not decoded whole."""
    try:
        import av
    except ImportError:
        raise BadInput("video-mme needs PyAV to read the videos: pip install av") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadInput(f"{path}: holds no video stream (an audio-only download?)")
            stream = container.streams.video[0]
            tb = stream.time_base
            start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
            if stream.duration:
                duration = float(stream.duration * tb)
            else:  # Matroska/WebM state none per stream, and their file duration counts from 0, not from start
                end = stream_end(container, stream)
                stated = container.duration / 1_000_000 if container.duration else None  # av.time_base units
                if stated is not None and stated - end > max(1.0, 0.02 * stated):  # frames sampled from what is left
                    raise BadInput(f"{path}: its frames end at {end:.1f} s, but the file states {stated:.1f} s "
                                   "(a truncated download?); download it again")
                duration = end - start
            if not duration > 0:
                raise BadInput(f"{path}: the video does not state a duration")
            picked, first = [], None  # first: the first frame's shown size and time
            for k in range(n):
                target = start + (k + 0.5) * duration / n
                container.seek(int(target / tb), stream=stream, backward=True, any_frame=False)
                before = None
                for frame in container.decode(stream):
                    if frame.time is None:
                        continue
                    if frame.time >= target:
                        near = frame if before is None or frame.time - target <= target - before.time else before
                        break
                    before = frame
                else:
                    near = before  # past the last frame: the last one
                if near is None:
                    raise BadInput(f"{path}: no frame decoded near {target:.2f} s")
                img = fit_within(near.to_image().convert("RGB"), max_side)
                first = first or (img.size, near.time)
                if img.size != first[0]:  # the reader refuses it (one size per video), but only once it is written
                    (w0, h0), t0 = first
                    raise BadInput(f"{path}: its frames change size ({w0}×{h0} at {t0:.1f} s, {img.width}×"
                                   f"{img.height} at {near.time:.1f} s: the stream changes resolution), but a "
                                   "video's frames share one size; re-encode it at one size")
                picked.append(jpeg(img))
    except (av.FFmpegError, OSError) as exc:
        raise BadInput(f"{path}: cannot decode its video ({error_reason(exc)})") from None
    return picked


def stream_end(container: Any, stream: Any) -> float:
    """When the last frame of ``stream`` ends, in seconds: decoded from the last keyframe on."""
    container.seek(2**62, stream=stream, backward=True, any_frame=False)  # past the end: the last keyframe
    last = None
    for frame in container.decode(stream):
        if frame.time is not None:
            last = frame if last is None or frame.time > last.time else last
    if last is None:
        return 0.0
    rate = stream.average_rate or stream.guessed_rate
    return last.time + (float(1 / rate) if rate else 0.0)  # the last frame shows for one frame's time


def jpeg(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def cached_frames(videos: dict[str, Path], cache: Path, sample: Callable[[Path], list[bytes]],
                  quiet: bool) -> dict[str, list[bytes]]:
    """Each video's frames, sampled once and kept under ``cache/<videoID>-<size>-<mtime>/`` (a folder renamed into
    place whole): a killed conversion resumes from the videos it had done, and a video file replaced since (another
    --videos, a re-download) is sampled again rather than given the old file's frames."""
    from probe.heads import _progress

    frames: dict[str, list[bytes]] = {}
    bar = _progress(len(videos), quiet, "frames", unit="video")
    for vid, path in sorted(videos.items()):
        st = path.stat()
        kept = cache / f"{vid}-{st.st_size}-{st.st_mtime_ns}"
        if not kept.is_dir():
            # named by video, not by `kept` (probe.results.partial_dir): a killed run's is cleared even after the
            # video's file changed; a cache miss, not an output, so a failure leaves it for that rerun
            tmp = cache / f".{vid}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for k, b in enumerate(sample(path)):
                (tmp / f"{k:05d}.jpg").write_bytes(b)
            tmp.rename(kept)
        frames[vid] = [f.read_bytes() for f in sorted(kept.glob("*.jpg"))]
        bar.update()
    bar.close()
    return frames


CONVERTERS: dict[str, Callable[[ConvertConfig, ConvertReport, Planned], None]] = {
    "mmlu": convert_mmlu, "mmlu-pro": convert_mmlu_pro, "mmmlu": convert_mmmlu, "gpqa": convert_gpqa,
    "video-mme": convert_video_mme}


def existing_split(out: Path, split: str) -> list[Path]:
    """Files of ``split`` already in ``out`` (this converter's, or another set's)."""
    if not out.is_dir():
        return []
    return [*split_files(out, split), *(f for d in sorted(out.iterdir()) if d.is_dir() and not d.name.startswith(".")
                                        for f in split_files(d, split))]


def split_to_replace(cfg: ConvertConfig) -> list[Path]:
    """The files of split ``--out-split`` in ``--out`` that this conversion replaces: refused unless ``--overwrite``
    or a killed conversion's part (its marker: the same command again finishes it)."""
    there = existing_split(cfg.out, cfg.out_split)
    if there and not cfg.overwrite and not unfinished_conversion(cfg.out, cfg.out_split).is_file():
        raise BadInput(f"--out {cfg.out} already holds split '{cfg.out_split}' ({there[0]}); give --overwrite to "
                       "replace it, or another --out-split")
    return there


@releases_claims
def run(cfg: ConvertConfig) -> ConvertReport:
    from probe.mmmu import load_mmmu
    from probe.results import atomic_write_json, lock_out_dir
    from probe.synthetic import write_mmmu_parquet

    check_split(cfg.split)
    check_split(cfg.out_split, "--out-split")
    if not cfg.src.is_dir():
        raise BadInput(f"SRC {cfg.src}: not a directory (a local snapshot of {REPOS[cfg.kind]})")
    check_out_path(cfg.out)
    out, src = cfg.out.resolve(), cfg.src.resolve()
    if out == src or src in out.parents:
        raise BadInput(f"--out {cfg.out} is inside SRC {cfg.src}; the source is never written to")
    if out in src.parents:  # --overwrite would take SRC's own <split>-*.parquet files for the old split's
        raise BadInput(f"SRC {cfg.src} is inside --out {cfg.out}; the source is never written to, so give an --out "
                       "outside it")
    videos = [("--videos", cfg.videos)] if cfg.videos is not None else []  # the source's too, wherever unzipped
    if out_inside(cfg.out, videos) or input_in_out(cfg.out, videos):
        raise BadInput(f"--out {cfg.out} is, holds or lies inside --videos {cfg.videos}; the source is never written "
                       "to, so give an --out outside it")
    split_to_replace(cfg)  # refused before the source is read; checked again under the lock
    report = ConvertReport(cfg.kind, REPOS[cfg.kind], str(src), cfg.split, cfg.out_split,
                           frames=cfg.frames if cfg.kind == "video-mme" else None,
                           max_side=cfg.max_side if cfg.kind == "video-mme" else None)
    plan = Planned()
    CONVERTERS[cfg.kind](cfg, report, plan)  # every row checked before anything is written
    if not plan.rows:
        raise BadInput(f"no items in split '{cfg.split}' of {cfg.src} ({len(report.skipped)} left out)")
    lock_out_dir(cfg.out)
    # what --out holds now: a conversion that ran whole while this one read its source wrote the split after the
    # check above, and this one then replaced it, --overwrite or not (or, with it, left that one's other subjects)
    there = split_to_replace(cfg)
    marker = unfinished_conversion(cfg.out, cfg.out_split)
    work = marker.parent  # DIR/.convert-<split>, hidden: no command reads it as a subject
    if plan.videos:
        frames = cached_frames(plan.videos, work / f"frames-{cfg.frames}-{cfg.max_side}",
                               lambda p: sample_frames(p, cfg.frames, cfg.max_side), cfg.quiet)
        for row in (r for rows in plan.rows.values() for r in rows):
            vid = row["video"]
            row["video"] = [{"bytes": b, "path": f"{vid}_frame_{k}.jpg"} for k, b in enumerate(frames[vid])]
    staged = work / "staged"
    shutil.rmtree(staged, ignore_errors=True)
    write_mmmu_parquet(plan.rows, staged, cfg.out_split, video=bool(plan.videos))
    marker.touch()  # from here to the end the split is part written: the reader refuses it, a rerun finishes it
    (cfg.out / f"convert-{cfg.out_split}.json").unlink(missing_ok=True)  # it would describe the old split
    for f in there:  # --overwrite: this split's files only; other splits and anything else in --out stay
        f.unlink()
        if f.parent != cfg.out and not any(f.parent.iterdir()):
            f.parent.rmdir()  # an emptied subject folder would read as an interrupted download
    for subject in plan.rows:
        (cfg.out / subject).mkdir(parents=True, exist_ok=True)
        for f in split_files(staged / subject, cfg.out_split):
            f.replace(cfg.out / subject / f.name)
    report.n_items = {s: len(r) for s, r in sorted(plan.rows.items())}
    report.missing_subjects = missing_subjects(cfg.kind, list(report.n_items))
    # the record while the marker stands: a disk that filled on it left a whole-looking split that the same
    # command then refused to touch without --overwrite
    record = cfg.out / f"convert-{cfg.out_split}.json"
    atomic_write_json(record, asdict(report) | {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    shutil.rmtree(work)  # the marker with it: the split is whole
    try:
        items, _ = load_mmmu(cfg.out, cfg.out_split)  # read back as every command will read it
        if len(items) != sum(report.n_items.values()):
            raise RunStopped(f"{cfg.out}: read back {len(items)} items of split '{cfg.out_split}', wrote "
                             f"{sum(report.n_items.values())} (other files of that split in --out?)")
    except BaseException:
        record.unlink(missing_ok=True)  # it would vouch for a split the reader does not read as written
        raise
    return report


def missing_subjects(kind: str, converted: Sequence[str]) -> list[str]:
    """The subjects (MMMLU's locales) of a whole ``kind`` snapshot that the conversion has no item of, sorted."""
    return sorted(set(WHOLE_SET[kind][1]) - set(converted)) if kind in WHOLE_SET else []


def missing_subjects_warning(kind: str, missing: Sequence[str], repo: str, record: str) -> str:
    """One line naming the ``missing`` subjects (the first NAMED_AT_MOST of them, the rest counted)."""
    what, whole = WHOLE_SET[kind]
    names = ", ".join(missing[:NAMED_AT_MOST]) + (f", … ({len(missing) - NAMED_AT_MOST} more)"
                                                  if len(missing) > NAMED_AT_MOST else "")
    return (f"warning: {len(missing)} of the {len(whole)} {what} of {repo} are not in this conversion: {names}; a "
            f"mean over the other {len(whole) - len(missing)} is not {repo}'s score ({record} lists them)")


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="python -m probe.convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1],
        examples=["hf download --repo-type dataset TIGER-Lab/MMLU-Pro --local-dir /data/hub/mmlu-pro",
                  "python -m probe.convert mmlu-pro /data/hub/mmlu-pro --split test --out-split validation "
                  "--out /data/mmlu-pro-mmmu-layout",
                  "python -m probe.convert mmlu /data/hub/mmlu --split validation --out /data/mmlu-mmmu-layout",
                  "python -m probe.convert gpqa /data/hub/gpqa --gpqa-set main --out-split validation "
                  "--out /data/gpqa-mmmu-layout",
                  "python -m probe.convert video-mme /data/hub/video-mme --split test --out-split validation "
                  "--frames 16 --out /data/video-mme-mmmu-layout",
                  "python -m probe.eval --models qwen2 --data /data/mmlu-pro-mmmu-layout --out runs/eval-text"])
    p.add_argument("kind", choices=KINDS, help="which benchmark SRC holds: " + ", ".join(
        f"{k} ({r})" for k, r in REPOS.items()))
    p.add_argument("src", type=in_path, help="the local snapshot (hf download --repo-type dataset REPO --local-dir SRC)")
    p.add_argument("--out", type=out_dir, required=True, metavar="DIR", help="the MMMU-layout directory to write (DIR/<Subject>/"
                   "<split>-00000-of-00001.parquet); other splits already there stay")
    p.add_argument("--split", default=None, help="the source split to read (MMLU: validation has 1,531 items, "
                   "test 14,042; MMLU-Pro: test 12,032, validation 70; MMMLU: test; GPQA: train, its only one; "
                   "Video-MME: test only) (default: " + ", ".join(f"{k}: {v}" for k, v in SPLITS.items()) + ")")
    p.add_argument("--out-split", default=None, help="the split name to write it as (default: --split); "
                   "analyses.replicate reads one eval split for every set, so e.g. --split test --out-split "
                   "validation")
    p.add_argument("--frames", type=int, default=16, help="video-mme: frames per video, uniform in time (default: 16)")
    p.add_argument("--max-side", type=int, default=448, help="video-mme: longest side of a frame, pixels (default: 448)")
    p.add_argument("--subject-by", choices=VIDEO_SUBJECTS, default="duration",
                   help="video-mme: the column its items are grouped into subjects by (default: duration: short, "
                        "medium, long)")
    p.add_argument("--gpqa-set", choices=GPQA_SETS, default="main", help="gpqa: which file, gpqa_<set>.csv "
                   "(main 448 questions, diamond 198, extended 546) (default: main)")
    p.add_argument("--videos", type=in_path, default=None, help="video-mme: the folder of <videoID>.mp4 (.mkv, .webm) "
                   "files (default: SRC/data, SRC/video or SRC/videos)")
    p.add_argument("--overwrite", action="store_true", help="replace this split's files in --out (only those)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (video-mme's frame extraction; the text sets convert without one)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_counts(args, ("frames", "max_side"))
    split = args.split or SPLITS[args.kind]
    cfg = ConvertConfig(kind=args.kind, src=args.src, out=args.out, split=split,
                        out_split=args.out_split or split, frames=args.frames, max_side=args.max_side,
                        subject_by=args.subject_by, gpqa_set=args.gpqa_set, videos=args.videos,
                        overwrite=args.overwrite, quiet=args.quiet)
    report = run(cfg)
    n = sum(report.n_items.values())
    print(f"{counted(n, 'item')} in {counted(len(report.n_items), 'subject')} ({report.repo}, split {cfg.split}) "
          f"written to {cfg.out} as split '{cfg.out_split}'"
          + (f"; {counted(len(report.skipped), 'row')} left out (see convert-{cfg.out_split}.json)"
             if report.skipped else ""))
    if report.missing_subjects:  # after the conversion: a refusal stays the only line on stderr
        print(missing_subjects_warning(cfg.kind, report.missing_subjects, report.repo,
                                       f"convert-{cfg.out_split}.json"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
