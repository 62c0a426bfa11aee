"""Weight trajectories: features against direct computation, sketch determinism, outputs, redraw."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from analyses import tiny, trajectory
from analyses.sketch import CountSketch
from probe.errors import cli_main


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("traj")
    base = tiny.base_lm(0)
    out = {"base": tiny.write_model("qwen2", root / "base", base),
           "e1": tiny.write_model("qwen2_vl", root / "e1", tiny.perturb(base, 0.01, 1)),
           "m": tiny.write_model("qwen2", root / "m", tiny.perturb(base, 0.003, 2))}
    for step in (30, 10, 20):  # written out of order: the run must be sorted by step
        tiny.write_model("qwen2", root / "run" / f"checkpoint-{step}", tiny.perturb(base, 0.001 * step / 10, 3))
    out["run"] = root / "run"
    return out


def test_sketch_streaming_equals_in_memory_and_is_deterministic():
    cs = CountSketch(64, seed=3)
    d = torch.randn(3_000_000)
    a = cs.project("layers.0.mlp.up_proj.weight", d)
    b = CountSketch(64, seed=3).project("layers.0.mlp.up_proj.weight", d.clone())
    assert torch.equal(a, b)
    assert not torch.equal(a, CountSketch(64, seed=4).project("layers.0.mlp.up_proj.weight", d))
    assert not torch.equal(a, cs.project("layers.1.mlp.up_proj.weight", d))
    # norm preserved in expectation: within a loose band for one draw
    assert 0.5 < float(a.norm() / d.double().norm()) < 1.5


def test_sketch_is_a_count_sketch_unbiased_for_norms_and_inner_products():
    """The band above cannot fail for a zero-mean delta: a sketch whose signs were 0/1 instead of ±1 (or had no
    signs at all) keeps ‖S d‖/‖d‖ near 0.71 (or 1) there. Oracle: the count sketch's definition: S d[b] =
    Σ_{h(j)=b} s(j) d_j with s(j) = ±1, so E‖S d‖² = ‖d‖² and E⟨S x, S y⟩ = ⟨x, y⟩ over seeds, also for a delta
    with a mean (all ones: there unsigned or 0/1 signs give ‖S d‖² ≈ n²/dim, not n)."""
    n, dim, seeds = 4096, 64, 200
    x = torch.ones(n)
    y = torch.cat([torch.ones(n // 4), -torch.ones(n - n // 4)])  # ⟨x, y⟩ = n/4 - 3n/4 = -n/2
    sq, dots = [], []
    for seed in range(seeds):
        cs = CountSketch(dim, seed=seed)
        b, s = cs.hashes("layers.0.mlp.up_proj.weight", 0, n)
        assert set(s.unique().tolist()) == {-1.0, 1.0} and int(b.min()) >= 0 and int(b.max()) < dim
        sx, sy = cs.project("layers.0.mlp.up_proj.weight", x), cs.project("layers.0.mlp.up_proj.weight", y)
        # the definition, written out: one bucket at a time
        want = torch.tensor([float((s[b == k].double() * x[b == k].double()).sum()) for k in range(dim)],
                            dtype=torch.float64)
        torch.testing.assert_close(sx, want, rtol=0, atol=1e-9)
        sq.append(float(sx.pow(2).sum()) / n)
        dots.append(float(sx @ sy) / (-n / 2))
    # Var ‖S x‖²/n ≈ 2/dim per seed: the mean of 200 draws has a standard deviation of about 0.0125
    assert abs(np.mean(sq) - 1) < 0.07, np.mean(sq)
    assert abs(np.mean(dots) - 1) < 0.15, np.mean(dots)


def test_trajectory_outputs_and_features(models, tmp_path):
    out = tmp_path / "t"
    code = cli_main(trajectory.main, [str(a) for a in ["--base", models["base"], "--experts", models["e1"], "--merged",
                    models["m"], "--runs", models["run"], "--sketch-dim", 32, "--out", out]])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["n_points"] == 6 and run["perplexity_requested"] == 30 and run["perplexity_used"] == 5  # clamped
    rows = list(csv.DictReader(open(out / "coords.csv")))
    assert {(r["feature"], r["method"]) for r in rows} == {(f, m) for f in ("norms", "sketch") for m in ("pca", "tsne")}
    assert run["maps"] == {"norms": ["pca", "tsne"], "sketch": ["pca", "tsne"]}
    steps = [int(r["step"]) for r in csv.DictReader(open(out / "points.csv")) if r["kind"] == "run"]
    assert steps == [10, 20, 30]
    # DESIGN §6: base, experts and merged models marked, each point by the role it was given on the command line
    kinds = {Path(r["path"]).resolve(): r["kind"] for r in csv.DictReader(open(out / "points.csv", encoding="utf-8"))}
    want = {models["base"]: "base", models["e1"]: "expert", models["m"]: "merged",
            **{models["run"] / f"checkpoint-{s}": "run" for s in (10, 20, 30)}}
    assert kinds == {Path(p).resolve(): k for p, k in want.items()}
    for f in ("trajectory_norms", "trajectory_sketch"):
        assert (out / f"{f}.png").stat().st_size > 10_000 and (out / f"{f}.pdf").is_file()
    feats = np.load(out / "features.npz")
    tensors = list(feats["tensors"])
    b = load_file(models["base"] / "model.safetensors")
    m = load_file(models["m"] / "model.safetensors")
    i = list(feats["names"]).index(str(models["m"]))
    for t, name in enumerate(tensors):
        key = name if name == "lm_head.weight" else "model." + name
        assert feats["norms"][i, t] == pytest.approx(float((m[key].double() - b[key].double()).norm()), rel=1e-6)
    assert np.all(feats["norms"][0] == 0) and np.all(feats["sketch"][0] == 0)  # the base is the reference
    # the sketch of the merged model equals the in-memory sketch of its delta
    cs = CountSketch(32, seed=0)
    want = sum(cs.project(n, m[n if n == "lm_head.weight" else "model." + n] - b[n if n == "lm_head.weight" else "model." + n])
               for n in tensors)
    np.testing.assert_allclose(feats["sketch"][i], want.numpy(), rtol=1e-6, atol=1e-9)
    # figures redraw from saved results only
    from figures.__main__ import main as figures_main

    for f in out.glob("trajectory_*"):
        f.unlink()
    assert figures_main(["trajectory", str(out)]) == 0
    assert (out / "trajectory_sketch.png").is_file()


def test_runs_in_folders_of_the_same_name_stay_two_trajectories(models, tmp_path):
    """Two runs both called 'mixed' (seed0/mixed, seed1/mixed) became one run whose arrows zig-zagged through both
    seeds' checkpoints, with one legend entry."""
    base = tiny.base_lm(0)
    runs = []
    for seed in (0, 1):
        for step in (0, 10):
            tiny.write_model("qwen2", tmp_path / f"seed{seed}" / "mixed" / f"checkpoint-{step}",
                             tiny.perturb(base, 0.001 * (step + 1), 5 + seed))
        runs.append(tmp_path / f"seed{seed}" / "mixed")
    out = tmp_path / "t"
    assert cli_main(trajectory.main, [str(a) for a in ["--base", models["base"], "--runs", *runs,
                                                       "--sketch-dim", 16, "--out", out]]) == 0
    points = [r for r in csv.DictReader(open(out / "points.csv")) if r["kind"] == "run"]
    assert [(r["name"], r["step"]) for r in points] == [
        ("seed0/mixed@0", "0"), ("seed0/mixed@10", "10"), ("seed1/mixed@0", "0"), ("seed1/mixed@10", "10")]


def test_trajectory_bad_input(models, tmp_path, capsys):
    out = tmp_path / "t"
    code = cli_main(trajectory.main, ["--base", str(models["base"]), "--runs", str(tmp_path), "--out", str(out)])
    assert code == 2 and "checkpoint-<step>" in capsys.readouterr().err and not out.exists()
    code = cli_main(trajectory.main, ["--base", str(models["base"]), "--out", str(out)])
    assert code == 2 and "at least two" in capsys.readouterr().err


def test_two_checkpoint_dirs_of_one_step_are_bad_input(models, tmp_path, capsys):
    """checkpoint-10 and checkpoint-010 both became the point 'run@10': two points of one name and step in
    coords.csv, the arrows through both."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(models["run"], run)
    shutil.copytree(run / "checkpoint-10", run / "checkpoint-010")
    out = tmp_path / "t"
    code = cli_main(trajectory.main, [str(a) for a in ["--base", models["base"], "--runs", run, "--out", out]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: --runs {run}: checkpoint-010 and checkpoint-10 are both step 10", err
    assert not out.exists()


@pytest.mark.parametrize("name", ["checkpoint-abc", "checkpoint--2", "checkpoint-1e3", "checkpoint-\u0663"])
def test_a_checkpoint_dir_without_a_whole_step_is_bad_input(name, models, tmp_path, capsys):
    """A run's checkpoint-10 renamed checkpoint-abc was skipped: the run drew one point fewer, exit 0."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(models["run"], run)
    (run / "checkpoint-10").rename(run / name)
    out = tmp_path / "t"
    code = cli_main(trajectory.main, [str(a) for a in ["--base", models["base"], "--runs", run, "--out", out]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: --runs {run}: {name} is not checkpoint-<step> with a whole-number step", err
    assert not out.exists()


@pytest.mark.parametrize("extra, needle", [
    (["--seed", "-1"], "--seed"),  # sklearn's traceback, after every checkpoint was read
    (["--seed", str(2**32)], "--seed"),
    (["--perplexity", "nan"], "--perplexity"),  # NaN passed the "<= 0" test
    (["--perplexity", "inf"], "--perplexity"),
    (["--sketch-dim", "1"], "--sketch-dim"),
    (["--sketch-dim", str(2**40)], "--sketch-dim"),  # an out-of-memory traceback after the checkpoints were opened
])
def test_bad_numbers_exit_2_one_line_nothing_written(models, tmp_path, capsys, extra: list[str], needle: str) -> None:
    out = tmp_path / "t"
    code = cli_main(trajectory.main, ["--base", str(models["base"]), "--merged", str(models["m"]), "--out", str(out),
                                      *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not out.exists()


def test_points_that_all_coincide_get_pca_and_no_tsne(models, tmp_path, capsys):
    """Checkpoints identical to the base (a run's checkpoint-0, copies) put every feature row at 0: t-SNE's
    scaling divided by zero and the command ended in sklearn's traceback after reading every checkpoint."""
    base = tiny.base_lm(0)
    copies = [tiny.write_model("qwen2", tmp_path / f"copy{i}", base) for i in range(2)]
    out = tmp_path / "t"
    capsys.readouterr()
    assert cli_main(trajectory.main, [str(a) for a in ["--base", models["base"], "--merged", *copies,
                                                       "--sketch-dim", 16, "--quiet", "--out", out]]) == 0
    assert capsys.readouterr().err == ""  # not even sklearn's 0/0 warnings
    def strict(name):  # no NaN where PCA explains no variance: strict parsers (jq, JavaScript) reject it
        raise ValueError(name)

    run = json.loads((out / "run.json").read_text(), parse_constant=strict)
    assert run["perplexity_used"] is None and run["tsne"] == "skipped for norms, sketch: every point is the same point"
    rows = list(csv.DictReader(open(out / "coords.csv")))
    assert {r["method"] for r in rows} == {"pca"} and len(rows) == 2 * 3
    assert all(float(r["x"]) == 0 == float(r["y"]) for r in rows)
    assert run["maps"] == {"norms": ["pca"], "sketch": ["pca"]}  # what a redraw checks coords.csv against


def test_vocabulary_rule_is_recorded_and_errors_name_the_base(models, tmp_path, capsys):
    """An expert with more vocabulary rows is compared on the common rows (as the merge does), which run.json now
    says; a tensor-set mismatch names the base, not 'ref'."""
    big = tiny.write_model("qwen2", tmp_path / "big", tiny.resize_vocab(tiny.perturb(tiny.base_lm(0), 0.01, 7), 160))
    out = tmp_path / "t"
    assert cli_main(trajectory.main, [str(a) for a in ["--base", models["base"], "--experts", big,
                                                       "--sketch-dim", 16, "--out", out]]) == 0
    vocab = json.loads((out / "run.json").read_text())["vocab"]
    assert vocab["embed_tokens.weight"]["rows"] == {str(models["base"]): 128, str(big): 160}
    feats = np.load(out / "features.npz")
    t = list(feats["tensors"]).index("embed_tokens.weight")
    b, e = (load_file(d / "model.safetensors")["model.embed_tokens.weight"].double() for d in (models["base"], big))
    assert feats["norms"][1, t] == pytest.approx(float((e[:128] - b).norm()), rel=1e-6)
    deep = tiny.write_model("qwen2", tmp_path / "deep", tiny.base_lm(0, num_hidden_layers=3), num_hidden_layers=3)
    capsys.readouterr()
    assert cli_main(trajectory.main, [str(a) for a in ["--base", deep, "--experts", models["base"],
                                                       "--out", tmp_path / "t2"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: LM tensor sets differ: layers.2.") and f"is in {deep} but not in" in err, err


def test_a_smaller_vocabulary_companion_changes_which_rows_enter_the_sketch_not_their_projection(tmp_path):
    """The sketch drew each chunk's buckets and then its signs from one generator for the elements compared: a
    companion with fewer vocabulary rows shortened the embedding's last chunk, and every sign of that chunk moved
    (the docstring said the sketch did not depend on the other checkpoints). Element j of a tensor keeps its bucket
    and sign now. Oracle (zeroing): the checkpoint sketched beside a 120-row companion equals the checkpoint alone
    with its rows from 120 on set to the reference's (a zero Δ there), sketched without the companion."""
    from analyses.checkpoints import open_checkpoint

    base = tiny.base_lm(0)
    x_lm = tiny.perturb(base, 0.01, 1)
    zeroed = dict(x_lm)
    for k in ("embed_tokens.weight", "lm_head.weight"):
        zeroed[k] = torch.cat([x_lm[k][:120], base[k][120:]])
    ref, x, xz, small = (tiny.write_model("qwen2", tmp_path / n, lm) for n, lm in (
        ("ref", base), ("x", x_lm), ("xz", zeroed), ("small", tiny.resize_vocab(tiny.perturb(base, 0.01, 2), 120))))
    assert base["embed_tokens.weight"].shape[0] == 128

    def sketch(*paths: Path) -> np.ndarray:
        with open_checkpoint(str(ref)) as r:
            cks = [open_checkpoint(str(p)) for p in paths]
            try:
                return trajectory.stream_features(r, cks, [p.name for p in paths], CountSketch(16, seed=5))[2][0]
            finally:
                for c in cks:
                    c.close()

    beside_small, oracle = sketch(x, small), sketch(xz)
    np.testing.assert_allclose(beside_small, oracle, rtol=1e-12, atol=1e-15)
    assert not np.allclose(sketch(x), oracle)  # the rows from 120 on do enter the sketch of x alone


def test_vocabulary_rule_recorded_is_the_one_the_features_use(models, tmp_path):
    """With a smaller-vocabulary checkpoint among the points, every point's features cover only the rows all have
    (the features must be the same coordinates for PCA / t-SNE); run.json said "each model compared with the base
    on the rows both have ... merged; rows beyond kept from the base" (the merge's rule), which is not what was
    computed: nothing is merged, and the larger model's extra rows over the small one's are in no feature."""
    base = tiny.perturb(tiny.base_lm(0), 0.01, 7)
    big = tiny.write_model("qwen2", tmp_path / "big", tiny.resize_vocab(base, 160))
    small = tiny.write_model("qwen2", tmp_path / "small", tiny.resize_vocab(tiny.perturb(base, 0.01, 8), 120))
    out = tmp_path / "t"
    assert cli_main(trajectory.main, [str(a) for a in ["--base", models["base"], "--experts", big, small,
                                                       "--sketch-dim", 16, "--quiet", "--no-figures", "--out", out]]) == 0
    feats = np.load(out / "features.npz")
    t = list(feats["tensors"]).index("embed_tokens.weight")
    b, e = (load_file(d / "model.safetensors")["model.embed_tokens.weight"].double() for d in (models["base"], big))
    assert feats["norms"][1, t] == pytest.approx(float((e[:120] - b[:120]).norm()), rel=1e-6)  # rows all have
    rule = json.loads((out / "run.json").read_text())["vocab"]["embed_tokens.weight"]["rule"]
    assert "first 120 rows" in rule and "merged" not in rule and "both have" not in rule, rule


@pytest.mark.parametrize("kind", ["file", "broken link"])
def test_a_checkpoint_step_that_is_no_directory_is_bad_input(kind, models, tmp_path, capsys):
    """A run's checkpoint-20 that is a plain file (the checkpoint archived into one file, a copy cut short) or a link
    to nothing was skipped: the run drew one point fewer than the steps the user sees, exit 0. One line names it,
    nothing written, the run as it was."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(models["run"], run)
    shutil.rmtree(run / "checkpoint-20")
    if kind == "file":
        (run / "checkpoint-20").write_bytes(b"an archive")
    else:
        (run / "checkpoint-20").symlink_to(tmp_path / "gone")
    before = sorted((p.name, p.is_symlink(), p.read_bytes() if p.is_file() else None) for p in run.rglob("*"))
    out = tmp_path / "t"
    code = cli_main(trajectory.main, [str(a) for a in ["--base", models["base"], "--runs", run, "--out", out]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"error: --runs {run}: checkpoint-20 is not a directory"), err
    assert not out.exists()
    assert sorted((p.name, p.is_symlink(), p.read_bytes() if p.is_file() else None) for p in run.rglob("*")) == before


def test_only_ascii_digits_make_a_checkpoint_step(tmp_path):
    """``checkpoint-\u0663`` (ARABIC-INDIC DIGIT THREE) was step 3: ``\\d`` and int() take any Unicode digit. A run
    writes ``checkpoint-{step}`` in ASCII (analyses.finetune, as the HF Trainer), so other digits make no step: the
    run's scan leaves it out, ``--overwrite`` leaves it in place, and figures.steps draws no point for it."""
    import pandas as pd

    from analyses.finetune import checkpoint_dirs, clear_run
    from figures.steps import checkpoint_rows

    run = tmp_path / "r"
    for name in ("checkpoint-0", "checkpoint-\u0663", "checkpoint-\uff14"):  # ASCII 0, Arabic-Indic 3, fullwidth 4
        (run / name).mkdir(parents=True)
    assert checkpoint_dirs(run) == {0: run / "checkpoint-0"}
    clear_run(run, cpu=True)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-\u0663", "checkpoint-\uff14"]
    scores = pd.DataFrame({"subject": ["all"] * 3, "model": [f"r/{n}" for n in ("checkpoint-5", "checkpoint-\u0663",
                                                                               "checkpoint-\uff14")]})
    assert checkpoint_rows(scores)["step"].tolist() == [5]


def test_run_points_are_in_numeric_step_order_not_name_order(tmp_path):
    """checkpoint-10 sorts before checkpoint-2 by name: a run drawn in name order would jump 0 → 10 → 2 → 100."""
    for step in (100, 2, 10, 0):
        (tmp_path / "r" / f"checkpoint-{step}").mkdir(parents=True)
    assert [(p.step, Path(p.path).name) for p in trajectory.run_points(str(tmp_path / "r"))] == [
        (s, f"checkpoint-{s}") for s in (0, 2, 10, 100)]


def test_a_tied_checkpoint_among_untied_ones_is_compared_by_its_embedding_and_run_json_says_so(models, tmp_path):
    """A tied expert (no lm_head on disk) beside the untied base: its lm_head feature is ‖embed − θ_ref's lm_head‖
    (transformers runs its embedding as its head), the rule shift's summary.json records as lm_head; run.json did
    not record it (README: each command records the rule it applied)."""
    lm = tiny.perturb(tiny.base_lm(0), 0.01, 5)
    lm.pop("lm_head.weight")
    tied = tiny.write_model("qwen2", tmp_path / "tied", lm, tie_word_embeddings=True)
    out = tmp_path / "t"
    assert cli_main(trajectory.main, [str(a) for a in ["--base", models["base"], "--experts", tied, "--sketch-dim", 16,
                                                       "--quiet", "--no-figures", "--out", out]]) == 0
    feats = np.load(out / "features.npz")
    head = list(feats["tensors"]).index("lm_head.weight")
    b = load_file(models["base"] / "model.safetensors")
    want = (load_file(tied / "model.safetensors")["model.embed_tokens.weight"].double() - b["lm_head.weight"]).norm()
    assert feats["norms"][1, head] == pytest.approx(float(want), rel=1e-6)
    rule = json.loads((out / "run.json").read_text())["lm_head"]
    assert rule["tied"] == [str(tied)] and rule["own_lm_head"] == [str(models["base"])]


def test_a_model_named_like_a_run_step_is_refused_before_reading(models, tmp_path, monkeypatch, capsys):
    """--experts run@10 beside --runs run (holding checkpoint-10) made two points named 'run@10': exit 0 with a
    coords.csv its own redraw refuses ('repeats a point of the same map'), or, drawing the figures, that refusal
    naming the .partial dir after every checkpoint was read. One line names both, nothing written."""
    import shutil

    shutil.copytree(models["run"], tmp_path / "run")
    shutil.copytree(models["m"], tmp_path / "run@10")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = cli_main(trajectory.main, ["--base", str(models["base"]), "--experts", "run@10", "--runs", "run",
                                      "--no-figures", "--quiet", "--out", "t"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: ") and "run@10" in err, err
    assert "checkpoint-10" in err, err
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.partial-*"))
    # one path given twice keeps check_inputs_and_out's words, which name the repetition
    code = cli_main(trajectory.main, ["--base", str(models["base"]), "--experts", "run@10", "--merged", "run@10",
                                      "--no-figures", "--quiet", "--out", "t"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: run@10 is listed twice"), err


def test_features_of_checkpoints_of_other_dtypes_and_layouts_are_the_fp64_norms_and_the_explicit_projection(
        models, tmp_path):
    """Points stored in bfloat16 (transformers 4's model.language_model.… layout) and float16 (a run, 5 shards)
    beside the float32 base: each norms entry is ‖θ − θ_base‖ in float64 on the whole tensors, names mapped by hand,
    and each sketch row the matrix product S·δ with S written out column by column from the count sketch's hashes
    (bucket h(j), sign s(j)), not through CountSketch.project or the streaming code."""
    base = tiny.base_lm(0)
    bf = tiny.to_tf4_layout(tiny.write_model("qwen2_vl", tmp_path / "bf", tiny.perturb(base, 0.01, 4),
                                             dtype=torch.bfloat16))
    for step in (0, 5):
        tiny.write_model("qwen2", tmp_path / "run" / f"checkpoint-{step}", tiny.perturb(base, 0.002 * (step + 1), 6),
                         dtype=torch.float16, max_shard_size="20KB")
    out = tmp_path / "t"
    assert cli_main(trajectory.main, [str(a) for a in ["--base", models["base"], "--experts", bf, "--runs",
                                                       tmp_path / "run", "--sketch-dim", 4, "--seed", 3, "--quiet",
                                                       "--no-figures", "--out", out]]) == 0
    feats = np.load(out / "features.npz")
    tensors = [str(t) for t in feats["tensors"]]

    def lm(d: Path, prefix: str) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for f in d.glob("*.safetensors"):
            sd.update(load_file(f))
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()
                if k.startswith(prefix) or k == "lm_head.weight"}

    ref = lm(models["base"], "model.")
    cs = CountSketch(4, seed=3)
    for i, (d, prefix, dtype) in enumerate([(bf, "model.language_model.", torch.bfloat16),
                                            (tmp_path / "run" / "checkpoint-0", "model.", torch.float16),
                                            (tmp_path / "run" / "checkpoint-5", "model.", torch.float16)], start=1):
        point = lm(d, prefix)
        assert point["norm.weight"].dtype == dtype
        sketch = np.zeros(4)
        for t, name in enumerate(tensors):
            delta = (point[name].double() - ref[name].double()).reshape(-1)
            assert feats["norms"][i, t] == pytest.approx(float(delta.norm()), rel=1e-6, abs=0)
            buckets, signs = cs.hashes(name, 0, delta.numel())  # one chunk: every tensor here is < SKETCH_CHUNK
            s = torch.zeros(4, delta.numel(), dtype=torch.float64)
            s[buckets, torch.arange(delta.numel())] = signs.double()
            sketch += (s @ delta).numpy()
        np.testing.assert_allclose(feats["sketch"][i], sketch, rtol=1e-6, atol=1e-9)


def test_sketch_of_a_tensor_past_one_chunk_is_the_explicit_projection_of_the_common_rows(tmp_path):
    """The streamed sketch hashes each SKETCH_CHUNK elements with a generator of their own: an embedding of 32,800
    rows × 32 spans two chunks, and an expert with 10 more rows is sketched on the base's rows only. Oracle: S·δ
    with S written out column by column from the hashes of chunk 0 and chunk 1 (the count sketch's definition)."""
    from analyses.sketch import SKETCH_CHUNK

    base = tiny.base_lm(0, vocab_size=32800)
    b = tiny.write_model("qwen2", tmp_path / "b", base)
    e = tiny.write_model("qwen2", tmp_path / "e", tiny.resize_vocab(tiny.perturb(base, 0.01, 1), 32810))
    out = tmp_path / "t"
    assert cli_main(trajectory.main, [str(a) for a in ["--base", b, "--experts", e, "--sketch-dim", 3, "--seed", 7,
                                                       "--quiet", "--no-figures", "--out", out]]) == 0
    feats = np.load(out / "features.npz")
    sb, se = load_file(b / "model.safetensors"), load_file(e / "model.safetensors")
    cs = CountSketch(3, seed=7)
    want = np.zeros(3)
    norms = []  # and the norms feature, ‖δ‖ per tensor over every chunk (the last chunk's alone passed, mut45)
    for name in map(str, feats["tensors"]):
        key = name if name == "lm_head.weight" else "model." + name
        delta = (se[key][:sb[key].shape[0]] - sb[key]).double().reshape(-1)  # Δ in fp32 (DESIGN §5), summed in fp64
        norms.append(float(delta.norm()))
        s = torch.zeros(3, delta.numel(), dtype=torch.float64)
        for c, lo in enumerate(range(0, delta.numel(), SKETCH_CHUNK)):
            n = min(SKETCH_CHUNK, delta.numel() - lo)
            buckets, signs = cs.hashes(name, c, n)
            s[buckets, torch.arange(lo, lo + n)] = signs.double()
        want += (s @ delta).numpy()
    assert sb["model.embed_tokens.weight"].numel() > SKETCH_CHUNK
    np.testing.assert_allclose(feats["sketch"][1], want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(feats["norms"][1], norms, rtol=1e-9, atol=1e-12)


def test_pca_coords_are_the_svd_of_the_saved_features_and_a_seed_redoes_every_map(models, tmp_path):
    """Oracle for the maps: PCA coordinates are the centred features times their first two right singular vectors
    (up to each axis' sign), the variance shares σ_k² / Σσ²; the same --seed gives the same t-SNE coordinates bit for
    bit in a second output."""
    argv = ["--base", models["base"], "--experts", models["e1"], "--merged", models["m"], "--sketch-dim", 16,
            "--seed", 1, "--quiet", "--no-figures"]
    for out in ("a", "b"):
        assert cli_main(trajectory.main, [str(a) for a in [*argv, "--out", tmp_path / out]]) == 0
    assert (tmp_path / "a" / "coords.csv").read_bytes() == (tmp_path / "b" / "coords.csv").read_bytes()
    feats = np.load(tmp_path / "a" / "features.npz")
    run = json.loads((tmp_path / "a" / "run.json").read_text(encoding="utf-8"))
    rows = list(csv.DictReader(open(tmp_path / "a" / "coords.csv", encoding="utf-8")))
    assert {r["method"] for r in rows} == {"pca", "tsne"}
    for feature in ("norms", "sketch"):
        x = feats[feature] - feats[feature].mean(axis=0)
        _, sv, vt = np.linalg.svd(x, full_matrices=False)
        want = x @ vt[:2].T
        got = np.array([[float(r["x"]), float(r["y"])] for r in rows if r["feature"] == feature and r["method"] == "pca"])
        assert [r["name"] for r in rows if r["feature"] == feature and r["method"] == "pca"] == list(feats["names"])
        got *= np.sign((got * want).sum(axis=0))  # an axis' sign is arbitrary
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
        np.testing.assert_allclose(run["pca_explained_variance"][feature], (sv[:2] ** 2 / (sv ** 2).sum()), rtol=1e-6)


def test_the_points_in_another_order_get_the_same_coordinates_to_the_bit():
    """The experts listed in another order move only rows: PCA and t-SNE of the rows in the order typed gave the
    organisms' coordinates 2e-15 apart (and run.json's variance shares), so coords.csv was other bytes."""
    from analyses.trajectory import embed_2d

    x = np.random.default_rng(0).normal(size=(6, 40))
    x[4] = x[1]  # two points that coincide: their order between them must not matter either
    perm = np.array([3, 0, 5, 1, 4, 2])
    typed, used, explained = embed_2d(x, 30.0, 0)
    again, used_p, explained_p = embed_2d(x[perm], 30.0, 0)
    assert set(typed) == {"pca", "tsne"} and (used, explained) == (used_p, explained_p)
    for method in typed:
        assert np.array_equal(again[method], typed[method][perm]), method


def test_a_features_npz_lacking_an_array_is_named_so_not_unreadable(tmp_path):
    """read_sketch's refusal of an archive without its ``sketch`` array is raised inside the block whose ``except
    ValueError`` says "not a readable .npz archive": it passes as raised (BadInput is a ValueError)."""
    from figures.trajectory import read_sketch
    from probe.errors import BadInput

    np.savez(tmp_path / "features.npz", names=np.array(["a"]))
    with pytest.raises(BadInput) as caught:
        read_sketch(tmp_path)
    assert str(caught.value) == (f"{tmp_path / 'features.npz'}: no sketch array (not as python -m analyses.trajectory "
                                 "writes it)")
