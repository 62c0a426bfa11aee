"""Figures drawn only from saved result files (``python -m figures KIND DIR``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def save_png_pdf(fig: Any, result_dir: Path, stem: str) -> list[Path]:
    """Write ``fig`` as ``stem.png`` and ``stem.pdf`` in ``result_dir`` and close it."""
    import matplotlib.pyplot as plt

    written = []
    for ext in ("png", "pdf"):
        path = result_dir / f"{stem}.{ext}"
        fig.savefig(path)
        written.append(path)
    plt.close(fig)
    return written
