"""--device auto / --dtype auto (probe.devices): resolution with CUDA absent and with substituted machines."""
from __future__ import annotations

import json
import re

import pytest

from probe.devices import DeviceQuery, resolve_placement
from probe.errors import BadInput

CPU = DeviceQuery((), False, True, 2)
CPU_NO_BF16 = DeviceQuery((), False, False, 2)
ONE_GPU = DeviceQuery(("NVIDIA H200",), True, True, 16)
TWO_OLD_GPUS = DeviceQuery(("Tesla V100", "Tesla V100"), False, True, 16)


def test_auto_on_cpu_is_fp32():
    p = resolve_placement(query=CPU)
    assert (p.device, p.dtype, p.device_type) == ("cpu", "float32", "cpu")
    assert p.description == "device cpu (2 threads), dtype float32, attention sdpa"


@pytest.mark.parametrize("threads, said", [(1, "(1 thread)"), (2, "(2 threads)")])
def test_the_placement_line_counts_cpu_threads_in_english(threads, said):
    """Under OMP_NUM_THREADS=1 every command's first line read "device cpu (1 threads)"."""
    line = resolve_placement("cpu", "auto", query=DeviceQuery((), False, True, threads)).description
    assert line.startswith(f"device cpu {said}, dtype float32"), line


def test_auto_on_a_gpu_is_bf16_on_it():
    p = resolve_placement(query=ONE_GPU, local_rank=None)
    assert (p.device, p.dtype) == ("cuda:0", "bfloat16")
    assert p.description == "device cuda:0 (NVIDIA H200), dtype bfloat16, attention sdpa"


def test_gpus_without_bf16_and_torchrun_ranks():
    assert resolve_placement(query=TWO_OLD_GPUS).dtype == "float32"
    p = resolve_placement(query=TWO_OLD_GPUS, local_rank=1)
    assert p.device == "cuda:1" and p.device_type == "cuda"
    assert resolve_placement("cuda", query=TWO_OLD_GPUS, local_rank=1).device == "cuda:1"
    with pytest.raises(BadInput, match="does not support bfloat16"):
        resolve_placement("cuda", "bfloat16", query=TWO_OLD_GPUS)


def test_device_cuda_on_a_rank_without_its_own_gpu_is_bad_input():
    """--device cuda is the rank's GPU; a rank past the visible GPUs was an IndexError traceback (exit 1) while
    --device auto named the problem. Oracle: auto's own refusal of the same rank."""
    for rank, world, match in ((2, None, "rank 2 has no GPU of its own \\(2 visible\\)"),
                               (3, 4, "4 ranks on this machine, 2 GPU\\(s\\) visible: a rank would have no GPU")):
        with pytest.raises(BadInput, match=match) as auto:
            resolve_placement("auto", query=TWO_OLD_GPUS, local_rank=rank, local_world=world)
        with pytest.raises(BadInput, match=match) as explicit:
            resolve_placement("cuda", query=TWO_OLD_GPUS, local_rank=rank, local_world=world)
        assert str(explicit.value).split(": ", 1)[1] == str(auto.value).split(": ", 1)[1]
    assert resolve_placement("cuda", query=TWO_OLD_GPUS, local_rank=1, local_world=2).device == "cuda:1"


def test_local_rank_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_placement(query=TWO_OLD_GPUS).device == "cuda:1"
    assert resolve_placement(query=CPU).device == "cpu"


@pytest.mark.parametrize("device,dtype,query,match", [
    ("cuda", "auto", CPU, "no CUDA GPU is visible"),
    ("cuda:3", "auto", ONE_GPU, "only 1 GPU"),
    ("tpu", "auto", CPU, "unknown --device"),
    ("cpu", "bfloat16", CPU_NO_BF16, "this CPU does not support bfloat16"),
    ("cpu", "float8", CPU, "unknown --dtype"),
])
def test_explicit_choices_the_machine_cannot_honour(device, dtype, query, match):
    with pytest.raises(BadInput, match=match):
        resolve_placement(device, dtype, query=query)


@pytest.mark.parametrize("device,dtype,query,match", [
    ("cpu", "float32", CPU, "needs a CUDA GPU"),
    ("cuda", "bfloat16", ONE_GPU, "needs the flash-attn package"),
    ("cuda", "float32", DeviceQuery(("NVIDIA H200",), True, True, 16, flash_attn=True), "not float32"),
])
def test_flash_attention_the_machine_cannot_run(device, dtype, query, match):
    """Was transformers' ImportError as a traceback (exit 1) once the model started loading."""
    with pytest.raises(BadInput, match=match):
        resolve_placement(device, dtype, "flash_attention_2", query=query)
    ok = DeviceQuery(("NVIDIA H200",), True, True, 16, flash_attn=True)
    assert resolve_placement("cuda", "bfloat16", "flash_attention_2", query=ok).attn_implementation == "flash_attention_2"


def test_explicit_choices_pass_through():
    p = resolve_placement("cpu", "bf16", query=CPU)
    assert (p.device, p.dtype) == ("cpu", "bfloat16")
    assert resolve_placement("cuda:0", "float16", query=ONE_GPU).dtype == "float16"


def test_real_machine_defaults_are_cpu_fp32_here():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the defaults are the GPU's")
    p = resolve_placement()
    assert (p.device, p.dtype) == ("cpu", "float32")


def test_cli_prints_and_records_placement_and_refuses_another_on_resume(tmp_path, data_dir, tiny_dirs, capfd):
    """The default run says where it runs, records it, and a resume in another dtype is a different run."""
    from probe.errors import cli_main
    from probe.heads import main

    out = tmp_path / "run"
    args = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(data_dir), "--limit", "2", "--layers", "0",
            "--heads", "0", "--no-generate", "--no-figures", "--quiet", "--out", str(out)]
    assert cli_main(main, args) == 0
    said = capfd.readouterr()  # on stdout, as progress: stderr is left to warnings and the one line of a refusal
    assert said.out.startswith("device cpu (") and "dtype float32, attention sdpa" in said.out.splitlines()[0]
    assert "device cpu" not in said.err
    run = json.loads((out / "run.json").read_text())
    assert run["placement"]["device"] == "cpu" and run["placement"]["dtype"] == "float32"
    assert run["plan"]["settings"]["device_type"] == "cpu"
    assert cli_main(main, args + ["--dtype", "float16"]) == 2
    assert "holds a different run" in capfd.readouterr().err


def _meminfo_available() -> int:
    """The oracle: MemAvailable read here on its own."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def test_the_cpu_placement_knows_the_free_ram():
    """A model too large for the machine's RAM loaded for minutes and was killed (exit 137, no word): the CPU
    placement now carries the free RAM, so the load can be checked against it."""
    from probe.devices import available_ram

    got, want = available_ram(), _meminfo_available()
    assert abs(got - want) < 512 << 20  # other processes allocate between the two reads
    assert resolve_placement(query=DeviceQuery(cpu_memory=3 << 30)).device_memory == (3 << 30,)
    assert resolve_placement(query=CPU).device_memory == ()  # unknown: not checked


@pytest.mark.parametrize("fits", [True, False])
def test_a_model_larger_than_the_device_is_refused_before_loading(fits: bool):
    """The bound is the loaded model's own parameter and buffer bytes (counted here on the loaded model) within
    the headroom dispatch uses for GPUs: 1 KB more memory loads, 1 KB less is bad input naming the sizes."""
    from probe.dispatch import HEADROOM_BYTES, HEADROOM_FRACTION
    from probe.models import load_model, resolve_model

    ref = resolve_model("organism-vl")
    loaded = load_model(ref)
    need = sum(t.numel() * t.element_size() for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    memory = int((need + HEADROOM_BYTES) / HEADROOM_FRACTION) + (1024 if fits else -1024)
    if fits:
        load_model(ref, device_memory=[memory])
    else:
        usable = (memory * HEADROOM_FRACTION - HEADROOM_BYTES) / 2**20
        with pytest.raises(BadInput, match=rf"organism-vl: its weights take {need / 2**20:.1f} MiB in float32, more "
                                           rf"than cpu can hold \({memory / 2**30:.1f} GiB free, {usable:.1f} MiB "
                                           r"usable\); use --dtype bfloat16, a GPU"):
            load_model(ref, device_memory=[memory])


def test_eval_refuses_a_model_too_large_for_the_ram_before_writing(tmp_path, monkeypatch, capsys):
    from probe import devices
    from probe.errors import cli_main
    from probe.eval import main

    monkeypatch.setattr(devices, "available_ram", lambda: 1 << 30)  # 1 GiB: nothing is usable past the headroom
    out = tmp_path / "eval"
    assert cli_main(main, ["--models", "organism-base", "organism-vl", "--data", "probe/zoo/data/text",
                           "--limit", "2", "--device", "cpu", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: organism-base: its weights take") and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("var,value", [("LOCAL_RANK", "x"), ("LOCAL_RANK", "-1"), ("LOCAL_RANK", ""),
                                       ("LOCAL_WORLD_SIZE", "two")])
def test_malformed_torchrun_variables_are_bad_input(var, value, monkeypatch):
    """int(os.environ[...]) was a ValueError traceback, and LOCAL_RANK=-1 gave cuda:-1, which indexes the GPUs
    from the end (the last GPU, silently). Oracle: the same machine with the variable well formed."""
    for v in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "1")
    assert resolve_placement(query=TWO_OLD_GPUS).all_devices == (("cuda:1",) if var == "LOCAL_RANK" else
                                                                 ("cuda:0", "cuda:1"))
    monkeypatch.setenv(var, value)
    for query in (TWO_OLD_GPUS, CPU):
        with pytest.raises(BadInput, match=f"^{var}='{value}' in the environment: want an integer ≥ 0"):
            resolve_placement(query=query)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK='-1' in the environment: want an integer ≥ 0"),
    ({"RANK": "", "WORLD_SIZE": "2"}, "RANK='' in the environment: want an integer ≥ 0"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' in the environment: want an integer ≥ 0"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK 2 with WORLD_SIZE 2: a rank is 0 .. WORLD_SIZE - 1"),
    ({"WORLD_SIZE": "0"}, "RANK 0 with WORLD_SIZE 0"),
])
def test_rank_and_world_are_read_as_the_local_variables_are(env, message, monkeypatch):
    """RANK / WORLD_SIZE had their own parser beside env_index; one rule now reads all four torchrun variables.
    Oracle: the well-formed values read back as given, unset ones as a single process."""
    from probe.devices import rank_world

    for v in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    assert rank_world() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert rank_world() == (1, 3)
    monkeypatch.delenv("RANK")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(BadInput, match="^" + re.escape(message)):
        rank_world()


def test_the_suite_hides_a_gpu_from_module_fixtures_too(tmp_path):
    """On a GPU box, tests/conftest.py hid the GPU per test function, after the module-scoped fixtures had run: those
    that run a command with its defaults (test_eval.py's eval_run, --device auto) ran it on the GPU in bf16, against
    fp32 oracles. Here a pytest session on a simulated GPU: every fixture of a module not marked gpu resolves the
    CPU's fp32, as resolve_placement does for a CPU-only DeviceQuery, and a gpu module's sees the GPU."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (tmp_path / "conftest.py").write_text(f"""
import importlib.util
import torch
from probe.devices import DeviceQuery
torch.cuda.is_available = lambda: True  # a GPU box, simulated: the hiding must not depend on a real one
DeviceQuery.probe = staticmethod(lambda: DeviceQuery(("NVIDIA H200",), True, True, 16))
spec = importlib.util.spec_from_file_location("omniprobe_conftest", {str(REPO / "tests" / "conftest.py")!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
no_gpu_outside_gpu_tests = suite.no_gpu_outside_gpu_tests
""")
    body = """
import os
import pytest
from probe.devices import resolve_placement

@pytest.fixture(scope="module")
def placed():
    p = resolve_placement()
    return p.device, p.dtype, os.environ.get("CUDA_VISIBLE_DEVICES")

def test_placed(placed):
    p = resolve_placement()
    assert placed == (p.device, p.dtype, os.environ.get("CUDA_VISIBLE_DEVICES")) == WANT, placed
"""
    cpu = resolve_placement(query=CPU)
    gpu = resolve_placement(query=ONE_GPU)
    (tmp_path / "test_a_cpu.py").write_text(body + f"WANT = {(cpu.device, cpu.dtype, '')!r}\n")
    (tmp_path / "test_b_gpu.py").write_text(body + f"WANT = {(gpu.device, gpu.dtype, None)!r}\n"
                                            "pytestmark = pytest.mark.gpu\n")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p",
                        "no:randomly", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_a_gpu_that_only_emulates_bf16_is_probed_as_without_it(monkeypatch):
    """torch.cuda.is_bf16_supported() is True on a V100 or T4, which emulate bf16 (slower than float32): the probe asks
    for native support, so --dtype auto is float32 there and --dtype bfloat16 exits 2 (the TWO_OLD_GPUS rows above)."""
    import contextlib
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=32 << 30))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())  # the probe asks each GPU in turn
    q = DeviceQuery.probe()
    assert q.cuda_names == ("Tesla V100-SXM2-32GB",) and q.cuda_bf16 is False
    assert resolve_placement(query=q).dtype == "float32"


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_local_rank_outside_the_local_world_is_bad_input(device, monkeypatch):
    """LOCAL_RANK ≥ LOCAL_WORLD_SIZE (set by hand; torchrun never does) gave rank r the share [r·n/k, (r+1)·n/k),
    GPUs past the last one, and an IndexError traceback (exit 1) on LOCAL_RANK=3 LOCAL_WORLD_SIZE=2 with 4 GPUs, or
    LOCAL_RANK=1 LOCAL_WORLD_SIZE=1 with 2; RANK ≥ WORLD_SIZE is refused by rank_world already, so is this now.
    Oracle: the same machine with the rank inside the world."""
    four = DeviceQuery(("NVIDIA H100",) * 4, True, True, 16, (80 << 30,) * 4)
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_placement(device, query=four, local_rank=1, local_world=2).all_devices == (
        ("cuda:2", "cuda:3") if device == "auto" else ("cuda:1",))
    for rank, world, query in ((3, 2, four), (1, 1, TWO_OLD_GPUS), (2, 2, four), (0, 0, four), (1, 1, CPU)):
        with pytest.raises(BadInput, match=f"^LOCAL_RANK {rank} with LOCAL_WORLD_SIZE {world}: a local rank is 0 "):
            resolve_placement(device if query is not CPU else "auto", query=query, local_rank=rank, local_world=world)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(BadInput, match="^LOCAL_RANK 2 with LOCAL_WORLD_SIZE 2"):
        resolve_placement(device, query=four)


def test_heads_refuses_a_model_too_large_for_the_ram_in_one_line(tmp_path, tiny_dirs, monkeypatch, capsys):
    """probe.heads printed where it runs before loading, so a model refused at the load ("its weights take …") left
    two lines on stderr, the placement's and the error; eval and finetune check before printing (one line). Oracle:
    eval's refusal of the same model on the same machine (test_eval_refuses_a_model_too_large_for_the_ram_…)."""
    from probe import devices
    from probe.errors import cli_main
    from probe.eval import main as eval_main
    from probe.heads import main

    monkeypatch.setattr(devices, "available_ram", lambda: 1 << 30)  # 1 GiB: nothing is usable past the headroom
    model = str(tiny_dirs["qwen2"])
    out = tmp_path / "heads"
    assert cli_main(main, ["--model", model, "--data", "probe/zoo/data/text", "--limit", "2", "--device", "cpu",
                           "--out", str(out), "--quiet", "--no-figures"]) == 2
    err = capsys.readouterr().err.strip()
    assert cli_main(eval_main, ["--models", model, "--data", "probe/zoo/data/text", "--limit", "2", "--device", "cpu",
                                "--out", str(tmp_path / "eval"), "--quiet"]) == 2
    assert err == capsys.readouterr().err.strip() and err.startswith("error: ") and "\n" not in err
    assert not out.exists()


def test_bf16_is_native_on_every_gpu_the_model_spreads_over(monkeypatch):
    """The probe asked the current GPU alone (torch.cuda.is_bf16_supported looks at cuda:0): on a box with an A100
    (sm80, native bf16) and a V100 (sm70, emulated), --device auto spread the model over both in bfloat16, the V100's
    layers in emulated bf16 (slower than float32; not the precision a native run has), and --dtype bfloat16 passed.
    Oracle: each GPU's compute capability, as the simulated machine states it (sm ≥ 8 is native)."""
    import contextlib
    import types

    import torch

    major = {0: 8, 1: 7}  # cuda:0 an A100, cuda:1 a V100
    current = [0]

    @contextlib.contextmanager
    def device(i):
        current[0], before = i, current[0]
        yield
        current[0] = before

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ("NVIDIA A100", "Tesla V100")[i])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=32 << 30))
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or major[current[0]] >= 8)
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    q = DeviceQuery.probe()
    native = [major[i] >= 8 for i in range(2)]
    both = resolve_placement(query=q)
    assert both.all_devices == ("cuda:0", "cuda:1") and both.dtype == ("bfloat16" if all(native) else "float32")
    with pytest.raises(BadInput, match="cuda:1 .*does not support bfloat16"):
        resolve_placement("cuda:0,cuda:1", "bfloat16", query=q)
    for i in range(2):  # one GPU alone: its own support
        assert resolve_placement(f"cuda:{i}", query=q).dtype == ("bfloat16" if native[i] else "float32")
        assert resolve_placement(query=q, local_rank=i, local_world=2).dtype == ("bfloat16" if native[i] else "float32")


@pytest.mark.parametrize("device", ["cuda:0,cuda:1", "cuda:1"])
def test_named_gpus_under_several_torchrun_ranks_are_bad_input(device, monkeypatch):
    """Under torchrun every rank gets the same --device: named GPUs (a list, or one cuda:N) put every rank's copy
    of the model on the same GPUs — 4 ranks on 2 GPUs with cuda:0,cuda:1 all resolved to both GPUs, each rank's map
    checked against the GPUs' whole memory as if it were alone. auto (each rank its share) and cuda (the rank's GPU) give each
    rank its own. Oracle: the same launch with one process, and auto's shares, disjoint per rank."""
    four = DeviceQuery(("NVIDIA H100",) * 4, True, True, 16, (80 << 30,) * 4)
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_placement(device, query=four, local_rank=0, local_world=1).all_devices == tuple(device.split(","))
    shares = [set(resolve_placement("auto", query=four, local_rank=r, local_world=2).all_devices) for r in range(2)]
    assert not shares[0] & shares[1]
    for rank, world in ((0, 2), (1, 2), (1, None)):
        with pytest.raises(BadInput, match=f"^--device {device}: .*every rank .*same GPU"):
            resolve_placement(device, query=four, local_rank=rank, local_world=world)


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_more_ranks_than_gpus_are_refused_on_every_rank(device, monkeypatch):
    """4 torchrun ranks on 2 GPUs: ranks 2 and 3 exited 2 ("no GPU of its own") while ranks 0 and 1 went on to
    plan, print and start writing, until torchrun stopped them for their peers' failure. The verdict now is the
    launch's, the same on every rank. Oracle: the launch's own numbers (LOCAL_WORLD_SIZE against the GPU count)."""
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    gpus, world = len(TWO_OLD_GPUS.cuda_names), 4
    assert world > gpus
    for rank in range(world):
        with pytest.raises(BadInput, match=f"^--device {device}: {world} ranks on this machine, {gpus} GPU"):
            resolve_placement(device, query=TWO_OLD_GPUS, local_rank=rank, local_world=world)
    for rank in range(gpus):  # one rank per GPU: each its own
        assert resolve_placement(device, query=TWO_OLD_GPUS, local_rank=rank, local_world=gpus).device == f"cuda:{rank}"


@pytest.mark.parametrize("device", ["cpu:1", "cpu:0"])
def test_a_cpu_with_an_index_is_bad_input(device):
    """torch.device takes cpu:1 (the same CPU: an index means nothing there), and so did --device: the run went on
    as "cpu:1", recorded so in run.json, and load_model took it for a GPU (not "cpu": the GPU-only cleanups ran,
    and a model too large for the RAM was not told to use a GPU). Oracle: --device cpu on the same machine."""
    assert resolve_placement("cpu", query=CPU).all_devices == ("cpu",)
    with pytest.raises(BadInput, match=f"^unknown --device '{device}'; use auto, cpu, cuda or cuda:N"):
        resolve_placement(device, query=CPU)


def test_a_gpus_free_memory_counts_this_process_cached_blocks_as_free(monkeypatch):
    """analyses.replicate runs its stages in one process: the model a stage loaded is gone when the next resolves
    its placement, but torch's allocator keeps its blocks reserved (no empty_cache), which the driver counts as
    used, so the next stage's fit checks (check_fits, the finetune stage's check_trains_fits) saw that much less
    free memory. Oracle: a hand-written GPU of 80 GiB, 30 in this process's cache (12 of them still live), 10 held
    by another process: free = 80 − 30 − 10 + (30 − 12)."""
    import torch

    from probe import devices

    g = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((80 - 30 - 10) * g, 80 * g))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 30 * g)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 12 * g)
    assert devices.cuda_free_bytes(0) == (80 - 30 - 10 + 30 - 12) * g


@pytest.mark.parametrize("n_gpus, local_world", [(2, 2), (4, 2), (6, 3), (8, 4), (4, 1)])
def test_torchrun_ranks_share_the_gpus_in_contiguous_even_blocks(n_gpus, local_world):
    """gpu_share under torchrun: the ranks of a node split its GPUs into contiguous blocks of n_gpus / local_world,
    every GPU used once. Oracle: the partition written out (block r is [r·per, (r + 1)·per)), and its union."""
    from probe.devices import gpu_share

    per = n_gpus // local_world
    shares = [gpu_share(n_gpus, r, local_world) for r in range(local_world)]
    assert shares == [list(range(r * per, r * per + per)) for r in range(local_world)]
    assert sorted(i for s in shares for i in s) == list(range(n_gpus))


@pytest.mark.parametrize("n_gpus, local_rank, local_world", [(2, 2, None), (2, 2, 4), (3, 0, 2), (6, 1, 4)])
def test_a_rank_without_a_gpu_or_an_uneven_split_is_refused(n_gpus, local_rank, local_world):
    """A rank numbered past the visible GPUs has none (a > check gave rank 2 of 2 GPUs cuda:2), and 3 GPUs over
    2 ranks cannot be shared evenly (without the check each rank took 1 and a GPU sat idle): BadInput, both."""
    from probe.devices import gpu_share

    with pytest.raises(BadInput, match="--device auto"):
        gpu_share(n_gpus, local_rank, local_world)
