"""Streaming safetensors writer and atomic output directories.

Shapes and dtypes are known before any data is computed, so every shard's header is written first and tensor
bytes are appended chunk by chunk: no output tensor is ever held whole. With ``background=True`` the chunks are
written by one thread, in order, while the caller computes the next ones (file writes release the GIL). Output
goes to a hidden temporary dir beside the target and is renamed only when complete (a killed run leaves no
complete-looking output).
"""
from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import queue
import re
import shutil
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, ParamSpec, Sequence

import torch

from analyses.checkpoints import DTYPE_NAMES
from probe.errors import WRITE_STOPPED, BadInput, check_out_path
from probe.results import (MANIFEST, WRITER_TAG, as_computed, atomic_write_json, claimed, copy_file, gone_entries,
                           json_object, lock_out_dir, output_listing, partial_path, read_manifest, release_claims,
                           remove_stale_dirs, writer_tag)

P = ParamSpec("P")

INDEX_NAME = "model.safetensors.index.json"
SHARD_BYTES = 5 * 10**9  # default largest shard of a written checkpoint (as transformers' 5GB)
Chunk = torch.Tensor | memoryview | bytes
Raw = memoryview | bytes  # a chunk as it reaches the file: _TensorSink.write turns a tensor into its bytes


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a plain byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*((?:[KMGT]i?)?B?)\s*", text, re.I)  # not ".", "1.2.3", "5iB"
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    size = float(m.group(1)) * mult[(m.group(2) or "").upper().rstrip("B")] if m else math.nan
    if not math.isfinite(size):  # 400 digits, or 1e300 TB: inf, which int() cannot take
        raise BadInput(f"bad size {text!r} (use e.g. 5GB, 500MB)")
    return int(size)


@dataclass(frozen=True)
class Entry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class ShardedWriter:
    """Write ``entries`` (in this order) as ``model.safetensors`` or N shards plus the HF index."""

    def __init__(self, out_dir: Path, entries: Sequence[Entry], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None, background: bool = False):
        self.out_dir = Path(out_dir)
        self._io = _WriteThread() if background else None
        self._pool = _BufferPool()
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[Entry]] = [[]]
        size = 0
        for e in entries:
            if shards[-1] and size + e.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += e.nbytes
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(e, i) for i, s in enumerate(shards) for e in s]
        self._shards = shards
        self._pos = 0
        self._file: BinaryIO | None = None
        self._shard = -1
        self.total_bytes = sum(e.nbytes for e in entries)

    def _open_shard(self, i: int) -> None:
        self._close_file()
        header: dict[str, object] = {"__metadata__": self.metadata}
        off = 0
        for e in self._shards[i]:
            header[e.key] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
            off += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
        self._file = open(self.out_dir / self.names[i], "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._shard = i

    @contextmanager
    def tensor(self, key: str) -> Iterator["_TensorSink"]:
        """Append the next tensor's bytes (in any number of chunks); checks the byte count at the end."""
        entry, shard = self._order[self._pos]
        if entry.key != key:
            raise RuntimeError(f"writer expected {entry.key}, got {key}")
        if shard != self._shard:
            self._open_shard(shard)
        sink = _TensorSink(self, entry)
        yield sink
        if sink.written != entry.nbytes:
            raise RuntimeError(f"{key}: wrote {sink.written} bytes, expected {entry.nbytes}")
        self._pos += 1

    def _emit(self, data: Raw, done: Callable[[], None] | None) -> None:
        """Write ``data`` now, or queue it for the write thread; ``done`` runs once it is on its way to disk."""
        if self._io is None:
            self._file.write(data)
            if done is not None:
                done()
        else:
            self._io.submit(self._file, data, done)

    def _close_file(self) -> None:
        if self._io is not None:
            self._io.drain()
        if self._file:
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._pos != len(self._order):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._order)} tensors")
        self._close_file()
        self.abort()
        if len(self.names) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {e.key: self.names[i] for e, i in self._order},
            }
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def abort(self) -> None:
        """Stop the write thread (idempotent); after an error the caller deletes the output."""
        if self._io is not None:
            self._io.stop()
            self._io = None

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class _TensorSink:
    def __init__(self, writer: ShardedWriter, entry: Entry):
        self._writer = writer
        self.entry = entry
        self.written = 0

    def buffer(self, n: int) -> torch.Tensor:
        """An ``n``-element buffer of this tensor's dtype to fill and pass to ``write``, which takes it back.

        Buffers are pooled (a fresh one would cost a page fault per 4 KB) and the pool is small, so a caller
        that gets ahead of the write thread waits here.
        """
        return self._writer._pool.take(self.entry.dtype, n)

    def write(self, chunk: Chunk) -> None:
        """Append ``chunk``; with a background writer it must not change afterwards (``buffer``s are safe)."""
        done = None
        if isinstance(chunk, torch.Tensor):
            if chunk.dtype != self.entry.dtype:
                raise RuntimeError(f"{self.entry.key}: chunk dtype {chunk.dtype} != {self.entry.dtype}")
            done = self._writer._pool.giver(chunk)
            chunk = chunk.contiguous().reshape(-1).view(torch.uint8).numpy().data
        self.written += len(chunk) if not isinstance(chunk, memoryview) else chunk.nbytes
        self._writer._emit(chunk, done)


class _BufferPool:
    """Reusable chunk buffers per dtype: at most ``size`` exist, so queued writes hold bounded memory."""

    def __init__(self, size: int = 4):
        self._size = size
        self._free: dict[torch.dtype, queue.SimpleQueue[torch.Tensor]] = {}
        self._count: dict[torch.dtype, int] = {}
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr of a lent slice -> its pooled buffer

    def take(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        free = self._free.setdefault(dtype, queue.SimpleQueue())
        if free.empty() and self._count.get(dtype, 0) < self._size:
            self._count[dtype] = self._count.get(dtype, 0) + 1
            buf = torch.empty(n, dtype=dtype)
        else:
            buf = free.get()
        if buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)  # grows to the largest chunk asked for, then stays
        self._lent[buf.data_ptr()] = buf
        return buf[:n]

    def giver(self, chunk: torch.Tensor) -> Callable[[], None] | None:
        """For a lent buffer, the call that returns it to the pool once written; ``None`` for other tensors."""
        buf = self._lent.pop(chunk.data_ptr(), None) if chunk.numel() else None
        if buf is None:
            return None
        free = self._free[buf.dtype]
        return lambda: free.put(buf)


class _WriteThread:
    """Performs queued writes in order on one thread; its first error is raised in the caller's next call."""

    def __init__(self, depth: int = 2):
        self._queue: queue.Queue[tuple[BinaryIO, Raw, Callable[[], None] | None] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            f, data, done = item
            try:
                if self._error is None:
                    f.write(data)
            except BaseException as exc:  # handed to the caller, never lost
                self._error = exc
            finally:
                if done is not None:
                    done()  # even after an error: a caller waiting for a buffer must not hang
                self._queue.task_done()
        self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, f: BinaryIO, data: Raw, done: Callable[[], None] | None) -> None:
        self._raise()
        self._queue.put((f, data, done))

    def drain(self) -> None:
        self._queue.join()
        self._raise()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()


# Outputs from before the manifest (probe.results.MANIFEST): recognised by the file each command always writes, and
# replaced only when every name in them is one that command writes (a merge copies the base's tokenizer and
# processor files too); anything else there is the user's and is never deleted.
LEGACY_MARKER = {"analyses.shift": "shift.csv", "analyses.merge": "merge.json", "analyses.trajectory": "points.csv"}
LEGACY_NAMES = {
    "analyses.shift": ("shift.csv", "summary.json", "shift_*.png", "shift_*.pdf"),
    "analyses.trajectory": ("points.csv", "coords.csv", "features.npz", "run.json", "trajectory_*.png",
                            "trajectory_*.pdf"),
    "analyses.merge": ("merge.json", "merge_weights.csv", "merge_heads.png", "merge_heads.pdf", "carriers",
                       "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                       "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                       "chat_template.*", "*processor_config.json", "preprocessor_config.json"),
}


class Finished(Exception):
    """``check_output`` found ``out`` holding this very run, finished: the same command, options and inputs (a run
    killed after its output was swapped in, then rerun). Not an error: ``returns_finished`` turns it into the saved
    report."""

    def __init__(self, out: Path, command: str):
        super().__init__(f"{out} already holds this finished {command} output (same options and inputs): nothing to "
                         "do; pass --overwrite to compute it again")
        self.out, self.command = Path(out), command


def run_request(cfg: object, models: Iterable[str | Path] = (), dirs: Iterable[str | Path] = (),
                fingerprinted: Iterable[tuple[str | Path, str]] = (), dir_figures: bool = False) -> dict:
    """What an output is computed from, as its manifest keeps it: the fields of the config dataclass ``cfg`` but
    where it writes, whether it may replace, and ``threads`` (the same bits with any count), with the content
    fingerprint of every input: ``models`` (specs: a model dir's own files, as probe.eval fingerprints them),
    ``dirs`` (shift tables: every file below them but figures, which ``python -m figures`` draws into them and no
    command reads; ``dir_figures``: figures too, as outputs written before 2026-12-07 fingerprinted them) and
    ``fingerprinted`` (inputs the caller fingerprints by what it reads of them, as (path, fingerprint)).
    JSON-normal, so it compares equal to its saved copy."""
    from analyses.checkpoints import resolve_model_dir
    from probe.models import FIGURE_SUFFIXES, local_fingerprint
    from probe.results import content_fingerprint

    options = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "threads")}
    skip = (lambda f: False) if dir_figures else (lambda f: f.suffix.lower() in FIGURE_SUFFIXES)
    inputs = ([[str(m), local_fingerprint(resolve_model_dir(str(m)))] for m in models]
              + [[str(d), content_fingerprint(d, skip=skip)] for d in dirs]
              + [[str(d), fp] for d, fp in fingerprinted])
    return json.loads(json.dumps({"options": options, "inputs": inputs}, default=str))


def check_output(out: Path, overwrite: bool, command: str | None = None,
                 request: Callable[[], dict] | None = None, earlier: Callable[[], dict] | None = None) -> None:
    """Refuse an existing output unless asked; validated before anything is read (STYLE 5). An output ``command``
    finished there is told apart: from the same ``request`` (``run_request``, called only then), or the same
    request as an earlier omniprobe computed it (``earlier``), and whole, it is this run already done
    (``Finished``); from another request, or from before outputs kept theirs, it is refused saying so."""
    if out.exists() and not overwrite:
        manifest = read_manifest(out) or {}
        if command is not None and manifest.get("command") == command:
            if request is not None and "request" in manifest:
                # inputs inside a moved analyses.replicate run: where the output named them (as_computed)
                saved = as_computed(manifest["request"], resolved=False)
                if saved != as_computed(request(), resolved=False) and (
                        earlier is None or saved != as_computed(earlier(), resolved=False)):
                    raise BadInput(f"{out} holds a finished {command} output of other options or inputs; pass "
                                   "--overwrite to replace it, or use another --out")
                if (gone := gone_entries(out, manifest)) != []:
                    what = gone[0] if gone else "its listing"
                    raise BadInput(f"{out} holds this finished {command} output, but {what} is gone from it; pass "
                                   "--overwrite to compute it again")
                raise Finished(out, command)
            raise BadInput(f"{out} already holds a finished {command} output (nothing to resume); pass --overwrite "
                           "to compute it again, or use another --out")
        raise BadInput(f"{out} exists; pass --overwrite to replace it")
    check_out_path(out)  # no existing parent of it is a file


def returns_finished(report: str) -> Callable[[Callable[P, dict]], Callable[P, dict]]:
    """A run function (``run_merge`` …) that, finding its output already finished (``Finished``), says so and
    returns the saved ``report`` (a JSON file of the output) instead of computing it again: a rerun after a kill
    that came after the output was in place exits 0, like a resumed sweep or fine-tuning run."""
    def wrap(run: Callable[P, dict]) -> Callable[P, dict]:
        @functools.wraps(run)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> dict:
            try:
                return run(*args, **kwargs)
            except Finished as done:
                saved = json_object(done.out / report)
                if saved is None:
                    raise BadInput(f"{done.out / report}: unreadable, in a finished {done.command} output; pass "
                                   "--overwrite to compute it again")
                print(done)
                return saved
        return wrapper
    return wrap


def check_replaceable(out: Path, overwrite: bool, command: str) -> None:
    """--overwrite deletes ``out`` whole (the new output replaces it in one rename): refused unless ``out`` is empty
    or an earlier output of ``command`` holding only what it wrote, so ``--out runs --overwrite`` cannot wipe runs.
    Called once the inputs are known not to be in ``out`` (that refusal names the input), before any work."""
    if not (overwrite and out.is_dir()):
        return
    if Path.cwd().resolve().is_relative_to(out.resolve()):  # the swap renames the dir a shell is working in
        raise BadInput(f"--out {out} holds the current directory; --overwrite cannot replace it from inside: "
                       "run the command from elsewhere")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    try:
        manifest = read_manifest(out) or {}  # none, or unreadable: the KeyError below takes the legacy reading
        mine = set(manifest["entries"]) if manifest["command"] == command else None
        present = output_listing(out)  # every file and folder, so one added inside carriers/ counts too
    except (OSError, ValueError, KeyError, TypeError):  # written before the manifest: its top level, by name
        legacy = LEGACY_NAMES.get(command, ())
        mine = ({n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in legacy)}
                if LEGACY_MARKER.get(command) in names else None)
        present = names
    if mine is None:
        raise BadInput(f"--out {out} is not an earlier {command} output (it holds {', '.join(names[:3])}"
                       f"{', …' if len(names) > 3 else ''}); --overwrite would delete it all: pick another --out")
    foreign: list[str] = []
    for x in present:  # the outermost foreign paths only: a foreign folder stands for what is inside it
        if x not in mine and x != MANIFEST and not any(x.startswith(f + "/") for f in foreign):
            foreign.append(x)
    if foreign:
        raise BadInput(f"--out {out} holds {', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}, which "
                       f"{command} did not write; --overwrite would delete it: move it out or pick another --out")


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete ``.NAME.partial-TAG`` dirs (a run killed while writing) and ``.NAME.old-TAG`` dirs (one killed while
    swapping in an ``--overwrite``: the whole previous output) beside ``out`` whose writer is gone
    (``probe.results.writer_gone``: TAG names the PID and its host); returns them. A live process's dir, and
    another host's, is never touched.
    """
    return remove_stale_dirs(out.parent, rf"\.{re.escape(out.name)}\.(?:partial|old)-(?P<tag>{WRITER_TAG})")


def named_in_out(exc: OSError, tmp: Path, out: Path) -> OSError:
    """A write into ``atomic_dir``'s temp dir that stopped (disk full, read-only), naming the output it was for: the
    temp dir is gone by the time ``cli_main`` prints the one line, and a csv or safetensors write's error names no
    file at all."""
    name = Path(exc.filename) if isinstance(exc.filename, (str, Path)) else None
    if name is not None and not name.is_relative_to(tmp):
        return exc
    named = OSError(exc.errno, exc.strerror or os.strerror(exc.errno or 0),
                    str(out / name.relative_to(tmp) if name is not None else out))
    named.__cause__ = exc
    return named


@contextmanager
def atomic_dir(out: Path, overwrite: bool, command: str, request: dict | None = None) -> Iterator[Path]:
    """Yield a hidden temp dir beside ``out``; rename it to ``out`` on success (with a manifest of what ``command``
    wrote there and the ``request`` it was computed from), delete it on any error. Temp dirs of killed earlier runs
    (``kill -9`` leaves them) are removed first. Held (``.NAME.lock`` beside ``out``) from the check to the rename: two
    runs started into one --out at once both passed their check before either renamed, and the second then swapped
    its output in over the first's, --overwrite or not."""
    out = Path(out)
    # an --out that is a link to an output: its target is replaced and the link kept (the rename replaced the link
    # by a dir, left the old output in the target and a .NAME.old link beside, which nothing removes)
    place = out.resolve() if out.is_symlink() else out
    held = claimed()
    lock_out_dir(place, beside=True)  # missing parents are created, like any output dir
    try:
        yield from _fill_and_rename(out, place, overwrite, command, request)
    finally:
        release_claims(keep=held)


def _fill_and_rename(out: Path, place: Path, overwrite: bool, command: str, request: dict | None) -> Iterator[Path]:
    """``atomic_dir``'s work, under its lock: ``place`` is where ``out`` is written."""
    check_output(out, overwrite, command, None if request is None else lambda: request)
    check_replaceable(out, overwrite, command)
    remove_stale_partials(place)
    tmp = partial_path(place)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        # inside the try: a disk that fills on the manifest, the last write, left the whole temp dir behind
        atomic_write_json(tmp / MANIFEST, {"command": command, **({"request": request} if request is not None else {}),
                                           "entries": output_listing(tmp)})
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_STOPPED:
            raise named_in_out(exc, tmp, out)
        raise
    if place.exists():
        old = place.parent / f".{place.name}.old-{writer_tag()}"
        place.rename(old)
        tmp.rename(place)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(place)


WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.msgpack|\.h5|\.gguf)$|\.index\.json$")
# Files a model class loads beside its weights that WEIGHT_FILE would skip: Qwen2.5-Omni's speaker dictionary, read by
# Qwen2_5OmniForConditionalGeneration.from_pretrained (a carrier without it loads nowhere but in the probe).
MODEL_DATA_FILES = frozenset({"spk_dict.pt"})


# A probe.zoo build's record of one trained organism (its name, recipe, scores): a merge or fine-tune of it is
# another model, which must not carry that record as its own.
BUILD_RECORDS = frozenset({"organism.json"})


def copy_side_files(src: Path, dst: Path, only: Sequence[str] | None = None, keep_existing: bool = False) -> list[str]:
    """Copy non-weight files (configs, tokenizer, processor) from ``src``, each with a new file's mode (never a
    read-only source's); ``keep_existing`` leaves files ``dst`` already has. Returns the names copied."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        weights = WEIGHT_FILE.search(f.name) and f.name not in MODEL_DATA_FILES
        if not f.is_file() or weights or f.name.startswith(".") or f.name in BUILD_RECORDS:
            continue
        if only is not None and f.name not in only and not any(f.name.startswith(p) for p in only):
            continue
        if keep_existing and (dst / f.name).exists():
            continue
        copy_file(f, dst / f.name)
        copied.append(f.name)
    return copied
