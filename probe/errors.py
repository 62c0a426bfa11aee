"""One exception type for bad user input, and the CLI wrapper that turns it into exit code 2."""
from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn, ParamSpec, Sequence, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class BadInput(ValueError):
    """Raised for anything the user can fix: a missing file, an unknown alias, an out-of-range head. A ValueError,
    as Python's own refusal of a value is, so a notebook's ``except ValueError`` catches one from the Python API; a
    ``try`` of ours that catches ValueError around code raising BadInput lets it pass first (``except BadInput:
    raise``), and ``ArgParser`` keeps argparse from rewording one raised by an option's type."""


class RunStopped(RuntimeError):
    """A run-time check stopped the run before it could report a wrong number (a fast path disagreeing with its
    oracle, a transformers internal that changed): exit 1 with one line saying what and why, no traceback."""


class OutOfMemory(MemoryError, RuntimeError):
    """Memory ran out in a command run from Python (``analyses.finetune.finetune``, ``probe.eval.evaluate`` …): the
    one line the command line prints and exits 1 with (``memory_line``), raised from torch's own error. Not
    BadInput: the same call runs on a machine with room. A MemoryError, as Python's own; a RuntimeError still, as
    torch's allocator errors were, so a notebook catching those keeps catching it."""


# A full disk or quota: not the user's input, and nothing the traceback would help with.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Writes that stop for the same kind of reason: the file system went read-only mid-run (a remount, ext4's
# errors=remount-ro). Also one line, not a traceback; the rerun resumes once it is writable again.
WRITE_STOPPED = (*DISK_FULL, errno.EROFS)

# Upstream errors can carry a whole file or config in their message; one line of a report keeps this much.
REASON_CHARS = 300


# the out-of-memory advice of the commands that read checkpoints without running a model (no batch to lower)
TENSOR_MEMORY_HINT = ("free memory (other processes) or run it on a machine with more RAM, then rerun; nothing it "
                      "writes is left half-written")


# torch's CPU allocator when it fails (c10/core/impl/alloc_cpu.cpp), a RuntimeError: posix_memalign's failure on
# Linux and macOS, a null pointer from _aligned_malloc (Windows), mimalloc or memalign (Android)
CPU_ALLOCATOR_FAILED = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def out_of_memory(exc: BaseException) -> str | None:
    """Where an exception says memory ran out ("the GPU (tried to allocate 20.00 GiB)", "RAM (…)"), None when it is
    something else. torch raises OutOfMemoryError on a GPU, a RuntimeError from its CPU allocator in RAM
    (``CPU_ALLOCATOR_FAILED``). Only these allocators' refusals count (they fail before anything is allocated, so
    a smaller batch may be retried); a CUDA driver error that says "out of memory" does not."""
    import re

    text = str(exc)
    if type(exc).__name__ == "OutOfMemoryError":
        size = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", text)
        gpu = re.search(r"GPU (\d+)", text)
        return (f"GPU {gpu.group(1)}" if gpu else "the GPU") + (f" (tried to allocate {size.group(1)})" if size else "")
    if isinstance(exc, MemoryError) or any(words in text for words in CPU_ALLOCATOR_FAILED):
        size = re.search(r"allocate (\d+) bytes", text)
        return "RAM" + (f" (tried to allocate {int(size.group(1)) / 2**30:.2f} GiB)" if size else "")
    return None


# cli_main's out-of-memory advice for a command that sets no main.memory_hint of its own (--batch-size is outside
# the runs' identity, --dtype not)
BATCH_MEMORY_HINT = (
    "lower the batch size (--batch-size; replicate: eval.batch_size or heads.batch_size, for fine-tuning "
    "finetune.micro_batch or finetune.gradient_checkpointing) or spread the model over more GPUs (--device auto), "
    "then rerun (a resumable run goes on from what it had saved)")


def memory_line(exc: BaseException, hint: str | None = None) -> str | None:
    """The one line for memory running out (``out_of_memory``) with ``hint``'s advice (None: ``BATCH_MEMORY_HINT``),
    else None: what ``cli_main`` prints (after ``error: ``) and ``says_out_of_memory`` raises."""
    if isinstance(exc, OutOfMemory):
        return str(exc)
    if (where := out_of_memory(exc)) is None:
        return None
    return f"out of memory in {where}; {hint or BATCH_MEMORY_HINT}"


def says_out_of_memory(hint: str | None = None) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A command's Python entry point (``finetune(**options)`` …) that raises OutOfMemory with the command line's
    line where memory runs out (``hint``: the command's ``main.memory_hint``), not torch's allocator error; what the
    run wrote is left as the command leaves it."""
    def decorate(run: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(run)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return run(*args, **kwargs)
            except (MemoryError, RuntimeError) as exc:
                if isinstance(exc, OutOfMemory) or (line := memory_line(exc, hint)) is None:
                    raise
                raise OutOfMemory(line) from exc

        return wrapper

    return decorate


# how far down an exception's chain its causes are looked for
CHAIN_LINKS = 8


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then the error it was raised from (``__cause__``) or while handling (``__context__``), and so on, a
    few links (``CHAIN_LINKS``) down: where a library's own error hides the one that says what happened."""
    seen: BaseException | None = exc
    for _ in range(CHAIN_LINKS):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


# CPython's RuntimeError when the OS would not start a thread (pthread_create's EAGAIN)
THREAD_REFUSED = "can't start new thread"


def start_refused(exc: BaseException) -> str | None:
    """"thread" or "process" where ``exc`` (or an error it was raised from, a few links down) says this machine would
    not start one: its limit on processes and threads (ulimit -u, a container's pids.max) is reached; None when it
    is something else. A thread: CPython's RuntimeError ``THREAD_REFUSED`` (transformers' loader starts a thread
    pool, probe.batch a preparing thread). A process: EAGAIN from a fork or exec whose innermost Python frame is in
    multiprocessing or subprocess (probe.zoo build's process pool); the same errno from a non-blocking read is no
    such failure."""
    for seen in exception_chain(exc):
        if isinstance(seen, RuntimeError) and THREAD_REFUSED in str(seen):
            return "thread"
        if isinstance(seen, OSError) and seen.errno == errno.EAGAIN and _in_process_start(seen):
            return "process"
    return None


# where multiprocessing and subprocess fork or exec a child (os.fork, _posixsubprocess.fork_exec, os.posix_spawn)
PROCESS_STARTS = ("_launch", "spawnv_passfds", "_execute_child", "_fork_exec", "_posix_spawn")


def _in_process_start(exc: BaseException) -> bool:
    """Whether the deepest frame of multiprocessing or subprocess that ``exc`` passed through starts a child."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        name = code.co_filename
        if f"{os.sep}multiprocessing{os.sep}" in name or name.endswith(f"{os.sep}subprocess.py"):
            last = code.co_name
        tb = tb.tb_next
    return last in PROCESS_STARTS


def start_refused_line(exc: BaseException) -> str | None:
    """``cli_main``'s line for a thread or process this machine would not start (``start_refused``), else None. Not
    bad input (exit 1, as memory running out): the same command runs on a machine, or under a limit, with room."""
    if (what := start_refused(exc)) is None:
        return None
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else error_reason(exc)
    return (f"cannot start a {what} ({reason}): this machine's limit on processes and threads is reached (ulimit -u, "
            "a container's pids limit); lower --threads or OMP_NUM_THREADS, or raise the limit, then rerun (a "
            "resumable run goes on from what it had saved)")


def error_reason(exc: BaseException) -> str:
    """An upstream error's reason in one line: its first line, or a heading ending in ':' with the line below
    (cut at REASON_CHARS); the exception's type name when it has no message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS - 1] + "…"


class _ListOnce(argparse._StoreAction):
    """A list option (``nargs`` "+" or "*") given once: argparse keeps only the last of ``--data a --data b``, so
    the run silently went without ``a``. A second occurrence is a usage error naming the option."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self.nargs in ("+", "*") and option_string:
            given = parser.__dict__.setdefault("_lists_given", set())
            if self.dest in given:
                parser.error(f"{option_string} given twice: list all its values after one {option_string}")
            given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


def is_int(value: Any) -> bool:
    """An int, not a bool: a config's or a JSON file's ``true`` is an int to ``isinstance`` (``True == 1``), never a
    size, count or index."""
    return isinstance(value, int) and not isinstance(value, bool)


_ASCII_INT = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)


def ascii_int(text: str) -> int:
    """An integer written in ASCII digits, with an optional sign (ranges are each option's own check). ``int()``
    takes any Unicode decimal digit and ``_`` separators: ``--layers ٣`` (Arabic-Indic three) ran layer 3 and
    ``--limit 1_0`` ten items. The type of every ``type=int`` option (``ArgParser`` maps ``int`` to it) and of
    the numbers in a ``--layers``/``--heads`` spec. ValueError otherwise, as ``int()`` raises."""
    if not isinstance(text, str) or not _ASCII_INT.fullmatch(text):
        raise ValueError(f"invalid literal for int() with base 10: {text!r}")
    return int(text)


def ascii_float(text: str) -> float:
    """``ascii_int``'s counterpart for ``type=float`` options: ``float()`` too reads ``٠٫٥``-style digits and
    ``1_0``. ASCII only, no ``_``; ``inf`` and ``nan`` pass as ``float()`` reads them (each option checks its
    range)."""
    if not isinstance(text, str) or not text.isascii() or "_" in text:
        raise ValueError(f"could not convert string to float: {text!r}")
    return float(text)


# what argparse takes for a negative number rather than an option: any form float() reads (its own pattern, up to
# Python 3.12, is -3 and -0.5 only, so `--lm-lr -1e-3` was "expected one argument", not the rate's own check);
# no option of ours looks like one, so an argument matching it is always a value (argparse calls .match: \Z ends it)
_NEGATIVE_NUMBER = re.compile(r"-(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)\Z",
                              re.ASCII | re.IGNORECASE)


class ArgParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (``error: … (see --help)``, exit 2), like
    BadInput; ``--help`` still prints the full help, ending with ``examples`` (command lines, shown as written).
    A list option given twice is a usage error (``_ListOnce``). ``type=int`` and ``type=float`` read ASCII
    numbers only (``ascii_int``, ``ascii_float``): argparse looks a type up in this registry before calling it,
    so every option of every CLI gets them, and the usage error still says ``invalid int value: '٣'``. A negative
    number in any form ``float()`` reads (``-1e-3``, ``-inf``) is an option's value, not an option
    (``_NEGATIVE_NUMBER``): each option's own check says what is wrong with it."""

    def __init__(self, *args, examples: Sequence[str] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.examples = list(examples)
        self.register("action", None, _ListOnce)  # argument groups share this registry
        self.register("action", "store", _ListOnce)
        self.register("type", int, ascii_int)  # subparsers are ArgParsers too (argparse's parser_class default)
        self.register("type", float, ascii_float)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self._lists_given: set[str] = set()  # per parse: a parser may parse several command lines
        return super().parse_known_args(args, namespace)

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        # argparse rewords a type's ValueError as "invalid in_path value: '~x/r'": a BadInput (a ValueError) it
        # raised says what is wrong itself, so it leaves as raised (argparse.ArgumentError carries it as __context__)
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as exc:
            if isinstance(exc.__context__, BadInput):
                raise exc.__context__ from None
            raise

    def format_help(self) -> str:
        # a description taken from a module docstring keeps its reST ``code`` marks for pydoc; a terminal gets text
        text = super().format_help().replace("``", "")
        return text + ("\nexamples:\n" + "".join(f"  {e}\n" for e in self.examples) if self.examples else "")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see --help)\n")


def check_counts(args: object, names: Sequence[str]) -> None:  # parsed arguments or a config dataclass
    """Options that count something (``--batch-size``, ``--items`` …) are ≥ 1 when given: BadInput naming the
    first that is not (0 or a negative count fails later as a traceback, or loops over nothing). ``threads`` is
    also held to ``check_threads``' bound."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
        if name == "threads" and value is not None:
            check_threads(value)


# torch threads per CPU a command may ask for: a few more than the CPUs can pay off; far more only slows the run
THREADS_PER_CPU = 4


def check_threads(n: int, flag: str = "--threads") -> None:
    """A torch thread count this machine can start: at most ``THREADS_PER_CPU`` × its CPUs (at least 8). Past a C int
    torch.set_num_threads raised a ValueError traceback; --threads 100000 made libgomp abort the process ("Out of
    memory allocating …", exit 1) halfway through analyses.merge's output."""
    cpus = os.cpu_count() or 1
    if n > (limit := max(8, THREADS_PER_CPU * cpus)):
        raise BadInput(f"{flag} {n}: more torch threads than this machine runs well (at most {limit}, "
                       f"{THREADS_PER_CPU} × its {cpus} CPUs); OpenMP cannot even start that many")


def in_path(text: str | Path) -> Path:  # a Path too: configs and readers from Python expand theirs here
    """The argparse type of a path read, not written (a results dir to draw or merge from, a config or template
    file): ``~`` expanded as in --out and in a model's or data set's path (``figures heads '~/runs/x'`` said the
    folder was not a directory). ``~user`` of no user on this machine is bad input (pathlib raises RuntimeError,
    which argparse lets through as a traceback)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise BadInput(f"{text}: {str(text).split('/')[0]} names no user's home on this machine") from None


# --out's argparse type: the same expansion, one function under the name its callers read as "written" (a quoted
# ``~/runs/x``, or one from a script, wrote the run into a folder named ``~`` under the working dir, while the
# checks that --out is no input looked at the home dir's)
out_dir = in_path


def check_out_path(out: Path, flag: str = "--out") -> None:
    """``out`` is, or can be created as, a directory: neither it nor any existing parent is a file, and the
    nearest existing one is writable (a read-only mount or directory was a traceback at the first write, after
    the models had loaded). ``flag``: what the messages call ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{flag} {out} exists and is not a directory")
    for d in (out.absolute(), *out.absolute().parents):
        if d.exists():
            if not d.is_dir():
                raise BadInput(f"{flag} {out}: {d} is a file, not a directory")
            if not os.access(d, os.W_OK | os.X_OK):
                raise BadInput(f"{flag} {out}: {d} is not writable (read-only file system or permissions)")
            break


def input_in_out(out: Path, inputs: Iterable[tuple[str, str | Path]]) -> tuple[str, Path] | None:
    """The first (name, resolved path) of ``inputs`` that ``out`` is or holds: replacing ``out`` would delete it."""
    out_r = in_path(out).resolve()
    for name, path in inputs:
        p = in_path(path).resolve()
        if out_r == p or out_r in p.parents:
            return name, p
    return None


def out_inside(out: Path, dirs: Iterable[tuple[str, str | Path]]) -> tuple[str, Path] | None:
    """The first (name, resolved path) of ``dirs`` that ``out`` lies inside (strictly below it)."""
    out_r = in_path(out).resolve()
    for name, path in dirs:
        p = in_path(path).resolve()
        if p in out_r.parents:
            return name, p
    return None


def check_out_apart(out: Path, inputs: Iterable[tuple[str, str | Path]] = (), data: Iterable[str | Path] = ()) -> None:
    """A command never writes where it reads. ``out`` is refused when it is or holds one of ``inputs`` ((what, path):
    its --overwrite deleted the files it owns there whatever wrote them, e.g. a fine-tuning run's run.json when its
    checkpoints were evaluated into it), or lies inside one of the ``data`` sets: the run's folder then read as one of
    the set's subjects, and one holding no parquet file yet (a run just started, or killed) stopped every command
    reading the set, the resume included."""
    if hit := input_in_out(out, inputs):
        verb = "is" if in_path(out).resolve() == hit[1] else "holds"
        raise BadInput(f"--out {out} {verb} the {hit[0]} {hit[1]}: a command never writes where it reads; pick an "
                       "--out outside it")
    if hit := out_inside(out, [("data set", d) for d in data]):
        raise BadInput(f"--out {out} is inside the data set {hit[1]}: the run's folder would read as one of its "
                       "subjects (one without data files stops every command reading the set); pick an --out "
                       "outside it")


def make_out_dir(out: Path, flag: str = "--out") -> None:
    """Create ``out`` (and its parents) or say in one line why not: ``check_out_path``'s permission check can pass
    where the create still fails (root on an NFS export that squashes root, a pseudo file system)."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"{flag} {out}: cannot create it ({exc.strerror or exc})") from None


def write_stopped(exc: BaseException, path: str | Path | None) -> OSError | None:
    """``exc`` as an OSError naming ``path`` (None: the file ``exc`` names, if any) when it says a write stopped
    (``WRITE_STOPPED``), else None. Not only OSError: safetensors' Rust writer raises SafetensorError("No space left
    on device (os error 28)"), which ``cli_main`` printed as a traceback."""
    import re

    # down the chain too: matplotlib's PDF writer, stopped by a full or read-only disk, fails again while it closes
    # (zlib.error "inconsistent stream state"), and that error hid the OSError behind it
    for seen in exception_chain(exc):
        if not isinstance(seen, Exception):
            return None
        if isinstance(seen, OSError):
            code = seen.errno
        else:
            code = int(m.group(1)) if (m := re.search(r"\(os error (\d+)\)", str(seen))) else None
        if code in WRITE_STOPPED:
            break
    else:
        return None
    where = str(path) if path is not None else getattr(seen, "filename", None)
    named = OSError(code, os.strerror(code)) if where is None else OSError(code, os.strerror(code), where)
    named.__cause__ = exc
    return named


def drop_partial(tmp: Path, dest: str | Path, exc: BaseException) -> NoReturn:
    """In the ``except`` block around filling ``tmp``, a hidden temp dir meant to become ``dest``: remove it at once
    (its space is freed now, not at the rerun) and re-raise ``exc``, the exception being handled; a write the file
    system stopped as ``write_stopped``'s OSError naming ``dest`` (the temp dir is gone, and safetensors' or PIL's
    errors name no file or are no OSError)."""
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    if (stopped := write_stopped(exc, dest)) is not None:
        raise stopped
    raise exc


def counted(n: int, word: str) -> str:
    """``n`` and ``word``, plural but for one: "1 subject", "2 subjects", "0 threads"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def close_progress_bars() -> None:
    """Close the progress bars still open (the run stopped inside one): a last line printed now is not glued to a
    bar's last update, nor followed by the bar drawn again as the run's frames are freed."""
    if (tq := sys.modules.get("tqdm")) is not None:
        for bar in list(getattr(tq.tqdm, "_instances", ())):
            bar.close()


def print_error(message: str) -> None:
    """``error: message`` on a line of its own (``close_progress_bars`` first)."""
    close_progress_bars()
    print(f"error: {message}", file=sys.stderr)


def _several(value: object) -> list[object] | None:
    """``value``'s items when it holds several values in order (a list or tuple, and what a notebook holds them in:
    a numpy array, a pandas Series or Index, dict keys, a generator), else None: a single value. A str, bytes, a
    path, a mapping or a set is no list here (a set has no order; the others are one value or none at all)."""
    if isinstance(value, (str, bytes, bytearray, os.PathLike, dict, set, frozenset)) or not hasattr(value, "__iter__"):
        return None
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:  # a 0-d numpy array: iterable by type, one value
        return None


def option_words(prog: str, key: str, flag: str, action: argparse.Action, value: object) -> list[str]:
    """The command-line words of keyword ``key`` = ``value`` for a non-flag option: its values as text. A value no
    word stands for is a TypeError naming the keyword (str() of it was passed on: ``out=7`` wrote into a folder 7, a
    set or a numpy array of models read as one model "['a' 'b']"); several values for a one-value option BadInput,
    as the command line's extra words are. ``flag``: the option's name in the messages."""
    items = _several(value)
    values = [value] if items is None else items
    for v in values:
        if isinstance(v, (bool, dict, set, frozenset, bytes, bytearray)) or _several(v) is not None:
            what = ("a flag's True/False" if isinstance(v, bool) else "a set (it has no order: give a list)"
                    if isinstance(v, (set, frozenset)) else f"a {type(v).__name__}")
            raise TypeError(f"{prog}: {key} ({flag}) takes {'a list of ' if action.nargs in ('+', '*') else ''}"
                            f"text or numbers, not {what}: {v!r}")
        if action.type is in_path and not isinstance(v, (str, os.PathLike)):
            raise TypeError(f"{prog}: {key} ({flag}) is a path: give a str or a pathlib.Path, not {v!r}")
    if action.nargs in (None, "?") and len(values) > 1:
        raise BadInput(f"{prog}: {key} ({flag}) takes one value, not {len(values)}: "
                       f"{', '.join(repr(str(v)) for v in values)}")
    return [os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in values]


def parse_options(parser: argparse.ArgumentParser, options: dict[str, object]) -> argparse.Namespace:
    """A command's arguments from Python keywords, for the functions that run a command from a notebook
    (``probe.heads.sweep``, ``probe.eval.evaluate``, ``analyses.shift.shift``, ``analyses.merge.merge``,
    ``analyses.trajectory.trajectory``, ``analyses.finetune.finetune``, ``analyses.replicate.replicate``): each
    keyword is an option by its name in ``--help`` with ``_`` for ``-`` (``batch_size=8`` is ``--batch-size 8``), or
    by the name it is stored under where that differs (analyses.merge's ``carriers`` for ``--carrier``), a list (or
    any ordered iterable: a numpy array, a Series, dict keys) for an option of several values, True for a flag. They
    go through the command's own parser, so its defaults and checks are the command line's; an unknown keyword, or
    a value of a type no command-line word stands for (``option_words``: a bool for a non-flag, an int for a path,
    a set, a dict), is a TypeError, a value the parser refuses BadInput (never SystemExit)."""
    by_dest = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    argv: list[str] = []
    for key, value in options.items():
        action = by_dest.get(key)
        if action is None:
            raise TypeError(f"{parser.prog}: no option {key!r} (the options: {', '.join(sorted(by_dest))})")
        flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        if action.nargs == 0:  # a flag: True gives it, False leaves it out
            if not isinstance(action, argparse._StoreTrueAction):  # a store_false flag would read inverted
                raise TypeError(f"{parser.prog}: option {key!r} is not a store_true flag; not supported by keyword")
            if not isinstance(value, bool):
                raise TypeError(f"{parser.prog}: {key} is a flag; give True or False, not {value!r}")
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, *option_words(parser.prog, key, flag, action, value)]

    def refuse(message: str) -> NoReturn:
        raise BadInput(f"{parser.prog}: {' '.join(message.split())}")

    parser.error = refuse  # type: ignore[method-assign]  # this parser only: BadInput, not exit 2
    return parser.parse_args(argv)


def releases_claims(run: Callable[P, R]) -> Callable[P, R]:
    """A run function (``probe.heads.run``, ``probe.eval.run``, ``analyses.finetune.run_finetune`` …) whose --out
    claims (``probe.results.claim_out_dir``: an flock held through an open descriptor) end when it returns or raises,
    not when the process does: each call in one process (analyses.replicate's stages, a script looping over
    checkpoints) left one descriptor open and its finished --out locked against every other command."""
    @functools.wraps(run)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        results = sys.modules.get("probe.results")
        held = results.claimed() if results is not None else frozenset()  # a caller's claims stay
        try:
            return run(*args, **kwargs)
        finally:
            if (results := sys.modules.get("probe.results")) is not None:
                results.release_claims(keep=held)

    return wrapper


def undone_on_bad_input(run: Callable[P, R]) -> Callable[P, R]:
    """A run function taking ``args`` with an ``out`` (probe.heads.run, probe.eval.run) that, stopped by bad input
    it finds only as it computes (an item its processor refuses: items are built as they run, after run.json is
    written), takes back what it wrote to an --out that was new or empty — run.json, the lock, the dir — when it
    still holds that --out alone and no part was written: such bad input leaves nothing, as the bad input found
    before the run starts does."""
    from pathlib import Path

    @functools.wraps(run)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from probe.devices import rank_world
        from probe.results import LOCK, claimed, clear_run_dir, has_contents

        out = Path(args[0].out)  # type: ignore[attr-defined]
        new = not out.exists()
        fresh = new or not has_contents(out)
        try:
            return run(*args, **kwargs)
        except BadInput:
            mine = out.is_dir() and str(out.resolve()) in claimed()
            parts = out / "parts"
            if fresh and mine and rank_world()[1] == 1 and not (parts.is_dir() and any(parts.iterdir())):
                clear_run_dir(out, ("run.json", LOCK))
                if new and not any(out.iterdir()):
                    out.rmdir()
            raise

    return wrapper


def quiet_interrupt(signum: int, frame: object) -> NoReturn:
    """SIGINT while ``python -m <command>`` still imports its modules, before ``cli_main`` runs: the one line and exit
    code of an interrupted run, not the import machinery's KeyboardInterrupt traceback. Nothing is written yet."""
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # not SystemExit: code importing at that moment may catch BaseException


def interrupt_quietly_while_importing() -> None:
    """Called by the packages' ``__init__`` when Python runs one of their modules as a command (``sys.argv[0]`` is
    ``-m`` while the module is located); ``cli_main`` restores Python's handler, whose KeyboardInterrupt a command
    cleans up after."""
    if sys.argv[:1] == ["-m"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, quiet_interrupt)


def say_write_stopped(exc: Exception) -> int:
    """In ``cli_main``'s handler: a write the file system stopped (``write_stopped``) is one line and exit 1; anything
    else is re-raised as it was, with its traceback."""
    if (stopped := write_stopped(exc, None)) is None:
        raise  # the exception being handled, unchanged
    where = f" writing {stopped.filename}" if stopped.filename is not None else ""
    fix = "free space" if stopped.errno in DISK_FULL else "make it writable"
    print_error(f"{os.strerror(stopped.errno).lower()}{where}; {fix} and rerun the same command (a resumable run "
                "goes on from what it had saved)")
    return 1


def print_on_any_terminal() -> None:
    """Output the terminal's encoding cannot show (the ×, Δ and ‖ of help texts and summaries, under
    PYTHONIOENCODING=ascii or a latin-1 locale) is printed escaped: strict encoding made --help, and a command
    whose results were already written, end in a UnicodeEncodeError traceback."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


@dataclass
class KeptInterrupt:
    """Ctrl-C landing while Python runs a finalizer (a ``__del__``, a weakref callback, a generator closed as it is
    freed): Python hands that KeyboardInterrupt to ``sys.unraisablehook``, which printed it as "Exception ignored in
    …" and dropped it, and the run went on to exit 0. ``cli_main`` installs ``hook`` for a command's run: it records
    the interrupt, prints nothing, and raises it again as soon as the finalizer has returned, at the next Python call
    or return of the main thread (a profile function: re-sending SIGINT from the hook was dropped too, inside the
    hook); ``dropped`` lets ``cli_main`` still exit 130 where that raise could not be placed (another profiler set)
    or was swallowed. Any other unraisable exception goes to the hook it replaced."""

    previous: Callable[[Any], object]
    dropped: bool = False

    def hook(self, unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            self.previous(unraisable)
            return
        self.dropped = True
        if threading.current_thread() is threading.main_thread() and sys.getprofile() in (None, self.reraise):
            sys.setprofile(self.reraise)

    def reraise(self, frame: Any, event: str, arg: object) -> None:
        if frame.f_code is KeptInterrupt.hook.__code__:
            return  # still in the hook (its setprofile's c_return, its return): raised there it is dropped again
        sys.setprofile(None)
        raise KeyboardInterrupt  # dropped again if this is another finalizer: the hook then re-arms


def cli_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI entry point: exit 2 with one line for BadInput, 1 with one line for a stopped run, a full disk,
    memory running out or a thread or process the machine would not start, 1 with a traceback for anything
    unexpected, 130 with the one line ``interrupted`` for Ctrl-C (one landing in a finalizer too: ``KeptInterrupt``);
    the --out dirs it claimed are freed when it returns."""
    as_command = signal.getsignal(signal.SIGINT) is quiet_interrupt  # python -m <command>, not a caller's process
    if as_command:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print_on_any_terminal()
    kept = KeptInterrupt(sys.unraisablehook)
    sys.unraisablehook = kept.hook
    try:
        code = main(argv)
        if kept.dropped and code == 0:  # the re-raise was swallowed: the user asked to stop, whatever finished
            raise KeyboardInterrupt
        return code
    except BadInput as exc:
        print_error(str(exc))
        return 2
    except NotADirectoryError as exc:  # a path the user gave runs through a regular file (--out FILE/sub)
        where = exc.filename if exc.filename is not None else exc
        print_error(f"{where}: part of this path is a file, not a directory")
        return 2
    except RunStopped as exc:
        print_error(' '.join(str(exc).split()))
        return 1
    except (MemoryError, RuntimeError) as exc:  # a batch too large for the device: one line saying what to lower
        if (line := start_refused_line(exc)) is not None:
            print_error(line)
            return 1
        # a command whose own advice differs sets main.memory_hint (fine-tuning: a smaller batch is another run);
        # an OutOfMemory (a command's Python entry point run inside this one) already says its line
        if (line := memory_line(exc, getattr(main, "memory_hint", None))) is None:
            return say_write_stopped(exc)  # torch's own write errors are RuntimeErrors
        print_error(line)
        return 1
    except Exception as exc:  # OSError, or a write error of another type (safetensors') no caller named a file for
        if (line := start_refused_line(exc)) is not None:  # a process pool's fork refused (EAGAIN)
            print_error(line)
            return 1
        return say_write_stopped(exc)
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130
    finally:  # the command's --out claims end with it (only a command that loaded probe.results can hold any)
        if sys.unraisablehook == kept.hook:  # bound methods: equal, not identical
            sys.unraisablehook = kept.previous
        if sys.getprofile() == kept.reraise:
            sys.setprofile(None)
        if (results := sys.modules.get("probe.results")) is not None:
            results.release_claims()
        if as_command and threading.current_thread() is threading.main_thread():
            # Python's shutdown (exit callbacks: seconds with torch loaded) ends as the imports do on a Ctrl-C, not
            # in an "Exception ignored" traceback; what the command printed goes out first (os._exit drops buffers)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):  # a closed pipe (| head) or stream: Python's exit reports it as before
                    pass
            signal.signal(signal.SIGINT, quiet_interrupt)
