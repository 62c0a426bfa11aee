"""python -m probe.convert: MMLU, MMLU-Pro and Video-MME snapshots (their published columns, built here) into MMMU's
layout. Oracles: the source rows themselves (each item's options and answer letter from its own row), and for
video the frame that a direct formula says is nearest each sampled time (frames carry their index in colour)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from probe.errors import BadInput, cli_main
from probe.mmmu import load_mmmu

REPO = Path(__file__).resolve().parents[1]
N_FRAMES, FPS = 30, 10


def convert_process(*args: object) -> subprocess.CompletedProcess:
    """``python -m probe.convert ARGS --quiet`` in its own process: the exit-code contract as a user sees it."""
    return subprocess.run([sys.executable, "-m", "probe.convert", *map(str, args), "--quiet"], cwd=REPO,
                          capture_output=True, text=True)


def convert(*args: object) -> subprocess.CompletedProcess:
    """The same command in this process, exit code and output as cli_main gives them to the CLI (a process per
    call re-imported pandas and pyarrow, for some 35 calls); the real process is convert_process's."""
    from probe.convert import main

    argv = [*map(str, args), "--quiet"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(main, argv)
    return subprocess.CompletedProcess(["probe.convert", *argv], code, out.getvalue(), err.getvalue())


def one_error_line(res: subprocess.CompletedProcess, want: str) -> None:
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and want in err, err


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def mmlu_rows(subject: str, n: int) -> list[dict]:
    return [{"question": f"{subject} question {i}?", "subject": subject,
             "choices": [f"{subject} {i} option {k}" for k in range(4)], "answer": (i * 3 + len(subject)) % 4}
            for i in range(n)]


@pytest.fixture()
def mmlu_src(tmp_path) -> Path:
    """cais/mmlu as hf download leaves it: subject configs, 'all' (every subject again) and auxiliary_train."""
    src = tmp_path / "mmlu"
    rows = {s: mmlu_rows(s, n) for s, n in (("abstract_algebra", 5), ("anatomy", 4))}
    for s, r in rows.items():
        write(src / s / "validation-00000-of-00001.parquet", r)
        write(src / s / "test-00000-of-00001.parquet", r[:2])
    write(src / "all" / "validation-00000-of-00001.parquet", [x for r in rows.values() for x in r])
    write(src / "auxiliary_train" / "train-00000-of-00001.parquet", mmlu_rows("aux", 3))
    return src


def test_mmlu_items_keep_their_options_and_answer_and_all_is_not_counted_twice(mmlu_src, tmp_path):
    out = tmp_path / "out"
    res = convert_process("mmlu", mmlu_src, "--out", out)
    assert res.returncode == 0, res.stderr
    items, report = load_mmmu(out, "validation")
    assert report.subjects == ["abstract_algebra", "anatomy"] and len(items) == 9  # not 18: 'all' left out
    for subject in report.subjects:
        source = pq.read_table(mmlu_src / subject / "validation-00000-of-00001.parquet").to_pylist()
        mine = [it for it in items if it.subject == subject]
        assert [it.question for it in mine] == [r["question"] for r in source]
        assert [list(it.options) for it in mine] == [r["choices"] for r in source]
        assert [it.answer for it in mine] == ["ABCD"[r["answer"]] for r in source]
        assert [it.id for it in mine] == [f"validation_{subject}_{k}" for k in range(1, len(source) + 1)]  # MMMU's
    record = json.loads((out / "convert-validation.json").read_text())
    assert record["repo"] == "cais/mmlu" and record["n_items"] == {"abstract_algebra": 5, "anatomy": 4}
    assert not list(out.glob(".convert-*"))  # its work folder is gone


def test_mmlu_subject_folders_short_of_all_are_refused(mmlu_src, tmp_path):
    """A partial download (a subject folder missing beside 'all') used to convert the subjects present, exit 0."""
    import shutil

    shutil.rmtree(mmlu_src / "anatomy")
    one_error_line(convert_process("mmlu", mmlu_src, "--out", tmp_path / "out"),
                   "its subject folders hold 5 'validation' rows but all/ holds 9")
    assert not (tmp_path / "out").exists()
    assert convert("mmlu", mmlu_src, "--split", "test", "--out", tmp_path / "out").returncode == 0  # no 'all' test


def test_mmlu_all_alone_is_grouped_by_its_subject_column(tmp_path):
    src = tmp_path / "mmlu"
    write(src / "all" / "validation-00000-of-00001.parquet", mmlu_rows("virology", 2) + mmlu_rows("marketing", 3))
    assert convert("mmlu", src, "--out", tmp_path / "out").returncode == 0
    _, report = load_mmmu(tmp_path / "out", "validation")
    assert report.subjects == ["marketing", "virology"] and report.n_multiple_choice == 5



@pytest.mark.parametrize("other", ["computer_science", "Computer Science", "computer-science"])
def test_two_subjects_that_would_share_a_folder_are_refused_not_merged(tmp_path, other):
    src, out = tmp_path / "mmlu", tmp_path / "out"
    write(src / "all" / "validation-00000-of-00001.parquet",
          mmlu_rows("computer science", 2) + mmlu_rows("computer  science ", 1) + mmlu_rows(other, 1))
    one_error_line(convert("mmlu", src, "--out", out),  # whitespace alone is the same subject: row 2 passes
                   f"row 3: subject {other!r} and 'computer science' (validation-00000-of-00001.parquet row 0)")
    assert not out.exists()


def test_a_null_category_or_a_boolean_answer_is_refused(tmp_path):
    """A null category would become the subject "None"; a boolean column's True would be read as index 1."""
    src, out = tmp_path / "src", tmp_path / "out"
    rows = mmlu_pro_rows()
    rows[1]["category"] = None
    write(src / "data" / "test-00000-of-00001.parquet", rows)
    one_error_line(convert("mmlu-pro", src, "--out", out), "row 1: the subject/category is None, not text")
    write(src / "all" / "validation-00000-of-00001.parquet",
          [r | {"answer": bool(r["answer"] % 2)} for r in mmlu_rows("virology", 2)])
    one_error_line(convert("mmlu", src, "--out", out), "row 0: answer index False is not 0-3")
    assert not out.exists()


def mmlu_pro_rows() -> list[dict]:
    rows = []
    for i, cat in enumerate(["computer science", "law", "computer science"]):
        options = [f"choice {k} of {i}" for k in range(10 - i)]  # up to 10 options (letters A-J)
        idx = (7 * i + 3) % len(options)
        rows.append({"question_id": 100 + i, "question": f"pro question {i}", "options": options,
                     "answer": "ABCDEFGHIJ"[idx], "answer_index": idx, "cot_content": "", "category": cat,
                     "src": "ori_mmlu"})
    return rows


def test_mmlu_pro_becomes_one_subject_per_category_with_up_to_ten_options(tmp_path):
    src, out = tmp_path / "pro", tmp_path / "out"
    write(src / "data" / "test-00000-of-00001.parquet", mmlu_pro_rows())
    res = convert("mmlu-pro", src, "--split", "test", "--out-split", "validation", "--out", out)
    assert res.returncode == 0, res.stderr
    items, report = load_mmmu(out, "validation")
    assert report.subjects == ["computer_science", "law"]
    by_question = {it.question: it for it in items}
    written = {r["question"]: json.loads(r["explanation"]) for f in out.rglob("*.parquet")
               for r in pq.read_table(f).to_pylist()}
    for r in mmlu_pro_rows():
        it = by_question[r["question"]]
        assert list(it.options) == r["options"] and it.answer == r["answer"]
        assert written[r["question"]]["question_id"] == r["question_id"]  # traceable to the source row
    assert "as split 'validation'" in res.stdout


def test_mmlu_pro_n_a_padding_is_dropped_and_the_key_follows_its_option(tmp_path):
    """MMLU-Pro's own evaluation drops "N/A" options; the answer must still name the source's correct text."""
    rows = mmlu_pro_rows()
    rows[0]["options"][8:] = ["N/A", "N/A"]  # trailing padding (answer index 3, before it)
    rows[1]["options"][2] = " N/A"  # one in the middle, before the answer
    rows[1]["answer_index"], rows[1]["answer"] = 6, "G"
    bad = [r | {"question": "key on N/A", "answer_index": 2, "answer": "C"} for r in rows[1:2]]
    src, out = tmp_path / "pro", tmp_path / "out"
    write(src / "data" / "test-00000-of-00001.parquet", rows)
    assert convert("mmlu-pro", src, "--out", out).returncode == 0
    items = {it.question: it for it in load_mmmu(out, "test")[0]}
    for r in rows:
        it = items[r["question"]]
        assert list(it.options) == [o for o in r["options"] if o.strip() != "N/A"]
        assert it.options["ABCDEFGHIJ".index(it.answer)] == r["options"][r["answer_index"]]
    assert items["pro question 1"].answer == "F"  # one option before it dropped
    write(src / "data" / "test-00000-of-00001.parquet", bad)
    one_error_line(convert("mmlu-pro", src, "--out", tmp_path / "o2"), "row 0: the answer 'C' is an 'N/A' option")


@pytest.mark.parametrize("kind", ["mmlu", "mmlu-pro"])
def test_a_row_the_reader_would_refuse_stops_before_anything_is_written(tmp_path, kind):
    """A row of one option (MMLU's choices, or MMLU-Pro's left after its "N/A" padding goes) passed the converter's
    checks: the split was written into --out, then refused by the read-back (exit 2, the --out file named, not the
    source row), and a rerun said --out already held it. Every row is now checked by the reader's own rule first."""
    src, out = tmp_path / "src", tmp_path / "out"
    if kind == "mmlu":
        rows = mmlu_rows("law", 3)
        rows[2]["choices"] = ["the only one"]
        rows[2]["answer"] = 0
        write(src / "all" / "validation-00000-of-00001.parquet", rows)
    else:
        rows = mmlu_pro_rows()
        rows[1]["options"] = ["kept", *["N/A"] * 8]
        rows[1]["answer_index"], rows[1]["answer"] = 0, "A"
        write(src / "data" / "validation-00000-of-00001.parquet", rows)
    one_error_line(convert(kind, src, "--split", "validation", "--out", out),
                   f"validation-00000-of-00001.parquet row {2 if kind == 'mmlu' else 1}: multiple-choice item has "
                   "one option")
    assert not out.exists()


def test_two_shardings_of_one_split_are_refused_not_counted_twice(tmp_path):
    """An old single-file download beside a re-sharded one: each set is complete, so both used to be read."""
    rows, src = mmlu_pro_rows(), tmp_path / "pro"
    write(src / "data" / "test-00000-of-00001.parquet", rows)
    write(src / "data" / "test-00000-of-00002.parquet", rows[:2])
    write(src / "data" / "test-00001-of-00002.parquet", rows[2:])
    one_error_line(convert("mmlu-pro", src, "--out", tmp_path / "out"),
                   "holds test-*-of-00001 and test-*-of-00002.parquet files, two shardings of one split")
    assert not (tmp_path / "out").exists()


def test_a_row_whose_answer_and_index_disagree_stops_before_anything_is_written(tmp_path):
    rows = mmlu_pro_rows()
    rows[1]["answer_index"] = (rows[1]["answer_index"] + 1) % len(rows[1]["options"])
    src, out = tmp_path / "pro", tmp_path / "out"
    write(src / "data" / "test-00000-of-00001.parquet", rows)
    one_error_line(convert("mmlu-pro", src, "--split", "test", "--out", out), "row 1: answer")
    assert not out.exists()


def test_text_the_prompt_would_read_as_a_picture_is_left_out_and_said(tmp_path):
    rows = mmlu_pro_rows()
    rows[0]["question"] = "Which label fits <image 1>?"
    src, out = tmp_path / "pro", tmp_path / "out"
    write(src / "data" / "test-00000-of-00001.parquet", rows)
    res = convert("mmlu-pro", src, "--split", "test", "--out", out)
    assert res.returncode == 0, res.stderr
    assert load_mmmu(out, "test")[1].n_multiple_choice == 2 and "; 1 row left out (see" in res.stdout
    [skipped] = json.loads((out / "convert-test.json").read_text())["skipped"]
    assert skipped["row"] == "test-00000-of-00001.parquet row 0" and "<image k>" in skipped["why"]


def test_other_splits_in_out_stay_and_the_same_split_needs_overwrite(mmlu_src, tmp_path):
    out = tmp_path / "out"
    assert convert("mmlu", mmlu_src, "--out", out).returncode == 0
    assert convert("mmlu", mmlu_src, "--split", "test", "--out", out).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("validation-*.parquet")}
    one_error_line(convert("mmlu", mmlu_src, "--split", "test", "--out", out), "already holds split 'test'")
    (mmlu_src / "anatomy" / "test-00000-of-00001.parquet").unlink()  # the new test split lacks anatomy
    assert convert("mmlu", mmlu_src, "--split", "test", "--out", out, "--overwrite").returncode == 0
    assert load_mmmu(out, "test")[1].subjects == ["abstract_algebra"]  # its old anatomy test file is gone
    assert {p: p.read_bytes() for p in out.rglob("validation-*.parquet")} == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_conversion_that_finished_while_this_one_read_its_source_is_not_replaced(mmlu_src, tmp_path, monkeypatch,
                                                                                   capfd, overwrite):
    """--out was checked for the split before the source was read, and locked only after: another conversion that
    ran whole meanwhile had its split replaced without --overwrite, both exiting 0 (found with a slow source beside
    a quick one); with --overwrite the old files listed were that check's, so the other's were replaced by name
    only. The check is made again under the lock: refused without --overwrite, replaced whole with it."""
    import probe.convert as pc
    from probe.errors import cli_main

    out, other = tmp_path / "out", tmp_path / "other"
    write(other / "virology" / "validation-00000-of-00001.parquet", mmlu_rows("virology", 2))
    real = pc.CONVERTERS["mmlu"]

    def slow(cfg, report, plan):  # the other conversion runs whole while this one reads its source
        real(cfg, report, plan)
        assert convert_process("mmlu", other, "--out", out).returncode == 0

    monkeypatch.setitem(pc.CONVERTERS, "mmlu", slow)
    capfd.readouterr()
    code = cli_main(pc.main, [str(a) for a in ("mmlu", mmlu_src, "--out", out, "--quiet",
                                               *(["--overwrite"] if overwrite else []))])
    if overwrite:
        assert code == 0 and load_mmmu(out, "validation")[1].subjects == ["abstract_algebra", "anatomy"]
    else:
        assert code == 2 and capfd.readouterr().err.strip().startswith(
            f"error: --out {out} already holds split 'validation' ({out / 'virology'}")
        assert load_mmmu(out, "validation")[1].subjects == ["virology"]


KILLED_AFTER_ONE_MOVE = """
import os, signal, sys
from pathlib import Path
from probe.convert import main
replace = Path.replace
def replace_then_die(self, target):
    replace(self, target)
    os.kill(os.getpid(), signal.SIGKILL)  # a kill while files move into --out, one subject in
Path.replace = replace_then_die
main(sys.argv[1:])
"""


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_conversion_killed_while_moving_into_out_is_refused_by_the_reader_and_finished_by_a_rerun(
        mmlu_src, tmp_path, overwrite):
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert convert("mmlu", mmlu_src, "--out", clean).returncode == 0
    if overwrite:  # an older split of another subject set, being replaced
        write(tmp_path / "old" / "virology" / "validation-00000-of-00001.parquet", mmlu_rows("virology", 2))
        assert convert("mmlu", tmp_path / "old", "--out", out).returncode == 0
    args = ["mmlu", mmlu_src, "--out", out, "--quiet", *(["--overwrite"] if overwrite else [])]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_ONE_MOVE, *map(str, args)], cwd=REPO)
    assert killed.returncode == -9 and len(list(out.glob("*/validation-*.parquet"))) == 1  # one of two subjects
    with pytest.raises(BadInput, match="stopped while it wrote split 'validation'"):
        load_mmmu(out, "validation")  # never read as a smaller set
    res = convert(*args)  # the same command again: no --overwrite needed to replace its own half
    assert res.returncode == 0, res.stderr
    assert load_mmmu(out, "validation")[0] == load_mmmu(clean, "validation")[0]  # as an uninterrupted conversion
    assert json.loads((out / "convert-validation.json").read_text())["n_items"] == {"abstract_algebra": 5,
                                                                                 "anatomy": 4}
    assert not list(out.glob(".convert-*"))


@pytest.mark.parametrize("case, want", [
    ("missing", "not a directory"), ("inside", "inside SRC"), ("outside", "is inside --out"),
    ("no-split", "no dev-*.parquet files"), ("out-split", "--out-split 'val*' is not a split name"),
    ("damaged", "not a readable parquet file"), ("columns", "no column 'choices'"), ("frames", "--frames must be")])
def test_bad_input_is_one_line_and_nothing_is_written(mmlu_src, tmp_path, case, want):
    out, args = tmp_path / "out", []
    if case == "missing":
        src = tmp_path / "nowhere"
    elif case == "inside":
        src, out = mmlu_src, mmlu_src / "converted"
    elif case == "outside":  # SRC/<split>-*.parquet would be taken, under --overwrite, for the old split's files
        src, out, args = tmp_path / "nest" / "law", tmp_path / "nest", ["--overwrite"]
        write(src / "validation-00000-of-00001.parquet", mmlu_rows("law", 2))
    elif case == "no-split":
        src, args = mmlu_src, ["--split", "dev"]
    elif case == "out-split":  # the refusal names the option that holds the pattern
        src, args = mmlu_src, ["--out-split", "val*"]
    elif case == "damaged":
        src = tmp_path / "damaged"
        (src / "law").mkdir(parents=True)
        (src / "law" / "validation-00000-of-00001.parquet").write_bytes(b"PAR1 not really")
    elif case == "columns":
        src = tmp_path / "other"
        write(src / "law" / "validation-00000-of-00001.parquet", [{"question": "q", "answer": 1}])
    else:
        src, args = mmlu_src, ["--frames", "0"]
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    one_error_line(convert("mmlu", src, "--out", out, *args), want)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing  # inputs and out untouched


def write_csv(path: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8") -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_mmmlu_one_subject_per_locale_cells_kept_as_text(tmp_path):
    src, out = tmp_path / "mmmlu", tmp_path / "out"
    for locale, answers in (("AR_XY", "BDA"), ("DE_DE", "CA")):
        write_csv(src / "test" / f"mmlu_{locale}.csv", ["", "Question", "A", "B", "C", "D", "Answer", "Subject"],
                  [[str(i), f"{locale} Frage {i}", "0042", "1e3", f"c{i}", f"d{i}", a, "anatomy"]
                   for i, a in enumerate(answers)])
    res = convert("mmmlu", src, "--out", out)
    assert res.returncode == 0, res.stderr
    items, report = load_mmmu(out, "test")  # MMMLU's own split name, the default
    assert report.subjects == ["AR_XY", "DE_DE"] and len(items) == 5
    for locale, answers in (("AR_XY", "BDA"), ("DE_DE", "CA")):
        mine = [it for it in items if it.subject == locale]
        assert [it.answer for it in mine] == list(answers)
        assert [list(it.options) for it in mine] == [["0042", "1e3", f"c{i}", f"d{i}"] for i in range(len(answers))]


def test_a_csv_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Excel and pandas' utf-8-sig write a BOM, which would read as part of the first column's name."""
    src, out = tmp_path / "mmmlu", tmp_path / "out"
    rows = [[f"Frage {i}", "a", "b", "c", "d", "ABCD"[i], "anatomy"] for i in range(3)]
    write_csv(src / "test" / "mmlu_DE-DE.csv", ["Question", "A", "B", "C", "D", "Answer", "Subject"], rows,
              encoding="utf-8-sig")
    res = convert("mmmlu", src, "--out", out)
    assert res.returncode == 0, res.stderr
    items, report = load_mmmu(out, "test")
    assert report.subjects == ["DE_DE"] and [(it.question, it.answer) for it in items] == [(r[0], r[5]) for r in rows]


@pytest.mark.parametrize("locales", [("DE_DE",), ("AR_XY", "DE_DE")])
def test_the_closing_line_counts_items_and_subjects_in_the_singular_for_one(tmp_path, locales):
    """The closing line said "1 subjects" for a one-locale MMMLU; the counts are the read-back set's (load_mmmu),
    the noun singular for one, plural otherwise (one item in the first locale, two in any other)."""
    src, out = tmp_path / "mmmlu", tmp_path / "out"
    for k, locale in enumerate(locales):
        write_csv(src / "test" / f"mmlu_{locale}.csv", ["Question", "A", "B", "C", "D", "Answer", "Subject"],
                  [[f"{locale} {i}?", "a", "b", "c", "d", "B", "anatomy"] for i in range(1 + min(k, 1))])
    res = convert("mmmlu", src, "--out", out)
    assert res.returncode == 0, res.stderr
    items, report = load_mmmu(out, "test")
    n, s = len(items), len(report.subjects)
    words = f"{n} item{'' if n == 1 else 's'} in {s} subject{'' if s == 1 else 's'} ("
    assert res.stdout.startswith(words) and (n, s) == ((1, 1) if len(locales) == 1 else (3, 2)), res.stdout


@pytest.mark.parametrize("cells, n", [(["Which", " of these is red", "apple", "sky", "grass", "A", "B", "bio"], 8),
                                      (["Short row", "x", "y"], 3)])
def test_a_csv_row_whose_cells_do_not_match_the_header_is_refused(tmp_path, cells, n):
    """A question with an unquoted comma put every cell of its row under the next column: the row became the
    question 'Which', options ' of these is red' … 'grass', answer 'A' (really option D's text) and was converted
    without a word, a wrong key scored as right. A row longer or shorter than the header is refused, naming it."""
    src, out = tmp_path / "mmmlu", tmp_path / "out"
    f = src / "test" / "mmlu_FR_FR.csv"
    write_csv(f, ["Question", "A", "B", "C", "D", "Answer", "Subject"], [["Q?", "1", "2", "3", "4", "B", "math"]])
    with open(f, "a") as fh:  # written by hand: csv.writer would quote the comma
        fh.write(",".join(cells) + "\n")
    one_error_line(convert("mmmlu", src, "--out", out),
                   f"mmlu_FR_FR.csv row 1: {n} cells, but the header names 7 columns")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["mmlu", "mmmlu"])
def test_a_source_file_without_rows_is_refused_not_left_out(tmp_path, kind):
    """A subject's split file (or a locale's CSV) holding no rows, a download that failed, was read as a subject with
    no items: the set was written without it, exit 0 (MMMLU's mean over languages then over 13 of 14). The reader
    refuses such a file; so does the converter now, naming it, nothing written."""
    src, out = tmp_path / "src", tmp_path / "out"
    if kind == "mmlu":
        write(src / "law" / "validation-00000-of-00001.parquet", mmlu_rows("law", 3))
        empty = src / "anatomy" / "validation-00000-of-00001.parquet"
        empty.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(mmlu_rows("anatomy", 1)).slice(0, 0), empty)
    else:
        header = ["Question", "A", "B", "C", "D", "Answer", "Subject"]
        write_csv(src / "test" / "mmlu_DE_DE.csv", header, [["Frage?", "a", "b", "c", "d", "B", "anatomy"]])
        write_csv(empty := src / "test" / "mmlu_FR_FR.csv", header, [])
    one_error_line(convert(kind, src, "--out", out), f"{empty}: holds no rows")
    assert not out.exists()


MMMLU_HEADER = ["Question", "A", "B", "C", "D", "Answer", "Subject"]


def test_mmmlu_missing_locales_are_named_in_one_warning_and_recorded(tmp_path):
    """A snapshot lacking some of MMMLU's 14 locale CSVs converted the rest without a word: a mean over 13 languages
    would be reported as MMMLU's. It still converts (a subset may be wanted), with one warning line naming the
    missing locales, which convert-<split>.json records; a whole snapshot gets neither. Oracle: the 14 locales of
    openai/MMMLU written out here, minus the files left out."""
    from probe.convert import MMMLU_LOCALES

    every = "AR_XY BN_BD DE_DE ES_LA FR_FR HI_IN ID_ID IT_IT JA_JP KO_KR PT_BR SW_KE YO_NG ZH_CN".split()
    assert list(MMMLU_LOCALES) == every
    for missing, out in (([], "whole"), (["SW_KE", "YO_NG"], "part")):
        src = tmp_path / f"src-{out}"
        for locale in (x for x in every if x not in missing):
            write_csv(src / "test" / f"mmlu_{locale}.csv", MMMLU_HEADER, [["Q?", "a", "b", "c", "d", "B", "anatomy"]])
        res = convert("mmmlu", src, "--out", tmp_path / out)
        assert res.returncode == 0, res.stderr
        warnings = [x for x in res.stderr.splitlines() if x.startswith("warning:")]
        record = json.loads((tmp_path / out / "convert-test.json").read_text())
        assert record["missing_subjects"] == missing
        assert len(record["n_items"]) == 14 - len(missing)
        if not missing:
            assert warnings == [] and res.stderr == ""
            continue
        assert len(warnings) == 1 and res.stderr.count("\n") == 1, res.stderr
        assert "2 of the 14 locales of openai/MMMLU" in warnings[0] and "SW_KE, YO_NG" in warnings[0], warnings[0]


def test_mmlu_subject_folders_short_of_the_57_are_named_in_one_warning():
    """The same for MMLU: a snapshot of some subject configs (no all/ to check them against) converted what it held
    without a word. The warning names at most 14 subjects and counts the rest; the record lists every one."""
    from probe.convert import MMLU_SUBJECTS, missing_subjects, missing_subjects_warning

    assert len(MMLU_SUBJECTS) == len(set(MMLU_SUBJECTS)) == 57  # cais/mmlu's subject configs, 'all' and aux aside
    have = MMLU_SUBJECTS[:3]
    missing = missing_subjects("mmlu", have)
    assert missing == sorted(set(MMLU_SUBJECTS) - set(have)) and len(missing) == 54
    line = missing_subjects_warning("mmlu", missing, "cais/mmlu", "convert-validation.json")
    assert "\n" not in line and line.startswith("warning: 54 of the 57 subjects of cais/mmlu")
    assert ", ".join(missing[:14]) in line and missing[14] not in line and "40 more" in line
    assert missing_subjects("mmlu", MMLU_SUBJECTS) == [] and missing_subjects("gpqa", ["Physics"]) == []


GPQA_HEADER = ["Pre-Revision Question", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3", "Explanation", "Subdomain", "Record ID", "High-level domain"]


def gpqa_rows(n: int) -> list[list[str]]:
    return [["", f" Q{i}: which? ", f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c", "", "Optics",
             f"rec{i:04d}", ("Physics", "Chemistry", "Biology")[i % 3]] for i in range(n)]


def test_gpqa_answers_land_where_the_seeded_order_puts_the_correct_one(tmp_path):
    src = tmp_path / "gpqa"
    write_csv(src / "gpqa_main.csv", GPQA_HEADER, gpqa_rows(12))
    for out in ("out1", "out2"):
        res = convert("gpqa", src, "--out-split", "validation", "--out", tmp_path / out)
        assert res.returncode == 0, res.stderr
    items, report = load_mmmu(tmp_path / "out1", "validation")
    assert report.subjects == ["Biology", "Chemistry", "Physics"] and len(items) == 12
    for it in items:
        i = int(it.question.split(":")[0][1:])
        assert sorted(it.options) == sorted([f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"])
        assert it.options["ABCD".index(it.answer)] == f"right {i}"  # the key follows the shuffle
    assert len({it.answer for it in items}) > 1  # not every correct answer at one letter
    assert items == load_mmmu(tmp_path / "out2", "validation")[0]  # the same order on every run


def test_gpqa_order_does_not_hang_on_pythons_shuffle(monkeypatch):
    """The order was random.Random(record).shuffle's, whose algorithm Python does not promise to keep (only random()
    for a seed; randrange and shuffle's draws changed in 3.2): a Python that draws another way would give another
    machine other letters for the same question. With shuffle's draws replaced (the pre-3.2 way), the order must not
    move; the correct answer still lands where the key says, and on each letter about as often."""
    import random

    from probe.convert import gpqa_options

    records = [f"rec{i:04d}" for i in range(400)]
    now = {r: gpqa_options("right", ["w1", "w2", "w3"], r) for r in records}
    monkeypatch.setattr(random.Random, "_randbelow", lambda self, n: int(self.random() * n))
    assert {r: gpqa_options("right", ["w1", "w2", "w3"], r) for r in records} == now
    for options, answer in now.values():
        assert sorted(options) == ["right", "w1", "w2", "w3"] and options["ABCD".index(answer)] == "right"
    counts = [sum(a == L for _, a in now.values()) for L in "ABCD"]
    assert min(counts) > 70 and max(counts) < 130, counts  # 100 each expected; sd 8.7
    # the contract itself, pinned: these records' orders on every machine and Python
    assert now["rec0000"] == (["w3", "w1", "right", "w2"], "C") and now["rec0002"] == (["w1", "w2", "w3", "right"], "D")


def test_gpqa_refuses_two_equal_options(tmp_path):
    rows = gpqa_rows(3)
    rows[2][5] = rows[2][2]
    write_csv(tmp_path / "gpqa" / "gpqa_main.csv", GPQA_HEADER, rows)
    one_error_line(convert("gpqa", tmp_path / "gpqa", "--out", tmp_path / "out"),
                   "gpqa_main.csv row 2: two answer options are the same text")
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("record, want", [("", "row 2: no Record ID"), ("rec0000", "row 2: Record ID 'rec0000' again")])
def test_gpqa_refuses_a_row_without_its_own_record_id(tmp_path, record, want):
    """The Record ID seeds the order: rows without one would all put the correct answer at one letter."""
    rows = gpqa_rows(3)
    rows[2][8] = record
    write_csv(tmp_path / "gpqa" / "gpqa_main.csv", GPQA_HEADER, rows)
    one_error_line(convert("gpqa", tmp_path / "gpqa", "--out", tmp_path / "out"), want)
    assert not (tmp_path / "out").exists()

# --- Video-MME ------------------------------------------------------------------------------------------------

def write_video(path: Path, shift: int, start: int = 0, n: int = N_FRAMES) -> None:
    """``n`` frames at FPS from ``start`` seconds, frame i coloured (8·(i + shift), 255 − 8·(i + shift), 128):
    its index, decodable. The container follows the suffix (.mkv: Matroska, which states no stream duration)."""
    from fractions import Fraction

    av = pytest.importorskip("av")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=FPS)
        s.width, s.height, s.pix_fmt, s.bit_rate = 64, 48, "yuv420p", 2_000_000
        for i in range(n):
            a = np.zeros((48, 64, 3), np.uint8)
            a[..., 0], a[..., 1], a[..., 2] = 8 * (i + shift), 255 - 8 * (i + shift), 128
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            frame.pts, frame.time_base = start * FPS + i, Fraction(1, FPS)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def frame_index(jpeg: bytes, shift: int) -> int:
    from PIL import Image

    r, g, _ = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).reshape(-1, 3).mean(0)
    return round((r + 255 - g) / 16) - shift


def nearest_frames(n: int) -> list[int]:
    """The frame nearest the middle of each of n equal spans of the N_FRAMES / FPS seconds (ties: the later)."""
    out = []
    for k in range(n):
        t = (k + 0.5) * N_FRAMES / FPS / n
        out.append(min(range(N_FRAMES), key=lambda i: (abs(i / FPS - t), -i)))
    return out


def video_mme_rows() -> list[dict]:
    rows = []
    for q, (vid, duration) in enumerate([("aB3-x_9", "short"), ("aB3-x_9", "short"), ("Zz0", "medium")]):
        answer = "ABCD"[(q + 1) % 4]
        rows.append({"video_id": f"{q:03d}", "duration": duration, "domain": "Knowledge", "sub_category": "Humanity",
                     "url": "https://www.youtube.com/watch?v=" + vid, "videoID": vid, "question_id": f"{q:03d}-1",
                     "task_type": "Counting Problem", "question": f"What happens in clip {q}?",
                     "options": [f"{L}. event {L.lower()} of {q}" for L in "ABCD"], "answer": answer})
    return rows


@pytest.fixture()
def video_src(tmp_path) -> Path:
    src = tmp_path / "video-mme"
    write(src / "videomme" / "test-00000-of-00001.parquet", video_mme_rows())
    write_video(src / "data" / "aB3-x_9.mp4", 0)
    write_video(src / "data" / "Zz0.mp4", 1)
    return src


def test_video_mme_items_get_the_frames_nearest_uniform_times_and_unlettered_options(video_src, tmp_path):
    out = tmp_path / "out"
    res = convert("video-mme", video_src, "--split", "test", "--frames", 4, "--out", out)
    assert res.returncode == 0, res.stderr
    items, report = load_mmmu(out, "test")
    assert report.subjects == ["medium", "short"]  # grouped by duration, Video-MME's headline breakdown
    by_question = {it.question: it for it in items}
    for q, r in enumerate(video_mme_rows()):
        it = by_question[f"<video> {r['question']}"]
        assert list(it.options) == [f"event {L.lower()} of {q}" for L in "ABCD"] and it.answer == r["answer"]
        shift = 0 if r["videoID"] == "aB3-x_9" else 1
        assert [frame_index(b, shift) for b in it.frames] == nearest_frames(4)


def test_a_matroska_video_starting_late_gets_the_frames_of_its_own_span(video_src, tmp_path):
    """Matroska states no stream duration and counts its file duration from 0: a video starting at 5 s used to
    be sampled over 8 s from 5 s, three of four frames the last one. Its .mkv name is found too."""
    (video_src / "data" / "Zz0.mp4").unlink()
    write_video(video_src / "data" / "Zz0.mkv", 1, start=5)
    out = tmp_path / "out"
    res = convert("video-mme", video_src, "--frames", 4, "--out", out)
    assert res.returncode == 0, res.stderr
    [it] = [it for it in load_mmmu(out, "test")[0] if it.subject == "medium"]  # Zz0's question
    assert [frame_index(b, 1) for b in it.frames] == nearest_frames(4)


@pytest.mark.parametrize("where", ["out", "out/converted"])
def test_an_out_in_the_videos_folder_is_refused(video_src, tmp_path, where, capfd):
    """--videos outside SRC was not guarded as SRC is: an --out there (or inside it) got the subjects' folders and
    the frame cache among the source's videos."""
    from conftest import tree_manifest
    from probe.convert import main
    from probe.errors import cli_main

    videos = (video_src / "data").rename(tmp_path / "out")
    before = tree_manifest(tmp_path)
    capfd.readouterr()
    assert cli_main(main, ["video-mme", str(video_src), "--frames", "2", "--videos", str(videos), "--out",
                           str(tmp_path / where), "--quiet"]) == 2
    err = capfd.readouterr().err.strip()
    assert "\n" not in err and f"lies inside --videos {videos}" in err, err
    assert tree_manifest(tmp_path) == before


def test_a_video_linked_from_outside_the_videos_folder_is_refused(video_src, tmp_path):
    """A video file that is a symlink leading out of the video folder was decoded and its frames written into the
    converted set (a videoID is a file name, never a path, for this reason); now refused in one line, nothing
    written. A link that stays inside the folder is read as before: its frames are the target video's."""
    data = video_src / "data"
    elsewhere = (data / "Zz0.mp4").rename(tmp_path / "Zz0.mp4")
    (data / "Zz0.mp4").symlink_to(elsewhere)
    out = tmp_path / "out"
    one_error_line(convert("video-mme", video_src, "--frames", 2, "--out", out),
                   f"{data / 'Zz0.mp4'} is a link to {elsewhere.resolve()}, outside the video folder {data.resolve()}")
    assert not out.exists() and elsewhere.is_file()
    (data / "Zz0.mp4").unlink()
    (data / "kept").mkdir()
    (data / "Zz0.mp4").symlink_to(elsewhere.rename(data / "kept" / "Zz0.mp4"))
    res = convert("video-mme", video_src, "--frames", 4, "--out", out)
    assert res.returncode == 0, res.stderr
    [it] = [it for it in load_mmmu(out, "test")[0] if it.subject == "medium"]  # Zz0's question
    assert [frame_index(b, 1) for b in it.frames] == nearest_frames(4)


def test_a_video_file_without_a_video_stream_is_named(video_src, tmp_path):
    av = pytest.importorskip("av")
    path = video_src / "data" / "Zz0.mp4"
    with av.open(str(path), "w") as c:  # an audio-only download under the video's name
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    one_error_line(convert("video-mme", video_src, "--out", tmp_path / "out"),
                   f"{path}: holds no video stream (an audio-only download?)")


def test_a_truncated_matroska_video_is_refused_not_sampled_from_what_is_left(video_src, tmp_path):
    """A Matroska file cut short still states its whole duration, but the sampler measured the span its frames
    cover: a download cut at a third gave four frames of its first 0.7 s, and the conversion exited 0."""
    (video_src / "data" / "Zz0.mp4").unlink()
    path = video_src / "data" / "Zz0.mkv"
    write_video(path, 1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    out = tmp_path / "out"
    one_error_line(convert("video-mme", video_src, "--frames", 4, "--out", out),
                   f"{path}: its frames end at 0.7 s, but the file states 3.0 s (a truncated download?)")
    assert not list(out.rglob("*.parquet"))  # only the frame cache of the videos done, kept for the rerun


def test_a_video_whose_frames_change_size_is_refused_before_the_split_is_written(video_src, tmp_path):
    """A stream that changes resolution part-way (here two MPEG-TS segments, 64×48 then 32×48, one after the other)
    gave frames of two sizes, which the reader refuses (a video's frames share one size): the split was written
    into --out, then the read-back exited 2 naming the --out file, and a rerun said --out already held the split.
    The sampler now refuses it, naming the video, before any of the split is written."""
    from fractions import Fraction

    av = pytest.importorskip("av")
    path = video_src / "data" / "Zz0.mp4"
    with open(path, "wb") as whole:
        for k, width in enumerate((64, 32)):
            part = tmp_path / f"part{k}.ts"
            with av.open(str(part), "w", format="mpegts") as c:
                s = c.add_stream("mpeg2video", rate=FPS)
                s.width, s.height, s.pix_fmt = width, 48, "yuv420p"
                for i in range(10):
                    frame = av.VideoFrame.from_ndarray(np.full((48, width, 3), 8 * i, np.uint8), format="rgb24")
                    frame.pts, frame.time_base = k * 10 + i, Fraction(1, FPS)
                    for p in s.encode(frame):
                        c.mux(p)
                for p in s.encode():
                    c.mux(p)
            whole.write(part.read_bytes())
    out = tmp_path / "out"
    res = convert("video-mme", video_src, "--frames", 4, "--out", out)
    one_error_line(res, f"{path}: its frames change size (64×48 at ")
    assert "32×48 at " in res.stderr
    assert not list(out.rglob("*.parquet"))  # only the frame cache of the videos done, kept for the rerun


def test_video_frames_are_kept_per_video_so_a_killed_conversion_resumes(tmp_path):
    import os

    from probe.convert import cached_frames

    cache, calls = tmp_path / "cache", []

    def sample(path: Path) -> list[bytes]:
        calls.append(path.name)
        return [path.read_bytes()] * 2

    videos = {v: tmp_path / f"{v}.mp4" for v in "ab"}
    for v, path in videos.items():
        path.write_bytes(v.encode())
    (cache / ".b.partial").mkdir(parents=True)  # a kill while b's frames were written
    (cache / ".b.partial" / "00000.jpg").write_bytes(b"half")
    assert cached_frames({"a": videos["a"]}, cache, sample, True) == {"a": [b"a"] * 2}
    assert cached_frames(videos, cache, sample, True) == {"a": [b"a"] * 2, "b": [b"b"] * 2}
    assert calls == ["a.mp4", "b.mp4"]  # a sampled once; b's partial folder redone
    st = videos["a"].stat()
    videos["a"].write_bytes(b"A, downloaded again")  # the file changed since its frames were kept
    os.utime(videos["a"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cached_frames(videos, cache, sample, True)["a"] == [b"A, downloaded again"] * 2  # never the old frames
    assert calls == ["a.mp4", "b.mp4", "a.mp4"]
    st = videos["a"].stat()
    videos["a"].write_bytes(b"a, downloaded again")  # the same size: its time alone tells it changed (mut46)
    os.utime(videos["a"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cached_frames(videos, cache, sample, True)["a"] == [b"a, downloaded again"] * 2
    assert calls == ["a.mp4", "b.mp4", "a.mp4", "a.mp4"]


def test_video_mme_refuses_missing_videos_and_misnumbered_options(video_src, tmp_path):
    (video_src / "data" / "Zz0.mp4").unlink()
    one_error_line(convert("video-mme", video_src, "--split", "test", "--out", tmp_path / "o1"),
                   "1 of 2 videos are not in")
    rows = video_mme_rows()
    rows[0]["options"][1] = "C. swapped"
    write(video_src / "videomme" / "test-00000-of-00001.parquet", rows)
    one_error_line(convert("video-mme", video_src, "--split", "test", "--out", tmp_path / "o2"),
                   "are not lettered A, B, … in order")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_disk_full_on_the_record_leaves_a_split_the_same_command_finishes(mmlu_src, tmp_path, monkeypatch):
    """The split's files were moved into --out and the work dir (the unfinished marker with it) removed before
    convert-<split>.json was written: a disk that filled on that record left a whole-looking split without it, the
    error said to rerun the same command, and that rerun was refused ('already holds split ...; give --overwrite').
    Now the record is written while the marker still stands: the rerun finishes the split."""
    import errno

    import probe.results

    real = probe.results.atomic_write_json

    def full(path, *args, **kwargs):
        if Path(path).name.startswith("convert-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(probe.results, "atomic_write_json", full)
    res = convert("mmlu", mmlu_src, "--out", out)
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "no space left" in res.stderr, res.stderr
    monkeypatch.undo()
    with pytest.raises(BadInput):  # never read as complete in between
        load_mmmu(out, "validation")
    res = convert("mmlu", mmlu_src, "--out", out)
    assert res.returncode == 0, res.stderr
    assert len(load_mmmu(out, "validation")[0]) == 9  # the fixture's 5 + 4 rows, once
    assert json.loads((out / "convert-validation.json").read_text())["n_items"] == {"abstract_algebra": 5,
                                                                                 "anatomy": 4}
    assert not list(out.glob(".convert-*"))


def test_a_corrupt_video_file_is_named_in_one_line_and_nothing_is_written(video_src, tmp_path):
    """A video file that is not a video (a download that failed into an HTML page, here junk bytes): exit 2 naming
    the file and the decoder's reason, no traceback, no split written."""
    path = video_src / "data" / "Zz0.mp4"
    path.write_bytes(b"<html>not found</html>" * 40)
    out = tmp_path / "out"
    one_error_line(convert("video-mme", video_src, "--frames", 4, "--out", out), f"{path}: cannot decode its video (")
    assert not list(out.rglob("*.parquet"))


@pytest.mark.parametrize("n_frames", [1, 3])
def test_a_clip_of_fewer_frames_than_asked_repeats_its_nearest_frames(video_src, tmp_path, n_frames):
    """A clip of one or three frames sampled at --frames 4: each slot still gets the decoded frame nearest the
    middle of its span (oracle: the formula over the clip's own frame times), so frames repeat, none is invented
    and the count is the one asked for."""
    write_video(video_src / "data" / "Zz0.mp4", 1, n=n_frames)
    out = tmp_path / "out"
    res = convert("video-mme", video_src, "--frames", 4, "--out", out)
    assert res.returncode == 0, res.stderr
    [it] = [it for it in load_mmmu(out, "test")[0] if it.subject == "medium"]
    want = [min(range(n_frames), key=lambda i: (abs(i / FPS - (k + 0.5) * n_frames / FPS / 4), -i)) for k in range(4)]
    assert [frame_index(b, 1) for b in it.frames] == want


# --- mut46: surviving mutants -------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, want", [
    ({"answer": 4}, "answer index 4 is not 0-3"),
    ({"choices": [f"c{k}" for k in range(27)], "answer": 0}, "27 options, but letters run only A-Z")])
def test_an_mmlu_key_past_the_last_option_or_a_27th_option_is_one_line(tmp_path, change, want):
    """An index equal to the option count, or a 27th option, is bad input (exit 2, one line), not an IndexError or
    option_letters' ValueError ending the command in a traceback."""
    rows = mmlu_rows("law", 3)
    rows[1].update(change)
    write(tmp_path / "src" / "law" / "validation-00000-of-00001.parquet", rows)
    one_error_line(convert("mmlu", tmp_path / "src", "--out", tmp_path / "out"), f"validation-00000-of-00001."
                   f"parquet row 1: {want}")
    assert not (tmp_path / "out").exists()


def test_gpqa_refuses_options_equal_but_for_surrounding_spaces(tmp_path):
    """The options are written stripped, so 'right 2' and 'right 2 ' would be two options of one text."""
    rows = gpqa_rows(3)
    rows[2][5] = rows[2][2] + " "
    write_csv(tmp_path / "gpqa" / "gpqa_main.csv", GPQA_HEADER, rows)
    one_error_line(convert("gpqa", tmp_path / "gpqa", "--out", tmp_path / "out"),
                   "gpqa_main.csv row 2: two answer options are the same text")


def test_a_long_matroska_video_cut_short_by_a_seventh_is_refused(tmp_path):
    """Past 50 s the allowance is 2 % of the stated duration, not the 1 s floor: a 100 s video cut to three
    quarters of its bytes ends its frames some 15 s early (measured: the frames decoded) and is refused."""
    from fractions import Fraction

    from probe.convert import sample_frames, stream_end

    av = pytest.importorskip("av")
    path = tmp_path / "long.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=1)
        s.width, s.height, s.pix_fmt, s.gop_size = 16, 16, "yuv420p", 5
        for i in range(100):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 1)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    assert len(sample_frames(path, 4, 64)) == 4  # whole: sampled
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])
    with av.open(str(path)) as c:
        end, stated = stream_end(c, c.streams.video[0]), c.duration / 1e6
    assert stated == 100 and 2 < stated - end < 20, end  # more than 2 %, less than 20 %, and past the 1 s floor
    with pytest.raises(BadInput, match=f"its frames end at {end:.1f} s, but the file states 100.0 s"):
        sample_frames(path, 4, 64)


def test_mmlu_auxiliary_train_is_no_subject(mmlu_src, tmp_path):
    """cais/mmlu's auxiliary_train folder holds training questions of other sets (its one split: train), not an MMLU
    subject: --split train finds no MMLU rows rather than converting those as one."""
    one_error_line(convert("mmlu", mmlu_src, "--split", "train", "--out", tmp_path / "out"),
                   "no train-*.parquet files in")
    assert not (tmp_path / "out").exists()
