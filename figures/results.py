"""Read saved results back into typed objects and data frames, from a notebook or a script: ``load(DIR)`` for any
output directory, or the class of its kind — ``HeadSweep`` (probe.heads), ``EvalRun`` (probe.eval), ``Shift``
(analyses.shift), ``Merge`` (analyses.merge), ``Trajectory`` (analyses.trajectory), ``FinetuneRun``
(analyses.finetune) and ``Replication`` (analyses.replicate), each with ``.read(DIR)``. Every one reads its files
with the checked readers the figures draw from, and refuses a directory of another kind, an unfinished one or a
damaged file with one ``BadInput`` naming the file. The report and its findings use only this (``figures/`` draws
from saved results alone)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypedDict

import pandas as pd

from figures import read_json
from probe.errors import BadInput, in_path  # in_path: ~ expanded, as the commands' paths are

METHOD_LABELS = {"average": "Eq. 1 average", "shift": "Eq. 4 shift-weighted", "salience": "salience-guided (ours)",
                 "ties": "TIES"}


class ShiftRow(TypedDict):
    """The checked keys of one expert in shift/summary.json's per_model (it holds counts too)."""

    mean_delta_avg: float
    ratio_to_least_shifted: float | None  # None when some model did not move


@dataclass
class EvalRun:
    """One probe.eval output: ``scores`` (scores.csv: a row per model × data set × subject, 'all' the totals, with
    95 % intervals and the paired differences to the reference), ``items`` (items.parquet: one row per model × item),
    ``row(model, data_spec)`` (an 'all' row) and ``paired(model, reference, data_spec)`` (any two models' paired
    difference with its interval)."""

    dir: Path
    scores: pd.DataFrame
    metric: str  # accuracy, or prob_accuracy for a --no-generate run
    data_names: dict[str, str]  # data spec as given → name in scores.csv
    info: dict[str, Any]  # its run.json

    @staticmethod
    def read(d: Path) -> "EvalRun":
        from figures.eval import read_scores

        d = in_path(d)
        if not (d / "scores.csv").is_file() or not (d / "run.json").is_file():
            raise BadInput(f"{d}: no scores.csv / run.json (not a finished python -m probe.eval output)")
        s = read_scores(d)
        info = read_json(d / "run.json")
        try:
            plan = info["plan"]
            metric = "accuracy" if plan["settings"]["generate"] else "prob_accuracy"
            names = {x["spec"]: x["name"] for x in plan["data"]}
        except (KeyError, TypeError):
            raise BadInput(f"{d / 'run.json'}: not a probe.eval run.json (no plan with settings and data)") from None
        return EvalRun(d, s, metric, names, info)

    @property
    def diff_columns(self) -> tuple[str, str, str]:
        """The paired difference to the reference in this run's metric: value, interval low, interval high."""
        return (("diff_accuracy", "diff_lo", "diff_hi") if self.metric == "accuracy"
                else ("diff_prob_accuracy", "diff_prob_lo", "diff_prob_hi"))

    def paired(self, model: str, reference: str, data_spec: str) -> Any:
        """``model`` minus ``reference`` on a data set (by spec or name), in this run's metric, paired over the items
        both answered: the ``probe.stats.Interval`` ``probe.eval --reference`` would report (its seed, the set's
        bootstrap stream), from items.parquet, so any two models of a saved run compare as the reference does."""
        from probe.eval import DataSet, paired_differences

        try:
            ds = next(DataSet(**x) for x in self.info["plan"]["data"] if data_spec in (x["spec"], x["name"]))
            seed = int(self.info["seed"])
        except (KeyError, TypeError, ValueError, StopIteration):
            raise BadInput(f"{self.dir / 'run.json'}: no seed, or no data set {data_spec} in its plan") from None
        items = self.items
        mine, ref = ((items[(items["model"] == m) & (items["data"] == ds.name)]) for m in (model, reference))
        if not len(mine) or not len(ref):
            raise BadInput(f"{self.dir}/items.parquet: no items of {model if not len(mine) else reference} on "
                           f"{data_spec}")
        return paired_differences(mine, ref, seed, ds.stream)[0][self.metric]

    @cached_property
    def items(self) -> pd.DataFrame:
        """items.parquet, read once (``paired`` asks it per model pair and data set)."""
        from probe.eval import ITEM_COLUMNS
        from probe.results import read_part

        return read_part(self.dir / "items.parquet", ITEM_COLUMNS)

    def row(self, model: str, data_spec: str) -> Any:
        """The 'all' row of a model on a data set, by the spec the run was given (``probe/zoo/data/text``) or its
        name in scores.csv (``text``)."""
        s = self.scores
        name = self.data_names.get(data_spec, data_spec)
        if name not in self.data_names.values():
            raise BadInput(f"{self.dir}: no data set {data_spec} (it has {', '.join(self.data_names)}, named "
                           f"{', '.join(self.data_names.values())})")
        r = s[(s["model"] == model) & (s["data"] == name) & (s["subject"] == "all")]
        if len(r) != 1:
            raise BadInput(f"{self.dir}/scores.csv: no single row for {model} on {data_spec}")
        return r.iloc[0]


@dataclass
class HeadSweep:
    """One probe.heads output: ``heads`` (heads.csv: a row per masked head, its accuracy, prob_accuracy, KL and drops
    from the baseline), ``baseline`` (baseline.json: the unmasked values, per subject too), ``info`` (run.json: the
    plan, versions, placement), ``items`` (items.parquet: one row per item × masked head, layer = head = -1 unmasked)
    and ``grid(metric)`` (layers × heads)."""

    dir: Path
    heads: pd.DataFrame
    baseline: dict[str, Any]
    info: dict[str, Any]

    @staticmethod
    def read(d: Path) -> "HeadSweep":
        from figures.heads import read_sweep

        d = in_path(d)
        heads, baseline = read_sweep(d)
        return HeadSweep(d, heads, baseline, read_json(d / "run.json", "python -m probe.heads"))

    @cached_property
    def items(self) -> pd.DataFrame:
        from probe.results import read_part

        return read_part(self.dir / "items.parquet")

    def grid(self, metric: str = "kl") -> pd.DataFrame:
        """``metric`` (a column of ``heads``: kl, accuracy, prob_accuracy, accuracy_drop, …) as layers × heads."""
        if metric not in self.heads:
            raise BadInput(f"{self.dir / 'heads.csv'}: no column {metric} (it has {', '.join(self.heads.columns)})")
        return self.heads.pivot(index="layer", columns="head", values=metric)


@dataclass
class Shift:
    """One analyses.shift output: ``table`` (shift.csv: a row per model × LM tensor, Δavg of Eq. 3, max |Δ|, relative
    L2) and ``summary`` (summary.json), with ``per_model`` (its per-model numbers as a frame: mean Δavg, ratio to
    the least shifted, …)."""

    dir: Path
    table: pd.DataFrame
    summary: dict[str, Any]

    @staticmethod
    def read(d: Path) -> "Shift":
        from figures.shift import read_shift

        d = in_path(d)
        return Shift(d, *read_shift(d))

    @property
    def per_model(self) -> pd.DataFrame:
        return pd.DataFrame.from_dict(self.summary["per_model"], orient="index")


@dataclass
class Merge:
    """One analyses.merge output: ``weights`` (merge_weights.csv: each tensor's or slice's coefficient per model),
    ``info`` (merge.json: method, parameters, mean alpha per model), ``model`` (the merged LM, an HF dir
    ``AutoModelForCausalLM.from_pretrained`` loads) and ``carriers`` (name → each carrier's dir)."""

    dir: Path
    weights: pd.DataFrame
    info: dict[str, Any]

    @staticmethod
    def read(d: Path) -> "Merge":
        from figures.merge import read_merge

        d = in_path(d)
        return Merge(d, *read_merge(d))

    @property
    def model(self) -> Path:
        return self.dir

    @property
    def carriers(self) -> dict[str, Path]:
        listed = self.info.get("carriers") or []
        if not (isinstance(listed, list) and all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                 for c in listed)):
            raise BadInput(f"{self.dir / 'merge.json'}: carriers is not as python -m analyses.merge writes it")
        return {c["name"]: self.dir / "carriers" / c["name"] for c in listed}

    def head_weights(self) -> dict[str, Any]:
        """A salience merge's weight of each participant's query-head slices: name → [layers, heads] array
        (BadInput for another method, which weights whole tensors)."""
        from figures.merge import head_weights

        return head_weights(self.weights, self.dir / "merge_weights.csv")


@dataclass
class Trajectory:
    """One analyses.trajectory output: ``coords`` (coords.csv: a row per checkpoint × feature × method, its 2-D
    position, kind, run and step) and ``info`` (run.json: θ_ref, perplexity, PCA variance shares; ``{}`` for an
    output from before it)."""

    dir: Path
    coords: pd.DataFrame
    info: dict[str, Any]

    @staticmethod
    def read(d: Path) -> "Trajectory":
        from figures.trajectory import read_trajectory

        d = in_path(d)
        return Trajectory(d, *read_trajectory(d))

    @cached_property
    def sketch(self) -> pd.DataFrame:
        """features.npz's random-projection sketch of each checkpoint's θ − θ_ref, a row per point (to embed anew)."""
        from figures.trajectory import read_sketch

        names, sketch = read_sketch(self.dir)
        return pd.DataFrame(sketch, index=names)


@dataclass
class FinetuneRun:
    """One finished analyses.finetune run: ``log`` (train_log.csv: a row per step, its loss and rates), ``info``
    (run.json: the settings under ``config``, placement, versions) and ``checkpoints`` (step → its
    ``checkpoint-<step>`` dir, an HF model dir)."""

    dir: Path
    log: pd.DataFrame
    info: dict[str, Any]
    checkpoints: dict[int, Path]

    @staticmethod
    def read(d: Path) -> "FinetuneRun":
        from analyses.finetune import LOG_COLUMNS, checkpoint_dirs, checkpoint_steps, kept_log_rows
        from probe.results import saved_command

        d = in_path(d)
        info = read_json(d / "run.json", "python -m analyses.finetune")
        if (cmd := saved_command(info, d)) != "analyses.finetune":
            raise BadInput(f"{d / 'run.json'}: a {cmd or 'unknown'} run, not an analyses.finetune one")
        if info.get("status") != "complete":
            raise BadInput(f"{d}: a fine-tuning run whose run.json says {info.get('status')!r}, not complete "
                           "(killed, failed or still running: the same command continues it)")
        try:
            steps, saves = int(info["config"]["steps"]), list(info["config"]["save_steps"])
            want = checkpoint_steps(saves, steps)
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{d / 'run.json'}: no config with steps and save_steps") from None
        log_path = d / "train_log.csv"
        if not log_path.is_file():
            raise BadInput(f"{d}: no train_log.csv (not a finished python -m analyses.finetune output)")
        try:
            log = pd.DataFrame(kept_log_rows(log_path, steps), columns=LOG_COLUMNS).astype(
                {"step": int, "loss": float, "lr": float, "lm_lr": float, "tokens": int})
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise BadInput(f"{log_path}: not a readable train_log.csv ({exc})") from None
        if log["step"].tolist() != list(range(1, steps + 1)):
            raise BadInput(f"{log_path}: {len(log)} readable rows, not one for each of the run's {steps} steps "
                           "(a cut or edited file?)")
        found = checkpoint_dirs(d)
        if lost := [s for s in want if s not in found]:
            raise BadInput(f"{d}: no checkpoint-{lost[0]} (the run saves steps {want})")
        return FinetuneRun(d, log, info, {s: found[s] for s in want})


@dataclass
class Replication:
    """One analyses.replicate output: ``config`` (the saved ReplicateConfig), ``info`` (replicate.json), and each
    stage's results by name: ``heads(model)`` (heads.csv and baseline.json of its sweep), ``eval("table3")`` (an
    ``EvalRun``; also table4, table5, ``eval("steps", run)``), ``shift_per_model()``, ``merge_dir(method)``,
    ``complete(stage)``; ``load(DIR / "shift")`` and the like read any stage's output whole."""

    out: Path
    info: dict[str, Any]  # replicate.json

    @property
    def cfg(self) -> dict[str, Any]:
        return self.info["config"]

    @cached_property
    def config(self) -> Any:
        """``cfg`` typed again (a ReplicateConfig), read once: what the stage outputs are named by."""
        from analyses.replicate_config import saved_config

        return saved_config(self.cfg, self.out / "replicate.json")

    @staticmethod
    def read(out: Path) -> "Replication":
        out = in_path(out)
        path = out / "replicate.json"
        info = read_json(path, "python -m analyses.replicate")
        if not all(isinstance(info.get(k), dict) for k in ("config", "fingerprints")):
            raise BadInput(f"{path}: no config and fingerprints (not written by python -m analyses.replicate)")
        rep = Replication(out, info)
        rep.config  # typed now: the report reads cfg's keys (models.experts, …) as it goes, a missing one a KeyError
        return rep

    def heads(self, model: str, need: tuple[str, ...] = ()) -> tuple[pd.DataFrame, dict[str, Any]]:
        """heads.csv and baseline.json of the head sweep of ``model``, checked."""
        from figures.heads import read_sweep

        return read_sweep(self.out / "heads" / short(model), need)

    def shift_per_model(self) -> dict[str, ShiftRow]:
        """shift/summary.json's per-expert numbers, checked."""
        path = self.out / "shift" / "summary.json"
        per = read_json(path).get("per_model")
        for e in self.experts:
            row = per.get(e) if isinstance(per, dict) else None
            # the ratio is null when some model did not move (shift writes no Infinity), but never absent
            if not isinstance(row, dict) or not isinstance(row.get("mean_delta_avg"), (int, float)) \
                    or not isinstance(row.get("ratio_to_least_shifted", "absent"), (int, float, type(None))):
                raise BadInput(f"{path}: no per_model numbers for {e}")
        return per

    def complete(self, stage: str) -> bool:
        """Whether the stage completed with this run's settings; refused when it did but its outputs are gone."""
        from analyses.replicate import gone_text, missing_outputs, read_state

        st = read_state(self.out, stage)
        if not (st.get("status") == "complete" and st.get("fingerprint") == self.info["fingerprints"].get(stage)):
            return False
        if gone := missing_outputs(stage, self.config, self.out):
            raise BadInput(f"{gone_text(gone)}: gone, though stage {stage} completed; run python -m "
                           f"analyses.replicate --out {self.out} again to redo it")
        return True

    def seconds(self, stage: str, key: str = "seconds") -> float | None:
        """Wall (``seconds``) or CPU (``cpu_seconds``) time of the process that completed the stage."""
        from analyses.replicate import read_state

        return read_state(self.out, stage).get(key)

    def resumed(self, stage: str) -> bool:
        from analyses.replicate import read_state

        return bool(read_state(self.out, stage).get("resumed"))

    # names from the saved config
    @property
    def base(self) -> str:
        return self.cfg["models"]["base"]

    @property
    def experts(self) -> list[str]:
        return self.cfg["models"]["experts"]

    @property
    def own(self) -> list[str]:
        return self.cfg["models"]["own"]

    def paper_name(self, expert: str) -> str:
        paper = self.cfg["models"].get("paper") or []
        return paper[self.experts.index(expert)] if paper else ""

    def data(self, label: str) -> str:
        """The data set of a config label (text, image, …) as the config gave it."""
        if label not in self.cfg["data"]:
            raise BadInput(f"{self.out / 'replicate.json'}: no data set labelled {label} (the labels: "
                           f"{', '.join(self.cfg['data'])})")
        return self.cfg["data"][label]

    @property
    def methods(self) -> list[str]:
        return self.cfg["merge"]["methods"]

    @property
    def runs(self) -> dict[str, dict[str, float]]:
        return self.cfg["finetune"]["runs"]

    @property
    def named_out(self) -> Path:
        """DIR as the run spelled it: the model names in its scores.csv start with it."""
        return Path(self.info.get("out", self.out))

    def merge_dir(self, method: str) -> str:
        return str(self.named_out / "merge" / method)

    def carrier(self, method: str, expert: str) -> str:
        return str(self.named_out / "merge" / method / "carriers" / short(expert))

    def eval(self, *parts: str) -> EvalRun:
        return EvalRun.read(self.out.joinpath(*parts))

    @property
    def saved_steps(self) -> list[int]:
        """The steps each fine-tuning run wrote a checkpoint at (checkpoint-0 whatever save_steps says)."""
        from analyses.finetune import checkpoint_steps

        return checkpoint_steps(self.cfg["finetune"]["save_steps"], self.cfg["finetune"]["steps"])

    def steps(self, name: str) -> tuple[EvalRun, pd.DataFrame]:
        """A fine-tuning run's evaluated checkpoints: the 'all' rows with their step, sorted by it, checked to be
        every step the run saved (``saved_steps``: 0, ``save_steps`` and the last), once per data set. A checkpoint
        missing from scores.csv would otherwise shift the values left under the steps the Figure 3 table names."""
        from figures.steps import checkpoint_rows

        run = self.eval("steps", name)
        t = checkpoint_rows(run.scores)  # n/a rows too: the table prints them
        want = self.saved_steps
        for data in run.data_names.values():
            if (got := sorted(t.loc[t["data"] == data, "step"].tolist())) != want:
                raise BadInput(f"{run.dir / 'scores.csv'}: checkpoints of steps {got} on {data}, not the steps "
                               f"{want} the config saves (an edited or partial file?)")
        return run, t.sort_values("step", kind="stable")


def short(spec: str) -> str:
    from analyses.replicate import short as _short  # one rule for carrier and sweep directory names

    return _short(spec)


KINDS: dict[str, Any] = {"probe.heads": HeadSweep, "probe.eval": EvalRun, "analyses.shift": Shift,
                         "analyses.merge": Merge, "analyses.trajectory": Trajectory,
                         "analyses.finetune": FinetuneRun}


def load(d: Path | str) -> Any:
    """Any saved result directory read back as its class (``KINDS``, or ``Replication`` for an analyses.replicate
    output), by the command its run.json, replicate.json or output manifest names. A directory none of them names
    is BadInput; so is a damaged or unfinished one of a known kind (the class's own ``read`` refuses it)."""
    from probe.results import read_run_json, saved_command

    d = in_path(d)
    if not d.is_dir():
        raise BadInput(f"{d}: not a directory")
    if (d / "replicate.json").is_file():
        return Replication.read(d)
    command = saved_command(read_run_json(d), d)
    if command not in KINDS:
        raise BadInput(f"{d}: not an omniprobe result directory (no run.json, replicate.json or output manifest "
                       f"names the command that wrote it)" if command is None
                       else f"{d}: written by {command}, which has no reader here")
    return KINDS[command].read(d)
