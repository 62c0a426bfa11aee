"""The paper's formulas (sections 5.1, 5.3) as small pure functions in a registry (STYLE 6).

Merges are linear: each method only decides the coefficient of every input per tensor, and one streaming
kernel (``analyses.merge``) applies ``θ = Σ c_j θ_j`` chunk by chunk in fp32. The full-tensor functions here
are the in-memory definitions the streaming code is tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Formula:
    name: str
    equation: str  # where it is in the paper
    fn: Callable


FORMULAS: dict[str, Formula] = {}


def formula(name: str, equation: str) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        FORMULAS[name] = Formula(name, equation, fn)
        return fn

    return register


@formula("delta_avg", "Eq. 3")
def delta_avg(theta_ori: torch.Tensor, theta_mft: torch.Tensor) -> float:
    """Eq. 3: Δavg = avg |θ_ori − θ_mft|, in fp32 (fp64 accumulation)."""
    d = theta_ori.float() - theta_mft.float()
    return float(d.abs().sum(dtype=torch.float64) / max(d.numel(), 1))


@formula("average", "Eq. 1")
def average_coefficients(n: int) -> list[float]:
    """Eq. 1: θ = (1/n) Σ θ_i (the paper prints Σ; it is an average, DESIGN §5)."""
    return [1.0 / n] * n


@formula("weighted", "Eq. 2")
def weighted_coefficients(weights: Sequence[float], normalize: bool = True) -> list[float]:
    """Eq. 2: θ = Σ α_i θ_i with given α, normalised to sum 1 unless told otherwise."""
    return normalised(weights) if normalize else [float(w) for w in weights]


def normalised(weights: Sequence[float]) -> list[float]:
    """w_i / Σ w for non-negative weights, divided by the largest first: Σ w can overflow a float (1e308:1e308
    is a plain 1:1, not a sum of inf that makes every share 0); the ratios are unchanged."""
    top = max((float(w) for w in weights), default=0.0)
    if not top > 0 or not math.isfinite(top):
        raise ValueError("weights must be finite with a positive sum")
    scaled = [float(w) / top for w in weights]
    total = math.fsum(scaled)  # correctly rounded: the same bits whatever order the models were listed in
    return [w / total for w in scaled]


@formula("shift_softmax", "Eq. 4 (α_i)")
def shift_softmax(deltas: Sequence[float], temperature: float) -> list[float]:
    """α_i = softmax_i(Δavg_i / τ) for one tensor (the released code: softmax(1000·Δ), τ = 1e-3)."""
    z = [d / temperature for d in deltas]
    if not all(map(math.isfinite, z)):  # τ so small that Δ/τ overflows: the same softmax from Δ − max Δ (its limit)
        top = max(deltas)
        z = [(d - top) / temperature for d in deltas]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = math.fsum(e)  # correctly rounded: the same bits whatever order the models were listed in
    return [v / s for v in e]


@formula("shift", "Eq. 4")
def shift_coefficients(deltas: Sequence[float], alpha0: float, temperature: float) -> list[float]:
    """Eq. 4: θ = α0 θ_0 + (1 − α0) Σ α_i θ_i; returns [c_base, c_1, ..., c_n]."""
    return [alpha0] + [(1.0 - alpha0) * a for a in shift_softmax(deltas, temperature)]


def combine(thetas: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """θ = Σ c_j θ_j in fp32 (the in-memory reference; the merge streams the same sum chunk by chunk)."""
    acc = torch.zeros(thetas[0].shape, dtype=torch.float32)
    for t, c in zip(thetas, coefficients):
        acc.add_(t.float(), alpha=c)
    return acc


@dataclass
class ShiftStats:
    """Streaming accumulator for one (base, model) tensor pair: Eq. 3 plus max |Δ| and relative L2."""

    numel: int = 0
    sum_abs: float = 0.0
    max_abs: float = 0.0
    sum_sq: float = 0.0
    base_sq: float = 0.0

    @staticmethod
    def abs_sum(base: torch.Tensor, model: torch.Tensor) -> float:
        """Σ |θ − θ_0| of one chunk in fp64: Eq. 3's numerator, the same bits as ``add`` accumulates."""
        return float((model.float() - base.float()).abs().sum(dtype=torch.float64))

    def add(self, base: torch.Tensor, model: torch.Tensor) -> None:
        b = base.float()
        d = model.float() - b
        a = d.abs()
        self.numel += d.numel()
        self.sum_abs += float(a.sum(dtype=torch.float64))
        if d.numel():
            self.max_abs = max(self.max_abs, float(a.max()))
        # in fp64 (the norm casts first, no fp64 copy kept): in fp32 a weight past 1.8e19 squares to inf
        self.sum_sq += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
        self.base_sq += float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2

    @property
    def finite(self) -> bool:
        return math.isfinite(self.sum_abs) and math.isfinite(self.sum_sq) and math.isfinite(self.base_sq)

    @property
    def delta_avg(self) -> float:  # Eq. 3
        return self.sum_abs / max(self.numel, 1)

    @property
    def rel_l2(self) -> float:
        """‖θ − θ_base‖ / ‖θ_base‖: 0 for a tensor that did not move, zeros in the base included (inf there said
        the unchanged tensor moved most); inf, undefined, for a base of zeros the model moved."""
        if self.sum_sq == 0:
            return 0.0
        return math.sqrt(self.sum_sq) / math.sqrt(self.base_sq) if self.base_sq > 0 else math.inf


@formula("salience_normalise", "§9 (ours): ŝ_i = s_i / mean s_i")
def normalise_salience(s: torch.Tensor) -> torch.Tensor:
    """ŝ_i = s_i / mean_{L,h} s_i for one participant's [n_layers, n_heads] salience, negatives (a head whose
    removal helped) clamped to 0 first, so a model whose heads all matter a lot does not win everything."""
    s = s.double().clamp_min(0.0)
    mean = float(s.mean())
    if math.isinf(mean):  # finite saliences whose sum overflows (s / inf was 0 everywhere): the same ratios, scaled
        s = s / float(s.max())
        mean = float(s.mean())
    if not mean > 0:
        raise ValueError("salience is zero for every head")
    return s / mean


@formula("salience", "§9 (ours): per-slice weights from head salience")
def salience_weights(shat: torch.Tensor, temperature: float, alpha0: float | None) -> torch.Tensor:
    """Weights of the participants for one slice (or, vectorised, for many: ``shat`` is [P, ...]).

    With the base's salience in ``shat[0]`` (``alpha0`` None): w = softmax over all participants of ŝ / τ_s.
    Without it (``shat`` holds the experts only): the base keeps α0 and the experts share 1 − α0 by
    softmax(ŝ / τ_s). Returns [n_participants incl. base, ...] in float64, summing to 1 over dim 0.
    """
    z = shat.double() / temperature
    if not bool(torch.isfinite(z).all()):  # τ_s so small that ŝ/τ_s overflows: shift by the max first (same softmax)
        z = (shat.double() - shat.double().amax(0, keepdim=True)) / temperature
    e = (z - z.amax(0, keepdim=True)).exp()
    # softmax over dim 0, its sum taken over the values sorted: the same bits whatever order the participants
    # were listed in (torch.softmax sums in index order)
    w = e / e.sort(dim=0).values.sum(0, keepdim=True)
    if alpha0 is None:
        return w
    return torch.cat([torch.full_like(w[:1], alpha0), (1.0 - alpha0) * w])


@formula("task_arithmetic", "task arithmetic (Ilharco et al. 2023), mergekit's task_arithmetic")
def task_arithmetic_coefficients(n: int, lam: float) -> list[float]:
    """θ = θ_0 + λ Σ (θ_i − θ_0) as coefficients of [θ_0, θ_1, …, θ_n]."""
    return [1.0 - lam * n] + [lam] * n


@dataclass
class TiesTrim:
    """TIES' trim of one task vector δ: keep exactly k = max(1, ⌊density · numel⌋) entries, those of largest |δ|
    (mergekit's ``magnitude``). Entries tied with the k-th largest |δ| (common in bf16 checkpoints, whose deltas
    take few distinct values) are kept in flat-index order until k are kept; mergekit picks among them by an
    unstable sort, so which tied entries it keeps is unspecified, but it too keeps exactly k.

    ``mask`` must see the tensor's chunks in flat order, once each: it counts down the tied entries left."""

    threshold: float  # the k-th largest |δ|
    ties_left: int  # entries equal to it still to keep

    @staticmethod
    def of(delta: torch.Tensor, density: float) -> "TiesTrim":
        flat = delta.reshape(-1).abs().float()
        k = max(1, int(density * flat.numel()))
        t = float(torch.kthvalue(flat, flat.numel() - k + 1).values)
        return TiesTrim(t, k - int((flat > t).sum()))

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        a = delta.abs()
        keep = a > self.threshold
        tied = a == self.threshold
        if self.ties_left > 0:
            rank = tied.reshape(-1).cumsum(0).reshape(tied.shape)  # 1-based rank among this chunk's ties
            keep |= tied & (rank <= self.ties_left)
        self.ties_left -= min(self.ties_left, int(tied.sum()))
        return keep


HALF_BITS = 16  # a float32's bits, looked at a half at a time


class TrimSearch:
    """``TiesTrim.of`` for a task vector seen in chunks, in memory independent of its size: the same k-th largest
    |δ| by radix select on |δ|'s float32 bits (for non-negative floats integer order is value order; NaN sorts
    above inf, as in ``torch.kthvalue``). The first pass over the chunks counts their high 16 bits, which fixes the
    k-th largest's high half; the second counts the low 16 bits of the entries of that high half. Each pass sees
    every chunk once, in any order. ``kthvalue`` needed δ and |δ| whole in fp32, its copy and int64 indices: 10.9 GB
    for a 7B model's embedding, about 25 GB for a 72B one's (README, Merge benchmark)."""

    def __init__(self, numel: int, density: float):
        self.k = max(1, int(density * numel))
        self.counts = torch.zeros(1 << (HALF_BITS - 1), dtype=torch.int64)  # the sign bit of |δ| is 0
        self.high: int | None = None  # the k-th largest's high half, once the first pass is over
        self.above = 0  # entries above that high half

    def count(self, delta: torch.Tensor) -> None:
        """Add one chunk of δ to the current pass's counts."""
        bits = delta.float().abs().reshape(-1).view(torch.int32)
        if self.high is None:
            self.counts += torch.bincount(bits >> HALF_BITS, minlength=len(self.counts))
        else:
            low = bits[(bits >> HALF_BITS) == self.high] & ((1 << HALF_BITS) - 1)
            self.counts += torch.bincount(low, minlength=len(self.counts))

    def end_pass(self) -> None:
        """After the first pass: keep the high half where the k-th largest lies and count its low halves next."""
        self.high, self.above = self._kth(self.counts, self.k)
        self.counts = torch.zeros(1 << HALF_BITS, dtype=torch.int64)

    def trim(self) -> TiesTrim:
        """After the second pass: the k-th largest |δ| and how many entries tied with it are kept."""
        assert self.high is not None, "end_pass() after the first pass"
        low, above = self._kth(self.counts, self.k - self.above)
        bits = torch.tensor([(self.high << HALF_BITS) | low], dtype=torch.int32)
        return TiesTrim(float(bits.view(torch.float32)), self.k - self.above - above)

    @staticmethod
    def _kth(counts: torch.Tensor, k: int) -> tuple[int, int]:
        """The bin holding the k-th largest entry, and how many entries lie in the bins above it."""
        above = counts.flip(0).cumsum(0)  # above[j]: entries in the top j + 1 bins
        j = int(torch.searchsorted(above, k))  # the first top-(j + 1) holding k or more entries
        return len(counts) - 1 - j, int(above[j - 1]) if j else 0


def ties_combine(base: torch.Tensor, deltas: Sequence[torch.Tensor], trims: Sequence[TiesTrim],
                 lam: float) -> torch.Tensor:
    """TIES on one chunk: trim each δ_i (``TiesTrim``), elect the sign of Σ trimmed δ (ties → +), average the
    trimmed δ_i that agree with it (disjoint mean), θ = θ_0 + λ · mean (all fp32)."""
    trimmed = torch.stack([d * tr.mask(d) for d, tr in zip(deltas, trims)])
    sign = (trimmed.sum(0) >= 0).to(trimmed.dtype) * 2 - 1
    agree = (trimmed.sign() == sign).to(trimmed.dtype)
    count = agree.sum(0)
    mixed = (trimmed * agree).sum(0) / torch.where(count == 0, torch.ones_like(count), count)
    return base.float() + lam * mixed


@formula("ties", "TIES-Merging (Yadav et al. 2023), mergekit's ties")
def ties_merge(base: torch.Tensor, thetas: Sequence[torch.Tensor], density: float, lam: float) -> torch.Tensor:
    """In-memory TIES over whole tensors: the definition the streaming merge is tested against."""
    deltas = [t.float() - base.float() for t in thetas]
    return ties_combine(base, deltas, [TiesTrim.of(d, density) for d in deltas], lam)
