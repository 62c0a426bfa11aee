"""probe.eval (DESIGN §8): the batched engine against the one-item oracle on every family, the statistics against
direct formulas, and the CLI's outputs, resume and bad input."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import (FAMILIES, REPO, VL_FAMILIES, change_weights_in_place, killed_after_first_part, make_item,
                      text_only)


def _items(family: str, data_dir, video_root=None):
    from probe.mmmu import load_items, load_mmmu

    items = load_items(str(data_dir))[0][:7]  # 1-2 images, 4-6 options, prompts of different lengths
    items.append(make_item(n_options=5, answer="E", item_id="validation_Test_9", seed=3))
    if family == "qwen2":
        return [text_only(i) for i in items]
    if video_root is not None:
        items += load_mmmu(video_root, "validation")[0][:3]
    return items


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    from probe.zoo.tasks_video import build_video_dataset

    root = tmp_path_factory.mktemp("video")
    build_video_dataset(root, {"validation": 1}, seed=0)
    return root


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("generate", [True, False])
def test_batched_equals_one_item_path(family, generate, load_tiny, data_dir, video_root):
    """Left padding, attention mask, positions (M-RoPE included), images and video: batched results equal the
    one-item path — same predictions and generated text, p(answer) within 1e-4 (fp32)."""
    from probe.batch import evaluate_items, plan_batches
    from probe.sweep import SweepConfig, first_token_measure, measurement_row, prepare_item

    loaded = load_tiny(family, "sdpa")
    items = _items(family, data_dir, video_root if family in VL_FAMILIES else None)
    cfg = SweepConfig(generate=generate, max_new_tokens=4)
    batched = evaluate_items(loaded, items, cfg, batch_size=4, max_padding=None)  # pad as much as it comes
    prepared = [prepare_item(loaded, it, cfg) for it in items]
    # anti-tautology: several rows per forward, and rows of different lengths (so padding took place)
    plan = plan_batches([p[0] for p in prepared], 4, max_padding=None)
    assert max(len(b) for b in plan) > 1
    assert any(len({prepared[i][0]["input_ids"].shape[1] for i in b}) > 1 for b in plan)
    for item, (inputs, ids), got in zip(items, prepared, batched, strict=True):  # every item measured
        want = first_token_measure(loaded, inputs, ids, cfg)
        a = measurement_row(item, -1, -1, got, got.logp)
        b = measurement_row(item, -1, -1, want, want.logp)
        assert (a["pred"], a["prob_pred"], a["response"]) == (b["pred"], b["prob_pred"], b["response"]), item.id
        assert a["p_answer"] == pytest.approx(b["p_answer"], abs=1e-4), item.id
        torch.testing.assert_close(got.logp.exp(), want.logp.exp(), atol=1e-4, rtol=0)
    if not generate:  # preparing inputs window by window changes only which items share a batch
        small = evaluate_items(loaded, items, cfg, batch_size=3, window=1, max_padding=None)
        for a, b in zip(small, batched, strict=True):
            torch.testing.assert_close(a.logp, b.logp, atol=1e-4, rtol=0)


def test_organism_ov_si_batched_on_its_image_set_equals_one_item_path(monkeypatch):
    """organism-ov-si (LLaVA-OneVision, one of the shipped organisms) on its own image set, as probe.eval runs it on
    a CPU: batches of 32, each window's prompts encoded by processor calls over several of them and cut apart
    (probe.prompting.encode_prompts). Same predictions and generated text as one item at a time, p(answer) within
    1e-4 (fp32). Anti-tautology: every item's inputs came from such a call, none from its own."""
    from probe import batch
    from probe.heads import default_data_for
    from probe.mmmu import load_items
    from probe.models import load_model, resolve_model
    from probe.sweep import SweepConfig, first_token_measure, measurement_row, prepare_item

    loaded = load_model(resolve_model("organism-ov-si"), dtype="float32", device="cpu")
    items = load_items(str(default_data_for("organism-ov-si")))[0]
    served: list[bool] = []
    real = batch.encode_prompts
    monkeypatch.setattr(batch, "encode_prompts",
                        lambda *a, **k: (out := real(*a, **k), served.extend(e is not None for e in out))[0])
    cfg = SweepConfig(max_new_tokens=5)
    batched = batch.evaluate_items(loaded, items, cfg, batch_size=32)
    assert len(served) == len(items) > 64 and all(served)
    for item, got in zip(items, batched, strict=True):
        want = first_token_measure(loaded, *prepare_item(loaded, item, cfg), cfg)
        a = measurement_row(item, -1, -1, got, got.logp)
        b = measurement_row(item, -1, -1, want, want.logp)
        assert (a["pred"], a["prob_pred"], a["response"]) == (b["pred"], b["prob_pred"], b["response"]), item.id
        assert a["p_answer"] == pytest.approx(b["p_answer"], abs=1e-4), item.id
        torch.testing.assert_close(got.logp.exp(), want.logp.exp(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_preparing_the_next_window_in_a_thread_changes_no_number(family, load_tiny, data_dir, video_root, monkeypatch):
    """evaluate_items' prefetch (the GPU default: the next window's inputs are prepared in a thread while this one
    runs) gives the numbers of preparing each window in turn, bit for bit where the windows are the same (one batch
    each here); an item that cannot be prepared stops the run after the windows before it were measured, as without
    the thread, and no thread is left behind."""
    import threading

    from probe import batch
    from probe.errors import BadInput
    from probe.sweep import SweepConfig

    loaded = load_tiny(family, "sdpa")
    items = _items(family, data_dir, video_root)
    cfg = SweepConfig(max_new_tokens=3)
    seen: list[str] = []
    real = batch.prepare_item

    def spy(loaded_, item, cfg_, *encoded):  # encoded: the window's one processor call (encode_prompts)
        seen.append(threading.current_thread().name)
        return real(loaded_, item, cfg_, *encoded)

    monkeypatch.setattr(batch, "prepare_item", spy)
    serial = batch.evaluate_items(loaded, items, cfg, batch_size=2, window=1, prefetch=False)
    assert seen and all(n == threading.main_thread().name for n in seen)
    seen.clear()
    threaded = batch.evaluate_items(loaded, items, cfg, batch_size=2, window=1, prefetch=True)
    # anti-tautology: the thread prepared every window after the first (one batch, prepared before it starts)
    assert seen[:2] == [threading.main_thread().name] * 2 and len(seen) == len(items)
    assert all(n.startswith("prepare") for n in seen[2:])
    for a, b in zip(serial, threaded, strict=True):
        assert torch.equal(a.logp, b.logp) and a.response == b.response

    def broken(loaded_, item, cfg_, *encoded):
        if item.id == items[5].id:  # the third window of two items
            raise BadInput(f"item {item.id}: unreadable")
        return real(loaded_, item, cfg_, *encoded)

    monkeypatch.setattr(batch, "prepare_item", broken)
    for prefetch in (False, True):
        done: list[int] = []
        with pytest.raises(BadInput, match="unreadable"):
            batch.evaluate_items(loaded, items, cfg, batch_size=2, window=1, prefetch=prefetch, progress=done.append)
        assert sum(done) == 4, prefetch
    for t in [t for t in threading.enumerate() if t.name.startswith("prepare")]:
        t.join(timeout=30)  # a stop does not wait for the window being prepared; the thread ends after it
        assert not t.is_alive()


def test_after_running_out_of_memory_the_rest_of_the_pair_runs_at_the_smaller_size(load_tiny, data_dir):
    """A forward of more than 2 rows runs out of memory: the first window's batch of 4 is halved, and every later
    window is planned at 2, so memory runs out once, not once a window; the numbers are, bit for bit, those of
    batches of 2 over the same windows (4 items each), and the guard checks what ran."""
    from probe.batch import BatchLimit, evaluate_items
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2", "sdpa")
    items = _items("qwen2", data_dir)
    cfg = SweepConfig(max_new_tokens=2)
    rows: list[int] = []

    def hook(module, args, kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        if rows[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    lines: list[str] = []
    limit = BatchLimit(4, lines.append)
    handle = loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = evaluate_items(loaded, items, cfg, limit, window=1, max_padding=None)
    finally:
        handle.remove()
    assert sum(r > 2 for r in rows) == 1 and rows[0] == 4, rows  # one failure: the first batch, of 4
    assert lines == ["out of memory in the GPU (tried to allocate 2.00 GiB) on a batch of 4 items: batches of at most "
                     "2 for the rest of this model and data set"]
    assert limit.record() == {"batch_size": 4, "largest_batch": 2, "out_of_memory_cap": 2, "out_of_memory_window": None}
    want = evaluate_items(loaded, items, cfg, 2, window=2, max_padding=None)  # the same windows of 4 items
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.logp, b.logp) and a.response == b.response


def test_a_window_holds_at_most_window_items_unless_one_batch_holds_more(load_tiny, data_dir, monkeypatch):
    """Inputs are prepared a window at a time, on the model's device: 8 batches of the CPU's 32 (256 items) as before,
    but at the accelerator's 256 the window is its one batch, not 2,048 items' pixels (WINDOW_ITEMS, scaled down
    here to 4). A batch larger than the cap is still one window; the numbers do not depend on the windows."""
    from probe import batch
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2", "sdpa")
    items = _items("qwen2", data_dir)
    assert len(items) == 8
    cfg = SweepConfig(max_new_tokens=2)
    sizes: list[int] = []
    real = batch.encode_prompts

    def spy(loaded_, chunk, *rest):
        sizes.append(len(chunk))
        return real(loaded_, chunk, *rest)

    monkeypatch.setattr(batch, "encode_prompts", spy)
    want = batch.evaluate_items(loaded, items, cfg, 2, window=8, max_padding=None, prefetch=False)
    assert sizes == [8]  # 8 batches of 2 cover the 8 items: one window (WINDOW_ITEMS 256)
    monkeypatch.setattr(batch, "WINDOW_ITEMS", 4)
    for size, windows in ((2, [4, 4]), (6, [6, 2])):
        sizes.clear()
        got = batch.evaluate_items(loaded, items, cfg, size, window=8, max_padding=None, prefetch=False)
        assert sizes == windows, size
        assert [m.response for m in got] == [m.response for m in want]
        for a, b in zip(got, want, strict=True):  # other batches: p moves by the batch's rounding at most
            assert torch.allclose(a.logp, b.logp, atol=1e-4)


def _oom_preparing_above(monkeypatch, k: int, error: Callable[[], BaseException]) -> tuple[list[int], list[bool]]:
    """Preparing a window of more than ``k`` items (probe.batch's encode_prompts, then prepare_item item by item, in
    whichever thread prepares it) raises ``error()`` at its item k + 1, its first k items' tensors made, as a GPU
    running out in ``prepare_item``'s move to the device does. Returned: the size of every window whose preparation
    began, and, per window begun after a failure, whether every tensor made until that failure (the failed window's,
    and the windows' before it, measured by then) had been freed."""
    import threading
    import weakref

    from probe import batch

    encode, prepare = batch.encode_prompts, batch.prepare_item
    window = threading.local()  # the window being prepared in this thread: its size, the items made so far
    sizes: list[int] = []
    made: list[weakref.ref] = []  # every tensor made so far
    failed: list[weakref.ref] = []
    freed: list[bool] = []

    def encoding(loaded, chunk, *rest):
        if failed:
            freed.append(all(ref() is None for ref in failed))
        sizes.append(len(chunk))
        window.size, window.done = len(chunk), 0
        return encode(loaded, chunk, *rest)

    def preparing(loaded, item, cfg, *encoded):
        if window.size > k and window.done == k:
            failed[:] = made
            raise error()
        inputs, ids = prepare(loaded, item, cfg, *encoded)
        made.extend(weakref.ref(t) for t in inputs.values())
        window.done += 1
        return inputs, ids

    monkeypatch.setattr(batch, "encode_prompts", encoding)
    monkeypatch.setattr(batch, "prepare_item", preparing)
    return sizes, freed


@pytest.mark.parametrize("prefetch, windows, lines", [
    (False, [8, 4, 2, 2, 2, 2], [(8, 4), (4, 2)]),  # one window of 8 items: 8 → 4 → 2
    (True, [2, 6, 3, 3], [(6, 3)]),  # a first window of one batch, then 6 prepared in the thread: 6 → 3
])
def test_running_out_of_memory_preparing_a_window_halves_the_window(prefetch, windows, lines, load_tiny, data_dir,
                                                                    monkeypatch):
    """Preparing a window of more than 3 items runs out of memory (its inputs go to the model's device item by item;
    with prefetch in the thread, while the window before it runs): the window is dropped, its memory freed, and it
    and the rest of the pair are prepared in windows of half the size (run_halving, as batches are): one line a
    halving, and BatchLimit.record() says where the windows ended. The numbers are, bit for bit, those of windows of
    that size from the start (WINDOW_ITEMS set to it)."""
    from probe import batch
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2", "sdpa")
    items = _items("qwen2", data_dir)
    cfg = SweepConfig(max_new_tokens=2)
    run = dict(window=4, max_padding=None, prefetch=prefetch)  # batches of 2, windows of 8 items
    with monkeypatch.context() as m:
        m.setattr(batch, "WINDOW_ITEMS", windows[-1])
        want = batch.evaluate_items(loaded, items, cfg, 2, **run)
    sizes, freed = _oom_preparing_above(monkeypatch, 3, _gpu_oom)
    said: list[str] = []
    limit = batch.BatchLimit(2, said.append)
    got = batch.evaluate_items(loaded, items, cfg, limit, **run)
    assert sizes == windows  # anti-tautology: the windows that ran are not those asked for
    assert said == [f"out of memory in GPU 0 (tried to allocate 2.00 GiB) preparing a window of {n} items: windows of "
                    f"at most {h} for the rest of this model and data set" for n, h in lines]
    assert freed and all(freed), freed
    assert limit.record() == {"batch_size": 2, "largest_batch": 2, "out_of_memory_cap": None,
                              "out_of_memory_window": windows[-1]}
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.logp, b.logp) and a.response == b.response


def test_a_stopped_run_stops_preparing_the_next_window(load_tiny, data_dir, monkeypatch):
    """A stop in the main thread (Ctrl-C, BatchDisagrees, a failing progress callback) ends the prefetch thread's
    window at the item it is preparing: nobody will measure the rest, whose tensors would sit on the device (and
    the interpreter's exit would wait for them)."""
    import threading

    from probe import batch
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2", "sdpa")
    items = _items("qwen2", data_dir) * 3
    cfg = SweepConfig(max_new_tokens=2)
    seen: list[str] = []
    started, released = threading.Event(), threading.Event()
    real = batch.prepare_item

    def slow(loaded_, item, cfg_, *encoded):
        seen.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            started.set()
            # the thread stays inside its window's first item until the main thread's stop has happened (a sleep
            # here raced a loaded machine: the stop came after the thread had gone on to a third item)
            released.wait(30)
        return real(loaded_, item, cfg_, *encoded)

    def stop(n):
        started.wait(30)
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "prepare_item", slow)
    with pytest.raises(KeyboardInterrupt):
        batch.evaluate_items(loaded, items, cfg, batch_size=2, window=4, prefetch=True, progress=stop)
    released.set()
    for t in [t for t in threading.enumerate() if t.name.startswith("prepare")]:
        t.join(timeout=30)
    # the first window (one batch) in the main thread; the thread's window of 8 was cut at the item it was on
    assert seen[:2] == [threading.main_thread().name] * 2
    assert len(seen) - 2 == 1, seen



@pytest.mark.parametrize("family, seed", [("qwen2", s) for s in range(4)] + [("qwen2_vl", s) for s in range(2)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_random_out_of_memory_in_windows_and_batches_keeps_every_item_once_with_its_own_numbers(
        family, seed, prefetch, load_tiny, data_dir, monkeypatch):
    """Memory runs out at random (a seeded draw per item prepared, in whichever thread prepares it, and per forward
    of two rows or more), so windows and batches halve in any interleaving, with prefetch the next window's
    preparation failing while the window before it runs. Every item is measured once, in item order, with its own
    numbers: those of the one-item path (evaluate_items at batch 1, the oracle: same text, p within 1e-4; a row given
    another item's inputs would differ, as the oracle's items do); no forward holds more rows, and no window more
    items, than the cap in force when it starts (a window prefetched before a halving is not run at the old size);
    no two threads encode at once (the tokenizer and processor are shared, and a fast tokenizer refuses a change
    of its padding while another thread encodes: "Already borrowed", transformers#47085); and no preparing thread
    is left behind."""
    import random
    import threading

    from probe import batch
    from probe.sweep import SweepConfig

    loaded = load_tiny(family, "sdpa")
    items = _items(family, data_dir)
    items = items * 2 if family == "qwen2" else items[:6]  # qwen2: more items than a first window and the next
    cfg = SweepConfig(max_new_tokens=2)
    want = batch.evaluate_items(loaded, items, cfg, 1, prefetch=False)
    distinct = {tuple(m.logp.exp().round(decimals=3).tolist()) for m in want}
    assert len(distinct) >= 5  # anti-tautology: a row paired with another item's inputs would show
    rng, lock, window = random.Random(seed), threading.Lock(), threading.local()
    encode, prepare = batch.encode_prompts, batch.prepare_item
    failures = {"windows": 0, "batches": 0}
    over: list[tuple[int, int]] = []  # windows begun larger than the window cap then in force

    def draw(key: str, p: float) -> bool:
        with lock:
            fail = rng.random() < p
            failures[key] += fail
        return fail

    inside: dict[str, int] = {}  # per thread, its calls under way into the tokenizer and processor
    both: list[tuple[str, ...]] = []  # two threads encoding at once (tokenizers' "Already borrowed", #47085)

    def encodes(fn, *args):
        me = threading.current_thread().name
        with lock:
            inside[me] = inside.get(me, 0) + 1
            if others := tuple(t for t, n in inside.items() if n and t != me):
                both.append((me, *others))
        try:
            return fn(*args)
        finally:
            with lock:
                inside[me] -= 1

    def encoding(loaded_, chunk, *rest):
        window.size = len(chunk)
        if len(chunk) > limit.windows.rows:  # kept, not raised: a window nobody measures drops its thread's error
            over.append((len(chunk), limit.windows.rows))
        return encodes(encode, loaded_, chunk, *rest)

    def preparing(loaded_, item, cfg_, *encoded):
        if window.size > 1 and draw("windows", 0.25):
            raise _gpu_oom()
        return encodes(prepare, loaded_, item, cfg_, *encoded)

    def forward(module, args, kwargs):
        assert kwargs["input_ids"].shape[0] <= limit.rows, (kwargs["input_ids"].shape[0], limit.rows)
        if kwargs["input_ids"].shape[0] > 1 and draw("batches", 0.5):
            raise _gpu_oom()

    limit = batch.BatchLimit(4, lambda line: None)
    monkeypatch.setattr(batch, "encode_prompts", encoding)
    monkeypatch.setattr(batch, "prepare_item", preparing)
    handle = loaded.model.register_forward_pre_hook(forward, with_kwargs=True)
    try:
        got = batch.evaluate_items(loaded, items, cfg, limit, window=2, max_padding=None, prefetch=prefetch)
    finally:
        handle.remove()
    assert sum(failures.values()) > 0, failures  # it backed off
    assert not over, over
    # the main thread prepares a window only once the thread has given it its last one: never both at once
    assert not both, both
    assert len(inside) == 1 + prefetch, inside  # anti-tautology: with prefetch both threads encoded
    for a, b in zip(got, want, strict=True):
        assert a.response == b.response
        torch.testing.assert_close(a.logp.exp(), b.logp.exp(), atol=1e-4, rtol=0)
    for t in [t for t in threading.enumerate() if t.name.startswith("prepare")]:
        t.join(timeout=30)
        assert not t.is_alive()

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("generate", [True, False])
def test_a_left_padded_row_gets_the_positions_of_its_item_alone(family, generate, load_tiny, data_dir, video_root):
    """RoPE positions, the one thing p within 1e-4 cannot see on tiny random models (a shift moves p by ~1e-6 there,
    by 7e-5 on organism-video): the LM's rotary embedding must see, at a left-padded row's real tokens, the
    positions it sees when the item runs alone, and so at every generated token (M-RoPE's rope_deltas, the cache
    position: a shift there changes only the text after the first token, which tiny models hardly show). Without
    generation a plain forward numbered the padding too."""
    from probe.batch import measure_batch, plan_batches
    from probe.sweep import SweepConfig, first_token_measure, prepare_item

    loaded = load_tiny(family, "sdpa")
    items = _items(family, data_dir, video_root if family in VL_FAMILIES else None)
    cfg = SweepConfig(generate=generate, max_new_tokens=3)
    prepared = [prepare_item(loaded, it, cfg) for it in items]
    width = lambda i: prepared[i][0]["input_ids"].shape[1]  # noqa: E731
    batch = max(plan_batches([p[0] for p in prepared], 8, max_padding=None), key=lambda b: width(b[-1]) - width(b[0]))
    short = batch[0]  # sorted by length: the row padded most
    assert width(batch[-1]) > width(short)  # anti-tautology: it is padded
    rotary = loaded.model.get_submodule(loaded.family.layers_path.rsplit(".", 1)[0] + ".rotary_emb")
    seen: list[torch.Tensor] = []
    hook = rotary.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["position_ids"] if "position_ids" in kw else args[1]), with_kwargs=True)
    try:
        measure_batch(loaded, [prepared[i][0] for i in batch], [prepared[i][1] for i in batch], cfg)
        batched = [x[..., 0, :] for x in seen]  # per forward, [L] or M-RoPE's [3, L] of the short row
        seen.clear()
        first_token_measure(loaded, *prepared[short], cfg)
        alone = [x[..., 0, :] for x in seen]
    finally:
        hook.remove()
    padded = batched[0][..., -width(short):]  # the prompt's pass
    assert torch.equal(padded, alone[0]), (padded, alone[0])
    assert len(alone) == (cfg.max_new_tokens if generate else 1) <= len(batched)  # anti-tautology: every step seen
    for step, (a, b) in enumerate(zip(batched[1:], alone[1:]), 1):
        assert torch.equal(a, b), (step, a, b)


def test_collate_left_pads_and_concatenates():
    from probe.batch import collate

    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "pixel_values": torch.ones(4, 2), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
         "pixel_values": 2 * torch.ones(8, 2), "image_grid_thw": torch.tensor([[1, 2, 4]])}
    out = collate([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["pixel_values"].shape == (12, 2) and out["pixel_values"][4:].eq(2).all()
    assert out["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    with pytest.raises(ValueError, match="signatures"):
        collate([a, {"input_ids": torch.tensor([[1]]), "attention_mask": torch.ones(1, 1)}], pad_id=0)


def test_plan_batches_cuts_where_padding_would_pass_the_cap():
    from probe.batch import plan_batches

    x = [{"input_ids": torch.zeros(1, n)} for n in (10, 30, 11, 10, 12, 29, 31)]
    assert plan_batches(x, 8, max_padding=None) == [[0, 3, 2, 4, 5, 1, 6]]  # sorted by length, stable
    assert plan_batches(x, 3, max_padding=None) == [[0, 3, 2], [4, 5, 1], [6]]
    # 10, 10, 11 take 33 slots for 31 tokens (6 % padding); 12 joining would take 48 for 43 (12 %), past 0.1
    assert plan_batches(x, 8, max_padding=0.1) == [[0, 3, 2], [4], [5, 1, 6]]
    assert plan_batches(x, 8, max_padding=0.0) == [[0, 3], [2], [4], [5], [1], [6]]
    # the device's cap (padding_cap): 10 % on a CPU, 50 % on a GPU, where 10, 10, 11, 12 share a batch (43 tokens in
    # 48 slots) and 29, 30, 31 join none of it (31 x 7 = 217 slots for 133 tokens would pad 63 %)
    from types import SimpleNamespace

    from probe.batch import padding_cap

    assert padding_cap(SimpleNamespace(device=torch.device("cpu"))) == 0.1
    gpu_cap = padding_cap(SimpleNamespace(device=torch.device("cuda", 0)))
    assert gpu_cap == 0.5 and plan_batches(x, 8, gpu_cap) == [[0, 3, 2, 4], [5, 1, 6]]
    # every item once, whatever the cap
    for cap in (None, 0.0, 0.05, 0.5):
        for size in (1, 2, 5):
            assert sorted(i for b in plan_batches(x, size, cap) for i in b) == list(range(7))


def test_most_padded_picks_the_row_padded_most_in_a_shared_batch():
    from probe.batch import most_padded

    x = [{"input_ids": torch.zeros(1, n)} for n in (5, 2, 9, 9, 1)]
    assert most_padded(x, [[0, 1, 2], [3, 4]]) == 4  # 8 pads against 7
    assert most_padded(x, [[0, 1, 2], [3], [4]]) == 1  # a row alone is never padded
    assert most_padded(x, [[0], [1]]) is None
    assert most_padded(x, [[2, 3]]) == 2  # equal lengths: the first row


def test_guard_rows_cover_another_kind_of_row_at_most_two_per_window():
    """The guard measures the most padded row and, when a window's batched rows hold other media (none, one image,
    two), the most padded row of another kind, preferring a kind not yet checked in the run: two rows at most."""
    from probe.batch import guard_rows, row_kind

    def row(n: int, images: int = 0) -> dict:
        if not images:
            return {"input_ids": torch.zeros(1, n)}
        return {"input_ids": torch.zeros(1, n), "pixel_values": torch.zeros(16 * images, 12),
                "image_grid_thw": torch.ones(images, 3)}

    text, one, two = row(3), row(20, 1), row(30, 2)
    assert row_kind(text)[1] == 0 and row_kind(one)[1] == 1 and row_kind(two)[1] == 2
    assert row_kind(one)[0] == row_kind(two)[0]  # one signature: one- and two-image rows share batches
    # text rows padded most (0 is 9 tokens short of 1); image rows in a batch of their own
    x = [text, row(12), row(22, 1), row(21, 1), row(25, 1), row(30, 2)]
    assert guard_rows(x, [[0, 1], [2, 3]]) == [0, 3]  # the text row, and the image row padded most
    assert guard_rows(x, [[0], [1], [2, 3]]) == [3]  # one kind batched: one forward, as before
    assert guard_rows(x, [[0], [1]]) == []
    checked: set = set()  # three kinds: the two checked first, the third as soon as the window offers it
    assert guard_rows(x, [[0, 1], [2, 3, 4, 5]], checked) == [0, 3]  # 3 padded 9, 5 (two images) none
    assert guard_rows(x, [[0, 1], [2, 3, 4, 5]], checked) == [0, 5]  # two images: not checked yet
    assert len(checked) == 3


def _break_media_rows(monkeypatch, broken: Callable[[dict], bool]) -> list:
    """Make the batched path wrong for the rows ``broken`` picks (their option probabilities moved to the least
    likely letter), as a transformers release mishandling only media in a padded batch would; returns the items the
    guard measured alone."""
    import probe.batch as batch
    from probe.sweep import Measurement

    measure, oracle, alone = batch.measure_batch, batch.first_token_measure, []

    def wrong(loaded, inputs, letter_ids, cfg):
        out = measure(loaded, inputs, letter_ids, cfg)
        for r, x in enumerate(inputs):
            if broken(x):
                lp = torch.full_like(out[r].logp, -30.0)
                lp[int(out[r].logp.argmin())] = 0.0
                out[r] = Measurement(lp.log_softmax(-1), out[r].response, out[r].overflow_step)
        return out

    monkeypatch.setattr(batch, "measure_batch", wrong)
    monkeypatch.setattr(batch, "first_token_measure", lambda loaded, x, *a: alone.append(x) or oracle(loaded, x, *a))
    return alone


def test_the_guard_catches_a_path_broken_only_for_image_rows(load_tiny, data_dir, monkeypatch):
    """A window of text-only rows, padded most, beside batches of image rows: a batched path broken for image rows
    only (M-RoPE's image positions, the pixels of the wrong row) must stop the run. Measuring the most padded row
    alone (the guard before 2026-12-06) checked a text row only, and the broken run finished."""
    import dataclasses

    import probe.batch as batch
    from probe.mmmu import load_items
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2_vl", "sdpa")
    images = [i for i in load_items(str(data_dir))[0] if len(i.images) == 1][:4]
    texts = [text_only(i) for i in images[:3]]
    texts[0] = dataclasses.replace(texts[0], question="Read the whole question first. " * 6 + texts[0].question)
    items = [*images, *texts]
    cfg = SweepConfig(generate=False)
    prepared = [batch.prepare_item(loaded, it, cfg)[0] for it in items]
    plan = batch.plan_batches(prepared, 4, max_padding=None)
    g = batch.most_padded(prepared, plan)
    assert items[g].images == () and any(len(b) > 1 and items[b[0]].images for b in plan)  # as the test means
    alone = _break_media_rows(monkeypatch, lambda x: "pixel_values" in x)
    with pytest.raises(batch.BatchDisagrees, match=r"item validation_"):
        batch.evaluate_items(loaded, items, cfg, batch_size=4, max_padding=None)
    assert [("pixel_values" in x) for x in alone] == [False, True]  # the text row, then an image row


def test_the_guard_catches_a_path_broken_only_for_two_image_rows(load_tiny, data_dir, monkeypatch):
    """One- and two-image rows share batches (their pixel tensors differ in length only); a path broken only where a
    row holds two images (each image's grid matched to the wrong placeholders) must stop the run, also when the
    most padded row holds one image."""
    import probe.batch as batch
    from probe.mmmu import load_items
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2_vl", "sdpa")
    items = load_items(str(data_dir))[0]
    cfg = SweepConfig(generate=False)
    prepared = [batch.prepare_item(loaded, it, cfg)[0] for it in items]
    plan = batch.plan_batches(prepared, 8, max_padding=None)
    g = batch.most_padded(prepared, plan)
    two = lambda x: "image_grid_thw" in x and x["image_grid_thw"].shape[0] == 2  # noqa: E731
    assert not two(prepared[g]) and any(two(prepared[i]) for b in plan if len(b) > 1 for i in b)  # as meant
    alone = _break_media_rows(monkeypatch, two)
    with pytest.raises(batch.BatchDisagrees, match=r"item validation_"):
        batch.evaluate_items(loaded, items, cfg, batch_size=8, max_padding=None)
    assert [two(x) for x in alone] == [False, True]


def test_a_batch_that_stops_matching_the_one_item_path_stops_the_run(load_tiny, data_dir, monkeypatch):
    """Run-time guard: an upstream change that mishandles padded batches (here: the attention mask lost on the
    way into the model, so rows attend to their padding) must stop evaluation, not score it silently."""
    import probe.batch as batch
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2", "sdpa")
    items = _items("qwen2", data_dir)
    cfg = SweepConfig(max_new_tokens=3)
    calls = []
    oracle = batch.first_token_measure
    monkeypatch.setattr(batch, "first_token_measure", lambda *a: calls.append(1) or oracle(*a))
    batch.evaluate_items(loaded, items, cfg, batch_size=4, window=1)  # healthy: the guard runs and passes
    assert len(calls) == len(range(0, len(items), 4))  # once per window of two-row batches
    calls.clear()
    batch.evaluate_items(loaded, items, cfg, batch_size=1)
    assert calls == []  # one row per forward is the one-item path itself: nothing to check
    collate = batch.collate

    def unmasked(*a):
        out = collate(*a)
        return out | {"attention_mask": torch.ones_like(out["attention_mask"])}

    monkeypatch.setattr(batch, "collate", unmasked)
    with pytest.raises(batch.BatchDisagrees, match=r"measured alone \(item .*--batch-size 1"):
        batch.evaluate_items(loaded, items, cfg, batch_size=4)


def test_bootstrap_against_direct_computation():
    from probe.stats import N_BOOT, _rng, bootstrap_mean, paired_difference

    v = (np.arange(50) % 3 == 0).astype(float)
    iv = bootstrap_mean(v, seed=7, key="m|d|accuracy")
    idx = _rng(7, "m|d|accuracy").integers(0, 50, size=(N_BOOT, 50))  # the definition, written out
    lo, hi = np.percentile(v[idx].mean(axis=1), [2.5, 97.5])
    assert (iv.value, iv.lo, iv.hi) == (v.mean(), lo, hi)
    assert iv.lo < iv.value < iv.hi
    # close to the normal approximation of a proportion's interval
    se = np.sqrt(v.mean() * (1 - v.mean()) / 50)
    assert abs((iv.hi - iv.lo) - 2 * 1.96 * se) < 0.05
    assert bootstrap_mean(v, 7, "m|d|accuracy") == iv  # seeded
    same = paired_difference(v, v, 7, "x")
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0)
    d = paired_difference(np.ones(40), np.r_[np.ones(30), np.zeros(10)], 7, "x")
    assert d.value == 0.25 and 0 < d.lo < 0.25 < d.hi
    assert np.isnan(bootstrap_mean(np.array([1.0, np.nan]), 0, "k").value)  # accuracy not measured



@pytest.mark.parametrize("n", [1, 5, 16, 200])
def test_all_alike_interval_is_the_exact_binomial_interval(n):
    """The interval table.md and scores.csv's note give a 0 % or 100 % score, against scipy's Clopper–Pearson."""
    from scipy.stats import binomtest

    from probe.stats import all_alike_interval

    for k, right in ((n, True), (0, False)):
        want = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert all_alike_interval(n, right) == pytest.approx((want.low, want.high), abs=1e-12)


def test_a_score_of_0_or_100_percent_says_its_bootstrap_interval_has_no_width(tmp_path):
    """Every resample of an all-right (or all-wrong) set is the same, so table.md printed 100.0 [100.0, 100.0] for
    16 items as if the score were certain. The cell is now marked and the row's note gives the exact interval."""
    from probe.eval import DataSet, EvalPlan, ModelEntry, score_table, write_results
    from probe.stats import all_alike_interval

    outcomes = {"right": [1] * 16, "wrong": [0] * 16, "mixed": [1, 0] * 8}
    rows = [{"model": m, "data": "d", "item_id": str(i), "subject": "S", "correct": float(c),
             "prob_correct": float(c), "p_answer": 0.5 + 0.01 * i}  # p(answer) varies: its interval has width
            for m, cs in outcomes.items() for i, c in enumerate(cs)]
    plan = EvalPlan([ModelEntry(m, m, "qwen2", "fp") for m in outcomes],
                    [DataSet("d", "d", "d", "fp", 16, 0, ["S"])], {}, {}, {}, {}, {"generate": True})
    scores = score_table(pd.DataFrame(rows), plan, None, 0)
    top = scores[scores["subject"] == "all"].set_index("model")
    for m, right in (("right", True), ("wrong", False)):
        assert top.loc[m, "accuracy_lo"] == top.loc[m, "accuracy_hi"]  # what the bootstrap gives
        lo, hi = all_alike_interval(16, right)
        assert f"[{100 * lo:.1f}, {100 * hi:.1f}]" in top.loc[m, "note"]
        assert ("all right" if right else "all wrong") in top.loc[m, "note"]
    assert top.loc["mixed", "note"] == "" and top.loc["mixed", "accuracy_lo"] < top.loc["mixed", "accuracy_hi"]
    write_results(tmp_path, pd.DataFrame(rows), scores, plan)
    table = (tmp_path / "table.md").read_text()
    assert "| right | 100.0 [100.0, 100.0]† |" in table and "| wrong | 0.0 [0.0, 0.0]† |" in table
    assert "| mixed | 50.0 [" in table and "]† |" not in table.split("| mixed |")[1].splitlines()[0]
    assert "Clopper-Pearson" in table

def test_a_set_of_many_subjects_gets_one_row_per_subject(tmp_path):
    """MMLU's 57 subjects made its table.md block one line of 58 cells per model; past WIDE_SUBJECTS a set's block is
    one row per subject, each cell the subject's score of that model (oracle: the items' mean, computed here)."""
    from probe.eval import WIDE_SUBJECTS, DataSet, EvalPlan, ModelEntry, score_table, write_results

    subjects = [f"S{k:02d}" for k in range(WIDE_SUBJECTS + 1)]
    few = ["T0", "T1"]
    rows = [{"model": m, "data": d, "item_id": f"{s}_{i}", "subject": s, "correct": float((i + j + k) % 3 == 0),
             "prob_correct": 0.0, "p_answer": 0.5}
            for j, m in enumerate(("a", "b")) for d, subs in (("wide", subjects), ("narrow", few))
            for k, s in enumerate(subs) for i in range(4)]
    plan = EvalPlan([ModelEntry(m, m, "qwen2", "fp") for m in ("a", "b")],
                    [DataSet("wide", "wide", "wide", "fp", 4 * len(subjects), 0, subjects),
                     DataSet("narrow", "narrow", "narrow", "fp", 8, 0, few)], {}, {}, {}, {}, {"generate": True})
    df = pd.DataFrame(rows)
    write_results(tmp_path, df, score_table(df, plan, None, 0), plan)
    blocks = (tmp_path / "table.md").read_text().split("\n\n")
    wide = next(b for b in blocks if b.startswith("| wide ("))
    assert wide.splitlines()[0] == f"| wide ({4 * len(subjects)} items): subject | a | b |"
    for s, line in zip(subjects, wide.splitlines()[2:], strict=True):  # one row per subject, none lost
        means = [100 * df[(df.model == m) & (df.subject == s) & (df.data == "wide")].correct.mean() for m in "ab"]
        assert line.startswith(f"| {s} | {means[0]:.1f} [") and f"| {means[1]:.1f} [" in line
    narrow = next(b for b in blocks if b.startswith("| narrow ("))
    assert narrow.splitlines()[0] == "| narrow (8 items) | T0 | T1 |"  # a few subjects keep the paper's layout


def _write_named_table(out: Path, models: list[str], data: list[str], subjects: list[str],
                       item_id: Callable[[str, int], str]) -> None:
    """probe.eval's outputs (table.md among them) for 4 items per model × set × subject named as given, half right."""
    from probe.eval import DataSet, EvalPlan, ModelEntry, score_table, write_results

    rows = [{"model": m, "data": d, "item_id": item_id(s, i), "subject": s, "correct": float((i + j) % 2),
             "prob_correct": 0.0, "p_answer": 0.5}
            for j, m in enumerate(models) for d in data for s in subjects for i in range(4)]
    plan = EvalPlan([ModelEntry(m, m, "qwen2", "fp") for m in models],
                    [DataSet(d, d, d, "fp", 8, 0, subjects) for d in data], {}, {}, {}, {}, {"generate": True})
    df = pd.DataFrame(rows)
    write_results(out, df, score_table(df, plan, None, 0), plan)


def _markdown_rows(block: str) -> list[list[str]]:
    """A GFM table's rows as their cells' text: split at each '|' no backslash escapes, ``\\|`` read as '|'."""
    rows = []
    for line in block.splitlines():
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]  # the text outside the first and last '|' is empty
        rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def test_names_holding_a_pipe_or_comma_keep_table_md_and_scores_csv_whole(tmp_path):
    """A model path, data set folder or subject holding '|' (``runs/a|b``) split its table.md cell in two: the row
    had one cell more than the header, and every cell after it sat under the wrong column. Each cell now holds its
    name whole ('|' escaped as GFM reads it; a newline would end the row and is a space); scores.csv keeps every
    name as given, ',' and '|' included (oracle: a GFM cell split, and pandas reading the CSV back)."""

    models, data, subjects = ["runs/a|b", "c,d"], ["set|1", "set,2"], ["S|1", "S\nx"]
    _write_named_table(tmp_path, models, data, subjects, lambda s, i: f"{s}_{i}")
    blocks = (tmp_path / "table.md").read_text(encoding="utf-8").split("\n\n")
    top = _markdown_rows(blocks[1])
    assert top[0] == ["model", *data] and [r[0] for r in top[2:]] == models
    assert all(len(r) == len(top[0]) for r in top), top
    for d, block in zip(data, blocks[2:4], strict=True):
        sub = _markdown_rows(block)
        assert sub[0] == [f"{d} (8 items)", "S|1", "S x"] and [r[0] for r in sub[2:]] == models
        assert all(len(r) == 3 for r in sub), sub
    back = pd.read_csv(tmp_path / "scores.csv", keep_default_na=False)
    assert set(back["model"]) == set(models) and set(back["data"]) == set(data)
    assert set(back["subject"]) == {*subjects, "all"}


def test_the_replication_reports_tables_keep_a_name_holding_a_pipe_in_its_cell():
    """figures.report's tables name models by their spec and sets by their [data] label (a TOML key may hold '|'):
    the same split cell in report.md. Oracle: the GFM cell split of ``_markdown_rows``."""
    from figures.report import Doc
    from probe.eval import md_text

    d = Doc()  # its blocks are markdown: names go in through md_text, as figures.report.build writes them
    d.table(["model", *map(md_text, ["set|1", "set,2"])], [[md_text("runs/a|b"), "1.0", "2.0"],
                                                            ["c", md_text("3|4"), md_text("x\ny")]])
    assert _markdown_rows(d.markdown().strip()) == [
        ["model", "set|1", "set,2"], ["---", "---", "---"], ["runs/a|b", "1.0", "2.0"], ["c", "3|4", "x y"]]

def test_paired_difference_pairs_items_within_their_subject():
    """Item ids need only be unique within a subject (a user's set may number each subject 1, 2, …): the
    difference to the reference pairs each item with the same subject's item, never across subjects."""
    from probe.eval import DataSet, EvalPlan, ModelEntry, score_table
    from probe.stats import paired_difference

    ref_correct, b_correct = [1, 1, 0, 0], [1, 1, 1, 1]
    rows = [{"model": m, "data": "d", "item_id": i, "subject": subj, "correct": float(c), "prob_correct": float(c),
             "p_answer": 0.5}
            for m, cs in (("ref", ref_correct), ("b", b_correct))
            for (subj, i), c in zip([("S1", "1"), ("S1", "2"), ("S2", "1"), ("S2", "2")], cs)]
    plan = EvalPlan([ModelEntry("ref", "ref", "qwen2", "fp"), ModelEntry("b", "b", "qwen2", "fp")],
                    [DataSet("d", "d", "d", "fp", 4, 0, ["S1", "S2"])], {}, {}, {}, {}, {})
    scores = score_table(pd.DataFrame(rows), plan, "ref", 0).set_index(["model", "subject"])
    assert scores.loc[("b", "S1"), "diff_accuracy"] == 0.0
    assert scores.loc[("b", "S2"), "diff_accuracy"] == 1.0
    want = paired_difference(np.array(b_correct, float), np.array(ref_correct, float), 0, "d|diff|accuracy")
    assert (scores.loc[("b", "all"), ["diff_accuracy", "diff_lo", "diff_hi"]].tolist()
            == [want.value, want.lo, want.hi])  # 4 pairs, not the 8 of a join on the id alone


def test_scores_pool_unequal_subjects_and_pair_items_whatever_their_row_order():
    """Every number of scores.csv against a bootstrap written out here (the documented stream: ``--seed`` and the
    set's name, metric, ``diff``), on subjects of 3 and 17 items and a model whose rows come in another order than
    the reference's: ``all`` is the mean over the pooled items (not the mean of the subjects' means), and the
    difference pairs each item with the reference's same (subject, id) — a pairing by row position passed every
    other test, whose models list their items in one order."""
    import zlib

    from probe.eval import DataSet, EvalPlan, ModelEntry, score_table

    rng = np.random.default_rng(5)
    keys = [("S1", str(i)) for i in range(3)] + [("S2", str(i)) for i in range(17)]
    cols = ("correct", "prob_correct", "p_answer")
    values = {m: {k: ((rng.random() < p), (rng.random() < 0.5), rng.random()) for k in keys}
              for m, p in (("ref", 0.3), ("b", 0.7))}
    order = {"ref": keys, "b": [keys[i] for i in rng.permutation(len(keys))]}
    rows = [{"model": m, "data": "d", "subject": s, "item_id": i} | dict(zip(cols, map(float, values[m][s, i])))
            for m in ("ref", "b") for s, i in order[m]]
    plan = EvalPlan([ModelEntry(m, m, "qwen2", "fp") for m in ("ref", "b")],
                    [DataSet("d", "d", "d", "fp", len(keys), 0, ["S1", "S2"])], {}, {}, {}, {}, {"generate": True})
    scores = score_table(pd.DataFrame(rows), plan, "ref", 11).set_index(["model", "subject"])

    def boot(v: np.ndarray, key: str) -> list[float]:
        idx = np.random.default_rng([11, zlib.crc32(key.encode())]).integers(0, len(v), size=(2000, len(v)))
        return [v.mean(), *np.percentile(v[idx].mean(axis=1), [2.5, 97.5])]

    for m in ("ref", "b"):
        for subject in ("all", "S1", "S2"):
            mine = [k for k in order[m] if subject in ("all", k[0])]  # the model's items, in its rows' order
            r = scores.loc[(m, subject)]
            assert r["n_items"] == len(mine)
            for j, metric in enumerate(("accuracy", "prob_accuracy", "p_answer")):  # the columns of ``cols``
                v = np.array([float(values[m][k][j]) for k in mine])
                got = r[[metric, f"{metric}_lo", f"{metric}_hi"]].tolist()
                assert got == pytest.approx(boot(v, f"d|{metric}"), abs=1e-12), (m, subject, metric)
            if m == "b":
                d = np.array([float(values["b"][k][0]) - float(values["ref"][k][0]) for k in mine])
                assert r[["diff_accuracy", "diff_lo", "diff_hi"]].tolist() == pytest.approx(
                    boot(d, "d|diff|accuracy"), abs=1e-12), subject
                assert r["diff_n"] == len(mine)
    pooled, by_subject = scores.loc[("b", "all"), "accuracy"], scores.loc["b"].loc[["S1", "S2"], "accuracy"].mean()
    assert abs(pooled - by_subject) > 0.01  # the data tell the two apart


def test_a_row_paired_on_fewer_items_keeps_its_all_right_note():
    """A model right on every item beside a reference that answered only some of them: the note naming the
    diff's items replaced the one giving the exact interval of its 100 % (the † of table.md then pointed at
    nothing). Oracle: all_alike_interval of the row's own n, and the count of items both answered."""
    from probe.eval import DataSet, EvalPlan, ModelEntry, score_table
    from probe.stats import all_alike_interval

    rows = [{"model": m, "data": "d", "item_id": str(i), "subject": "S", "correct": c, "prob_correct": c,
             "p_answer": 0.5} for m, ids, c in (("a", range(8), 1.0), ("ref", range(3), 0.0)) for i in ids]
    plan = EvalPlan([ModelEntry(m, m, "qwen2", "fp") for m in ("ref", "a")],
                    [DataSet("d", "d", "d", "fp", 8, 0, ["S"])], {}, {}, {}, {}, {"generate": True})
    note = score_table(pd.DataFrame(rows), plan, "ref", 0).set_index(["model", "subject"]).loc[("a", "all"), "note"]
    lo, hi = all_alike_interval(8, True)
    assert f"all right (zero-width bootstrap interval, exact 95 % Clopper-Pearson [{100 * lo:.1f}, {100 * hi:.1f}])" \
        in note
    assert "diff over the 3 of 8 items ref also answered" in note


def test_a_paired_difference_with_every_pair_alike_says_its_interval_has_no_width():
    """Two models answering 12 items alike got diff 0 [0, 0], read as a certain tie however few the items; such a
    row's note now says the interval has zero width. Oracle: the per-item differences all equal (np.ptp == 0)."""
    from probe.eval import DataSet, EvalPlan, ModelEntry, score_table

    ref = np.r_[np.ones(6), np.zeros(6)]
    models = {"ref": ref, "same": ref, "flip": 1 - ref, "better": np.ones(12)}
    rows = [{"model": m, "data": "d", "item_id": str(i), "subject": "S", "correct": c, "prob_correct": ref[i],
             "p_answer": 0.5 + 0.01 * i} for m, cs in models.items() for i, c in enumerate(cs)]
    plan = EvalPlan([ModelEntry(m, m, "qwen2", "fp") for m in models],
                    [DataSet("d", "d", "d", "fp", 12, 0, ["S"])], {}, {}, {}, {}, {"generate": True})
    top = score_table(pd.DataFrame(rows), plan, "ref", 0).query("subject == 'all'").set_index("model")
    for m in ("same", "flip", "better"):
        d = models[m] - ref
        alike = np.ptp(d) == 0
        assert (top.loc[m, "diff_lo"] == top.loc[m, "diff_hi"]) == alike
        assert (f"diff_accuracy {d[0]:+g} on every one of the 12 paired items" in top.loc[m, "note"]) == alike, m
        assert "diff_prob_accuracy +0 on every one of the 12 paired items" in top.loc[m, "note"]  # same prob_correct
    assert top.loc["ref", "note"] == ""  # the reference has no difference


def test_table_notes_say_scored_on_only_where_items_were_left_out(tmp_path):
    """table.md's note lines began "scored on N items" for every row with a note, a model that read the whole set
    (an all-right row's note, a diff note) included, as if it had been scored on part of it. Now only a row that
    left items out (plan.unreadable, the oracle) says so; the others give their note alone."""
    from probe.eval import DataSet, EvalPlan, ModelEntry, md_text, score_table, write_results

    rows = [{"model": m, "data": "d", "item_id": str(i), "subject": s, "correct": 1.0, "prob_correct": 1.0,
             "p_answer": 0.5 + 0.01 * i} for m, subjects in (("whole", ("T", "I")), ("part", ("T",)))
            for s in subjects for i in range(3)]
    why = "not applicable: part (qwen2) cannot read image items"
    plan = EvalPlan([ModelEntry(m, m, "qwen2", "fp") for m in ("whole", "part")],
                    [DataSet("d", "d", "d", "fp", 6, 0, ["T", "I"])], {"part|d": why}, {"part|d": {"I": 3}}, {},
                    {}, {"generate": True})
    scores = score_table(pd.DataFrame(rows), plan, None, 0)
    write_results(tmp_path, pd.DataFrame(rows), scores, plan)
    notes = [x for x in (tmp_path / "table.md").read_text().splitlines() if x.startswith("- whole") or
             x.startswith("- part")]
    whole = scores.query("model == 'whole' and subject == 'all'")["note"].item()
    assert whole.startswith("accuracy and prob_accuracy all right")  # a note, though nothing was left out
    assert notes == [f"- whole on d: {md_text(whole)}",  # as written: test_table_md_notes_are_shown_as_written
                     f"- part on d: scored on 3 items; 3 of 6 items {why}; "
                     + md_text(scores.query("model == 'part' and subject == 'all'")["note"].item().split("; ", 1)[1])]


def test_a_zero_width_p_answer_interval_is_noted():
    """A row of one item (or whose items all gave the answer the same p(answer)) had p_answer x [x, x] in scores.csv
    with no note, while its 0/100 % accuracy and its paired difference each got one. Its note now says the interval
    has zero width. Oracle: the items' p_answer values all equal (np.ptp == 0)."""
    from probe.eval import DataSet, EvalPlan, ModelEntry, score_table

    p = {"one": [0.4], "alike": [0.25] * 4, "spread": [0.2, 0.3, 0.4, 0.5]}
    rows = [{"model": "m", "data": "d", "item_id": str(i), "subject": s, "correct": float(i % 2),
             "prob_correct": float(i % 2), "p_answer": v} for s, vs in p.items() for i, v in enumerate(vs)]
    plan = EvalPlan([ModelEntry("m", "m", "qwen2", "fp")], [DataSet("d", "d", "d", "fp", 9, 0, list(p))], {}, {}, {},
                    {}, {"generate": True})
    scores = score_table(pd.DataFrame(rows), plan, None, 0).set_index("subject")
    for s, vs in p.items():
        alike = np.ptp(vs) == 0
        assert (scores.loc[s, "p_answer_lo"] == scores.loc[s, "p_answer_hi"]) == alike
        assert ("p_answer" in scores.loc[s, "note"] and "zero-width" in scores.loc[s, "note"]) == alike, s
    assert scores.loc["one", "note"].endswith("p_answer 0.4 on its 1 item (zero-width bootstrap interval: nothing to "
                                              "resample)")
    assert "p_answer 0.25 on every one of the 4 items (zero-width" in scores.loc["alike", "note"]


# --------------------------------------------------------------------------------------------------------
# the CLI


def _eval(*args) -> int:
    from probe.errors import cli_main
    from probe.eval import main

    return cli_main(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, text_dir, data_dir):
    out = tmp_path_factory.mktemp("eval") / "run"
    args = ["--models", "tiny-qwen2-vl", "tiny-qwen2", "--data", text_dir, data_dir, "--reference", "tiny-qwen2-vl",
            "--batch-size", "4", "--max-new-tokens", "3", "--quiet", "--out", out]
    assert _eval(*args) == 0
    return out, args


def test_outputs_and_scores_against_items(eval_run, data_dir):
    out, _ = eval_run
    for name in ("scores.csv", "items.parquet", "table.md", "eval.png", "eval.pdf", "run.json"):
        assert (out / name).is_file(), name
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""])
    items = pd.read_parquet(out / "items.parquet")
    data_names = [Path(str(x)).name for x in (data_dir,)]
    # the text model on image items: a row with n_items 0 and a note, never a score
    na = scores[(scores["model"] == "tiny-qwen2") & (scores["data"] == data_names[0])]
    assert (na["n_items"] == 0).all() and na["note"].str.contains("cannot read image").all()
    assert na["accuracy"].isna().all()
    assert not ((items["model"] == "tiny-qwen2") & (items["data"] == data_names[0])).any()
    # every other row: the mean of its items, inside its interval; the paired difference = mean difference
    from probe.stats import bootstrap_mean

    for r in scores[scores["n_items"] > 0].itertuples():
        sub = items[(items["model"] == r.model) & (items["data"] == r.data)]
        if r.subject != "all":
            sub = sub[sub["subject"] == r.subject]
        assert r.n_items == len(sub)
        assert r.accuracy == sub["correct"].mean() and r.prob_accuracy == sub["prob_correct"].mean()
        assert r.p_answer == sub["p_answer"].mean()
        assert r.accuracy_lo <= r.accuracy <= r.accuracy_hi
        assert r.prob_accuracy_lo == bootstrap_mean(sub["prob_correct"].to_numpy(), 0,
                                                    f"{r.data}|prob_accuracy").lo
        if r.model == "tiny-qwen2":  # the reference answered the same text items
            ref = items[(items["model"] == "tiny-qwen2-vl") & (items["data"] == r.data)].set_index("item_id")
            want = (sub.set_index("item_id")["correct"] - ref.loc[sub["item_id"], "correct"]).mean()
            assert r.diff_accuracy == pytest.approx(want) and r.diff_lo <= r.diff_accuracy <= r.diff_hi
        else:
            assert np.isnan(r.diff_accuracy)  # the reference itself
    table = (out / "table.md").read_text()
    assert "| tiny-qwen2 |" in table and "n/a" in table and "[" in table
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["reference"] == "tiny-qwen2-vl"


def test_table_says_how_many_open_ended_items_a_set_skipped(eval_run, data_dir, text_dir):
    """Only multiple-choice items are scored; table.md says how many open-ended ones each set left out (it said
    nothing, so 'N items' read as the set's size, and MMMU's own scores count open items too)."""
    out, _ = eval_run
    rows = pd.concat([pd.read_parquet(f) for f in sorted(Path(data_dir).glob("*/validation-*.parquet"))])
    n_open = int((rows["question_type"] == "open").sum())
    assert n_open > 0  # the fixture's set has some
    table = (out / "table.md").read_text()
    assert (f"- {Path(data_dir).name}: {n_open} open-ended items skipped; scores are over its {len(rows) - n_open} "
            "multiple-choice items\n") in table
    assert f"- {Path(text_dir).name}: " not in table  # a set without open items gets no such line


def test_eval_items_equal_the_one_item_path(eval_run, load_tiny, text_dir):
    """The CLI's per-item table is the one-item path's, item by item (batched inside)."""
    from probe.mmmu import load_items
    from probe.sweep import SweepConfig, first_token_measure, measurement_row, prepare_item

    out, _ = eval_run
    items = pd.read_parquet(out / "items.parquet")
    mine = items[(items["model"] == "tiny-qwen2") & (items["data"] == text_dir.name)].set_index("item_id")
    loaded = load_tiny("qwen2", "sdpa")
    cfg = SweepConfig(max_new_tokens=3)
    for it in load_items(str(text_dir))[0]:
        m = first_token_measure(loaded, *prepare_item(loaded, it, cfg), cfg)
        row = measurement_row(it, -1, -1, m, m.logp)
        assert mine.loc[it.id, "response"] == row["response"]
        assert mine.loc[it.id, "p_answer"] == pytest.approx(row["p_answer"], abs=1e-4)


def test_resume_after_a_lost_part_gives_the_same_files(eval_run, tmp_path):
    import shutil

    out, args = eval_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    parts = sorted((copy / "parts").glob("*.parquet"))
    assert len(parts) == 3  # (vl, text), (vl, image), (text LM, text); the n/a pair has none
    parts[-1].unlink()
    (copy / "scores.csv").unlink()
    new_args = args[:-1] + [copy]
    assert _eval(*new_args) == 0
    for name in ("scores.csv", "table.md"):
        assert (copy / name).read_bytes() == (out / name).read_bytes(), name
    pd.testing.assert_frame_equal(pd.read_parquet(copy / "items.parquet"), pd.read_parquet(out / "items.parquet"))


def test_the_batching_record_of_each_pair_is_kept_in_its_part(text_dir, tmp_path):
    """Each pair's batching record is written into its part with its rows, so the run that assembles (under torchrun
    the last rank; a resume) names every pair however many processes computed them; a part written before parts kept
    one keeps the record run.json had for it."""
    from probe.eval import part_file
    from probe.results import part_record

    out = tmp_path / "run"
    args = ["--models", "tiny-qwen2", "--data", text_dir, REPO / "probe/zoo/data/text", "--limit", 2, "--no-generate",
            "--no-figures", "--quiet", "--out", out]
    assert _eval(*args, "--batch-size", 1) == 0
    one = {"batch_size": 1, "largest_batch": 1, "out_of_memory_cap": None, "out_of_memory_window": None}
    keys = [f"tiny-qwen2|{text_dir.name}", "tiny-qwen2|text"]
    assert json.loads((out / "run.json").read_text())["batching"] == dict.fromkeys(keys, one)
    assert part_record(part_file(out, 0, 0)) == part_record(part_file(out, 0, 1)) == one
    pd.read_parquet(part_file(out, 0, 0)).to_parquet(part_file(out, 0, 0), index=False)  # as written before
    assert part_record(part_file(out, 0, 0)) is None
    part_file(out, 0, 1).unlink()
    assert _eval(*args, "--batch-size", 4) == 0
    assert json.loads((out / "run.json").read_text())["batching"] == {keys[0]: one, keys[1]: one | {
        "batch_size": 4, "largest_batch": 2}}



def test_a_parts_record_that_is_no_record_is_passed_over_and_the_part_still_loads(text_dir, tmp_path):
    """A part whose batching metadata is not JSON (a damaged write of the key, another program's) or not a record
    (JSON other than an object: a list, a string) is read as a part without one: its rows load and score as they
    did, and run.json keeps the record the resumed run.json had for that pair, as probe.heads does with such a part
    (chunk_batching). The list was written into run.json as the pair's record."""
    import pyarrow.parquet as pq

    from probe.eval import part_file
    from probe.results import PART_RECORD

    out = tmp_path / "run"
    args = ["--models", "tiny-qwen2", "--data", text_dir, REPO / "probe/zoo/data/text", "--limit", 2, "--no-generate",
            "--no-figures", "--quiet", "--out", out]
    assert _eval(*args, "--batch-size", 1) == 0
    whole = json.loads((out / "run.json").read_text(encoding="utf-8"))["batching"]
    scores = (out / "scores.csv").read_bytes()
    for bad in (b"{not json", b"[1, 2]", b'"batch"'):
        table = pq.read_table(part_file(out, 0, 0))
        pq.write_table(table.replace_schema_metadata(dict(table.schema.metadata) | {PART_RECORD: bad}),
                       part_file(out, 0, 0))
        (out / "scores.csv").unlink()
        assert _eval(*args, "--batch-size", 4) == 0, bad
        assert json.loads((out / "run.json").read_text(encoding="utf-8"))["batching"] == whole, bad
        assert (out / "scores.csv").read_bytes() == scores, bad

@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory, text_dir, tiny_dirs) -> tuple[Path, list]:
    """Two models on two data sets, 4 items each, run uninterrupted (read-only for tests): what a run killed and
    resumed must give. Every one of its 4 pairs has a part."""
    args = ["--models", "tiny-qwen2", "tiny-qwen2-vl", "--data", text_dir, REPO / "probe/zoo/data/text", "--limit", 4,
            "--batch-size", 4, "--no-generate", "--no-figures", "--quiet"]
    out = tmp_path_factory.mktemp("two-by-two") / "run"
    assert _eval(*args, "--out", out) == 0
    return out, args


def _items_and_scores_equal(got: Path, want: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(got / "items.parquet"), pd.read_parquet(want / "items.parquet"),
                                  check_exact=True)
    assert (got / "scores.csv").read_bytes() == (want / "scores.csv").read_bytes()



def test_models_and_data_sets_in_another_order_change_only_the_order_of_rows(two_by_two, tmp_path):
    """--models B A --data Y X against A B / X Y: the same items and scores, every number to the bit (bootstrap
    intervals included: each pair's resampling must not depend on its place in the run); only the rows' order
    moves. Oracle: the uninterrupted run in the order typed."""
    base, args = two_by_two
    m, d = args.index("--models"), args.index("--data")
    flipped = [*args[:m + 1], *args[m + 1:m + 3][::-1], *args[m + 3:d + 1], *args[d + 1:d + 3][::-1], *args[d + 3:]]
    assert flipped != args and sorted(map(str, flipped)) == sorted(map(str, args))
    assert _eval(*flipped, "--out", tmp_path / "flipped") == 0
    for name, keys in (("items.parquet", ["model", "data", "item_id"]), ("scores.csv", ["model", "data", "subject"])):
        read = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
        got, want = read(tmp_path / "flipped" / name), read(base / name)
        assert not got[keys].equals(want[keys])  # the rows did come in another order
        in_order = [f.sort_values(keys, ignore_index=True) for f in (got, want)]
        pd.testing.assert_frame_equal(*in_order, check_exact=True)


def test_a_run_killed_after_its_first_pair_keeps_that_pairs_batching_record(two_by_two, tmp_path):
    """probe.eval killed by SIGKILL (the kernel's out-of-memory killer: nothing runs on the way out) once its first
    pair's part is on disk: its run.json, written as it started, names no pair, and the part alone keeps that pair's
    batching record. The resume (a real process was killed; the resume runs here) names all 4 pairs in run.json's
    batching, the killed run's pair with the record its part kept (the part not redone), the others as the
    uninterrupted run records them, and gives the uninterrupted run's items.parquet and scores.csv."""
    from probe.eval import part_file
    from probe.results import part_record

    base, args = two_by_two
    out = tmp_path / "run"
    killed_after_first_part("probe.eval", [*args, "--out", out])
    first = part_file(out, 0, 0)
    assert [p.name for p in (out / "parts").iterdir()] == [first.name]
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["batching"] == {}
    killed, written = part_record(first), first.read_bytes()
    assert _eval(*args, "--out", out) == 0
    assert first.read_bytes() == written
    want = json.loads((base / "run.json").read_text(encoding="utf-8"))["batching"]
    batching = json.loads((out / "run.json").read_text(encoding="utf-8"))["batching"]
    assert len(want) == 4 and list(batching) == list(want) and batching == want
    assert batching[next(iter(want))] == killed == {"batch_size": 4, "largest_batch": killed["largest_batch"],
                                                     "out_of_memory_cap": None, "out_of_memory_window": None}
    _items_and_scores_equal(out, base)


def test_a_run_that_backed_off_then_was_killed_keeps_its_back_off_record(two_by_two, tmp_path):
    """The killed process alone runs out of memory above one item a forward: its first pair backs off 4 → 2 → 1 and
    its part keeps that (out_of_memory_cap 1) when SIGKILL comes. The resume, with memory enough, computes the
    other 3 pairs at 4 items a batch: run.json's batching keeps the killed pair's back-off record beside the resumed
    pairs' own (no cap), and the numbers are those of a run at those sizes: the uninterrupted run with the killed
    pair computed again at --batch-size 1 (by a resume: a part copied in from a run of that pair alone is another
    run's)."""
    import shutil

    from probe.eval import part_file
    from probe.results import part_record

    base, args = two_by_two
    oracle = tmp_path / "oracle"
    shutil.copytree(base, oracle)
    for path in (part_file(oracle, 0, 0), oracle / "items.parquet", oracle / "scores.csv"):
        path.unlink()
    assert _eval(*args, "--batch-size", 1, "--out", oracle) == 0  # the last --batch-size counts
    out = tmp_path / "run"
    killed_after_first_part("probe.eval", [*args, "--out", out], setup="import pytest\n"
                            "from test_eval import _gpu_oom, _oom_above\n_oom_above(pytest.MonkeyPatch(), 1, _gpu_oom)")
    killed = part_record(part_file(out, 0, 0))
    assert killed == {"batch_size": 4, "largest_batch": 1, "out_of_memory_cap": 1, "out_of_memory_window": None}
    assert _eval(*args, "--out", out) == 0
    want = json.loads((base / "run.json").read_text(encoding="utf-8"))["batching"]
    assert len(want) == 4 and all(r["out_of_memory_cap"] is None for r in want.values())
    first = next(iter(want))
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["batching"] == want | {first: killed}
    _items_and_scores_equal(out, oracle)
    assert pd.read_parquet(part_file(out, 0, 0)).equals(pd.read_parquet(part_file(oracle, 0, 0)))



def test_ctrl_c_while_the_next_window_is_prefetched_stops_at_once_and_the_rerun_resumes(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT to a real process) while the prefetch thread prepares the second pair's window of 10 items, a
    second an item: the process ends with the one line "interrupted", exit 130, after at most the item the thread is
    on (not its whole window, nor a wait for nobody's window), the first pair's part left; the same command then
    computes the rest without redoing that part, and gives the files of an uninterrupted run that prefetches too
    (prefetching decides which items share a batch)."""
    import shutil
    import signal
    import time

    import probe.batch
    from conftest import cli_env
    from probe.eval import part_file

    sets = [tmp_path / name for name in ("a", "b")]
    for d in sets:
        shutil.copytree(REPO / "probe/zoo/data/text", d)
    args = ["--models", "tiny-qwen2", "--data", *map(str, sets), "--limit", "12", "--batch-size", "2",
            "--no-generate", "--no-figures", "--quiet"]  # windows of 2 (the first, one batch), then the other 10
    monkeypatch.setattr(probe.batch, "prefetches", lambda loaded: True)  # the GPU default, on the CPU
    assert _eval(*args, "--out", tmp_path / "whole") == 0
    out = tmp_path / "run"
    # the thread's items take a second each once the first pair's part is on disk: the second pair's window (the
    # first pair's, prepared as slowly, was 10 s of sleep that nothing measured)
    code = ("import os, sys, threading, time\nimport probe.batch\nprobe.batch.prefetches = lambda loaded: True\n"
            "real = probe.batch.prepare_item\n"
            "def slow(*a, **k):\n"
            "    if threading.current_thread() is not threading.main_thread() and "
            f"os.path.isfile({str(part_file(out, 0, 0))!r}):\n"
            "        print('preparing', flush=True)\n"
            "        time.sleep(1)\n"
            "    return real(*a, **k)\n"
            "probe.batch.prepare_item = slow\n"
            "from probe.errors import cli_main\nfrom probe.eval import main\n"
            f"sys.exit(cli_main(main, {[*args, '--out', str(out)]!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8")
    try:  # a line from the thread once the first pair's part is on disk: the second pair's window, mid-item
        while (line := proc.stdout.readline()) and not (line == "preparing\n" and part_file(out, 0, 0).is_file()):
            pass
        assert line, proc.stderr.read()[-3000:]
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err, after = proc.stderr.read(), proc.stdout.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    # items the thread began after Ctrl-C: none but the one it may have been starting (its window's other 9 would
    # print 9 more); counted, not timed, as a loaded machine stretches the exit. The time only rules out a hang.
    assert after.count("preparing") <= 1, after
    assert took < 60, took
    assert [p.name for p in (out / "parts").iterdir()] == [part_file(out, 0, 0).name]
    kept = part_file(out, 0, 0).read_bytes()
    assert _eval(*args, "--out", out) == 0
    assert part_file(out, 0, 0).read_bytes() == kept
    _items_and_scores_equal(out, tmp_path / "whole")

@pytest.mark.parametrize("error, where", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.81 "
                            "GiB of which 1.2 GiB is free."), "GPU 0 (tried to allocate 20.00 GiB)"),
    (None, "RAM (tried to allocate 37252.90 GiB)"),  # the CPU allocator's own error, raised for real
])
def test_running_out_of_memory_is_one_line_and_the_rerun_resumes(error, where, eval_run, tmp_path, capfd,
                                                                  monkeypatch):
    """A batch too large for the GPU was a 40-line CUDA traceback; now one line naming where and what to lower
    (exit 1), the pairs finished before it kept, and the same command then gives the uninterrupted run's files."""
    import probe.eval

    out, args = eval_run
    copy = tmp_path / "run"
    real, calls = probe.eval.evaluate_pair, []

    def oom_on_the_second_pair(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise error if error is not None else torch.empty(10**13)
        return real(*a, **k)

    monkeypatch.setattr(probe.eval, "evaluate_pair", oom_on_the_second_pair)
    new_args = args[:-1] + [copy]
    assert _eval(*new_args) == 1
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: out of memory in {where}; lower the batch size"), err
    assert len(list((copy / "parts").glob("*.parquet"))) == 1 and not (copy / "scores.csv").exists()
    monkeypatch.undo()
    assert _eval(*new_args) == 0
    for name in ("scores.csv", "table.md"):
        assert (copy / name).read_bytes() == (out / name).read_bytes(), name


def test_other_runtime_errors_keep_their_traceback():
    """Only memory running out is shortened: any other RuntimeError is a bug to report, with its traceback."""
    from probe.errors import cli_main

    def broken(_):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli_main(broken, [])


def test_out_of_memory_reads_each_allocators_refusal_and_nothing_else():
    """What the back-off and the one-line error take for memory running out: the CPU allocator's refusal raised for
    real (posix_memalign's words, here), its other words (Windows', mimalloc's, Android's null pointer: the same
    RuntimeError of c10/core/impl/alloc_cpu.cpp, which was a traceback and never backed off), the GPU caching
    allocator's OutOfMemoryError and Python's MemoryError, each with the size it names (GiB by the direct formula);
    a RuntimeError that only mentions memory is not one."""
    from probe.errors import out_of_memory

    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        real = exc
    assert out_of_memory(real) == f"RAM (tried to allocate {2**62 / 2**30:.2f} GiB)", real
    windows = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 3221225472 bytes.")
    assert out_of_memory(windows) == "RAM (tried to allocate 3.00 GiB)"
    assert out_of_memory(_gpu_oom()) == "GPU 0 (tried to allocate 2.00 GiB)"
    assert out_of_memory(MemoryError()) == "RAM"
    for other in (RuntimeError("shape mismatch"), RuntimeError("CUDA error: out of memory"),
                  ValueError("DefaultCPUAllocator"), RuntimeError("not enough memory for the cache")):
        assert out_of_memory(other) is None, other


def _halving(rows: list[int], size: int, fails: Callable[[list[int]], bool]):
    """``run_halving`` over ``rows`` (one planned batch) at ``size`` with a measure that runs out of GPU memory where ``fails(batch)``
    and otherwise gives each row's number (10 × row): per call, the batch measured and whether it ran; the batches
    kept with what they got; the limit; its back-off lines."""
    from types import SimpleNamespace

    from probe.batch import BatchLimit, run_halving

    calls: list[tuple[list[int], bool]] = []
    kept: list[tuple[list[int], list[int]]] = []
    lines: list[str] = []
    limit = BatchLimit(size, lines.append)

    def measure(batch: list[int]) -> list[int]:
        failing = fails(batch)  # once: a random draw
        calls.append((list(batch), not failing))
        assert len(batch) <= limit.rows  # never more rows than the cap in force
        if failing:
            raise _gpu_oom()
        return [10 * r for r in batch]

    run_halving(SimpleNamespace(device=torch.device("cpu")), [rows], limit, measure,
                lambda batch, got: kept.append((list(batch), got)))
    return calls, kept, limit, lines


@pytest.mark.parametrize("seed", range(40))
def test_halving_keeps_every_row_once_in_order_with_its_own_numbers(seed):
    """Whatever batches run out of memory (a random draw per forward of two rows or more: memory that other work
    frees and takes), every row is kept exactly once, in order, with the number of its own row (10 × row, not a
    neighbour's), from a batch that ran; each failure halves the cap to ceil(failed / 2), one line each, the cap
    never rises, and record() says the largest batch that ran and where the cap ended."""
    import random

    rng = random.Random(seed)
    rows = list(range(rng.randint(1, 40)))
    size = rng.randint(1, 12)
    calls, kept, limit, lines = _halving(rows, size, lambda batch: len(batch) > 1 and rng.random() < 0.4)
    assert [r for batch, _ in kept for r in batch] == rows
    assert all(got == [10 * r for r in batch] for batch, got in kept)
    assert [batch for batch, ok in calls if ok] == [batch for batch, _ in kept]
    failed = [len(batch) for batch, ok in calls if not ok]
    caps = [int(m) for m in re.findall(r"batches of at most (\d+) for", "\n".join(lines))]
    assert len(lines) == len(failed) and caps == [(n + 1) // 2 for n in failed]
    assert caps == sorted(caps, reverse=True) and limit.rows == (caps[-1] if caps else size)
    assert limit.record() == {"batch_size": size, "largest_batch": max(len(b) for b, _ in kept),
                              "out_of_memory_cap": caps[-1] if caps else None}


@pytest.mark.parametrize("n, size, fits", [(17, 8, 3), (9, 7, 2), (5, 5, 5), (12, 4, 1)])
def test_halving_with_a_fixed_memory_ends_at_the_first_halving_that_fits(n, size, fits):
    """Memory for ``fits`` rows: the first batch halves (ceil) until it fits, once per halving, and no batch after it
    runs out again; every batch that ran holds at most that many rows."""
    calls, kept, limit, lines = _halving(list(range(n)), size, lambda batch: len(batch) > fits)
    want, cap = [], size
    while cap > fits:  # the direct formula: the sizes that failed, each halved
        want.append(cap)
        cap = (cap + 1) // 2
    assert [len(batch) for batch, ok in calls if not ok] == want and len(lines) == len(want)
    assert limit.rows == cap and all(len(batch) <= cap for batch, _ in kept)
    assert [r for batch, _ in kept for r in batch] == list(range(n))


def test_halving_stops_at_one_row_at_other_errors_and_at_errors_of_keep():
    """Out of memory with one row, any other error, and an error keep raises (a guard's own forward, out of memory
    too) end the run where they happen: nothing is retried and the limit is as it was."""
    from types import SimpleNamespace

    from probe.batch import BatchLimit, run_halving

    cpu = SimpleNamespace(device=torch.device("cpu"))
    with pytest.raises(torch.OutOfMemoryError):
        _halving([0, 1, 2], 4, lambda batch: True)
    tried: list[int] = []

    def broken(batch):
        tried.append(len(batch))
        raise RuntimeError("shape mismatch")

    limit = BatchLimit(4, lambda line: pytest.fail(line))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_halving(cpu, [[0, 1, 2, 3, 4]], limit, broken, lambda batch, got: None)
    assert tried == [4] and limit.rows == 4
    measured: list[int] = []

    def keep(batch, got):
        raise _gpu_oom()

    with pytest.raises(torch.OutOfMemoryError):
        run_halving(cpu, [[0, 1, 2, 3]], limit, lambda batch: measured.append(len(batch)), keep)
    assert measured == [4] and limit.rows == 4


def _oom_above(monkeypatch, k: int, error: Callable[[], BaseException]) -> list[bool]:
    """Every model probe.eval loads raises ``error()`` in any forward of more than ``k`` rows, as a GPU out of memory
    does (inside ``generate``, with the batch's tensors in its frames). Returned: per forward after a failure,
    whether every tensor handed to a failed forward had been freed by then."""
    import weakref

    import probe.models

    load, failed, freed = probe.models.load_model, [], []

    def hook(module, args, kwargs):
        x = kwargs.get("input_ids")
        x = x if x is not None else kwargs["inputs_embeds"]
        if failed:
            freed.append(all(ref() is None for ref in failed))
        if x.shape[0] > k:
            failed.append(weakref.ref(x))
            raise error()

    def loading(*a, **kw):
        loaded = load(*a, **kw)
        loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
        return loaded

    monkeypatch.setattr(probe.models, "load_model", loading)
    return freed


def _gpu_oom() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                  "79.19 GiB of which 1.06 GiB is free.")


def _ram_oom() -> BaseException:  # the CPU allocator's own words
    return RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                        "tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("k, error, where", [(2, _gpu_oom, "GPU 0 (tried to allocate 2.00 GiB)"),
                                             (3, _ram_oom, "RAM (tried to allocate 2.00 GiB)")])
def test_a_batch_that_runs_out_of_memory_is_halved_and_gives_the_numbers_of_the_smaller_batch_size(
        k, error, where, text_dir, tmp_path, capfd, monkeypatch):
    """A forward of more than k rows runs out of memory: the batch is halved (and halved again) until it runs, the
    rest of the (model, data set) runs at that size, one line says so for each halving, and the files are those of
    a run at --batch-size k (the oracle: same predictions and texts, p within 1e-6). Nothing of the failed batch is
    held when the smaller one runs (its memory is really free), and run.json records the sizes."""
    from probe.eval import ITEM_COLUMNS

    args = ["--models", "tiny-qwen2", "--data", text_dir, "--max-new-tokens", "2", "--seed", "3"]
    assert _eval(*args, "--batch-size", k, "--quiet", "--out", tmp_path / "k") == 0
    freed = _oom_above(monkeypatch, k, error)
    capfd.readouterr()
    assert _eval(*args, "--batch-size", 8, "--out", tmp_path / "oom") == 0
    err = capfd.readouterr().err
    steps = [(int(n), int(h)) for where_, n, h in re.findall(
        r"out of memory in (.*?) on a batch of (\d+) items: batches of at most (\d+) for the rest of this model and "
        r"data set\n", err) if where_ == where]
    assert steps and steps[-1][1] == k, err  # it backed off (a batch over k was planned), down to k
    assert all(h == (n + 1) // 2 for n, h in steps) and all(b[0] <= a[1] for a, b in zip(steps, steps[1:])), steps
    assert freed and all(freed), freed
    got, want = pd.read_parquet(tmp_path / "oom" / "items.parquet"), pd.read_parquet(tmp_path / "k" / "items.parquet")
    exact = [c for c in ITEM_COLUMNS if c != "p_answer"]
    pd.testing.assert_frame_equal(got[exact], want[exact])
    np.testing.assert_allclose(got["p_answer"], want["p_answer"], rtol=0, atol=1e-6)
    scores = [pd.read_csv(tmp_path / run / "scores.csv") for run in ("oom", "k")]
    pd.testing.assert_frame_equal(*scores, check_exact=False, rtol=0, atol=1e-6)
    (pair,) = json.loads((tmp_path / "oom" / "run.json").read_text())["batching"].items()
    assert pair == (f"tiny-qwen2|{text_dir.name}", {"batch_size": 8, "largest_batch": k, "out_of_memory_cap": k,
                                                    "out_of_memory_window": None})
    (pair,) = json.loads((tmp_path / "k" / "run.json").read_text())["batching"].values()
    assert pair == {"batch_size": k, "largest_batch": k, "out_of_memory_cap": None, "out_of_memory_window": None}


@pytest.mark.parametrize("quiet", [False, True])
def test_out_of_memory_at_one_item_is_still_one_line_and_writes_nothing(quiet, text_dir, tmp_path, capfd, monkeypatch):
    """Every forward runs out of memory (k = 0): halving ends at one item, where the run stops as before, exit 1 with
    one line saying what to lower, no part and no results written; --quiet leaves out the halving lines."""
    _oom_above(monkeypatch, 0, _gpu_oom)
    out = tmp_path / "run"
    capfd.readouterr()
    assert _eval("--models", "tiny-qwen2", "--data", text_dir, "--max-new-tokens", "2", "--batch-size", 4,
                 *(["--quiet"] if quiet else []), "--out", out) == 1
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("error: out of memory in GPU 0 (tried to allocate 2.00 GiB); lower "
                                                   "the batch size"), err
    halvings = re.findall(r"on a batch of (\d+) items: batches of at most (\d+)", err)
    assert halvings == ([] if quiet else [("4", "2"), ("2", "1")]), err
    assert not list((out / "parts").glob("*")) and not (out / "items.parquet").exists()
    assert not (out / "scores.csv").exists()


@pytest.mark.parametrize("quiet", [False, True])
def test_running_out_of_memory_preparing_inputs_gives_the_files_of_the_smaller_window(quiet, text_dir, tmp_path, capfd,
                                                                                       monkeypatch):
    """Out of memory preparing a window of more than 5 items (its inputs go to the device) backs off as a batch does:
    exit 0, one line a halving (none with --quiet), run.json's record names the window the pair finished at, and
    items.parquet and scores.csv are those of a run whose windows held that many items from the start."""
    from probe import batch

    args = ["--models", "tiny-qwen2", "--data", text_dir, "--batch-size", 2, "--max-new-tokens", "2", "--seed", "3",
            *(["--quiet"] if quiet else [])]
    with monkeypatch.context() as m:
        m.setattr(batch, "WINDOW_ITEMS", 4)  # the window the back-off ends at (the set's 8 items in one: 8 → 4)
        assert _eval(*args, "--out", tmp_path / "four") == 0
    sizes, freed = _oom_preparing_above(monkeypatch, 5, _gpu_oom)
    capfd.readouterr()
    assert _eval(*args, "--out", tmp_path / "oom") == 0
    err = capfd.readouterr().err
    halvings = [(int(n), int(h)) for n, h in re.findall(
        r"out of memory in GPU 0 \(tried to allocate 2\.00 GiB\) preparing a window of (\d+) items: windows of at most "
        r"(\d+) for the rest of this model and data set\n", err)]
    assert sizes == [8, 4, 4] and halvings == ([] if quiet else [(8, 4)]), (sizes, err)
    assert freed and all(freed), freed
    (pair,) = json.loads((tmp_path / "oom" / "run.json").read_text())["batching"].values()
    assert pair == {"batch_size": 2, "largest_batch": 2, "out_of_memory_cap": None, "out_of_memory_window": 4}
    (pair,) = json.loads((tmp_path / "four" / "run.json").read_text())["batching"].values()
    assert pair["out_of_memory_window"] is None
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "oom" / "items.parquet"),
                                  pd.read_parquet(tmp_path / "four" / "items.parquet"))
    assert (tmp_path / "oom" / "scores.csv").read_bytes() == (tmp_path / "four" / "scores.csv").read_bytes()


def test_out_of_memory_preparing_one_item_is_still_one_line_and_writes_nothing(text_dir, tmp_path, capfd,
                                                                               monkeypatch):
    """Preparing even one item runs out of memory (k = 0): the windows halve down to one item, where the run stops,
    exit 1 with one line saying what to lower, nothing written."""
    sizes, _ = _oom_preparing_above(monkeypatch, 0, _ram_oom)
    out = tmp_path / "run"
    capfd.readouterr()
    assert _eval("--models", "tiny-qwen2", "--data", text_dir, "--max-new-tokens", "2", "--batch-size", 4, "--out",
                 out) == 1
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("error: out of memory in RAM (tried to allocate 2.00 GiB); lower "
                                                   "the batch size"), err
    assert sizes == [8, 4, 2, 1], sizes
    assert re.findall(r"preparing a window of (\d+) items: windows of at most (\d+)", err) == [
        ("8", "4"), ("4", "2"), ("2", "1")], err
    assert not list((out / "parts").glob("*")) and not (out / "items.parquet").exists()
    assert not (out / "scores.csv").exists()


def test_the_gpu_out_of_memory_tests_prompts_are_equally_long_and_differ(load_tiny):
    """What tests/test_gpu.py's real out-of-memory tests (run on a GPU only) build on, checked where no GPU is:
    ``_long_items`` gives prompts of one length on probe.tiny's tokenizer (every batch of a size then takes the same
    memory, and a halved run's batches are those of a run at the half) with different tokens (a row given another
    item's numbers would show), as long as LONG_PROMPT_WORDS says (a row's attention scores grow with its square)."""
    from test_gpu import _long_items

    from probe.sweep import SweepConfig, prepare_item

    loaded = load_tiny("qwen2")
    ids = [prepare_item(loaded, it, SweepConfig())[0]["input_ids"][0] for it in _long_items(16)]
    assert {len(x) for x in ids} == {1968}
    assert len({tuple(x.tolist()) for x in ids}) == 16


def test_the_gpu_out_of_memory_tests_limit_lies_halfway_between_what_fits_and_what_does_not():
    """tests/test_gpu.py's memory limit: halfway between the peak the smaller batch reserved and the peak the larger
    one allocated, and a failed test, not a limit, when the larger batch allocated no more than the smaller reserved
    (no limit would let one through and stop the other)."""
    from test_gpu import Peak, _limit_between

    assert _limit_between(Peak(100, 600, 700), Peak(100, 1_100, 1_150)) == 900
    for larger in (Peak(100, 700, 800), Peak(100, 650, 900)):
        with pytest.raises(pytest.fail.Exception, match="no memory limit separates the two batch sizes"):
            _limit_between(Peak(100, 600, 700), larger)


def test_the_default_batch_size_is_32_on_a_cpu_and_256_on_an_accelerator(text_dir, tmp_path, monkeypatch):
    """--batch-size left out: 32 items a forward on a CPU (as before), 256 where the model runs on a GPU (DESIGN §8:
    hundreds a forward), as run.json records; a given size is taken on either. The accelerator is faked: only the
    model's device type decides."""
    from types import SimpleNamespace

    import probe.batch
    from probe.eval import DataSet, build_parser, evaluate_pair
    from probe.sweep import SweepConfig

    assert _eval("--models", "tiny-qwen2", "--data", text_dir, "--limit", 2, "--no-generate", "--quiet", "--out",
                 tmp_path / "run") == 0
    (pair,) = json.loads((tmp_path / "run" / "run.json").read_text())["batching"].values()
    assert pair == {"batch_size": 32, "largest_batch": 2, "out_of_memory_cap": None, "out_of_memory_window": None}
    asked = []
    monkeypatch.setattr(probe.batch, "evaluate_items", lambda loaded, items, cfg, limit, **k: asked.append(limit.size)
                        or [])
    ds = DataSet("d", "d", "d", "", 0, 0, [])
    for device, given, want in (("cpu", None, 32), ("cuda", None, 256), ("mps", None, 256), ("cuda", 8, 8),
                                ("cpu", 64, 64)):
        loaded = SimpleNamespace(device=torch.device(device))
        _, record = evaluate_pair(loaded, "m", ds, [], SweepConfig(), given, SimpleNamespace(update=print))
        assert asked[-1] == record["batch_size"] == want, device
    assert "default: 32 on a CPU, 256 on a GPU" in " ".join(build_parser().format_help().split())


def test_a_resume_under_other_library_versions_is_refused(eval_run, tmp_path, capfd):
    """As in probe.heads: parts computed under another transformers are not mixed with this process's (exit 0 with
    two versions' numbers in one table); a resume with nothing to compute keeps the parts' versions on record."""
    import shutil

    out, args = eval_run
    copy = shutil.copytree(out, tmp_path / "run")
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps(info | {"versions": info["versions"] | {"transformers": "0.0.1-old"}}))
    new_args = [*args[:-1], copy, "--no-figures"]
    assert _eval(*new_args) == 0
    assert json.loads((copy / "run.json").read_text())["versions"]["transformers"] == "0.0.1-old"
    sorted((copy / "parts").glob("*.parquet"))[-1].unlink()
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name != ".lock"}
    capfd.readouterr()
    assert _eval(*new_args) == 2
    err = capfd.readouterr().err.strip()
    assert "\n" not in err and "computed under transformers 0.0.1-old, but this process runs transformers" in err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_out_is_a_model_dir_is_refused(tiny_dirs, text_dir, tmp_path, capfd):
    """--out naming one of the models' own dirs wrote the results among its files, changing its fingerprint."""
    import shutil

    model = shutil.copytree(tiny_dirs["qwen2"], tmp_path / "model")
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    capfd.readouterr()
    assert _eval("--models", "tiny-qwen2", model, "--data", text_dir, "--limit", "1", "--quiet", "--out", model,
                 "--overwrite") == 2
    err = capfd.readouterr().err.strip()
    assert "\n" not in err and f"is the directory of model {model}" in err, err
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


def test_a_damaged_part_is_named_before_a_resume_runs_anything(eval_run, tmp_path, capfd):
    """A kept part that cannot be read used to be found only after the missing parts were recomputed (and after
    the placement line): now the resume reads what it keeps first, and one line names it."""
    import shutil

    out, args = eval_run
    copy = shutil.copytree(out, tmp_path / "run")
    parts = sorted((copy / "parts").glob("*.parquet"))
    parts[-1].unlink()  # one part to recompute ...
    parts[0].write_bytes(b"PAR1 not really")  # ... and one kept part damaged
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    capfd.readouterr()
    assert _eval(*args[:-1], copy) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(parts[0]) in err and "unreadable" in err, err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before  # nothing recomputed or written


def _damaged_part(edit: Callable[[pd.DataFrame], pd.DataFrame], eval_run, tmp_path, capfd) -> str:
    """The eval run copied with its first kept part rewritten by ``edit`` and scores.csv gone, resumed: exit 2,
    nothing written; the one error line (checked to name the part)."""
    import shutil

    out, args = eval_run
    copy = shutil.copytree(out, tmp_path / "run")
    part = sorted((copy / "parts").glob("*.parquet"))[0]
    (copy / "scores.csv").unlink()
    edit(pd.read_parquet(part)).to_parquet(part)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    capfd.readouterr()
    assert _eval(*args[:-1], copy) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(part) in err and "delete it" in err, err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    return err


@pytest.mark.parametrize("edit", [lambda df: df.iloc[1:], lambda df: df.assign(model="someone-else")],
                         ids=["a row dropped", "another model's rows"])
def test_a_kept_part_of_other_rows_is_named_not_scored(edit, eval_run, tmp_path, capfd):
    """A readable part whose rows are not the pair's items (one of another run with a shorter --limit copied in, an
    edited file) was scored as this run's: n_items 5 of 6 and the accuracy of those rows, exit 0. Its name is the
    one line now, and nothing is written."""
    err = _damaged_part(edit, eval_run, tmp_path, capfd)
    assert "(first missing row: model " in err, err  # which row, not only that some differ


def _p_answer_above_1(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[df.index[0], "p_answer"] = 3.0
    return df


@pytest.mark.parametrize("edit,needles", [
    # str (pandas 3) or object (pandas 2) values
    (lambda df: df.assign(correct=df["correct"].map(lambda v: "yes" if v == 1 else "no")),
     ["column correct holds", "not the floats a run writes there"]),
    (lambda df: df.assign(p_answer=df["p_answer"].astype("int64")),
     ["column p_answer holds int64 values, not the floats"]),
    (lambda df: df.assign(model=0), ["column model holds int64 values, not the text"]),
    (_p_answer_above_1, ["column p_answer must lie in [0, 1]; row 1 has 3"]),
], ids=["correct as text", "p_answer as whole numbers", "model as a number", "p_answer above 1"])
def test_a_kept_part_whose_columns_were_retyped_is_named_not_scored(edit, needles, eval_run, tmp_path, capfd):
    """A part rewritten by hand with a column of another type: ``correct`` as text ended the resume in a pandas
    traceback at the summary, ``p_answer`` as whole numbers (0.73 → 0) was summarised as measured, exit 0. One line
    names the part and the column now, and nothing is written."""
    err = _damaged_part(edit, eval_run, tmp_path, capfd)
    assert all(n in err for n in needles), err


def test_check_part_rows_compares_row_counts_not_only_the_set_of_rows(tmp_path):
    """probe.results.check_part_rows against a Counter of the key rows written out here: the same rows in another
    order pass; a part holding one row twice and another once where the plan wants the reverse (the same *set* of
    rows) is refused naming the row it is short of; rows beyond the plan are named by the first surplus one, not the
    first row of the part."""
    from probe.errors import BadInput
    from probe.results import PART_FIX, check_part_rows

    part = tmp_path / "part-0000.parquet"
    key = ["model", "item_id"]

    def frame(rows):
        return pd.DataFrame(rows, columns=key)

    check_part_rows(part, frame([("m", "b"), ("m", "a")]), key, [("m", "a"), ("m", "b")], "items")
    with pytest.raises(BadInput) as exc:
        check_part_rows(part, frame([("m", "a"), ("m", "a"), ("m", "b")]), key,
                        [("m", "a"), ("m", "b"), ("m", "b")], "items")
    assert str(exc.value) == (f"{part} holds 3 rows that are not this run's 3 items (first missing row: model m, "
                              f"item_id b); {PART_FIX}")
    with pytest.raises(BadInput) as exc:
        check_part_rows(part, frame([("m", "a"), ("m", "b"), ("m", "c")]), key, [("m", "a"), ("m", "b")], "items")
    assert str(exc.value) == (f"{part} holds 3 rows that are not this run's 2 items (first extra row: model m, "
                              f"item_id c); {PART_FIX}")


def _part_row(**kw: Any) -> dict[str, Any]:
    """One row of a probe.heads part as probe.sweep.measurement_row writes it (text, whole numbers, floats)."""
    return {"model": "m", "data": "d", "item_id": "i0", "subject": "s", "answer": "A", "pred": "A", "prob_pred": "A",
            "response": "A", "layer": 0, "head": 1, "correct": 1.0, "prob_correct": 1.0, "p_answer": 0.5,
            "kl": 0.25} | kw


@pytest.mark.parametrize("rows,message", [
    ([_part_row(), _part_row(correct=float("nan"), kl=-5e-7)], None),  # no generation: correct empty; kl ≥ −1e-6
    ([_part_row(), _part_row(subject=None)], "column subject holds"),
    ([_part_row(layer=0.0), _part_row(layer=1.5)], "column layer holds float64 values, not the whole numbers"),
    ([_part_row(), _part_row(), _part_row(p_answer=-0.25)], "column p_answer must lie in [0, 1]; row 3 has -0.25"),
    ([_part_row(), _part_row(prob_correct=float("nan"))], "column prob_correct must lie in [0, 1]; row 2 has nan"),
    ([_part_row(correct=2.0)], "column correct must lie in [0, 1] or be empty; row 1 has 2"),
    ([_part_row(kl=-2e-6)], "column kl must lie in [-1e-06, inf]; row 1 has -2e-06"),
], ids=["as written", "text missing", "layer as floats", "p_answer below 0", "prob_correct empty", "correct 2",
        "kl below -1e-6"])
def test_check_part_columns_takes_what_a_run_writes_and_names_anything_else(rows, message, tmp_path):
    """probe.results.check_part_columns on hand-built parts: the bounds of each float column as the runs can write
    them (``correct`` NaN without generation, a KL a rounding below 0), and the row named counted from 1."""
    from probe.errors import BadInput
    from probe.results import check_part_columns
    from probe.results import COLUMNS

    part = tmp_path / "part-0000.parquet"
    df = pd.DataFrame(rows)
    assert set(COLUMNS) <= set(df.columns)
    if message is None:
        check_part_columns(part, df, df.columns)
        return
    with pytest.raises(BadInput) as exc:
        check_part_columns(part, df, df.columns)
    assert str(exc.value).startswith(f"{part}: {message}"), str(exc.value)
    assert str(exc.value).endswith("an edited or foreign part; delete it and rerun the same command to recompute it)")


def test_read_parts_takes_kept_frames_as_given_and_reads_and_checks_only_the_others(tmp_path):
    """probe.results.read_parts(out, chunks, check, kept): the frames of ``kept`` (a resume's, read and checked at
    its start) are used as they are, without reading their files again; every other chunk is read from its part and
    handed to ``check`` once; the rows come back in the order of ``chunks``. The oracle: hand-built parts and a kept
    frame that differs from its file (so which one was used shows)."""
    from probe.results import atomic_write_parquet, part_path, read_parts
    from probe.results import COLUMNS

    out = tmp_path / "run"
    (out / "parts").mkdir(parents=True)
    frames = {c: pd.DataFrame([_part_row(item_id=f"i{c}", layer=c)])[COLUMNS] for c in range(3)}
    for c, df in frames.items():
        atomic_write_parquet(part_path(out, c), df)
    kept = {1: frames[1].assign(item_id="kept")}
    checked = []
    got = read_parts(out, [2, 0, 1], check=lambda c, df: checked.append((c, df["item_id"].tolist())), kept=kept)
    assert got["item_id"].tolist() == ["i2", "i0", "kept"] and got["layer"].tolist() == [2, 0, 1]
    assert list(got.columns) == COLUMNS
    assert sorted(checked) == [(0, ["i0"]), (2, ["i2"])]
    part_path(out, 1).unlink()  # a kept part's file is not read again
    assert read_parts(out, [1], kept=kept)["item_id"].tolist() == ["kept"]


def test_a_model_under_another_name_gets_the_same_intervals(eval_run, tmp_path, tiny_dirs, text_dir):
    """Intervals depend on a model's answers, not on its name: the text LM copied to another directory and
    evaluated alone gives tiny-qwen2's rows of the two-model run, intervals and paired differences included."""
    import shutil

    out, _ = eval_run
    copy = tmp_path / "somewhere" / "else"
    shutil.copytree(tiny_dirs["qwen2"], copy)
    assert _eval("--models", copy, "tiny-qwen2-vl", "--data", text_dir, "--reference", "tiny-qwen2-vl",
                 "--batch-size", "4", "--max-new-tokens", "3", "--quiet", "--out", tmp_path / "run") == 0
    cols = ["subject", "n_items", "accuracy", "accuracy_lo", "accuracy_hi", "prob_accuracy_lo", "prob_accuracy_hi",
            "diff_accuracy", "diff_lo", "diff_hi"]
    text = Path(text_dir).name
    want, got = pd.read_csv(out / "scores.csv"), pd.read_csv(tmp_path / "run" / "scores.csv")
    want = want[(want["model"] == "tiny-qwen2") & (want["data"] == text)][cols]
    got = got[(got["model"] != "tiny-qwen2-vl") & (got["data"] == text)][cols]
    assert len(want) > 1
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))


def test_a_set_labelled_longer_beside_a_namesake_gets_the_same_intervals(eval_run, tmp_path, text_dir):
    """A set is labelled by a longer tail when another --data has the same folder name, but its intervals are
    seeded by its folder name: the same numbers as in a run without the namesake (they used to move)."""
    import shutil

    out, _ = eval_run
    text = Path(text_dir).name
    namesake = shutil.copytree(text_dir, tmp_path / "other" / text)
    assert _eval("--models", "tiny-qwen2", "--data", text_dir, namesake, "--batch-size", "4", "--max-new-tokens",
                 "3", "--quiet", "--out", tmp_path / "run") == 0
    got = pd.read_csv(tmp_path / "run" / "scores.csv")
    label = got["data"][~got["data"].str.startswith("other/")].iloc[0]
    assert label != text and label.endswith(f"/{text}")  # the label did change ...
    cols = ["subject", "n_items", "accuracy_lo", "accuracy_hi", "prob_accuracy_lo", "prob_accuracy_hi",
            "p_answer_lo", "p_answer_hi"]
    want = pd.read_csv(out / "scores.csv")
    want = want[(want["model"] == "tiny-qwen2") & (want["data"] == text)][cols].reset_index(drop=True)
    got = got[got["data"] == label][cols].reset_index(drop=True)
    assert len(want) > 1 and (want["p_answer_hi"] > want["p_answer_lo"]).all()  # ... the intervals did not
    pd.testing.assert_frame_equal(got, want)


def test_a_resume_naming_the_data_sets_another_way_continues_and_another_set_is_refused(eval_run, tmp_path, text_dir,
                                                                                         data_dir, monkeypatch, capfd):
    """The same --data folders typed relative (./x/ from elsewhere) where the run had their absolute paths were
    refused as a different run ("data differ"): the fingerprint held each set's path as typed. A copy of a set
    elsewhere, the same items under the same name, is still another folder, and refused."""
    import os
    import shutil

    src, args = eval_run
    out = shutil.copytree(src, tmp_path / "run")
    next((out / "parts").glob("*.parquet")).unlink()  # a killed run, to be resumed
    monkeypatch.chdir(Path(text_dir).parent)
    spelt = {str(d): f"./{os.path.relpath(d)}/" for d in (text_dir, data_dir)}
    again = [spelt.get(str(a), a) for a in args[:-1]] + [out]
    assert _eval(*again) == 0
    assert (out / "scores.csv").read_bytes() == (src / "scores.csv").read_bytes()
    copy = shutil.copytree(text_dir, tmp_path / "copy" / Path(text_dir).name)
    capfd.readouterr()
    assert _eval(*[copy if str(a) == str(text_dir) else a for a in args[:-1]], out) == 2
    assert capfd.readouterr().err.strip() == (f"error: --out {out} holds a different run (data differ); use another "
                                              "--out or --overwrite")


def test_a_resume_naming_the_models_another_way_continues_and_labels_them_as_now(tiny_dirs, text_dir, tmp_path,
                                                                                  monkeypatch, capfd):
    """A model's name labels rows and decides no number (its intervals are its data set's streams), but the
    fingerprint held each name as typed: a killed run of ``tiny-qwen2`` resumed as its directory, of ``DIR`` as
    ``DIR/``, or typed relative from another working dir where it had been absolute, was refused as "a different
    run (chat_formats, models differ)". It now resumes, and its outputs are those of an uninterrupted run typed the
    new way (the oracle: that run, byte for byte); another model, or the models in another order (the parts are
    per place), is still refused."""
    import os
    import shutil

    vl = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "models" / "vl")
    common = ["--data", text_dir, "--limit", "3", "--no-generate", "--no-figures", "--quiet"]
    first = ["--models", "tiny-qwen2", vl, "--reference", "tiny-qwen2"]
    monkeypatch.chdir(tmp_path / "models")
    again = ["--models", f"{tiny_dirs['qwen2']}/", "./vl", "--reference", f"{tiny_dirs['qwen2']}/"]
    assert _eval(*first, *common, "--out", tmp_path / "killed") == 0
    (tmp_path / "killed" / "parts" / "model001_data000.parquet").unlink()  # killed before its second pair
    (tmp_path / "killed" / "scores.csv").unlink()
    assert _eval(*again, *common, "--out", tmp_path / "whole") == 0
    capfd.readouterr()
    assert _eval(*again, *common, "--out", tmp_path / "killed") == 0, capfd.readouterr().err
    _items_and_scores_equal(tmp_path / "killed", tmp_path / "whole")
    assert set(pd.read_csv(tmp_path / "killed" / "scores.csv")["model"]) == {f"{tiny_dirs['qwen2']}/", "./vl"}
    other = shutil.copytree(vl, tmp_path / "models" / "vl2")
    for models in ([tiny_dirs["qwen2"], other], [vl, tiny_dirs["qwen2"]]):
        capfd.readouterr()
        assert _eval("--models", *models, "--reference", tiny_dirs["qwen2"], *common, "--out",
                     tmp_path / "killed") == 2
        assert "holds a different run (" in capfd.readouterr().err
    # the refusal names what differs in the run's identity, not the spelling: it said "chat_formats, models,
    # reference, seed differ" of the first spelling with another --seed
    capfd.readouterr()
    assert _eval(*first, *common, "--seed", "7", "--out", tmp_path / "killed") == 2
    assert capfd.readouterr().err.strip() == (f"error: --out {tmp_path / 'killed'} holds a different run (seed "
                                              "differ); use another --out or --overwrite")
    assert os.getcwd() == str(tmp_path / "models")


def test_a_set_given_as_dot_is_named_and_resampled_as_its_folder(eval_run, tmp_path, text_dir, monkeypatch):
    """`--data .` from inside the set's folder is that folder: labelled by its name and given its intervals (it
    used to be labelled '.', and its bootstrap stream keyed by '.' gave other intervals than `--data text`)."""
    out, _ = eval_run
    text = Path(text_dir).name
    monkeypatch.chdir(text_dir)
    assert _eval("--models", "tiny-qwen2", "--data", ".", "--batch-size", "4", "--max-new-tokens", "3", "--quiet",
                 "--out", tmp_path / "run") == 0
    got = pd.read_csv(tmp_path / "run" / "scores.csv")
    assert set(got["data"]) == {text}
    cols = ["subject", "n_items", "accuracy_lo", "accuracy_hi", "prob_accuracy_lo", "prob_accuracy_hi",
            "p_answer_lo", "p_answer_hi"]
    want = pd.read_csv(out / "scores.csv")
    want = want[(want["model"] == "tiny-qwen2") & (want["data"] == text)][cols].reset_index(drop=True)
    assert len(want) > 1 and (want["p_answer_hi"] > want["p_answer_lo"]).all()
    pd.testing.assert_frame_equal(got[cols].reset_index(drop=True), want)


def test_the_hub_alias_typed_in_capitals_is_the_same_set(text_dir, tiny_dirs, tmp_path, monkeypatch, capfd):
    """``mmmu`` is the hub set in any case (``MMMU`` too), but its label, bootstrap stream and identity took the
    spelling as typed: ``--data MMMU`` got other intervals than ``--data mmmu`` for the same items, a resume typed
    the other way was refused, and ``--data mmmu MMMU`` evaluated the set twice. Oracle: the plan of ``--data mmmu``
    (the hub stood in for by the text set)."""
    import probe.hub
    from figures.results import EvalRun
    from probe.eval import build_parser, make_plan

    monkeypatch.setattr(probe.hub, "hub_snapshot", lambda *a, **k: Path(text_dir))
    out = tmp_path / "out"
    args = ["--models", "tiny-qwen2", "--limit", "2", "--no-generate", "--no-figures", "--quiet", "--out", out]
    want = make_plan(build_parser().parse_args([*map(str, args), "--data", "mmmu"]))[0]
    assert _eval(*args, "--data", "MMMU") == 0
    run = EvalRun.read(out)
    assert run.info["fingerprint"] == want.fingerprint()
    assert set(run.scores["data"]) == {"mmmu"} and [d["name"] for d in run.info["plan"]["data"]] == ["mmmu"]
    assert run.row("tiny-qwen2", "MMMU")["n_items"] == 2  # asked as typed, as analyses.replicate does
    capfd.readouterr()
    assert _eval("--models", "tiny-qwen2", "--data", "mmmu", "MMMU", "--quiet", "--out", tmp_path / "two") == 2
    assert capfd.readouterr().err.strip() == "error: data set 'mmmu' given twice"
    assert not (tmp_path / "two").exists()


def test_a_model_changed_in_place_or_other_scoring_is_another_run(tiny_dirs, text_dir, tmp_path, capfd):
    """The weights of every model are part of the run's identity (a model re-merged at the same path used to
    resume with the old model's parts, exit 0), and so are --seed and --reference, which decide scores.csv (they
    used to replace it silently)."""
    import shutil

    model = shutil.copytree(tiny_dirs["qwen2"], tmp_path / "model")
    args = ["--models", model, "--data", text_dir, "--limit", "4", "--no-generate", "--no-figures", "--quiet",
            "--out", tmp_path / "run"]
    assert _eval(*args) == 0
    for extra, what in ((["--seed", "7"], "seed"), (["--reference", str(model)], "reference")):
        capfd.readouterr()
        assert _eval(*args, *extra) == 2
        assert f"holds a different run ({what} differ)" in capfd.readouterr().err
    change_weights_in_place(model, "layers.0.mlp.up_proj.weight")
    capfd.readouterr()
    assert _eval(*args) == 2
    assert "holds a different run (models differ)" in capfd.readouterr().err


def flip_last_byte_keeping_mtime(f: Path) -> None:
    """One byte of ``f`` changed (its last: a tensor's data in a safetensors file), its size and mtime as they were:
    a change only its bytes tell."""
    st = f.stat()
    with open(f, "r+b") as h:
        h.seek(-1, os.SEEK_END)
        last = h.read(1)
        h.seek(-1, os.SEEK_END)
        h.write(bytes([last[0] ^ 0x01]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_finished_rerun_loads_no_model_and_a_one_byte_change_is_still_another_run(tiny_dirs, text_dir, tmp_path,
                                                                                    capfd, monkeypatch):
    """A rerun of a finished evaluation scores nothing, so it loads no model and makes none of a load's checks
    (``preflight``'s meta build, ``check_fits``): spies on them refuse any call. The run's identity stays as
    strict: a copied model touched (mtime only) is the same weights and stays finished; one byte of its weights
    changed (size and mtime kept) is another run, refused."""
    import shutil

    import probe.models

    model = shutil.copytree(tiny_dirs["qwen2"], tmp_path / "model")
    args = ["--models", model, "--data", text_dir, "--limit", "2", "--no-generate", "--no-figures", "--quiet",
            "--out", tmp_path / "run"]
    assert _eval(*args) == 0
    calls: list[str] = []

    def spy(name: str) -> Any:
        def called(*a: Any, **k: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called on a finished rerun")
        return called

    for name in ("load_model", "preflight", "check_fits", "_from_pretrained"):
        monkeypatch.setattr(probe.models, name, spy(name))
    scores = (tmp_path / "run" / "scores.csv").read_bytes()
    os.utime(model / "model.safetensors")  # touched: the same bytes
    capfd.readouterr()
    assert _eval(*args) == 0, capfd.readouterr().err
    assert calls == [] and (tmp_path / "run" / "scores.csv").read_bytes() == scores
    monkeypatch.undo()  # a changed model is checked as a new run's is (preflight), then refused
    flip_last_byte_keeping_mtime(model / "model.safetensors")
    capfd.readouterr()
    assert _eval(*args) == 2
    err = capfd.readouterr().err.strip()
    assert "holds a different run (models differ)" in err and "\n" not in err, err


def _files(out: Path) -> dict[Path, bytes]:
    """Every file of a run dir and its bytes (its lock file aside): what a refusal must leave as it was."""
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}


def test_a_resume_in_another_chat_format_is_refused(text_dir, tmp_path, capfd, monkeypatch):
    """The chat format a model is prompted in is chosen by its tokenizer (the llama row falls back to Vicuna's where
    the vocabulary lacks ChatML's tokens), not by anything the plan held: a run killed under one format resumed
    under the other (exit 0), its scores averaging items of two prompts. Each model's format is part of the run's
    identity now, recorded in run.json, and the resume is refused as any other different run, nothing touched; a
    run.json written before the plan recorded it is named as an older omniprobe's, as probe.heads names it.
    Oracle: the two formats' p(answer) differ."""
    import probe.prompting
    from probe.eval import part_file
    from probe.tiny import tiny_dir

    model = tiny_dir("llama")
    out = tmp_path / "run"
    args = ["--models", model, "--data", text_dir, REPO / "probe/zoo/data/text", "--limit", "2", "--no-generate",
            "--no-figures", "--quiet", "--out", out]
    assert _eval(*args) == 0
    part_file(out, 0, 1).unlink()  # killed after its first part
    before = _files(out)
    monkeypatch.setattr(probe.prompting, "holds_tokens", lambda tokenizer, texts: False)  # no ChatML tokens: Vicuna
    capfd.readouterr()
    assert _eval(*args) == 2
    assert capfd.readouterr().err.strip() == (f"error: --out {out} holds a different run (chat_formats differ); use "
                                              "another --out or --overwrite")
    assert _files(out) == before
    assert json.loads((out / "run.json").read_text())["plan"]["chat_formats"][str(model)]["name"] == "chatml"
    vicuna = tmp_path / "vicuna"
    assert _eval(*args[:-1], vicuna) == 0
    assert json.loads((vicuna / "run.json").read_text())["plan"]["chat_formats"][str(model)]["name"] == "vicuna"
    chatml, other = (pd.read_parquet(part_file(d, 0, 0)) for d in (out, vicuna))
    assert (chatml["p_answer"] - other["p_answer"]).abs().max() > 1e-4  # another prompt: other numbers
    info = json.loads((vicuna / "run.json").read_text())  # as an older omniprobe wrote it: no format recorded
    del info["plan"]["chat_formats"]
    (vicuna / "run.json").write_text(json.dumps(info | {"fingerprint": "from-an-older-release"}))
    before = _files(vicuna)
    capfd.readouterr()
    assert _eval(*args[:-1], vicuna) == 2
    assert capfd.readouterr().err.strip() == (f"error: --out {vicuna} holds a different run (written by an older "
                                              "omniprobe that did not record chat_formats); use another --out or "
                                              "--overwrite")
    assert _files(vicuna) == before


def test_a_part_of_another_run_is_named_not_merged(tiny_dirs, text_dir, tmp_path, capfd):
    """A part copied in from another run's --out (here: the same model path and items, before the model was
    re-merged in place) passed every check of its rows and columns and was scored as this run's, exit 0: its numbers
    are the other weights'. Each part keeps the fingerprint of its run now, and one of another run is named before
    anything is computed, nothing touched. Oracle: the two runs' p(answer) differ."""
    import shutil

    from probe.eval import part_file

    model = shutil.copytree(tiny_dirs["qwen2"], tmp_path / "model")
    args = ["--models", model, "--data", text_dir, REPO / "probe/zoo/data/text", "--limit", "2", "--no-generate",
            "--no-figures", "--quiet", "--out"]
    other, out = tmp_path / "other", tmp_path / "run"
    assert _eval(*args, other) == 0
    change_weights_in_place(model, "layers.0.mlp.up_proj.weight")
    assert _eval(*args, out) == 0
    theirs, ours = (pd.read_parquet(part_file(d, 0, 0)) for d in (other, out))
    assert (theirs["p_answer"] - ours["p_answer"]).abs().max() > 1e-4  # another model's numbers under the same keys
    part = part_file(out, 0, 0)
    shutil.copy(part_file(other, 0, 0), part)
    part_file(out, 0, 1).unlink()  # a killed run, to be resumed
    before = _files(out)
    capfd.readouterr()
    assert _eval(*args, out) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith(f"error: {part} is another run's part") and "\n" not in err, err
    assert "delete it and rerun" in err, err
    assert _files(out) == before


def test_a_different_run_is_refused_then_overwritten(eval_run, tmp_path, capfd, text_dir):
    import shutil

    out, _ = eval_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    other = ["--models", "tiny-qwen2", "--data", text_dir, "--no-generate", "--quiet", "--out", copy]
    assert _eval(*other) == 2
    assert "holds a different run" in capfd.readouterr().err
    assert _eval(*other, "--overwrite") == 0
    scores = pd.read_csv(copy / "scores.csv")
    assert set(scores["model"]) == {"tiny-qwen2"} and scores["accuracy"].isna().all()
    assert len(list((copy / "parts").glob("*.parquet"))) == 1


BAD = {
    "unknown model": lambda d: ["--models", "nope-7b", "--data", d],
    "missing data": lambda d: ["--models", "tiny-qwen2", "--data", "/nonexistent/dir"],
    "model twice": lambda d: ["--models", "tiny-qwen2", "tiny-qwen2", "--data", d],
    "bad batch size": lambda d: ["--models", "tiny-qwen2", "--data", d, "--batch-size", "0"],
    "split pattern": lambda d: ["--models", "tiny-qwen2", "--data", d, "--split", "val*"],  # read every match
    "no GPU": lambda d: ["--models", "tiny-qwen2", "--data", d, "--device", "cuda"],
    # numpy refused it in the bootstrap, after run.json and the parts were written
    "negative seed": lambda d: ["--models", "tiny-qwen2", "--data", d, "--seed", "-1"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exit_2_one_line_nothing_written(case, text_dir, tiny_dirs, tmp_path, capfd):
    # tiny_dirs: the tiny models are built before (building one prints its own progress bar)
    if case == "no GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    assert _eval(*BAD[case](text_dir), "--quiet", "--out", out) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("value", [0, "four", 3])
def test_an_impossible_head_layout_names_its_model(value, text_dir, tiny_dirs, tmp_path, capfd):
    """Of several models, the one whose config.json holds no head layout (0 or "four" heads, 3 heads in 2
    key/value groups) was refused as "config num_attention_heads must be …", naming no model; the line now starts
    with that model's directory, as the analyses' does."""
    import shutil

    bad = shutil.copytree(tiny_dirs["qwen2"], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"num_attention_heads": value, "num_key_value_heads": 2}))
    out = tmp_path / "out"
    assert _eval("--models", "tiny-qwen2", bad, "--data", text_dir, "--quiet", "--out", out) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: config") and "\n" not in err, err
    assert not out.exists()


def test_a_subject_named_all_is_refused(text_dir, tiny_dirs, tmp_path, capfd):
    """A subject folder named 'all' got the set's totals in its scores.csv row (64 items, not its 32), then
    table.md crashed on the two 'all' rows, after items.parquet and scores.csv were written."""
    import pyarrow.parquet as pq

    from probe.synthetic import write_mmmu_parquet

    rows = [r for f in sorted(text_dir.glob("*/validation-*.parquet")) for r in pq.read_table(f).to_pylist()]
    write_mmmu_parquet({"all": rows[:2], "Other": rows[2:4]}, tmp_path / "set", "validation")
    out = tmp_path / "out"
    assert _eval("--models", "tiny-qwen2", "--data", tmp_path / "set", "--quiet", "--out", out) == 2
    err = capfd.readouterr().err.strip()
    assert "a subject named 'all'" in err and "\n" not in err and not out.exists()


def test_a_run_with_nothing_to_compute_is_resumable_after_a_kill(data_dir, tiny_dirs, tmp_path, monkeypatch, capfd):
    """Every pair n/a (a text LM on an image set): no model loads, and run.json used to come only at the very end,
    so a kill while the results were written left a dir the same command then refused ('holds no run.json')."""
    import figures.eval

    out = tmp_path / "run"
    args = ("--models", "tiny-qwen2", "--data", data_dir, "--quiet", "--out", out)

    def killed(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(figures.eval, "draw_eval", killed)
    assert _eval(*args) == 130
    assert (out / "scores.csv").is_file() and json.loads((out / "run.json").read_text())["status"] == "running"
    monkeypatch.undo()
    assert _eval(*args) == 0
    capfd.readouterr()
    assert json.loads((out / "run.json").read_text())["status"] == "complete" and (out / "eval.png").is_file()
    assert (pd.read_csv(out / "scores.csv")["n_items"] == 0).all()


def test_a_ctrl_c_landing_in_a_finalizer_still_stops_the_run(data_dir, tiny_dirs, tmp_path, monkeypatch, capfd):
    """A Ctrl-C that lands while Python frees an object (here a __del__ run as draw_eval's temporary is freed) is
    handed to sys.unraisablehook: it was printed as "Exception ignored in: …" and dropped, and the run finished
    with exit 0. Now it stops the run there, as one landing anywhere else: exit 130, one line, the rerun resumes."""
    import signal

    import figures.eval

    out = tmp_path / "run"
    args = ("--models", "tiny-qwen2", "--data", data_dir, "--quiet", "--out", out)
    draw = figures.eval.draw_eval

    class Freed:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)  # Python's own handler raises KeyboardInterrupt inside __del__

    def interrupted_while_freeing(run_dir):
        Freed()  # freed at once, its KeyboardInterrupt handed to the hook
        draw(run_dir)  # not reached: the interrupt is raised again before the figure is drawn

    with monkeypatch.context() as m:
        m.setattr(figures.eval, "draw_eval", interrupted_while_freeing)
        m.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # the hook a command line has, not pytest's
        assert _eval(*args) == 130
        assert sys.unraisablehook is sys.__unraisablehook__ and sys.getprofile() is None  # cli_main put them back
    err = capfd.readouterr().err
    assert err.strip() == "interrupted" and "Exception ignored" not in err
    assert json.loads((out / "run.json").read_text())["status"] == "running" and not (out / "eval.png").exists()
    assert _eval(*args) == 0
    capfd.readouterr()
    assert json.loads((out / "run.json").read_text())["status"] == "complete" and (out / "eval.png").is_file()


def test_one_checkpoint_under_two_names_is_given_once(text_dir, tiny_dirs, tmp_path, capfd):
    """'tiny-qwen2' and its directory (or DIR and DIR/) passed the 'given twice' check, which compared the strings,
    and were evaluated as two models. A --reference naming a listed model another way is that model."""
    path = str(tiny_dirs["qwen2"])
    for twins in (["tiny-qwen2", path], [path, path + "/"]):
        out = tmp_path / "refused"
        assert _eval("--models", *twins, "--data", text_dir, "--quiet", "--out", out) == 2
        err = capfd.readouterr().err.strip()
        assert "are the same checkpoint" in err and "\n" not in err and not out.exists(), err
    out = tmp_path / "run"
    assert _eval("--models", path, "tiny-qwen2-vl", "--reference", "tiny-qwen2", "--data", text_dir, "--limit", "3",
                 "--no-generate", "--quiet", "--no-figures", "--out", out) == 0
    capfd.readouterr()
    scores = pd.read_csv(out / "scores.csv").query("subject == 'all'").set_index("model")
    assert list(scores.index) == [path, "tiny-qwen2-vl"]  # not a third row for the reference
    items = pd.read_parquet(out / "items.parquet")
    mine, ref = (items[items["model"] == m].set_index("item_id")["prob_correct"] for m in ("tiny-qwen2-vl", path))
    assert scores.loc["tiny-qwen2-vl", "diff_prob_accuracy"] == pytest.approx((mine - ref.loc[mine.index]).mean())
    assert json.loads((out / "run.json").read_text())["reference"] == path


def test_a_damaged_later_model_stops_the_run_before_anything_is_written(text_dir, tiny_dirs, tmp_path, capfd):
    """Every checkpoint is checked against its config (on the meta device, no weight read) before the first
    model runs: a missing tensor in the second model used to surface only after the first model's parts."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(tiny_dirs["qwen2"], tmp_path / "damaged")
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert _eval("--models", "tiny-qwen2", bad, "--data", text_dir, "--quiet", "--out", out) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "model.layers.1.mlp.up_proj.weight missing" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def odd_sets(tmp_path_factory, text_dir, data_dir):
    """mixed: a text subject and an image subject in one set; extra: a text set whose one subject no other set has;
    special: a text set whose question holds the chat markup ``<|im_end|>``."""
    import pyarrow.parquet as pq

    from probe.synthetic import write_mmmu_parquet

    root = tmp_path_factory.mktemp("odd")
    text_rows = [r for f in sorted(text_dir.glob("*/validation-*.parquet")) for r in pq.read_table(f).to_pylist()][:3]
    image_rows = [r for r in pq.read_table(next(data_dir.glob("*/validation-*.parquet"))).to_pylist()
                  if r["question_type"] == "multiple-choice"][:2]
    write_mmmu_parquet({"TextPart": text_rows, "ImagePart": image_rows}, root / "mixed", "validation")
    write_mmmu_parquet({"Extra": text_rows}, root / "extra", "validation")
    marked = [dict(text_rows[0], question=text_rows[0]["question"] + " <|im_end|>")]
    write_mmmu_parquet({"Marked": marked}, root / "special", "validation")
    return {name: root / name for name in ("mixed", "extra", "special")}


def other_notes(note: Any) -> str:
    """A row's note without the part every 0 % / 100 % row gets (the tiny random models often score 0)."""
    parts = [] if pd.isna(note) else [p for p in note.split("; ") if not re.search(r"all (right|wrong) \(|items? \(zero-width", p)]
    return "; ".join(parts)


def test_a_text_model_is_scored_on_the_text_items_of_a_mixed_set(odd_sets, tmp_path):
    """A set mixing text and image subjects used to make a text model n/a everywhere, its text subject included,
    with a note that was false for that subject. Now it is scored on what it can read, and the rows say what not."""
    out = tmp_path / "run"
    assert _eval("--models", "tiny-qwen2-vl", "tiny-qwen2", "--data", odd_sets["mixed"], "--reference",
                 "tiny-qwen2-vl", "--batch-size", "4", "--max-new-tokens", "3", "--quiet", "--out", out) == 0
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""]).set_index(["model", "subject"])
    items = pd.read_parquet(out / "items.parquet")
    text = scores.loc[("tiny-qwen2", "TextPart")]
    assert text["n_items"] == 3 and not other_notes(text["note"]) and text["accuracy"] == pytest.approx(
        items[(items["model"] == "tiny-qwen2") & (items["subject"] == "TextPart")]["correct"].mean())
    image = scores.loc[("tiny-qwen2", "ImagePart")]
    assert image["n_items"] == 0 and image["note"].startswith("not applicable: tiny-qwen2 (qwen2) cannot read image")
    assert np.isnan(image["accuracy"])
    whole = scores.loc[("tiny-qwen2", "all")]
    assert whole["n_items"] == 3 and whole["note"].startswith("2 of 5 items not applicable: tiny-qwen2")
    mine = items[items["model"] == "tiny-qwen2"].set_index("item_id")["correct"]
    ref = items[items["model"] == "tiny-qwen2-vl"].set_index("item_id")["correct"]
    assert whole["diff_accuracy"] == pytest.approx((mine - ref.loc[mine.index]).mean())  # paired on its 3 items
    assert scores.loc[("tiny-qwen2-vl", "all")]["n_items"] == 5 and not other_notes(scores.loc[("tiny-qwen2-vl", "all")]["note"])
    assert "- tiny-qwen2 on mixed: scored on 3 items; 2 of 5 items not applicable" in (out / "table.md").read_text()
    from figures.eval import read_scores, set_size  # the figure draws it hollow, "3 of 5", from scores.csv alone

    top = read_scores(out).query("subject == 'all'").set_index("model")
    assert set_size(top.loc["tiny-qwen2"]) == 5 and top.loc["tiny-qwen2", "n_items"] == 3


def test_a_reference_that_reads_fewer_items_says_what_its_difference_covers(odd_sets, tmp_path):
    """A text reference on a mixed set: the VLM's 'all' row held its accuracy over 5 items beside a paired difference
    over the 3 the reference read, with nothing saying so (its accuracy minus the reference's is not that diff)."""
    out = tmp_path / "run"
    assert _eval("--models", "tiny-qwen2-vl", "--data", odd_sets["mixed"], "--reference", "tiny-qwen2",
                 "--batch-size", "4", "--max-new-tokens", "3", "--quiet", "--no-figures", "--out", out) == 0
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""]).set_index(["model", "subject"])
    items = pd.read_parquet(out / "items.parquet")
    ref = items[items["model"] == "tiny-qwen2"].set_index(["subject", "item_id"])
    mine = items[items["model"] == "tiny-qwen2-vl"].set_index(["subject", "item_id"])
    both = mine.index.intersection(ref.index)
    assert len(mine) == 5 and len(both) == 3
    whole = scores.loc[("tiny-qwen2-vl", "all")]
    assert whole["n_items"] == 5 and whole["diff_n"] == 3
    assert whole["diff_accuracy"] == pytest.approx((mine.loc[both, "correct"] - ref.loc[both, "correct"]).mean())
    assert other_notes(whole["note"]) == "diff over the 3 of 5 items tiny-qwen2 also answered"
    assert scores.loc[("tiny-qwen2-vl", "TextPart"), "diff_n"] == 3 and not other_notes(
        scores.loc[("tiny-qwen2-vl", "TextPart"), "note"])  # every item of it paired: nothing to say
    # its image subject, of which the reference read nothing: empty diff columns and why, as on an image set (it
    # said "diff over the 0 of 2 items" with diff_n 0, the set's reference items having been counted for it)
    image = scores.loc[("tiny-qwen2-vl", "ImagePart")]
    assert pd.isna(image["diff_n"]) and np.isnan(image["diff_accuracy"]) and np.isnan(image["diff_lo"])
    assert other_notes(image["note"]) == "no diff: the reference tiny-qwen2 (qwen2) cannot read image items"
    assert pd.isna(scores.loc[("tiny-qwen2", "all"), "diff_n"])  # the reference itself has no difference
    line = next(x for x in (out / "table.md").read_text().splitlines() if x.startswith("- tiny-qwen2-vl on mixed:"))
    # it read all 5: the line gives the note alone ("scored on N items" is for a model that left some out)
    assert "scored on" not in line and "diff over the 3 of 5 items" in line


def test_a_reference_that_reads_none_of_a_set_says_why_its_differences_are_empty(data_dir, text_dir, tmp_path):
    """A text LM as --reference on an image set: every other model's diff columns there were NaN with nothing
    saying why. Each of its rows now notes it, with the reason the plan gives for the reference's own n/a rows;
    on the text set the reference reads, the differences are there and the note is not."""
    out = tmp_path / "run"
    assert _eval("--models", "tiny-qwen2-vl", "--data", data_dir, text_dir, "--reference", "tiny-qwen2", "--limit",
                 "3", "--no-generate", "--quiet", "--no-figures", "--out", out) == 0
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""])
    image, text = (scores[scores["data"] == Path(d).name] for d in (data_dir, text_dir))
    ref_na = image[image["model"] == "tiny-qwen2"]["note"]
    assert (image[image["model"] == "tiny-qwen2"]["n_items"] == 0).all() and ref_na.str.startswith(
        "not applicable: ").all()
    want = "no diff: the reference " + ref_na.iloc[0].removeprefix("not applicable: ")
    vlm = image[image["model"] == "tiny-qwen2-vl"]
    assert (vlm["n_items"] > 0).all() and vlm["diff_prob_accuracy"].isna().all()
    assert all(want in other_notes(n).split("; ") for n in vlm["note"]), vlm["note"].tolist()
    vlm_text = text[text["model"] == "tiny-qwen2-vl"]
    assert vlm_text["diff_prob_accuracy"].notna().all() and not vlm_text["note"].fillna("").str.contains(
        "no diff").any()
    line = next(x for x in (out / "table.md").read_text().splitlines()
                if x.startswith(f"- tiny-qwen2-vl on {Path(data_dir).name}: "))
    assert "no diff: the reference" in line and "scored on" not in line  # it read the whole set


def test_subjects_over_several_sets_take_each_sets_own(odd_sets, text_dir, tmp_path, capfd):
    """--subjects used to be checked against every set alone: a subject of the second set was 'unknown'."""
    first = sorted(p.name for p in text_dir.iterdir() if p.is_dir())[0]
    out = tmp_path / "run"
    assert _eval("--models", "tiny-qwen2", "--data", text_dir, odd_sets["extra"], "--subjects", first, "Extra",
                 "--no-generate", "--quiet", "--no-figures", "--out", out) == 0
    capfd.readouterr()
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores[scores["data"] == text_dir.name]["subject"]) == {"all", first}
    assert set(scores[scores["data"] == "extra"]["subject"]) == {"all", "Extra"}
    for subjects, want in ((["Nope", "Extra"], "unknown subject(s) Nope: in none of the data sets"),
                           (["Extra"], f"data set {text_dir} has none of Extra")):
        assert _eval("--models", "tiny-qwen2", "--data", text_dir, odd_sets["extra"], "--subjects", *subjects,
                     "--quiet", "--out", tmp_path / "refused") == 2
        err = capfd.readouterr().err.strip()
        assert want in err and "\n" not in err
        assert not (tmp_path / "refused").exists()


def test_subjects_reordered_or_repeated_are_the_same_run_and_another_choice_is_not(text_dir, tmp_path, capfd):
    """--subjects picks a set of subjects (the loader reads each once, in (subject, number) order, whatever the order
    typed), but run.json's plan kept the list as typed: the same subjects in another order, or one named twice, were
    refused as "a different run (subjects differ)" (probe.heads keeps the sorted list and resumes). Oracle: the
    first run's scores.csv, byte for byte; another choice of subjects is still refused and leaves the run as it was."""
    a, b, c = sorted(p.name for p in text_dir.iterdir() if p.is_dir())[:3]
    out = tmp_path / "run"
    args = ["--models", "tiny-qwen2", "--data", text_dir, "--limit", "4", "--no-generate", "--no-figures", "--quiet",
            "--out", out]
    assert _eval(*args, "--subjects", a, b) == 0
    want = (out / "scores.csv").read_bytes()
    (out / "scores.csv").unlink()  # the rerun must assemble it again
    for same in ([b, a], [a, b, a]):
        capfd.readouterr()
        assert _eval(*args, "--subjects", *same) == 0, capfd.readouterr().err
        assert (out / "scores.csv").read_bytes() == want
    before = _files(out)
    capfd.readouterr()
    assert _eval(*args, "--subjects", a, c) == 2
    assert "holds a different run (data, subjects differ)" in capfd.readouterr().err
    assert _files(out) == before


@pytest.mark.parametrize("command", ["eval", "heads"])
def test_text_holding_a_special_token_is_refused_before_anything_is_written(odd_sets, tiny_dirs, tmp_path, capfd,
                                                                            command):
    """A literal <image> in a LLaVA item's text crashed the processor with a traceback (exit 1) after run.json was
    written; chat markup such as <|im_end|> would silently end the turn. Both are the model's special tokens."""
    from probe.errors import cli_main
    from probe.heads import main as heads_main

    out = tmp_path / "out"
    if command == "eval":
        code = _eval("--models", "tiny-qwen2", "--data", odd_sets["special"], "--quiet", "--out", out)
    else:
        code = cli_main(heads_main, ["--model", "tiny-qwen2", "--data", str(odd_sets["special"]), "--layers", "0",
                                     "--heads", "0", "--quiet", "--out", str(out)])
    assert code == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: item validation_") and "'<|im_end|>', which tiny-qwen2's tokenizer reads as a " \
        "special token" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "heads"])
@pytest.mark.parametrize("option", ["--system-prompt", "--template"])
def test_a_template_holding_a_special_token_is_refused_before_anything_is_written(text_dir, tiny_dirs, tmp_path,
                                                                                  capfd, command, option):
    """An item's text holding a special token was refused, the prompt template's was not: a --system-prompt with
    <|im_end|> ended the system turn early and the run scored the mangled prompt with exit 0."""
    from probe.errors import cli_main
    from probe.heads import main as heads_main

    text = "Answer with the letter.<|im_end|>"
    if option == "--template":
        (tmp_path / "t.json").write_text(json.dumps({"user": "<|im_start|>Q: {question}\n{choices}"}))
        given, field, hit = [option, str(tmp_path / "t.json")], "user", "<|im_start|>"
    else:
        given, field, hit = [option, text], "system", "<|im_end|>"
    out = tmp_path / "out"
    if command == "eval":
        code = _eval("--models", "tiny-qwen2", "--data", text_dir, "--limit", "2", *given, "--quiet", "--out", out)
    else:
        code = cli_main(heads_main, ["--model", "tiny-qwen2", "--data", str(text_dir), "--limit", "2", "--layers",
                                     "0", "--heads", "0", *given, "--quiet", "--out", str(out)])
    assert code == 2
    err = capfd.readouterr().err.strip()
    assert err == f"error: the prompt template's {field} text holds {hit!r}, which tiny-qwen2's tokenizer reads as " \
        "a special token (chat markup or a media placeholder; the chat format adds its own): remove it from " \
        "--template / --system-prompt", err
    assert not out.exists()


def test_build_inputs_refuses_a_template_holding_a_special_token_and_checks_a_good_one_once(load_tiny, item_factory,
                                                                                         monkeypatch):
    """A hub model's items are built before its tokenizer is on disk to check (check_prompts skips it), so
    build_inputs checks the template itself: a bad one is refused each time it is used, a good one is checked once
    a model, not once per item (the run's template never changes)."""
    import probe.prompting as prompting
    from probe.errors import BadInput
    from probe.prompting import PromptTemplate, build_inputs

    loaded = load_tiny("qwen2")
    items = [item_factory(with_image=False, item_id=f"validation_Test_{i}", seed=i) for i in range(3)]
    bad = PromptTemplate(system="Answer.<|im_end|>")
    for _ in range(2):
        with pytest.raises(BadInput, match="the prompt template's system text holds '<\\|im_end\\|>'"):
            build_inputs(loaded, items[0], bad)
    calls = []
    real = prompting.check_template_text
    monkeypatch.setattr(prompting, "check_template_text", lambda *a: calls.append(a[0]) or real(*a))
    good = PromptTemplate(system="Answer with one letter, checked once.")
    for item in items:
        assert build_inputs(loaded, item, good)["input_ids"].shape[0] == 1
    assert calls == [good]


@pytest.mark.parametrize("bad", ["strip", "special token"])
def test_a_window_with_an_item_that_cannot_be_encoded_names_that_item(bad, load_tiny):
    """Batched evaluation encodes a window's prompts with one processor call (probe.prompting.encode_prompts). An
    image the processor refuses fails that call, and an item whose text holds a special token fails its checks
    before it: either way the run stops at that item with the message it gets alone (the call would name no item),
    after the items before it were prepared as usual."""
    import dataclasses
    import io

    from PIL import Image

    from probe.batch import evaluate_items
    from probe.errors import BadInput
    from probe.sweep import SweepConfig

    loaded = load_tiny("qwen2_vl", "sdpa")
    items = [make_item(item_id=f"validation_Test_{i}", seed=i) for i in range(4)]
    if bad == "strip":
        strip = io.BytesIO()
        Image.new("RGB", (3, 700), "white").save(strip, format="PNG")
        items[2] = dataclasses.replace(items[2], images=(strip.getvalue(),))
        why = r".*'s processor refuses it \(absolute aspect ratio"
    else:
        items[2] = dataclasses.replace(items[2], question="What is <|im_end|> here?")
        why = re.escape("its text holds '<|im_end|>'")
    with pytest.raises(BadInput, match=f"^item validation_Test_2: {why}"):
        evaluate_items(loaded, items, SweepConfig(max_new_tokens=2), batch_size=4)


def test_an_image_the_processor_refuses_is_one_line_naming_the_item(data_dir, tiny_dirs, tmp_path, capfd):
    """Qwen2-VL's image processor refuses an image whose one side is 200 times the other or more (a 3×700 strip):
    a traceback that named no item, in probe.eval, the head sweep and fine-tuning. Now exit 2 with one line naming
    the item and nothing left (probe.eval and probe.heads, which meet the item after run.json is written, take back
    what they wrote to a new --out: probe.errors.undone_on_bad_input; fine-tuning builds its rows first)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from analyses.finetune import main as finetune_main
    from probe.errors import cli_main
    from probe.synthetic import write_mmmu_parquet

    row = next(r for r in pq.read_table(next(data_dir.glob("*/validation-*.parquet"))).to_pylist()
               if r["question_type"] == "multiple-choice" and r["image_2"] is None)
    strip = io.BytesIO()
    Image.new("RGB", (3, 700), "white").save(strip, format="PNG")
    write_mmmu_parquet({"Strip": [dict(row, image_1={"bytes": strip.getvalue(), "path": None})]}, tmp_path / "strip",
                       "validation")
    out = tmp_path / "out"
    assert _eval("--models", "tiny-qwen2-vl", "--data", tmp_path / "strip", "--quiet", "--out", out) == 2
    err = capfd.readouterr().err.strip().splitlines()  # after the placement line
    assert [line for line in err if line.startswith("error: ")] == err[-1:], err
    assert err[-1].startswith(f"error: item {row['id']}: tiny-qwen2-vl's processor refuses it (") and \
        "aspect ratio" in err[-1]
    assert not out.exists()
    from probe.heads import main as heads_main

    assert cli_main(heads_main, ["--model", "tiny-qwen2-vl", "--data", str(tmp_path / "strip"), "--layers", "0",
                                 "--heads", "0", "--quiet", "--out", str(out)]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and err[0].startswith(f"error: item {row['id']}: "), err
    assert not out.exists()
    ft = tmp_path / "ft"
    assert cli_main(finetune_main, ["--model", str(tiny_dirs["qwen2_vl"]), "--data", f"image={tmp_path / 'strip'}",
                                    "--split", "validation", "--steps", "2", "--batch-size", "1", "--device", "cpu",
                                    "--quiet", "--out", str(ft)]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and err[0].startswith(f"error: item {row['id']}: "), err
    assert not ft.exists()


@pytest.mark.parametrize("family, remove, data, want", [
    ("qwen2", ("tokenizer.json", "tokenizer_config.json"), "text", "no tokenizer files"),
    # tokenizer_config.json left behind: transformers built a tokenizer of its special tokens alone, and the run was
    # refused as "option letter 'A' is not a single token for this tokenizer ([])"
    ("qwen2", ("tokenizer.json",), "text", "no tokenizer files"),
    ("qwen2_vl", ("tokenizer.json", "tokenizer_config.json"), "image", "no tokenizer files"),
    ("qwen2_vl", ("preprocessor_config.json",), "image", "cannot load its image processor config"),
    # text items need no processor, but loading the model builds it: refused before the first model runs
    ("qwen2_vl", ("preprocessor_config.json",), "text", "cannot load its image processor config"),
])
def test_a_model_dir_missing_its_tokenizer_or_processor_is_bad_input(family, remove, data, want, tiny_dirs, text_dir,
                                                                       data_dir, tmp_path, capfd):
    """transformers builds an empty tokenizer from a dir without one: the run went on and crashed with a traceback
    (image token count) or blamed the option letters, after run.json was written; a missing image processor config
    was a traceback."""
    import shutil

    model = shutil.copytree(tiny_dirs[family], tmp_path / "model")
    for name in remove:
        (model / name).unlink()
    out = tmp_path / "out"
    assert _eval("--models", "tiny-qwen2", model, "--data", text_dir if data == "text" else data_dir, "--quiet",
                 "--out", out) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and want in err and "\n" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("change", [{"patch_size": 0}, {"merge_size": 0}, {"temporal_patch_size": -2},
                                    {"size": {"longest_edge": 2304, "shortest_edge": 0}}, {"rescale_factor": 0}])
def test_an_image_processor_setting_that_cannot_be_is_bad_input(change, tiny_dirs, data_dir, tmp_path, capfd):
    """preprocessor_config.json's patch_size 0 ended in a ZeroDivisionError traceback inside transformers' resize;
    a shortest_edge of 0 or a rescale_factor of 0 would resize or scale every image to nothing. Each is one line
    naming the file and the key, before run.json is written."""
    import json
    import shutil

    model = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "model")
    path = model / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **change}), encoding="utf-8")
    out = tmp_path / "out"
    assert _eval("--models", model, "--data", data_dir, "--quiet", "--out", out) == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    key = next(iter(change))
    assert err.startswith("error: ") and "preprocessor_config.json" in err and key in err, err
    assert not out.exists()


def test_a_name_keeps_its_colour_whatever_the_order_and_company():
    from figures import name_colours

    a = name_colours(["image", "image_single", "text", "video"])  # image and image_single meet at one colour
    assert name_colours(["video", "text", "image_single", "image"]) == a  # order does not matter
    assert len(set(a.values())) == 4
    assert name_colours(["text", "organism-vl"])["text"] == a["text"]  # nor other names that do not clash


def test_more_than_ten_names_get_distinct_colours_none_paler_than_tab10s_palest():
    import matplotlib.pyplot as plt

    from figures import name_colours

    def luminance(c) -> float:  # WCAG relative luminance: how pale a line or bar reads on white
        lin = [x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in c[:3]]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    tab10 = plt.get_cmap("tab10")
    assert name_colours(["a", "b"])["a"] == tab10(zlib_index("a"))  # ≤ 10 names: tab10 as before
    names = [f"checkpoint-{s}" for s in range(0, 1500, 100)]  # 15 steps of one run
    colours = name_colours(names)
    assert len(set(colours.values())) == 15
    palest = max(luminance(tab10(k)) for k in range(10))
    assert max(luminance(c) for c in colours.values()) <= palest + 1e-9


def zlib_index(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode()) % 10


def test_figures_eval_redraws(eval_run, tmp_path):
    import shutil

    out, _ = eval_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for f in copy.glob("eval.*"):
        f.unlink()
    res = subprocess.run([sys.executable, "-m", "figures", "eval", str(copy)], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert (copy / "eval.png").read_bytes().startswith(b"\x89PNG")
    assert (copy / "eval.pdf").read_bytes().startswith(b"%PDF")


def test_eval_figure_fits_long_model_paths(eval_run, tmp_path):
    """A model given as a long directory path used to leave matplotlib unable to lay the figure out (labels cut
    off); its label now keeps the path's tail and the figure widens for it. The tick label and the result's repr
    shorten alike (figures.short_name): the most whole parts of the tail that fit behind '…/'. The tick rule before
    cut inside a name where whole parts lost more than half the width, and dropped a part where the kept characters
    began at a '/' (a carrier's method)."""
    import shutil
    import warnings

    from figures import short_name
    from figures.eval import draw_eval, short_labels
    from figures.results import EvalRun

    def whole_tail(name: str, width: int) -> str:  # the oracle: the longest tail of whole parts within width
        parts = name.split("/")
        return max(("…/" + "/".join(parts[k:]) for k in range(1, len(parts))
                    if len("…/" + "/".join(parts[k:])) <= width), key=len)

    out, _ = eval_run
    copy = shutil.copytree(out, tmp_path / "run")
    scores = pd.read_csv(copy / "scores.csv")
    long = "/very/long/path/to/some/experiments/of/this/lab/merged/shift-softmax-tau-0.5"
    scores.loc[scores["model"] == "tiny-qwen2", "model"] = long
    scores.to_csv(copy / "scores.csv", index=False)
    info = json.loads((copy / "run.json").read_text(encoding="utf-8"))  # the plan renamed alike (EvalRun.read checks)
    for m in info["plan"]["models"]:
        m["name"] = long if m["name"] == "tiny-qwen2" else m["name"]
    (copy / "run.json").write_text(json.dumps(info), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied" is a UserWarning
        draw_eval(copy)
    assert short_labels([long]) == [short_name(long, 40)] == [whole_tail(long, 40)] \
        == ["…/this/lab/merged/shift-softmax-tau-0.5"]
    assert short_name(long) == whole_tail(long, 32) == "…/merged/shift-softmax-tau-0.5"  # the repr's width
    assert "\n  models: tiny-qwen2-vl, …/merged/shift-softmax-tau-0.5\n" in repr(EvalRun.read(copy))
    # whole parts keep less than half the width: the tick rule kept "…-of-the-merged-organisms/checkpoint-100"
    checkpoint = "runs/seed0/the-finetune-of-the-merged-organisms/checkpoint-100"
    assert short_name(checkpoint, 40) == whole_tail(checkpoint, 40) == "…/checkpoint-100"
    # the last 39 characters start at a '/': the tick rule cut at the next one, dropping "merge"
    method = "runs/xxxxxxxxxx/merge/shift/carriers/organism-ov-si-aa"
    assert method[-39] == "/" and short_name(method, 40) == whole_tail(method, 40) \
        == "…/merge/shift/carriers/organism-ov-si-aa"
    one_long_name = "/x/" + "y" * 60  # no whole part fits: the last 39 characters
    assert short_name(one_long_name, 40) == "…" + one_long_name[-39:]
    assert short_name("tiny-qwen2", 40) == "tiny-qwen2"
    assert all(len(short_name(n, w)) <= w for n in (long, checkpoint, method, one_long_name) for w in (20, 32, 40))


def test_a_stopped_run_says_why_in_one_line_and_keeps_nothing_of_that_pair(text_dir, tmp_path, capfd, monkeypatch):
    """BatchDisagrees (like EngineDisagrees and UpstreamChanged, probe.errors.RunStopped) ends the command with exit
    1 and one line saying what disagreed, not a traceback; the pair being measured leaves no part behind, and run.json
    says the run stopped, and why."""
    import probe.batch as batch

    collate = batch.collate
    monkeypatch.setattr(batch, "collate", lambda *a: collate(*a) | {"attention_mask": torch.ones_like(
        collate(*a)["attention_mask"])})
    out = tmp_path / "run"
    capfd.readouterr()
    assert _eval("--models", "tiny-qwen2", "--data", text_dir, "--batch-size", "4", "--max-new-tokens", "2",
                 "--quiet", "--out", out) == 1
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    assert len(err) == 1 and err[0].startswith("error: batched evaluation disagrees"), err
    assert not list((out / "parts").glob("*.parquet"))
    saved = json.loads((out / "run.json").read_text())  # "running" read as a killed run to resume
    assert saved["status"] == "stopped" and saved["error"].startswith("BatchDisagrees: batched evaluation disagrees")


def test_an_out_dir_in_use_by_another_command_is_refused(text_dir, tiny_dirs, tmp_path, capfd):
    """Two different runs started into one --out at once both passed the saved-run check before either wrote run.json,
    then mixed their parts. The first to write holds DIR/.lock until it exits; here another process holds it. A
    resume takes the lock too: the same command started twice used to compute the same parts side by side."""
    from conftest import lock_held_elsewhere

    out = tmp_path / "out"
    out.mkdir()
    args = ("--models", "tiny-qwen2", "--data", text_dir, "--no-generate", "--quiet", "--out", out)
    refused = f"error: --out {out} is in use by another running command; wait for it to end or use another --out"
    with lock_held_elsewhere(out):
        assert _eval(*args) == 2
        assert capfd.readouterr().err.strip().splitlines()[-1] == refused
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the refused run
    assert _eval(*args) == 0
    part = next((out / "parts").glob("*.parquet"))
    part.unlink()  # an unfinished run, to be resumed
    before = sorted(p.name for p in out.rglob("*"))
    with lock_held_elsewhere(out):
        assert _eval(*args) == 2
        assert capfd.readouterr().err.strip().splitlines()[-1] == refused
    assert sorted(p.name for p in out.rglob("*")) == before
    assert _eval(*args) == 0 and part.is_file()


def test_eval_figure_titles_a_set_no_model_could_read_without_a_count(eval_run, tmp_path, monkeypatch):
    """A panel's n is its set's size; where every model is n/a on a set, scores.csv holds no count of it, and the
    title said n=0 for a set of several items. Now it says n/a; a scored set keeps its n from scores.csv."""
    import figures.eval as fe

    out, _ = eval_run
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""])
    alone = scores[scores["model"] == "tiny-qwen2"]  # the text LM: n/a on the image set, scored on the text set
    (tmp_path / "scores.csv").write_text(alone.to_csv(index=False))
    import matplotlib.pyplot as plt

    titles = {}

    def keep_titles(fig, *args) -> list:
        titles.update((ax.get_title().split(" (")[0], ax.get_title()) for ax in fig.axes if ax.get_title())
        plt.close(fig)  # as save_png_pdf does: later tests check that no figure is left open
        return []

    monkeypatch.setattr(fe, "save_png_pdf", keep_titles)
    fe.draw_eval(tmp_path)
    top = alone[alone["subject"] == "all"].set_index("data")["n_items"]
    assert min(top) == 0 < max(top)
    for data, n in top.items():
        assert titles[data] == (f"{data} (n={n})" if n else f"{data} (n/a)"), titles


def test_heads_and_eval_runs_in_one_out_refuse_and_overwrite_each_other_whole(tmp_path, capfd):
    """probe.heads --overwrite over a probe.eval run left eval's scores.csv, table.md and eval.png beside heads.csv,
    and without --overwrite the refusal listed two dozen "differing" plan fields; each command now names the other's
    run and its --overwrite clears it whole (run.json files saved before the command was recorded included)."""
    import shutil

    from probe import eval as probe_eval
    from probe import heads
    from probe.errors import cli_main

    out = tmp_path / "run"
    ev = ["--models", "organism-base", "--data", "probe/zoo/data/text", "--limit", "2", "--quiet", "--out", str(out)]
    hd = ["--model", "organism-base", "--data", "probe/zoo/data/text", "--limit", "2", "--layers", "0", "--heads", "0",
          "--no-generate", "--no-figures", "--quiet", "--out", str(out)]
    eval_files = {"scores.csv", "table.md", "eval.png", "eval.pdf"}
    for first, second, name, mine, theirs in ((probe_eval, heads, "probe.eval", {"heads.csv", "baseline.json"},
                                               eval_files),
                                              (heads, probe_eval, "probe.heads", eval_files, {"heads.csv",
                                                                                              "baseline.json"})):
        assert cli_main(first.main, ev if first is probe_eval else hd) == 0
        run = json.loads((out / "run.json").read_text())
        assert run["command"] == name
        if first is probe_eval:  # as saved before the command was recorded: told apart by its plan
            del run["command"]
            (out / "run.json").write_text(json.dumps(run))
        capfd.readouterr()
        second_args = hd if second is heads else ev
        assert cli_main(second.main, second_args) == 2
        other = "probe.heads" if name == "probe.eval" else "probe.eval"
        assert capfd.readouterr().err.strip() == f"error: --out {out} holds a {name} run, not a {other} one; use " \
                                                 "another --out or --overwrite"
        assert cli_main(second.main, second_args + ["--overwrite"]) == 0
        left = {p.name for p in out.iterdir()}
        assert mine <= left and not (theirs & left), left
        assert json.loads((out / "run.json").read_text())["command"] == other
        shutil.rmtree(out)


@pytest.mark.parametrize("command", ["probe.heads", "probe.eval"])
def test_heads_and_eval_leave_another_tools_run_in_their_out_alone_even_with_overwrite(command, tmp_path, capfd):
    """--overwrite into a fine-tuning run's folder deleted its run.json (probe.heads and probe.eval own a file of that
    name), leaving its checkpoints behind a run.json analyses.finetune refuses to resume from; without --overwrite the
    refusal called it a run "written by an older omniprobe". Both now refuse it by name and touch nothing."""
    from probe import eval as probe_eval
    from probe import heads
    from probe.errors import cli_main
    from probe.results import MANIFEST

    main, args = ((heads.main, ["--model", "organism-base", "--layers", "0", "--heads", "0", "--no-generate",
                                "--no-figures"]) if command == "probe.heads" else (probe_eval.main, ["--models",
                                                                                                    "organism-base"]))
    finetune = tmp_path / "finetune"
    (finetune / "checkpoint-0").mkdir(parents=True)
    (finetune / "run.json").write_text(json.dumps({"config": {"model": "organism-base", "steps": 1},
                                                   "status": "complete"}))
    (finetune / "train_log.csv").write_text("step,loss\n")
    trajectory = tmp_path / "trajectory"
    trajectory.mkdir()
    (trajectory / "run.json").write_text(json.dumps({"ref": "organism-base", "n_points": 2}))
    (trajectory / "points.csv").write_text("name\n")
    (trajectory / MANIFEST).write_text(json.dumps({"command": "analyses.trajectory",
                                                   "entries": ["points.csv", "run.json"]}))
    for out, owner in ((finetune, "analyses.finetune"), (trajectory, "analyses.trajectory")):
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        for extra in ([], ["--overwrite"]):
            capfd.readouterr()
            rc = cli_main(main, args + ["--data", "probe/zoo/data/text", "--limit", "2", "--quiet", "--out", str(out),
                                        *extra])
            err = capfd.readouterr().err.strip()
            assert rc == 2 and err == f"error: --out {out} holds an {owner} run, not a {command} one; --overwrite " \
                                      "would delete its files: use another --out", err
            assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command", ["probe.heads", "probe.eval"])
def test_a_run_json_that_is_not_an_object_is_named_unreadable(command, tmp_path, capfd):
    """A run.json holding JSON but no object (``[1]``, a string) was an AttributeError traceback (exit 1) from both
    commands; it is unreadable, as damaged JSON is: exit 2, one line, the file untouched."""
    from probe import eval as probe_eval
    from probe import heads
    from probe.errors import cli_main

    main, args = ((heads.main, ["--model", "organism-base", "--layers", "0", "--heads", "0", "--no-generate",
                                "--no-figures"]) if command == "probe.heads" else (probe_eval.main, ["--models",
                                                                                                    "organism-base"]))
    out = tmp_path / "run"
    out.mkdir()
    for text in ("[1]", '"run"', "null"):
        (out / "run.json").write_text(text)
        capfd.readouterr()
        rc = cli_main(main, args + ["--data", "probe/zoo/data/text", "--limit", "2", "--quiet", "--out", str(out)])
        err = capfd.readouterr().err.strip()
        assert rc == 2 and err == f"error: {out / 'run.json'} is unreadable; pass --overwrite to start fresh", err
        assert (out / "run.json").read_text() == text


def test_the_printed_summary_names_its_metric_and_its_marks(data_dir, text_dir, tmp_path, capfd):
    """A finished run printed table.md's models × data sets table alone: with --no-generate its numbers are the
    probability accuracy, which nothing on screen said, and its n/a and † cells went unexplained. It prints the
    heading (the metric), the table and table.md's notes, then where the results are."""
    out = tmp_path / "run"
    assert _eval("--models", "tiny-qwen2", "--data", text_dir, data_dir, "--limit", "3", "--no-generate",
                 "--quiet", "--no-figures", "--out", out) == 0
    printed = capfd.readouterr().out.strip().splitlines()
    table = (out / "table.md").read_text().split("\n\n")
    # the placement line first (stdout since gaps47: a refusal is stderr's one line), then the summary
    assert printed[0].startswith("device cpu (")
    printed = printed[1:]
    assert printed[0] == "Evaluation: probability accuracy in %, 95 % bootstrap interval:"
    assert printed[1:1 + len(table[1].splitlines())] == table[1].splitlines() and "n/a" in table[1]
    assert "- n/a: tiny-qwen2 (qwen2) cannot read image items" in printed
    assert printed[-1] == f"results in {out}/ (figures: python -m figures eval {out})"


def test_the_printed_summary_shows_names_and_intervals_without_markdown_escapes(tmp_path):
    """The terminal summary printed table.md's markdown escapes: ``Clopper-Pearson \\[39.8, 100.0\\]`` under every
    all-right row, a model ``runs/a*b`` as ``runs/a\\*b``. It shows the text as written, but for a '|' in a
    table row, which stays escaped so the row keeps its cells."""
    from probe.eval import md_text, summary

    names = ["runs/a*b", "[x](y)", "_u_", "t\\", "a|b"]
    table = tmp_path / "table.md"
    table.write_text("# Evaluation: accuracy in %\n\n| model | text |\n|---|---|\n"
                     + "".join(f"| {md_text(n)} | 50.0 |\n" for n in names) + "\n"
                     + "".join(f"- {md_text(n)} on text: {md_text('Clopper-Pearson [39.8, 100.0]')}\n" for n in names),
                     encoding="utf-8")
    lines = summary(table).splitlines()
    rows, notes = lines[3:3 + len(names)], lines[3 + len(names):]
    assert rows == [f"| {n.replace('|', chr(92) + '|')} | 50.0 |" for n in names], rows
    assert notes == [f"- {n} on text: Clopper-Pearson [39.8, 100.0]" for n in names], notes


# names GFM would read as marks: emphasis, math ($ on GitHub), HTML, a link, an entity, a code span, a trailing '\'
MARKUP_NAMES = ["a*b*c", "$x$", "<b>x</b>", "[x](y)", "a&amp;b", "`c`", "_u_", "t\\", "~~s~~", "a|b"]


def _gfm_cells(markdown: str) -> list[list[str]]:
    """Each table row's cells as GFM (markdown-it's CommonMark with tables and strikethrough) renders them."""
    from markdown_it import MarkdownIt

    out = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)
    return [re.findall(r"<t[hd]>(.*?)</t[hd]>", row) for row in re.findall(r"<tr>(.*?)</tr>", out, re.S)]


def test_names_holding_markdown_marks_are_shown_as_written_in_table_md(tmp_path):
    """A model, set or subject named ``a*b*c`` showed as a<em>b</em>c in table.md, ``<b>x</b>`` as bold HTML,
    ``[x](y)`` as a link, ``$x$`` as math on GitHub. Oracle: markdown-it's render of each cell is the name
    HTML-escaped (no tag), and no '$' is left for GitHub's math unescaped."""
    import html

    models, data, subjects = MARKUP_NAMES[:5], MARKUP_NAMES[5:], ["S*1*", "$y$"]
    _write_named_table(tmp_path, models, data, subjects, lambda s, i: f"{i}")
    text = (tmp_path / "table.md").read_text(encoding="utf-8")
    blocks = text.split("\n\n")
    top = _gfm_cells(blocks[1])
    assert top[0] == ["model", *map(html.escape, data)] and [r[0] for r in top[1:]] == list(map(html.escape, models))
    for d, block in zip(data, blocks[2:], strict=False):
        sub = _gfm_cells(block)
        assert sub[0] == [html.escape(f"{d} (8 items)"), *map(html.escape, subjects)]
    assert not re.search(r"(?<!\\)\$", text), text  # GitHub reads an unescaped $…$ as math
    back = pd.read_csv(tmp_path / "scores.csv", keep_default_na=False)
    assert set(back["model"]) == set(models) and set(back["subject"]) == {*subjects, "all"}  # the names as given


def test_plain_names_are_written_to_markdown_unescaped():
    """The escaping leaves plain names as they were: the shipped report's organism names and set labels (with '-'
    and '_' inside a word) stay byte-identical."""
    from probe.eval import md_text
    from probe.zoo import ORGANISMS

    for name in [*(f"organism-{n}" for n in ORGANISMS), "image_single", "Colour_Shape", "runs/merge/eq4", "L3.H2"]:
        assert md_text(name) == name


def test_the_replication_report_shows_names_holding_marks_as_written_in_md_and_html():
    """figures.report's Doc: a name in a table cell, in prose and in a code span. report.md showed ``a*b*c`` in
    italics (GFM), and report.html too (its own inline renderer read the '*' of a name as a mark). Oracle: markdown-
    it's render of report.md and the page's own HTML each show html.escape(name) with no tag the name made."""
    import html

    from markdown_it import MarkdownIt

    from figures.report import Doc, _inline
    from probe.eval import md_code, md_text

    for name in MARKUP_NAMES + ["<script>alert(1)</script>", "a&b"]:
        d = Doc()
        d.table(["model", md_text(name)], [[md_text(name), "1.0 [0.0, 2.0]"]])
        d.p(f"base {md_code(name)}, expert {md_text(name)}; **agrees**")
        md = d.markdown()
        cells = _gfm_cells(md.split("\n\n")[0])
        assert cells == [["model", html.escape(name)], [html.escape(name), "1.0 [0.0, 2.0]"]], (name, md)
        prose = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md.split("\n\n")[1])
        shown = re.sub(r"</?code>", "", prose)
        assert shown == f"<p>base {html.escape(name)}, expert {html.escape(name)}; <strong>agrees</strong></p>\n", \
            (name, md, prose)
        assert not re.search(r"(?<!\\)\$", re.sub(r"`[^`]*`", "", md)), md  # GitHub's math reads no code span
        page = d.html(Path("."), "t")
        assert f"<th>{html.escape(name)}</th>" in page and f"<td>{html.escape(name)}</td>" in page, (name, page)
        assert re.sub(r"</?code>", "", _inline(d.blocks[1][1])) == \
            f'base {html.escape(name)}, expert {html.escape(name)}; <strong class="agrees">agrees</strong>', name


def test_table_md_notes_are_shown_as_written(tmp_path):
    """table.md's note lines wrote each row's note (scores.csv's ``note``) unescaped: a note names the model that
    cannot read a set, so a model named ``a*b_<i>|c`` put italics, an HTML tag and a stray '|' into table.md. Oracle:
    markdown-it's render of each note line is the line as written (model, set, note from scores.csv) HTML-escaped,
    with no tag the note made."""
    import html

    from markdown_it import MarkdownIt

    from probe.eval import DataSet, EvalPlan, ModelEntry, score_table, write_results

    part, none = "a*b_<i>|c", "z _y_ [x](y)"
    rows = [{"model": m, "data": "d", "item_id": str(i), "subject": s, "correct": 1.0, "prob_correct": 1.0,
             "p_answer": 0.5 + 0.01 * i} for m, subjects in (("whole", ("T", "I")), (part, ("T",)))
            for s in subjects for i in range(3)]
    why = {m: f"not applicable: {m} (qwen2) cannot read image items" for m in (part, none)}
    plan = EvalPlan([ModelEntry(m, m, "qwen2", "fp") for m in ("whole", part, none)],
                    [DataSet("d", "d", "d", "fp", 6, 0, ["T", "I"])], {f"{m}|d": w for m, w in why.items()},
                    {f"{part}|d": {"I": 3}, f"{none}|d": {"T": 3, "I": 3}}, {}, {}, {"generate": True})
    scores = score_table(pd.DataFrame(rows), plan, None, 0)
    write_results(tmp_path, pd.DataFrame(rows), scores, plan)
    note = scores[scores["subject"] == "all"].set_index("model")["note"]
    assert "*" in note[part] and note[none] == why[none]
    text = (tmp_path / "table.md").read_text(encoding="utf-8")
    notes = text.split("\n\n")[-1]
    shown = re.findall(r"<li>(.*?)</li>", MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(notes),
                       re.S)
    assert shown[:3] == [html.escape(x) for x in [f"n/a: {note[none].removeprefix('not applicable: ')}",
                                                   f"whole on d: {note['whole']}",
                                                   f"{part} on d: scored on 3 items; {note[part]}"]], notes
    assert not re.search(r"(?<!\\)\|", notes), notes  # a '|' GitHub could read as a table cell's end


def _edit_first_question(data: Path) -> None:
    """Rewrite the text set at ``data`` in place with its first item's question changed: same items, ids, count."""
    from probe.mmmu import load_items
    from probe.synthetic import MMMU_COLUMNS, write_mmmu_parquet

    its = load_items(str(data))[0]
    shutil.rmtree(data)
    rows: dict[str, list] = {}
    for n, it in enumerate(its):
        rows.setdefault(it.subject, []).append(
            {c: None for c in MMMU_COLUMNS}
            | {"id": it.id, "question": it.question + (" Think of a red fox." * (n == 0)), "answer": it.answer,
               "options": str(list(it.options)), "question_type": "multiple-choice", "explanation": ""})
    write_mmmu_parquet(rows, data, "validation")


@pytest.mark.parametrize("family, change, field", [
    ("qwen2", ["--dtype", "bfloat16"], "dtype"),
    ("qwen2", ["--system-prompt", "Reply with one letter."], "template"),
    ("qwen2", ["--max-new-tokens", "4"], "max_new_tokens"),
    ("qwen2", ["--attn-implementation", "eager"], "attn_implementation"),
    ("qwen2", "edit the data in place", "data"),
    ("qwen2_vl", ["--image-max-side", "20"], "image_max_side"),
])
def test_a_resume_that_changes_one_field_of_the_runs_identity_is_refused(family, change, field, tiny_dirs, text_dir,
                                                                         data_dir, tmp_path, capfd):
    """Each setting that decides the numbers is part of the run's identity (mut48: mutants leaving dtype, the
    template, max_new_tokens, attn_implementation, image_max_side or the data's digest out of it resumed such a
    rerun, exit 0, its parts the old setting's). A rerun into the same --out changing exactly that field is refused
    naming it, nothing touched. Oracle: a fresh run with the change in a new dir scores other numbers (p(answer) or
    the generated answers), where the field can change them (sdpa and eager agree on the tiny model)."""
    from probe.eval import part_file

    data = shutil.copytree(text_dir if family == "qwen2" else data_dir, tmp_path / "data")
    base = ["--models", tiny_dirs[family], "--data", data, "--limit", "3", "--max-new-tokens", "2", "--no-figures",
            "--quiet", "--out"]
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    assert _eval(*base, out) == 0
    if change == "edit the data in place":
        _edit_first_question(data)
        change = []
    before = _files(out)
    capfd.readouterr()
    assert _eval(*base, out, *change) == 2
    err = capfd.readouterr().err.strip()
    assert f"holds a different run ({field} differ)" in err and "\n" not in err, err
    assert _files(out) == before
    assert _eval(*base, fresh, *change) == 0
    old, new = (pd.read_parquet(part_file(d, 0, 0)) for d in (out, fresh))
    moved = (old["p_answer"] - new["p_answer"]).abs().max() > 1e-6 or (old["response"] != new["response"]).any()
    assert moved == (field != "attn_implementation"), (field, old[["p_answer", "response"]],
                                                        new[["p_answer", "response"]])


def test_an_item_too_large_for_memory_from_python_raises_the_command_lines_line(tmp_path: Path, capfd,
                                                                                monkeypatch) -> None:
    """``evaluate`` where one item does not fit (the batch back-off can halve no further) raised torch's
    OutOfMemoryError, where the command line prints one line and exits 1. Now probe.errors.OutOfMemory with that
    line (fuzz48b); the oracle: the CLI's stderr line, the same torch error raised in the same place, and the same
    --out left behind."""
    import probe.eval as ev
    from probe.errors import OutOfMemory, cli_main

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")

    monkeypatch.setattr(ev, "evaluate_pair", oom)
    data = str(REPO / "probe/zoo/data/text")
    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    assert cli_main(ev.main, ["--models", "organism-base", "--data", data, "--limit", "2", "--no-figures", "--quiet",
                              "--out", str(cli_out)]) == 1
    line = capfd.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(OutOfMemory) as raised:
        ev.evaluate(models=["organism-base"], data=[data], limit=2, no_figures=True, quiet=True, out=py_out)
    assert line == f"error: {raised.value}" and line.startswith("error: out of memory in GPU 0 (tried to allocate")
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)
    assert sorted(p.name for p in py_out.iterdir()) == sorted(p.name for p in cli_out.iterdir())


_SCORED = ["p_answer", "prob_correct", "prob_pred"]  # what the scoring forward gives, generated or not


def _scored(out: Path) -> pd.DataFrame:
    """items.parquet's scoring-forward columns keyed by (model, data, item_id), in that order."""
    return pd.read_parquet(out / "items.parquet").set_index(["model", "data", "item_id"]).sort_index()[_SCORED]


def test_no_generate_scores_with_the_generate_runs_bits(eval_run, tmp_path):
    """--no-generate runs one step of the same greedy generate (README, probe.eval): the option probabilities are
    those of the generating run bit for bit, item by item, and so prob_accuracy and p_answer in scores.csv, for a
    text model and a VL model on text and image items. Oracle: eval_run (generate, 3 new tokens)."""
    out, args = eval_run
    mine = tmp_path / "nogen"
    assert _eval(*args[:-1], mine, "--no-generate", "--no-figures") == 0
    want, got = _scored(out), _scored(mine)
    assert len(want) > 10 and got.index.equals(want.index)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    cols = ["model", "data", "subject", "n_items", "prob_accuracy", "prob_accuracy_lo", "prob_accuracy_hi", "p_answer"]
    a, b = (pd.read_csv(d / "scores.csv")[cols] for d in (out, mine))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert pd.read_csv(mine / "scores.csv")["accuracy"].isna().all()  # nothing generated: no accuracy


@pytest.mark.parametrize("batch, tol", [(1, 0.0), (4, 1e-6)])
def test_a_shorter_limit_or_fewer_subjects_give_those_items_the_numbers_of_the_larger_run(batch, tol, text_dir,
                                                                                          tmp_path):
    """--limit N and --subjects pick items; each item's numbers are those it gets in a run of more items: to the
    bit at --batch-size 1 (the one-item path), and at a larger batch to README's batch-size tolerance (1e-6: items
    share batches with other neighbours, so other padding and fp32 kernels; measured on organism-base and -vl,
    batch 4, --limit 5 against 8: 5.4e-7), the same predictions. Oracle: the larger run's rows of the same items."""
    subjects = sorted(p.name for p in text_dir.iterdir() if p.is_dir())
    base = ["--models", "tiny-qwen2", "--data", text_dir, "--batch-size", batch, "--no-generate", "--no-figures",
            "--quiet"]
    assert _eval(*base, "--out", tmp_path / "all") == 0
    assert _eval(*base, "--limit", 3, "--out", tmp_path / "limit") == 0
    assert _eval(*base, "--subjects", subjects[-1], "--out", tmp_path / "sub") == 0
    full = pd.read_parquet(tmp_path / "all" / "items.parquet")
    assert len(full) > 6 and full["subject"].nunique() > 1
    whole = _scored(tmp_path / "all")
    for part, n in (("limit", 3), ("sub", int((full["subject"] == subjects[-1]).sum()))):
        got = _scored(tmp_path / part)
        assert len(got) == n and 0 < n < len(whole), part
        want = whole.loc[got.index]
        assert (got["prob_pred"] == want["prob_pred"]).all(), part
        diff = float((got["p_answer"] - want["p_answer"]).abs().max())
        assert diff <= tol, part
