"""Trained tiny organisms: generators are deterministic, the shipped weights load and answer correctly,
and the build script runs end to end in its quick mode."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from probe.errors import BadInput
from probe.mmmu import load_mmmu
from probe.zoo import MODALITY, ORGANISMS, organism_dir, organism_validation_dir, validation_dir
from probe.zoo import tasks_image, tasks_text, tasks_video


@pytest.mark.parametrize("subject", tasks_text.SUBJECTS)
def test_text_generator_deterministic(subject):
    a = tasks_text.generate_rows(20, 3, subject, "train")
    assert a == tasks_text.generate_rows(20, 3, subject, "train")
    assert a != tasks_text.generate_rows(20, 4, subject, "train")
    for row in a:
        opts = eval(row["options"])  # noqa: S307 - our own str(list)
        assert 3 <= len(opts) <= 6 and len(set(opts)) == len(opts)
        assert row["answer"] in "ABCDEF"[: len(opts)]


@pytest.mark.parametrize("subject", tasks_video.SUBJECTS)
def test_video_generator_deterministic(subject):
    a = tasks_video.generate_rows(5, 1, subject, "validation")
    assert a == tasks_video.generate_rows(5, 1, subject, "validation")  # frames byte-identical
    assert a != tasks_video.generate_rows(5, 2, subject, "validation")
    assert all(len(r["video"]) == tasks_video.N_FRAMES for r in a)


@pytest.mark.parametrize("subject", tuple(tasks_image.SUBJECT_KINDS))
def test_image_generator_deterministic(subject):
    a = tasks_image.generate_rows(4, 1, subject, "validation")
    assert a == tasks_image.generate_rows(4, 1, subject, "validation")
    assert a != tasks_image.generate_rows(4, 2, subject, "validation")


def test_scene_text_rows_describe_the_scenes():
    """The text version of an image question keeps its kind, options and answer, and names every shape."""
    import random

    for kind, builder in tasks_image.BUILDERS.items():
        q = builder(random.Random(kind))
        t = tasks_image.text_question(q)
        assert (t.kind, t.options, t.answer, t.scenes) == (q.kind, q.options, q.answer, ())
        assert "<image" not in t.text
        for scene in q.scenes:
            for s in scene.shapes:
                assert f"{s.colour} {s.kind} {s.slot}" in t.text
    a = tasks_image.generate_text_rows(10, 1, "train")
    assert a == tasks_image.generate_text_rows(10, 1, "train") and a != tasks_image.generate_text_rows(10, 2, "train")
    assert all(r["image_1"] is None for r in a)


def test_pictures_carry_position_and_time_cues():
    """Scenes have a border (Qwen2-VL's tower needs it to tell cells apart); video frames a progress bar whose
    length grows with the frame number; Order shows one shape per frame and asks for frame 1 or the last."""
    import random

    from probe.synthetic import BACKGROUND, draw_scene

    img = draw_scene(tasks_image.random_scene(random.Random(0), 1), 64)
    assert img.getpixel((0, 0)) == img.getpixel((63, 32)) == tasks_image.FRAME
    assert img.getpixel((3, 3)) == BACKGROUND  # the border is thin: 2 px at 64
    text, options, answer, frames = tasks_video.q_order(random.Random(1), tasks_video.N_FRAMES)
    bars = [sum(im.getpixel((x, 63)) == tasks_video.BAR for x in range(64))
            for im in tasks_video.render_images(frames, 64)]
    assert bars == [16, 32, 48, 64]
    assert all(len(f) == 1 for f in frames) and len({f[0][1] for f in frames}) == len(frames)
    at = 0 if "first" in text else -1
    assert options[ord(answer) - ord("A")] == frames[at][0][1]


def test_pretrain_vision_tags_train_only_the_vision_side():
    """Per-token cell / frame / word targets are learned by the tower and projector; the LM (its word embeddings
    included, which the word targets read) stays as it was."""
    import random

    import torch

    from probe.train import is_lm_param
    from probe.zoo.build import TOKEN_GRID, _load, frame_sample, pretrain_vision

    loaded = _load(organism_dir("organism-video"))
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    image, shapes, t = frame_sample(random.Random(0))
    assert 0 <= t < tasks_video.N_FRAMES and image.size == (64, 64)
    acc = pretrain_vision(loaded, frame_sample, TOKEN_GRID["video"], steps=2, seed=0, tags="cell,frame,word",
                          batch=4)
    assert set(acc) == {"kind", "colour", "cell", "frame", "kind_word", "colour_word"}
    assert all(0 <= v <= 1 for v in acc.values())
    changed = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(is_lm_param(n, loaded) for n in changed)


def test_cell_targets():
    from probe.zoo.build import cell_targets

    t = cell_targets([("star", "red", 0.2, 0.5), ("circle", "blue", 0.99, 0.0)], ["circle", "star"], ["blue", "red"], 4)
    assert t.shape == (2, 16)
    assert (t[0, 2 * 4 + 0], t[1, 2 * 4 + 0]) == (2, 2)  # row of y=0.5, column of x=0.2
    assert (t[0, 3], t[1, 3]) == (1, 1)  # x=0.99 clamps to the last column
    assert int((t > 0).sum()) == 4


@pytest.mark.parametrize("name", ["vl", "ov-si", "video"])
def test_token_grid_matches_the_models_geometry(name):
    """pretrain_vision's per-token targets assume TOKEN_GRID's side; check it against the shipped model's own
    token count and that the scene slots fall on distinct grid cells."""
    import random

    from probe.synthetic import SLOTS
    from probe.zoo.build import TOKEN_GRID, _load, scene_sample, token_features

    path, side = TOKEN_GRID[name]
    loaded = _load(organism_dir(f"organism-{name}"))
    image, _, _ = scene_sample(random.Random(0))
    feats = token_features(loaded, [image, image], path, side)
    assert feats.shape == (2, side * side, loaded.model.config.text_config.hidden_size)
    cfg = loaded.model.config.vision_config
    if name == "vl":  # merged tokens per side after the processor's resize
        grid = loaded.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        assert (int(grid[1]) // cfg.spatial_merge_size, int(grid[2]) // cfg.spatial_merge_size) == (side, side)
    else:  # SigLIP patches per side; video pools them 2×2 per frame
        per_side = cfg.image_size // cfg.patch_size
        assert (per_side if path == "image" else -(-per_side // 2)) == side
    cells = {min(side - 1, int(y * side)) * side + min(side - 1, int(x * side)) for x, y in SLOTS.values()}
    assert len(cells) == len(SLOTS)


def test_stage_rates_freeze_and_group_by_role():
    """A stage's zero rates freeze their part: LLaVA's projector alignment trains the projector alone, Qwen2-VL's
    last stage the LM alone; LoRA-style pre-frozen parameters are never unfrozen. Each rate's group is split into
    weights decayed and biases and norms not (the recipes' ``decay_all``: one group a rate, as they were built)."""
    import dataclasses

    from probe.train import TrainConfig, param_groups
    from probe.zoo.build import _load

    for name, projector in (("vl", "visual.merger."), ("ov-si", "multi_modal_projector.")):
        loaded = _load(organism_dir(f"organism-{name}"))
        model = loaded.model
        groups = param_groups(model, loaded, TrainConfig(steps=1, lr=0.0, lm_lr=0.0, projector_lr=1e-3))
        trained = {id(p) for g in groups for p in g["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in trained}
        assert names == {n for n, _ in model.named_parameters() if projector in n or "image_newline" in n}
        assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())
        model.requires_grad_(True)
        groups = param_groups(model, loaded, TrainConfig(steps=1, lr=0.0, lm_lr=1e-3, projector_lr=0.0))
        assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.01), (1e-3, 0.0)]
        lm = {n for n, p in model.named_parameters() if p.requires_grad}
        assert lm and all("language_model" in n or n.startswith("lm_head") for n in lm)
        model.requires_grad_(True)
        cfg = TrainConfig(steps=1, lr=4e-5, lm_lr=2e-4, projector_lr=2e-4)
        groups = param_groups(model, loaded, cfg)
        assert [(g["lr"], g["weight_decay"]) for g in groups] == [(r, d) for r in (2e-4, 2e-4, 4e-5) for d in (0.01, 0)]
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
        groups = param_groups(model, loaded, dataclasses.replace(cfg, decay_all=True))
        assert [(g["lr"], g["weight_decay"]) for g in groups] == [(2e-4, 0.01), (2e-4, 0.01), (4e-5, 0.01)]
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
        first = next(p for n, p in model.named_parameters() if "language_model" in n)
        first.requires_grad_(False)  # as peft leaves a base weight
        groups = param_groups(model, loaded, TrainConfig(steps=1, lr=1e-3, lm_lr=1e-3))
        assert not first.requires_grad and all(p is not first for g in groups for p in g["params"])
        assert len(groups) == 4  # without projector_lr the projector trains with the tower, as before


def test_mix_in_shares():
    from probe.zoo.build import mix_in

    text = [{"i": i} for i in range(100)]
    got = mix_in(text, 70, {"text": 0.3}, "text", seed=0)
    assert len(got) == 30 and len({r["i"] for r in got}) == 30  # 30 of 100 rows: 30 % of the pool, no repeats
    assert got == mix_in(text, 70, {"text": 0.3}, "text", seed=0) != mix_in(text, 70, {"text": 0.3}, "text", seed=1)
    assert len(mix_in(text, 1000, {"text": 0.5}, "text", seed=0)) == 100  # capped by the set's size
    # two sets mixed in: 60 own rows make up 60 % of a pool of 100, each mixed set its 20 %
    assert len(mix_in(text, 60, {"text": 0.2, "image_single": 0.2}, "text", seed=0)) == 20
    assert mix_in(text, 70, {"image_single": 0.3}, "image_single", seed=0) != got  # its own draw


def test_world_is_fixed():
    w = tasks_text.world()
    assert len(w) == tasks_text.N_COUNTRIES
    assert len({f["capital"] for f in w.values()}) == tasks_text.N_COUNTRIES


def test_unknown_organism_is_bad_input():
    with pytest.raises(BadInput):
        organism_dir("nope")


@pytest.mark.parametrize("name", ORGANISMS)
def test_shipped_organism_accuracy(name):
    """The shipped (bf16) weights, loaded like any checkpoint, answer ≥ 90 % of a slice of their validation
    set (in-distribution: part of it is in their training data; README, "How held out is 'held out'?")."""
    from probe.models import load_model, resolve_model
    from probe.train import encode
    from probe.zoo.build import BAR, evaluate

    loaded = load_model(resolve_model(f"organism-{name}"))
    items, _ = load_mmmu(organism_validation_dir(name), "validation")
    items = items[::max(1, len(items) // 32)][:32]  # spread over subjects
    res = evaluate(loaded, encode(loaded, items, with_answer=False))
    assert res["prob_accuracy"] >= BAR, res
    assert res["accuracy"] >= BAR, res


def test_validation_sets_shipped():
    for modality in set(MODALITY.values()):
        items, report = load_mmmu(validation_dir(modality), "validation")
        assert len(items) >= 64 and report.n_skipped_open == 0


def _item_key(it):
    """What makes two items the same, read independently of probe.zoo.build: question, options, and the decoded
    pixels of every image and frame."""
    return it.question, it.options, tuple(im.tobytes() for im in it.pil_images() + it.pil_frames())


def test_zoo_data_writes_fresh_training_items_never_the_validation_ones(tmp_path, capsys):
    """``python -m probe.zoo data``: the organisms' training items (what replicate's data stage makes), which the
    shipped validation-only sets lack, for analyses.finetune; none is a validation item (the generators draw
    each split independently from small task spaces, so a plain draw repeats some)."""
    from probe.errors import cli_main
    from probe.zoo.__main__ import main

    out = tmp_path / "data"
    assert cli_main(main, ["data", "--out", str(out), "--n", "6"]) == 0
    assert capsys.readouterr().out.split() == [str(out / m) for m in ("text", "image", "image_single", "video")]
    # the image and single-image sets share one task space: a training item of either may be a validation item
    # of the other, so none may be a validation item of any set
    seen = {_item_key(it) for m in ("text", "image", "image_single", "video")
            for it in load_mmmu(validation_dir(m), "validation")[0]}
    for modality in ("text", "image", "image_single", "video"):
        train, _ = load_mmmu(out / modality, "train")
        valid, _ = load_mmmu(validation_dir(modality), "validation")
        assert len(train) == 6 * len({it.subject for it in valid}), modality  # 6 per subject, every subject
        assert not [it.id for it in train if _item_key(it) in seen], modality  # a plain draw repeats 12-16 per set
        assert [it.id for it in train][:2] == [f"train_{train[0].subject}_1", f"train_{train[0].subject}_2"]
    import pyarrow.parquet as pq  # file names inside a row carry its id: renumbered with it

    for f in (out / "image").glob("*/train-*.parquet"):
        for r in pq.read_table(f).to_pylist():
            assert r["image_1"]["path"].startswith(r["id"] + "_"), (r["id"], r["image_1"]["path"])
    for f in (out / "video").glob("*/train-*.parquet"):
        for r in pq.read_table(f).to_pylist():
            assert all(fr["path"].startswith(r["id"] + "_") for fr in r["video"]), r["id"]
    before = sorted(p.name for p in out.rglob("*"))
    assert cli_main(main, ["data", "--out", str(out)]) == 2  # an existing dir is never written into
    assert "exists" in capsys.readouterr().err and sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.parametrize("flag, value, want", [("--steps", "0", "--steps must be ≥ 1, got 0"),
                                               ("--threads", "-2", "--threads must be ≥ 1, got -2"),
                                               ("--seed", "-1", "--seed must be ≥ 0, got -1")])
def test_zoo_build_refuses_a_count_below_one_or_a_negative_seed_before_writing(tmp_path, capsys, flag, value, want):
    """``build``'s counts go through ``check_counts``, as every command's do (its own check said ``>= 1`` and
    named no value): exit 2, one line naming the option and the value, and --out not made."""
    from probe.errors import cli_main
    from probe.zoo.__main__ import main

    out = tmp_path / "zoo"
    assert cli_main(main, ["build", "--out", str(out), "--quick", flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"error: {want}" and not out.exists()


def test_zoo_data_clears_what_killed_runs_left(tmp_path, capsys):
    """A `data` run killed mid-draw left `.NAME.partial-PID` (and `..NAME.partial-PID.draw`) beside --out for good;
    the next run for that --out removes those of dead processes, not a live run's nor another --out's."""
    import os
    import subprocess
    import sys

    from probe.errors import cli_main
    from probe.zoo.__main__ import main

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"stale": f".d.partial-{dead.pid}", "stale_draw": f"..d.partial-{dead.pid}.draw",
             "live": f".d.partial-{os.getppid()}", "other_out": f".e.partial-{dead.pid}"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("x")
    assert cli_main(main, ["data", "--out", str(tmp_path / "d"), "--n", "1"]) == 0
    capsys.readouterr()
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"d", names["live"], names["other_out"]}, left


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, words", [
    (["--out", "{file}"], "exists and is not a directory"),  # was a FileExistsError traceback
    (["--out", "{tmp}/b", "--threads", "0"], "--threads must be ≥ 1"),  # was torch's RuntimeError traceback
    (["--out", "{tmp}/b", "--seed", "-1"], "--seed must be ≥ 0, got -1"),  # `data` refused it; `build` trained on it
    (["--out", "{zoo}/organisms"], "inside the package's zoo"),  # wrote over the shipped organisms, bar unchecked
    (["--out", "{zoo}"], "inside the package's zoo"),  # wrote train+validation files over the shipped sets
    (["--out", "{tmp}/b", "--only", "vl"], "organism-base is not built"),  # asked the hub for b/organism-base
])
def test_build_bad_input_exits_2_and_writes_nothing(args, words, tmp_path, capsys):
    from probe.errors import cli_main
    from probe.zoo import package_root
    from probe.zoo.__main__ import main

    (tmp_path / "file").write_text("x")
    zoo = package_root()
    before = _tree(zoo), _tree(tmp_path)
    argv = [a.format(file=tmp_path / "file", tmp=tmp_path, zoo=zoo) for a in args]
    assert cli_main(main, ["build", "--quick", "--steps", "1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert (_tree(zoo), _tree(tmp_path)) == before


def test_a_damaged_build_record_is_no_record_and_never_a_traceback(tmp_path, capsys):
    """``build`` read its own records (data/build.json, organism.json, quality.json) with a bare json.loads: a cut
    or hand-edited one was a JSONDecodeError traceback, exit 1, in every later build into that --out, --reuse or
    not. A damaged record vouches for nothing, as a missing one: ``--only vl`` over a damaged organism-base record
    exits 2 in one line with nothing written, and ``ship`` refuses a damaged quality.json as no complete build."""
    from probe.errors import cli_main
    from probe.zoo.__main__ import main
    from probe.zoo.build import ship

    out = tmp_path / "b"
    for f in ("data/build.json", "organism-base/organism.json", "quality.json"):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text('{"seed": 0, "si', encoding="utf-8")  # cut mid-write
    before = _tree(out)
    assert cli_main(main, ["build", "--out", str(out), "--quick", "--steps", "1", "--only", "vl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "organism-base is not built" in err, err
    assert _tree(out) == before
    with pytest.raises(BadInput, match="no complete full build"):
        ship(out)


def test_only_refuses_a_base_of_another_build_and_a_killed_data_rewrite_vouches_for_nothing(tmp_path, capsys,
                                                                                             monkeypatch):
    """`--only vl` took whatever organism-base sat in --out: one of another seed (another tokenizer) crashed
    after deleting the organism-vl there, and one of the same vocabulary size would have been trained on silently.
    And a rebuild killed while rewriting data/ left the old build.json vouching for the half-written files, which
    a later --reuse then trained on."""
    from probe.errors import cli_main
    from probe.zoo import build as zb
    from probe.zoo.__main__ import main

    out = tmp_path / "b"
    assert cli_main(main, ["build", "--out", str(out), "--quick", "--steps", "1", "--threads", "1",
                           "--only", "base"]) == 0
    (out / "organism-vl").mkdir()
    (out / "organism-vl" / "keep").write_text("an earlier organism-vl")
    capsys.readouterr()
    before = _tree(out)
    for other, why in ((["--seed", "1"], "built from other data"), (["--steps", "2"], "with another recipe")):
        assert cli_main(main, ["build", "--out", str(out), "--quick", "--steps", "1", "--only", "vl", *other]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and "add base to --only" in err and "\n" not in err, err
        assert _tree(out) == before
    assert (out / "data" / "build.json").is_file()

    def killed(*a, **k):
        (out / "data" / "text" / "Knowledge" / "train-00000-of-00001.parquet").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(zb, "build_data", killed)
    with pytest.raises(KeyboardInterrupt):
        zb.build(out, quick=True, steps=1, threads=1, only=["base"])
    assert not (out / "data" / "build.json").exists()  # so a --reuse rebuilds the data rather than train on it


def test_reuse_refuses_organisms_trained_on_another_thread_count(tmp_path, capsys):
    """``--reuse`` kept any organism of the same data and recipe whatever ``--threads`` built it, and the bits differ
    with the threads per process (organism-base trains on all --threads): a resumed build mixed thread layouts. A
    reused organism must have trained on the threads this build would give it; else exit 2, one line naming both,
    nothing written. The same count reuses it as it is."""
    from probe.errors import cli_main
    from probe.zoo.__main__ import main

    out = tmp_path / "b"
    args = ["build", "--out", str(out), "--quick", "--steps", "1", "--only", "base"]
    assert cli_main(main, [*args, "--threads", "1"]) == 0
    assert json.loads((out / "organism-base" / "organism.json").read_text(encoding="utf-8"))["threads"] == 1
    capsys.readouterr()
    before = _tree(out)
    assert cli_main(main, [*args, "--threads", "2", "--reuse"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "organism-base" in err, err
    assert "1 thread" in err and "--threads 2" in err and "2 thread" in err, err
    assert _tree(out) == before
    assert cli_main(main, [*args, "--threads", "1", "--reuse"]) == 0
    assert "organism-base: reusing" in capsys.readouterr().out
    assert _tree(out) == before


def test_recipes_mirror_the_real_family_and_built_what_ships():
    """Issue 19's regimes, as data: vl like Qwen2-VL (ViT with the LLM frozen → every parameter → LLM with the ViT
    frozen; its LM trained hardest by far), ov-si and video like LLaVA (projector alone first, then the LM below
    the projector's alignment rate and the tower below the LM; video with single images mixed in). And the shipped
    organisms were built from exactly these recipes (their quality.json entries), so README and weights agree."""
    from dataclasses import asdict

    from probe.zoo import organisms_root
    from probe.zoo.build import FULL

    vl = FULL["vl"].stages
    assert vl[0].lm_lr == 0 and vl[0].tower_lr > 0
    assert all(r > 0 for r in (vl[1].lm_lr, vl[1].projector_lr, vl[1].tower_lr))
    assert vl[-1].lm_lr > 0 and vl[-1].tower_lr == vl[-1].projector_lr == 0
    others = max(FULL[n].lm_lr_steps for n in ("ov-si", "video"))
    assert FULL["vl"].lm_lr_steps >= 2 * others, (FULL["vl"].lm_lr_steps, others)
    for name in ("ov-si", "video"):
        align, *rest = FULL[name].stages
        assert align.lm_lr == align.tower_lr == 0 and align.projector_lr > 0
        assert rest and all(0 < s.tower_lr < s.lm_lr < align.projector_lr for s in rest)
    assert FULL["video"].image_mix > 0 and FULL["video"].text_mix == 0
    shipped = json.loads((organisms_root() / "quality.json").read_text())["organisms"]
    for name, recipe in FULL.items():
        assert shipped[f"organism-{name}"]["recipe"] == json.loads(json.dumps(asdict(recipe))), name


def config_dtypes(model_dir: Path) -> set[str]:
    """Every dtype a model dir's config.json names (top level and sub-configs) and its weights hold."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    named = {config.get("dtype"), *(sub.get("dtype") for sub in config.values() if isinstance(sub, dict))} - {None}
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        held = {str(f.get_slice(k).get_dtype()).lower().replace("bf16", "bfloat16") for k in f.keys()}
    return named | held


@pytest.mark.parametrize("name", ORGANISMS)
def test_shipped_configs_name_the_dtype_their_weights_hold(name):
    """The organisms' weights are bfloat16 and config.json said so at the top, but float32 in text_config and
    vision_config (save_pretrained leaves sub-configs as loaded), so a plain load of a sub-model went float32."""
    from probe.zoo import organisms_root

    assert config_dtypes(organisms_root() / f"organism-{name}") == {"bfloat16"}


def test_quick_build_one_or_two_processes(tmp_path, monkeypatch):
    """The short build runs end to end; --threads 2 trains the extensions in two processes of one thread. Rebuilding
    the three with --threads 1 --only, one after another in this process, gives the same files byte for byte (same
    seeds, same tokenizer, same per-process threads) and replaces just their quality.json entries. Oracles: the
    process pool the builds asked for (a spy on concurrent.futures.ProcessPoolExecutor: one of two workers, each
    lane of extensions on one thread, all three extensions in it; none for --threads 1), and each organism's
    tokenizer read back through transformers: ChatML's turn marks are tokens of its vocabulary (an id that names
    them back, one token when encoded, a row of the model's embeddings), not the unknown token's id."""
    import concurrent.futures
    import shutil

    from probe.models import load_model, resolve_model
    from probe.zoo.__main__ import main

    pools: list[int] = []
    lanes: list[tuple[tuple[str, ...], int]] = []

    class SpyPool(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, max_workers=None, *args, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers, *args, **kwargs)

        def submit(self, fn, /, *args, **kwargs):
            lanes.append((tuple(args[0]), args[-1]))  # probe.zoo.build._lane(names, ..., threads)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", SpyPool)
    two, one = tmp_path / "2", tmp_path / "1"
    assert main(["build", "--out", str(two), "--quick", "--steps", "2", "--threads", "2"]) == 0
    extensions = [n for n in ORGANISMS if n != "base"]
    assert pools == [2] and len(lanes) == 2 and all(threads == 1 for _, threads in lanes)
    assert sorted(n for lane, _ in lanes for n in lane) == sorted(extensions)
    for name in ORGANISMS:
        loaded = load_model(resolve_model(str(two / f"organism-{name}")))
        tok, rows = loaded.tokenizer, loaded.model.get_input_embeddings().num_embeddings
        for mark in ("<|im_start|>", "<|im_end|>"):
            i = tok.convert_tokens_to_ids(mark)
            assert isinstance(i, int) and i != tok.unk_token_id and 0 <= i < rows, (name, mark, i)
            assert tok.convert_ids_to_tokens(i) == mark and tok.encode(mark, add_special_tokens=False) == [i]
        assert config_dtypes(two / f"organism-{name}") == {"bfloat16"}
        built = json.loads((two / f"organism-{name}" / "organism.json").read_text(encoding="utf-8"))
        assert built["threads"] == (2 if name == "base" else 1), name
    assert (two / "data" / "video" / "Motion" / "train-00000-of-00001.parquet").is_file()
    q = json.loads((two / "quality.json").read_text())
    assert list(q["organisms"]) == [f"organism-{n}" for n in ORGANISMS]  # the family's order, not finishing order
    assert q["train_excludes"] is None and q["train_items"] == {"text": 96, "image": 96, "image_single": 72,
                                                                "video": 72}
    shutil.copytree(two, one)
    for name in extensions:  # what --only rebuilds replaces its quality.json entry
        q["organisms"][f"organism-{name}"] = {"stale": True}
    (one / "quality.json").write_text(json.dumps(q))
    assert main(["build", "--out", str(one), "--quick", "--steps", "2", "--threads", "1", "--only", *extensions]) == 0
    assert pools == [2]  # --threads 1: no second pool, the three in this process
    after = json.loads((one / "quality.json").read_text())
    for name in extensions:
        for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
            a, b = (t / f"organism-{name}" / f for t in (two, one))
            assert a.read_bytes() == b.read_bytes(), (name, f)
        rebuilt = json.loads((one / f"organism-{name}" / "organism.json").read_text())
        assert after["organisms"][f"organism-{name}"] == {k: v for k, v in rebuilt.items() if k != "name"}
        assert rebuilt["threads"] == 1, name
    assert after["organisms"]["organism-base"] == q["organisms"]["organism-base"]


def _near_key(row):
    """An item's content read independently of probe.zoo.build: a scene question's kind and shapes, whether the
    scene is drawn (image sets) or described in words (text Scenes, in any order of its shapes), and a Motion clip
    without the continuous coordinate across its path. None where the exact key is the content."""
    import re

    ex = json.loads(row["explanation"] or "{}")
    if ex.get("scenes"):
        return ex["kind"], tuple(frozenset((s["kind"], s["colour"], s["slot"]) for s in sc["shapes"])
                                 for sc in ex["scenes"])
    if row["subfield"] in ("colour", "shape", "count", "position", "compare"):  # a described scene
        words = r"(blue|green|red|yellow) (circle|square|triangle|star) (left|right|top|bottom|center)"
        parts = [p for p in re.split(r"Image \d:", row["question"]) if re.search(words, p)]
        return row["subfield"], tuple(frozenset((k, c, s) for c, k, s in re.findall(words, p)) for p in parts)
    if row["subfield"] == "motion":
        first = json.loads(row["explanation"])["frames"][0]
        return row["question"], row["answer"], tuple(first[0]) if len(first) > 1 else None
    return None


def test_fresh_training_items_hold_no_near_duplicate_of_a_validation_item(tmp_path):
    """The items replicate's data stage and ``probe.zoo data`` make for the salience sweeps and fine-tuning repeat
    no validation item in another form either: a Scenes item is the image item that shows its scene with its
    question (and its shapes listed in another order are the same scene), and two Motion clips of one direction,
    colour, shape and distractor differ only in a few pixels. Until 2026-12-05 only exact repeats were left out: at
    24 per subject, seed 1 (the default replication), 7 Scenes, 4 image, 3 single-image and 1 Motion training item
    were such near-duplicates of validation items."""
    import pyarrow.parquet as pq

    from probe.zoo.build import build_fresh_data

    def rows(root, split):
        return [r for m in ("text", "image", "image_single", "video")
                for f in sorted((root / m).glob(f"*/{split}-*.parquet")) for r in pq.read_table(f).to_pylist()]

    held = {k for r in rows(validation_dir("text").parent, "validation") if (k := _near_key(r)) is not None}
    assert len(held) > 100  # the scene questions of three sets and the Motion clips
    build_fresh_data(tmp_path / "fresh", 24, 1)
    fresh = rows(tmp_path / "fresh", "train")
    assert len(fresh) == 24 * 14
    assert [r["id"] for r in fresh if _near_key(r) in held] == []


def test_exclude_validation_trains_on_no_validation_item(tmp_path):
    """``build --exclude-validation``: the train splits the organisms learn from hold no item of any validation
    set (a plain draw holds some: Knowledge, Colour_Shape and Spatial are closed sets), quality says how many items
    were left, and a --reuse of data built the other way rebuilds it rather than training on the wrong items."""
    from probe.zoo.build import QUICK_DATA, build, build_data

    def overlap(data):
        seen = {_item_key(it) for m in MODALITY.values() for it in load_mmmu(data / m, "validation")[0]}
        return {m: sum(_item_key(it) in seen for it in load_mmmu(data / m, "train")[0]) for m in MODALITY.values()}

    plain = overlap(Path(build_data(tmp_path / "plain", QUICK_DATA)["text"]).parent)
    assert plain["text"] > 0 and plain["image"] > 0 and plain["image_single"] > 0, plain
    q = build(tmp_path / "b", quick=True, steps=1, threads=1, only=["base"], exclude_validation=True)
    data = tmp_path / "b" / "data"
    assert q["train_excludes"] == "validation" and set(overlap(data).values()) == {0}
    n_train = {m: len(load_mmmu(data / m, "train")[0]) for m in MODALITY.values()}
    assert q["train_items"] == n_train and n_train["text"] == 4 * 24 - plain["text"]
    q = build(tmp_path / "b", quick=True, steps=1, threads=1, only=["base"], reuse=True)
    assert q["train_excludes"] is None and overlap(data) == plain


def test_ship_refuses_a_build_below_the_bar(tmp_path):
    """``build --ship`` copies into the package only a complete full build whose organisms all reach the bar the
    tests hold the shipped ones to; a rebuild on another machine can miss it (README, "Build time")."""
    from probe.zoo import organisms_root
    from probe.zoo.build import BAR, ship

    before = {f: f.stat().st_mtime_ns for f in organisms_root().rglob("*")}

    def built(own: dict[str, float], quick: bool = False) -> None:
        for n, a in own.items():  # what a build leaves: each organism's organism.json, and quality.json
            (tmp_path / f"organism-{n}").mkdir(exist_ok=True)
            (tmp_path / f"organism-{n}" / "organism.json").write_text(
                json.dumps({"name": f"organism-{n}", "own": {"accuracy": a, "modality": MODALITY[n]}}))
        (tmp_path / "quality.json").write_text(json.dumps({"quick": quick, "organisms": {}}))

    built({"base": 1.0, "vl": 0.812, "ov-si": 0.95, "video": 0.93})
    with pytest.raises(BadInput, match="organism-vl below the 90% bar"):
        ship(tmp_path)
    built({"vl": BAR}, quick=True)
    with pytest.raises(BadInput, match="no complete full build"):
        ship(tmp_path)
    built({"vl": BAR})
    (tmp_path / "organism-video" / "organism.json").unlink()  # an organism missing
    with pytest.raises(BadInput, match="no complete full build"):
        ship(tmp_path)
    with pytest.raises(BadInput, match="no complete full build"):
        ship(tmp_path / "nothing")
    assert {f: f.stat().st_mtime_ns for f in organisms_root().rglob("*")} == before  # nothing was touched


def test_family_tokenizer_reads_text_one_way():
    """transformers 5 rebuilds the pre-tokenizer when a directory loads as Qwen2Tokenizer (model_type qwen2) but
    not otherwise: the shipped tokenizer must split text the same either way, or base and extensions would
    read the same question as different tokens."""
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    text = "<|im_start|>user\nIs 123 + 45 = 168? Ünïcode café,  it's <|image_pad|> red.\n\n<|im_end|>"
    ids = None
    for name in ORGANISMS:
        d = organism_dir(f"organism-{name}")
        for cls in (PreTrainedTokenizerFast, Qwen2Tokenizer):
            got = cls.from_pretrained(d).encode(text)
            assert ids is None or got == ids, (name, cls.__name__)
            ids = got
    assert len(ids) > 20


@pytest.mark.parametrize("name", ["vl", "video"])
def test_modality_parts_give_the_whole_batchs_loss_and_gradient(name):
    """The training loop's step: the batch split by modality (each part padded to its own length), logits only where
    a label is predicted, each part's summed loss over the whole batch's label count, gradients accumulated ==
    transformers' own loss and gradient of the whole batch padded together (the oracle)."""
    import torch

    from probe.train import collate, encode, label_count, label_loss, model_inputs, modality_parts
    from probe.zoo.build import OWN, _load

    torch.set_num_threads(1)
    loaded = _load(organism_dir(f"organism-{name}"))
    mixed = "image_single" if name == "video" else "text"
    items = (load_mmmu(validation_dir(OWN[name]), "validation")[0][:3]
             + load_mmmu(validation_dir(mixed), "validation")[0][:2])
    rows = encode(loaded, items, True)
    rows = [rows[i] for i in (0, 3, 1, 4, 2)]  # modalities interleaved, as a sampled batch has them
    parts = list(modality_parts(rows).values())
    assert [len(p) for p in parts] == [3, 2] and len({r["input_ids"].shape[0] for r in rows}) > 1
    pad = loaded.tokenizer.pad_token_id
    n_labels = label_count(rows)
    grads = []
    for run in ("whole", "parts"):
        loaded.model.zero_grad(set_to_none=True)
        if run == "whole":
            loss = loaded.model(**model_inputs(collate(rows, pad))).loss
            loss.backward()
            loss = loss.detach()
        else:
            loss = 0.0
            for p in parts:
                part = label_loss(loaded.model, collate(p, pad), n_labels)
                part.backward()
                loss += part.detach()
        grads.append((float(loss), {n: p.grad.clone() for n, p in loaded.model.named_parameters()
                                    if p.grad is not None}))
    loaded.model.zero_grad(set_to_none=True)
    (want, want_g), (got, got_g) = grads
    assert got == pytest.approx(want, rel=1e-5)
    assert got_g.keys() == want_g.keys() and want_g
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], atol=1e-6, rtol=1e-4, msg=n)

    class Wrapper(torch.nn.Module):  # the model's decoder and head, which logits_at watches
        def get_decoder(self):
            return loaded.model.get_decoder()

        def get_output_embeddings(self):
            return loaded.model.get_output_embeddings()

    class IgnoresKeep(Wrapper):  # every position back (Qwen2.5-Omni's thinker): the kept ones are used
        def forward(self, logits_to_keep=None, **kw):
            return loaded.model(**kw)

    class KeepsOthers(Wrapper):  # any other count is refused, never silently mis-paired with the labels
        def forward(self, logits_to_keep=None, **kw):
            out = loaded.model(**kw)
            out.logits = out.logits[:, 1:]
            return out

    batch = collate(parts[0], pad)
    with torch.no_grad():
        torch.testing.assert_close(label_loss(IgnoresKeep(), batch), label_loss(loaded.model, batch))
        with pytest.raises(RuntimeError, match="logits_to_keep"):
            label_loss(KeepsOthers(), batch)


def test_a_frozen_lm_skips_text_rows_but_never_the_vision_rows():
    """Qwen2-VL's first stage trains the ViT alone: a batch's text rows reach no trained weight and run without
    autograd's graph when vision rows are there to train on (for the logged loss only: no backward); a text-only
    batch still runs (its loss logged) and changes nothing."""
    import dataclasses

    import torch

    from probe.train import TrainConfig, encode
    from probe.train import train as train_loop
    from probe.zoo.build import _load

    torch.set_num_threads(1)
    loaded = _load(organism_dir("organism-vl"))
    text = encode(loaded, load_mmmu(validation_dir("text"), "validation")[0][:4], True)
    image = encode(loaded, load_mmmu(validation_dir("image"), "validation")[0][:4], True)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    cfg = TrainConfig(steps=2, lr=1e-3, lm_lr=0.0, projector_lr=1e-3, batch=2, warmup=1)
    losses = train_loop(loaded, text, cfg, log=lambda m: None)
    loaded.model.requires_grad_(True)
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())
    calls = []
    hook = loaded.model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(("pixel_values" in kw, torch.is_grad_enabled())), with_kwargs=True)
    losses = train_loop(loaded, text + image, dataclasses.replace(cfg, steps=6, batch=8), log=lambda m: None)
    hook.remove()
    loaded.model.requires_grad_(True)
    # these seeded batches all hold image and text rows: one forward of each a step, the text one without a graph
    assert sorted(calls) == [(False, False)] * 6 + [(True, True)] * 6, calls
    changed = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("visual" in n for n in changed)  # the ViT and its merger, never the frozen LM


@pytest.mark.parametrize("name", ["organism-vl", "organism-ov-si", "organism-video", "tiny-llava_onevision"])
def test_plain_transformers_builds_the_processor_the_probe_uses(name, tiny_dirs):
    """The shipped organisms and tiny models are plain HF dirs: transformers' own ``Processor.from_pretrained``
    (reading processor_config.json) gives the image tokens the probe's processor gives. Without the file it built
    LLaVA-OV's processor with num_image_tokens None, which failed on the first image (a TypeError)."""
    import io

    import transformers
    from PIL import Image

    from probe.models import load_processors, resolve_model
    from tests.conftest import png_bytes

    path = tiny_dirs["llava_onevision"] if name.startswith("tiny-") else organism_dir(name)
    tokenizer, ours = load_processors(resolve_model(str(path)))
    base = getattr(transformers, type(ours).__name__)

    class NoVideo(base):  # the video processor needs torchvision, absent here: a stand-in takes its place
        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument_name == "video_processor" else super().check_argument_for_proper_class(
                argument_name, argument)

    plain = NoVideo.from_pretrained(path, video_processor=ours.image_processor)  # (no video is processed)
    image = Image.open(io.BytesIO(png_bytes()))
    text = [f"{ours.image_token}\nWhat is it?"]
    want = ours(text=text, images=[image], return_tensors="pt")["input_ids"]
    got = plain(text=text, images=[image], return_tensors="pt")["input_ids"]
    assert got.tolist() == want.tolist()


def test_a_build_killed_mid_organism_leaves_the_previous_organism_or_none(tmp_path, monkeypatch):
    """``build`` deleted ``organism-<name>`` and wrote the new one in place: killed mid-training, the dir held
    untrained weights without organism.json under the organism's name, which every command would load. It builds in
    a hidden ``.organism-<name>.partial-TAG`` now and renames it once measured; the next build removes the hidden
    dirs of dead writers."""
    import subprocess
    import sys

    import probe.zoo.build as zb
    from probe.results import writer_tag

    out = tmp_path / "b"
    zb.build(out, quick=True, steps=1, threads=1, only=["base"])
    before = _tree(out / "organism-base")
    assert "organism.json" in before and not [p for p in out.iterdir() if p.name.startswith(".")]

    def killed(*a, **k):
        raise KeyboardInterrupt  # as a kill mid-training

    monkeypatch.setattr(zb, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        zb.build(out, quick=True, steps=1, threads=1, only=["base"], reuse=False)
    assert _tree(out / "organism-base") == before  # the previous organism, whole
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [f".organism-base.partial-{writer_tag()}"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = writer_tag().replace(str(os.getpid()), str(dead.pid), 1)
    (out / f".organism-base.partial-{writer_tag()}").rename(out / f".organism-base.partial-{tag}")
    monkeypatch.undo()
    zb.build(out, quick=True, steps=1, threads=1, only=["base"], reuse=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# The organisms' palette and slot centres, written out here (not imported) so the label oracle below is independent
# of the generators it checks.
_PALETTE = {(220, 30, 30): "red", (30, 160, 50): "green", (30, 60, 220): "blue", (235, 205, 20): "yellow"}
_SLOT_AT = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}


def _shapes_seen(im) -> dict[str, tuple[str, str]]:
    """slot → (colour, shape) read from the pixels: a shape sits on its slot's centre, radius 0.12 of the side."""
    px, side = im.load(), im.width
    out = {}
    for slot, (fx, fy) in _SLOT_AT.items():
        cx, cy, r = fx * side, fy * side, 0.12 * side
        colour = px[int(cx), int(cy)]
        if colour not in _PALETTE:
            continue

        def on(dx: float, dy: float) -> bool:
            return px[min(side - 1, round(cx + dx * r)), min(side - 1, round(cy + dy * r))] == colour

        if all(on(a, b) for a in (-0.8, 0.8) for b in (-0.8, 0.8)):
            kind = "square"  # its corners lie outside the circle's radius
        elif on(0.9, 0) and on(-0.9, 0) and on(0, 0.9):
            kind = "circle"
        else:  # the triangle's flat base runs 0.65 r below the centre, where the star has its notch
            kind = "triangle" if on(0, 0.58) else "star"
        out[slot] = (_PALETTE[colour], kind)
    return out


def _colour_centres(frame) -> dict[str, tuple[float, float]]:
    """colour → centroid (x, y) of its pixels in a video frame, above the progress bar."""
    import numpy as np

    rgb = np.asarray(frame)[: frame.height - max(2, frame.height // 16)]
    out = {}
    for value, name in _PALETTE.items():
        ys, xs = np.nonzero((rgb == value).all(-1))
        if len(xs):
            out[name] = (float(xs.mean()), float(ys.mean()))
    return out


def _true_answer(item) -> str | None:
    """The answer text of a bundled validation item, recomputed from its pixels or its question's words (None for
    Knowledge, whose facts only the world table knows)."""
    import re

    q, s = item.question, item.subject
    if item.frames:
        frames = [_colour_centres(f) for f in item.pil_frames()[::len(item.frames) - 1]]  # first and last
        if s == "Motion":
            colour = re.search(r"the (\w+) \w+ move", q)[1]
            (x0, y0), (x1, y1) = frames[0][colour], frames[-1][colour]
            return ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else ("down" if y1 > y0 else "up")
        shown = frames[0] if "first" in q else frames[-1]  # Order and Change: one shape a frame
        assert len(shown) == 1, (item.id, shown)
        return next(iter(shown))
    if item.images:
        scenes = [list(_shapes_seen(im).items()) for im in item.pil_images()]
    elif s == "Scenes":  # the same questions, each picture described as "red circle left, ..."
        words = r"(blue|green|red|yellow) (circle|square|triangle|star) (left|right|top|bottom|center)"
        parts = [p for p in re.split(r"Image \d+:", q) if re.search(words, p)]
        scenes = [[(slot, (c, k)) for c, k, slot in re.findall(words, p)] for p in parts]
    elif s == "Reasoning":
        m = re.match(r"(\w+) has (\d+) (\w+)\. \w+ has (\d+) (more|fewer) \3 than \1\.", q)
        return str(int(m[2]) + int(m[4]) * (1 if m[5] == "more" else -1))
    elif s == "Instruction":
        at = {"first": 0, "last": -1}.get(m[1]) if (m := re.search(r"choose the (\w+) option", q)) else None
        return item.options[at if at is not None else ord(re.search(r"letter ([A-F])\.", q)[1]) - ord("A")]
    else:
        return None
    if "more shapes" in q:
        assert len(scenes[0]) != len(scenes[1])
        return "Image 1" if len(scenes[0]) > len(scenes[1]) else "Image 2"
    if "How many" in q:
        return str(len(scenes[0]))
    (slot, (colour, kind)), = scenes[0]  # one shape: what colour / which shape / where
    return {"What colour": colour, "Which shape": kind, "Where is": slot}[re.search(
        r"What colour|Which shape|Where is", q)[0]]


def test_every_bundled_validation_label_is_what_its_pixels_or_words_say():
    """The 448 items every organism number is measured on: each answer letter points to the option that the
    pictures (colour, shape, count, slot, which of two has more), the frames (direction, first / last colour) or the
    question's own words (Reasoning's arithmetic, Instruction's letter, Scenes' described shapes) make true, read
    here without the generators; a Knowledge question always has the same options and answer."""
    facts: dict[str, tuple] = {}
    n = 0
    for modality in ("text", "image", "image_single", "video"):
        for item in load_mmmu(validation_dir(modality), "validation")[0]:
            given = item.options[ord(item.answer) - ord("A")]
            want = _true_answer(item)
            if want is None:
                want = facts.setdefault(item.question, (item.options, given))[1]
                assert facts[item.question][0] == item.options, item.id
            assert item.options.count(want) == 1 and given == want, (modality, item.id, item.question, given, want)
            n += 1
    assert n == 448
