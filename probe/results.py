"""Result files of a head sweep: resumable per-chunk parts, then heads.csv / items.parquet / baseline.json.

A run directory holds ``run.json`` (settings + fingerprint), ``parts/chunk_NNNNN.parquet`` (one file per unit of
work, written atomically, skipped when present: baukit's reserve_dir idea) and, once every part exists, the
assembled outputs. The assembled files are pure functions of the parts, so a resumed run ends with the same
files as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd

from probe.devices import rank_world
from probe.errors import BadInput, RunStopped, check_out_path, drop_partial, make_out_dir, write_stopped

# the rows every sweep engine returns (probe.sweep) and a part holds: defined here, with no torch, so that readers of
# saved results (figures/) load without it; probe.sweep re-exports them
BASELINE = -1  # layer and head value of the unmasked rows
COLUMNS = [
    "item_id", "subject", "layer", "head", "answer", "pred", "correct",
    "prob_pred", "prob_correct", "p_answer", "kl", "response",
]
# the range each per-head salience column of heads.csv can hold: a KL is ≥ 0 (up to rounding), a drop in
# (prob-)accuracy lies in [-1, 1]; a saved value outside it is a damaged file, never a salience (here, not in
# probe.metrics: readers of saved results load without torch)
HEAD_METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    "kl": (-1e-6, math.inf), "accuracy_drop": (-1.0, 1.0), "prob_accuracy_drop": (-1.0, 1.0)}
OUTPUT_FILES = ("heads.csv", "baseline.json", "items.parquet", "run.json", "heatmap_*")
EVAL_OUTPUT_FILES = ("scores.csv", "items.parquet", "table.md", "run.json", "eval.png", "eval.pdf", "eval-*.png",
                     "eval-*.pdf")
# what each command that writes a run.json owns in its --out (besides parts/): its --overwrite of another command's
# run clears that run's files too, so probe.heads over a probe.eval run leaves no stale scores.csv beside heads.csv
RUN_OUTPUTS = {"probe.heads": OUTPUT_FILES, "probe.eval": EVAL_OUTPUT_FILES}
METRICS = ("accuracy", "prob_accuracy", "kl")


def file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask); mkstemp's 0o600 is for secrets, not results."""
    try:  # Linux reports the umask without changing it (no window in which another thread sees umask 0)
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return 0o666 & ~mask


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src``'s bytes (and mtime) to ``dst`` with the mode a new file gets: ``shutil.copy2`` would carry a
    read-only source's -r--r--r-- (a hub cache, a shared model dir) into every output made from it."""
    shutil.copyfile(src, dst)
    os.chmod(dst, file_mode())
    st = os.stat(src)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def set_file_modes(root: Path) -> None:
    """Give every file under ``root`` the mode a new file gets: transformers' ``save_pretrained`` writes its
    weights 0o600, unreadable by the other users a result dir is shared with."""
    mode = file_mode()
    for f in Path(root).rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


# Temp files beside a result: ".NAME.TAG.RANDOM.tmp", TAG = ``writer_tag()``, so one left by a killed process can be
# told from a live one's. (Names of earlier versions had the PID alone, without the host.)
WRITER_TAG = r"\d+(?:-[0-9a-f]{8})?"  # what ``writer_tag`` writes (or a bare PID of an earlier version)
_TEMP = re.compile(rf"\..+\.({WRITER_TAG})\.[a-z0-9_]+\.tmp")
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def writer_tag() -> str:
    """How this process names the temp files and dirs it writes: ``PID-HOST`` (HOST, 8 hex digits of the host
    name's hash). The host matters for runs on several machines sharing one file system (multi-node torchrun):
    a PID only says whether a process is alive on the machine that started it."""
    return f"{os.getpid()}-{_HOST}"


def writer_gone(tag: str) -> bool:
    """Whether the process that wrote under ``tag`` (a ``writer_tag``, or a bare PID of an earlier version) is known
    to be gone. Another host's writer can not be checked from here, so it never counts as gone: its leftovers wait
    for a run on its own host."""
    pid, _, host = tag.partition("-")
    if host and host != _HOST:
        return False
    return int(pid) != os.getpid() and not pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with that PID is running (someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:  # no such pid can exist
        return False
    return True


def atomic_write_with(path: Path, write: Callable[[str], object]) -> None:  # result ignored
    """``write(tmp)`` fills a temp file beside ``path``, which then replaces ``path`` in one rename: a kill
    leaves the old file or the new one, never half of one (and the temp file, which ``remove_stale_temps``
    clears on the next run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:  # a read-only file system keeps it (remove_stale_temps clears it on the rerun); its
                pass  # EROFS here had replaced the error that stopped the write, naming the temp file
        if (stopped := write_stopped(exc, path)) is not None:  # the file meant, not the temp one (gone now), nor
            raise stopped  # none at all (pyarrow's ENOSPC names no file)
        raise


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temp files of killed writers in ``directory`` (``writer_gone``); returns them."""
    removed = []
    for f in directory.glob(".*.tmp") if directory.is_dir() else []:
        m = _TEMP.fullmatch(f.name)
        if m and writer_gone(m.group(1)) and f.is_file():
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def remove_stale_dirs(parent: Path, name: str) -> list[Path]:
    """Delete the dirs in ``parent`` that killed writers left: those whose name fullmatches the regex ``name``, whose
    group ``tag`` is a gone writer's (``writer_gone``); returns them. Symlinks are never followed."""
    pattern, removed = re.compile(name), []
    for d in sorted(parent.iterdir()) if parent.is_dir() else []:
        if (m := pattern.fullmatch(d.name)) and d.is_dir() and not d.is_symlink() and writer_gone(m.group("tag")):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def partial_path(dest: Path) -> Path:
    """This process's hidden dir beside ``dest``, filled before it is renamed to ``dest`` (``.NAME.partial-TAG``,
    TAG = ``writer_tag``): two writers never share one, and ``remove_stale_dirs`` can tell a killed writer's."""
    return dest.parent / f".{dest.name}.partial-{writer_tag()}"


@contextmanager
def partial_dir(dest: Path) -> Iterator[Path]:
    """A hidden ``.NAME.partial`` dir beside ``dest`` to fill, emptied first (a kill left it) and removed at once
    when filling it fails (``probe.errors.drop_partial``: a full disk's error names ``dest``); the caller renames
    it to ``dest`` once it is whole. Untagged: one writer per ``dest`` (its --out is claimed), and the next call
    clears what a kill left without asking whose it was."""
    tmp = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as exc:
        drop_partial(tmp, dest, exc)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float as None. JSON has no NaN: Python writes ``NaN`` and reads it back, but
    strict parsers (jq, JavaScript, Go, serde) reject the whole file, so a baseline without generation (accuracy NaN)
    would be unreadable outside Python."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    """``obj`` as strict JSON (non-finite floats as null, ``finite_or_null``), indented, with a final newline: what
    every result JSON file of the project holds."""
    return json.dumps(finite_or_null(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    """``json_text(obj)``, written atomically."""
    atomic_write_bytes(path, json_text(obj).encode())


# Every file and folder an analyses command (shift, merge, trajectory) wrote into its --out, as paths relative to it:
# its --overwrite replaces only such an output with nothing added anywhere inside (analyses.writer.check_replaceable),
# and `python -m figures` adds what it draws there.
MANIFEST = ".omniprobe-output.json"


NO_FILE = "no such file"  # parse_json_object's reason for a missing file, which readers word their own way


def parse_json_object(path: Path) -> tuple[dict | None, str]:
    """The JSON object in ``path`` and "", or None and why not: ``NO_FILE``, "not valid JSON (…)" (unreadable or
    unparsable) or "not a JSON object". The one place a saved JSON object is read and checked: ``json_object``
    (lenient) and ``figures.read_json`` (strict) both go through it."""
    path = Path(path)
    if not path.is_file():
        return None, NO_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        return None, f"not valid JSON ({exc})"
    if not isinstance(value, dict):
        return None, "not a JSON object"
    return value, ""


def json_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None when the file is missing, unreadable, not JSON or not an object."""
    return parse_json_object(path)[0]


def read_manifest(out: Path) -> dict | None:
    """The manifest ``analyses.writer.atomic_dir`` writes last into a finished output (MANIFEST: the command and every
    entry it wrote), None when ``out`` has none or an unreadable one; its keys are the reader's to check."""
    return json_object(out / MANIFEST)


def gone_entries(out: Path, manifest: dict) -> list[str] | None:
    """The entries ``out``'s manifest lists that are gone from it now (deleted by hand); None when it lists none
    readably. Here, torch-free, for ``python -m figures report``'s check of the stages as for the writer's."""
    entries = manifest.get("entries")
    return [e for e in entries if isinstance(e, str) and not (out / e).exists()] if isinstance(entries, list) else None


@contextmanager
def stop_recorded(out: Path, run_info: dict[str, Any]) -> Iterator[None]:
    """A run a run-time check stops (``RunStopped``: an upstream change, an engine or batch disagreeing with its
    oracle) says so in its run.json, with the reason: left "running", it read as a run killed mid-way."""
    try:
        yield
    except RunStopped as exc:
        if (out / "run.json").is_file():
            atomic_write_json(out / "run.json", run_info | {
                "status": "stopped", "error": f"{type(exc).__name__}: {exc}",
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        raise


def results_line(out: Path | str, kind: str) -> str:
    """A finished run's last line: where its results are and the ``python -m figures`` command that draws its
    figures again from them (which --help's examples alone said)."""
    import shlex

    return f"results in {out}/ (figures: python -m figures {kind} {shlex.quote(str(out))})"


def output_listing(out: Path) -> list[str]:
    """Every file and folder below ``out`` but the manifest, as sorted POSIX paths relative to ``out``."""
    root = Path(out)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.name != MANIFEST or p.parent != root)


def note_outputs(out: Path, paths: Iterable[Path]) -> None:
    """Add ``paths`` (files drawn into ``out``) and the folders holding them to ``out``'s manifest, if it has one."""
    saved = read_manifest(Path(out))
    try:
        entries = set(saved["entries"])
    except (KeyError, TypeError):  # TypeError: no manifest, or entries not a list
        return
    root = Path(out).resolve()
    for path in map(lambda q: Path(q).resolve(), paths):
        if path != root and path.is_relative_to(root):
            parts = path.relative_to(root).parts
            entries.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
    atomic_write_json(Path(out) / MANIFEST, saved | {"entries": sorted(entries)})


def atomic_write_parquet(path: Path, df: pd.DataFrame, record: Any = None, run: str | None = None) -> None:
    """``df`` as ``path`` (``atomic_write_with``); ``record`` (JSON) and ``run`` (the run's fingerprint), where
    given, in the file's own metadata: a part's batching record (probe.eval, probe.heads) and the run it is of,
    written in the same rename as its rows, so whichever rank or run reads the part back reads how it was computed
    with it (``part_record``) and whose it is (``check_part_run``)."""
    meta = {**({PART_RECORD: json.dumps(record).encode()} if record is not None else {}),
            **({PART_RUN: run.encode()} if run is not None else {})}
    if not meta:
        atomic_write_with(path, lambda tmp: df.to_parquet(tmp, index=False))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(tmp: str) -> None:  # to_parquet's table, with more metadata keys (pandas reads past them)
        table = pa.Table.from_pandas(df, preserve_index=False)
        pq.write_table(table.replace_schema_metadata(dict(table.schema.metadata or {}) | meta), tmp)

    atomic_write_with(path, write)


PART_RECORD = b"omniprobe.batching"  # the metadata key of a part's record (atomic_write_parquet)
PART_RUN = b"omniprobe.run"  # the metadata key of the fingerprint of the run a part is of (atomic_write_parquet)


def part_metadata(path: Path, key: bytes) -> bytes | None:
    """What the parquet file ``path`` keeps under the metadata ``key``; None where it keeps nothing there or cannot
    be read (read_part names that)."""
    import pyarrow.parquet as pq

    try:
        return (pq.read_schema(path).metadata or {}).get(key)
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return None


def part_record(path: Path) -> dict[str, Any] | None:
    """The record ``atomic_write_parquet`` kept in the parquet file ``path``; None where it kept none (a part written
    before parts carried one, or by the naive engine), where what the key holds is no record (not JSON, or JSON
    other than an object) or where the file cannot be read (read_part names that)."""
    try:
        record = json.loads(raw) if (raw := part_metadata(path, PART_RECORD)) is not None else None
    except ValueError:  # json's JSONDecodeError, UnicodeDecodeError
        return None
    return record if isinstance(record, dict) else None


def check_part_run(path: Path, fingerprint: str) -> None:
    """A saved part is of this run: the fingerprint it keeps (``atomic_write_parquet``'s ``run``) is this run's. A part
    of another run (another model, data set or setting: copied in from its --out) holding the same row keys (item and
    head in probe.heads; model, data set and item in probe.eval) passed every other check and was summarised as this
    run's, exit 0. A part kept without one (written before parts kept it) is taken on its rows alone, as before."""
    saved = part_metadata(path, PART_RUN)
    if saved is not None and saved != fingerprint.encode():
        raise BadInput(f"{path} is another run's part (its run fingerprint {saved.decode(errors='replace')}, this "
                       f"run's {fingerprint}), not computed for this one; {PART_FIX}")


def part_path(out: Path, chunk: int) -> Path:
    return out / "parts" / f"chunk_{chunk:05d}.parquet"


def saved_command(saved: Any, out: Path | None = None) -> str | None:
    """The command that wrote a run.json: its ``command``; for a run saved before that was recorded, the one whose
    plan it holds (probe.eval's names ``models``, probe.heads' a ``model_spec``), analyses.finetune's ``config``, or
    the command of ``out``'s manifest (an analyses output: analyses.trajectory writes a run.json). None when unknown
    (unreadable, or an older probe.heads run.json without a plan)."""
    if isinstance(saved, dict) and isinstance(saved.get("command"), str):
        return saved["command"]
    plan = saved.get("plan") if isinstance(saved, dict) and isinstance(saved.get("plan"), dict) else {}
    if "models" in plan or "model_spec" in plan:
        return "probe.eval" if "models" in plan else "probe.heads"
    if isinstance(saved, dict) and "config" in saved:
        return "analyses.finetune"
    manifest = read_manifest(out) if out is not None else None
    return manifest.get("command") if manifest is not None and isinstance(manifest.get("command"), str) else None


def read_run_json(out: Path) -> Any:
    """``out``'s run.json as parsed (any JSON value), or None when missing or unreadable."""
    try:
        return json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def parts_signature(parts: Iterable[Path]) -> str | None:
    """Which files ``parts`` are now (each one's size and mtime, digested); None while one is missing. run.json
    records it (``"parts"``) when the parts are assembled: a part computed again since (deleted, then resumed) is
    another file, so an assembly of the old one no longer matches, whatever the clocks of the ranks that wrote them."""
    try:
        stats = [Path(p).stat() for p in parts]
    except OSError:  # FileNotFoundError: a rank is still computing it
        return None
    return json_digest([[s.st_size, s.st_mtime_ns] for s in stats])


_pause = time.sleep  # how rank 0 waits between two looks at --out (a test steps in here)


def wait_for_assembly(out: Path, parts: Callable[[Path, dict], Sequence[Path]]) -> None:
    """Under torchrun (RANK / WORLD_SIZE) a command's ``run`` returns once this rank's parts are written, and the last
    rank to finish assembles the outputs; return once they are: run.json complete, of the run --out held when this
    rank finished, recording an assembly of the parts as they are now (``parts_signature`` of ``parts(out,
    run.json)``, the command's part files of that run: not an earlier assembly's outputs, left by a resumed run). A
    run another rank stopped (RunStopped, recorded in run.json) raises RunStopped here too; a rank that dies without
    a word is torchrun's to end (it stops the whole job)."""
    mine = read_run_json(out)
    try:
        paths = list(parts(out, mine))
        fingerprint = mine["fingerprint"]
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"{out / 'run.json'}: no plan that lists its parts (not this run's run.json)") from None
    delay = 0.1
    while True:
        now = read_run_json(out)
        if not isinstance(now, dict) or now.get("fingerprint") != fingerprint:
            raise BadInput(f"--out {out}: its run.json went, or became another run's, while rank 0 waited for the "
                           "other ranks to assemble the outputs")
        if now.get("status") == "stopped":
            raise RunStopped(f"another rank stopped the run: {now.get('error')}")
        signature = parts_signature(paths)
        if now.get("status") == "complete" and signature is not None and now.get("parts") == signature:
            return
        _pause(delay)  # run() has said "rank 0: done; waiting for N ... from other ranks"
        delay = min(2 * delay, 5.0)


def read_on_rank_0(out: Path, read: Callable[[Path], Any], parts: Callable[[Path, dict], Sequence[Path]]) -> Any:
    """What a command's keyword function (``probe.heads.sweep``, ``probe.eval.evaluate``) returns once its ``run``
    returned ``out``: ``read(out)``, the finished output read back. Under torchrun (WORLD_SIZE > 1) each rank's run
    returns once its own parts are written and the last rank to finish assembles; rank 0 then waits for that
    assembly (``wait_for_assembly``, the run's part files by ``parts``) and returns it read back, and every other
    rank returns None at once (it may not be last: the outputs need not exist yet)."""
    rank, world = rank_world()
    if world == 1:
        return read(out)
    if rank != 0:
        return None
    wait_for_assembly(out, parts)
    return read(out)


def prepare_out_dir(out: Path, fingerprint: str, overwrite: bool, command: str = "probe.heads",
                    plan: dict[str, Any] | None = None,
                    identity: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> bool:
    """Check an existing run dir against this run's fingerprint. Returns True if it can be resumed.

    A different run is never mixed in: it needs ``--overwrite``, which removes only the files the tools own
    (``parts/``, and ``RUN_OUTPUTS``' names or glob patterns of ``command`` and of the command of the run saved
    there). Given this run's ``plan`` (what the fingerprint hashes, through ``identity`` where given), the refusal
    names what differs from the saved run's, or which other command's run it is. Another tool's run (``saved_command`` outside RUN_OUTPUTS) is refused
    with --overwrite too.
    """
    run_json = out / "run.json"
    check_out_path(out)
    for d in (out, out / "parts"):  # what killed writers left (live ranks of a torchrun keep theirs)
        remove_stale_temps(d)
    # refused whatever --out holds: each rank cleared the dir in turn, deleting the parts the others had written (all
    # exited 0 "waiting for N chunks from other ranks", nothing assembled); and into an empty dir a rank that looked
    # after another had written run.json was refused while those before it ran, so the job failed by timing
    if overwrite and rank_world()[1] > 1:
        raise BadInput(f"--overwrite under torchrun: every rank would clear --out {out}, deleting the parts the "
                       "others wrote; start without --overwrite (remove a previous run's --out first, or use another)")
    if not has_contents(out):
        return False
    # another tool's run (a fine-tuning run, an analyses output) is never cleared: its run.json has our file's name
    saved = read_run_json(out)
    if (other := saved_command(saved, out)) is not None and other not in RUN_OUTPUTS:
        raise BadInput(f"--out {out} holds an {other} run, not a {command} one; --overwrite would delete its files: "
                       "use another --out")
    if overwrite:  # locked first: a command still writing here is refused before its parts are deleted, not after
        lock_out_dir(out)
        clear_run_dir(out, RUN_OUTPUTS[command] + (RUN_OUTPUTS[other] if other and other != command else ()))
        return False
    if not run_json.is_file():
        raise BadInput(f"--out {out} is not empty and holds no run.json; pick another dir or pass --overwrite")
    if not isinstance(saved, dict):  # JSON but no object ([1], null) is as unreadable as damaged JSON
        raise BadInput(f"{run_json} is unreadable; pass --overwrite to start fresh")
    if other not in (None, command):
        raise BadInput(f"--out {out} holds a {other} run, not a {command} one; use another --out or --overwrite")
    if saved.get("fingerprint") != fingerprint:
        raise different_run(out, saved.get("plan"), plan, identity)
    return True


def distinct_names(paths: Sequence[str]) -> list[str]:
    """Each path's shortest tail (its last folder names) that no other path shares: ``run`` for one run, and
    ``seed0/run``, ``seed1/run`` for two runs whose folders have the same name, so labels never merge. A path that
    ends in no folder name (``.``, ``..``, ``data/..``) is named by the folder it points at, as when given by name:
    the label is a name, and probe.eval's bootstrap streams, keyed by it, do not depend on how the path was typed."""
    paths = [os.path.abspath(p) if Path(p).name in ("", "..") else p for p in paths]
    parts = [Path(p).parts[1 if Path(p).is_absolute() else 0:] or (str(p),) for p in paths]
    for k in range(1, max(map(len, parts), default=1) + 1):
        names = ["/".join(q[-k:]) for q in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


LOCK = ".lock"
_CLAIMED: dict[str, int] = {}  # out dirs this process holds (a resume in the same process keeps its claim)
_REMOVED_ON_RELEASE: dict[str, Path] = {}  # their lock files that go with the claim (``lock_out_dir(beside=True)``)


def claimed() -> frozenset[str]:
    """The --out dirs (resolved paths) this process holds now: a wrapper keeps its caller's, and takes back only an
    --out it holds itself (probe.errors.releases_claims, probe.errors.undone_on_bad_input)."""
    return frozenset(_CLAIMED)


def release_claims(keep: Iterable[str] = ()) -> None:
    """Free every --out this process claimed (``claim_out_dir``) but those in ``keep`` (``claimed()``'s): a
    command's claims end with it (probe.errors.cli_main, probe.errors.releases_claims), so a later command in the
    same process, or another process, may continue the run."""
    kept = set(keep)
    for key in [k for k in _CLAIMED if k not in kept]:
        fd = _CLAIMED.pop(key)
        if (lock := _REMOVED_ON_RELEASE.pop(key, None)) is not None:  # while still held: see lock_out_dir
            lock.unlink(missing_ok=True)
        if fd >= 0:
            unlock(fd)


def unlock(fd: int) -> None:
    """Let go of a lock ``lock_out_dir`` took, with the holder's name it wrote when no other holder shares it (ranks
    of a torchrun job: the last to go clears it): a command that takes it next and is refused-against before it
    writes its own was named as this process, which may still be running (analyses.replicate's next stage)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # granted only where no other rank shares it now
        os.ftruncate(fd, 0)
    except OSError:  # another rank still holds it (BlockingIOError), or a full or read-only disk: the name stays
        pass
    os.close(fd)  # closing the descriptor frees its flock


def has_contents(out: Path) -> bool:
    """Whether ``out`` holds anything but the lock file of a run that ended or was killed before writing, and temp
    files (``atomic_write_with``'s) being written: a torchrun rank that looked while another wrote the first
    run.json saw its temp file, took the dir for a foreign one and exited 2, and torchrun then stopped the job."""
    return out.is_dir() and any(p.name != LOCK and not _TEMP.fullmatch(p.name) for p in out.iterdir())


def is_lock_file(f: Path) -> bool:
    """Whether ``f`` is a lock ``lock_out_dir`` makes (``DIR/.lock`` or ``.NAME.lock`` beside an output)."""
    return f.name == LOCK or (f.name.startswith(".") and f.name.endswith(LOCK))


def lock_path(out: Path, beside: bool = False) -> Path:
    """``out``'s lock file: ``DIR/.lock``, or with ``beside`` ``.NAME.lock`` in its folder."""
    return Path(out).parent / f".{Path(out).name}{LOCK}" if beside else Path(out) / LOCK


def lock_out_dir(out: Path, shared: bool = False, beside: bool = False, drawing: bool = False) -> None:
    """Create ``out`` and hold an flock on ``DIR/.lock`` until this command ends (``release_claims``; the kernel frees
    it however the process ends): a second command into the same --out meanwhile is refused, never interleaved.
    ``shared``: the ranks of a torchrun job hold it together, and so shut out a single process (which holds it
    alone), not each other. ``beside``: lock ``.NAME.lock`` beside ``out`` and leave ``out`` uncreated, for an
    output that appears whole in one rename (analyses.writer.atomic_dir); that file goes when the claim ends, so it
    is no litter beside the output (one a kill left is taken over by the next run). ``drawing``: held by
    ``python -m figures`` (which has no --out), for its refusal's words."""
    import fcntl

    lock = lock_path(out, beside)
    make_out_dir(lock.parent, f"--out {out}: its folder" if beside else "--out")
    key = str(Path(out).resolve())
    if key in _CLAIMED:
        return
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, file_mode())
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise in_use(out, lock, drawing) from None
    except OSError:  # a file system without locks (some NFS mounts): run unlocked, as before
        os.close(fd)
        fd = -1
    if fd >= 0:  # who holds it, at once, for the refusal of the next command (ranks sharing it: the last to write)
        name_holder(fd)
    if beside and fd >= 0:
        if not same_file(fd, lock):  # its holder removed it as we opened it: ours is a lock nobody else sees
            os.close(fd)
            raise in_use(out, lock, drawing)
        _REMOVED_ON_RELEASE[key] = lock
    # DIR/.lock and .NAME.lock are two files: an analyses output being written (not there yet, held beside) was
    # swapped in over a probe.heads or probe.eval run started into its --out meanwhile, deleting that run's dir as it
    # ran. Made first, then looked beside: that output's check (after its lock) finds this dir, or this look its lock
    if not beside and fd >= 0 and held_beside(out):
        unlock(fd)
        raise in_use(out, lock_path(out, beside=True), drawing)
    _CLAIMED[key] = fd


def name_holder(fd: int) -> None:
    """Write "PID HOST" into the lock open as ``fd``, which this process holds: over what is there, then cut to its
    length, so a reader never finds it emptied by this write (a refused command that finds no live holder's name
    reads again for a moment: ``in_use``)."""
    name = f"{os.getpid()} {socket.gethostname()}\n".encode()
    try:
        os.pwrite(fd, name, 0)
        os.ftruncate(fd, len(name))
    except OSError:  # a full disk: the lock holds all the same
        pass


def held_beside(out: Path) -> bool:
    """Whether a live command holds ``out``'s lock beside it (``.NAME.lock``: analyses.writer.atomic_dir writing
    ``out``, or ``python -m figures`` drawing into such an output)."""
    import fcntl

    try:
        fd = os.open(lock_path(out, beside=True), os.O_RDONLY)
    except OSError:  # none: no such command (its lock file goes with its claim)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks: as lock_out_dir, unlocked
        return False
    finally:
        os.close(fd)  # frees the shared lock just taken, if any
    return False


def hold_drawn_dir(out: Path) -> None:
    """Hold a finished output while ``python -m figures`` draws into it, with the lock the command that wrote it
    takes: ``.NAME.lock`` beside an analyses output (it carries a manifest, and --overwrite replaces it whole),
    ``DIR/.lock`` where a command left one (probe.heads, probe.eval, analyses.finetune, analyses.replicate; none is
    made in a folder without it). A command writing or replacing ``out`` meanwhile is refused, and so is this
    drawing while one does: a figure of the old output was swapped into the new one, listed in its manifest as its
    own, and two drawings at once each rewrote the manifest, one losing the other's entries."""
    beside = read_manifest(out) is not None
    if beside and not os.access(Path(out).absolute().parent, os.W_OK | os.X_OK):
        return  # nothing can replace ``out`` in a folder nobody may write
    if beside or lock_path(out).is_file():
        lock_out_dir(out, beside=beside, drawing=True)


# how long a refused command waits for the lock's holder to name itself (it writes at once after its flock)
HOLDER_NAME_WAIT = 0.5


def lock_holder(lock: Path) -> tuple[str, str] | None:
    """The (pid, host) ``lock`` names when that is a live process other than this one, else None."""
    try:
        pid, host = lock.read_text(encoding="utf-8").split()
        # not a killed run's (the holder may not have written over it yet), nor this process's own earlier claim
        known = int(pid) > 0 and (host != socket.gethostname() or (int(pid) != os.getpid() and pid_alive(int(pid))))
    except (OSError, ValueError):  # none, unreadable, empty or not "PID HOST"
        return None
    return (pid, host) if known else None


def in_use(out: Path, lock: Path, drawing: bool = False) -> BadInput:
    """The refusal of an --out another command holds, naming that command's process (written into ``lock`` by
    ``lock_out_dir`` once it holds it). A lock that names no live holder yet (taken an instant ago: a new file is
    empty until its holder writes, an old one may name a killed holder) is read again for up to
    ``HOLDER_NAME_WAIT`` seconds; a holder of an earlier version, which writes nothing, stays unnamed."""
    deadline = time.monotonic() + HOLDER_NAME_WAIT
    while (holder := lock_holder(lock)) is None and time.monotonic() < deadline and lock.exists():
        time.sleep(0.02)
    who = f" (pid {holder[0]} on {holder[1]})" if holder else ""
    if drawing:
        return BadInput(f"{out} is in use by another running command{who}; draw it once that command has ended")
    return BadInput(f"--out {out} is in use by another running command{who}; wait for it to end or use another --out")


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def claim_out_dir(out: Path, fingerprint: Any, saved_fingerprint: Callable[[dict], Any] = lambda d: d.get("fingerprint")
                  ) -> None:
    """Hold ``out`` from this run's first write to its exit: an flock on ``DIR/.lock``, which the kernel frees however
    the process ends. Two different runs started into one --out at once both passed the check of the saved run.json
    before either wrote one, and then mixed their parts. Ranks of one torchrun job share the lock (they took none, so
    a single process started meanwhile computed their chunks beside them, or cleared them with --overwrite).
    Called before run.json is written; refuses a run.json another run wrote since this one's check."""
    lock_out_dir(out, shared=rank_world()[1] > 1)
    saved = read_run_json(out)
    if isinstance(saved, dict) and saved_fingerprint(saved) != fingerprint:
        raise BadInput(f"--out {out} now holds a different run, started while this one was preparing; use another "
                       "--out")


def different_run(out: Path, saved: Any, plan: dict[str, Any] | None,
                  identity: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> BadInput:
    """The refusal for an --out holding another run: what differs, or that an older omniprobe wrote it. ``identity``:
    what the fingerprint makes of a plan (probe.eval's ``plan_identity``), so the refusal names what differs there,
    not a path or name typed otherwise (it said "data, seed differ" of a resume with another seed and a data set
    typed relative); a saved plan it cannot read is compared as it is."""
    if identity is not None and isinstance(saved, dict) and plan is not None:
        try:
            saved, plan = identity(saved), identity(plan)  # both, or (the saved one unreadable) neither
        except (KeyError, TypeError, AttributeError, ValueError):  # an older or edited run.json's plan
            pass
    what = plan_differences(saved, plan)
    if not what and isinstance(saved, dict) and plan is not None:  # equal plans, unequal fingerprints: another rule
        return BadInput(f"--out {out} holds a run written by an older omniprobe, which fingerprinted it otherwise; "
                        "use another --out or --overwrite")
    what = what or ["settings"]

    def keys(d: Any) -> set[str]:
        inner = d.get("settings") if isinstance(d, dict) else None
        return set(d if isinstance(d, dict) else ()) | set(inner if isinstance(inner, dict) else ())

    unrecorded = [k for k in what if k in keys(plan) - keys(saved)]
    if unrecorded and len(unrecorded) == len(what):
        why = f"written by an older omniprobe that did not record {', '.join(unrecorded)}"
    else:
        why = f"{', '.join(what)} differ"
    return BadInput(f"--out {out} holds a different run ({why}); use another --out or --overwrite")


def plan_differences(saved: Any, plan: dict[str, Any] | None) -> list[str]:
    """The keys (settings by name) whose values differ between a saved plan and this run's, as JSON sees them
    (as ``atomic_write_json`` wrote them: a NaN setting is null on both sides, never unequal to itself)."""
    if not isinstance(saved, dict) or plan is None:
        return []
    now = json.loads(json.dumps(finite_or_null(plan), default=str))
    keys = sorted(set(saved) | set(now))
    out = [k for k in keys if k != "settings" and saved.get(k) != now.get(k)]
    a, b = saved.get("settings") or {}, now.get("settings") or {}
    if isinstance(a, dict) and isinstance(b, dict):
        out += [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


def clear_run_dir(out: Path, owned: Iterable[str] = OUTPUT_FILES) -> None:
    shutil.rmtree(out / "parts", ignore_errors=True)
    for pattern in owned:
        for path in out.glob(pattern):
            path.unlink()


# what a user does with a damaged or foreign part: the run computes it again
PART_FIX = "delete it and rerun the same command to recompute it"


def read_part(path: Path, columns: Iterable[str] = COLUMNS) -> pd.DataFrame:
    """One saved part; an unreadable or foreign one (a kill mid-copy, a disk error) is bad input naming it."""
    fix = PART_FIX
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
    check_part_columns(path, df, columns)
    return df


def check_part_rows(path: Path, df: pd.DataFrame, key: Sequence[str], want: Iterable[tuple], what: str) -> None:
    """A saved part holds exactly the rows ``want`` (each row's values of the ``key`` columns, in any order), else
    one BadInput naming the part and its first row missing or extra: a readable part of other rows (another run's
    with a shorter --limit, an edited file) was summarised as this run's, exit 0. ``what``: the rows ``want`` are."""
    from collections import Counter

    found, want = list(zip(*(df[c] for c in key))), list(want)
    have, need = Counter(found), Counter(want)
    if have == need:
        return
    missing = next((k for k in want if have[k] < need[k]), None)
    row, how = (missing, "missing") if missing is not None else (next(k for k in found if have[k] > need[k]), "extra")
    raise BadInput(f"{path} holds {len(found)} rows that are not this run's {len(want)} {what} (first {how} row: "
                   f"{', '.join(f'{c} {v}' for c, v in zip(key, row))}); {PART_FIX}")


# What each column of a part (probe.heads' COLUMNS, probe.eval's ITEM_COLUMNS) holds as the runs write it
# (probe.sweep.measurement_row): text, whole numbers, or floats, some within bounds (NaN allowed only where a run
# writes it: ``correct`` without generation)
PART_TEXT = ("model", "data", "item_id", "subject", "answer", "pred", "prob_pred", "response")
PART_INT = ("layer", "head")
PART_FLOAT = {"correct": (0.0, 1.0, True), "prob_correct": (0.0, 1.0, False), "p_answer": (0.0, 1.0, False),
              "kl": (-1e-6, math.inf, False)}  # (low, high, NaN allowed)


def check_part_columns(path: Path, df: pd.DataFrame, columns: Iterable[str]) -> None:
    """Each of ``columns`` of a saved part holds what a run writes there: a part rewritten by hand (``correct`` as
    text, ``p_answer`` as whole numbers) was a pandas traceback at the summary, or — numbers cast back to floats —
    summarised as measured. BadInput naming the part and the column."""
    from pandas.api.types import is_float_dtype, is_integer_dtype, is_string_dtype

    fix = f"an edited or foreign part; {PART_FIX}"
    for col in columns:
        s = df[col]
        if col in PART_TEXT:
            ok, what = is_string_dtype(s) and not s.isna().any(), "text"
        elif col in PART_INT:
            ok, what = is_integer_dtype(s), "whole numbers"
        elif col in PART_FLOAT:
            ok, what = is_float_dtype(s), "floats"
        else:
            continue
        if not ok:
            raise BadInput(f"{path}: column {col} holds {s.dtype} values, not the {what} a run writes there ({fix})")
        if col in PART_FLOAT:
            lo, hi, nan = PART_FLOAT[col]
            bad = ~s.between(lo, hi) & (s.notna() if nan else True)
            if bad.any():
                i = int(bad.to_numpy().argmax())
                raise BadInput(f"{path}: column {col} must lie in [{lo:g}, {hi:g}]{' or be empty' if nan else ''}; "
                               f"row {i + 1} has {float(s.iloc[i]):g} ({fix})")


def read_parts(out: Path, chunks: Iterable[int], check: Callable[[int, pd.DataFrame], None] | None = None,
               kept: dict[int, pd.DataFrame] | None = None) -> pd.DataFrame:
    """The parts of ``chunks``, each passed to ``check`` (chunk, its rows) when given; those in ``kept`` (chunk →
    its rows, read and checked already: a resume's) are not read again."""
    chunks, kept = list(chunks), kept or {}
    fresh = {c: read_part(part_path(out, c)) for c in chunks if c not in kept}
    if check is not None:
        for c, df in fresh.items():
            check(c, df)
    frames = [kept[c] if c in kept else fresh[c] for c in chunks]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    return df[COLUMNS]


def _agg(df: pd.DataFrame) -> dict[str, float]:
    return {
        "accuracy": float(df["correct"].mean()),
        "prob_accuracy": float(df["prob_correct"].mean()),
        "kl": float(df["kl"].mean()),
        "p_answer": float(df["p_answer"].mean()),
    }


# the columns of a part that heads.csv's per-head means read (``_agg``)
AGG_COLUMNS = ["correct", "prob_correct", "kl", "p_answer"]


def summarize(items: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """heads.csv rows (masked values and drops from baseline) and the baseline summary. The heads are grouped on
    the numbers alone: grouping the whole table copied its text columns (item ids, subjects, responses) once for the
    masked rows and again group by group, 210 MB at the peak for 784 heads × 900 items (bench/memory.py) beside
    the table's own 93 MB; the means are the same, of the same values in the same order."""
    is_base = (items["layer"] == BASELINE) & (items["head"] == BASELINE)
    base_rows = items[is_base]
    baseline: dict[str, Any] = _agg(base_rows) | {"n_items": int(len(base_rows))}
    baseline["per_subject"] = {
        s: _agg(g) | {"n_items": int(len(g))} for s, g in base_rows.groupby("subject", sort=True)
    }
    records = []
    for (layer, head), g in items[["layer", "head", *AGG_COLUMNS]].groupby(["layer", "head"], sort=True):
        if layer == BASELINE and head == BASELINE:  # the unmasked rows (is_base), summarised above
            continue
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


def json_digest(obj: Any, *blobs: bytes) -> str:
    """The 16-hex fingerprint of a JSON-able value (keys sorted, so dict order cannot change it), then of each
    blob after a NUL: the one rule for the plans, options and inputs that resumes and manifests compare."""
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode())
    for b in blobs:
        h.update(b"\0" + b)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Moved:
    """A folder that was elsewhere when the parts a resume keeps were computed: ``now`` was ``then`` (as spelt, and
    resolved). analyses.replicate's run, copied or moved with a stage killed half-way: that stage's commands name
    the merges, carriers, checkpoints and generated sets they read by their paths in the run's folder."""
    now: str
    then: str
    now_resolved: str
    then_resolved: str


_MOVED: list[Moved] = []  # the moves ``as_computed`` reads paths through, while ``moved_inputs`` holds them


@contextmanager
def moved_inputs(moved: Moved) -> Iterator[None]:
    """Within it, a run's identity names an input under ``moved.now`` as under ``moved.then`` (``as_computed``): a
    resume then keeps the parts computed there, whose identity named it there. What the inputs hold is compared as
    before, by content (their fingerprints are part of the identity)."""
    _MOVED.append(moved)
    try:
        yield
    finally:
        _MOVED.remove(moved)


def as_computed(identity: Any, resolved: bool = True) -> Any:
    """A run's identity (JSON-like: probe.eval's and probe.heads' plans, a fine-tuning config, an analyses request)
    with each path under a folder held moved (``moved_inputs``) named where it was then; unchanged when none is.
    ``resolved``: the identity names paths resolved (``model_location``); else as spelt (an analyses request), where
    a resolved one is read too."""
    if not _MOVED:
        return identity

    def place(s: str) -> str:
        for m in _MOVED:
            for now, then in ([] if resolved else [(m.now, m.then)]) + [(m.now_resolved, m.then_resolved)]:
                if s == now or s.startswith(now.rstrip(os.sep) + os.sep):
                    return then + s[len(now):]
        return s

    def walk(o: Any) -> Any:
        if isinstance(o, str):
            return place(o)
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        return [walk(v) for v in o] if isinstance(o, (list, tuple)) else o
    return walk(identity)


def file_sha256(path: Path) -> bytes:
    """The SHA-256 of a file's bytes, read in 16 MB blocks (a 15 GB checkpoint is never in memory whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.digest()


def content_fingerprint(path: str | Path, hash_limit: int = 64 << 20, recursive: bool = True,
                        skip: Callable[[Path], bool] = lambda f: False,
                        big: Callable[[Path, os.stat_result], bytes] | None = None) -> str:
    """What a model or data directory holds: file names and bytes (sizes and mtimes for files over
    ``hash_limit``, so a 15 GB checkpoint is not read twice; or ``big(file, its stat)``, a digest of its bytes
    kept elsewhere: analyses.replicate's outputs), so a retrained organism in the same directory
    counts as a changed input. ``recursive=False`` reads the top level only (a model's own files, not what
    sits in folders inside it: carriers, or a run's --out placed there)."""
    p = Path(path)
    h = hashlib.sha256()
    listing = p.rglob("*") if recursive else p.iterdir()
    # not the manifest of what a command wrote there: figures drawn into a merged model's dir later rewrite it; nor
    # a lock (DIR/.lock, .NAME.lock), which names whichever process last held it: a redraw or rerun would change it
    files = (sorted(f for f in listing if f.is_file() and f.name != MANIFEST and not is_lock_file(f) and not skip(f))
             if p.is_dir()
             else [p] if p.is_file() else [])
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}|{st.st_size}|".encode())
        if st.st_size <= hash_limit:
            h.update(hashlib.sha256(f.read_bytes()).digest())
        elif big is not None:
            h.update(big(f, st))
        else:
            h.update(str(big_file_mtime(f, st)).encode())
    return h.hexdigest()[:16] if files else f"name:{path}"


_SAME_BYTES: dict[tuple[str, int, int, str, int], bool] = {}  # (copy, size, mtime, original, its mtime) → equal


def big_file_mtime(f: Path, st: os.stat_result) -> int:
    """The mtime a file too big to hash enters a fingerprint with: its own, or, under a folder held moved
    (``moved_inputs``), its original's where that is still there at the same size and holds the same bytes. ``cp -r``
    gives a copy new mtimes, so a stage killed then copied would otherwise start again (hours on 7B shards). Safe:
    the original's mtime is the one its parts recorded only if it is unchanged since, and the copy equals it.
    Compared once per (copy, original) version in a process."""
    original = _original_of(f)
    if original is None:
        return st.st_mtime_ns
    try:
        ost = original.stat()
    except OSError:
        return st.st_mtime_ns
    if ost.st_size != st.st_size:
        return st.st_mtime_ns
    key = (str(f), st.st_size, st.st_mtime_ns, str(original), ost.st_mtime_ns)
    if key not in _SAME_BYTES:
        _SAME_BYTES[key] = ost.st_mtime_ns == st.st_mtime_ns or same_bytes(f, original)
    return ost.st_mtime_ns if _SAME_BYTES[key] else st.st_mtime_ns


def _original_of(f: Path) -> Path | None:
    """Where ``f``, under a folder held moved, was when the kept parts were computed (``as_computed``'s mapping of
    its resolved path); None outside any, or where the folder is the same one spelt otherwise."""
    if not _MOVED:
        return None
    real = str(f.resolve())
    then = as_computed(real)
    return None if then == real else Path(then)


def same_bytes(a: Path, b: Path, block: int = 16 << 20) -> bool:
    """Whether two files of one size hold the same bytes, read side by side in 16 MB blocks."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if x != y:
                return False
            if not x:
                return True


# calls of gather_over_ranks in this process: every rank makes them in the same order, so the n-th call's keys in the
# launch's store are the same on every rank and never meet an earlier call's (probe.heads then probe.eval from Python)
_exchanges = 0


def gather_over_ranks(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, where the launch gives a way to exchange them: the process group where one
    exists (analyses.finetune's: gloo on the CPU), else the key-value store of the launch's rendezvous (torchrun's
    MASTER_ADDR / MASTER_PORT), which probe.heads and probe.eval use without setting up a process group (their ranks
    share no collective, only --out). None without either: RANK / WORLD_SIZE set by hand, ranks that may run one after
    another (nothing to wait for)."""
    global _exchanges
    import pickle

    import torch.distributed as dist

    rank, world = rank_world()
    if dist.is_available() and dist.is_initialized():
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, obj)
        return every
    if not (dist.is_available() and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return None
    store, _, _ = next(dist.rendezvous("env://"))  # torchrun's agent store (or rank 0's), no process group
    _exchanges += 1
    # a worker torchrun restarts (--max-restarts) meets the store its failed attempt wrote into
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"omniprobe/same-run/{attempt}/{_exchanges}", store)
    store.set(str(rank), pickle.dumps(obj))
    return [pickle.loads(store.get(str(r))) for r in range(world)]  # get waits for a rank not yet there


def first_difference(a: Any, b: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first place two JSON values differ, as (key, value in a, value in b): nested dicts and lists by their
    path (``models[1].path``), a plan's settings by their own names (as ``plan_differences`` names them) and looked
    at first: they are what was typed (--limit), the rest follows from them (its n_items)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [*a, *(k for k in b if k not in a)]
        for k in sorted(keys, key=lambda k: not (not key and k == "settings")):
            if k not in a or k not in b:
                return (f"{key}.{k}" if key else k), a.get(k), b.get(k)
            inner = "" if (not key and k == "settings") else (f"{key}.{k}" if key else str(k))
            if (hit := first_difference(a[k], b[k], inner)) is not None:
                return hit
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if (hit := first_difference(x, y, f"{key}[{i}]")) is not None:
                return hit
        return None
    return None if a == b else (key or "fingerprint", a, b)


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)  # as run.json shows it: 0.0001, false, "text"
    return text if len(text) <= 80 else text[:77] + "..."


def check_same_run_on_every_rank(record: dict[str, Any]) -> None:
    """Under torchrun every rank runs the same job: each one's run fingerprint (``record``, the plan or config its
    run.json holds, model and data by where they are) is exchanged before anything is written, and ranks whose
    records differ all stop (BadInput, exit 2) naming the first differing key, each having seen every record. Ranks
    given another --lr, --data or --limit trained or scored their share as another run, and both could write
    run.json. A single process, or ranks with no way to exchange (``gather_over_ranks`` None), are not checked here
    (their run.json and parts carry the fingerprint, checked on resume and assembly)."""
    if rank_world()[1] == 1:
        return
    record = json.loads(json.dumps(finite_or_null(record), default=str))  # as run.json holds it
    every = gather_over_ranks((json_digest(record), record))
    if every is None:
        return
    digest0, record0 = every[0]
    for r, (digest, other) in enumerate(every):
        if digest == digest0:
            continue
        key, mine, theirs = first_difference(other, record0) or ("fingerprint", digest, digest0)
        raise BadInput(f"rank {r}'s {key} {_shown(mine)} differs from rank 0's {_shown(theirs)}: every rank must run "
                       "the same command")
