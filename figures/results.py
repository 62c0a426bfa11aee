"""Read a ``python -m analyses.replicate`` output back from its files: the saved config and each stage's raw
results. The report and its findings use only this (``figures/`` draws from saved results alone)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from figures import read_json
from probe.errors import BadInput

METHOD_LABELS = {"average": "Eq. 1 average", "shift": "Eq. 4 shift-weighted", "salience": "salience-guided (ours)",
                 "ties": "TIES"}


@dataclass
class EvalRun:
    """One probe.eval output: its 'all' rows, indexed by (model, data set name)."""

    dir: Path
    scores: pd.DataFrame
    metric: str  # accuracy, or prob_accuracy for a --no-generate run
    data_names: dict[str, str]  # data spec as given → name in scores.csv
    info: dict[str, Any]  # its run.json

    @staticmethod
    def read(d: Path) -> "EvalRun":
        from figures.eval import read_scores

        if not (d / "scores.csv").is_file() or not (d / "run.json").is_file():
            raise BadInput(f"{d}: no scores.csv / run.json (the stage has not completed)")
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
        """``model`` minus ``reference`` on a data set, in this run's metric, paired over the items both answered:
        the ``probe.stats.Interval`` ``probe.eval --reference`` would report (its seed, the set's bootstrap stream), from
        items.parquet, so any two models of a saved run compare as the reference does."""
        from probe.eval import DataSet, paired_differences

        try:
            ds = next(DataSet(**x) for x in self.info["plan"]["data"] if x["spec"] == data_spec)
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
        """The 'all' row of a model on a data set (by the spec the replicate config gave)."""
        s = self.scores
        r = s[(s["model"] == model) & (s["data"] == self.data_names[data_spec]) & (s["subject"] == "all")]
        if len(r) != 1:
            raise BadInput(f"{self.dir}/scores.csv: no single row for {model} on {data_spec}")
        return r.iloc[0]


@dataclass
class Replication:
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
        path = Path(out) / "replicate.json"
        info = read_json(path, "python -m analyses.replicate")
        if not all(isinstance(info.get(k), dict) for k in ("config", "fingerprints")):
            raise BadInput(f"{path}: no config and fingerprints (not written by python -m analyses.replicate)")
        rep = Replication(Path(out), info)
        rep.config  # typed now: the report reads cfg's keys (models.experts, …) as it goes, a missing one a KeyError
        return rep

    def heads(self, model: str, need: tuple[str, ...] = ()) -> tuple[pd.DataFrame, dict[str, Any]]:
        """heads.csv and baseline.json of the head sweep of ``model``, checked."""
        from figures.heads import read_sweep

        return read_sweep(self.out / "heads" / short(model), need)

    def shift_per_model(self) -> dict[str, dict[str, float]]:
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
