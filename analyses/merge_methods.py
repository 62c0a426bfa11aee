"""analyses.merge's torch-free parts: its ``--method``s as data (which need a base, whose rows merge_weights.csv
holds, what their coefficients are), merge_weights.csv's columns, the names it gives carriers
(``carrier_name``) and the fingerprint its manifest keeps of each salience run (``run_fingerprint``). ``python -m
figures merge`` checks a saved merge_weights.csv against the table and the salience runs it draws against those
fingerprints, and ``figures report`` finds a replication's carriers by their names, without loading torch
(importing ``analyses.merge`` did, ~1.5 s). ``analyses.merge`` builds its ``METHODS`` from this table, adding each
method's fixed coefficients (its name is its formula's in the analyses.formulas registry, which holds the
equations)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

COMMAND = "analyses.merge"  # what its output manifests name
# merge_weights.csv, one row per tensor (slice "all") or head slice per model: ``weight`` is the model's coefficient
# w_i in θ_slice = Σ_i w_i θ_i,slice (empty for ties, which has none), ``delta_avg`` the Eq. 4 Δavg it came from
# (empty where none did), ``trim_threshold`` ties' k-th largest |θ_i − θ_0| kept (empty for every other method)
WEIGHTS_HEADER = ("tensor", "slice", "model", "delta_avg", "weight", "trim_threshold")


@dataclass(frozen=True)
class MethodKind:
    """What a ``--method`` is, as data (``figures.merge`` checks merge_weights.csv against it too)."""

    needs_base: bool  # the formula reads the base model (Δ to it, or task vectors from it)
    base_row: bool  # the base is a weighted participant: merge_weights.csv holds its row
    convex: bool  # weights in [0, 1] summing to 1 (weighted's: unless --no-normalize)
    reads_shift: bool = False  # Eq. 4's Δavg decides coefficients (computed, or from --shift)
    trims: bool = False  # no per-model coefficient: merge_weights.csv holds each expert's trim threshold instead


# the base of average and weighted merges only supplies vocabulary rows; task arithmetic's weights are
# [1 − λn, λ, …, λ] (affine: they sum to 1, outside [0, 1]); ties has no weight, only each task vector's trim
METHOD_KINDS: dict[str, MethodKind] = {
    "average": MethodKind(needs_base=False, base_row=False, convex=True),
    "weighted": MethodKind(needs_base=False, base_row=False, convex=True),
    "shift": MethodKind(needs_base=True, base_row=True, convex=True, reads_shift=True),
    "salience": MethodKind(needs_base=True, base_row=True, convex=True, reads_shift=True),
    "task_arithmetic": MethodKind(needs_base=True, base_row=True, convex=False),
    "ties": MethodKind(needs_base=True, base_row=False, convex=False, trims=True)}


def carrier_name(spec: str, path: Path | None = None) -> str:
    """The name a model gets under ``DIR/carriers/``: a checkpoint directory's own name (``path``, where it was
    resolved, else the spec's last component), an alias as written. ``analyses.replicate`` finds carriers by it.
    A Hugging Face cache snapshot (``models--Org--Name/snapshots/<commit>``) is named after the model, not the commit."""
    if not Path(spec).is_dir():
        return spec
    d = path or Path(spec)
    hub = d.parent.parent.name if d.parent.name == "snapshots" else ""
    return hub.split("--")[-1] if hub.startswith("models--") else d.name


def run_fingerprint(run_dir: Path, table: bytes | None = None) -> str:
    """What a merge reads of a ``probe.heads`` run: heads.csv's bytes and run.json's plan, measured model and status
    (``read_salience``, ``check_run_model``); not its timestamps, versions or figures, so the same sweep computed
    again is the same input to a merge's manifest. A run without them is fingerprinted whole (it is refused later).
    ``table``: heads.csv's bytes where the caller has read them (figures merge draws what it fingerprints)."""
    from probe.results import content_fingerprint, json_digest, read_run_json

    try:
        info = read_run_json(run_dir)
        read = {k: info.get(k) for k in ("plan", "model_resolved_path", "status")}
        table = (run_dir / "heads.csv").read_bytes() if table is None else table
    except (OSError, ValueError, AttributeError):
        return content_fingerprint(run_dir)
    return json_digest(read, table)
