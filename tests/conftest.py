"""Shared fixtures of the head-salience probe tests: tiny random models (fp32), a small synthetic MMMU set.

Everything heavy is session-scoped and, under pytest-xdist, built once for all workers: the model cache
(``OMNIPROBE_CACHE``) and the CLI's reference run live in a directory shared by the workers of one pytest run,
guarded by file locks. Nothing is written to ``~``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import pytest

if TYPE_CHECKING:
    import torch

FAMILIES = ("qwen2", "qwen2_vl", "llava_onevision")
VL_FAMILIES = ("qwen2_vl", "llava_onevision")
REPO = Path(__file__).resolve().parents[1]


def _exact_read_csv() -> None:
    """pandas < 3 parses a CSV's floats with its 'high' parser, up to an ulp off what ``to_csv`` wrote (pandas 3
    round-trips by default and deprecates ``float_precision``); the tests compare values read back exactly."""
    import functools

    import pandas as pd

    if int(pd.__version__.split(".")[0]) < 3 and not isinstance(pd.read_csv, functools.partial):
        pd.read_csv = functools.partial(pd.read_csv, float_precision="round_trip")


_exact_read_csv()


def _shared_root(tmp_path_factory) -> Path:
    """A tmp dir common to every xdist worker of this pytest run (the per-run basetemp otherwise)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "omniprobe-shared"
    root.mkdir(parents=True, exist_ok=True)
    return root


def module_fixture_group(item: pytest.Item) -> str | None:
    """The group of a test that uses a module-scoped fixture of its own module (a fine-tuning run, a model zoo, an
    evaluation run, ``--quick``'s replication...): its module's path, else None. By scope, not by a list of names,
    so a new module fixture is grouped too."""
    module = item.nodeid.split("::", 1)[0]
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name in getattr(item, "fixturenames", ()):
        fixturedef = defs.get(name, ())[-1:]  # the definition this test gets (the closest one)
        if fixturedef and fixturedef[0].scope == "module" and fixturedef[0].baseid == module:
            return module
    return None


GROUPS_FILE = "xdist-groups.json"


def pytest_collection_modifyitems(config, items) -> None:
    """An xdist worker writes every test's group (``module_fixture_group``) where the controller's scheduler reads
    it; the two workers collect the same tests, so they write the same file, each by an atomic replace."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import json

    groups = {item.nodeid: g for item in items if (g := module_fixture_group(item))}
    path = _shared_root(config._tmp_path_factory) / GROUPS_FILE
    tmp = path.with_name(f"{path.name}.{os.environ['PYTEST_XDIST_WORKER']}")
    tmp.write_text(json.dumps(groups), encoding="utf-8")
    os.replace(tmp, path)


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown where xdist is not installed (or -p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """``-n 2`` (``--dist load``, xdist's default) deals the tests one by one to both workers, so each worker built
    every module fixture again: two ``--quick`` replications, two FSDP runs, two model zoos where one serves.
    This scheduler deals them the same way but sends the tests of one group (``module_fixture_group``) to one worker
    whole, the largest groups first, so the other worker goes on with other tests meanwhile. (xdist's own
    ``--dist loadgroup`` with ``xdist_group`` marks would do this, but with pytest 9.2 it groups nothing:
    pytest-xdist issue 1386.) Any other ``--dist`` is left to xdist."""
    if config.getvalue("dist") != "load":
        return None
    import json

    from xdist.scheduler import LoadScopeScheduling

    class ModuleFixtureScheduling(LoadScopeScheduling):
        groups: dict[str, str] = {}

        def schedule(self) -> None:  # called once every worker has collected, so the file is written
            path = _shared_root(config._tmp_path_factory) / GROUPS_FILE
            self.groups = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            super().schedule()

        def _split_scope(self, nodeid: str) -> str:
            return self.groups.get(nodeid, nodeid)  # a test of no group is a unit of its own

    return ModuleFixtureScheduling(config, log)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    return _shared_root(tmp_path_factory)


@pytest.fixture(scope="module", autouse=True)
def no_gpu_outside_gpu_tests(request):
    """The suite's oracles are CI's: fp32 on the CPU. On a GPU box the commands' defaults (--device auto, --dtype
    auto) are the GPU's, in bf16, so every module but the gpu-marked ones (tests/test_gpu.py) sees no GPU: in this
    process through DeviceQuery.probe, in the commands it starts through CUDA_VISIBLE_DEVICES. Module-scoped and
    autouse, so it comes before the module's own fixtures (test_eval.py's eval_run runs probe.eval with its
    defaults; hidden per test function, the GPU was still visible to them). torch is asked first, so this
    process's CUDA still sees the GPU when a gpu module runs after."""
    import torch

    if request.node.get_closest_marker("gpu") is not None or not torch.cuda.is_available():
        yield
        return
    from probe.devices import DeviceQuery

    real = DeviceQuery.probe
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DeviceQuery, "probe", staticmethod(
            lambda: dataclasses.replace(real(), cuda_names=(), cuda_memory=(), cuda_bf16=False, cuda_bf16_each=())))
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


@pytest.fixture(scope="session", autouse=True)
def omniprobe_cache(shared_root) -> Path:
    """Tiny models are built once per test session under a tmp dir (never in ~/.cache)."""
    cache = shared_root / "cache"
    cache.mkdir(exist_ok=True)
    old = {k: os.environ.get(k) for k in ("OMNIPROBE_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["OMNIPROBE_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_dirs(omniprobe_cache, shared_root) -> dict[str, Path]:
    """family → directory of its tiny random model (built atomically by probe.tiny, shared by workers)."""
    from filelock import FileLock

    from probe.tiny import tiny_dir

    with FileLock(str(shared_root / "tiny.lock")):
        return {fam: tiny_dir(fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def load_tiny(tiny_dirs) -> Callable:
    """``load_tiny(family, attn="eager")`` → a LoadedModel in fp32 on CPU, cached for the session.

    Tests must leave the model as they found it (weights restored, no hooks left behind).
    """
    import torch

    from probe.models import load_model, resolve_model

    torch.set_num_threads(1)  # 2 shared cores and two xdist workers: one thread each is fastest
    cache: dict = {}

    def load(family: str, attn: str = "eager"):
        key = (family, attn)
        if key not in cache:
            cache[key] = load_model(resolve_model(str(tiny_dirs[family])), dtype="float32",
                                    attn_implementation=attn)
        return cache[key]

    return load


@pytest.fixture(scope="session")
def data_dir(shared_root) -> Path:
    """A small synthetic MMMU tree: 4 subjects × 3 rows (some open-ended), 64 px images (shared by workers)."""
    from filelock import FileLock

    from probe.synthetic import build_dataset

    root = shared_root / "mmmu"
    with FileLock(str(shared_root / "mmmu.lock")):
        if not (root / ".complete").is_file():
            build_dataset(root, n_per_subject=3, seed=1, open_fraction=0.25)
            (root / ".complete").write_text("ok")
    return root


def text_only(item):
    """``item`` without its pictures, its ``<image k>`` references made plain text: a text model can read it."""
    def plain(s: str) -> str:
        return s.replace("<image", "(image")

    return dataclasses.replace(item, images=(), question=plain(item.question),
                               options=tuple(plain(o) for o in item.options))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory, data_dir) -> Path:
    """The synthetic set's questions without images (``text_only``), as a text data set (validation split)."""
    from probe.mmmu import load_items
    from probe.synthetic import MMMU_COLUMNS, write_mmmu_parquet

    root = tmp_path_factory.mktemp("textset")
    rows: dict[str, list] = {}
    for it in map(text_only, load_items(str(data_dir))[0]):
        rows.setdefault(it.subject, []).append(
            {c: None for c in MMMU_COLUMNS} | {"id": it.id, "question": it.question, "answer": it.answer,
                                               "options": str(list(it.options)),
                                               "question_type": "multiple-choice", "explanation": ""})
    write_mmmu_parquet(rows, root, "validation")
    return root


def tree_manifest(*roots: Path) -> dict[str, tuple]:
    """Every file, folder and link at or below ``roots``: kind, size and sha256 (files), mode and mtime. Two equal
    manifests mean nothing under them was written, touched, chmod-ed, added or removed (a lock file, a cache, a
    run's folder): what a command must leave of its inputs."""
    import hashlib
    import stat

    out: dict[str, tuple] = {}
    for root in map(Path, roots):
        for p in [root, *sorted(root.rglob("*"))] if root.exists() else []:
            st = os.lstat(p)
            kind = "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file"
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if kind == "file" else None
            out[str(p)] = (kind, st.st_size if kind == "file" else None, digest, st.st_mode, st.st_mtime_ns)
    return out


def change_weights_in_place(model: Path, key_end: str) -> None:
    """``model`` retrained or re-merged at its own path, as far as its files tell: the tensor of its
    model.safetensors whose name ends with ``key_end`` doubled, every other file left as it was."""
    from safetensors.torch import load_file, save_file

    weights = Path(model) / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith(key_end))
    tensors[name] = tensors[name] * 2
    save_file(tensors, weights, metadata={"format": "pt"})


def canonical(path: Path) -> dict[str, torch.Tensor]:
    """Direct full load of a checkpoint's LM, canonical names (the in-memory side of every merge oracle)."""
    from safetensors.torch import load_file

    from analyses.checkpoints import open_checkpoint

    with open_checkpoint(str(path)) as ck:
        sd = {}
        for f in {i.file for i in ck.infos.values()}:
            sd.update(load_file(f))
        return {c: sd[k].clone() for c, k in ck.lm.items()}


def png_bytes(colour=(200, 30, 30), size=(48, 40), seed: int = 0) -> bytes:
    """A small RGB PNG with some structure (a gradient plus a coloured block), deterministic per seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2, : size[0] // 2] = colour
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_item(
    n_options: int = 4,
    answer: str = "A",
    with_image: bool = True,
    question: str = "What colour is the circle?",
    item_id: str = "validation_Test_1",
    subject: str = "Test",
    seed: int = 0,
):
    """An MMMU Item; with an image the question references it as ``<image 1>`` like MMMU does."""
    from probe.mmmu import Item

    pool = ("red", "blue", "green", "yellow", "purple", "orange", "circle", "square")
    return Item(
        id=item_id,
        subject=subject,
        question=(f"<image 1> {question}" if with_image else question),
        options=tuple(pool[:n_options]),
        answer=answer,
        images=(png_bytes(seed=seed),) if with_image else (),
    )


@pytest.fixture
def item_factory() -> Callable:
    return make_item


def inputs_for(loaded, item, template=None):
    """Model inputs for an item through the probe's own prompt builder."""
    from probe.prompting import PromptTemplate, build_inputs

    return build_inputs(loaded, item, template or PromptTemplate())


def gate_slope(loaded, inputs, ids, layer: int, head: int, eps: float = 1e-2):
    """d(option logits)/d(head gate) at gate 1 by a central finite difference of plain gated forwards (float64):
    the independent oracle of the attribution engine's Jacobian."""
    import torch

    from probe.masking import HeadMask

    outs = []
    for sign in (1, -1):
        gate = torch.ones(loaded.geometry.n_heads)
        gate[head] += sign * eps
        with torch.no_grad(), HeadMask(loaded, {layer: gate}):
            outs.append(loaded.model(**inputs).logits[0, -1, ids].double())
    return (outs[0] - outs[1]) / (2 * eps)


def option_logp(logits, ids):
    """log p over the option letters, written out here (fp32 log-softmax of their logits): the oracles' own, not
    probe.metrics' option_log_probs, which the engines call."""
    import torch

    return torch.log_softmax(logits[..., ids].float(), dim=-1)


def kl_nats(logp, logq) -> float:
    """KL(p ‖ q) = Σ p (log p − log q) over the option letters, written out here, not probe.metrics'
    kl_orig_masked (the engines' own, whose direction a swap of arguments would reverse unseen)."""
    return float((logp.double().exp() * (logp.double() - logq.double())).sum())


def text_inputs(loaded, text: str = "Question: What colour is the circle?\nChoices:\nA. red\nB. blue\n"):
    enc = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def cli_env() -> dict[str, str]:
    """The environment of a command a test runs as its own process."""
    env = dict(os.environ)  # carries OMNIPROBE_CACHE and HF offline flags set by conftest
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # two xdist workers share two cores
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def torchrun(args: Sequence[str], processes: int = 2, env: dict[str, str] | None = None, timeout: float = 300
             ) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node PROCESSES ARGS`` in the repository, its output
    captured: every test's launch goes through here. ``--standalone``: the launcher binds port 0 for its rendezvous
    (localhost:0), a free port of its own; a plain launch took the fixed 29500 on the torch releases before its
    single-node default changed (pytorch PR 175699, 2026; pyproject allows torch 2.6), so two suites, or two xdist
    workers, launching at once collided ("address already in use")."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(processes), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def killed_after_first_part(module: str, args: Sequence, setup: str = "", timeout: float = 300) -> None:
    """``python -m MODULE ARGS`` as a real process, killed by SIGKILL (as the kernel's out-of-memory killer kills: no
    handler runs, nothing is flushed) right after its first part (parts/*.parquet) is on disk. The process waits
    there to be killed, so the kill lands at that point however fast the rest would run. ``setup``: Python that
    process runs first, with tests/ importable (an out of memory injected into the killed process only)."""
    import select
    import signal
    import tempfile
    import time

    code = (f"import runpy, sys, time\nsys.path.insert(0, {str(REPO / 'tests')!r})\n{setup}\n"
            "import probe.results\n"
            "write = probe.results.atomic_write_parquet\n"
            "def written(path, *a, **k):\n"
            "    write(path, *a, **k)\n"
            "    if path.parent.name == 'parts':\n"
            "        print('part written', flush=True)\n"
            "        time.sleep(600)\n"
            "probe.results.atomic_write_parquet = written  # the commands import it when they run\n"
            f"sys.argv = [{module!r}, *{[str(a) for a in args]!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    with tempfile.TemporaryFile("w+", encoding="utf-8") as err:  # a pipe left unread could fill and block it
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                                stderr=err, text=True, encoding="utf-8")
        line, deadline = "", time.monotonic() + timeout
        try:  # what it prints on stdout before that line (nothing, as the commands are) is passed over
            while line != "part written\n" and select.select([proc.stdout], [], [],
                                                              max(0.0, deadline - time.monotonic()))[0]:
                if not (line := proc.stdout.readline()):
                    break  # it ended
        finally:  # the kill (and, where no part came, the end of a process that hangs)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            proc.stdout.close()
        err.seek(0)
        assert line == "part written\n" and proc.returncode == -signal.SIGKILL, (
            f"exit {proc.returncode} before its first part was killed:\n{err.read()[-4000:]}")


@contextlib.contextmanager
def lock_held_elsewhere(out: Path, beside: bool = False):
    """Another process holding ``out``'s run lock (DIR/.lock, probe.results.claim_out_dir; with ``beside`` the
    .NAME.lock of analyses.writer.atomic_dir) while the block runs; it ends killed, as by ``kill -9``."""
    from probe.results import lock_path

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(lock_path(out, beside))!r}, os.O_CREAT | os.O_RDWR)\n"
                               "for _ in range(300):\n"
                               "    try:\n"
                               "        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); break\n"
                               "    except BlockingIOError: time.sleep(0.1)\n"
                               "else: print('busy', flush=True); sys.exit()\n"
                               "print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:  # 'busy': something (this process?) still held the lock after 30 s
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
