"""analyses.merge's ``--method``s as data: which need a base, whose rows merge_weights.csv holds, what their alphas
are. Torch-free, so that ``python -m figures merge`` (and ``report``) check a saved merge_weights.csv against it
without loading torch (importing ``analyses.merge`` for its table did, ~1.5 s); ``analyses.merge`` builds its
``METHODS`` from this table, adding each method's fixed coefficients (its name is its formula's in the
analyses.formulas registry, which holds the equations)."""
from __future__ import annotations

from dataclasses import dataclass

COMMAND = "analyses.merge"  # what its output manifests name


@dataclass(frozen=True)
class MethodKind:
    """What a ``--method`` is, as data (``figures.merge`` checks merge_weights.csv against it too)."""

    needs_base: bool  # the formula reads the base model (Δ to it, or task vectors from it)
    base_row: bool  # the base is a weighted participant: merge_weights.csv holds its alpha
    convex: bool  # alphas are weights in [0, 1] summing to 1 (weighted's: unless --no-normalize)
    reads_shift: bool = False  # Eq. 4's Δavg decides coefficients (computed, or from --shift)


# the base of average and weighted merges only supplies vocabulary rows; ties' alphas are trim thresholds of the
# task vectors, task arithmetic's coefficients (1 − λk for the base)
METHOD_KINDS: dict[str, MethodKind] = {
    "average": MethodKind(needs_base=False, base_row=False, convex=True),
    "weighted": MethodKind(needs_base=False, base_row=False, convex=True),
    "shift": MethodKind(needs_base=True, base_row=True, convex=True, reads_shift=True),
    "salience": MethodKind(needs_base=True, base_row=True, convex=True, reads_shift=True),
    "task_arithmetic": MethodKind(needs_base=True, base_row=True, convex=False),
    "ties": MethodKind(needs_base=True, base_row=False, convex=False)}
