import ast
import io
import json
import random
import re
from collections import Counter

import pytest
from PIL import Image

from probe.mmmu import load_mmmu
from probe.synthetic import (
    ALL_KINDS, BACKGROUND, COLOURS, QUESTION_BUILDERS, SLOTS, SUBJECT_KINDS, SceneSpec, ShapeSpec,
    build_dataset, default_data_dir, draw_scene, generate_items, main, png_bytes, random_scene,
)  # fmt: skip

COLOUR_OF = {rgb: name for name, rgb in COLOURS.items()}


def decode(b: bytes) -> Image.Image:
    return Image.open(io.BytesIO(b)).convert("RGB")


def read_scene(img: Image.Image) -> dict[str, str]:
    """slot -> colour name, read from the pixels alone (no antialiasing, so colours are exact)."""
    out = {}
    for slot, (fx, fy) in SLOTS.items():
        px = img.getpixel((int(fx * img.width), int(fy * img.height)))
        if px != BACKGROUND:
            out[slot] = COLOUR_OF[px]
    return out


def expected_answer(kind: str, question: str, scenes: list[SceneSpec]) -> str:
    """Derive the answer text independently of the generator's bookkeeping."""
    shapes = scenes[0].shapes
    if kind == "colour":
        return next(s.colour for s in shapes if f"the {s.kind}?" in question)
    if kind == "shape":
        return next(s.kind for s in shapes if f"is {s.colour}?" in question)
    if kind == "count":
        return str(len(shapes))
    if kind == "position":
        return next(s.slot for s in shapes if f"the {s.colour} {s.kind}?" in question)
    assert kind == "compare"
    if "more shapes" in question:
        return "Image 1" if len(shapes) > len(scenes[1].shapes) else "Image 2"
    colour = question.split("contains a ")[1].split()[0]
    has = [colour in {s.colour for s in sc.shapes} for sc in scenes]
    assert has.count(True) == 1  # unambiguous
    return f"<image {has.index(True) + 1}>"


def test_generate_deterministic_per_seed():
    a = generate_items(20, seed=3)
    b = generate_items(20, seed=3)
    assert a == b  # includes the PNG bytes
    c = generate_items(20, seed=4)
    assert [r["image_1"]["bytes"] for r in a] != [r["image_1"]["bytes"] for r in c]


def test_global_rng_untouched():
    random.seed(123)
    state = random.getstate()
    generate_items(5, seed=0)
    assert random.getstate() == state


def test_png_bytes_deterministic():
    spec = random_scene(random.Random(0))
    assert png_bytes(draw_scene(spec, 64)) == png_bytes(draw_scene(spec, 64))


def test_build_dataset_byte_identical(tmp_path):
    build_dataset(tmp_path / "a", n_per_subject=6, seed=1)
    build_dataset(tmp_path / "b", n_per_subject=6, seed=1)
    build_dataset(tmp_path / "c", n_per_subject=6, seed=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert len(files) == len(SUBJECT_KINDS)
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_open_fraction_and_kinds():
    rows = generate_items(20, seed=0, kinds=("count",), open_fraction=0.25)
    assert Counter(r["question_type"] for r in rows) == {"multiple-choice": 15, "open": 5}
    assert {r["subfield"] for r in rows} == {"count"}
    for r in rows:
        if r["question_type"] == "open":
            assert r["options"] == "[]" and r["answer"].isdigit()
    with pytest.raises(ValueError, match="unknown"):
        generate_items(2, seed=0, kinds=("smell",))


@pytest.mark.parametrize("n, fraction, n_open", [(3, 0.5, 2), (7, 0.3, 2), (13, 0.1, 1), (5, 0.9, 4)])
def test_the_open_items_are_the_rounded_share(n, fraction, n_open):
    """generate_items makes round(n * open_fraction) items open-ended (its docstring; 1.5 of 3 is 2, 4.5 of 5 is
    4), counted here from the rows (a mutant truncating, 1 of 3, passed every test: their shares were whole)."""
    rows = generate_items(n, seed=1, kinds=("count",), open_fraction=fraction)
    assert sum(r["question_type"] == "open" for r in rows) == n_open


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_answers_match_scene_and_pixels(kind):
    rows = generate_items(30, seed=11, image_size=64, kinds=(kind,), open_fraction=0.2)
    for r in rows:
        info = json.loads(r["explanation"])
        scenes = [SceneSpec.from_json(s) for s in info["scenes"]]
        assert info["kind"] == kind and len(scenes) == (2 if kind == "compare" else 1)
        for k, scene in enumerate(scenes, start=1):
            # the picture shows exactly the spec: one shape per slot, distinct colours and kinds
            img = decode(r[f"image_{k}"]["bytes"])
            assert img.size == (64, 64)
            assert read_scene(img) == {s.slot: s.colour for s in scene.shapes}
            assert len({s.colour for s in scene.shapes}) == len({s.kind for s in scene.shapes}) == len(scene.shapes)
        for k in range(len(scenes) + 1, 8):
            assert r[f"image_{k}"] is None
        truth = expected_answer(kind, r["question"], scenes)
        if r["question_type"] == "open":
            assert r["answer"] == truth
        else:
            options = ast.literal_eval(r["options"])
            assert options.count(truth) == 1 and len(set(options)) == len(options)
            assert options[ord(r["answer"]) - ord("A")] == truth


def test_round_trip_through_loader(tmp_path):
    root = build_dataset(tmp_path, n_per_subject=20, seed=5)
    items, rep = load_mmmu(root)
    assert rep.subjects == sorted(SUBJECT_KINDS)
    assert rep.n_multiple_choice == 4 * 18 and rep.n_skipped_open == 4 * 2
    assert max(len(it.options) for it in items) >= 5  # letters beyond D occur
    assert any(it.answer > "D" for it in items)
    compare = [it for it in items if it.subject == "Comparison"]
    assert compare and all(len(it.images) == 2 for it in compare)
    assert any(it.options == ("<image 1>", "<image 2>") or it.options == ("<image 2>", "<image 1>") for it in compare)
    for it in items:
        assert all(im.size == (64, 64) for im in it.pil_images())
    assert load_mmmu(build_dataset(tmp_path / "again", n_per_subject=20, seed=5))[1].fingerprint == rep.fingerprint


def test_scene_spec_json_round_trip():
    spec = SceneSpec((ShapeSpec("star", "red", "left"), ShapeSpec("circle", "blue", "center")))
    assert SceneSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    img = draw_scene(spec, 96)
    assert read_scene(img) == {"left": "red", "center": "blue"}


def test_a_framed_scene_at_64_px_has_a_2_px_border():
    """SceneSpec.frame is a 2-px border at the 64 px the zoo's image organisms train on (the frame is what tells
    their task images apart): the two outermost pixel rings are the frame's colour, the third is background
    (a mutant drawing 1 px passed every test)."""
    frame = (0, 0, 0)
    img = draw_scene(SceneSpec((ShapeSpec("circle", "red", "center"),), frame=frame), 64)
    for x, y in ((0, 0), (1, 1), (63, 32), (62, 32), (32, 0), (32, 1), (1, 40)):
        assert img.getpixel((x, y)) == frame, (x, y)
    for x, y in ((2, 2), (61, 32), (32, 2), (2, 40)):
        assert img.getpixel((x, y)) == BACKGROUND, (x, y)


def test_builders_are_pure_given_rng():
    for kind, build in QUESTION_BUILDERS.items():
        assert build(random.Random(9), False) == build(random.Random(9), False), kind


def test_default_data_dir_is_in_sync(tmp_path):
    root = default_data_dir()
    items, rep = load_mmmu(root)
    assert rep.n_multiple_choice == 48 and rep.n_skipped_open == 4
    assert sum(p.stat().st_size for p in root.rglob("*")) < 1_000_000
    assert any(len(it.options) > 4 for it in items)
    # the committed files are what build_dataset's defaults produce (compare content, not parquet bytes,
    # which carry the pyarrow version)
    assert load_mmmu(build_dataset(tmp_path))[1].fingerprint == rep.fingerprint


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--n", "4", "--seed", "2", "--split", "dev", "--split", "validation"]) == 0
    assert len(load_mmmu(tmp_path, split="dev")[0]) > 0
    assert len(load_mmmu(tmp_path, split="validation")[0]) > 0
    assert str(tmp_path) in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--split", "../x"], "--split '../x' is not a split name"),
    (["--split", "val*"], "--split 'val*' is not a split name"),
    (["--out", "{afile}/sub"], "is a file, not a directory")])
def test_cli_bad_split_or_out_is_one_line_and_writes_nothing(tmp_path, capsys, argv, words):
    """``--split ../x`` wrote x-00000-of-00001.parquet into --out itself, beside the subject folders (a set no
    command reads again); a split is a name, as every reader checks. An --out below a file is named before writing."""
    from probe.errors import cli_main

    afile = tmp_path / "afile"
    afile.write_text("keep")
    argv = ["--out", str(tmp_path / "out"), "--n", "1", *[a.format(afile=afile) for a in argv]]
    assert cli_main(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and afile.read_text() == "keep"


def test_cli_writes_into_a_non_empty_out_only_its_own_set_again_or_with_overwrite(tmp_path, capsys):
    """``--out DIR`` wrote into any existing dir: another set's split files stayed beside the new ones (read as one
    set) and other files were kept unasked. As every other command's --out: a non-empty DIR is refused (exit 2, one
    line, nothing changed) unless it holds exactly the set of the same options (written again, the same items) or
    --overwrite (this run's splits replaced, other files kept). Oracle: build_dataset into a fresh dir."""
    from probe.errors import cli_main

    def snapshot(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    def refused(argv, words):
        before = snapshot(out)
        assert cli_main(main, ["--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, err
        assert snapshot(out) == before

    def fingerprint(**kw):
        return load_mmmu(build_dataset(tmp_path / f"oracle-{len(list(tmp_path.iterdir()))}", **kw))[1].fingerprint

    out = tmp_path / "out"
    assert main(["--out", str(out), "--n", "2", "--seed", "3"]) == 0
    first = snapshot(out)
    assert load_mmmu(out)[1].fingerprint == fingerprint(n_per_subject=2, seed=3)
    assert main(["--out", str(out), "--n", "2", "--seed", "3"]) == 0  # the same set again: the same items
    assert snapshot(out).keys() == first.keys() and load_mmmu(out)[1].fingerprint == fingerprint(n_per_subject=2,
                                                                                                 seed=3)
    refused(["--n", "2", "--seed", "4"], "holds a probe.synthetic set of other options (--seed 3 there, 4 here)")
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    refused(["--n", "2", "--seed", "3"], "holds files its synthetic.json does not list")
    (out / "Art").mkdir()  # another set's subject with the same split: read as one set with this one's
    (out / "Art" / "validation.parquet").write_bytes((out / "Counting" / "validation-00000-of-00001.parquet")
                                                      .read_bytes())
    (out / "Art" / "dev.parquet").write_bytes(b"another split, kept")
    assert main(["--out", str(out), "--n", "1", "--seed", "4", "--overwrite"]) == 0
    assert load_mmmu(out)[1].fingerprint == fingerprint(n_per_subject=1, seed=4)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (out / "Art" / "dev.parquet").read_bytes() == b"another split, kept"
    assert "left out: Art" in capsys.readouterr().err  # its validation file went with the --overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x", encoding="utf-8")
    out = foreign
    refused([], "is not empty and holds no probe.synthetic set")


@pytest.mark.parametrize("with_images", [True, False])
def test_bench_rows_read_back_half_two_image_at_the_asked_length(tmp_path, with_images):
    """mmmu_length_rows (bench/sweep.py's MMMU-like items): rows the MMMU loader reads back, alternately one and two
    images (none and no <image k> text without images), answers right for the pixels (oracle: expected_answer over
    the scene JSON), the question + options at least text_tokens words long (the counter given; oracle: str.split),
    and the same rows for the same seed."""
    from probe.mmmu import load_items
    from probe.synthetic import mmmu_length_rows, write_mmmu_parquet

    words = lambda s: len(s.split())  # noqa: E731
    rows = mmmu_length_rows(6, 3, 32, 40, words, with_images)
    assert rows == mmmu_length_rows(6, 3, 32, 40, words, with_images)
    assert rows != mmmu_length_rows(6, 4, 32, 40, words, with_images)
    # ids count from 1 as MMMU's do (validation_Accounting_1 is its first item)
    assert [r["id"] for r in rows] == [f"validation_Bench_{i}" for i in range(1, 7)]
    write_mmmu_parquet({"Bench": rows}, tmp_path, "validation")
    items, report = load_items(str(tmp_path))
    assert report.n_multiple_choice == 6 and report.n_skipped_open == 0
    assert [len(it.images) for it in items] == ([1, 2] * 3 if with_images else [0] * 6)
    for it, row in zip(items, rows):
        assert words(it.question) + words(row["options"]) >= 40
        assert ("<image" in it.question + "".join(it.options)) == with_images
        spec = json.loads(row["explanation"])
        scenes = [SceneSpec.from_json(s) for s in spec["scenes"]]
        question = it.question if with_images else re.sub(r"image (\d)", r"<image \1>", it.question)
        want = expected_answer(spec["kind"], question, scenes)
        want = want if with_images else re.sub(r"<image (\d)>", r"image \1", want)
        assert it.options[ord(it.answer) - ord("A")] == want
        for img, scene in zip(it.pil_images(), scenes):
            assert read_scene(img.convert("RGB")) == {s.slot: s.colour for s in scene.shapes}
