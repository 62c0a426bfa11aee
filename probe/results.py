"""Result files of a head sweep: resumable per-chunk parts, then heads.csv / items.parquet / baseline.json.

A run directory holds ``run.json`` (settings + fingerprint), ``parts/chunk_NNNNN.parquet`` (one file per unit of
work, written atomically, skipped when present: baukit's reserve_dir idea) and, once every part exists, the
assembled outputs. The assembled files are pure functions of the parts, so a resumed run ends with the same
files as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from probe.errors import BadInput, check_out_path
from probe.sweep import BASELINE, COLUMNS

OUTPUT_FILES = ("heads.csv", "baseline.json", "items.parquet", "run.json", "heatmap_*")
METRICS = ("accuracy", "prob_accuracy", "kl")


def _file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask); mkstemp's 0o600 is for secrets, not results."""
    try:  # Linux reports the umask without changing it (no window in which another thread sees umask 0)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_beside(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def part_path(out: Path, chunk: int) -> Path:
    return out / "parts" / f"chunk_{chunk:05d}.parquet"


def prepare_out_dir(out: Path, fingerprint: str, overwrite: bool, owned: Iterable[str] = OUTPUT_FILES) -> bool:
    """Check an existing run dir against this run's fingerprint. Returns True if it can be resumed.

    A different run is never mixed in: it needs ``--overwrite``, which removes only the files this tool owns
    (``parts/`` and the ``owned`` names or glob patterns).
    """
    run_json = out / "run.json"
    check_out_path(out)
    if not out.exists() or not any(out.iterdir()):
        return False
    if overwrite:
        clear_run_dir(out, owned)
        return False
    if not run_json.is_file():
        raise BadInput(f"--out {out} is not empty and holds no run.json; pick another dir or pass --overwrite")
    try:
        previous = json.loads(run_json.read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        raise BadInput(f"{run_json} is unreadable; pass --overwrite to start fresh") from None
    if previous != fingerprint:
        raise BadInput(f"--out {out} holds a different run (settings differ); use another --out or --overwrite")
    return True


def clear_run_dir(out: Path, owned: Iterable[str] = OUTPUT_FILES) -> None:
    shutil.rmtree(out / "parts", ignore_errors=True)
    for pattern in owned:
        for path in out.glob(pattern):
            path.unlink()


def read_part(path: Path, columns: Iterable[str] = COLUMNS) -> pd.DataFrame:
    """One saved part; an unreadable or foreign one (a kill mid-copy, a disk error) is bad input naming it."""
    fix = "delete it and rerun the same command to recompute it"
    try:
        df = pd.read_parquet(path)
    except FileNotFoundError:
        raise BadInput(f"{path} is missing; rerun the same command to recompute it") from None
    except Exception as exc:  # pyarrow raises its own types (ArrowInvalid, OSError) for damaged files
        reason = str(exc).split("\n")[0].split(". ")[0].rpartition(f"{path}': ")[2] or type(exc).__name__
        raise BadInput(f"{path} is unreadable ({reason}); {fix}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise BadInput(f"{path} lacks columns {', '.join(missing)}; {fix}")
    return df


def read_parts(out: Path, chunks: Iterable[int]) -> pd.DataFrame:
    frames = [read_part(part_path(out, c)) for c in chunks]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    return df[COLUMNS]


def _agg(df: pd.DataFrame) -> dict[str, float]:
    return {
        "accuracy": float(df["correct"].mean()),
        "prob_accuracy": float(df["prob_correct"].mean()),
        "kl": float(df["kl"].mean()),
        "p_answer": float(df["p_answer"].mean()),
    }


def summarize(items: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """heads.csv rows (masked values and drops from baseline) and the baseline summary."""
    is_base = (items["layer"] == BASELINE) & (items["head"] == BASELINE)
    base_rows = items[is_base]
    baseline = _agg(base_rows) | {"n_items": int(len(base_rows))}
    baseline["per_subject"] = {
        s: _agg(g) | {"n_items": int(len(g))} for s, g in base_rows.groupby("subject", sort=True)
    }
    records = []
    for (layer, head), g in items[~is_base].groupby(["layer", "head"], sort=True):
        a = _agg(g)
        records.append({
            "layer": int(layer),
            "head": int(head),
            "accuracy": a["accuracy"],
            "prob_accuracy": a["prob_accuracy"],
            "kl": a["kl"],
            "n_items": int(len(g)),
            "accuracy_drop": baseline["accuracy"] - a["accuracy"],
            "prob_accuracy_drop": baseline["prob_accuracy"] - a["prob_accuracy"],
            "p_answer": a["p_answer"],
        })
    return pd.DataFrame.from_records(records), baseline


def write_outputs(out: Path, items: pd.DataFrame, baseline_extra: dict[str, Any]) -> pd.DataFrame:
    heads, baseline = summarize(items)
    baseline |= baseline_extra
    atomic_write_parquet(out / "items.parquet", items)
    atomic_write_bytes(out / "heads.csv", heads.to_csv(index=False).encode())
    atomic_write_json(out / "baseline.json", baseline)
    return heads
