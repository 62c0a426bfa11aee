"""Seeded random projection of a checkpoint's delta, computed streaming (DESIGN §6).

A count sketch (a sparse Johnson-Lindenstrauss projection): element j of tensor t goes to bucket h(j) with sign
s(j), both drawn from a generator seeded by (seed, tensor name, chunk index) for the chunk's elements of the
reference's tensor. So the sketch is deterministic per (seed, tensor name, reference), independent of file
layout and shard order, and inner products between deltas are preserved in expectation (E‖S δ‖² = ‖δ‖²). Which
other checkpoints are sketched changes only which vocabulary rows enter (those all of them have, as
``analyses.trajectory`` records in run.json's ``vocab``), never h or s of an element that does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

SKETCH_CHUNK = 1 << 20  # fixed: the hashes depend on it, so changing it changes every sketch
# Sketch dimensions accepted: below 2 nothing can be embedded; past 2^20 float64 buckets per checkpoint (8 MiB each,
# then PCA over them) memory runs out long before the projection gains anything (t-SNE sees tens of points).
SKETCH_DIMS = range(2, (1 << 20) + 1)


def chunk_seed(seed: int, name: str, chunk: int) -> int:
    h = hashlib.blake2b(f"{seed}\0{name}\0{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class CountSketch:
    dim: int
    seed: int = 0

    def hashes(self, name: str, chunk: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket index and ±1 sign of each of the ``n`` elements of ``name``'s chunk ``chunk``."""
        g = torch.Generator().manual_seed(chunk_seed(self.seed, name, chunk))
        buckets = torch.randint(self.dim, (n,), generator=g)
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int8).float().mul_(2).sub_(1)
        return buckets, signs

    @staticmethod
    def update(acc: torch.Tensor, delta: torch.Tensor, buckets: torch.Tensor, signs: torch.Tensor) -> None:
        acc.index_add_(0, buckets, delta.double() * signs.double())

    def project(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """In-memory sketch of one whole tensor (the definition the streaming code is tested against)."""
        acc = torch.zeros(self.dim, dtype=torch.float64)
        flat = delta.reshape(-1).float()
        for c, lo in enumerate(range(0, flat.numel(), SKETCH_CHUNK)):
            part = flat[lo:lo + SKETCH_CHUNK]
            b, s = self.hashes(name, c, part.numel())
            self.update(acc, part, b, s)
        return acc
