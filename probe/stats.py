"""Error bars for evaluation (DESIGN §8): seeded percentile bootstrap over items, plain and paired.

Each interval draws from a generator seeded by the run's seed and a key naming the data set (its folder's name)
and metric, never the model: every model on a data set is resampled alike, so an interval does not change when other models or data
sets are added to a run, nor when the same model is evaluated under another name or path (a merge written to two
output directories gets the same interval).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
CHUNK = 1 << 21  # resampled values held at once (16 MB of indices): a 12k-item set would need 24M for all 2000


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on the items themselves
    lo: float
    hi: float


NAN = Interval(float("nan"), float("nan"), float("nan"))


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_mean(values: np.ndarray, seed: int, key: str, n_boot: int = N_BOOT, level: float = LEVEL) -> Interval:
    """Mean of ``values`` with a percentile bootstrap interval (items resampled with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or np.isnan(v).any():
        return NAN
    rng = _rng(seed, key)
    means = np.empty(n_boot)
    rows = max(1, CHUNK // v.size)
    for start in range(0, n_boot, rows):  # row-wise draws continue one stream: the same resamples as one table
        stop = min(start + rows, n_boot)
        means[start:stop] = v[rng.integers(0, v.size, size=(stop - start, v.size))].mean(axis=1)
    return Interval(float(v.mean()), *_percentiles(means, level))


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int, key: str, n_boot: int = N_BOOT,
                      level: float = LEVEL) -> Interval:
    """mean(a − b) over the same items, with a paired bootstrap interval (one resample of items for both)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    return bootstrap_mean(a - b, seed, key, n_boot, level)


def all_alike_interval(n: int, all_right: bool, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval of a rate whose ``n`` binary items all came out alike, where the
    percentile bootstrap has zero width (every resample is the same): all right → [((1 − level)/2)^(1/n), 1],
    all wrong → [0, 1 − ((1 − level)/2)^(1/n)]. E.g. 16 of 16 right: [0.794, 1]."""
    if n < 1:
        raise ValueError(f"need at least one item, got {n}")
    edge = ((1 - level) / 2) ** (1 / n)
    return (edge, 1.0) if all_right else (0.0, 1 - edge)


def reported_interval(v: float, lo: float, hi: float, n: int) -> tuple[float, float]:
    """The 95 % interval a rate ``v`` of ``n`` items is reported with (scores.csv's note, table.md's †, the figures):
    its bootstrap interval [lo, hi], but at 0 % or 100 %, where that has zero width however few the items, the
    exact one (``all_alike_interval``): 0 of 16 is not a certain 0."""
    if n >= 1 and v in (0.0, 1.0) and lo == hi == v:
        return all_alike_interval(int(n), v == 1.0)
    return lo, hi

