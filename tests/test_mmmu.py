import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from probe.errors import BadInput
from probe.mmmu import Item, load_items, load_mmmu
from probe.synthetic import MMMU_COLUMNS, mmmu_schema, write_mmmu_parquet


def png(colour=(255, 0, 0), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


RED, GREEN, BLUE = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))


def row(i: int, subject: str = "Art", split: str = "validation", **kw) -> dict:
    r = {c: None for c in MMMU_COLUMNS}
    r.update(id=f"{split}_{subject}_{i}", question="<image 1> What colour?", options="['red', 'green', 'blue', 'white']",
             explanation="", image_1={"bytes": RED, "path": "a.png"}, img_type="['Photo']", answer="A",
             topic_difficulty="Easy", question_type="multiple-choice", subfield="x")
    r.update(kw)
    return r


def write(root: Path, rows_by_subject: dict, split: str = "validation") -> Path:
    write_mmmu_parquet(rows_by_subject, root, split)
    return root


def test_basic_load_and_sorting(tmp_path):
    # ids out of order, and numeric order differs from text order (10 after 9)
    write(tmp_path, {"Music": [row(10, "Music"), row(9, "Music")], "Art": [row(2), row(1)]})
    items, rep = load_mmmu(tmp_path)
    assert [it.id for it in items] == ["validation_Art_1", "validation_Art_2", "validation_Music_9", "validation_Music_10"]
    assert rep.subjects == ["Art", "Music"]
    assert rep.n_multiple_choice == 4 and rep.n_skipped_open == 0
    assert len(rep.files) == 2
    it = items[0]
    assert isinstance(it, Item) and it.subject == "Art"
    assert it.options == ("red", "green", "blue", "white") and it.letters == ("A", "B", "C", "D")
    assert it.images == (RED,) and it.frames == ()


def test_multi_image_order_and_unreferenced_dropped(tmp_path):
    """The k-th image shown is the one the text calls <image k>, whatever order the text names them in (lmms-eval's
    order); a filled column the text never references is left out, once some image is referenced."""
    r = row(1, question="Compare <image 2> with <image 1>, then <image 2> again.",
            options="['<image 3>', 'neither']",
            image_1={"bytes": RED, "path": None}, image_2={"bytes": GREEN, "path": None},
            image_3={"bytes": BLUE, "path": None}, image_4={"bytes": RED, "path": None})  # image_4 unreferenced
    write(tmp_path, {"Art": [r]})
    (it,), _ = load_mmmu(tmp_path)
    assert it.images == (RED, GREEN, BLUE)
    imgs = it.pil_images()
    assert [im.getpixel((0, 0)) for im in imgs] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.mark.parametrize("question", ["What colour is the shape?", "<image> What colour is the shape?"])
def test_images_the_text_never_references_are_refused(tmp_path, question):
    """Data tagged another way (no tag, LLaVA's bare <image>) used to run with its pictures silently left out: an
    image model answered blind and a text model was scored on image items as if they were text."""
    write(tmp_path, {"Art": [row(1), row(2, question=question)]})
    with pytest.raises(BadInput, match=r"row 1 id='validation_Art_2': image_1 is filled but the question and "
                                       r"options reference no <image k>"):
        load_mmmu(tmp_path)


def write_video_rows(root: Path, rows: list[dict]) -> None:
    schema = mmmu_schema(video=True)
    (root / "Vid").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "Vid" / "validation-00000-of-00001.parquet")


def test_an_item_with_images_and_video_is_refused_while_loading(tmp_path):
    """It used to be found only as the model ran, after run.json was written into --out."""
    video = [{"bytes": RED, "path": None}] * 2
    write_video_rows(tmp_path, [row(1, question="<video> <image 1> What happens?", video=video)])
    with pytest.raises(BadInput, match="references both images and <video>; one modality per item"):
        load_mmmu(tmp_path)


def test_a_video_item_that_also_fills_an_image_column_says_to_empty_it(tmp_path):
    """Telling it to tag the image would only lead to the images-and-video refusal."""
    video = [{"bytes": RED, "path": None}] * 2
    write_video_rows(tmp_path, [row(1, question="<video> What happens?", video=video)])  # row() fills image_1
    with pytest.raises(BadInput, match="a video item also fills image_1, which would not be shown .* empty that"):
        load_mmmu(tmp_path)


def test_open_items_are_counted_up_to_the_limit(tmp_path):
    """n_skipped_open counts the open items the --limit cut reaches, not those of subjects it never read."""
    open_row = {"question_type": "open", "options": "[]"}
    write(tmp_path, {"Art": [row(1), row(2, **open_row), row(3), row(4, **open_row), row(5)],
                     "Bio": [row(1, "Bio"), row(2, "Bio", **open_row)]})
    assert load_mmmu(tmp_path)[1].n_skipped_open == 3
    assert load_mmmu(tmp_path, limit=1)[1].n_skipped_open == 0
    assert load_mmmu(tmp_path, limit=2)[1].n_skipped_open == 1
    assert load_mmmu(tmp_path, limit=3)[1].n_skipped_open == 2  # Art_4 comes before Art_5
    assert load_mmmu(tmp_path, limit=4)[1].n_skipped_open == 3  # nothing cut: every row read


def test_pil_images_downscale_keeps_aspect(tmp_path):
    write(tmp_path, {"Art": [row(1, image_1={"bytes": png(size=(200, 100)), "path": None})]})
    (it,), _ = load_mmmu(tmp_path)
    assert it.pil_images()[0].size == (200, 100)
    small = it.pil_images(max_side=50)[0]
    assert small.size == (50, 25) and small.mode == "RGB"
    assert it.pil_images(max_side=500)[0].size == (200, 100)  # never upscaled


def test_transparent_image_composited_on_white(tmp_path):
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buf, format="PNG")
    write(tmp_path, {"Art": [row(1, image_1={"bytes": buf.getvalue(), "path": None})]})
    (it,), _ = load_mmmu(tmp_path)
    assert it.pil_images()[0].getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode, colour", [("L", 0), ("RGB", (0, 0, 0))])
def test_a_transparent_colour_key_is_composited_on_white_too(tmp_path, mode, colour):
    """Greyscale and RGB PNGs mark a transparent colour with a tRNS chunk (info['transparency']) instead of an alpha
    channel; only alpha modes and palettes were composited, so these showed their key colour (black) to the model."""
    buf = io.BytesIO()
    Image.new(mode, (4, 4), colour).save(buf, format="PNG", transparency=colour)
    write(tmp_path, {"Art": [row(1, image_1={"bytes": buf.getvalue(), "path": None})]})
    (it,), _ = load_mmmu(tmp_path)
    assert it.pil_images()[0].getpixel((0, 0)) == (255, 255, 255)


def test_a_16_bit_greyscale_image_keeps_its_tones(tmp_path):
    """A 16-bit greyscale PNG (scans, plots) opens in mode I;16, and convert("RGB") clips every value above 255:
    the model was shown a white square. Its tones are now scaled to 8 bits (v / 257), as a viewer shows them."""
    import numpy as np

    tones = np.array([[0, 257 * 64, 257 * 128, 65535, 255 * 256, 257 * 200 + 128]], dtype=np.uint16)  # 2 in /256's reach
    buf = io.BytesIO()
    Image.fromarray(tones).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    write(tmp_path, {"Art": [row(1, image_1={"bytes": buf.getvalue(), "path": None})]})
    (it,), _ = load_mmmu(tmp_path)
    shown = np.asarray(it.pil_images()[0])
    expected = np.rint(tones / 257).astype(np.uint8)
    assert shown.shape == (1, 6, 3) and (shown == expected[..., None]).all()


@pytest.mark.parametrize("orientation", range(1, 9))  # 2, 4, 5, 7 mirror too
def test_an_exif_rotated_photo_is_shown_upright(tmp_path, orientation):
    """A phone photo is stored sideways with an EXIF orientation tag; the datasets library's Image feature and
    transformers' load_image turn it upright, the probe showed it to the model as stored. Oracle: load_image."""
    import numpy as np
    from transformers.image_utils import load_image

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (250, 0, 0)  # red left half, blue right: a turn moves it
    stored[:, 20:] = (0, 0, 250)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    (tmp_path / "photo.jpg").write_bytes(buf.getvalue())
    write(tmp_path / "data", {"Art": [row(1, image_1={"bytes": buf.getvalue(), "path": None})]})
    (it,), _ = load_mmmu(tmp_path / "data")
    shown = np.asarray(it.pil_images()[0])
    assert shown.shape == ((20, 40, 3) if orientation in (1, 2, 3, 4) else (40, 20, 3))
    assert (shown == np.asarray(load_image(str(tmp_path / "photo.jpg")))).all()


def test_open_items_skipped_and_counted(tmp_path):
    rows = [row(1), row(2, question_type="open", options="[]", answer="42"), row(3, question_type="open", answer="x")]
    write(tmp_path, {"Art": rows})
    items, rep = load_mmmu(tmp_path)
    assert [it.id for it in items] == ["validation_Art_1"]
    assert rep.n_skipped_open == 2 and rep.n_multiple_choice == 1


def test_subjects_filter_and_unknown(tmp_path):
    write(tmp_path, {"Art": [row(1)], "Music": [row(1, "Music")], "Math": [row(1, "Math")]})
    items, rep = load_mmmu(tmp_path, subjects=["Music", "Art"])
    assert rep.subjects == ["Art", "Music"] and [it.subject for it in items] == ["Art", "Music"]
    with pytest.raises(BadInput, match=r"unknown subject.*Physics.*available: Art, Math, Music"):
        load_mmmu(tmp_path, subjects=["Physics"])


def test_limit_first_n_after_sorting(tmp_path):
    write(tmp_path, {"Art": [row(i) for i in (3, 1, 2)], "Music": [row(1, "Music")]})
    items, rep = load_mmmu(tmp_path, limit=2)
    assert [it.id for it in items] == ["validation_Art_1", "validation_Art_2"]
    assert rep.n_multiple_choice == 2 and rep.subjects == ["Art"]
    with pytest.raises(BadInput, match="limit"):
        load_mmmu(tmp_path, limit=0)


def test_more_than_four_options(tmp_path):
    write(tmp_path, {"Art": [row(1, options=str(["a", "b", "c", "d", "e", "f", "g"]), answer="G")]})
    (it,), _ = load_mmmu(tmp_path)
    assert it.letters == tuple("ABCDEFG") and it.answer == "G"


def test_split_selection_and_single_subject_dir(tmp_path):
    write(tmp_path, {"Art": [row(1)]}, split="validation")
    write(tmp_path, {"Art": [row(1, split="dev"), row(2, split="dev")]}, split="dev")
    assert len(load_mmmu(tmp_path, split="dev")[0]) == 2
    items, rep = load_mmmu(tmp_path / "Art", split="dev")  # a directory holding the parquet files directly
    assert rep.subjects == ["Art"] and len(items) == 2
    with pytest.raises(BadInput, match="no 'test.parquet' or 'test-\\*.parquet' files"):
        load_mmmu(tmp_path, split="test")


def test_a_root_with_split_files_and_subject_folders_is_refused(tmp_path):
    """The root's own files were read as one more subject named after the directory, beside the subject folders:
    a combined file next to its per-subject parts scored every item twice."""
    rows = [row(1), row(2)]
    write(tmp_path, {"Art": rows})
    write_mmmu_parquet({".": rows}, tmp_path, "validation")  # the same rows, also at the root
    assert (tmp_path / "validation-00000-of-00001.parquet").is_file()
    with pytest.raises(BadInput, match=r"holds 'validation\[-\*\]\.parquet' files \(validation-00000-of-00001\.parquet\) "
                                       r"and subject folders with them \(Art\)"):
        load_mmmu(tmp_path)
    assert len(load_mmmu(tmp_path / "Art")[0]) == 2  # either alone is fine


@pytest.mark.parametrize("split", ["*", "val*", "[dv]*", "../Art/dev", "dev-0"])
def test_a_split_is_a_name_not_a_pattern(tmp_path, split):
    """'--split *' used to glob the validation and dev files of a subject into one set (1 + 2 items here), exit 0."""
    write(tmp_path, {"Art": [row(1)]}, split="validation")
    write(tmp_path, {"Art": [row(1, split="dev"), row(2, split="dev")]}, split="dev")
    with pytest.raises(BadInput, match="is not a split name"):
        load_mmmu(tmp_path, split=split)
    assert [len(load_mmmu(tmp_path, split=s)[0]) for s in ("validation", "dev")] == [1, 2]


def test_video_frames(tmp_path):
    r = row(1, question="<video> What happens?", options="['x', 'y']")
    r["image_1"] = None
    r["video"] = [{"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}]
    write_video_rows(tmp_path, [r])
    (it,), _ = load_mmmu(tmp_path)
    assert it.frames == (RED, BLUE) and it.images == ()
    assert [f.getpixel((0, 0)) for f in it.pil_frames(max_side=4)] == [(255, 0, 0), (0, 0, 255)]


# ---- errors ---------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        load_mmmu(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="not a directory"):
        load_mmmu(tmp_path / "file")


def test_empty_dir(tmp_path):
    (tmp_path / "Art").mkdir()
    with pytest.raises(BadInput, match="no 'validation.parquet' or 'validation-\\*.parquet' files"):
        load_mmmu(tmp_path)


def test_a_set_without_the_split_names_the_splits_it_has(tmp_path):
    """probe.convert gpqa writes GPQA's only split, 'train', unless --out-split: read as validation (probe.eval's and
    replicate's default) the refusal said no validation files, not what the folder holds. Oracle: the splits written."""
    write(tmp_path / "one", {"Art": [row(1, split="train")]}, "train")
    with pytest.raises(BadInput, match=r"subject folders \(the split there: 'train'\)$"):
        load_mmmu(tmp_path / "one")
    write(tmp_path / "two", {"Art": [row(1, split="test")]}, "test")
    write(tmp_path / "two", {"Music": [row(1, "Music", split="dev")]}, "dev")
    with pytest.raises(BadInput, match=r"\(the splits there: 'dev', 'test'\)$"):
        load_mmmu(tmp_path / "two")


def test_a_split_file_without_rows_is_refused(tmp_path):
    """A subject whose split file holds no rows (a failed conversion or download) used to vanish from the run, even
    when named in subjects=; the scores then covered fewer subjects than asked for."""
    write(tmp_path, {"Art": [row(1)], "Bio": []})
    assert pq.read_metadata(tmp_path / "Bio" / "validation-00000-of-00001.parquet").num_rows == 0
    for subjects in (None, ["Art", "Bio"]):
        with pytest.raises(BadInput, match=r"Bio/validation-00000-of-00001\.parquet: holds no rows"):
            load_mmmu(tmp_path, subjects=subjects)


def test_an_empty_subject_folder_beside_others_is_refused(tmp_path):
    """An empty subject folder (an interrupted download) beside complete ones was skipped without a word; a folder
    holding only other splits' files is still skipped, and hidden folders (hf download's .cache) are ignored."""
    write(tmp_path, {"Art": [row(1)]})
    write(tmp_path, {"Music": [row(1, "Music", split="dev")]}, split="dev")
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)
    assert [it.subject for it in load_mmmu(tmp_path)[0]] == ["Art"]
    (tmp_path / "Bio").mkdir()
    with pytest.raises(BadInput, match=r"Bio: a subject folder with no \.parquet files"):
        load_mmmu(tmp_path)


def test_the_test_split_with_hidden_answers_is_refused_saying_so(tmp_path):
    """MMMU's test split keeps its answers private ('?'): it cannot be scored, and the error says that rather than
    calling '?' a bad option letter."""
    rows = [row(1, split="test", question_type="open", options="[]", answer="?"), row(2, split="test", answer="?")]
    write(tmp_path, {"Art": rows}, split="test")
    with pytest.raises(BadInput, match=r"test-00000-of-00001\.parquet \(Art\) row 1 id='test_Art_2': answer '\?' is "
                                       r"hidden \(MMMU's test split keeps its answers private\); this split cannot be "
                                       r"scored, use --split validation or dev"):
        load_mmmu(tmp_path, split="test")


@pytest.mark.parametrize("other", ["dev", "test", "train"])
def test_rows_of_another_split_in_a_split_file_are_refused(tmp_path, other):
    """MMMU ids are <split>_<Subject>_<n>: dev rows appended to a validation file (a 'dev+val' set) used to be scored
    as validation items, interleaved by number, with nothing in the output to tell."""
    write(tmp_path, {"Art": [row(1), row(2), row(1, split=other, answer="B")]})
    with pytest.raises(BadInput, match=rf"row 2 id='{other}_Art_1': the id names split '{other}', but the file holds "
                                       r"split 'validation'"):
        load_mmmu(tmp_path)
    write(tmp_path / "own", {"Art": [row(1, id="dev_set_item_1"), row(2, id="Art_dev_2")]})  # not <split>_Art_<n>
    assert len(load_mmmu(tmp_path / "own")[0]) == 2


def test_corrupt_parquet(tmp_path):
    (tmp_path / "Art").mkdir()
    (tmp_path / "Art" / "validation-00000-of-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(BadInput, match="cannot read parquet file .*validation-00000-of-00001.parquet"):
        load_mmmu(tmp_path)


def test_missing_column(tmp_path):
    (tmp_path / "Art").mkdir()
    t = pa.table({"id": ["validation_Art_1"], "question": ["q"], "options": ["['a']"], "question_type": ["multiple-choice"]})
    pq.write_table(t, tmp_path / "Art" / "validation-00000-of-00001.parquet")
    with pytest.raises(BadInput, match="missing required column.*answer"):
        load_mmmu(tmp_path)


def test_all_open_is_error(tmp_path):
    write(tmp_path, {"Art": [row(1, question_type="open")]})
    with pytest.raises(BadInput, match="no multiple-choice items.*skipped 1"):
        load_mmmu(tmp_path)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"options": "['a', 'b'"}, "not a Python list literal"),
        ({"options": "__import__('os').getcwd()"}, "not a Python list literal"),  # never evaluated
        ({"options": "['a', 3]"}, "list of strings"),
        ({"options": "{'a': 1}"}, "list of strings"),
        ({"options": "[]"}, "no options"),
        ({"options": "['only']", "answer": "A"}, "has one option: nothing to choose between"),  # was scored: p = 1
        ({"options": str([f"o{i}" for i in range(30)])}, "30 options, but letters run only A-Z"),
        ({"answer": "E"}, "answer 'E' is not one of the option letters A-D"),
        ({"answer": "b"}, "answer 'b'"),
        ({"answer": None}, "answer None"),
        ({"image_1": None}, "image_1 is referenced but empty or null"),
        ({"image_1": {"bytes": None, "path": "x.png"}}, "image_1 names a file \\('x.png'\\) but holds no image bytes"),
        ({"image_1": {"bytes": b"not an image", "path": None}}, "image_1 is not a decodable image"),
        ({"question": "<image 2> and <image 1>"}, "image_2 is referenced but empty or null"),
        ({"question": "<image 9>"}, "only image_1..image_7"),
        ({"question": "<video> what?"}, "references <video>"),
    ],
)
def test_malformed_rows_name_the_row(tmp_path, bad, match):
    write(tmp_path, {"Art": [row(1), row(7, **bad)]})
    with pytest.raises(BadInput, match=match) as exc:
        load_mmmu(tmp_path)
    msg = str(exc.value)
    assert "validation_Art_7" in msg and "validation-00000-of-00001.parquet" in msg and "\n" not in msg



@pytest.mark.parametrize("bad_id", [None, "  "])
def test_an_item_without_an_id_names_its_row(tmp_path, bad_id):
    """A null id became the item id 'None' in items.parquet (exit 0): refused, naming the file and row."""
    write(tmp_path, {"Art": [row(1), row(2, id=bad_id)]})
    with pytest.raises(BadInput, match=r"validation-00000-of-00001.parquet \(Art\) row 1 id=.*: 'id' must be a "
                                       r"non-empty string \(or an integer\)"):
        load_mmmu(tmp_path)


def test_ids_unique_within_a_subject(tmp_path):
    """Results are keyed by (subject, id): a subject repeating an id is bad input; two subjects may share ids."""
    write(tmp_path / "dup", {"Art": [row(1), row(2), row(1, answer="B")]})
    with pytest.raises(BadInput, match="subject Art: item id 'validation_Art_1' appears more than once"):
        load_mmmu(tmp_path / "dup")
    write(tmp_path / "shared", {"Art": [row(1, id="1"), row(2, id="2")], "Music": [row(1, "Music", id="1")]})
    items, _ = load_mmmu(tmp_path / "shared")
    assert [(it.subject, it.id) for it in items] == [("Art", "1"), ("Art", "2"), ("Music", "1")]


def test_fingerprint_stable_and_content_sensitive(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write(a, {"Art": [row(1), row(2)]})
    write(b, {"Art": [row(2), row(1)]})  # same content, other row order
    fp = load_mmmu(a)[1].fingerprint
    assert load_mmmu(a)[1].fingerprint == fp == load_mmmu(b)[1].fingerprint
    variants = [
        {"answer": "B"},
        {"question": "<image 1> What colour is it?"},
        {"options": "['red', 'green', 'blue', 'black']"},
        {"image_1": {"bytes": GREEN, "path": "a.png"}},
    ]
    seen = {fp}
    for i, kw in enumerate(variants):
        write(c / str(i), {"Art": [row(1), row(2, **kw)]})
        seen.add(load_mmmu(c / str(i))[1].fingerprint)
    assert len(seen) == len(variants) + 1
    assert load_mmmu(a, limit=1)[1].fingerprint != fp  # covers the loaded items only


def test_load_items_directory_and_alias(tmp_path, monkeypatch):
    write(tmp_path, {"Art": [row(1)]})
    assert len(load_items(str(tmp_path))[0]) == 1
    import huggingface_hub
    from huggingface_hub import constants

    # offline and not cached: one clear line saying exactly that
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_items("mmmu")
    # online: the substituted downloader is asked for the split (and subjects) only, and its snapshot is the root
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append((a, k)) or str(tmp_path))
    assert len(load_items("MMMU")[0]) == 1
    assert len(load_items("mmmu", subjects=["Art"])[0]) == 1
    assert calls == [(("MMMU/MMMU",), {"repo_type": "dataset", "allow_patterns": ["*/validation-*"]}),
                     (("MMMU/MMMU",), {"repo_type": "dataset", "allow_patterns": ["Art/validation-*"]})]


def test_mmmu_alias_download_failure_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    def unreachable(*a, **k):
        raise ConnectionError("Max retries exceeded with url: /api/datasets/MMMU/MMMU\n(more detail)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(BadInput, match=r"could not download MMMU/MMMU from the Hugging Face hub .*ConnectionError: "
                                       r"Max retries exceeded[^\n]*\)$"):
        load_items("mmmu")


# ---- red-team findings: frames never referenced, a missing shard, an unknown question_type ----------------------


def test_video_frames_the_question_never_references_are_refused(tmp_path):
    """The image rule applied to frames: a row whose 'video' column holds frames but whose question has no <video>
    used to load as a text item, so a text model was scored on video items and a video model answered blind."""
    video = [{"bytes": RED, "path": None}] * 2
    ok = row(1, question="<video> What happens?", image_1=None, video=video)
    blind = row(2, question="What happens?", image_1=None, video=video)
    write_video_rows(tmp_path, [ok, blind])
    with pytest.raises(BadInput, match=r"validation-00000-of-00001.parquet \(Vid\) row 1 id='validation_Art_2': "
                                       r"the 'video' column holds 2 frame\(s\) but the question references no "
                                       r"<video>") as exc:
        load_mmmu(tmp_path)
    assert "\n" not in str(exc.value)


def test_an_empty_or_null_video_column_on_a_text_item_is_fine(tmp_path):
    write_video_rows(tmp_path, [row(1, question="What?", image_1=None, video=[]),
                                row(2, question="What?", image_1=None, video=None)])
    items, _ = load_mmmu(tmp_path)
    assert [it.frames for it in items] == [(), ()]


def _copy_as(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())


def test_a_missing_shard_is_refused_naming_the_part(tmp_path):
    """Part 1 of 2 alone used to score half the subject with exit 0."""
    write(tmp_path / "src", {"Art": [row(1), row(2)], "Bio": [row(1, "Bio")]})
    one = tmp_path / "src" / "Art" / "validation-00000-of-00001.parquet"
    _copy_as(one, tmp_path / "d" / "Art" / "validation-00000-of-00002.parquet")
    _copy_as(tmp_path / "src" / "Bio" / "validation-00000-of-00001.parquet",
             tmp_path / "d" / "Bio" / "validation-00000-of-00001.parquet")
    with pytest.raises(BadInput, match=r"shard validation-00001-of-00002.parquet is missing") as exc:
        load_mmmu(tmp_path / "d")
    assert "Art" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(BadInput, match=r"validation-00001-of-00002.parquet is missing"):
        load_mmmu(tmp_path / "d" / "Art")  # a single-subject dir likewise
    # both parts present: loads (ids made distinct per part); a name without the pattern stands alone
    write(tmp_path / "p2", {"Art": [row(3), row(4)]})
    _copy_as(tmp_path / "p2" / "Art" / "validation-00000-of-00001.parquet",
             tmp_path / "d" / "Art" / "validation-00001-of-00002.parquet")
    assert len(load_mmmu(tmp_path / "d", subjects=["Art"])[0]) == 4
    _copy_as(one, tmp_path / "plain" / "Art" / "validation-mine.parquet")
    assert len(load_mmmu(tmp_path / "plain")[0]) == 2


@pytest.mark.parametrize("part, refused", [
    ("00002-of-00002", r"part 2 of 2 is out of range"),
    # part 00001 of 2 alone, its part 00000 absent, would score half the subject
    ("00001-of-00002", r"shard validation-00000-of-00002.parquet is missing"),
])
def test_a_shard_numbered_past_its_total_or_missing_its_first_part_is_refused(tmp_path, part, refused):
    write(tmp_path / "src", {"Art": [row(1)]})
    _copy_as(tmp_path / "src" / "Art" / "validation-00000-of-00001.parquet",
             tmp_path / "d" / "Art" / f"validation-{part}.parquet")
    with pytest.raises(BadInput, match=refused):
        load_mmmu(tmp_path / "d")


@pytest.mark.parametrize("value", ["Multiple-Choice", "multiple_choice", "mcq", "", None])
def test_an_unknown_question_type_is_refused_not_taken_as_open(tmp_path, value):
    """'Multiple-Choice' used to be read as open-ended and dropped: n_items shrank with no note."""
    write(tmp_path, {"Art": [row(1), row(2, question_type=value)]})
    with pytest.raises(BadInput, match=r"row 1 id='validation_Art_2': question_type " + re.escape(repr(value))
                                       + r" is not one of 'multiple-choice', 'open'") as exc:
        load_mmmu(tmp_path)
    assert "validation-00000-of-00001.parquet" in str(exc.value)


def test_a_truncated_image_is_refused_while_loading(tmp_path):
    """A JPEG cut short passes PIL's verify() (a header check) and used to fail only when the run decoded it: a
    traceback (exit 1) after the model had loaded and other items had run."""
    buf = io.BytesIO()
    Image.effect_noise((300, 200), 60).convert("RGB").save(buf, format="JPEG")
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    Image.open(io.BytesIO(cut)).verify()  # the old check passes ...
    with pytest.raises(OSError):
        Image.open(io.BytesIO(cut)).load()  # ... but the pixels cannot be decoded
    write(tmp_path, {"Art": [row(1), row(2, image_1={"bytes": cut, "path": "cut.jpg"})]})
    with pytest.raises(BadInput, match=r"row 1 id='validation_Art_2': image_1 is not a decodable image"):
        load_mmmu(tmp_path)


def test_a_split_saved_as_one_split_parquet_file_is_read(tmp_path, capsys):
    """``Art/validation.parquet`` (DataFrame.to_parquet's natural name) was not read: a subject saved so beside
    hub-named ones was left out without a word. It is read now, the same items as the shard-named file; both in
    one folder are refused (the same rows twice), and a subject folder without the split is named in a warning."""
    write(tmp_path / "hub", {"Art": [row(1), row(2)], "Music": [row(3, "Music")]})
    ref, _ = load_mmmu(tmp_path / "hub")
    mixed = tmp_path / "mixed"
    for subject in ("Art", "Music"):
        (mixed / subject).mkdir(parents=True)
        (src,) = (tmp_path / "hub" / subject).glob("validation-*.parquet")
        name = "validation.parquet" if subject == "Art" else src.name
        (mixed / subject / name).write_bytes(src.read_bytes())
    items, rep = load_mmmu(mixed)
    assert rep.subjects == ["Art", "Music"] and items == ref
    (mixed / "Theory").mkdir()
    write_mmmu_parquet({"Theory": [row(1, "Theory", split="dev")]}, mixed, "dev")  # a subject without validation
    assert load_mmmu(mixed)[0] == ref
    err = capsys.readouterr().err
    assert "warning: 1 subject folder(s) of" in err and "no 'validation' files and are left out: Theory" in err
    (src,) = (tmp_path / "hub" / "Art").glob("validation-*.parquet")
    (mixed / "Art" / src.name).write_bytes(src.read_bytes())
    with pytest.raises(BadInput, match=r"holds both validation\.parquet and validation-00000-of-00001\.parquet"):
        load_mmmu(mixed)


# ---- files from elsewhere: odd images, paths, folders -------------------------------------------------------------


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width × height white pixels, a few kB however large: a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + b"\xff" * ((width + 7) // 8)) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


ODD_IMAGES = {  # each was shown to the model wrong, read from elsewhere, or refused in words that did not say why
    "float image": (lambda: encoded(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF"),
                    r"image_1: its mode 'F' has no RGB reading"),  # was shown black
    "LAB image": (lambda: encoded(Image.new("LAB", (8, 8), (50, 0, 0)), "TIFF"),
                  r"image_1: its mode 'LAB' has no RGB reading"),  # mid grey was shown blue
    "32-bit integers": (lambda: encoded(Image.fromarray(np.full((8, 8), 100_000, np.int32)), "TIFF"),
                        r"image_1: a 32-bit integer image \(values 100000..100000, past 16 bits\)"),  # white
    "past PIL's pixel limit": (lambda: blank_png(9500, 9500),
                               r"image_1 is 9500×9500 = 90,250,000 pixels, past the 89,478,485 an image may have"),
    "past twice the limit": (lambda: blank_png(13400, 13400),  # PIL's own DecompressionBombError: named, not a type
                             r"image_1 is 179,560,000 pixels, past the 89,478,485 an image may have"),
    "SVG": (lambda: b"<svg xmlns='http://www.w3.org/2000/svg' width='8' height='8'/>",
            r"image_1 is not a decodable image \(no format PIL reads"),
    "truncated PNG": (lambda: encoded(Image.new("RGB", (16, 12), (255, 0, 0)))[:-20],
                      r"image_1 is not a decodable image \(OSError: Truncated File Read\)"),
}


@pytest.mark.parametrize("case", sorted(ODD_IMAGES))
def test_an_image_the_model_cannot_be_shown_as_it_looks_is_refused_saying_why(tmp_path, case):
    import warnings

    make, match = ODD_IMAGES[case]
    write(tmp_path, {"Art": [row(1), row(2, image_1={"bytes": make(), "path": None})]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning was two more lines on stderr
        with pytest.raises(BadInput, match=r"row 1 id='validation_Art_2': " + match) as exc:
            load_mmmu(tmp_path)
    assert "\n" not in str(exc.value) and " at 0x" not in str(exc.value)


@pytest.mark.parametrize("cell", [{"bytes": None, "path": "/etc/hostname"}, {"bytes": None, "path": "../../x.png"},
                                  {"bytes": b"", "path": "sub/x.png"}])
def test_an_image_cell_naming_a_file_is_refused_never_read(tmp_path, cell):
    """An image stored as a path (the datasets library's Image feature before its files are embedded) used to read
    as 'empty or null'; the file it names is never opened, wherever it points."""
    write(tmp_path, {"Art": [row(1), row(2, image_1=cell)]})
    with pytest.raises(BadInput, match=r"image_1 names a file \('" + re.escape(cell["path"]) + r"'\) but holds no "
                                       "image bytes; images are read from the parquet file itself, never from files"):
        load_mmmu(tmp_path)


def test_a_column_of_file_names_is_refused_never_read(tmp_path):
    target = tmp_path / "elsewhere.png"
    target.write_bytes(RED)
    (tmp_path / "data" / "Art").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row(1, image_1=str(target))]), tmp_path / "data" / "Art" / "validation.parquet")
    with pytest.raises(BadInput, match=r"image_1 names a file \('" + re.escape(str(target)) + r"'\)"):
        load_mmmu(tmp_path / "data")


SHOWN = {  # (image, the pixel the model is shown): modes convert("RGB") reads right, and animations' first frames
    "CMYK JPEG": (lambda: encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), (255, 0, 0)),
    "YCbCr JPEG": (lambda: encoded(Image.new("YCbCr", (8, 8), (100, 128, 128)), "JPEG"), (100, 100, 100)),
    "1-bit": (lambda: encoded(Image.new("1", (8, 8), 1)), (255, 255, 255)),
    "palette": (lambda: encoded(Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")), (0, 0, 255)),
    "grey with alpha": (lambda: encoded(Image.new("LA", (8, 8), (100, 128))), (177, 177, 177)),  # on white
    "animated GIF": (lambda: encoded(Image.new("RGB", (8, 8), (255, 0, 0)), "GIF", save_all=True,
                                     append_images=[Image.new("RGB", (8, 8), (0, 0, 255))], duration=100),
                     (255, 0, 0)),  # its first frame, as datasets and transformers' load_image show it
    "animated PNG": (lambda: encoded(Image.new("RGB", (8, 8), (0, 255, 0)), "PNG", save_all=True,
                                     append_images=[Image.new("RGB", (8, 8), (0, 0, 255))]), (0, 255, 0)),
}


@pytest.mark.parametrize("case", sorted(SHOWN))
def test_odd_but_readable_images_are_shown_as_they_look(tmp_path, case):
    make, pixel = SHOWN[case]
    write(tmp_path, {"Art": [row(1, image_1={"bytes": make(), "path": None})]})
    (it,), _ = load_mmmu(tmp_path)
    shown = it.pil_images()[0]
    assert shown.mode == "RGB" and shown.size == (8, 8)
    assert all(abs(a - b) <= 2 for a, b in zip(shown.getpixel((4, 4)), pixel)), shown.getpixel((4, 4))


def test_animated_images_are_warned_about_once_per_file(tmp_path, capsys):
    """An animated GIF, APNG or WebP, or a multi-page TIFF, is shown as its first frame
    (test_odd_but_readable_images_are_shown_as_they_look) and was so silently: now one warning line per parquet file names the file and the first one's frame count (the
    count its encoder wrote, the oracle), and a file of still images prints nothing."""
    def animation(fmt: str, n: int) -> bytes:
        frames = [Image.new("RGB", (8, 8), (40 * i, 0, 255 - 40 * i)) for i in range(n)]
        return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)

    write(tmp_path, {"Art": [row(1, image_1={"bytes": animation("GIF", 3), "path": None}), row(2),
                             row(3, image_1={"bytes": animation("PNG", 2), "path": None}),
                             row(4, image_1={"bytes": animation("WEBP", 4), "path": None}),
                             row(5, image_1={"bytes": animation("TIFF", 2), "path": None})],
                     "Music": [row(1, "Music"), row(2, "Music")]})
    items, rep = load_mmmu(tmp_path)
    assert len(items) == 7 and items[0].pil_images()[0].getpixel((4, 4)) == (0, 0, 255)  # still the first frame
    art = next(f for f in rep.files if "Art" in f)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"warning: {art}: 4 animated or multi-page image(s) are shown as their first frame only, the "
                     f"other frames unseen ({Path(art).name} (Art) row 0 id='validation_Art_1' image_1 has 3 frames; "
                     "and 3 more); store a still image (or the frames as a <video>) if more is meant"], lines
    assert [Image.open(io.BytesIO(it.images[0])).n_frames for it in items[:5]] == [3, 1, 2, 4, 2]
    assert items[4].pil_images()[0].getpixel((4, 4)) == (0, 0, 255)  # a TIFF's first page


def test_a_video_whose_frames_differ_in_size_is_refused_and_one_frame_is_a_video(tmp_path):
    """Frames of two sizes were all stretched to frame 0's for Qwen2-VL; one frame runs (repeated to the temporal
    patch, as the processor does)."""
    small, wide = encoded(Image.new("RGB", (32, 32))), encoded(Image.new("RGB", (64, 16)))
    write_video_rows(tmp_path, [row(1, question="<video> What?", image_1=None,
                                    video=[{"bytes": small, "path": None}, {"bytes": wide, "path": None}])])
    with pytest.raises(BadInput, match=r"row 0 id='validation_Art_1': video frame 1 is 64×16 but frame 0 is 32×32; "
                                       "a video's frames share one size"):
        load_mmmu(tmp_path)
    one = tmp_path / "one"
    one.mkdir()
    write_video_rows(one, [row(1, question="<video> What?", image_1=None, video=[{"bytes": small, "path": None}])])
    (it,), _ = load_mmmu(one)
    assert it.frames == (small,)


def test_a_split_file_that_is_a_folder_or_a_dangling_link_is_named(tmp_path):
    """Both read as absent: 'no validation files … (the split there: 'validation')', which contradicted itself."""
    (tmp_path / "a" / "Art" / "validation.parquet").mkdir(parents=True)
    with pytest.raises(BadInput, match=r"Art/validation.parquet is a directory, not a parquet file"):
        load_mmmu(tmp_path / "a")
    (tmp_path / "b" / "Art").mkdir(parents=True)
    (tmp_path / "b" / "Art" / "validation-00000-of-00001.parquet").symlink_to(tmp_path / "gone.parquet")
    with pytest.raises(BadInput, match=r"validation-00000-of-00001.parquet is a link to a missing file \(.*gone"):
        load_mmmu(tmp_path / "b")


def test_running_out_of_memory_while_decoding_an_image_is_not_called_a_bad_image(tmp_path, monkeypatch):
    """A MemoryError while an image is decoded is this host's memory, not the row's bytes: it was reported as
    'not a decodable image (MemoryError: ...)', exit 2, blaming the data. It now reaches the commands' out-of-memory
    line (exit 1); the same image decodes once memory allows."""
    import probe.mmmu as mmmu

    write(tmp_path, {"Art": [row(1), row(2, image_1={"bytes": encoded(Image.new("RGB", (8, 8))), "path": None})]})

    def no_memory(data, max_side):
        raise MemoryError()

    with monkeypatch.context() as mp:
        mp.setattr(mmmu, "_decode", no_memory)
        with pytest.raises(MemoryError):
            load_mmmu(tmp_path)
    assert len(load_mmmu(tmp_path)) == 2


def test_options_as_a_list_column_read_as_the_python_literal_does(tmp_path):
    """MMMU stores options as the str() of a Python list; a converted set may store a real list<string> column. Both
    give the list itself, quotes, commas and newlines inside an option kept. Oracle: the Python list."""
    options = ["it's red", 'say "blue", then', "two\nlines", "<image 1> or not"]
    write(tmp_path / "literal", {"Art": [row(1, options=str(options), answer="D")]})
    (tmp_path / "listed" / "Art").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row(1, options=options, answer="D")]),
                   tmp_path / "listed" / "Art" / "validation.parquet")
    for root in ("literal", "listed"):
        (it,), _ = load_mmmu(tmp_path / root)
        assert it.options == tuple(options) and it.letters == tuple("ABCD") and it.images == (RED,)


def test_subjects_repeated_or_reordered_and_a_limit_across_subjects(tmp_path):
    """--subjects in any order, a name given twice: the same items, each once, in (subject, number) order; --limit N
    takes the first N of that order across subjects, the same on every load. Oracle: the list sorted by hand."""
    write(tmp_path, {"Bio": [row(i, "Bio") for i in (10, 2, 1)], "Art": [row(i) for i in (3, 1, 2)],
                     "Math": [row(1, "Math")]})
    order = [f"validation_Art_{i}" for i in (1, 2, 3)] + [f"validation_Bio_{i}" for i in (1, 2, 10)]
    items, rep = load_mmmu(tmp_path, subjects=["Bio", "Art", "Bio"])
    assert [it.id for it in items] == order and rep.subjects == ["Art", "Bio"]
    for _ in range(2):
        items, rep = load_mmmu(tmp_path, subjects=["Bio", "Art"], limit=4)
        assert [it.id for it in items] == order[:4] and rep.subjects == ["Art", "Bio"]


# ---- mut46: boundaries and readings that surviving mutants changed ------------------------------------------------


def test_the_last_image_column_and_the_26th_letter_are_in_range(tmp_path):
    """<image 7> is image_7, MMMU's last column; 26 options take letters A-Z (a 27th is refused)."""
    write(tmp_path, {"Art": [row(1, question="<image 7> What colour?", image_1=None,
                                 image_7={"bytes": BLUE, "path": None}),
                             row(2, options=str([f"o{i}" for i in range(26)]), answer="Z")]})
    first, second = load_mmmu(tmp_path)[0]
    assert first.images == (BLUE,) and second.letters[-1] == "Z" and second.answer == "Z"
    write(tmp_path / "more", {"Art": [row(1, options=str([f"o{i}" for i in range(27)]))]})
    with pytest.raises(BadInput, match="27 options, but letters run only A-Z"):
        load_mmmu(tmp_path / "more")


def test_an_answer_padded_with_whitespace_is_its_letter(tmp_path):
    write(tmp_path, {"Art": [row(1, answer=" B\n")]})
    (it,), _ = load_mmmu(tmp_path)
    assert it.answer == "B"


def test_downscaling_rounds_the_short_side_to_the_nearest_pixel(tmp_path):
    """90×62 within 30: the short side is 62/3 = 20.67 pixels, shown as 21 (the nearest; 20 would be the floor)."""
    write(tmp_path, {"Art": [row(1, image_1={"bytes": png(size=(90, 62)), "path": None})]})
    (it,), _ = load_mmmu(tmp_path)
    assert it.pil_images(max_side=30)[0].size == (30, round(62 * 30 / 90))


@pytest.mark.parametrize("orientation", [5, 7])
def test_video_frames_are_compared_by_their_upright_size(tmp_path, orientation):
    """EXIF orientations 5 and 7 (transpose, transverse) swap width and height as 6 and 8 do: a 20×10 frame tagged
    so is shown 10×20, the size of a plain 10×20 frame beside it. Oracle: the decoded frames' sizes."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (250, 0, 0)).save(buf, format="PNG", exif=exif.tobytes())
    r = row(1, question="<video> What happens?", options="['x', 'y']", image_1=None,
            video=[{"bytes": buf.getvalue(), "path": None}, {"bytes": png(size=(10, 20)), "path": None}])
    write_video_rows(tmp_path, [r])
    (it,), _ = load_mmmu(tmp_path)
    assert [f.size for f in it.pil_frames()] == [(10, 20), (10, 20)]


def test_options_that_are_empty_or_repeated_are_loaded_with_one_warning_per_file(tmp_path, capsys):
    """An option left empty (shown as "C. ", a letter of nothing) or two options of one text (a generated answer
    giving that text reads as the first of them: probe.parsing's tier 6) loaded without a word. They load as given
    (MMMU's image options read "<image 2>", never empty; a set's data is its author's), with one stderr line per
    file naming how many items and the first; a file of clear options says nothing."""
    write(tmp_path, {"Art": [row(1, options="['red', 'Blue', 'blue ', 'white']"), row(2),
                             row(3, options="['red', '', 'blue']")],
                     "Music": [row(1, "Music")]})
    capsys.readouterr()
    items, _ = load_mmmu(tmp_path)
    assert [it.options for it in items][:3] == [("red", "Blue", "blue ", "white"), ("red", "green", "blue", "white"),
                                                ("red", "", "blue")]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: {tmp_path / 'Art' / 'validation-00000-of-00001.parquet'}: 2 item(s) "), lines
    assert "'validation_Art_1': options B and C both read 'Blue'" in lines[0] and "and 1 more" in lines[0], lines
