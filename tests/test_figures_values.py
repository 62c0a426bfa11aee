"""What each figure draws, read back from its matplotlib artists, against the saved file it is drawn from (the
independent oracle: the CSV itself, pivoted by pandas); and redraws of damaged or ambiguous saved results."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from test_cli_errors import one_error_line, snapshot
from test_figures_page import write_merge, write_scores, write_shift, write_trajectory

from probe.errors import cli_main


@pytest.fixture
def drawn(monkeypatch) -> dict[str, Figure]:
    """Every figure saved while the test runs, by the name of the file it went to (the temp file's name minus its
    '.NAME.png.PID.xxx.tmp' decoration)."""
    figs: dict[str, Figure] = {}
    save = Figure.savefig

    def savefig(self, fname, *a, **k):
        figs[Path(str(fname)).name.lstrip(".").split(".")[0]] = self
        return save(self, fname, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figs


def figures_cli(kind: str, *dirs: Path) -> int:
    from figures.__main__ import main

    return cli_main(main, [kind, *map(str, dirs)])


def shows(label: str, model: str) -> bool:
    """Whether a tick label names ``model``: the name, a tail of its folders, or its start and end around '…'."""
    start, cut, end = label.partition("…")
    if not cut:
        return model == label or model.endswith("/" + label)
    return model.endswith(end) and start in model


def test_eval_models_whose_long_names_end_alike_keep_apart(tmp_path, drawn):
    """Paths over 40 characters kept only their last 39: s0/…/mixed/checkpoint-100 and s1/…/mixed/checkpoint-100
    became one tick label, two rows of the figure that no reader could tell apart."""
    tail = "/finetune-runs-of-the-organisms/mixed/checkpoint-100"
    models = [f"runs/seed{k}{tail}" for k in range(3)] + ["organism-base"]
    write_scores(tmp_path, models, ["text", "image"])
    assert figures_cli("eval", tmp_path) == 0
    fig = drawn["eval"]
    ticks = fig.axes[0].get_yticklabels()
    labels = {round(t.get_position()[1]): t.get_text() for t in ticks}
    assert len(set(labels.values())) == len(models)
    top = pd.read_csv(tmp_path / "scores.csv", keep_default_na=False, na_values=[""])
    for ax in fig.axes:
        ds = ax.get_title().split(" (")[0]
        for c in (c for c in ax.containers if isinstance(c, ErrorbarContainer)):
            x, y = c.lines[0].get_xdata()[0], c.lines[0].get_ydata()[0]
            [model] = [m for m in models if shows(labels[round(y)], m)]  # the one model its label names
            row = top[(top["model"] == model) & (top["data"] == ds)].iloc[0]
            assert x == pytest.approx(100 * row["accuracy"])


@pytest.mark.parametrize("root", ["/tmp/rep43", "/tmp/r"])
def test_eval_labels_of_sibling_paths_keep_one_depth(tmp_path, drawn, root):
    """Each label kept the most whole parts that fit its own path, so the carriers of one report's merges read
    "…/merge/average/carriers/organism-vl" beside "…/rep43/merge/shift/carriers/organism-vl" (shorter method
    names left room for one more part), and under /tmp/r the ties carrier kept its whole path beside trimmed
    siblings. Paths of one depth (siblings) are now trimmed alike: the same number of last parts for all, the most
    that fit every one within 40 characters (the oracle below), and told apart."""
    carriers = [f"{root}/merge/{m}/carriers/organism-vl" for m in ("average", "shift", "salience", "ties")]
    models = ["organism-vl", *carriers]
    write_scores(tmp_path, models, ["text", "image"])
    assert figures_cli("eval", tmp_path) == 0
    ticks = {round(t.get_position()[1]): t.get_text() for t in drawn["eval"].axes[0].get_yticklabels()}
    labels = [ticks[k] for k in sorted(ticks)]
    assert sorted(labels) == sorted(set(labels)) and "organism-vl" in labels
    parts = [c.split("/") for c in carriers]
    depth = max(k for k in range(1, 7) if all(len("…/" + "/".join(p[-k:])) <= 40 for p in parts))
    assert depth == (4 if root == "/tmp/rep43" else 5)  # rep43's shift and ties alone fit a 5th part
    assert sorted(x for x in labels if x != "organism-vl") == sorted("…/" + "/".join(p[-depth:]) for p in parts)


def test_shift_models_in_folders_of_one_name_get_a_heatmap_each(tmp_path, drawn):
    """seed0/merged and seed1/merged were labelled 'merged' and "merged'", whose file names are both
    shift_heatmap_merged: the second heatmap overwrote the first."""
    write_shift(tmp_path, ["runs/seed0/merged", "runs/seed1/merged"], 3, ["self_attn.q_proj.weight", "mlp.up_proj.weight"])
    assert figures_cli("shift", tmp_path) == 0
    df = pd.read_csv(tmp_path / "shift.csv")
    for k in (0, 1):
        im = drawn[f"shift_heatmap_seed{k}_merged"].axes[0].get_images()[0]
        want = df[(df["model"] == f"runs/seed{k}/merged") & df["layer"].notna()].pivot(
            index="layer", columns="module", values="delta_avg")
        np.testing.assert_allclose(np.ma.filled(im.get_array(), np.nan), want.to_numpy())


def test_shift_models_whose_names_slug_alike_get_a_heatmap_each(tmp_path, drawn):
    """File names keep [A-Za-z0-9_.-] only: 'a b' and 'a_b' both became shift_heatmap_a_b, two all-CJK names both
    shift_heatmap_model (4 models, 2 heatmap files, the later drawing over the earlier); 'VL' and 'vl' are one file
    on a case-insensitive disk. Oracle: each file's cells are the pivot of one model's rows, every model's once."""
    models = ["runs/视觉", "runs/音频", "runs/a b", "runs/a_b", "runs/VL", "runs/vl"]
    write_shift(tmp_path, models, 2, ["self_attn.q_proj.weight", "mlp.up_proj.weight"])
    with pytest.warns(UserWarning, match="Glyph"):  # DejaVu Sans has no CJK glyphs: the titles show boxes
        assert figures_cli("shift", tmp_path) == 0
    files = sorted(p.stem for p in tmp_path.glob("shift_heatmap_*.png"))
    assert len(files) == len(models) and len({f.casefold() for f in files}) == len(models), files
    df = pd.read_csv(tmp_path / "shift.csv", keep_default_na=False, na_values=[""])
    seen = []
    for f in files:
        title = drawn[f].axes[0].get_title()
        [m] = [m for m in models if title.endswith(": " + m.split("/")[-1])]
        seen.append(m)
        want = df[(df["model"] == m) & df["layer"].notna()].pivot(index="layer", columns="module", values="delta_avg")
        np.testing.assert_allclose(np.ma.filled(drawn[f].axes[0].get_images()[0].get_array(), np.nan), want.to_numpy())
    assert sorted(seen) == sorted(models)


def shown_texts(fig: Figure) -> list[str]:
    """Every text of a figure: one that matplotlib would parse as mathtext is refused (a model's name is never
    math)."""
    from matplotlib.cbook import is_math_text
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(Text) if t.get_text()]
    assert not [t.get_text() for t in texts if t.get_parse_math() and is_math_text(t.get_text())]
    return [t.get_text() for t in texts]


def test_shift_and_trajectory_names_with_dollars_are_drawn_as_written(tmp_path, drawn):
    """matplotlib reads text between two '$' as mathtext: a model folder 'a$_$b' ended the shift and trajectory
    redraws in a ParseSyntaxException traceback, and 'cost$5-$10' was drawn as 'cost5-10' with an italic '5-'. A
    legend leaves out a line whose label starts with '_': the shift-by-depth line of a folder '_scratch' had none."""
    names = ["runs/a$_$b", "runs/cost$5-$10", "runs/_scratch"]
    write_shift(tmp_path / "s", names, 2, ["self_attn.q_proj.weight"])
    assert figures_cli("shift", tmp_path / "s") == 0
    shown = "\n".join(t for k, fig in drawn.items() if k.startswith("shift_") for t in shown_texts(fig))
    assert "a$_$b" in shown and "cost$5-$10" in shown, shown
    [legend] = [ax.get_legend() for ax in drawn["shift_models"].axes if ax.get_legend()]
    assert [t.get_text() for t in legend.get_texts()] == [n.split("/")[1] for n in names]
    d = write_trajectory(tmp_path / "t", ["ft$_$a"])
    coords = (d / "coords.csv").read_text(encoding="utf-8").replace("organism-vl", "x/cost$5-$10")
    (d / "coords.csv").write_text(coords, encoding="utf-8")
    info = json.loads((d / "run.json").read_text(encoding="utf-8")) | {"ref": "runs/$_$"}
    (d / "run.json").write_text(json.dumps(info), encoding="utf-8")
    assert figures_cli("trajectory", d) == 0
    shown = "\n".join(shown_texts(drawn["trajectory_norms"]))
    assert "cost$5-$10" in shown and "run ft$_$a" in shown and "θ_ref = $_$" in shown, shown


def test_shift_heatmap_columns_of_numbered_modules_are_in_number_order(tmp_path, drawn):
    """pandas sorts the pivot's module names as text: a mixture-of-experts layer's columns ran experts.0, experts.1,
    experts.10, experts.11, experts.2, … (64 experts × 3 projections: 1,000s of tensors, and a reader scanning the
    labelled columns for expert 2 found it after 19). Oracle: the pivot of shift.csv reindexed by the numbers in
    the names; the cells drawn are that grid."""
    mods = ["self_attn.q_proj.weight"] + [f"mlp.experts.{e}.{p}_proj.weight" for e in range(12) for p in ("up", "down")]
    write_shift(tmp_path, ["moe"], 2, mods)
    assert figures_cli("shift", tmp_path) == 0
    ax = drawn["shift_heatmap_moe"].axes[0]
    df = pd.read_csv(tmp_path / "shift.csv", keep_default_na=False, na_values=[""])
    grid = df[df["layer"].notna()].pivot(index="layer", columns="module", values="delta_avg")
    order = sorted(grid.columns, key=lambda c: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", c)])
    assert order[1:4] == ["mlp.experts.0.up_proj.weight", "mlp.experts.1.down_proj.weight",
                          "mlp.experts.1.up_proj.weight"]  # after experts.0.down: 1, not 10
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), grid[order].to_numpy())
    short = [c.replace(".weight", ".w") for c in order]
    ticks = ax.get_xticks()
    assert [t.get_text() for t in ax.get_xticklabels()] == [short[int(i)] for i in ticks]


def test_steps_and_merge_panels_of_one_folder_name_are_told_apart(tmp_path, drawn):
    """Eval runs seed0/mixed and seed1/mixed were both titled 'mixed'; merge participants a/checkpoint-100 and
    b/checkpoint-100 both 'checkpoint-100'."""
    for seed in (0, 1):
        write_scores(tmp_path / f"seed{seed}" / "mixed", [f"ft/checkpoint-{s}" for s in (0, 10)], ["text"], seed)
    assert figures_cli("steps", tmp_path / "seed0" / "mixed", tmp_path / "seed1" / "mixed") == 0
    titles = [ax.get_title() for ax in drawn["steps"].axes if ax.get_visible()]
    assert titles[:2] == ["run seed0/mixed", "run seed1/mixed"]
    d = write_merge(tmp_path / "m", 3)
    w = pd.read_csv(d / "merge_weights.csv")
    w["model"] = w["model"].str.replace(r"zoo/expert-(\d)", r"run\1/checkpoint-100", regex=True)
    w.to_csv(d / "merge_weights.csv", index=False)
    info = d / "merge.json"  # the participants as merge.json names them too
    info.write_text(re.sub(r"zoo/expert-(\d)", r"run\1/checkpoint-100", info.read_text()))
    assert figures_cli("merge", d) == 0
    titles = [ax.get_title() for ax in drawn["merge_heads"].axes if ax.get_images() and "salience" not in ax.get_title()]
    assert titles == [f"run{k}/checkpoint-100" for k in range(3)]


def test_steps_given_one_run_twice_exits_2_and_draws_nothing(tmp_path, capsys, monkeypatch, drawn):
    """The same eval dir given twice (also as DIR/ or ./DIR) drew two identical panels, which read as two runs
    that agree; probe.eval and analyses.trajectory refuse a model or run given twice, and so does steps now."""
    d = write_scores(tmp_path / "mixed", [f"ft/checkpoint-{s}" for s in (0, 10)], ["text"])
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for second in (d, Path(f"{d}/"), Path("mixed"), Path("./mixed/../mixed")):
        line = one_error_line(figures_cli("steps", d, second), capsys.readouterr().err)
        assert "same eval run" in line and str(d.resolve()) in line
    assert snapshot(tmp_path) == before and not drawn
    assert figures_cli("steps", d) == 0  # once is fine


def head_rows(d: Path, edit) -> None:
    """merge_weights.csv of ``d`` with ``edit`` applied to its query-head rows (a DataFrame → DataFrame)."""
    edit(pd.read_csv(d / "merge_weights.csv")).to_csv(d / "merge_weights.csv", index=False)


VL = "rows 16:32"  # head 1's slice in write_merge's 16-row heads
MERGE_DAMAGE = {  # what was drawn silently: a slice as a head it is not, a cell twice, a blank cell, a clipped one
    "uneven-slice": (lambda w: w.assign(slice=w["slice"].replace(VL, "rows 16:40")), "is not one head's rows"),
    "repeated-slice": (lambda w: pd.concat([w, w.iloc[[3]].assign(weight=0.99)]), "repeats rows 48:64"),
    "missing-head": (lambda w: w.drop(index=5), "no weight of layer 0 head 5"),
    "weight-above-1": (lambda w: w.assign(weight=w["weight"].where(w.index != 2, 2.0)), "weight 2 of a head slice"),
    "weight-empty": (lambda w: w.assign(weight=w["weight"].where(w.index != 2, np.nan)), "weight nan of a head slice"),
}


@pytest.mark.parametrize("case", list(MERGE_DAMAGE) + ["salience-run-of-other-heads"])
def test_merge_redraw_refuses_damaged_weights(case, tmp_path, capsys):
    d = write_merge(tmp_path / "m", 3)
    if case in MERGE_DAMAGE:
        edit, words = MERGE_DAMAGE[case]
        head_rows(d, edit)
    else:  # a salience run swept on another grid than the merge weighted: not the run it used
        run = Path(json.loads((d / "merge.json").read_text())["salience"]["runs"][0])
        h = pd.read_csv(run / "heads.csv")
        h[h["head"] < 4].to_csv(run / "heads.csv", index=False)
        words = "not the salience run this merge used"
    before = snapshot(tmp_path)
    line = one_error_line(figures_cli("merge", d), capsys.readouterr().err)
    assert words in line, line
    assert snapshot(tmp_path) == before


def assert_panels_are_runs(drawn, runs: list[Path]) -> None:
    """The merge figure's salience panels are, in order, each run's heads.csv KL pivoted to layer x head."""
    panels = [im.get_array() for ax in drawn["merge_heads"].axes for im in ax.get_images()
              if ax.get_title().startswith("its salience")]
    assert len(panels) == len(runs)
    for run, grid in zip(runs, panels):
        h = pd.read_csv(run / "heads.csv").pivot(index="layer", columns="head", values="kl")
        np.testing.assert_allclose(grid, h.to_numpy())


def test_merge_redraw_finds_relative_salience_runs_from_another_cwd(tmp_path, monkeypatch, drawn):
    """merge.json recorded the --salience runs as given: relative ones, redrawn from another cwd, were not found
    (or were other runs of that name). The resolved paths are recorded too; each panel is its run's heads.csv."""
    import torch
    from test_analyses_salience import write_run

    from analyses import merge, tiny

    zoo = tiny.build_zoo(tmp_path / "zoo")
    g = torch.Generator().manual_seed(0)
    monkeypatch.chdir(tmp_path)
    for k in range(3):
        write_run(Path(f"sal/e{k}"), torch.rand(2, 4, generator=g) * 3)
    assert cli_main(merge.main, ["--base", str(zoo["base"]), "--models", *(str(zoo[k]) for k in ("vl", "ov", "au")),
                                 "--method", "salience", "--salience", "sal/e0", "sal/e1", "sal/e2", "--quiet",
                                 "--out", "m"]) == 0
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sal" / "e0").mkdir(parents=True)  # a run of the same relative name there: not the one used
    monkeypatch.chdir(elsewhere)
    assert figures_cli("merge", tmp_path / "m") == 0
    assert_panels_are_runs(drawn, [tmp_path / "sal" / f"e{k}" for k in range(3)])


def merged_then_moved(tmp_path):
    """A salience merge of the tiny zoo over three seeded random salience runs, laid out as analyses.replicate lays
    them (run/heads/e<k>, run/merge/salience), then the whole folder moved (the original gone): the folder it is in
    now and the generator that drew the runs."""
    import torch
    from test_analyses_salience import write_run

    from analyses import merge, tiny

    zoo = tiny.build_zoo(tmp_path / "zoo")
    g = torch.Generator().manual_seed(0)
    run = tmp_path / "run"
    for k in range(3):
        write_run(run / "heads" / f"e{k}", torch.rand(2, 4, generator=g) * 3)
    assert cli_main(merge.main, ["--base", str(zoo["base"]), "--models", *(str(zoo[k]) for k in ("vl", "ov", "au")),
                                 "--method", "salience", "--salience", *(str(run / "heads" / f"e{k}") for k in range(3)),
                                 "--quiet", "--out", str(run / "merge" / "salience")]) == 0
    moved = tmp_path / "moved"
    run.rename(moved)
    return moved, g


def test_merge_redraw_finds_salience_runs_moved_with_it(tmp_path, monkeypatch, drawn):
    """A salience merge moved together with its runs (``cp -r``/``mv`` of an analyses.replicate run: merge/salience
    beside heads/) drew every panel "salience run not found": merge.json names the runs where they were. The merge
    records where it was too, and a run gone from there is found at its place relative to the merge. Oracle: each
    moved run's heads.csv, pivoted; the original folder is gone, so nothing else can have been read."""
    moved, _ = merged_then_moved(tmp_path)
    assert figures_cli("merge", moved / "merge" / "salience") == 0
    assert_panels_are_runs(drawn, [moved / "heads" / f"e{k}" for k in range(3)])


def test_a_copied_merge_draws_the_runs_copied_with_it_not_the_originals_swept_again(tmp_path, monkeypatch, drawn):
    """``cp -r A B`` of a run holding a salience merge and its runs, then A's runs swept again: B's merge drew A's
    runs (merge.json names them, and they exist), so ``figures merge B/...`` (and B's merge stage, which redraws
    it) was refused, "changed since the merge", though B's own copies are the runs the merge read. A merge no
    longer where it was now draws a run beside it (at its place relative to the merge) when that is the run it
    read (its fingerprint among the manifest's inputs). Oracle: the copy's runs' heads.csv."""
    import torch
    from test_analyses_salience import write_run

    copy, g = merged_then_moved(tmp_path)
    shutil.copytree(copy, tmp_path / "run")  # the original, where merge.json names the runs: copy is its copy
    shutil.rmtree(tmp_path / "run" / "heads" / "e1")
    write_run(tmp_path / "run" / "heads" / "e1", torch.rand(2, 4, generator=g) * 3 + 5)  # swept again
    assert figures_cli("merge", copy / "merge" / "salience") == 0
    assert_panels_are_runs(drawn, [copy / "heads" / f"e{k}" for k in range(3)])


def test_an_older_merge_moved_with_its_replicate_run_finds_its_runs_by_their_digests(tmp_path, monkeypatch, drawn):
    """A salience merge written before merge.json recorded where it was (no ``resolved_out``), moved with the
    analyses.replicate run it is in: every panel said "salience run not found". Such a merge is found its runs
    where analyses.replicate lays them (DIR/heads/<model>, DIR holding replicate.json) when each is the run the
    merge read: its fingerprint among the manifest's inputs. Oracles: the moved runs' heads.csv; a run swept again
    there (other saliences) is not the merge's, so it is drawn as not found, not as read."""
    import torch
    from test_analyses_salience import write_run

    moved, g = merged_then_moved(tmp_path)
    info = moved / "merge" / "salience" / "merge.json"
    saved = json.loads(info.read_text(encoding="utf-8"))
    del saved["salience"]["resolved_out"]  # an older merge
    info.write_text(json.dumps(saved), encoding="utf-8")
    assert figures_cli("merge", moved / "merge" / "salience") == 0  # not in a replicate run: nothing says where
    assert sum(t.get_text() == "salience run not found" for ax in drawn["merge_heads"].axes for t in ax.texts) == 3
    (moved / "replicate.json").write_text(json.dumps({"out": str(tmp_path / "run")}), encoding="utf-8")
    drawn.clear()
    assert figures_cli("merge", moved / "merge" / "salience") == 0
    assert_panels_are_runs(drawn, [moved / "heads" / f"e{k}" for k in range(3)])
    shutil.rmtree(moved / "heads" / "e1")
    write_run(moved / "heads" / "e1", torch.rand(2, 4, generator=g) * 3 + 5)  # not the run the merge read
    drawn.clear()
    assert figures_cli("merge", moved / "merge" / "salience") == 0
    assert sum(t.get_text() == "salience run not found" for ax in drawn["merge_heads"].axes for t in ax.texts) == 1
    assert len([ax for ax in drawn["merge_heads"].axes if ax.get_title().startswith("its salience")]) == 2


def test_merge_redraw_refuses_another_run_found_where_a_moved_run_would_be(tmp_path, monkeypatch, capsys, drawn):
    """``moved_run`` finds a run gone from where the merge read it at its place relative to the merge: a different
    run there (swept again, other saliences) must be refused as any changed run is, and with no manifest to hold it
    to the run read (deleted by hand) it is not drawn as if read. Oracle: the merge's own record of the runs it read
    (the manifest's inputs), and the panels of a run shown as missing (no image)."""
    import torch
    from test_analyses_salience import write_run

    from probe.results import MANIFEST

    moved, g = merged_then_moved(tmp_path)
    shutil.rmtree(moved / "heads" / "e1")
    write_run(moved / "heads" / "e1", torch.rand(2, 4, generator=g) * 3 + 5)  # not the run the merge read
    capsys.readouterr()
    assert figures_cli("merge", moved / "merge" / "salience") == 2
    assert "changed since the merge" in capsys.readouterr().err
    (moved / "merge" / "salience" / MANIFEST).unlink()  # nothing left to hold e1 to what was read
    drawn.clear()
    assert figures_cli("merge", moved / "merge" / "salience") == 0
    assert not [ax for ax in drawn["merge_heads"].axes if ax.get_title().startswith("its salience")]
    assert sum(t.get_text() == "salience run not found" for ax in drawn["merge_heads"].axes for t in ax.texts) == 3

def edit_cell(row: int, **cells):
    def edit(c: pd.DataFrame) -> pd.DataFrame:
        c = c.astype(object)
        for col, v in cells.items():
            c.loc[row, col] = v
        return c
    return edit


TRAJECTORY_DAMAGE = {  # each was drawn silently: a point left out, a t-SNE title over another map, a zigzag
    "nan-x": (edit_cell(1, x=np.nan), "x and y must be finite"),
    "inf-y": (edit_cell(1, y=np.inf), "x and y must be finite"),
    "unknown-kind": (edit_cell(1, kind="expert2"), "kind must be one of"),
    "unknown-method": (lambda c: c.assign(method=c["method"].replace("tsne", "umap")), "method must be pca or tsne"),
    "run-without-kind": (edit_cell(1, run="r0"), "a point of kind run names its run"),
    "fractional-step": (edit_cell(6, step=10.5), "whole number"),
    "point-twice": (lambda c: pd.concat([c, c.iloc[[2]]]), "repeats a point of the same map"),
    "step-twice": (lambda c: pd.concat([c, c.iloc[[6]].assign(name="r0@10-again")]), "repeats a step of its run"),
}


@pytest.mark.parametrize("case", list(TRAJECTORY_DAMAGE) + ["run.json-types"])
def test_trajectory_redraw_refuses_damaged_coords(case, tmp_path, capsys):
    from test_figures_page import write_trajectory

    d = write_trajectory(tmp_path, ["r0", "r1"])
    if case in TRAJECTORY_DAMAGE:
        edit, words = TRAJECTORY_DAMAGE[case]
        edit(pd.read_csv(d / "coords.csv", keep_default_na=False)).to_csv(d / "coords.csv", index=False)
    else:  # a traceback formatting the perplexity
        (d / "run.json").write_text(json.dumps({"perplexity_used": "5"}))
        words = "run.json: perplexity_used"
    before = snapshot(tmp_path)
    line = one_error_line(figures_cli("trajectory", d), capsys.readouterr().err)
    assert words in line, line
    assert snapshot(tmp_path) == before


def test_trajectory_redraws_an_output_from_before_run_json_listed_its_maps(tmp_path, capsys):
    """run.json without ``maps`` (written before it had them): PCA must be whole, t-SNE whole or absent (skipped
    then), read from coords.csv alone, never from the words of the t-SNE note."""
    from test_figures_page import write_trajectory

    d = write_trajectory(tmp_path, ["r0"])
    info = json.loads((d / "run.json").read_text())
    del info["maps"]
    (d / "run.json").write_text(json.dumps({**info, "tsne": "some other wording"}))
    c = pd.read_csv(d / "coords.csv", keep_default_na=False)
    c[c["method"] == "pca"].to_csv(d / "coords.csv", index=False)
    assert figures_cli("trajectory", d) == 0
    c[(c["method"] == "pca") & (c.index % 7 != 3)].to_csv(d / "coords.csv", index=False)  # a point lost
    assert "where run.json records 10" in one_error_line(figures_cli("trajectory", d), capsys.readouterr().err)


def test_trajectory_draws_coords_and_runs_in_step_order_apart_from_merged(tmp_path, drawn):
    """Points and arrows read back from the figure equal coords.csv, each run's line in step order; the second run
    was drawn in C3, the merged models' red (and a ninth run in the experts' blue)."""
    from matplotlib.colors import to_rgba
    from test_figures_page import write_trajectory

    from figures.trajectory import STYLE

    runs = [f"r{k}" for k in range(9)]
    d = write_trajectory(tmp_path, runs)
    c = pd.read_csv(d / "coords.csv", keep_default_na=False).sample(frac=1, random_state=0)  # rows in any order
    c.to_csv(d / "coords.csv", index=False)
    assert figures_cli("trajectory", d) == 0
    for feature in ("norms", "sketch"):
        for ax in drawn[f"trajectory_{feature}"].axes:
            method = "pca" if ax.get_title().startswith("PCA") else "tsne"
            sub = c[(c["feature"] == feature) & (c["method"] == method)]
            for coll in ax.collections:
                if coll.get_label() in ("base", "expert", "merged"):
                    want = sub[sub["kind"] == coll.get_label()][["x", "y"]].to_numpy(float)
                    np.testing.assert_allclose(coll.get_offsets(), want)
            lines = {ln.get_label().removeprefix("run "): ln for ln in ax.lines}
            assert sorted(lines) == runs
            for run, ln in lines.items():
                r = sub[sub["run"] == run].assign(step=lambda t: t["step"].astype(float)).sort_values("step")
                np.testing.assert_allclose(np.c_[ln.get_xdata(), ln.get_ydata()], r[["x", "y"]].to_numpy(float))
                assert to_rgba(ln.get_color()) not in {to_rgba(STYLE[k][2]) for k in ("expert", "merged")}


SHIFT_DAMAGE = {  # a cell drawn as another layer's, a crash on an infinite one, a tensor averaged in twice
    "fractional-layer": (edit_cell(2, layer=1.5), "layer must be a whole number"),
    "negative-layer": (edit_cell(2, layer=-1), "layer must be a whole number"),
    "empty-delta": (edit_cell(2, delta_avg=np.nan), "delta_avg must be a finite number"),
    "infinite-delta": (edit_cell(2, delta_avg=np.inf), "delta_avg must be a finite number"),
    "tensor-twice": (lambda c: pd.concat([c, c.iloc[[2]].assign(delta_avg=0.5)]), "repeats a tensor of its model"),
}


@pytest.mark.parametrize("case", list(SHIFT_DAMAGE))
def test_shift_redraw_refuses_damaged_rows(case, tmp_path, capsys):
    d = write_shift(tmp_path, ["vl", "video"], 3, ["self_attn.q_proj.weight", "mlp.up_proj.weight"])
    edit, words = SHIFT_DAMAGE[case]
    edit(pd.read_csv(d / "shift.csv")).to_csv(d / "shift.csv", index=False)
    before = snapshot(tmp_path)
    line = one_error_line(figures_cli("shift", d), capsys.readouterr().err)
    assert words in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case, cells, words", [
    ("outside-interval", {"accuracy": 0.99}, "accuracy 0.99 with interval"),  # 'xerr' must not be negative: traceback
    ("no-value", {"accuracy": np.nan}, "accuracy nan with interval"),  # the model's point silently left out
])
def test_eval_redraw_refuses_a_point_outside_its_interval(case, cells, words, tmp_path, capsys):
    d = write_scores(tmp_path, ["ft/checkpoint-0", "ft/checkpoint-10"], ["text", "image"])
    s = pd.read_csv(d / "scores.csv", keep_default_na=False, na_values=[""])
    edit_cell(3, **cells)(s).to_csv(d / "scores.csv", index=False)  # checkpoint-10 on image, 64 items
    for kind in ("eval", "steps"):
        before = snapshot(tmp_path)
        line = one_error_line(figures_cli(kind, d), capsys.readouterr().err)
        assert words in line, line
        assert snapshot(tmp_path) == before


def test_heads_redraw_refuses_a_sweep_with_a_head_lost(tmp_path, capsys, drawn):
    """A heads.csv with one row cut out was drawn with that cell blank, as if the head had no value. Before the cut,
    every heatmap equals heads.csv pivoted (layers down, heads across, accuracies in %)."""
    from test_figures_page import write_heads

    d = write_heads(tmp_path / "h", 3, 4)
    assert figures_cli("heads", d) == 0
    h = pd.read_csv(d / "heads.csv")
    for metric, scale in (("accuracy", 100), ("prob_accuracy", 100), ("kl", 1)):
        ax = drawn[f"heatmap_{metric}"].axes[0]
        np.testing.assert_allclose(ax.get_images()[0].get_array(),
                                   scale * h.pivot(index="layer", columns="head", values=metric).to_numpy())
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    h.drop(index=5).to_csv(d / "heads.csv", index=False)
    before = snapshot(tmp_path)
    line = one_error_line(figures_cli("heads", d), capsys.readouterr().err)
    assert "no row for layer 1 head 1" in line, line
    assert snapshot(tmp_path) == before


def overlapping(texts: list) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts whose boxes overlap on the figure as laid out."""
    shown = [t for t in texts if t.get_visible() and t.get_text()]
    if not shown:
        return []
    fig = shown[0].figure
    if not hasattr(fig.canvas, "get_renderer"):  # a closed figure: measured on an Agg canvas of its own
        FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in shown]
    return [(shown[i].get_text(), shown[j].get_text()) for i in range(len(shown)) for j in range(i)
            if boxes[i].overlaps(boxes[j])]


def test_steps_of_a_long_run_keep_their_labels_apart(tmp_path, drawn):
    """A real schedule (…, 1000, 3000, 5000) put 3000 and 5000 on a symmetric-log axis a few points apart: their
    labels ran together as "30005000". Crowded labels are now left out, the last step always shown."""
    steps = [0, 10, 30, 100, 300, 1000, 3000, 5000]
    write_scores(tmp_path / "run", [f"ft/checkpoint-{s}" for s in steps], ["mmlu", "mmmu"])
    assert figures_cli("steps", tmp_path / "run") == 0
    ax = drawn["steps"].axes[0]
    drawn["steps"].draw_without_rendering()
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert overlapping(labels) == []
    assert labels[0].get_text() == "0" and labels[-1].get_text() == "5000"
    assert len(labels) >= 6  # only the crowded ones go
    assert all(t.get_fontsize() == 7 for t in labels)


def test_trajectory_labels_of_points_close_together_stay_apart(tmp_path, drawn):
    """A real 7B map puts the base, the experts it barely moved and the merges within a few points of each other,
    and the runs' last checkpoints side by side: their names were printed over one another. Each label now keeps
    clear of the others, a moved one joined to its point by a thin line."""
    from test_figures_page import write_trajectory

    d = write_trajectory(tmp_path, ["text", "image", "video", "mixed"])
    c = pd.read_csv(d / "coords.csv", keep_default_na=False)
    marked = c["kind"] != "run"
    c.loc[marked, "x"] = 5 + 0.01 * np.arange(marked.sum())  # five models at one spot
    c.loc[marked, "y"] = 5.0
    c.to_csv(d / "coords.csv", index=False)
    assert figures_cli("trajectory", d) == 0
    for feature in ("norms", "sketch"):
        for ax in drawn[f"trajectory_{feature}"].axes:
            names = [t for t in ax.texts if t.get_text()]
            assert len(names) == 5 + 4  # each model and each run's last step is named
            assert overlapping(names) == []


def test_shift_values_of_models_that_shifted_alike_stay_apart(tmp_path, drawn):
    """LLaVA-Video and LLaVA-OneVision shift about alike (0.00076 and 0.0007 on a real 7B): their numbers, printed
    above the dots, ran into one another ("0.00076 (1.1×)0.0007 (1.0×)")."""
    models = ["Qwen/Qwen2-VL-7B-Instruct", "lmms-lab/LLaVA-Video-7B-Qwen2", "lmms-lab/llava-onevision-qwen2-7b-si"]
    d = write_shift(tmp_path, models, 28, ["self_attn.q_proj.weight", "mlp.up_proj.weight"])
    df = pd.read_csv(d / "shift.csv")
    df["delta_avg"] = df["model"].map(dict(zip(models, [0.0043, 0.00076, 0.0007])))
    df.to_csv(d / "shift.csv", index=False)
    assert figures_cli("shift", d) == 0
    ax = drawn["shift_models"].axes[0]
    values = [t for t in ax.texts if t.get_text()]
    assert len(values) == 3 and overlapping(values) == []


def test_merge_salience_scale_is_not_one_outlier_heads(tmp_path, drawn):
    """A real 7B salience run has one or two sink heads at nats and 780 heads at thousandths: the merge figure's
    salience panel spanned 0 to the outlier and painted every other head one colour. It now clips at the 99th
    percentile, as the head sweep's own heatmap does (figures.heads.kl_limit), the arrow on its colour bar saying
    so."""
    from figures.heads import kl_limit

    d = write_merge(tmp_path / "m", 2, layers=28, heads=28)
    run = Path(json.loads((d / "merge.json").read_text())["salience"]["runs"][0])
    h = pd.read_csv(run / "heads.csv")
    h.loc[3, "kl"] = 50.0  # one outlier
    h.to_csv(run / "heads.csv", index=False)
    assert figures_cli("merge", d) == 0
    [ax] = [a for a in drawn["merge_heads"].axes if a.get_title().startswith("its salience")]
    im = ax.get_images()[0]
    grid = np.asarray(im.get_array())
    assert grid.max() == 50.0
    assert im.norm.vmax == pytest.approx(kl_limit(grid)[0]) and im.norm.vmax < grid.max() / 10
    assert im.colorbar.extend == "max"
    past = int((grid > im.norm.vmax).sum())
    assert f"{past} past it, up to {grid.max():.3g}" in " ".join(im.colorbar.ax.get_ylabel().split())  # wrapped


@pytest.mark.parametrize("metric", ["kl", "prob_accuracy_drop"])
def test_merge_salience_panel_names_its_metric_and_unit_and_centres_a_drop(tmp_path, drawn, metric):
    """The salience panel was titled with heads.csv's column ("its salience (kl)"), and a merge weighted by an
    accuracy drop had a colour bar without unit and a sequential map, which painted a negative drop (removing the
    head helped) as a small harm. A drop is now drawn as Figure 2 draws it: in points, on a diverging map centred
    on 0; a KL as before, named and in nats."""
    from matplotlib.colors import to_rgba

    d = write_merge(tmp_path / "m", 2)
    info = json.loads((d / "merge.json").read_text(encoding="utf-8"))
    info["salience"]["metric"] = metric
    (d / "merge.json").write_text(json.dumps(info), encoding="utf-8")
    run = Path(info["salience"]["runs"][0])
    h = pd.read_csv(run / "heads.csv")
    h.loc[5, metric] = -0.05 if metric != "kl" else h.loc[5, metric]  # removing that head helped
    h.to_csv(run / "heads.csv", index=False)
    assert figures_cli("merge", d) == 0
    [ax] = [a for a in drawn["merge_heads"].axes if a.get_title().startswith("its salience")]
    im = ax.get_images()[0]
    want = h.pivot(index="layer", columns="head", values=metric).to_numpy()
    label = " ".join(im.colorbar.ax.get_ylabel().split())
    if metric == "kl":
        assert ax.get_title() == "its salience (KL)" and label.startswith("KL [nats]")
        np.testing.assert_allclose(im.get_array(), want)
        assert im.norm.vmin == 0.0
    else:
        assert ax.get_title() == "its salience (prob. accuracy drop)"
        assert label.startswith("prob. accuracy drop [points]")
        np.testing.assert_allclose(im.get_array(), 100 * want)
        assert im.norm.vmin == pytest.approx(-im.norm.vmax) and im.norm.vmax >= 100 * want.max() - 1e-9
        # the head that helped is blue, the others red, no change white
        assert to_rgba(im.cmap(im.norm(-5.0)))[2] > to_rgba(im.cmap(im.norm(-5.0)))[0]
        assert to_rgba(im.cmap(im.norm(im.get_array()[0, 0])))[0] > to_rgba(im.cmap(im.norm(im.get_array()[0, 0])))[2]


def test_accuracy_heatmap_scale_is_not_one_collapsing_head(tmp_path, drawn):
    """On a 7B grid (28 × 28) two heads whose removal collapses accuracy by 40 points set the centred scale to
    ±40, so the other heads' 0-4 point drops were all near white. The scale now stops at the 99th percentile of
    the distances from the baseline (computed here with numpy on the CSV), with arrows on the colour bar; small
    grids still show every value."""
    from test_figures_page import write_heads

    d = write_heads(tmp_path / "h", 28, 28)
    h = pd.read_csv(d / "heads.csv")
    base = json.loads((d / "baseline.json").read_text())["accuracy"]
    rng = np.random.default_rng(0)
    h["accuracy"] = base - rng.uniform(0, 0.04, len(h))
    h.loc[[5, 400], "accuracy"] = base - 0.4
    h["accuracy_drop"] = base - h["accuracy"]
    h.to_csv(d / "heads.csv", index=False)
    assert figures_cli("heads", d) == 0
    im = drawn["heatmap_accuracy"].axes[0].get_images()[0]
    dist = np.abs(100 * h["accuracy"].to_numpy() - 100 * base)
    half = np.percentile(dist, 99)
    assert im.norm.vmin == pytest.approx(100 * base - half) and im.norm.vmax == pytest.approx(100 * base + half)
    assert half < 5 and im.colorbar.extend == "min"
    label = im.colorbar.ax.get_ylabel()  # what the clip hides is named: how many heads, and how far the worst goes
    assert "clipped at the 99th percentile" in label and f"{(dist > half).sum()} past it, up to {100 * base - 40:.1f} %" in label
    small = write_heads(tmp_path / "s", 3, 4)  # 12 heads: every value inside the scale, no arrow
    assert figures_cli("heads", small) == 0
    im = drawn["heatmap_accuracy"].axes[0].get_images()[0]
    assert im.colorbar.extend == "neither"


@pytest.mark.parametrize("models", [["a", "b", "c"], ["Qwen/Qwen2-VL-7B-Instruct", "lmms-lab/LLaVA-Video-7B-Qwen2",
                                                    "lmms-lab/llava-onevision-qwen2-7b-si"]])
def test_shift_by_depth_legend_covers_no_line(tmp_path, drawn, models):
    """The per-layer panel's legend sat inside it ('best'), and with 28 layers of noisy curves there was no empty
    corner: it covered lines. It now sits below the panel, inside the figure."""
    d = write_shift(tmp_path, models, 28, ["self_attn.q_proj.weight", "mlp.up_proj.weight"])
    assert figures_cli("shift", d) == 0
    fig = drawn["shift_models"]
    ax = fig.axes[1]
    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig).get_renderer()
    box, panel, page = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer), fig.bbox
    assert box.y1 <= panel.y0 and not box.overlaps(panel)  # below the panel's plotting area
    assert box.x0 >= page.x0 and box.x1 <= page.x1 and box.y0 >= page.y0  # and inside the saved page
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [m.rsplit("/", 1)[-1] for m in models]


def test_shift_of_a_model_that_did_not_move_is_drawn(tmp_path, drawn):
    """A model whose LM was frozen (Δavg 0 on every tensor) vanished from the log-scale model panel (no dot, no
    number) and from the per-layer panel, and its heatmap was blank, as for a missing tensor; a frozen layer of a
    moved model left a gap. Zeros are now drawn at the foot of each log axis, marked, and grey on the heatmaps."""
    models = ["vl", "frozen", "ov"]
    d = write_shift(tmp_path, models, 4, ["self_attn.q_proj.weight", "mlp.up_proj.weight"])
    df = pd.read_csv(d / "shift.csv")
    df.loc[df["model"] == "frozen", "delta_avg"] = 0.0
    df.loc[(df["model"] == "vl") & (df["layer"] == 1), "delta_avg"] = 0.0  # one frozen layer of a moved model
    df.to_csv(d / "shift.csv", index=False)
    assert figures_cli("shift", d) == 0
    ax1, ax2 = drawn["shift_models"].axes[:2]
    means = df.groupby("model")["delta_avg"].mean()
    lo, hi = ax1.get_ylim()
    for i, m in enumerate(models):  # every model has a dot inside the panel; a moved one at its mean
        ys = [y for line in ax1.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata()) if x == i]
        assert len(ys) == 1 and lo < ys[0] < hi
        if means[m] > 0:
            assert ys[0] == pytest.approx(means[m])
    assert any(t.get_text().startswith("0") for t in ax1.texts)  # the frozen model's number says 0
    lo, hi = ax2.get_ylim()
    layer_means = df.dropna(subset=["layer"]).groupby(["model", "layer"])["delta_avg"].mean()
    for line in ax2.get_lines():
        if line.get_label() not in models:
            continue
        m = line.get_label()
        xs, ys = line.get_xdata(), line.get_ydata()
        assert list(xs) == list(layer_means[m].index) and all(lo < y < hi for y in ys)  # no layer dropped
        for x, y in zip(xs, ys):
            if layer_means[m, x] > 0:
                assert y == pytest.approx(layer_means[m, x])
    for m in ("frozen", "vl"):  # zero cells grey (the colour map's under colour), not blank like a missing one
        im = drawn[f"shift_heatmap_{m}"].axes[0].get_images()[0]
        grid = df[(df["model"] == m) & df["layer"].notna()].pivot_table(index="layer", columns="module",
                                                                          values="delta_avg")
        rgba = im.to_rgba(im.get_array())
        under, bad = im.cmap.get_under(), im.cmap.get_bad()
        assert tuple(under) != tuple(bad) and under[3] > 0
        zero = grid.to_numpy() == 0
        assert zero.any() and np.allclose(rgba[zero], under)
        assert not np.allclose(rgba[~zero], under, atol=1e-3) if (~zero).any() else True


def cut_half(path: Path) -> None:
    """``path`` cut at half its bytes, back to its last whole line (as a copy cut off leaves it; a line cut in
    two is a missing cell, refused anyway)."""
    data = path.read_bytes()
    path.write_bytes(data[:data.rindex(b"\n", 0, len(data) // 2) + 1])


def drop_line(k: int):
    """``path`` without its line ``k`` (0: the header; -1: the last)."""
    def edit(path: Path) -> None:
        lines = path.read_text().splitlines(keepends=True)
        del lines[k]
        path.write_text("".join(lines))
    return edit


def set_cell(row: int, col: str, value: str):
    """``path``'s CSV with the cell of data row ``row``, column ``col`` rewritten as the text ``value``."""
    def edit(path: Path) -> None:
        lines = path.read_text().splitlines()
        i = lines[0].split(",").index(col)
        cells = lines[row + 1].split(",")
        cells[i] = value
        lines[row + 1] = ",".join(cells)
        path.write_text("\n".join(lines) + "\n")
    return edit


def drop_column(col: str):
    return lambda path: pd.read_csv(path).drop(columns=[col]).to_csv(path, index=False)


def eval_with_subjects(d: Path) -> Path:
    """write_scores' scores.csv with p_answer and its interval, and a subject row under each 'all' row (probe.eval
    writes both): 'all' then totals its subjects."""
    write_scores(d, ["a", "b"], ["text", "image"])
    s = pd.read_csv(d / "scores.csv", keep_default_na=False, na_values=[""])
    s = s.assign(p_answer=s["prob_accuracy"], p_answer_lo=s["prob_accuracy_lo"], p_answer_hi=s["prob_accuracy_hi"])
    s = pd.concat([s, s.assign(subject="s1")], ignore_index=True)
    s.to_csv(d / "scores.csv", index=False)
    return d


def write_heads_dir(d: Path) -> Path:
    from test_figures_page import write_heads

    return write_heads(d, 3, 4)


def write_trajectory_dir(d: Path) -> Path:
    from test_figures_page import write_trajectory

    return write_trajectory(d, ["r0", "r1"])


def write_shift_dir(d: Path) -> Path:
    return write_shift(d, ["vl", "video"], 3, ["self_attn.q_proj.weight", "mlp.up_proj.weight"])


def merge_json(**changes):
    def edit(path: Path) -> None:
        info = json.loads((path.parent / "merge.json").read_text())
        for k, v in changes.items():
            info.pop(k) if v is None else info.__setitem__(k, v)
        (path.parent / "merge.json").write_text(json.dumps(info))
    return edit


# kind → (build, file edited); case → (kind, edit of that file, words of the error). Each was drawn silently
# (or a traceback): a blank or clipped cell from a NaN, an inf or a cut file, a stale map beside new ones
DAMAGE_BUILD = {"heads": (write_heads_dir, "heads.csv"), "eval": (eval_with_subjects, "scores.csv"),
                "shift": (write_shift_dir, "shift.csv"), "trajectory": (write_trajectory_dir, "coords.csv"),
                "merge": (lambda d: write_merge(d, 3), "merge_weights.csv"),
                # a merge written before 2026-12-06 (one alpha column, mean_alpha): refused as it was then
                "merge-legacy": (lambda d: write_merge(d, 3, legacy=True), "merge_weights.csv")}
EMBED_BASE = -3  # write_merge's last rows: embed_tokens.weight of the base, then of each expert
DAMAGE = {
    "heads-kl-nan": ("heads", set_cell(1, "kl", "nan"), "column kl must hold a finite number"),
    "heads-kl-inf": ("heads", set_cell(1, "kl", "inf"), "column kl must hold a finite number on every row"),
    "heads-kl-empty": ("heads", set_cell(1, "kl", ""), "line 3 has no number"),
    "heads-drop-nan": ("heads", set_cell(0, "prob_accuracy_drop", "nan"), "column prob_accuracy_drop"),
    "heads-kl-column-gone": ("heads", drop_column("kl"), "missing column kl"),
    "eval-p-answer-nan": ("eval", set_cell(0, "p_answer", "nan"), "line 2: p_answer nan"),
    "eval-all-not-its-subjects": ("eval", set_cell(0, "n_items", "999"), "subjects' rows add up to 64"),
    # the note is what says a model was scored on part of a set ("24 of 64 items ..."): without it eval.png drew that
    # model's dot filled, as scored on the whole set, with no "k of n" (exit 0)
    "eval-note-column-gone": ("eval", drop_column("note"), "missing column note"),
    "eval-accuracy-hi-column-gone": ("eval", drop_column("accuracy_hi"), "missing column accuracy_hi"),
    "shift-model-empty": ("shift", set_cell(0, "model", ""), "line 2: empty model"),
    "shift-numel-negative": ("shift", set_cell(0, "numel", "-5"), "column numel must hold whole numbers"),
    "shift-numel-zero": ("shift", set_cell(0, "numel", "0"), "line 2: numel must be a whole number > 0"),
    "shift-row-lost": ("shift", drop_line(3), "summary.json records 7 of"),
    "shift-cut": ("shift", cut_half, "summary.json records"),
    "trajectory-point-lost": ("trajectory", drop_line(3), "run.json records 15"),
    "trajectory-cut": ("trajectory", cut_half, "where run.json records 15"),
    # a whole map gone (t-SNE of sketch) or one run.json never recorded: the check read the words of its t-SNE note
    "trajectory-map-gone": ("trajectory", lambda p: p.write_text("".join(
        line for line in p.read_text().splitlines(keepends=True) if ",sketch,tsne," not in line)),
        "0 points on the tsne map of sketch"),
    "trajectory-map-unrecorded": ("trajectory", lambda p: (p.parent / "run.json").write_text(json.dumps(
        {**json.loads((p.parent / "run.json").read_text()), "maps": {"norms": ["pca"], "sketch": ["pca", "tsne"]}})),
        "a tsne map of norms, which run.json does not record"),
    "merge-weight-nan": ("merge", set_cell(EMBED_BASE, "weight", "nan"), "weight must be a finite number"),
    "merge-weight-inf": ("merge", set_cell(EMBED_BASE, "weight", "inf"), "weight must be a finite number"),
    "merge-weight-empty": ("merge", set_cell(EMBED_BASE, "weight", ""), "weight must be a finite number"),
    "merge-weight-negative": ("merge", set_cell(EMBED_BASE, "weight", "-0.3"), "must be a weight in [0, 1]"),
    "merge-weight-2.5": ("merge", set_cell(EMBED_BASE, "weight", "2.5"), "must be a weight in [0, 1]"),
    "merge-not-summing-to-1": ("merge", set_cell(EMBED_BASE, "weight", "0.1"), "do not sum to 1"),
    # a second meaning in a salience merge's rows: ties' trim threshold beside its weight
    "merge-threshold-of-salience": ("merge", set_cell(EMBED_BASE, "trim_threshold", "0.01"),
                                    "its trim_threshold must be empty"),
    "merge-weight-column-gone": ("merge", drop_column("weight"), "missing column weight"),
    "merge-ghost-model": ("merge", set_cell(EMBED_BASE, "model", "ghost"), "not one of the merge's"),
    "merge-row-twice": ("merge", lambda p: p.write_text(p.read_text() + p.read_text().splitlines()[-1] + "\n"),
                        "repeats a model's weight"),
    "merge-row-lost": ("merge", drop_line(-1), "lacks a row of one of the 3 participants"),
    "merge-slice-lost": ("merge", lambda p: [drop_line(-1)(p) for _ in range(3)], "merge.json records"),
    "merge-method-gone": ("merge", merge_json(method=None), "merge.json: method None is not one of"),
    "merge-method-bogus": ("merge", merge_json(method="running"), "method 'running' is not one of"),
    "merge-mean-weight-edited": ("merge", merge_json(mean_weight={"x": 0.5}), "merge.json records 5 and mean_weight"),
    # one file of each age: the files of two merges
    "merge-new-weights-old-json": ("merge", merge_json(mean_alpha={"x": 0.5}, mean_weight=None,
                                                       mean_trim_threshold=None),
                                   "merge.json is as analyses.merge wrote it before 2026-12-06"),
    "merge-old-weights-new-json": ("merge-legacy", merge_json(mean_alpha=None, mean_weight={"x": 0.5}),
                                   "merge_weights.csv is as analyses.merge wrote it before 2026-12-06"),
    "merge-legacy-alpha-nan": ("merge-legacy", set_cell(EMBED_BASE, "alpha", "nan"), "alpha must be a finite number"),
    "merge-legacy-alpha-2.5": ("merge-legacy", set_cell(EMBED_BASE, "alpha", "2.5"),
                               "alpha of a salience merge must be a weight in [0, 1]"),
    "merge-legacy-not-summing-to-1": ("merge-legacy", set_cell(EMBED_BASE, "alpha", "0.1"),
                                      "alphas of this tensor slice do not sum to 1"),
    "merge-legacy-row-lost": ("merge-legacy", drop_line(-1), "lacks a row of one of the 3 participants"),
    "merge-legacy-slice-lost": ("merge-legacy", lambda p: [drop_line(-1)(p) for _ in range(3)],
                                "merge.json records 5 and mean_alpha"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_redraw_refuses_damaged_or_cut_results(case, tmp_path, capsys):
    kind, edit, words = DAMAGE[case]
    build, name = DAMAGE_BUILD[kind]
    d = build(tmp_path / "r")
    edit(d / name)
    before = snapshot(tmp_path)
    line = one_error_line(figures_cli(kind.removesuffix("-legacy"), d), capsys.readouterr().err)
    assert words in line and str(d) in line, line
    assert snapshot(tmp_path) == before


def test_heads_without_generation_draws_and_leaves_no_stale_accuracy_map(tmp_path, drawn):
    """A --no-generate sweep has accuracy and accuracy_drop empty throughout (baseline accuracy null): drawn, with
    no accuracy map, and none an earlier drawing left."""
    from test_figures_page import write_heads

    d = write_heads(tmp_path / "h", 3, 4)
    assert figures_cli("heads", d) == 0 and (d / "heatmap_accuracy.png").is_file()
    pd.read_csv(d / "heads.csv").assign(accuracy=np.nan, accuracy_drop=np.nan).to_csv(d / "heads.csv", index=False)
    info = json.loads((d / "baseline.json").read_text())
    (d / "baseline.json").write_text(json.dumps(info | {"accuracy": None}))
    drawn.clear()
    assert figures_cli("heads", d) == 0
    assert sorted(drawn) == ["heatmap_kl", "heatmap_prob_accuracy"]
    assert not list(d.glob("heatmap_accuracy.*"))


def test_a_killed_redraws_temp_files_go_with_the_next_redraw(tmp_path):
    """A redraw killed mid-save left its '.heatmap_kl.png.PID-HOST.xxx.tmp' in the result dir for good (a rerun
    of the redraw drew every figure and exited 0 beside it); a live writer's is kept."""
    import subprocess

    from test_figures_page import write_heads

    from probe.results import writer_tag

    d = write_heads(tmp_path / "h", 3, 4)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = d / f".heatmap_kl.png.{gone.pid}-{writer_tag().split('-')[1]}.k1ll3d.tmp"
    live = d / f".heatmap_kl.pdf.{writer_tag()}.l1ve.tmp"
    dead.write_bytes(b"half a png")
    live.write_bytes(b"")
    assert figures_cli("heads", d) == 0
    assert not dead.exists() and live.exists() and (d / "heatmap_kl.png").is_file()


def test_a_score_of_0_or_100_is_drawn_with_its_exact_interval(tmp_path, drawn):
    """A fine-tuned SmolLM2-135M checkpoint that answered B everywhere scored 0 of 16: its bootstrap interval has zero
    width, and eval.png and steps.png drew a certain 0 % where table.md marks † and scores.csv's note gives the exact
    Clopper-Pearson [0.0, 20.6]. The figures now draw that interval."""
    from test_figures_page import SCORE_COLUMNS

    from probe.stats import all_alike_interval

    rows = [["ft/checkpoint-0", "text", "all", 16, 0.4375, 0.1875, 0.6875, 0.4375, 0.1875, 0.6875, ""],
            ["ft/checkpoint-4", "text", "all", 16, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "all wrong"],
            ["ft/checkpoint-8", "text", "all", 16, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, "all right"]]
    d = tmp_path / "ft-eval"
    d.mkdir()
    pd.DataFrame(rows, columns=SCORE_COLUMNS).to_csv(d / "scores.csv", index=False)
    zero, full = all_alike_interval(16, False), all_alike_interval(16, True)
    assert figures_cli("eval", d) == 0
    ax = drawn["eval"].axes[0]
    spans = sorted(x for c in ax.collections for seg in c.get_segments() for x in sorted(seg[:, 0]))
    assert spans == pytest.approx(sorted([0.0, 100 * zero[1], 18.75, 68.75, 100 * full[0], 100.0]))
    # the title, which says the intervals are bootstrap ones, names the exact ones drawn beside them
    assert "exact Clopper-Pearson at 0 % and 100 %" in drawn["eval"].get_suptitle()
    pd.DataFrame(rows[:1], columns=SCORE_COLUMNS).to_csv(d / "scores.csv", index=False)
    assert figures_cli("eval", d) == 0
    assert drawn["eval"].get_suptitle() == "Evaluation, 95 % bootstrap intervals"
    pd.DataFrame(rows, columns=SCORE_COLUMNS).to_csv(d / "scores.csv", index=False)
    assert figures_cli("steps", d) == 0
    [band] = [c for c in drawn["steps"].axes[0].collections if len(c.get_paths())]
    v = band.get_paths()[0].vertices
    assert v[v[:, 0] == 4, 1].max() == pytest.approx(100 * zero[1])
    assert v[v[:, 0] == 8, 1].min() == pytest.approx(100 * full[0])


def test_a_partly_scored_models_count_stays_inside_its_panel(tmp_path, monkeypatch):
    """A model scored on part of a set gets "k of n" over its dot, centred: at 0 % or 100 % it ran across the panel's
    frame, and tight_layout, making room for it, shrank every panel (0.96 in to 0.42 in at 9 sets, 1.83 to 1.36 in
    at 6). Each count now lies inside its panel, beside its own dot, and the panels are as wide as when every model
    is fully scored (the oracle: the same page with no model partly scored)."""
    import matplotlib.pyplot as plt
    from test_figures_page import SCORE_COLUMNS

    import figures.eval as fe

    figs: list[Figure] = []
    monkeypatch.setattr(fe, "save_png_pdf", lambda fig, *a: figs.append(fig) or [])  # laid out, not written
    sets, values = [f"set{j}" for j in range(6)], [1.0, 0.0, 0.5, 0.97]

    def draw(part: bool) -> Figure:
        rows = [[f"model-{i}", s, "all", 1234 if part and i % 2 == 0 else 12032, v, v, v, v, v, v,
                 "10798 of 12032 items not applicable: …" if part and i % 2 == 0 else ""]
                for i in range(4) for j, s in enumerate(sets) for v in [values[(i + j) % 4]]]
        d = tmp_path / f"part{part}"
        d.mkdir()
        pd.DataFrame(rows, columns=SCORE_COLUMNS).to_csv(d / "scores.csv", index=False)
        fe.draw_eval(d)
        return figs[-1]

    whole, fig = draw(False), draw(True)
    assert [ax.get_position().bounds for ax in fig.axes] == [ax.get_position().bounds for ax in whole.axes]
    renderer = fig.canvas.get_renderer()
    counts = 0
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        dots = {round(c.lines[0].get_ydata()[0]): c.lines[0] for c in ax.containers}  # row → its dot
        for t in ax.texts:
            assert t.get_text() == "1234 of 12032" and t.get_fontsize() >= 7
            box = t.get_window_extent(renderer)
            assert frame.x0 < box.x0 and box.x1 < frame.x1 and frame.y0 < box.y0 and box.y1 < frame.y1, t.xyann
            dot = ax.transData.transform((dots[round(t.xy[1])].get_xdata()[0], t.xy[1]))
            assert box.x0 <= dot[0] <= box.x1 and abs((box.y0 + box.y1) / 2 - dot[1]) < 25  # over or under its dot
            counts += 1
    assert counts == 2 * len(sets)  # models 0 and 2 on every set
    plt.close("all")


def visible_texts(fig: Figure) -> list:
    """Every piece of text a figure shows (titles, labels, tick labels, legend entries, numbers beside points)."""
    from matplotlib.text import Text

    fig.draw_without_rendering()  # tick labels as the layout places them
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def test_shift_and_trajectory_text_is_7_to_9_pt_like_every_other_figure(tmp_path, drawn):
    """The shift and trajectory figures drew their axis labels, tick labels and colour bar at matplotlib's 10 pt
    default beside 7-9 pt titles, while the heatmaps, evaluation, steps and merge figures (and the README's "7-9 pt
    text") use 7-8 pt: in a paper the two kinds of figure looked set in different sizes."""
    from test_figures_page import write_trajectory

    write_shift(tmp_path / "s", ["organism-vl", "organism-ov-si"], 4, ["self_attn.q_proj.weight", "mlp.up_proj.weight"])
    assert figures_cli("shift", tmp_path / "s") == 0
    assert figures_cli("trajectory", write_trajectory(tmp_path / "t", ["text", "image"])) == 0
    names = ["shift_models", "shift_heatmap_organism-vl", "trajectory_norms", "trajectory_sketch"]
    for name in names:
        sizes = {t.get_text(): t.get_fontsize() for t in visible_texts(drawn[name])}
        assert sizes and all(7 <= s <= 9 for s in sizes.values()), (name, {t: s for t, s in sizes.items() if s > 9})


def test_shift_models_keep_their_colour_in_both_panels_and_in_the_evaluation(tmp_path, drawn):
    """The model panel drew every model's dot in one blue and the per-layer panel gave models matplotlib's colour
    cycle by position, so organism-ov-si was orange here and green in the evaluation figure of the same report,
    and organism-video green here. Both panels now use figures.name_colours, as eval.png does."""
    from matplotlib.colors import to_rgba

    from figures import name_colours

    models = ["organism-vl", "organism-ov-si", "organism-video"]
    write_shift(tmp_path, models, 4, ["self_attn.q_proj.weight", "mlp.up_proj.weight"])
    assert figures_cli("shift", tmp_path) == 0
    want = {m: to_rgba(c) for m, c in name_colours(models).items()}
    ax1, ax2 = drawn["shift_models"].axes[:2]
    dots = {round(ln.get_xdata()[0]): to_rgba(ln.get_color()) for ln in ax1.get_lines()}
    assert dots == {i: want[m] for i, m in enumerate(models)}
    assert {ln.get_label(): to_rgba(ln.get_color()) for ln in ax2.get_lines()} == want


def test_shift_by_depth_of_a_single_layer_has_whole_layer_ticks(tmp_path, drawn):
    """A shift over one layer (a model of one layer, or a one-layer slice) put the layer axis at -0.05 ... 0.05
    with ticks -0.050, -0.025, ... that ran into each other: no such layer exists."""
    write_shift(tmp_path, ["organism-vl"], 1, ["self_attn.q_proj.weight"])
    assert figures_cli("shift", tmp_path) == 0
    ax2 = drawn["shift_models"].axes[1]
    lo, hi = ax2.get_xlim()
    ticks = [t for t in ax2.get_xticks() if lo <= t <= hi]
    assert 0 in ticks and len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


def test_trajectory_legend_sits_below_the_maps(tmp_path, drawn):
    """Each map had its own legend placed 'best', which avoids points but not the names printed beside them: on a
    t-SNE map it covered an expert's name. One legend for the figure now sits below both maps, inside the page,
    with every run and kind of model once."""
    from test_figures_page import write_trajectory

    assert figures_cli("trajectory", write_trajectory(tmp_path, ["text", "image", "video", "mixed"])) == 0
    for feature in ("norms", "sketch"):
        fig = drawn[f"trajectory_{feature}"]
        renderer = FigureCanvasAgg(fig).get_renderer()  # the figure was closed after saving: a canvas to measure on
        fig.draw_without_rendering()
        assert all(ax.get_legend() is None for ax in fig.axes)
        [legend] = fig.legends
        box = legend.get_window_extent(renderer)
        assert all(box.y1 <= ax.get_tightbbox(renderer).y0 for ax in fig.axes)  # below the maps and their labels
        assert box.y0 >= fig.bbox.y0 and box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1
        assert [t.get_text() for t in legend.get_texts()] == [
            "run text", "run image", "run video", "run mixed", "base", "expert", "merged"]


def test_a_head_sweep_where_no_head_moved_anything_has_a_readable_kl_scale(tmp_path, drawn):
    """Every KL 0 (a head slice that does not reach the answer, or a one-head sweep of a head that does nothing)
    gave a colour scale of 0 ... 1e-9 nats, its bar labelled '0.0 ... 1.0' under a '1e-9' multiplier. The scale now
    runs to 1 nat, in the heatmap, in Figure 2 and under a salience merge's KL maps alike (figures.heads.kl_limit)."""
    from test_figures_page import write_heads, write_replication

    from figures.heads import kl_limit
    from figures.report import draw_figure2

    assert kl_limit(np.zeros((2, 3))) == (1.0, False) and kl_limit(np.array([0.0, 0.25]))[0] == 0.25
    d = write_heads(tmp_path / "h", 1, 4)
    pd.read_csv(d / "heads.csv").assign(kl=0.0).to_csv(d / "heads.csv", index=False)
    assert figures_cli("heads", d) == 0
    im = drawn["heatmap_kl"].axes[0].get_images()[0]
    assert (im.norm.vmin, im.norm.vmax) == (0.0, 1.0) and im.colorbar.extend == "neither"
    assert not im.colorbar.ax.yaxis.get_offset_text().get_text()  # no ×1e-9 multiplier over the bar
    rep = write_replication(tmp_path / "rep", 0, layers=1, heads=1)
    pd.read_csv(tmp_path / "rep/heads/organism-base/heads.csv").assign(kl=0.0).to_csv(
        tmp_path / "rep/heads/organism-base/heads.csv", index=False)
    (tmp_path / "fig").mkdir()
    draw_figure2(rep, tmp_path / "fig" / "figure2.png")
    im = drawn["figure2"].axes[0].get_images()[0]
    assert (im.norm.vmin, im.norm.vmax) == (0.0, 1.0)


def test_steps_of_a_single_checkpoint_draw_its_interval(tmp_path, drawn):
    """A data set scored at one checkpoint only (one step evaluated, or the others not applicable) drew its point
    without an interval: the band of one step has no width. It is drawn as an error bar now; longer lines keep
    their band alone."""
    from test_figures_page import SCORE_COLUMNS

    rows = [["ft/checkpoint-10", "text", "all", 16, 0.5, 0.25, 0.75, 0.5, 0.25, 0.75, ""],
            ["ft/checkpoint-10", "image", "all", 16, 0.5, 0.25, 0.75, 0.5, 0.25, 0.75, ""],
            ["ft/checkpoint-20", "image", "all", 16, 0.625, 0.375, 0.875, 0.625, 0.375, 0.875, ""],
            ["ft/checkpoint-20", "text", "all", 0, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, "not applicable"]]
    d = tmp_path / "ft-eval"
    d.mkdir()
    pd.DataFrame(rows, columns=SCORE_COLUMNS).to_csv(d / "scores.csv", index=False)
    assert figures_cli("steps", d) == 0
    ax = drawn["steps"].axes[0]
    [bar] = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]  # text's one step; image has a band
    [segment] = bar.lines[2][0].get_segments()
    assert segment[:, 0].tolist() == [10, 10] and sorted(segment[:, 1]) == pytest.approx([25.0, 75.0])


def test_merge_weight_symbols_are_typeset(tmp_path, drawn):
    """The colour bars said 'merge weight w_i' and the base's panel 'α0', the symbols as typed in source code;
    they are typeset as w with subscript i and α with subscript 0 (mathtext), as a paper writes them."""
    assert figures_cli("merge", write_merge(tmp_path / "m", 3)) == 0
    fig = drawn["merge_heads"]
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert "merge weight $w_i$" in labels and not any("w_i" in l and "$" not in l for l in labels)
    assert any("$\\alpha_0$" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_steps_tell_the_run_from_the_data_set_it_is_scored_on(tmp_path, drawn):
    """The report's Figure 3 titled its panels 'text', 'image', ... (the runs, fine-tuned on those data) and named
    its lines 'text', 'image', ... (the data sets scored): a panel 'text' with a line 'text' read as one thing. The
    panels now say 'run …' (as Figure 4a's legend does) and the legend's title says the lines are what is scored."""
    runs = [write_scores(tmp_path / name, [f"ft/checkpoint-{s}" for s in (0, 10)], ["text", "image"], seed=k)
            for k, name in enumerate(["text", "image"])]
    assert figures_cli("steps", *runs) == 0
    fig = drawn["steps"]
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["run text", "run image"]
    [legend] = fig.legends
    assert legend.get_title().get_text() == "evaluated on"
    assert [t.get_text() for t in legend.get_texts()] == ["text", "image"]


def test_heatmap_cells_in_a_pdf_are_a_print_resolution_raster(tmp_path, drawn):
    """A PDF's text and lines are vector, but imshow's cells are a raster, which the PDF carried at the figure's
    110-150 dpi (Figure 2's 8 heads: 37 px a head), soft-edged when printed or zoomed. It is 300 dpi now."""
    from test_figures_page import write_heads

    from figures import PDF_DPI

    d = write_heads(tmp_path, 4, 8)
    assert figures_cli("heads", d) == 0
    fig = drawn["heatmap_kl"]
    ax = fig.axes[0]
    inches = ax.get_position().width * fig.get_figwidth()  # the heatmap's width on the page
    pdf = (d / "heatmap_kl.pdf").read_bytes()
    widths = [int(w) for w in re.findall(rb"/Subtype\s*/Image.{0,300}?/Width (\d+)", pdf, re.S)]
    assert PDF_DPI == 300 and max(widths) >= 0.95 * PDF_DPI * inches


def test_figures_draw_saved_results_without_importing_torch(tmp_path):
    """figures/ draws saved results only: ``python -m figures shift DIR`` imported torch (~2 s) through
    analyses.shift's shift.csv reader, and every kind through probe.results' import of probe.sweep (for two
    constants), figures heads through probe.metrics (for heads.csv's bounds), figures merge through analyses.merge
    (its check of merge_weights.csv reads the method table, now analyses.merge_methods). Each kind here is drawn in
    one fresh interpreter, which must end without torch in sys.modules and with the figure written. (``report``, which
    needs a whole analyses.replicate output: test_replicate's test_figures_report_rebuilds_it_from_saved_results.)"""
    import subprocess
    import sys

    from conftest import REPO
    from test_figures_page import write_heads, write_trajectory

    runs = {"eval": write_scores(tmp_path / "eval", ["organism-base", "organism-vl"], ["text", "image"]),
            "heads": write_heads(tmp_path / "heads", 4, 8),
            "shift": write_shift(tmp_path / "shift", ["organism-vl", "organism-ov"], 4, ["self_attn.q_proj.weight"]),
            "trajectory": write_trajectory(tmp_path / "traj", ["r1"]),
            "steps": write_scores(tmp_path / "steps", [f"ft/checkpoint-{s}" for s in (0, 10)], ["text"]),
            "merge": write_merge(tmp_path / "merge", 3)}
    written = {"eval": "eval.png", "heads": "heatmap_kl.png", "shift": "shift_models.png",
               "trajectory": "trajectory_sketch.png", "steps": "steps.png", "merge": "merge_heads.png"}
    script = ("import sys\nfrom figures.__main__ import main\nfrom probe.errors import cli_main\n"
              "for kind, d in zip(sys.argv[1::2], sys.argv[2::2]):\n"
              "    print(kind, cli_main(main, [kind, d]), 'torch' in sys.modules, flush=True)\n")
    r = subprocess.run([sys.executable, "-c", script, *(a for k, d in runs.items() for a in (k, str(d)))], cwd=REPO,
                       capture_output=True, text=True, encoding="utf-8", timeout=600)
    said = [ln for ln in r.stdout.splitlines() if ln.split(" ")[0] in runs]  # the rest: the paths each wrote
    assert said == [f"{k} 0 False" for k in runs], r.stdout + r.stderr
    for kind, d in runs.items():
        assert (d / written[kind]).is_file(), kind


def test_steps_of_a_run_without_generation_name_the_probability_accuracy_they_draw(tmp_path, drawn):
    """A --no-generate eval of checkpoints has no accuracy: its lines are the probability accuracy (eval's x label
    says so), but the y axis said 'accuracy [%]'. Each line equals the CSV's prob_accuracy in %; the axis names it,
    and a page mixing both metrics names each panel's in its title."""
    from test_figures_page import SCORE_COLUMNS

    def run(name: str, generate: bool) -> Path:
        rows = [[f"ft/checkpoint-{s}", "text", "all", 16, *([0.25 + s / 400] * 3 if generate else [np.nan] * 3),
                 0.5 - s / 400, 0.25, 0.75, ""] for s in (0, 10, 100)]
        (d := tmp_path / name).mkdir()
        pd.DataFrame(rows, columns=SCORE_COLUMNS).to_csv(d / "scores.csv", index=False)
        return d

    prob = run("prob", generate=False)
    assert figures_cli("steps", prob) == 0
    ax = drawn["steps"].axes[0]
    [line] = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), 100 * pd.read_csv(prob / "scores.csv")["prob_accuracy"])
    assert ax.get_ylabel().startswith("prob. accuracy [%]"), ax.get_ylabel()
    assert figures_cli("steps", run("gen", generate=True), prob) == 0
    axes = [ax for ax in drawn["steps"].axes if ax.get_visible()]
    assert axes[0].get_ylabel().startswith("accuracy or prob. accuracy [%]"), axes[0].get_ylabel()
    assert [ax.get_title() for ax in axes] == ["run gen (accuracy)", "run prob (prob. accuracy)"]


@pytest.mark.parametrize("layers,heads,metrics", [(1, 28, ("kl",)), (100, 1, ("accuracy",)), (4, 8, ("accuracy", "kl"))])
def test_heatmap_numbers_in_cells_fit_their_cells_or_are_left_out(tmp_path, monkeypatch, layers, heads, metrics):
    """Grids of up to 100 heads print each value in its cell, but a one-layer sweep of a 28-head model (--layers 0)
    has 0.19 in cells, and the KL map's '0.033' ran into its neighbours' ('0.0330.5401.826'), as did a single
    head's accuracies over 100 layers. Each number shown lies inside its cell and reads as the CSV's value (at the
    precision shown); where none fits, the cells go without numbers (the colour bar gives them) and the x-axis
    label says so (blank cells said nothing: they read as missing values). The organisms' 4 × 8 maps keep theirs. (Drawn, not saved: the layout is the one saved.)"""
    from test_figures_page import write_heads

    import figures.heads

    figs: list[Figure] = []
    monkeypatch.setattr(figures.heads, "save_figure", lambda fig, path: figs.append(fig))
    h, baseline = figures.heads.read_sweep(write_heads(tmp_path / "h", layers, heads))
    for metric in metrics:
        scale = 1 if metric == "kl" else 100
        figures.heads.draw_metric(h, baseline, metric, tmp_path / metric)
        fig = figs[-1]
        FigureCanvasAgg(fig).draw()
        ax = fig.axes[0]
        want = scale * h.pivot(index="layer", columns="head", values=metric).to_numpy()
        frame = ax.get_window_extent()
        cell_w, cell_h = frame.width / heads, frame.height / layers
        for t in ax.texts:
            x, y = t.get_position()
            box = t.get_window_extent()
            assert box.width < cell_w and box.height < cell_h, (t.get_text(), box, cell_w, cell_h)
            decimals = len(t.get_text().partition(".")[2])
            assert float(t.get_text()) == pytest.approx(want[round(y), round(x)], abs=0.51 * 10.0 ** -decimals)
        assert len(ax.texts) in (0, layers * heads)
        # numbers left out are said to be, under the map and on the page; a map that prints them says nothing
        label = ax.xaxis.label
        assert (figures.heads.CELLS_LEFT_OUT in label.get_text()) == (not ax.texts), (metric, label.get_text())
        assert fig.bbox.contains(*label.get_window_extent().p0) and fig.bbox.contains(*label.get_window_extent().p1)
        if (layers, heads) == (4, 8):  # as before: one decimal of a percentage, three of a KL
            assert [len(t.get_text().partition(".")[2]) for t in ax.texts] == [1 if scale == 100 else 3] * 32


def test_a_one_layer_heatmap_prints_its_numbers_turned_where_only_that_fits(tmp_path, monkeypatch):
    """A one-layer sweep of a 28-head model (--layers 0) has cells 0.19 in wide and about 2 in high: its KL numbers
    ("0.033") do not fit flat, and the map left them all out (saying so) though each fits turned 90°. They are now
    printed turned, each inside its cell (text extents as drawn), reading the CSV's value; the oracle for "not
    flat" is the same text measured at 0°."""
    from test_figures_page import write_heads

    import figures.heads

    figs: list[Figure] = []
    monkeypatch.setattr(figures.heads, "save_figure", lambda fig, path: figs.append(fig))
    h, baseline = figures.heads.read_sweep(write_heads(tmp_path / "h", 1, 28))
    figures.heads.draw_metric(h, baseline, "kl", tmp_path / "kl")
    fig = figs[-1]
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    frame = ax.get_window_extent()
    cell_w, cell_h = frame.width / 28, frame.height
    assert len(ax.texts) == 28 and figures.heads.CELLS_LEFT_OUT not in ax.get_xlabel()
    want = h.sort_values("head")["kl"].to_numpy()
    for t in ax.texts:
        box = t.get_window_extent()
        assert t.get_rotation() == 90 and box.width < cell_w and box.height < cell_h, (t.get_text(), box)
        x, y = t.get_position()
        assert abs(float(t.get_text()) - want[round(x)]) <= 0.51 * 10.0 ** -len(t.get_text().partition(".")[2])
    flat = ax.texts[0]
    flat.set_rotation(0)
    assert flat.get_window_extent().width > cell_w  # flat it would not fit: turned only where it must be


def test_eval_draws_each_rows_score_and_interval_one_model_all_wrong_and_long_named(tmp_path, drawn):
    """Oracle test (no behaviour change): one model, a name of 120 characters, all wrong on one set, not applicable
    on another, an extra column in scores.csv: eval.png draws the dot at scores.csv's accuracy, the all-wrong row
    with the exact Clopper-Pearson interval [0, 1 − 0.025^(1/n)] (the closed form, not probe.stats), and "n/a" for
    the set it cannot read."""
    from test_figures_page import SCORE_COLUMNS

    model = "runs/" + "a_very_long_folder_name_" * 4 + "/ft/checkpoint-20"
    rows = [[model, "text", "all", 16, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "all wrong"],
            [model, "mixed", "all", 40, 0.625, 0.475, 0.775, 0.6, 0.45, 0.75, ""],
            [model, "image", "all", 0, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, "not applicable: text LM"]]
    assert len(model) > 100
    pd.DataFrame([r + ["kept"] for r in rows], columns=SCORE_COLUMNS + ["extra"]).to_csv(tmp_path / "scores.csv",
                                                                                          index=False)
    assert figures_cli("eval", tmp_path) == 0
    want = {"text": (0.0, 0.0, 100 * (1 - 0.025 ** (1 / 16))), "mixed": (62.5, 47.5, 77.5)}
    got, na = {}, []
    for ax in drawn["eval"].axes:
        ds = ax.get_title().split(" (")[0].split("\n")[0]
        [label] = [t.get_text() for t in drawn["eval"].axes[0].get_yticklabels()]
        assert shows(label, model) and len(label) <= 41
        for c in (c for c in ax.containers if isinstance(c, ErrorbarContainer)):
            [seg] = c.lines[2][0].get_segments()
            got[ds] = (c.lines[0].get_xdata()[0], seg[:, 0].min(), seg[:, 0].max())
        na += [ds for t in ax.texts if t.get_text().startswith("n/a")]
    assert got.keys() == want.keys() and na == ["image"]
    for ds, (v, lo, hi) in want.items():
        assert got[ds] == pytest.approx((v, lo, hi)), ds


def test_steps_draw_checkpoints_in_step_order_whatever_their_order_as_text(tmp_path, drawn):
    """Oracle test (no behaviour change): checkpoints listed as a shell glob sorts them (checkpoint-0, -100, -1000,
    -20, -3: text order), one of them typed with a trailing slash, beside a model that is no checkpoint: the line
    runs through the steps in number order, each step at its own checkpoint's score and band (scores.csv, by hand)."""
    from test_figures_page import SCORE_COLUMNS

    scores = {0: 0.05, 100: 0.7, 1000: 0.9, 20: 0.3, 3: 0.1}
    rows = [[f"ft/checkpoint-{s}" + ("/" if s == 20 else ""), "text", "all", 20, v, max(v - 0.1, 0.0), v + 0.1,
             v, max(v - 0.1, 0.0), v + 0.1, ""] for s, v in scores.items()]
    rows.append(["organism-base", "text", "all", 20, 0.5, 0.4, 0.6, 0.5, 0.4, 0.6, ""])
    pd.DataFrame(rows, columns=SCORE_COLUMNS).to_csv(tmp_path / "scores.csv", index=False)
    assert figures_cli("steps", tmp_path) == 0
    ax = drawn["steps"].axes[0]
    [line] = ax.get_lines()
    steps = sorted(scores)
    assert line.get_xdata().tolist() == steps == [0, 3, 20, 100, 1000]
    assert line.get_ydata().tolist() == pytest.approx([100 * scores[s] for s in steps])
    [band] = [c for c in ax.collections if len(c.get_paths())]
    v = band.get_paths()[0].vertices
    for s in steps:
        assert (v[v[:, 0] == s, 1].min(), v[v[:, 0] == s, 1].max()) == pytest.approx(
            (100 * max(scores[s] - 0.1, 0.0), 100 * (scores[s] + 0.1))), s
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "3", "20", "100", "1000"]


# names as a model, data set, subject or run may be spelled: matplotlib reads text between two '$' as mathtext
# ('a$_$b' a ParseSyntaxException, 'cost$5-$10' drawn 'cost5-10' with an italic '5-', 'p$\alpha$' as 'pα'),
# and leaves a line whose label starts with '_' out of a legend
ODD = ["a$_$b", "cost$5-$10", "p$\\alpha$^2_x", "_lead"]
TYPESET = {"merge weight $w_i$", "base keeps $\\alpha_0$"}  # the only mathtext drawn: the merge figure's symbols


def odd_eval(d: Path) -> tuple[list[Path], list[str]]:
    write_scores(d, ODD[:3], [ODD[3], "s$_$t"])
    return [d], [*ODD, "s$_$t"]


def odd_steps(d: Path) -> tuple[list[Path], list[str]]:
    runs = [write_scores(d / name, ["ft/checkpoint-0", "ft/checkpoint-10"], [ODD[3], ODD[1]], seed=k)
            for k, name in enumerate(["r$_$1", "q^2\\$x$"])]
    return runs, ["run r$_$1", "run q^2\\$x$", ODD[3], ODD[1]]


def odd_heads(d: Path) -> tuple[list[Path], list[str]]:
    from test_figures_page import write_heads

    return [write_heads(d / "h$_$x^2\\y", 2, 2)], ["h$_$x^2\\y"]


def odd_merge(d: Path) -> tuple[list[Path], list[str]]:
    d = write_merge(d / "m", 3, layers=2, heads=2)
    names = {f"zoo/expert-{k}": f"zoo/{n}" for k, n in enumerate(ODD[:3])}
    for f in ("merge_weights.csv", "merge.json"):
        text = (d / f).read_text(encoding="utf-8")
        for old, new in names.items():
            text = text.replace(old, json.dumps(new)[1:-1] if f.endswith(".json") else new)
        (d / f).write_text(text, encoding="utf-8")
    return [d], ODD[:3]


def odd_shift(d: Path) -> tuple[list[Path], list[str]]:
    # one heatmap ('_lead': its line the legend's one); every name a tick label of the models panel
    return [write_shift(d, [f"runs/{n}" for n in ODD[::-1]], 2, ["self_attn.q_proj.weight"], layered=1)], ODD


def odd_trajectory(d: Path) -> tuple[list[Path], list[str]]:
    d = write_trajectory(d, [ODD[0]], methods=("pca",))
    coords = pd.read_csv(d / "coords.csv", keep_default_na=False)
    coords["name"] = coords["name"].replace({"organism-vl": f"x/{ODD[1]}", "organism-video": ODD[3]})
    coords.to_csv(d / "coords.csv", index=False)
    info = json.loads((d / "run.json").read_text(encoding="utf-8"))
    info |= {"ref": f"runs/{ODD[2]}", "maps": {"norms": ["pca"], "sketch": ["pca"]}}
    (d / "run.json").write_text(json.dumps(info), encoding="utf-8")
    return [d], [f"run {ODD[0]}", ODD[1], ODD[3], f"θ_ref = {ODD[2]}"]


@pytest.mark.parametrize("kind", ["eval", "steps", "heads", "merge", "shift", "trajectory", "report"])
def test_every_figure_draws_names_as_written(tmp_path, monkeypatch, kind):
    """Every figure kind drawn from results whose model, data set and run names hold '$', '_', '^' and '\\': exit 0,
    and each name is among the lines the renderer is handed as plain text, as written (a hook on the Agg
    renderer: what is drawn, not what a Text holds); nothing is typeset as mathtext but the merge figure's two
    symbols (a log axis' tick numbers are plain text too). Only shift and trajectory were safe (each name escaped
    there by hand, yet shift's log ticks were mathtext): eval, steps, heads, merge and Figure 2 ended in a
    ParseSyntaxException traceback at 'a$_$b' (exit 1; 'cost$5-$10' drew 'cost5-10' with an italic '5-'), and the
    steps legend left out the data set '_lead'."""
    import matplotlib
    from matplotlib.backends.backend_agg import RendererAgg

    lines: list[tuple[str, bool]] = []
    draw_text = RendererAgg.draw_text

    def record(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
        lines.append((s, bool(ismath)))
        return draw_text(self, gc, x, y, s, prop, angle, ismath, mtext)

    monkeypatch.setattr(RendererAgg, "draw_text", record)
    if kind == "report":  # Figure 2, drawn by python -m figures report from a replication's head sweeps
        from test_figures_page import write_heads

        from figures.report import draw_figure2
        from figures.results import Replication, short

        names = ODD[:2]
        for k, m in enumerate(names):
            write_heads(tmp_path / "rep" / "heads" / short(m), 2, 2, seed=k)
        cfg = {"models": {"base": names[1], "experts": names[:1], "own": [ODD[3]]}, "heads": {"split": "train"}}
        fig2 = tmp_path / "fig" / "figure2.png"
        fig2.parent.mkdir()
        assert draw_figure2(Replication(tmp_path / "rep", {"config": cfg, "fingerprints": {}}), fig2) == [fig2]
        want = [f"{names[0]} on {ODD[3]} (train)", f"{names[1]} on text (train)"]
    else:
        dirs, want = globals()[f"odd_{kind}"](tmp_path)
        assert figures_cli(kind, *dirs) == 0
    plain = "\n".join(s for s, math in lines if not math)
    assert [n for n in want if n not in plain] == [], plain
    assert {s for s, math in lines if math} <= TYPESET
    assert matplotlib.rcParams["text.parse_math"]  # the caller's setting, as it was


def test_a_clipped_scales_note_prints_a_negative_drop_with_the_minus_sign():
    """A colour bar's clip note on Figure 2's signed drop (and the salience merge's) printed its farthest value with
    an ASCII '-' ('up to -40.0') beside tick labels matplotlib draws with U+2212. Oracle: the farthest value,
    known here."""
    from figures.heads import centred_limits, clip_note

    grid = np.array([[-40.0, 0.5, -0.5, 1.0] + [0.1 * k for k in range(196)]])
    vmin, vmax, clipped = centred_limits(grid, 0.0)
    assert clipped and vmin > -40.0
    note = clip_note(grid, vmin, vmax, "+.1f")
    assert "up to \u221240.0)" in note and not re.search(r"(?<![\w.])-\d", note), note


def test_shift_of_a_single_model_prints_no_ratio_to_itself(tmp_path, drawn):
    """One model's number read "0.0013 (1.0×)" under "(k×): k times the least shifted": a ratio to itself, which
    says nothing. A single model's number is its mean Δavg alone (the mean of its rows here), the title without the
    ratio's key; two models keep theirs."""
    from figures.shift import draw_shift

    for models in (["organism-vl"], ["organism-vl", "organism-video"]):
        d = write_shift(tmp_path / str(len(models)), models, 2, ["mlp.up_proj.weight"])
        draw_shift(d)
        ax = drawn["shift_models"].axes[0]
        rows = pd.read_csv(d / "shift.csv")
        means = rows.groupby("model", sort=False)["delta_avg"].mean()
        texts = [t.get_text() for t in ax.texts]
        if len(models) == 1:
            assert texts == [f"{means.iloc[0]:.2g}"] and "×" not in ax.get_title()
        else:
            assert all("×" in t for t in texts) and "k×" in ax.get_title()


def test_steps_saved_at_even_intervals_draw_on_a_linear_axis(tmp_path, drawn):
    """A run saved every 10 steps (30 checkpoints, 0 … 290) drew on the symmetric-log axis meant for the paper's
    0, 10, 30, 100, 200: step 0 to 10 took a third of the panel and the last checkpoints' markers lay 1.3 pt
    apart, one over the next. Evenly saved checkpoints go on a linear axis, every two next ones at least a
    marker's width (4 pt) apart; the paper's schedule keeps its log axis."""
    for steps, scale in (([10 * k for k in range(30)], "linear"), ([0, 10, 30, 100, 200], "symlog")):
        d = write_scores(tmp_path / scale, [f"ft/checkpoint-{s}" for s in steps], ["text", "image"])
        assert figures_cli("steps", d) == 0
        fig = drawn["steps"]
        fig.draw_without_rendering()
        ax = fig.axes[0]
        assert ax.get_xscale() == scale
        for line in ax.get_lines():
            if len(line.get_xdata()) == len(steps):
                assert sorted(line.get_xdata()) == steps
                x = ax.transData.transform(np.c_[line.get_xdata(), line.get_ydata()])[:, 0]
                if scale == "linear":
                    assert np.diff(x).min() * 72 / fig.dpi >= 4


def test_steps_draw_each_interval_tick_and_axis_as_written_out(tmp_path, drawn):
    """figures.steps' numbers beside the scores.csv they come from (mut48): a one-step error bar of an asymmetric
    interval (its ends swapped passed: the test above has a symmetric one), a line at 100 % banded by the exact
    interval of its n items (bands drawn from the bootstrap ends passed: none of the steps tests has a 0/100 %
    line), at most 8 step ticks, every k-th saved step with k = ceil(steps / 8) (floor passed: 20 steps got 10
    ticks), two checkpoints on the symmetric-log axis (one gap is no evenness: a 2-step rule passed) with 0 about a
    decade from 10, as 10 from 100 (linthresh 1 passed: 0 to 10 took two), and a model
    named with other digits than ASCII's no checkpoint (\\d passed). Oracles: the CSV's numbers by hand, 0.025^(1/16)
    for 16 of 16 (Clopper-Pearson's lower end), ceil division written out."""
    from matplotlib.collections import PolyCollection
    from test_figures_page import SCORE_COLUMNS

    from figures.steps import checkpoint_rows

    d = tmp_path / "ft-eval"
    d.mkdir()
    rows = [["ft/checkpoint-10", "one", "all", 16, 0.5, 0.375, 0.875, 0.5, 0.375, 0.875, ""],
            ["ft/checkpoint-10", "full", "all", 16, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, ""],
            ["ft/checkpoint-1000", "full", "all", 16, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, ""],
            ["ft/checkpoint-1000", "one", "all", 0, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, "not applicable"]]
    pd.DataFrame(rows, columns=SCORE_COLUMNS).to_csv(d / "scores.csv", index=False)
    assert figures_cli("steps", d) == 0
    ax = drawn["steps"].axes[0]
    assert ax.get_xscale() == "symlog"  # steps 10 and 1000: two checkpoints say nothing of an interval
    x0, x10, x100, x1000 = ax.transData.transform(np.c_[[0, 10, 100, 1000], [50] * 4])[:, 0]
    assert x100 - x10 == pytest.approx(x1000 - x100)
    assert 0.8 < (x10 - x0) / (x100 - x10) < 1.25  # 0 beside 10, 100, 1000: about a decade (matplotlib's 1/0.9)
    [bar] = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    [segment] = bar.lines[2][0].get_segments()
    assert segment[:, 1].tolist() == pytest.approx([37.5, 87.5])
    [band] = [c.get_paths()[0].vertices for c in ax.collections if isinstance(c, PolyCollection)
              and np.ptp(c.get_paths()[0].vertices[:, 0]) > 0]  # the 100 % line's (one step's has no width)
    ys = band[:, 1]
    assert (ys.min(), ys.max()) == pytest.approx((100 * 0.025 ** (1 / 16), 100.0))

    steps = [k * k for k in range(20)]  # 0, 1, 4, … 361: uneven
    rows = [[f"ft/checkpoint-{s}", "t", "all", 4, 0.5, 0.25, 0.75, 0.5, 0.25, 0.75, ""] for s in steps]
    d2 = tmp_path / "long"
    d2.mkdir()
    pd.DataFrame(rows, columns=SCORE_COLUMNS).to_csv(d2 / "scores.csv", index=False)
    assert figures_cli("steps", d2) == 0
    k = -(-len(steps) // 8)
    assert list(drawn["steps"].axes[0].get_xticks()) == steps[::k] and len(steps[::k]) <= 8

    scores = pd.DataFrame([["a/checkpoint-10", "all"], ["b/checkpoint-\u0661\u0660", "all"],
                           ["c/checkpoint-10x", "all"], ["d/checkpoint-20", "math"]], columns=["model", "subject"])
    got = checkpoint_rows(scores)
    assert got["model"].tolist() == ["a/checkpoint-10"] and got["step"].tolist() == [10]


def test_merge_head_weights_put_each_slice_in_its_own_cell_and_refuse_what_is_no_head(tmp_path):
    """figures.merge.head_weights (mut48): each q_proj slice 'rows h·d:(h+1)·d' of layer L is head h of layer L's
    weight, 0 and 1 included, other tensors and column slices left out; a slice off a head's rows, or a head missing
    for one model, is a one-line refusal. Mutants reading the head from the slice's end, dropping the multiple-of-width
    check, refusing a weight of exactly 1, filling a model's cells in reverse order, or counting heads with nunique
    (a missing middle head then an IndexError traceback) passed the merge figure tests, whose files are analyses.merge's
    own. Oracle: the grid written out by hand."""
    from figures.merge import head_weights
    from probe.errors import BadInput

    d, layers, heads = 4, 2, 3
    want = {"a": np.array([[0.0, 0.25, 1.0], [0.5, 0.125, 0.75]])}
    want["b"] = 1 - want["a"]
    rows = [(f"layers.{l}.self_attn.q_proj.weight", f"rows {h * d}:{(h + 1) * d}", m, float(w[l, h]))
            for m, w in want.items() for l in range(layers) for h in range(heads)]
    rows += [("layers.0.self_attn.o_proj.weight", f"columns 0:{d}", "a", 0.3),
             ("layers.0.mlp.up_proj.weight", "all", "b", 0.6)]
    table = pd.DataFrame(rows[::-1], columns=["tensor", "slice", "model", "weight"])  # any row order
    got = head_weights(table)
    assert list(got) == ["b", "a"]  # the file's order of models
    for m in want:
        np.testing.assert_array_equal(got[m], want[m])

    off = table.copy()
    off.loc[off["slice"] == f"rows {d}:{2 * d}", "slice"] = f"rows {d // 2}:{d // 2 + d}"
    with pytest.raises(BadInput, match="is not one head's rows"):
        head_weights(off)
    gap = table[(table["slice"] != f"rows {d}:{2 * d}") | (table["tensor"] != "layers.0.self_attn.q_proj.weight")
                | (table["model"] != "b")]  # b's head 1 of layer 0 gone: heads 0 and 2 left there
    everywhere = table[table["slice"] != f"rows {d}:{2 * d}"]  # head 1 gone from every layer and model
    for cut, who in ((gap, "b"), (everywhere, "b")):
        with pytest.raises(BadInput, match=f"no weight of layer 0 head 1 for {who}"):
            head_weights(cut)
