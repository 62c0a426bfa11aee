"""Head salience read from ``probe.heads`` runs, turned into per-slice merge weights (DESIGN §9).

A participant's run gives s_i(L, h) (mean KL by default, or an accuracy drop) for every head of its LM; it is
normalised per participant (``normalise_salience``) and turned into weights by ``salience_weights``. The
slices a head owns: ``q_proj`` rows [h·d, (h+1)·d) and their bias, ``o_proj`` columns [h·d, (h+1)·d); KV
group g = h // (H / H_kv) owns ``k_proj``/``v_proj`` rows [g·d, (g+1)·d), weighted by the mean ŝ of its query
heads. Everything here is small ([n_layers, n_heads] tables); the merge streams the tensors.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from analyses.formulas import normalise_salience, salience_weights
from probe.errors import BadInput
from probe.families import LAYER_TENSOR, check_layers_held
from probe.lm_config import HeadGeometry
from probe.results import HEAD_METRIC_BOUNDS

METRICS = tuple(HEAD_METRIC_BOUNDS)  # kl, accuracy_drop, prob_accuracy_drop: heads.csv's salience columns
# o_proj's bias (Llama-style attention_bias) is added once after the heads are summed: no head owns it
HEAD_TENSOR = re.compile(r"layers\.(\d+)\.self_attn\.(?:([qkv])_proj\.(?:weight|bias)|(o)_proj\.weight)$")


def check_run_model(run_dir: Path, who: str, participants: dict[str, Path]) -> dict[str, Any]:
    """A salience run must be of the participant it is given for: refuse a run measured on another participant
    (runs swapped, or the base's run given for an expert). Returns what merge.json records of the run (the model
    and data it measured, and how) with its ``warnings``: a run of a model elsewhere (a copy?), an attribution
    estimate. The caller prints them once every run has passed, so a refusal stays the only line on stderr."""
    from probe.results import read_run_json

    try:
        info = read_run_json(run_dir)  # None when missing or unreadable
        plan = info["plan"]
        # the absolute path (probe.heads records it beside the plan); plan.model_path is the spec as given, relative
        # to the cwd probe.heads ran in, which resolved here pointed elsewhere: swapped runs passed with a warning
        measured = info.get("model_resolved_path") or plan["model_path"]
    except (KeyError, TypeError):
        return {"run": str(run_dir), "for": who, "warnings": [
            f"{run_dir / 'run.json'} does not name the model it measured (not a probe.heads run.json?); it is used "
            f"as {who}'s run unchecked"]}
    record = {"run": str(run_dir), "for": who, "model": measured,
              **{k: plan.get(k) for k in ("model_fingerprint", "data_dir", "data_fingerprint", "n_items", "method")}}
    warnings = [w] if (w := check_measured_model(run_dir, who, participants, measured,
                                                  plan.get("model_fingerprint"))) else []
    if plan.get("method") == "attribution":  # DESIGN §4: a first-order estimate, not the sweep
        warnings.append(f"salience run {run_dir} is an attribution-patching estimate (probe.heads --method "
                        f"attribution), not the exact sweep; {who}'s head weights follow it")
    from probe.mmmu import EVALUATION_SPLITS

    split = (plan.get("settings") or {}).get("split") if isinstance(plan.get("settings"), dict) else None
    record["split"] = split
    if split in EVALUATION_SPLITS:  # probe.heads' default: the weights are tuned on the items a user then scores
        warnings.append(f"salience run {run_dir} swept the {split!r} split of {plan.get('data_dir')}: {who}'s head "
                        f"weights are set by those items, so this merge scored on them is not a held-out result "
                        f"(sweep items it is not scored on: MMMU's dev split, or a train split such as python -m probe.zoo "
                        f"data writes for the organisms: probe.heads --data DIR --split train)")
    return record | {"warnings": warnings}


def check_measured_model(run_dir: Path, who: str, participants: dict[str, Path], measured: str,
                         fingerprint: object) -> str | None:
    """Refuse a run of another participant; a warning when the run measured weights elsewhere."""
    if not Path(measured).is_absolute():  # an older run.json: where its relative path pointed is unknown here,
        if same_weights(fingerprint, participants[who]):  # so the participants are told apart by their files
            return None
        other = next((nm for nm, p in participants.items() if nm != who and same_weights(fingerprint, p)), None)
        if other is None:
            return (f"salience run {run_dir} names its model by the relative path {measured} (an older "
                    f"probe.heads) and did not measure {who}'s current files; it is used as that model's run")
    else:
        measured_path = Path(measured).resolve()
        if measured_path == participants[who].resolve():
            check_same_weights(run_dir, who, measured_path, fingerprint)
            return None
        other = next((nm for nm, p in participants.items() if p.resolve() == measured_path), None)
    if other is not None:
        raise BadInput(f"salience run {run_dir} measured {other}, but it is given for {who}; give each model its "
                       "own run, in the order of --models")
    if same_weights(fingerprint, participants[who]):  # a byte-identical copy is the model itself
        return None
    return f"salience run {run_dir} measured {measured}, not {who} ({participants[who]}); it is used as that model's run"


def same_weights(measured: object, path: Path) -> bool:
    """The run's recorded model fingerprint is that of the files at ``path`` now."""
    from probe.models import local_fingerprint

    return local_model(measured) and local_fingerprint(path) == measured


def local_model(fingerprint: object) -> bool:
    """A run.json's model fingerprint that names local files (not an older run.json's missing one, nor a hub
    commit's, which its path already names)."""
    return isinstance(fingerprint, str) and not fingerprint.startswith("hub:")


def check_same_weights(run_dir: Path, who: str, path: Path, measured: object) -> None:
    """A run of the participant's own dir must have measured its current weights: a model retrained or re-merged
    in place since its salience run would otherwise be merged by the saliences of its old weights (exit 0)."""
    if not local_model(measured) or same_weights(measured, path):
        return
    from probe.models import local_fingerprint

    raise BadInput(f"salience run {run_dir} measured {who} before its files changed (model fingerprint "
                   f"{measured} then, {local_fingerprint(path)} now); rerun python -m probe.heads on the current "
                   "model")


def read_salience(run_dir: Path, metric: str, geometry: HeadGeometry, who: str) -> tuple[torch.Tensor, bytes]:
    """[n_layers, n_heads] salience of a complete ``probe.heads`` run covering every head of the model, with
    heads.csv's bytes as read (the merge's manifest fingerprints those, not a second read of a file that may have
    been rewritten since)."""
    heads_csv, run_json = run_dir / "heads.csv", run_dir / "run.json"
    if not heads_csv.is_file() or not run_json.is_file():
        raise BadInput(f"--salience {run_dir}: not a probe.heads run (no heads.csv / run.json)")
    from probe.results import read_run_json

    info = read_run_json(run_dir)
    if not isinstance(info, dict):
        raise BadInput(f"{run_json}: unreadable")
    status = info.get("status")
    if status != "complete":
        raise BadInput(f"--salience {run_dir}: the run is not complete (status {status!r}); finish it first")
    try:  # csv, not pandas: importing pandas would cost the merge more than reading the table
        table = heads_csv.read_bytes()
        reader = csv.DictReader(io.StringIO(table.decode("utf-8"), newline=""))
        rows, columns = list(reader), reader.fieldnames or []
        if missing := [c for c in ("layer", "head", metric) if c not in columns]:
            raise BadInput(f"{heads_csv}: no {', '.join(map(repr, missing))} column")
        if any(None in r.values() for r in rows):  # csv gives a short row's last fields as None (was exit 1)
            raise BadInput(f"{heads_csv}: a row has fewer fields than the header (cut short?)")
        # pandas writes NaN as an empty cell (a --no-generate run's accuracy): NaN, for the check below to name
        cells = {(int(r["layer"]), int(r["head"])): float(r[metric]) if r[metric].strip() else math.nan for r in rows}
    except BadInput:  # the refusals above say what is wrong themselves (BadInput is a ValueError)
        raise
    except (OSError, ValueError, csv.Error) as exc:
        raise BadInput(f"{heads_csv}: unreadable ({exc})") from None
    want = {(layer, h) for layer in range(geometry.n_layers) for h in range(geometry.n_heads)}
    if set(cells) == want and len(rows) != len(want):  # every head there, some twice: the run did sweep them all
        raise BadInput(f"{heads_csv}: {len(rows)} rows for {len(want)} (layer, head) pairs; one row per head (a file "
                       "appended to twice?)")
    if set(cells) != want:
        # what it covers, as layers x heads: 8 pairs of 4 layers x 2 heads were said as "8 pairs, but 2 x 4"
        seen = f"{len({layer for layer, _ in cells})} layers x {len({h for _, h in cells})} heads"
        raise BadInput(f"{heads_csv}: covers {len(cells)} (layer, head) pairs of {seen}"
                       f"{f' in {len(rows)} rows' if len(rows) != len(cells) else ''}, but {who} has "
                       f"{geometry.n_layers} layers x {geometry.n_heads} heads; sweep every head (--layers all "
                       "--heads all) of that model")
    grid = torch.zeros(geometry.n_layers, geometry.n_heads, dtype=torch.float64)
    for (layer, h), v in cells.items():
        grid[layer, h] = v
    if not torch.isfinite(grid).all():
        why = ("; a --no-generate or attribution run measured no accuracy: use --salience-metric kl or "
               "prob_accuracy_drop"
               if metric == "accuracy_drop" else "")
        raise BadInput(f"{heads_csv}: {metric} is NaN (empty or infinite) for some heads{why}")
    (lo, hi), least, most = HEAD_METRIC_BOUNDS[metric], float(grid.min()), float(grid.max())
    if least < lo or most > hi:  # e.g. a negative KL, a drop of 7: not what probe.heads writes
        raise BadInput(f"{heads_csv}: {metric} must lie in [{lo:g}, {hi:g}] for every head, one has "
                       f"{least if least < lo else most:.3g}; not a probe.heads salience")
    if not most > 0:  # normalise_salience divides by the mean of the clamped table: name the run here
        raise BadInput(f"{heads_csv}: {metric} is ≤ 0 for every head (no removal hurt {who} on these items); "
                       "nothing to weight its heads by: use more items or another --salience-metric")
    return grid, table


@dataclass
class SalienceWeights:
    """Per-head and per-layer weights of every participant (base first): w_head [P, L, H], w_group [P, L, G],
    w_layer [P, L], each summing to 1 over P."""

    head: torch.Tensor
    group: torch.Tensor
    layer: torch.Tensor
    geometry: HeadGeometry
    runs: list[dict[str, Any]] = field(default_factory=list)  # check_run_model's records, for merge.json

    @staticmethod
    def build(saliences: Sequence[torch.Tensor], geometry: HeadGeometry, temperature: float,
              alpha0: float, with_base: bool, runs: Sequence[dict[str, Any]] = ()) -> "SalienceWeights":
        """``saliences``: raw [L, H] tables, the base's first when ``with_base``; ``runs``: their records."""
        try:
            shat = torch.stack([normalise_salience(s) for s in saliences])  # [P', L, H]
        except ValueError as exc:
            raise BadInput(f"salience: {exc}") from None
        per_group = geometry.n_heads // geometry.n_kv_heads
        group_shat = shat.unflatten(-1, (geometry.n_kv_heads, per_group)).mean(-1)
        layer_shat = shat.mean(-1)
        a0 = None if with_base else alpha0
        return SalienceWeights(salience_weights(shat, temperature, a0), salience_weights(group_shat, temperature, a0),
                               salience_weights(layer_shat, temperature, a0), geometry, list(runs))

    def _owner_weights(self, canon: str) -> tuple[str, torch.Tensor] | None:
        """(projection letter, [P, H] per query head for q/o or [P, G] per KV group for k/v); None for tensors
        no head owns."""
        m = HEAD_TENSOR.match(canon)
        if m is None:
            return None
        layer, proj = int(m.group(1)), m.group(2) or m.group(3)
        return proj, self.head[:, layer] if proj in "qo" else self.group[:, layer]

    def slice_coefficients(self, canon: str, shape: Sequence[int]) -> tuple[int, torch.Tensor] | None:
        """For a head-owned tensor: (axis, [P, shape[axis]] per-row or per-column weights); else None."""
        owned = self._owner_weights(canon)
        if owned is None:
            return None
        proj, per = owned
        vec = per.repeat_interleave(self.geometry.head_dim, dim=1)
        axis = 1 if proj == "o" else 0
        if vec.shape[1] != shape[axis]:
            raise BadInput(f"{canon}: {shape[axis]} rows/columns, but the salience geometry gives {vec.shape[1]}")
        return axis, vec

    def layer_coefficients(self, canon: str) -> list[float] | None:
        """For any other tensor of layer L (``--rest layer``): the layer's weights; None outside the layers."""
        m = LAYER_TENSOR.match(canon)
        return None if m is None else self.layer[:, int(m.group(1))].tolist()

    def check_tensors(self, shapes: Sequence[tuple[str, Sequence[int]]], where: str) -> None:
        """Before anything is written: every (canonical name, shape) of the LM lies in a layer the salience tables
        cover, every layer they cover has tensors (probe.families.check_layers_held: a checkpoint may hold decoder
        layers its config.json does not build, which no probe.heads run measured, and the merge stopped at the first
        such tensor with an IndexError traceback), and each head-owned tensor has the rows or columns the head
        geometry gives."""
        check_layers_held(self.geometry.n_layers, [canon for canon, _ in shapes], where)
        for canon, shape in shapes:
            self.slice_coefficients(canon, shape)

    def slice_rows(self, canon: str, names: Sequence[str]) -> list[tuple[str, str, str, float]]:
        """merge_weights.csv rows of a head-owned tensor: (tensor, slice, model, weight) per head or group."""
        proj, per = self._owner_weights(canon)
        d = self.geometry.head_dim
        what = "columns" if proj == "o" else "rows"
        return [(canon, f"{what} {j * d}:{(j + 1) * d}", nm, float(per[p, j]))
                for j in range(per.shape[1]) for p, nm in enumerate(names)]
