"""bf16 and CUDA correctness (DESIGN §12). Every test here needs a CUDA GPU and is skipped on CPU with the reason
listed (pytest -ra); bench/gpu_check.sh runs them on a GPU box. ``OMNIPROBE_GPU_TEST_DEVICE=cpu`` runs the same
bodies on the CPU (bf16 emulated, flash-attention skipped) to check the tests themselves where no GPU is lent.

Stated tolerances:
- exact == naive in bf16: |Δp(answer)| ≤ 0.05 and |ΔKL| ≤ 0.05 + 10 % of KL per row, the same predicted letter
  on ≥ 95 % of rows. bf16 keeps 8 bits of mantissa, and the exact engine stacks rows in a batch the naive loop
  runs one by one, so the two orders of summation differ; 0.05 is also the exact engine's run-time guard for
  half precision (probe/sweep.py GUARD_TOLERANCE), and a broken engine is off by far more.
- per-head mean KL in bf16 vs fp32 (exact engine, same items): Spearman ≥ 0.99 over the heads.
- sdpa vs flash_attention_2 in bf16: per-head KL Spearman ≥ 0.99 and the same most salient head.
- a model split between the CPU and the GPU (fp32, TF32 off) equals the model on the CPU to 1e-4.
- batched evaluation in bf16: its run-time guard holds (|Δp| ≤ 0.05 against the item alone) and the option the
  probabilities pick is fp32's on ≥ 95 % of items.
- fine-tuning in bf16 (mixed precision; with --lora the frozen weights in bf16) against fp32 on the CPU: the first
  step's loss within 2 %, the mean loss of 4 steps within 5 %, the weight update's cosine ≥ 0.9.
- a fine-tune with dropout killed and resumed on the GPU: the uninterrupted run's weights, bit for bit.
- a fine-tune on the GPU from a process that had not started CUDA: the GPU's generator draws after it as without it.
- a batch that really runs out of GPU memory (probe.eval's, the exact engine's masked rows) is halved and retried:
  the numbers of a run at the smaller size, the same batches, so |Δp| ≤ 0.05 (bf16's guard tolerance), |ΔKL| as
  exact == naive, and the same predicted letters and texts on every row.
- probe.eval's default batch on a GPU (256) against --batch-size 32 in bf16: |Δp| ≤ 0.05, the same predictions.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from probe.fsdp import unsupported as fsdp_unsupported

DEVICE = os.environ.get("OMNIPROBE_GPU_TEST_DEVICE", "cuda:0")
ON_GPU = DEVICE.startswith("cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (bench/gpu_check.sh runs these on a GPU box)"),
]
ORGANISMS = ("organism-vl", "organism-base", "organism-ov-si")
N_ITEMS = 32


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _load(alias: str, dtype: str, attn: str = "sdpa", device: str = DEVICE):
    from probe.models import load_model, resolve_model

    return load_model(resolve_model(alias), dtype=dtype, device=device, attn_implementation=attn)


def _items(alias: str, n: int = N_ITEMS):
    """n of the organism's validation items spread evenly over its subjects (they are sorted by subject)."""
    from probe.heads import default_data_for
    from probe.mmmu import load_items

    items = load_items(str(default_data_for(alias)))[0]
    return items[::max(1, len(items) // n)][:n]


def _sweep(engine: str, loaded, items, generate: bool = False, batch_size: int = 16, limit: Any = None
           ) -> pd.DataFrame:
    """Every head of the model swept by ``engine``; ``limit``: the engine's BatchLimit (exact, attribution)."""
    from probe.sweep import SweepConfig, get_engine

    g = loaded.geometry
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    cfg = SweepConfig(generate=generate, batch_size=batch_size, max_new_tokens=3)
    given = {"limit": limit} if limit is not None else {}  # the naive engine takes none
    return pd.DataFrame(get_engine(engine)(loaded, items, heads, cfg, **given))


def _per_head_kl(df: pd.DataFrame) -> pd.Series:
    return df[df["layer"] >= 0].groupby(["layer", "head"])["kl"].mean()


# The stated half-precision tolerances (module docstring), one copy: the GPU tests below and the CPU's bf16 tests
# (tests/test_bf16_cpu.py) assert them through these.
def assert_exact_equals_naive_in_half(naive: pd.DataFrame, exact: pd.DataFrame) -> None:
    assert list(zip(naive["item_id"], naive["layer"], naive["head"])) == list(
        zip(exact["item_id"], exact["layer"], exact["head"]))
    assert np.abs(naive["p_answer"] - exact["p_answer"]).max() <= 0.05
    assert (np.abs(naive["kl"] - exact["kl"]) <= 0.05 + 0.1 * naive["kl"]).all()
    assert (naive["prob_pred"] == exact["prob_pred"]).mean() >= 0.95
    assert exact.loc[exact["layer"] >= 0, "kl"].max() > 0.05  # trained heads matter: not 0 == 0


def assert_ranks_heads_as_fp32(fp32: pd.Series, half: pd.Series, alias: str) -> None:
    """Per-head mean KL (``_per_head_kl``) in half precision ranks the heads as fp32's."""
    assert list(fp32.index) == list(half.index)
    rho = spearmanr(fp32.values, half.values)[0]
    assert rho >= 0.99, f"{alias}: Spearman {rho:.4f}"


def assert_answers_as_fp32(half: list, fp32: list) -> None:
    """evaluate_items' measurements: the option the probabilities pick is fp32's on ≥ 95 % of items."""
    assert len(half) == len(fp32)
    assert np.mean([int(a.logp.argmax()) == int(b.logp.argmax()) for a, b in zip(half, fp32)]) >= 0.95


# The out-of-memory tests: probe.tiny's Qwen2 (4 layers x 4 heads, hidden 64) under eager attention, which holds a
# batch's [rows, heads, T, T] scores (bf16, their fp32 softmax and its bf16 copy: about 8 x 4 x T^2 bytes a row,
# 120 MiB at T = 2,000), so a row's memory is set by the prompt's length, not by the GPU, and dwarfs the weights.
# The limit between a batch that fits and one that does not is measured on the GPU at hand, never a number of GiB.
CAP_NEEDS_CUDA = "a memory limit needs CUDA's caching allocator (torch.cuda.set_per_process_memory_fraction)"
FILLER = "left right top bottom circle square triangle star one two three four".split()
LONG_PROMPT_WORDS = 1750  # 1,968 prompt tokens with probe.tiny's tokenizer (tests/test_eval.py checks it)


def _long_items(n: int, words: int = LONG_PROMPT_WORDS) -> list:
    """n text items whose prompts have the same length (the same filler words, each item shuffled its own way) and
    different contents: every batch of a size then needs the same memory, and a run that halves a batch runs the
    batches of one at the smaller size (plan_batches sorts by length, stably), so both give the same numbers."""
    import random

    from probe.mmmu import Item

    items = []
    for i in range(n):
        filler = [FILLER[j % len(FILLER)] for j in range(words)]
        random.Random(i).shuffle(filler)
        items.append(Item(f"validation_Long_{i}", "Long", " ".join(filler) + "\nWhich shape comes last?",
                          ("circle", "square", "triangle", "star"), "ABCD"[i % 4], ()))
    return items


@dataclass(frozen=True)
class Peak:
    """What one run took of the GPU's memory, in bytes."""

    start: int  # allocated as it started (the weights, what earlier tests hold)
    allocated: int  # the most allocated at once
    reserved: int  # the most the caching allocator held from the device (allocated, its rounding and its cache)


def _measured(run: Callable[[], Any]) -> tuple[Any, Peak]:
    """run()'s result and its ``Peak``, counted from an allocator with nothing cached."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    start = torch.cuda.memory_allocated(DEVICE)
    out = run()
    return out, Peak(start, torch.cuda.max_memory_allocated(DEVICE), torch.cuda.max_memory_reserved(DEVICE))


def _limit_between(fits: Peak, fails: Peak) -> int:
    """The bytes to let the allocator reserve so that the run of ``fits`` still fits (it reserved less, rounding and
    fragmentation included) and the run of ``fails`` cannot (it allocated more at once, and the allocator frees its
    cache before it gives up): halfway, the same margin either side."""
    if fails.allocated <= fits.reserved:
        pytest.fail(f"no memory limit separates the two batch sizes: the larger allocated {fails.allocated} bytes "
                    f"at its peak, the smaller reserved {fits.reserved}; lengthen the prompts (LONG_PROMPT_WORDS)")
    return (fits.reserved + fails.allocated) // 2


@contextlib.contextmanager
def _allocator_limited(limit: int):
    """This process's caching allocator raises CUDA's out-of-memory error rather than hold more than ``limit`` bytes
    (what it has cached is freed first), as on a full GPU; no limit again afterwards, whatever happened."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(DEVICE).total_memory, DEVICE)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, DEVICE)


def _calls_with_memory(monkeypatch, module: Any, name: str, rows_arg: int) -> list[tuple[int, int]]:
    """``module.name`` (a batch's measurement) replaced by itself recording, per call, its rows (the length of
    positional argument ``rows_arg``) and the bytes allocated as it starts."""
    real, calls = getattr(module, name), []

    def recorded(*args, **kwargs):
        calls.append((len(args[rows_arg]), torch.cuda.memory_allocated(DEVICE)))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return calls


def _back_off_line(rows: int, unit: str, half: int, scope: str) -> re.Pattern:
    """probe.batch.run_halving's line for a real CUDA out of memory (its size is whatever the allocator asked)."""
    gpu = torch.device(DEVICE).index or 0
    return re.compile(rf"out of memory in GPU {gpu} \(tried to allocate [\d.]+ [KMGT]?i?B\) on a batch of {rows} "
                      rf"{unit}: batches of at most {half} for the rest of {scope}")


@pytest.mark.parametrize("alias", ORGANISMS)
def test_exact_equals_naive_in_bf16(alias):
    loaded = _load(alias, "bfloat16")
    items = _items(alias, 8)
    assert_exact_equals_naive_in_half(_sweep("naive", loaded, items), _sweep("exact", loaded, items))


@pytest.mark.parametrize("alias", ORGANISMS)
def test_per_head_kl_in_bf16_ranks_heads_as_fp32_does(alias):
    items = _items(alias)
    fp32 = _per_head_kl(_sweep("exact", _load(alias, "float32"), items))
    assert_ranks_heads_as_fp32(fp32, _per_head_kl(_sweep("exact", _load(alias, "bfloat16"), items)), alias)


def test_sdpa_and_flash_attention_2_find_the_same_heads():
    if not ON_GPU:
        pytest.skip("flash_attention_2 runs on CUDA only")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pytest.skip("flash-attn is not installed (pip install flash-attn --no-build-isolation)")
    items = _items("organism-vl")
    sdpa = _per_head_kl(_sweep("exact", _load("organism-vl", "bfloat16", "sdpa"), items))
    flash = _per_head_kl(_sweep("exact", _load("organism-vl", "bfloat16", "flash_attention_2"), items))
    assert spearmanr(sdpa.values, flash.values)[0] >= 0.99
    assert sdpa.idxmax() == flash.idxmax()


@pytest.mark.parametrize("alias", ["organism-vl", "organism-ov-si"])
def test_a_model_split_between_cpu_and_gpu_gives_the_cpu_numbers(alias):
    """The residual really crosses devices: embeddings, tower and the first layers on the CPU, the rest on the
    GPU (accelerate's hooks, main device the CPU). Every engine equals the model on the CPU alone (fp32)."""
    from probe.dispatch import dispatch, plan_device_map

    plain = _load(alias, "float32", device="cpu")
    split = _load(alias, "float32", device="cpu")
    fam = split.family
    plan = plan_device_map(split.model, fam.layers_path, fam.norm_path, fam.lm_head_path, ["cpu", DEVICE])
    dispatch(split.model, plan)
    kinds = [d.type for d in split.layer_devices]
    assert kinds[0] == "cpu" and kinds[-1] == torch.device(DEVICE).type
    items = _items(alias, 4)
    for engine, generate in (("exact", True), ("naive", False), ("attribution", False)):
        a, b = _sweep(engine, plain, items, generate), _sweep(engine, split, items, generate)
        np.testing.assert_allclose(a["p_answer"], b["p_answer"], atol=1e-4, err_msg=engine)
        np.testing.assert_allclose(a["kl"], b["kl"], atol=1e-4, err_msg=engine)
        assert (a["response"] == b["response"]).all()


def test_device_auto_spreads_over_two_gpus_with_the_numbers_of_one():
    if not ON_GPU or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    from probe.models import load_model, resolve_model

    ref = resolve_model("organism-vl")
    one = load_model(ref, dtype="float32", device="cuda:0")
    two = load_model(ref, dtype="float32", devices=("cuda:0", "cuda:1"))
    assert {d.index for d in two.layer_devices} == {0, 1}
    items = _items("organism-vl", 4)
    a, b = _sweep("exact", one, items, True), _sweep("exact", two, items, True)
    np.testing.assert_allclose(a["p_answer"], b["p_answer"], atol=1e-4)
    assert (a["response"] == b["response"]).all()


def test_batched_evaluation_in_bf16_passes_its_guard_and_answers_as_fp32():
    from probe.batch import evaluate_items
    from probe.sweep import SweepConfig

    items, cfg = _items("organism-vl", 64), SweepConfig(max_new_tokens=3)
    got = evaluate_items(_load("organism-vl", "bfloat16"), items, cfg, batch_size=16, window=1)  # guarded x4 (windows)
    want = evaluate_items(_load("organism-vl", "float32", device="cpu"), items, cfg, batch_size=16)
    assert_answers_as_fp32(got, want)


def test_a_batch_that_runs_out_of_gpu_memory_is_halved_and_gives_the_numbers_of_the_smaller_batches(tiny_dirs,
                                                                                                   monkeypatch):
    """A real CUDA out of memory in probe.eval's batched evaluation (tests/test_eval.py injects one on the CPU):
    the allocator limited between what batches of 4 of these 2,000-token prompts take and what batches of 8 take
    (both measured first), a run asked for 8 items a batch runs out on its first batch, halves it, and finishes at
    4: one line says so, the record says 8 asked, 4 largest, capped at 4, and every item has the numbers of the run
    at 4 (the same batches). The failed batch's memory was free when its halves ran (nothing of it held by the
    exception), and after the run the memory allocated is what it was before."""
    if not ON_GPU:
        pytest.skip(CAP_NEEDS_CUDA)
    import probe.batch
    from probe.batch import BatchLimit, evaluate_items
    from probe.sweep import SweepConfig

    loaded = _load(str(tiny_dirs["qwen2"]), "bfloat16", "eager")
    # 16 items are one window (8 batches of 4 or 8) prepared before the model runs: a thread preparing the next
    # window (the GPU's default) could be the one whose small allocation meets the limit while a batch fills up to it
    items, cfg, one_window = _long_items(16), SweepConfig(max_new_tokens=3), {"prefetch": False}
    want, four = _measured(lambda: evaluate_items(loaded, items, cfg, 4, **one_window))
    _, eight = _measured(lambda: evaluate_items(loaded, items, cfg, 8, **one_window))
    row = (eight.allocated - four.allocated) // 4  # a row's memory at its peak
    limit, lines = _limit_between(four, eight), []
    batches = _calls_with_memory(monkeypatch, probe.batch, "measure_batch", 1)
    ran = BatchLimit(8, lines.append)
    with _allocator_limited(limit):
        start = torch.cuda.memory_allocated(DEVICE)
        got = evaluate_items(loaded, items, cfg, ran, **one_window)
    gc.collect()
    after = torch.cuda.memory_allocated(DEVICE)
    # the first batch fails at 8 and runs as 4 + 4; the second, planned at 8 too, runs at 4 (BatchLimit.rows)
    assert [n for n, _ in batches] == [8, 4, 4, 4, 4], (batches, limit, four, eight)
    assert len(lines) == 1 and _back_off_line(8, "items", 4, "this model and data set").fullmatch(lines[0]), lines
    assert ran.record() == {"batch_size": 8, "largest_batch": 4, "out_of_memory_cap": 4, "out_of_memory_window": None}
    assert batches[1][1] - batches[0][1] <= row // 4, (batches, row)  # nothing of the failed batch left
    assert after - start <= row // 4, (start, after, row)
    for a, b in zip(got, want, strict=True):
        assert float((a.logp.float().cpu().exp() - b.logp.float().cpu().exp()).abs().max()) <= 0.05
        assert int(a.logp.argmax()) == int(b.logp.argmax()) and a.response == b.response


def test_the_exact_engine_halves_masked_rows_that_run_out_of_gpu_memory(tiny_dirs, monkeypatch):
    """The same for probe.heads' exact engine: its masked rows (16 heads of 2 items, no generation) asked 8 a batch
    under a limit between what batches of 4 and of 8 take; the first batch (heads of layers 0 and 1) runs out at
    layer 1, is halved, and the rest of the run goes 4 rows a batch: one line, the record, free memory as above,
    and the rows of a sweep at 4 (the same batches: one layer's heads each)."""
    if not ON_GPU:
        pytest.skip(CAP_NEEDS_CUDA)
    from argparse import Namespace
    from types import SimpleNamespace

    import probe.exact
    from probe.heads import batch_limit

    loaded = _load(str(tiny_dirs["qwen2"]), "bfloat16", "eager")
    items = _long_items(2)
    want, four = _measured(lambda: _sweep("exact", loaded, items, batch_size=4))
    _, eight = _measured(lambda: _sweep("exact", loaded, items, batch_size=8))
    row = (eight.allocated - four.allocated) // 4
    limit, lines = _limit_between(four, eight), []
    batches = _calls_with_memory(monkeypatch, probe.exact, "measure_masked", 2)
    bar = SimpleNamespace(write=lambda line, file: lines.append(line))  # probe.heads writes past its progress bar
    ran = batch_limit("exact", Namespace(batch_size=8, quiet=False), bar)
    with _allocator_limited(limit):
        start = torch.cuda.memory_allocated(DEVICE)
        got = _sweep("exact", loaded, items, batch_size=8, limit=ran)
    gc.collect()
    after = torch.cuda.memory_allocated(DEVICE)
    assert [n for n, _ in batches] == [8] + [4] * 8, (batches, limit, four, eight)
    assert len(lines) == 1 and _back_off_line(8, "masked rows", 4, "this run").fullmatch(lines[0]), lines
    assert ran.record() == {"batch_size": 8, "largest_batch": 4, "out_of_memory_cap": 4}
    assert batches[1][1] - batches[0][1] <= row // 4, (batches, row)
    assert after - start <= row // 4, (start, after, row)
    key = ["item_id", "layer", "head"]
    pd.testing.assert_frame_equal(got[key], want[key])
    assert np.abs(got["p_answer"] - want["p_answer"]).max() <= 0.05
    assert (np.abs(got["kl"] - want["kl"]) <= 0.05 + 0.1 * want["kl"]).all()
    assert (got["prob_pred"] == want["prob_pred"]).all()


def test_probe_eval_on_a_gpu_takes_256_items_a_batch_by_default_with_the_predictions_of_32(tmp_path):
    """--batch-size left out on a GPU: 256 items a forward (DESIGN §8), as run.json's batching records (64 of
    organism-vl's image items in one batch: their prompts differ by less than the GPU's 50 % padding cap), with the
    predictions (letters and texts) of --batch-size 32, p(answer) within bf16's 0.05 (measured on the H200 between
    batch 32 and one item at a time: 4.3e-7)."""
    if not ON_GPU:
        pytest.skip("the defaults on a CPU are tested in test_eval.py")
    from probe.errors import cli_main
    from probe.eval import main
    from probe.heads import default_data_for

    def run(name: str, *extra: str) -> tuple[pd.DataFrame, dict]:
        out = tmp_path / name
        assert cli_main(main, ["--models", "organism-vl", "--data", str(default_data_for("organism-vl")), "--limit",
                               "64", "--device", DEVICE, "--no-figures", "--quiet", "--out", str(out), *extra]) == 0
        info = json.loads((out / "run.json").read_text(encoding="utf-8"))
        assert info["placement"]["device"].startswith("cuda"), info["placement"]
        return pd.read_parquet(out / "items.parquet"), info["batching"]

    (got, batching), (want, asked) = run("default"), run("batch-32", "--batch-size", "32")
    assert batching == {"organism-vl|image": {"batch_size": 256, "largest_batch": 64, "out_of_memory_cap": None,
                                              "out_of_memory_window": None}}
    assert asked == {"organism-vl|image": {"batch_size": 32, "largest_batch": 32, "out_of_memory_cap": None,
                                           "out_of_memory_window": None}}
    assert len(got) == 64
    pd.testing.assert_frame_equal(got.drop(columns="p_answer"), want.drop(columns="p_answer"))
    assert np.abs(got["p_answer"] - want["p_answer"]).max() <= 0.05


@pytest.mark.parametrize("lora", [None, "4"])
def test_finetuning_in_bf16_tracks_fp32_on_the_cpu(lora, tmp_path):
    from safetensors.torch import load_file

    from analyses.finetune import main
    from probe.errors import cli_main
    from probe.heads import default_data_for

    def run(device: str, dtype: str):
        out = tmp_path / f"{device}-{dtype}".replace(":", "")
        # organism-video on images, which it half knows: losses near 1, where 5 % is not bf16's noise on ≈ 0
        args = ["--model", "organism-video", "--data", f"image={default_data_for('organism-vl')}", "--split",
                "validation", "--steps", "4", "--batch-size", "4", "--warmup", "1", "--lr", "1e-4", "--lm-lr", "1e-4",
                "--device", device, "--dtype", dtype, "--quiet", "--out", str(out)] + (["--lora", lora] if lora else [])
        assert cli_main(main, args) == 0
        log = pd.read_csv(out / "train_log.csv")
        w0, w4 = (load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (0, 4))
        return log["loss"].to_numpy(), torch.cat([(w4[k] - w0[k]).flatten() for k in sorted(w0)])

    (loss_h, dw_h), (loss_f, dw_f) = run(DEVICE, "bfloat16"), run("cpu", "float32")
    # the first step is the forward's precision alone; later steps also carry the updates' small differences
    assert abs(loss_h[0] - loss_f[0]) <= 0.02 * loss_f[0] and abs(loss_h.mean() - loss_f.mean()) <= 0.05 * loss_f.mean()
    assert float(torch.nn.functional.cosine_similarity(dw_h.double(), dw_f.double(), dim=0)) >= 0.9


def test_a_resumed_finetune_draws_the_dropout_masks_of_the_uninterrupted_run(tmp_path, monkeypatch):
    """With dropout on (attention_dropout 0.3 in a copy of organism-base), a run killed after step 2 and resumed
    from checkpoint-2 ends with the uninterrupted run's weights, bit for bit. On a GPU the masks come from the GPU's
    generator, which a resume re-seeded until 2026-12-05 (only the CPU's was saved): the resumed steps drew the
    masks of steps 1-2 again, and trained other weights with exit 0."""
    import json
    import shutil

    import probe.train as train_mod
    from analyses.finetune import main
    from probe.errors import cli_main
    from probe.heads import default_data_for
    from probe.models import resolve_model

    model = shutil.copytree(resolve_model("organism-base").path, tmp_path / "dropout-base")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg | {"attention_dropout": 0.3}))
    args = ["--model", str(model), "--data", f"text={default_data_for('organism-base')}", "--split", "validation",
            "--steps", "4", "--save-steps", "2", "--batch-size", "4", "--warmup", "1", "--device", DEVICE,
            "--dtype", "float32", "--quiet", "--out"]
    real = train_mod.train

    def killed_after_step_2(*a, **kw):
        def hook(info, state):
            kw["on_step"](info, state)
            if info.step == 2:
                raise KeyboardInterrupt
        return real(*a, **(kw | {"on_step": hook}))

    assert cli_main(main, args + [str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(train_mod, "train", killed_after_step_2)
    assert cli_main(main, args + [str(tmp_path / "resumed")]) == 130
    monkeypatch.setattr(train_mod, "train", real)
    assert cli_main(main, args + [str(tmp_path / "resumed")]) == 0
    got, want = ((tmp_path / d / "checkpoint-4" / "model.safetensors").read_bytes() for d in ("resumed", "whole"))
    assert got == want


# a notebook's process that has not used CUDA yet: draws from the device's generator, after a fine-tune on it
# ("run") or without one ("skip"); argv: run|skip DEVICE DATA OUT
FRESH_DRAWS = """
import sys
import torch
import probe.train  # noqa: F401 - what a run imports before it forks, imported by both: the same start
from analyses.finetune import finetune

assert not torch.cuda.is_initialized()
torch.random.default_generator.manual_seed(7)  # the CPU's starts at a random seed per process (a GPU's at a fixed one)
if sys.argv[1] == "run":
    finetune(model="organism-base", data=[f"text={sys.argv[3]}"], split="validation", steps=2, batch_size=2,
             lora=4, device=sys.argv[2], quiet=True, out=sys.argv[4])
print(torch.rand(4, device=sys.argv[2]).tolist())
"""


def test_finetune_on_a_gpu_from_a_process_without_cuda_leaves_the_gpus_generator_as_it_was(tmp_path):
    """``finetune`` restored the GPU's random generator only when CUDA was started before the call: from a notebook
    that had not used the GPU yet, a run on it left the GPU's generator seeded with --seed (its draws after the call
    were the run's seed's). The oracle: the same process's draws without the run (each in a fresh Python)."""
    import subprocess
    import sys

    from conftest import REPO
    from probe.heads import default_data_for

    def draws(what: str) -> str:
        done = subprocess.run([sys.executable, "-c", FRESH_DRAWS, what, DEVICE, str(default_data_for("organism-base")),
                               str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    assert draws("run") == draws("skip")
    assert (tmp_path / "out" / "run.json").is_file()  # it did train


# torchrun runs this: analyses.finetune with --fsdp allowed in a launch of one process (refused otherwise: nothing
# to shard over), so FSDP2 and probe.fsdp's collectives run on the GPU's backend on a box with one GPU
ONE_RANK_FSDP = """
import sys
import probe.train as train
from analyses.finetune import main
from probe.errors import cli_main

train.fsdp_launch = lambda cfg: cfg.fsdp
sys.exit(cli_main(main, sys.argv[1:]))
"""


@pytest.mark.skipif(fsdp_unsupported() is not None, reason=str(fsdp_unsupported()))
@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_on_the_gpus_backend_trains_as_one_process(lora, tmp_path):
    """--fsdp's collectives (the ranks' model check, the unused-gradient flags, the non-finite index, the loss mean,
    the broadcast of rank 0's weights, the gathers for checkpoints) on NCCL, which takes CUDA tensors only — never
    run before: a torchrun launch of one process on the GPU, bf16 autocast, trains as one process without --fsdp on
    the same GPU: losses within 1e-3, the final update's cosine ≥ 0.999, the same tensors in the checkpoints; with
    --lora too (frozen bfloat16 weights sharded beside float32 adapters). (gloo with
    OMNIPROBE_GPU_TEST_DEVICE=cpu.)"""
    from safetensors.torch import load_file
    from test_finetune import _torchrun

    from analyses.finetune import main
    from probe.errors import cli_main
    from probe.heads import default_data_for

    def args(out):
        return ["--model", "organism-video", "--data", f"image={default_data_for('organism-vl')}", "--split",
                "validation", "--steps", "4", "--save-steps", "0", "2", "--batch-size", "4", "--warmup", "1", "--lr",
                "1e-4", "--lm-lr", "1e-4", "--device", DEVICE, "--dtype", "bfloat16", "--quiet", "--out", str(out),
                *(["--lora", "4"] if lora else [])]

    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    assert cli_main(main, args(one)) == 0
    script = tmp_path / "one_rank_fsdp.py"
    script.write_text(ONE_RANK_FSDP)
    res = _torchrun([str(script)], [*args(sharded), "--fsdp"], processes=1)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    assert json.loads((sharded / "run.json").read_text())["sessions"][0]["fsdp"] is True
    a, b = (pd.read_csv(d / "train_log.csv")["loss"].to_numpy() for d in (one, sharded))
    assert len(a) == len(b) == 4 and np.allclose(b, a, rtol=1e-3)
    w0, w1, w2 = (load_file(d / "model.safetensors") for d in (one / "checkpoint-0", one / "checkpoint-4",
                                                                  sharded / "checkpoint-4"))
    assert sorted(w2) == sorted(w1)
    d1, d2 = (torch.cat([(w[k] - w0[k]).flatten() for k in sorted(w0)]).double() for w in (w1, w2))
    assert float(d1.norm()) > 0 and float(torch.nn.functional.cosine_similarity(d1, d2, dim=0)) >= 0.999


def test_defaults_on_a_gpu_are_cuda_and_bf16():
    if not ON_GPU:
        pytest.skip("the defaults on a CPU are tested in test_devices.py")
    from probe.devices import resolve_placement

    p = resolve_placement()
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert p.device_type == "cuda" and p.dtype == ("bfloat16" if native else "float32")
