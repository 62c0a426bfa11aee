"""Figures drawn only from saved result files (``python -m figures KIND DIR``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from probe.errors import BadInput

NA_TEXT = ("", "nan")  # how a saved table spells a missing number (pandas writes NaN as an empty cell)


def save_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """``fig`` saved to ``path`` (format from its suffix) whole or not at all: a kill never leaves a 0-byte
    figure that a finished-looking run would show."""
    from probe.results import atomic_write_with

    atomic_write_with(Path(path), lambda tmp: fig.savefig(tmp, format=Path(path).suffix[1:], **savefig))
    return Path(path)


def save_png_pdf(fig: Any, result_dir: Path, stem: str, **savefig: Any) -> list[Path]:
    """Write ``fig`` as ``stem.png`` and ``stem.pdf`` in ``result_dir`` (``save_figure``) and close it."""
    import matplotlib.pyplot as plt

    written = [save_figure(fig, Path(result_dir) / f"{stem}.{ext}", **savefig) for ext in ("png", "pdf")]
    plt.close(fig)
    return written


def _missing(path: Path, source: str) -> BadInput:
    return BadInput(f"{path.parent}: no {path.name}" + (f" (not a finished {source} output)" if source else ""))


def read_table(path: Path, columns: Mapping[str, type], optional: Mapping[str, type] | None = None,
               source: str = "", **read_csv: Any) -> Any:
    """A saved CSV table, checked before anything is drawn from it: the file parses, every column of ``columns``
    is there (``optional`` ones may be absent), at least one row. Column kinds: ``str`` (kept as text), ``float``
    (numbers, empty = missing) and ``int`` (a count or index: whole, ≥ 0, never missing). Any problem is one
    BadInput naming the file; ``source`` is the command that writes it."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise _missing(path, source)
    try:
        df = pd.read_csv(path, **read_csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInput(f"{path}: not a readable table ({reason})") from None
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        raise BadInput(f"{path}: missing column{'s' if len(lacking) > 1 else ''} {', '.join(lacking)}"
                       + (f" (not as {source} writes it)" if source else ""))
    if df.empty:
        raise BadInput(f"{path}: no rows")
    kinds = {**columns, **{c: k for c, k in (optional or {}).items() if c in df.columns}}
    for col, kind in kinds.items():
        raw = df[col]
        if kind is str:
            df[col] = raw.where(raw.isna(), raw.astype(str))
            continue
        num = pd.to_numeric(raw, errors="coerce")
        text = raw.astype(str).str.strip().str.lower()
        bad = num.isna() & raw.notna() & ~text.isin(NA_TEXT)
        what = "numbers"
        if kind is int:
            bad |= num.isna() | (num % 1 != 0) | (num < 0)
            what = "whole numbers ≥ 0"
        if bad.any():
            i = int(bad.to_numpy().argmax())
            shown = "an empty cell" if text.iloc[i] in NA_TEXT else repr(raw.iloc[i])
            raise BadInput(f"{path}: column {col} must hold {what}; line {i + 2} has {shown}")
        df[col] = num.astype(int) if kind is int else num.astype(float)
    return df


def read_json(path: Path, source: str = "") -> dict[str, Any]:
    """A saved JSON object (run.json, baseline.json, ...); missing, unparsable or not an object is BadInput."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, source)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: not a JSON object")
    return obj


def name_colours(names: list[str]) -> dict[str, Any]:
    """A colour per name that follows the name, not its place in a list: tab10's colour at crc32(name). Two names of
    a figure that meet there are settled in sorted order (the later one takes the next free colour), so the same
    names get the same colours whatever their order, and a name keeps its colour in every figure where it meets no
    such clash. Beyond 10 names tab20 serves (then every colour differs from the ≤ 10 case)."""
    import zlib

    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10" if len(set(names)) <= 10 else "tab20")
    taken: set[int] = set()
    out = {}
    for name in sorted(set(map(str, names))):
        k = zlib.crc32(name.encode()) % palette.N
        while k in taken and len(taken) < palette.N:
            k = (k + 1) % palette.N
        taken.add(k)
        out[name] = palette(k)
    return {n: out[str(n)] for n in names}
