"""Read saved results back into typed objects and data frames, from a notebook or a script: ``load(DIR)`` for any
output directory, or the class of its kind — ``HeadSweep`` (probe.heads), ``EvalRun`` (probe.eval), ``Shift``
(analyses.shift), ``Merge`` (analyses.merge), ``Trajectory`` (analyses.trajectory), ``FinetuneRun``
(analyses.finetune) and ``Replication`` (analyses.replicate), each with ``.read(DIR)``. Every one reads its files
with the checked readers the figures draw from, and refuses a directory of another kind, an unfinished one or a
damaged file with one ``BadInput`` naming the file. Each prints (a notebook cell's last line) as a few lines: what
it is, with its key numbers, its directory and the attributes holding its data. The report and its findings use
only this (``figures/`` draws from saved results alone)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, TypedDict

import pandas as pd

from figures import read_cached, read_json, short_name
from probe.errors import BadInput, counted, in_path  # in_path: ~ expanded, as the commands' paths are

# analyses.replicate's stages whose outputs are models that later stages evaluate or map, naming them by path
MODEL_STAGES = ("merge", "finetune")
METHOD_LABELS = {"average": "Eq. 1 average", "shift": "Eq. 4 shift-weighted", "salience": "salience-guided (ours)",
                 "ties": "TIES"}


def _listing(entries: Any, shown: int = 4) -> str:
    """The first ``shown`` entries, and how many more there are."""
    entries = list(entries)
    more = f" (+{len(entries) - shown} more)" if len(entries) > shown else ""
    return ", ".join(entries[:shown]) + more


def _summary(obj: Any, where: Path, what: str, holds: str) -> str:
    """A result's repr: what it is (one line), its directory and the attributes that hold its data, a few hundred
    characters where the dataclass default printed every row of every frame."""
    return f"{type(obj).__name__}: {what}\n  dir: {where}\n  holds: {holds}"


def _safe_repr(summary: Any) -> Any:
    """``summary`` as ``__repr__``, falling back to the class and directory when the saved JSON lacks a key it reads
    (an output from an older version): a notebook's last line never raises."""
    def __repr__(self: Any) -> str:
        try:
            return summary(self)
        except Exception as exc:  # noqa: BLE001 — a repr must not raise
            return (f"{type(self).__name__}(dir={getattr(self, 'dir', getattr(self, 'out', '?'))}) "
                    f"(no summary: {type(exc).__name__}: {exc})")

    __repr__.__doc__ = summary.__doc__
    return __repr__


class ShiftRow(TypedDict):
    """The checked keys of one expert in shift/summary.json's per_model (it holds counts too)."""

    mean_delta_avg: float
    ratio_to_least_shifted: float | None  # None when some model did not move


def _same(a: Any, b: Any) -> bool:
    """Two field values equal: frames by ``DataFrame.equals`` (same shape, dtypes and values, NaN equal to NaN),
    anything else by ``==``."""
    if isinstance(a, pd.DataFrame) or isinstance(b, pd.DataFrame):
        return isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame) and a.equals(b)
    return bool(a == b)


def _result_eq(self: Any, other: Any) -> Any:
    """``==`` of two results: the same kind and every field the same (``_same``). The dataclass's own compared the
    fields' tuples, whose frames' elementwise ``==`` has no truth value (ValueError)."""
    if type(other) is not type(self):
        return NotImplemented
    return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))


@dataclass(repr=False, eq=False)
class EvalRun:
    """One probe.eval output: ``scores`` (scores.csv: a row per model × data set × subject, 'all' the totals, with
    95 % intervals and the paired differences to the reference), ``items`` (items.parquet: one row per model × item),
    ``row(model, data_spec)`` (an 'all' row) and ``paired(model, reference, data_spec)`` (any two models' paired
    difference with its interval). Accuracies and their bounds are fractions in [0, 1], differences in [−1, 1] (the
    printed table and ``note`` say %), ``p_answer`` a probability."""

    dir: Path
    scores: pd.DataFrame
    metric: str  # accuracy, or prob_accuracy for a --no-generate run
    data_names: dict[str, str]  # data spec as given → name in scores.csv
    info: dict[str, Any]  # its run.json
    # a model's label in scores.csv and items.parquet → the label read back (``Replication.model_label``: the paths
    # of a copied or moved run's own models under where it is now); empty: as written
    labels: dict[str, str] = field(default_factory=dict)

    __eq__ = _result_eq

    @staticmethod
    def read(d: Path, relabel: Callable[[str], str] | None = None) -> "EvalRun":
        """``relabel``: each model's label in the files → the label to read it back under (all as written without
        it)."""
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
            models = [str(x["name"]) for x in plan["models"]] if relabel else []
        except (KeyError, TypeError):
            raise BadInput(f"{d / 'run.json'}: not a probe.eval run.json (no plan with settings and data)") from None
        _check_scored(d / "scores.csv", s, plan)
        labels = {m: new for m in models if relabel and (new := relabel(m)) != m}
        if labels:
            s = s.assign(model=s["model"].replace(labels))
        return EvalRun(d, s, metric, names, info, labels)

    @_safe_repr
    def __repr__(self) -> str:
        """Models × data sets, each set's items (the most any model scored: one that cannot read the set has 0), the
        metric and the reference."""
        top = self.scores[self.scores["subject"] == "all"]
        models = list(dict.fromkeys(top["model"]))
        n = top.groupby("data", sort=False)["n_items"].max()
        ref = self.info.get("reference")
        what = (f"{counted(len(models), 'model')} × {counted(len(n), 'data set')}, {self.metric}"
                + (f", reference {short_name(ref)}" if ref else "")
                + f"\n  models: {_listing(short_name(m) for m in models)}"
                + f"\n  items: {_listing(f'{short_name(d, 20)} {int(k)}' for d, k in n.items())}")
        return _summary(self, self.dir, what, f".scores ({len(self.scores)} rows) .items .info .row(model, data) "
                                              ".paired(model, reference, data)")

    @property
    def diff_columns(self) -> tuple[str, str, str]:
        """The paired difference to the reference in this run's metric: value, interval low, interval high."""
        return (("diff_accuracy", "diff_lo", "diff_hi") if self.metric == "accuracy"
                else ("diff_prob_accuracy", "diff_prob_lo", "diff_prob_hi"))

    def paired(self, model: str, reference: str, data_spec: str, level: float | None = None) -> Any:
        """``model`` minus ``reference`` on a data set (by spec or name), in this run's metric, paired over the items
        both answered: the ``probe.stats.Interval`` ``probe.eval --reference`` would report (its seed, the set's
        bootstrap stream), from items.parquet, so any two models of a saved run compare as the reference does.
        ``level``: the interval's, a fraction (0.9 for 90 %), 0.95 unless given."""
        from probe.eval import DataSet, paired_differences
        from probe.mmmu import data_spec as one_spelling

        # a fraction: level=95 (the percentage) was numpy's "Percentiles must be in the range [0, 100]", and 0 or a
        # negative level an interval of no meaning
        if level is not None and (isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1):
            raise BadInput(f"level {level!r}: give the interval's level as a fraction in (0, 1), e.g. 0.95 for 95 %")
        try:  # MMMU as mmmu: probe.eval writes the alias in one spelling (a run before wrote it as typed)
            ds = next(DataSet(**x) for x in self.info["plan"]["data"]
                      if {data_spec, one_spelling(data_spec)} & {x["spec"], x["name"]})
            seed = int(self.info["seed"])
        except (KeyError, TypeError, ValueError, StopIteration):
            raise BadInput(f"{self.dir / 'run.json'}: no seed, or no data set {data_spec} in its plan") from None
        items = self.items
        mine, ref = ((items[(items["model"] == m) & (items["data"] == ds.name)]) for m in (model, reference))
        if not len(mine) or not len(ref):
            raise BadInput(f"{self.dir}/items.parquet: no items of {model if not len(mine) else reference} on "
                           f"{data_spec}")
        return paired_differences(mine, ref, seed, ds.stream, level)[0][self.metric]

    @cached_property
    def items(self) -> pd.DataFrame:
        """items.parquet, read once (``paired`` asks it per model pair and data set)."""
        from probe.eval import ITEM_COLUMNS
        from probe.results import read_part

        path = self.dir / "items.parquet"
        # once per report build; the key names the file and the columns it is read with (read_cached's contract)
        items = read_cached((read_part, str(path), *ITEM_COLUMNS), lambda: read_part(path, ITEM_COLUMNS))
        return items.assign(model=items["model"].replace(self.labels)) if self.labels else items

    def n_items(self, data_spec: str) -> int:
        """Items of a data set (by spec or name): the most any model of the run scored (one that cannot read the set
        scored none)."""
        from probe.mmmu import data_spec as one_spelling

        name = self.data_names.get(one_spelling(data_spec), data_spec)
        top = self.scores[(self.scores["subject"] == "all") & (self.scores["data"] == name)]
        return int(top["n_items"].max()) if len(top) else 0

    @property
    def split(self) -> str:
        """The split the run scored (its plan's settings; "" in a run.json that does not say)."""
        return str(self.info["plan"]["settings"].get("split") or "")

    def row(self, model: str, data_spec: str) -> Any:
        """The 'all' row of a model on a data set, by the spec the run was given (``probe/zoo/data/text``) or its
        name in scores.csv (``text``)."""
        from probe.mmmu import data_spec as one_spelling

        s = self.scores
        name = self.data_names.get(one_spelling(data_spec), data_spec)  # MMMU as mmmu, as in paired
        if name not in self.data_names.values():
            raise BadInput(f"{self.dir}: no data set {data_spec} (it has {', '.join(self.data_names)}, named "
                           f"{', '.join(self.data_names.values())})")
        r = s[(s["model"] == model) & (s["data"] == name) & (s["subject"] == "all")]
        if len(r) != 1:
            raise BadInput(f"{self.dir}/scores.csv: no single row for {model} on {data_spec}")
        return r.iloc[0]


def _rows_as_planned(csv: Path, planned: list[tuple], have: list[tuple], row: Callable[[tuple], str],
                     planned_as: str, verb: str) -> None:
    """The rows ``have`` (their keys, read from ``csv``) are the ``planned`` ones of run.json's plan, none missing
    and no other: ``read_scores`` and ``read_sweep`` check a file against itself only, so a set or a layer cut at
    its last row read back as whole. ``row`` names a key in the messages, ``planned_as`` the plan's rows (``{n}``:
    how many), ``verb`` what the plan did with them; the first missing and the first extra key are named."""
    have_set, planned_set = set(have), set(planned)
    if lost := [key for key in planned if key not in have_set]:
        raise BadInput(f"{csv}: no row for {row(lost[0])} ({len(lost)} of {planned_as.format(n=len(planned))} "
                       "missing: a cut file?)")
    if extra := [key for key in have if key not in planned_set]:
        raise BadInput(f"{csv}: a row for {row(extra[0])}, which run.json's plan did not {verb} (rows of another "
                       "run?)")


def _check_scored(csv: Path, scores: pd.DataFrame, plan: dict[str, Any]) -> None:
    """scores.csv holds a row for each model × data set × subject ('all' and each of the set's subjects) of run.json's
    plan and no other (probe.eval's score_table writes each, n/a ones included): a one-subject set cut at its last
    row (its subject's: 'all' is then the only row to total) read back as whole. A plan without models, data names
    or subjects (an older run.json) is not checked."""
    try:
        planned = [(str(m["name"]), str(ds["name"]), subject) for m in plan["models"] for ds in plan["data"]
                   for subject in ["all", *map(str, ds["subjects"])]]
    except (KeyError, TypeError):
        return
    have = list(zip(scores["model"].astype(str), scores["data"].astype(str), scores["subject"].astype(str)))
    _rows_as_planned(csv, planned, have, lambda k: f"model {k[0]} on data set {k[1]}, subject {k[2]}",
                     "the plan's {n} rows", "score")


def _check_swept(csv: Path, heads: pd.DataFrame, info: dict[str, Any]) -> None:
    """heads.csv holds a row for each head run.json's plan swept (its layers × heads) and no other: a sweep of one
    layer (or one head) cut at its last row lost that head from the file and from the layers × heads it names. A
    plan without the two lists (an older run.json) is not checked. Keys sorted: the lowest missing or extra head
    is named."""
    plan = info.get("plan") if isinstance(info.get("plan"), dict) else {}
    layers, hs = plan.get("layers"), plan.get("heads")
    if not (isinstance(layers, list) and isinstance(hs, list)):
        return
    _rows_as_planned(csv, sorted((layer, h) for layer in layers for h in hs),
                     sorted(zip(heads["layer"], heads["head"])), lambda k: f"layer {k[0]} head {k[1]}",
                     "the swept {n} heads", "sweep")


@dataclass(repr=False, eq=False)
class HeadSweep:
    """One probe.heads output: ``heads`` (heads.csv: a row per masked head, its accuracy, prob_accuracy, KL and drops
    from the baseline), ``baseline`` (baseline.json: the unmasked values, per subject too), ``info`` (run.json: the
    plan, versions, placement), ``items`` (items.parquet: one row per item × masked head, layer = head = -1 unmasked)
    and ``grid(metric)`` (layers × heads). Accuracies are fractions in [0, 1], drops (baseline − masked) in [−1, 1],
    ``kl`` in nats (over the option letters, averaged over items), ``p_answer`` a probability."""

    dir: Path
    heads: pd.DataFrame
    baseline: dict[str, Any]
    info: dict[str, Any]

    __eq__ = _result_eq

    @staticmethod
    def read(d: Path) -> "HeadSweep":
        from figures.heads import read_sweep

        d = in_path(d)
        heads, baseline = read_sweep(d)
        info = read_json(d / "run.json", "python -m probe.heads")
        _check_swept(d / "heads.csv", heads, info)
        return HeadSweep(d, heads, baseline, info)

    @_safe_repr
    def __repr__(self) -> str:
        """Model, data set and split, the layers × heads swept, the items, the baseline prob. accuracy, the engine."""
        b, plan = self.baseline, self.info.get("plan") or {}
        model = b.get("model") or plan.get("model_spec", "?")
        data = b.get("data") or Path(str(plan.get("data_dir", "?"))).name
        split = b.get("split") or (plan.get("settings") or {}).get("split", "?")
        method = b.get("method") or plan.get("method", "?")
        layers, heads = counted(self.heads["layer"].nunique(), "layer"), counted(self.heads["head"].nunique(), "head")
        what = (f"{short_name(model)} on {short_name(data, 20)} ({split}), {layers} × {heads}, "
                f"{counted(b['n_items'], 'item')}, baseline prob. acc. "
                f"{b['prob_accuracy']:.3f}, engine {method}" + (" (approximate)" if b.get("approximate") else ""))
        return _summary(self, self.dir, what, f".heads ({len(self.heads)} rows) .baseline .info .items .grid(metric)")

    @cached_property
    def items(self) -> pd.DataFrame:
        from probe.results import read_part

        return read_part(self.dir / "items.parquet")

    def grid(self, metric: str = "kl") -> pd.DataFrame:
        """``metric`` (a column of ``heads``: kl, accuracy, prob_accuracy, accuracy_drop, …) as layers × heads."""
        if metric not in self.heads:
            raise BadInput(f"{self.dir / 'heads.csv'}: no column {metric} (it has {', '.join(self.heads.columns)})")
        return self.heads.pivot(index="layer", columns="head", values=metric)


@dataclass(repr=False, eq=False)
class Shift:
    """One analyses.shift output: ``table`` (shift.csv: a row per model × LM tensor, Δavg of Eq. 3, max |Δ|, relative
    L2) and ``summary`` (summary.json), with ``per_model`` (its per-model numbers as a frame: mean Δavg, ratio to
    the least shifted, …). Δavg is a mean |θ_model − θ_base| over a tensor's entries, in the weights' own units."""

    dir: Path
    table: pd.DataFrame
    summary: dict[str, Any]

    __eq__ = _result_eq

    @staticmethod
    def read(d: Path) -> "Shift":
        from figures.shift import read_shift

        d = in_path(d)
        return Shift(d, *read_shift(d))

    @_safe_repr
    def __repr__(self) -> str:
        """The models measured from the base and each one's mean Δavg (Eq. 3)."""
        per = self.summary["per_model"]
        base = (self.summary.get("base") or {}).get("name", "?")
        deltas = _listing(f"{short_name(m)} {r['mean_delta_avg']:.3g}" for m, r in per.items())
        what = f"{counted(len(per), 'model')} from {short_name(base)}, mean Δavg (Eq. 3): {deltas}"
        return _summary(self, self.dir, what, f".table ({len(self.table)} rows) .summary .per_model")

    @property
    def per_model(self) -> pd.DataFrame:
        return pd.DataFrame.from_dict(self.summary["per_model"], orient="index")


@dataclass(repr=False, eq=False)
class Merge:
    """One analyses.merge output: ``weights`` (merge_weights.csv: each tensor's or slice's ``weight`` per model, ties'
    ``trim_threshold`` instead), ``info`` (merge.json: method, parameters, ``mean_weight`` per model), ``model`` (the
    merged LM, an HF dir ``AutoModelForCausalLM.from_pretrained`` loads) and ``carriers`` (name → each carrier's dir).
    A merge written before 2026-12-06 (one ``alpha`` column, ``mean_alpha``) is read as if written today."""

    dir: Path
    weights: pd.DataFrame
    info: dict[str, Any]

    __eq__ = _result_eq

    @staticmethod
    def read(d: Path) -> "Merge":
        from figures.merge import read_merge

        from probe.results import MANIFEST, gone_entries, read_manifest

        d = in_path(d)
        merge = Merge(d, *read_merge(d))
        # the merged model is the dir itself: a file of it deleted by hand (weights, config) leaves no loadable model
        # (figures drawn into it, drawn again by python -m figures merge, may go)
        gone = [e for e in gone_entries(d, read_manifest(d) or {}) or [] if not e.endswith((".png", ".pdf"))]
        if gone:
            raise BadInput(f"{d}: {gone[0]} is gone (its {MANIFEST} lists it); rerun the same python -m "
                           "analyses.merge with --overwrite to write the merge again")
        return merge

    @_safe_repr
    def __repr__(self) -> str:
        """The method and its equation, the base and the models merged, the carriers written."""
        i = self.info
        method = i.get("method", "?")
        carriers = [c.get("name", "?") for c in i.get("carriers") or [] if isinstance(c, dict)]
        # average and weighted take no --base: their models are all there is, not a base's '?' plus experts
        base = f"{short_name(i['base'])} + " if i.get("base") else ""
        what = (f"{method} ({i.get('equation', '?')}) of {base}{_listing(short_name(m) for m in i.get('models') or [])}"
                f"\n  carriers: {_listing(short_name(c) for c in carriers) if carriers else 'none'}")
        # head_weights() is BadInput for every method but salience: not offered where it cannot answer
        holds = " .head_weights()" if method == "salience" else ""
        return _summary(self, self.dir, what, f".weights ({len(self.weights)} rows) .info .model (this dir) "
                                              f".carriers{holds}")

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


@dataclass(repr=False, eq=False)
class Trajectory:
    """One analyses.trajectory output: ``coords`` (coords.csv: a row per checkpoint × feature × method, its 2-D
    position, kind, run and step) and ``info`` (run.json: θ_ref, perplexity, PCA variance shares; ``{}`` for an
    output from before it)."""

    dir: Path
    coords: pd.DataFrame
    info: dict[str, Any]

    __eq__ = _result_eq

    @staticmethod
    def read(d: Path) -> "Trajectory":
        from figures.trajectory import read_trajectory

        d = in_path(d)
        return Trajectory(d, *read_trajectory(d))

    @_safe_repr
    def __repr__(self) -> str:
        """The points mapped, by kind, and the methods × features that map them."""
        c = self.coords
        kinds = c.drop_duplicates("name")["kind"].value_counts(sort=False)
        what = (f"{c['name'].nunique()} points ({', '.join(f'{n} {k}' for k, n in kinds.items())}) mapped by "
                f"{', '.join(dict.fromkeys(c['method']))} on {', '.join(dict.fromkeys(c['feature']))}"
                + (f", θ_ref {short_name(self.info['ref'])}" if self.info.get("ref") else ""))
        return _summary(self, self.dir, what, f".coords ({len(c)} rows) .info .sketch")

    @cached_property
    def sketch(self) -> pd.DataFrame:
        """features.npz's random-projection sketch of each checkpoint's θ − θ_ref, a row per point (to embed anew)."""
        from figures.trajectory import read_sketch

        names, sketch = read_sketch(self.dir)
        return pd.DataFrame(sketch, index=names)


def _ends_its_last_line(path: Path) -> bool:
    """Whether ``path`` is empty or ends with a line end. analyses.finetune appends train_log.csv a whole line a step
    before run.json says complete (a kill's torn line is a "running" run's, dropped by the resume), so a finished
    run's log without one was cut or edited."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except OSError as exc:
        raise BadInput(f"{path}: not a readable train_log.csv ({exc})") from None


@dataclass(repr=False, eq=False)
class FinetuneRun:
    """One finished analyses.finetune run: ``log`` (train_log.csv: a row per step, its loss and rates), ``info``
    (run.json: the settings under ``config``, placement, versions) and ``checkpoints`` (step → its
    ``checkpoint-<step>`` dir, an HF model dir)."""

    dir: Path
    log: pd.DataFrame
    info: dict[str, Any]
    checkpoints: dict[int, Path]

    __eq__ = _result_eq

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
        if not _ends_its_last_line(log_path):  # a cut inside the last number still parses: 123 tokens as 12
            raise BadInput(f"{log_path}: its last line is cut short (no line end after it; finetune writes whole "
                           "lines, so the file was cut or edited)")
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

    @_safe_repr
    def __repr__(self) -> str:
        """The model tuned, its steps, the checkpoints saved, the last step's loss."""
        cfg = self.info.get("config") or {}
        last = self.log.iloc[-1]
        what = (f"{short_name(cfg.get('model', '?'))} on {', '.join(cfg.get('data') or {}) or '?'}, "
                f"{counted(len(self.log), 'step')}, checkpoints at steps {', '.join(map(str, self.checkpoints))}, "
                f"last loss {last['loss']:.4g} (step {int(last['step'])})")
        return _summary(self, self.dir, what, f".log ({len(self.log)} rows) .info .checkpoints")


@dataclass(repr=False)
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

    @_safe_repr
    def __repr__(self) -> str:
        """The stages done (by their records: a stage's small JSON, the one file read; not its outputs) and the
        models."""
        stages = self.info.get("stages") or list(self.info["fingerprints"])
        undone = [st for st in stages if not self.recorded_complete(st)]
        done = (f"all {len(stages)} stages done" if not undone else
                f"{len(stages) - len(undone)} of {len(stages)} stages done, not: {_listing(undone, 6)}")
        what = (f"{done}; base {short_name(self.base)}, experts {_listing(short_name(e) for e in self.experts)}, "
                f"merges {', '.join(self.methods)}")
        return _summary(self, self.out, what, ".config .info .eval(name) .heads(model) .shift_per_model() "
                                              ".merge_dir(method) .complete(stage); load(dir / stage) reads any whole")

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

    def recorded_complete(self, stage: str) -> bool:
        """Whether the stage's record (DIR/stages/STAGE.json) says it completed with this run's settings (its
        fingerprint in replicate.json); ``complete`` checks its outputs are still there too."""
        from analyses.replicate import read_state

        st = read_state(self.out, stage)
        return st.get("status") == "complete" and st.get("fingerprint") == self.info["fingerprints"].get(stage)

    def complete(self, stage: str) -> bool:
        """Whether the stage completed with this run's settings; refused when it did but its outputs are gone."""
        from analyses.replicate import gone_text, missing_outputs

        if not self.recorded_complete(stage):
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

    @cached_property
    def label_roots(self) -> list[Path]:
        """Every folder this run was at when a stage ran, as spelt then (replicate.json's ``out`` and
        ``earlier_outs``: a copied or moved run's): the stages name the models they evaluate or map (merges, carriers,
        checkpoints) by their paths under it."""
        named = [self.info.get("out"), *(self.info.get("earlier_outs") or [])]
        return [Path(x) for x in named if isinstance(x, str) and x]

    def model_label(self, label: str) -> str:
        """A model's label in a stage's files as this run reads it back: one of its own models (``MODEL_STAGES``)
        named under any folder it was at (``label_roots``) is named under ``out``, where it is now; any other label
        as written. A ``cp -r``/``mv`` of a run, rerun or rebuilt there, looked its merges up under the new folder in
        rows named under the old one."""
        p = Path(label)
        for root in self.label_roots:
            n = len(root.parts)
            if p.parts[:n] == root.parts and len(p.parts) > n and p.parts[n] in MODEL_STAGES:
                return str(self.out.joinpath(*p.parts[n:]))
        if label in (self.base, *self.experts):
            return label
        # a run whose replicate.json a rerun in its copy rewrote before it kept earlier_outs: by the part of the
        # path from a model stage's folder on, where that names a folder here
        for n, part in enumerate(p.parts):
            if part in MODEL_STAGES and len(p.parts) > n + 1 and self.out.joinpath(*p.parts[n:]).is_dir():
                return str(self.out.joinpath(*p.parts[n:]))
        return label

    def merge_dir(self, method: str) -> str:
        """The merged model's dir, under ``out``: its label in the read-back tables (``eval``)."""
        return str(self.out / "merge" / method)

    def carrier(self, method: str, expert: str) -> str:
        return str(self.out / "merge" / method / "carriers" / short(expert))

    def eval(self, *parts: str) -> EvalRun:
        """A stage's probe.eval output, its own models labelled under ``out`` (``model_label``); read once per report
        build (``figures.reads_once``: tables, findings and figures each ask it)."""
        d = self.out.joinpath(*parts)
        return read_cached((EvalRun.read, str(self.out), str(d)), lambda: EvalRun.read(d, self.model_label))

    def sketch(self, fig: str) -> tuple[list[str], Any]:
        """A trajectory map's point names (its own models labelled as in ``eval``) and sketch."""
        from figures.trajectory import read_sketch

        names, x = read_sketch(self.out / "trajectory" / fig)
        return [self.model_label(n) for n in names], x

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
