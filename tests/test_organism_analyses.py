"""Organism aliases work in the analyses commands, and the numbers match a direct computation."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from probe.models import model_path


def test_shift_and_merge_on_organism_aliases(tmp_path):
    from analyses import merge, shift

    assert shift.main(["--base", "organism-base", "--models", "organism-vl", "organism-video",
                       "--out", str(tmp_path / "shift"), "--no-figures"]) == 0
    table = pd.read_csv(tmp_path / "shift" / "shift.csv")
    base = load_file(model_path("organism-base") / "model.safetensors")
    vl = load_file(model_path("organism-vl") / "model.safetensors")  # Qwen2-VL keeps model.layers.* on disk
    row = table[(table["model"] == "organism-vl") & (table["tensor"] == "layers.1.self_attn.o_proj.weight")]
    key = "model.layers.1.self_attn.o_proj.weight"
    direct = (base[key].float() - vl[key].float()).abs().mean().item()
    assert abs(float(row["delta_avg"].iloc[0]) - direct) <= 1e-6 * max(1.0, direct) and direct > 0
    summary = json.loads((tmp_path / "shift" / "summary.json").read_text())
    assert "organism-vl" in json.dumps(summary)

    out = tmp_path / "avg"
    assert merge.main(["--models", "organism-base", "organism-vl", "--method", "average", "--out", str(out)]) == 0
    merged = load_file(out / "model.safetensors")
    expect = ((base[key].float() + vl[key].float()) / 2).to(base[key].dtype)
    assert torch.equal(merged[key], expect)
    # the organisms' build records stay theirs: a merge (and its carriers) is another model
    assert (model_path("organism-vl") / "organism.json").is_file() and (out / "config.json").is_file()
    assert not list(out.rglob("organism.json"))


def _same_frame(got: pd.DataFrame, path, **read) -> None:
    """A loader's frame holds what the file on disk says, read here on its own (pandas, no omniprobe reader)."""
    want = pd.read_csv(path, **read)
    pd.testing.assert_frame_equal(got.reset_index(drop=True)[list(want.columns)], want, check_dtype=False)


def test_shift_merge_trajectory_from_python_return_what_they_wrote(tmp_path):
    """``analyses.shift.shift``, ``analyses.merge.merge`` and ``analyses.trajectory.trajectory`` take their command's
    options as keywords and return the output read back (Shift, Merge, Trajectory), as ``probe.heads.sweep`` does:
    the objects hold what the files say, and the output is the command line's, byte for byte."""
    from analyses import merge, shift, trajectory
    from figures.results import Merge, Shift, Trajectory

    models = ["organism-vl", "organism-video"]
    got = shift.shift(base="organism-base", models=models, no_figures=True, quiet=True, out=tmp_path / "shift")
    assert isinstance(got, Shift) and got.dir == tmp_path / "shift"
    _same_frame(got.table, tmp_path / "shift" / "shift.csv", keep_default_na=False, na_values=[""])
    assert got.summary == json.loads((tmp_path / "shift" / "summary.json").read_text())
    assert list(got.per_model.index) == models
    assert shift.main(["--base", "organism-base", "--models", *models, "--no-figures", "--quiet",
                       "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "shift.csv").read_bytes() == (tmp_path / "shift" / "shift.csv").read_bytes()
    again = shift.shift(base="organism-base", models=models, no_figures=True, quiet=True, out=tmp_path / "shift")
    assert again.summary == got.summary  # finished with the same inputs: kept and read back, not computed again

    m = merge.merge(base="organism-base", models=models, method="shift", shift_dir=tmp_path / "shift",
                    carriers=["organism-vl"], quiet=True, out=tmp_path / "merged")
    assert isinstance(m, Merge) and m.model == tmp_path / "merged"
    assert m.info == json.loads((tmp_path / "merged" / "merge.json").read_text())
    _same_frame(m.weights, tmp_path / "merged" / "merge_weights.csv", keep_default_na=False, na_values=[""])
    assert m.carriers == {"organism-vl": tmp_path / "merged" / "carriers" / "organism-vl"}
    assert (m.carriers["organism-vl"] / "config.json").is_file()

    t = trajectory.trajectory(base="organism-base", experts=models, merged=[str(tmp_path / "merged")],
                              no_figures=True, quiet=True, out=tmp_path / "traj")
    assert isinstance(t, Trajectory) and t.info == json.loads((tmp_path / "traj" / "run.json").read_text())
    _same_frame(t.coords, tmp_path / "traj" / "coords.csv", dtype={"run": str}, keep_default_na=False,
                na_values={"step": [""]})
    assert set(t.coords["name"]) == {"organism-base", *models, str(tmp_path / "merged")}


def test_the_analyses_from_python_refuse_bad_values_and_unknown_keywords(tmp_path):
    """As ``sweep``: a value the command refuses is BadInput (one line, nothing written), an unknown keyword a
    TypeError naming the options."""
    from analyses import finetune, merge, shift, trajectory
    from probe.errors import BadInput

    out = tmp_path / "out"
    for call, options, message in (
            (shift.shift, {"base": "organism-base", "models": []}, "--models: expected at least one argument"),
            (merge.merge, {"models": ["organism-vl"], "method": "average", "density": 0.5},
             "--density only applies to --method ties, not average"),
            (merge.merge, {"models": ["organism-vl"], "method": "nope"}, "argument --method: invalid choice"),
            (trajectory.trajectory, {"base": "organism-base", "experts": ["organism-vl"], "sketch_dim": 0},
             "--sketch-dim must be in"),
            (finetune.finetune, {"model": "organism-base", "data": ["probe/zoo/data/text"], "steps": 2},
             "use LABEL=DIR")):
        with pytest.raises(BadInput, match=message) as exc:
            call(**options, out=out)
        assert "\n" not in str(exc.value) and not out.exists(), (call.__name__, exc.value)
    for call in (shift.shift, merge.merge, trajectory.trajectory, finetune.finetune):
        with pytest.raises(TypeError, match="no option 'outdir'.*out"):
            call(outdir=out)


def test_finetune_from_python_returns_the_run_read_back(tmp_path):
    """``analyses.finetune.finetune(**options)``: the run, a FinetuneRun whose log, run.json and checkpoints are
    the files it wrote."""
    from analyses.finetune import finetune
    from figures.results import FinetuneRun

    out = tmp_path / "ft"
    run = finetune(model="organism-base", data=[f"text={REPO / 'probe/zoo/data/text'}"], split="validation", limit=8,
                   steps=2, save_steps=[0, 1], batch_size=4, device="cpu", dtype="float32", quiet=True, out=out)
    assert isinstance(run, FinetuneRun) and run.dir == out
    assert run.info == json.loads((out / "run.json").read_text()) and run.info["status"] == "complete"
    _same_frame(run.log, out / "train_log.csv")
    assert run.log["step"].tolist() == [1, 2] and run.info["config"]["batch"] == 4
    assert run.checkpoints == {s: out / f"checkpoint-{s}" for s in (0, 1, 2)}
    assert all((out / f"checkpoint-{s}" / "config.json").is_file() for s in (0, 1, 2))


def test_a_result_from_python_equals_its_output_read_back_and_not_an_edited_one(tmp_path):
    """``shift(...) == Shift.read(dir)`` raised ValueError ("The truth value of a DataFrame is ambiguous"): the
    dataclasses' generated ``==`` compared their frames with pandas' elementwise ``==``. The oracle: the same files
    read again, and a copy with one number of its frame changed (or one key of its JSON)."""
    from dataclasses import replace

    from analyses import merge, shift, trajectory
    from figures.results import Merge, Shift, Trajectory

    models = ["organism-vl", "organism-video"]
    s = shift.shift(base="organism-base", models=models, no_figures=True, quiet=True, out=tmp_path / "shift")
    m = merge.merge(base="organism-base", models=models, method="shift", shift_dir=tmp_path / "shift", quiet=True,
                    out=tmp_path / "merged")
    t = trajectory.trajectory(base="organism-base", experts=models, no_figures=True, quiet=True,
                              out=tmp_path / "traj")
    for got, cls, frame, saved in ((s, Shift, "table", "summary"), (m, Merge, "weights", "info"),
                                   (t, Trajectory, "coords", "info")):
        again = cls.read(got.dir)
        assert got == again and not (got != again)
        edited = getattr(got, frame).copy()
        column = next(c for c in edited.select_dtypes("number") if pd.notna(edited[c].iloc[0]))  # NaN + 1 is NaN
        edited.loc[edited.index[0], column] += 1
        assert got != replace(got, **{frame: edited})
        assert got != replace(got, **{saved: {**getattr(got, saved), "edited": True}})
    assert s != m  # another kind of result is never equal


def test_the_python_calls_leave_torchs_threads_dtype_grad_mode_and_generator_as_they_were(tmp_path):
    """The README's promise to a notebook: ``evaluate``, ``shift`` and ``merge`` (its ``threads`` for the call only)
    leave torch's thread count, default dtype, grad mode and global generator as the caller set them, here none of
    them torch's defaults. The oracle: each read before the calls (``finetune``'s generator and grad mode:
    test_finetune)."""
    from analyses import merge, shift
    from probe.eval import evaluate

    def state() -> tuple:
        return (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_rng_state())

    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    try:
        torch.set_num_threads(2)
        torch.set_default_dtype(torch.float64)
        torch.manual_seed(4321)
        with torch.no_grad():
            before = state()
            evaluate(models=["organism-base"], data=[str(REPO / "probe/zoo/data/text")], limit=2, no_figures=True,
                     quiet=True, out=tmp_path / "eval")
            shift.shift(base="organism-base", models=["organism-vl"], no_figures=True, quiet=True,
                        out=tmp_path / "shift")
            merge.merge(base="organism-base", models=["organism-vl"], method="shift", shift_dir=tmp_path / "shift",
                        threads=1, quiet=True, out=tmp_path / "merged")
            after = state()
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    assert after[:3] == before[:3] == (2, torch.float64, False) and torch.equal(after[3], before[3])


NOTEBOOK_DRAWS = """
import sys
import matplotlib
matplotlib.use("svg")  # a notebook's backend (inline there); svg: one that needs no display
import matplotlib.pyplot as plt
mine = plt.figure()  # a figure the notebook has open
import figures.eval, figures.heads, figures.merge, figures.report, figures.steps  # noqa: E401
from analyses.shift import shift
from analyses.trajectory import trajectory
out = sys.argv[1]
shift(base="organism-base", models=["organism-vl"], quiet=True, out=out + "/shift")  # draws its figures
trajectory(base="organism-base", experts=["organism-vl"], quiet=True, out=out + "/traj")
print(matplotlib.get_backend(), plt.get_fignums() == [mine.number])
"""


def test_drawing_from_python_leaves_a_notebooks_matplotlib_backend_and_its_figures(tmp_path):
    """Importing figures.shift or figures.trajectory (``load(DIR)`` of a shift or trajectory output does) and every
    command that draws called ``matplotlib.use("Agg")``: a notebook's inline backend became Agg (``plt.show()`` then
    warns that Agg cannot show) and the switch closed the notebook's open figures. In a process of its own, as a
    notebook imports them once. The oracle: the backend and open figures the script set before."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", NOTEBOOK_DRAWS, str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].split() == ["svg", "True"]  # after the commands' summaries
    assert (tmp_path / "shift" / "shift_models.png").is_file() and (tmp_path / "traj" / "trajectory_norms.png").is_file()


# --------------------------------------------------------------------------------------------------------
# the readers (figures.results) on a damaged output: BadInput naming the file, never an object short of data


def test_a_cut_features_npz_is_bad_input_when_the_sketch_is_read(tmp_path):
    """``Trajectory.read(d).sketch`` on a features.npz cut short (a copy that stopped, a full disk) raised zipfile's
    BadZipFile from inside numpy (pyfuzz48); an empty or garbled one was already BadInput. The oracle: the file's
    first half, written here."""
    from analyses import trajectory
    from figures.results import Trajectory
    from probe.errors import BadInput

    out = tmp_path / "traj"
    trajectory.trajectory(base="organism-base", experts=["organism-vl"], no_figures=True, quiet=True, out=out)
    npz = out / "features.npz"
    whole = npz.read_bytes()
    npz.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadInput, match=f"^{npz}: not a readable .npz archive$"):
        Trajectory.read(out).sketch


@pytest.mark.parametrize("gone", ["model.safetensors", "config.json"])
def test_a_merge_whose_model_files_are_gone_is_refused_when_read(tmp_path, gone):
    """``Merge.read`` (and ``load``) read merge.json and merge_weights.csv only: a merge whose model.safetensors or
    config.json had been deleted read back whole, its ``.model`` a dir no loader could open (pyfuzz48). The output's
    manifest lists every file the merge wrote; one gone from it is refused, naming it."""
    from analyses import merge
    from figures.results import Merge, load
    from probe.errors import BadInput

    out = tmp_path / "merged"
    merge.merge(models=["organism-base", "organism-vl"], method="average", quiet=True, out=out)
    (out / gone).unlink()
    for read in (Merge.read, load):
        with pytest.raises(BadInput, match=f"^{out}: {gone} is gone"):
            read(out)


def test_a_sweep_of_one_layer_whose_heads_csv_lost_its_last_row_is_refused(tmp_path):
    """heads.csv was checked to hold every swept layer × every swept head *it names*: a sweep of one layer (or one
    head) cut at its last row lost that head from both, and ``HeadSweep.read`` returned 2 heads of 3 (pyfuzz48). The
    heads swept are run.json's plan; the oracle: the file less its last line, written here."""
    from figures.results import HeadSweep
    from probe.errors import BadInput
    from probe.heads import sweep

    out = tmp_path / "heads"
    sweep(model="organism-base", data=str(REPO / "probe/zoo/data/text"), limit=2, layers="0", heads="0-2",
          no_figures=True, quiet=True, out=out)
    assert len(HeadSweep.read(out).heads) == 3
    csv = out / "heads.csv"
    csv.write_text("".join(csv.read_text(encoding="utf-8").splitlines(keepends=True)[:-1]), encoding="utf-8")
    with pytest.raises(BadInput, match=f"^{csv}: no row for layer 0 head 2 "):
        HeadSweep.read(out)


def test_an_eval_runs_paired_interval_refuses_a_level_that_is_no_fraction(tmp_path):
    """``EvalRun.paired(..., level=95)`` (a percentage where the docstring's 95 % means 0.95) raised numpy's
    "Percentiles must be in the range [0, 100]", and level=-0.5 or 0 returned an interval of no meaning (pyfuzz48).
    The level is a fraction strictly between 0 and 1; 0.9 still gives an interval."""
    from probe.errors import BadInput
    from probe.eval import evaluate

    data = str(REPO / "probe/zoo/data/text")
    run = evaluate(models=["organism-base", "organism-vl"], data=[data], limit=2, no_figures=True, quiet=True,
                   out=tmp_path / "eval")
    for level in (95, 1, 0, -0.5, float("nan"), True, "0.9"):
        with pytest.raises(BadInput, match=r"level .*a fraction in \(0, 1\), e\.g\. 0\.95"):
            run.paired("organism-vl", "organism-base", data, level=level)
    got = run.paired("organism-vl", "organism-base", data, level=0.9)
    assert got.lo <= got.value <= got.hi


def _finished_finetune_log(d):
    """A finished analyses.finetune output written out by hand (run.json complete, 2 steps, checkpoints 0 and 2),
    its train_log.csv as finetune appends it: one ``\\r\\n``-ended csv row a step."""
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"command": "analyses.finetune", "status": "complete",
                                            "config": {"steps": 2, "save_steps": [0]}}), encoding="utf-8")
    rows = ["step,modality,loss,lr,lm_lr,tokens", "1,text=2,2.5,0.0001,0.0001,120", "2,text=2,2.25,0.0001,0.0001,123"]
    (d / "train_log.csv").write_bytes("".join(r + "\r\n" for r in rows).encode("utf-8"))
    for s in (0, 2):
        (d / f"checkpoint-{s}").mkdir()
    return d / "train_log.csv"


@pytest.mark.parametrize("last", ["2,text=2,2.25,0.0001,0.0001,12", "2,text=2,2."], ids=["tokens", "loss"])
def test_a_finished_finetune_log_whose_last_number_was_cut_is_refused(tmp_path, last):
    """A finished run's train_log.csv cut inside its last number (123 tokens read back as 12, a loss 2.25 as 2.)
    read back as a whole log of a wrong number (fuzz48b), cut inside the loss as "1 readable rows". finetune appends
    a whole line a step before run.json says complete, and a kill's torn line is a "running" run's, which the resume drops: a finished log's last line ends
    with its line end. The oracle: the file whole reads; cut by hand, it is BadInput naming it."""
    from figures.results import FinetuneRun
    from probe.errors import BadInput

    log = _finished_finetune_log(tmp_path / "ft")
    assert FinetuneRun.read(tmp_path / "ft").log["tokens"].tolist() == [120, 123]
    text = log.read_bytes()
    log.write_bytes(text[:text.rindex(b"\r\n2,") + 2] + last.encode("utf-8"))
    with pytest.raises(BadInput, match=f"^{log}: its last line is cut short"):
        FinetuneRun.read(tmp_path / "ft")


@pytest.mark.parametrize("damage", ["lost", "extra"])
def test_an_eval_whose_scores_csv_lost_or_gained_a_row_of_the_plan_is_refused(tmp_path, damage):
    """``EvalRun.read`` checked scores.csv against itself: a one-subject set's file cut at its last line (its only
    subject row; the 'all' row's total has no subject rows left to disagree with) read back as whole, as did the
    rows of a model the run never scored (fuzz48b). The rows are run.json's plan: each model × data set × ('all' and
    each subject). The oracle: the file less its last line, or with another model's two rows, written here."""
    from figures.results import EvalRun
    from probe.errors import BadInput
    from probe.eval import evaluate

    out = tmp_path / "eval"
    evaluate(models=["organism-base"], data=[str(REPO / "probe/zoo/data/text")], limit=2, no_figures=True,
             quiet=True, out=out)
    csv = out / "scores.csv"
    lines = csv.read_text(encoding="utf-8").splitlines(keepends=True)
    assert [ln.split(",")[2] for ln in lines[1:]] == ["all", "Instruction"]  # one subject
    EvalRun.read(out)
    if damage == "lost":
        csv.write_text("".join(lines[:-1]), encoding="utf-8")
        message = f"^{csv}: no row for model organism-base on data set text, subject Instruction "
    else:
        csv.write_text("".join(lines + [ln.replace("organism-base", "organism-vl", 1) for ln in lines[1:]]),
                       encoding="utf-8")
        message = f"^{csv}: a row for model organism-vl on data set text, subject all, which run.json's plan "
    with pytest.raises(BadInput, match=message):
        EvalRun.read(out)
