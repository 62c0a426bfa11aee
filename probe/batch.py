"""Batched evaluation (DESIGN §8): several items per forward, with the one-item path as the oracle beside it.

Each item's inputs come from the probe's one prompt builder (``probe.sweep.prepare_item``), exactly as the head
sweep builds them; where the processor allows, a window's prompts are encoded by one processor call (LLaVA-OneVision:
one per 32) and cut apart into each item's own tensors (``probe.prompting.encode_prompts``: the per-call overhead was
half of organism-vl's input building). ``collate`` then joins items:
- token-aligned tensors (input_ids, attention_mask, mm_token_type_ids) are padded on the **left**, so every row's
  next token is the last column; the attention mask marks the padding, and the model derives positions from it
  (cumulative positions for Qwen2, M-RoPE's ``get_rope_index`` for Qwen2-VL). The attribution engine's plain
  forward pads on the right instead (``left=False``), where no real token's position depends on the padding;
- every other tensor (pixel values, grid sizes, image sizes) is concatenated along its first dimension, in item
  order, which is how the models match them to their placeholder tokens. Items are only batched with items whose
  such tensors agree in every other dimension (``signature``), so pixel tensors are never padded.
Then one ``generate`` call (greedy; the first step's raw logits give the option probabilities) serves the batch.
``first_token_measure`` in probe.sweep, one item at a time, is the oracle the tests compare against. As a run-time
guard, every window of batches also measures at most two of its batched items alone (``guard_rows``: the most
left-padded one, and the most padded one of another kind of row, by which media and how many) and stops with
``BatchDisagrees`` if they differ: a transformers release that mishandled padding (positions, M-RoPE indices, the
mask) or the media of a batch in ``generate`` would otherwise make an evaluation silently wrong.
A batch that runs out of memory is halved and retried, down to one item, and the rest of that (model, data set)
runs at the smaller size (``BatchLimit``, ``run_halving``, which the head sweep's engines share): results are those of
that batch size. A window of items whose preparation runs out of memory (its inputs go to the model's device) is
halved the same way, by the same ``run_halving`` over windows (``BatchLimit.windows``).
"""
from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence, TypeVar

import torch

from probe.errors import RunStopped, out_of_memory
from probe.metrics import option_log_probs
from probe.models import LoadedModel
from probe.prompting import TOKEN_KEYS, ItemLike, encode_prompts
from probe.sweep import (Measurement, SweepConfig, first_token_measure, greedy_config, oracle_mismatch, overflow_steps,
                         prepare_item)
from probe.upstream import greedy_generate, head_must_run


def signature(inputs: dict[str, torch.Tensor]) -> tuple:
    """Items with equal signatures can share a batch: same keys, same non-leading shapes of the other tensors."""
    return tuple(sorted((k, tuple(v.shape[1:])) for k, v in inputs.items() if k not in TOKEN_KEYS))


def pad_token(loaded: LoadedModel) -> int:
    """The id padding is filled with: the tokenizer's pad token, else an end token (the mask hides it either way)."""
    pad = loaded.tokenizer.pad_token_id
    return pad if pad is not None else min(loaded.eos_token_ids)


def collate(batch: Sequence[dict[str, torch.Tensor]], pad_id: int, left: bool = True) -> dict[str, torch.Tensor]:
    """Left-pad (or right-pad) the token-aligned tensors and concatenate the others (see the module docstring)."""
    if len({signature(b) for b in batch}) != 1:
        raise ValueError("items of different input signatures cannot share a batch")
    width = max(b["input_ids"].shape[1] for b in batch)
    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        parts = [b[key] for b in batch]
        if key in TOKEN_KEYS:
            fill = pad_id if key == "input_ids" else 0
            fills = [torch.full((1, width - p.shape[1]), fill, dtype=p.dtype, device=p.device) for p in parts]
            rows = [torch.cat([f, p] if left else [p, f], 1) for f, p in zip(fills, parts)]
            out[key] = torch.cat(rows)
        else:
            out[key] = torch.cat(parts)
    return out


def measure_batch(
    loaded: LoadedModel, inputs: Sequence[dict[str, torch.Tensor]], letter_ids: Sequence[list[int]],
    cfg: SweepConfig,
) -> list[Measurement]:
    """One forward (or one greedy ``generate``) over the items; per item its option log-probs and text."""
    batch = collate(inputs, pad_token(loaded))
    with torch.no_grad(), head_must_run(loaded.model, loaded.family.lm_head_path):
        # generate also without generation (one step): it numbers each row's positions from the attention mask (each
        # family its own way, M-RoPE's too); a plain forward numbers the padding, so a left-padded row's RoPE
        # positions were shifted by its padding (organism-video: p off by 7e-5 in fp32 against the item alone)
        out = greedy_generate(loaded.model, batch, greedy_config(loaded, cfg.max_new_tokens if cfg.generate else 1),
                              loaded.eos_token_ids)
        first = out.logits[0]  # [B, V] raw logits of the first generated position
        texts: list[str | None] = [None] * len(inputs)
        bad: list[int | None] = [None] * len(inputs)
        if cfg.generate:
            new = out.sequences[:, batch["input_ids"].shape[1]:]
            texts = list(loaded.tokenizer.batch_decode(new, skip_special_tokens=True))
            bad = overflow_steps(out.logits, new, loaded.eos_token_ids)
    return [Measurement(option_log_probs(first[r], ids), texts[r], bad[r]) for r, ids in enumerate(letter_ids)]


# padded tokens a batch may spend beyond its real ones (a fraction of them). Padding is computed like any token, so
# on a CPU, where one long prompt already keeps the cores busy, a batch of 32 prompts of 100-300 tokens padded to
# the longest was slower than one item at a time (bench/eval.py: 0.7x); cut where the padding would pass this
MAX_PADDING = 0.1


def padding_cap(loaded: LoadedModel) -> float:
    """``MAX_PADDING`` on a CPU; on a GPU ``GPU_MAX_PADDING``, where a batch of prompts this short is bound by the
    per-call cost (kernel launches, ``generate``'s Python), not by its padded tokens: the 10 % cap cut 32 prompts of
    110-286 tokens into 4 batches and held batching at 3.3x one item at a time on an H200, against 17.8x for one
    batch (bench/eval.py). The GPU cap still bounds a batch to 1.5 times its real tokens (memory) where prompt
    lengths have a long tail, as MMMU's images give."""
    return MAX_PADDING if loaded.device.type == "cpu" else GPU_MAX_PADDING


GPU_MAX_PADDING = 0.5

# items per forward at most unless asked otherwise (probe.eval --batch-size, analyses.replicate's eval.batch_size).
# On a CPU a forward of these prompts is prefill-bound (compute): a bigger batch only adds padding work
# (README, bench/eval.py on organism-vl, one host: 2.7x one item at a time at batch 32, 2.4x at 64, 1.5x at 128,
# before the padding cut). On an accelerator a batch
# is bound by the per-call cost (kernel launches, generate's Python), so DESIGN §8 scores hundreds of items a
# forward; a batch too large for its memory is halved (run_halving), so a large default costs no failed run
CPU_BATCH_SIZE = 32
ACCELERATOR_BATCH_SIZE = 256
# items prepared (on the model's device) at once: CPU_BATCH_SIZE's 8 batches as before; at the accelerator's 256 a
# window is its batch, since 8 would put 2,048 items' pixels (two windows' with prefetching) on the GPU at once
WINDOW_ITEMS = 256


def default_batch_size(loaded: LoadedModel) -> int:
    """``CPU_BATCH_SIZE`` for a model on a CPU, ``ACCELERATOR_BATCH_SIZE`` on a GPU (or another accelerator)."""
    return CPU_BATCH_SIZE if loaded.device.type == "cpu" else ACCELERATOR_BATCH_SIZE


def say_on_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def past_bar(bar: Any, quiet: bool) -> Callable[[str], None]:
    """``BatchLimit.say`` for a command showing a tqdm progress bar (probe.eval, probe.heads): each back-off line
    on stderr, written past the bar so it does not tear it; nothing under --quiet."""
    return (lambda line: None) if quiet else (lambda line: bar.write(line, file=sys.stderr))


@dataclass
class BatchLimit:
    """Rows per forward in ``evaluate_items`` of one (model, data set), or in a head sweep's engine for the rest of
    its process (probe.heads): ``size`` as asked; ``rows`` the cap in force, halved wherever a batch ran out of
    memory and kept for the rest of the pair (``run_halving``); ``largest`` the most rows a forward that ran held.
    ``say`` prints the line of each back-off. ``windows``: in ``evaluate_items``, the same kind of cap on the items
    whose inputs are prepared at once (a window), halved where preparing one runs out of memory."""

    size: int
    say: Callable[[str], None] = say_on_stderr
    unit: str = "items"  # what a row is, and how long the cap holds, as the back-off line says
    scope: str = "this model and data set"
    doing: str = "on a batch"  # what ran out of memory, and what the cap cuts, as the back-off line says
    cuts: str = "batches"
    rows: int = field(init=False)
    largest: int = 0
    windows: BatchLimit | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.rows = self.size

    def capped(self) -> int | None:
        """The cap a back-off left, None without one."""
        return self.rows if self.rows < self.size else None

    def record(self) -> dict[str, Any]:
        """What run.json keeps of it: the size asked, the largest batch that ran and, after running out of memory,
        the size the pair finished at, else None; where it prepared windows (``evaluate_items``), the window a
        back-off in their preparation left (``out_of_memory_window``), else None."""
        return {"batch_size": self.size, "largest_batch": self.largest, "out_of_memory_cap": self.capped()} | (
            {"out_of_memory_window": self.windows.capped()} if self.windows is not None else {})


def plan_batches(inputs: Sequence[dict[str, torch.Tensor]], batch_size: int,
                 max_padding: float | None = MAX_PADDING) -> list[list[int]]:
    """Item indices grouped by signature, sorted by prompt length, cut to at most ``batch_size`` rows and, unless
    ``max_padding`` is None, wherever one more (longer) row would pad the batch by more than ``max_padding`` of its
    real tokens."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, x in enumerate(inputs):
        groups[signature(x)].append(i)
    batches: list[list[int]] = []
    for idx in groups.values():
        idx.sort(key=lambda i: inputs[i]["input_ids"].shape[1])
        batch: list[int] = []
        real = 0
        for i in idx:
            n = inputs[i]["input_ids"].shape[1]  # the longest so far: the batch's width if i joins
            too_padded = max_padding is not None and n * (len(batch) + 1) > (1 + max_padding) * (real + n)
            if batch and (len(batch) == batch_size or too_padded):
                batches.append(batch)
                batch, real = [], 0
            batch.append(i)
            real += n
        batches.append(batch)
    return batches


class BatchDisagrees(RunStopped):
    """A batched measurement differs from the same item measured alone: never report it."""


def most_padded(inputs: Sequence[dict[str, torch.Tensor]], batches: Sequence[list[int]]) -> int | None:
    """The item padded the most in its batch (the first such), or None when no batch has two rows: its row is the
    one where left padding, and the positions derived from it, matter most."""
    best, where = 0, None
    for idx in batches:
        width = max(inputs[i]["input_ids"].shape[1] for i in idx)
        for i in idx:
            pad = width - inputs[i]["input_ids"].shape[1]
            if len(idx) > 1 and (where is None or pad > best):
                best, where = pad, i
    return where


def row_kind(inputs: dict[str, torch.Tensor]) -> tuple:
    """Which media a row holds and how many: its ``signature`` (which media tensors; a text-only row has none) and
    the smallest leading dimension among them (0 for text). That is the number of images, clips or audios wherever
    the processor gives one row per medium (Qwen2-VL's image_grid_thw, LLaVA's pixel_values and image_sizes,
    audio features); where it gives a batch-of-one dimension (Idefics3) the number is in the signature. Rows of one
    kind go through the same path of the model (M-RoPE's image positions, where each image's features land)."""
    media = [v for k, v in inputs.items() if k not in TOKEN_KEYS]
    return signature(inputs), min((v.shape[0] for v in media), default=0)


def guard_rows(inputs: Sequence[dict[str, torch.Tensor]], batches: Sequence[list[int]],
               checked: set[tuple] | None = None) -> list[int]:
    """The rows of a window to measure alone as the guard, at most two (the cost: two forwards a window):
    the most padded one (``most_padded``), and, when the window's batched rows are of more than one ``row_kind``,
    the most padded row of another kind, one whose kind ``checked`` (the kinds checked earlier in the run, updated
    here) lacks first. The most padded row alone could be a text-only one beside batches of images (or a one-image
    row beside two-image ones), and a path broken only for media rows would pass. With two kinds in a window (text
    and images, one image and two) both are checked in every window; with more, every window checks two, the kinds
    not checked yet first, so a kind missed in one window is checked in the next window that holds it beside at most
    one other unchecked kind. A window of one kind (a text set) costs one forward, as before."""
    first = most_padded(inputs, batches)
    if first is None:
        return []
    kinds = {i: row_kind(inputs[i]) for idx in batches if len(idx) > 1 for i in idx}
    pad = {i: max(inputs[j]["input_ids"].shape[1] for j in idx) - inputs[i]["input_ids"].shape[1]
           for idx in batches if len(idx) > 1 for i in idx}
    seen = set() if checked is None else checked
    others = [i for i in kinds if kinds[i] != kinds[first]]
    rows = [first] + ([max(others, key=lambda i: (kinds[i] not in seen, pad[i], -i))] if others else [])
    seen.update(kinds[i] for i in rows)
    return rows


def check_against_one_item(loaded: LoadedModel, item: ItemLike, inputs: dict[str, torch.Tensor],
                           letter_ids: list[int], got: Measurement, cfg: SweepConfig) -> None:
    """Run-time guard (one extra forward per row ``guard_rows`` picks): the item measured alone must give what its
    batch gave."""
    if detail := oracle_mismatch(loaded, got, first_token_measure(loaded, inputs, letter_ids, cfg)):
        import transformers

        raise BatchDisagrees(
            f"batched evaluation disagrees with the same item measured alone (item {item.id}: {detail}) under "
            f"transformers {transformers.__version__}: its handling of padded batches has probably changed. Nothing "
            "was written for this model and data set; use --batch-size 1 meanwhile")


def evaluate_items(
    loaded: LoadedModel, items: Sequence[ItemLike], cfg: SweepConfig, batch_size: int | BatchLimit,
    progress: Callable[[int], None] = lambda n: None, window: int = 8,
    max_padding: float | Literal["device"] | None = "device",
    prefetch: bool | None = None,
) -> list[Measurement]:
    """Measurements of every item (no head masked), in item order, ``batch_size`` items per forward at most (a
    ``BatchLimit``: the caller reads back what ran; out of memory, fewer: ``run_halving``).

    Inputs are prepared ``window`` batches at a time (sorted by length within the window), but at most
    ``WINDOW_ITEMS`` items unless one batch holds more, so pixel tensors of a whole benchmark never sit in memory
    (a GPU's, with prefetching two windows) at once. A window whose preparation runs out of memory is dropped and
    halved like a batch (``run_halving`` over windows, ``BatchLimit.windows``): the numbers are those of windows of
    that size. Each window's ``guard_rows`` (its most padded item, and one of another kind of row) are measured
    alone too, as a guard (``check_against_one_item``). ``max_padding="device"`` is ``padding_cap``'s choice for the
    model's device.
    ``prefetch`` (default: when the model runs on an accelerator) prepares the next window in a thread while this
    one runs, and makes the first window a single batch: on the H200 preparing organism-vl's items (tokeniser,
    image processor, ~3 ms an item) took a third to half of its batched evaluation; on the CPU the thread would take
    cores from the model's own threads. Two windows' inputs are then held at once, and from the second window on
    the items share other batches than without it (p moves by the batch's rounding, as batching itself does). An
    item that cannot be prepared still stops the run after the windows before it, as without the thread.
    """
    import threading
    from concurrent.futures import Future, ThreadPoolExecutor

    limit = batch_size if isinstance(batch_size, BatchLimit) else BatchLimit(batch_size)
    batch_size = limit.size
    if max_padding == "device":
        max_padding = padding_cap(loaded)
    if prefetch is None:
        prefetch = prefetches(loaded)
    step = max(batch_size, min(batch_size * window, WINDOW_ITEMS))
    if limit.windows is None:  # kept with the batch cap: a back-off holds for the rest of the pair
        limit.windows = BatchLimit(step, limit.say, unit="items", scope=limit.scope, doing="preparing a window",
                                   cuts="windows")
    # prefetching, the first window is one batch: only its preparation is not hidden behind the model's work
    first = batch_size if prefetch else step
    order = list(range(len(items)))
    windows = [w for w in (order[:first], order[first:]) if w]  # run_halving cuts them to limit.windows.rows items

    stopped = threading.Event()

    def prepare(idx: list[int]) -> list[tuple[dict[str, torch.Tensor], list[int]]]:
        # one processor call for the window where it gives each item's own tensors (the call's overhead was half
        # of organism-vl's preparation); the tensors go to the device item by item below
        chunk = [items[i] for i in idx]
        encoded = encode_prompts(loaded, chunk, cfg.template, cfg.image_max_side) if not stopped.is_set() else []
        out = []
        for item, enc in zip(chunk, encoded):
            if stopped.is_set():  # the run stopped: nobody will measure this window (its tensors hold device memory)
                break
            out.append(prepare_item(loaded, item, cfg, enc))
        return out

    pool = ThreadPoolExecutor(1, thread_name_prefix="prepare") if prefetch and len(items) > first else None
    ahead: list[tuple[list[int], Future]] = []  # the window the thread prepares: its items, its future (one at most)

    def prepared(idx: list[int]) -> list[tuple[dict[str, torch.Tensor], list[int]]]:
        """``run_halving``'s measure: the window's inputs, from the thread where it prepared them. Its out of memory
        reaches ``run_halving`` through ``result``; the future is off ``ahead`` by then, so only the traceback holds
        the failed window's tensors, and ``free_memory`` frees them."""
        if ahead:
            want, future = ahead.pop()
            if want == idx:
                return future.result()
        return prepare(idx)

    def upcoming(idx: list[int]) -> None:  # the next window, prepared in the thread while this one runs
        if pool:
            ahead.append((idx, pool.submit(prepare, idx)))

    results: list[Measurement] = []
    checked: set[tuple] = set()  # the row kinds the guard has checked so far (guard_rows)

    def measure(idx: list[int], inputs: list[tuple[dict[str, torch.Tensor], list[int]]]) -> None:
        results.extend(measure_window(loaded, [items[i] for i in idx], inputs, cfg, limit, max_padding, progress,
                                      checked))

    try:
        run_halving(loaded, windows, limit.windows, prepared, measure, upcoming)
    finally:
        stopped.set()  # a thread preparing the next window ends it at the item it is on
        ahead.clear()
        if pool:  # a stop (an error, Ctrl-C) does not wait for a window nobody will measure
            pool.shutdown(wait=False, cancel_futures=True)
    return results


def prefetches(loaded: LoadedModel) -> bool:
    """``evaluate_items``' default: prepare the next window in a thread on an accelerator, not on the CPU (where the
    thread would take cores from the model's own threads)."""
    return loaded.device.type != "cpu"


def measure_window(loaded: LoadedModel, chunk: Sequence[ItemLike],
                   prepared: Sequence[tuple[dict[str, torch.Tensor], list[int]]], cfg: SweepConfig,
                   limit: BatchLimit, max_padding: float | None, progress: Callable[[int], None],
                   checked: set[tuple] | None = None) -> list[Measurement]:
    """One window of ``evaluate_items``: its items batched by ``plan_batches`` at ``limit.rows`` and measured in
    order, a batch that runs out of memory halved (``run_halving``: each item's numbers are then those of the
    smaller batches), then the ``guard_rows`` of the batches that ran, alone (``checked``: the row kinds checked in
    earlier windows, updated)."""
    inputs = [p[0] for p in prepared]
    got: list[Measurement | None] = [None] * len(chunk)
    ran: list[list[int]] = []

    def keep(rows: list[int], measured: list[Measurement]) -> None:
        for i, m in zip(rows, measured):
            got[i] = m
        ran.append(rows)
        progress(len(rows))

    run_halving(loaded, plan_batches(inputs, limit.rows, max_padding), limit,
                lambda rows: measure_batch(loaded, [inputs[i] for i in rows], [prepared[i][1] for i in rows], cfg),
                keep)
    for g in guard_rows(inputs, ran, checked):
        check_against_one_item(loaded, chunk[g], inputs[g], prepared[g][1], got[g], cfg)  # type: ignore[arg-type]
    return got  # type: ignore[return-value]


T = TypeVar("T")
R = TypeVar("R")


def run_halving(loaded: LoadedModel, batches: Sequence[Sequence[T]], limit: BatchLimit,
                measure: Callable[[list[T]], R], keep: Callable[[list[T], R], None],
                upcoming: Callable[[list[T]], None] | None = None) -> None:
    """Run the planned ``batches`` in order, each cut to at most ``limit.rows``: ``measure(batch)``, then ``keep(batch,
    what it gave)``. A batch whose ``measure`` runs out of memory (``out_of_memory``) is halved and retried once its
    memory is freed, and ``limit.rows`` stays at the half for whatever runs under ``limit`` later (a later batch of the
    old size would most likely run out too); ``limit.say`` prints one line a back-off. ``measure`` must change nothing
    that a retry would see (``keep`` stores). Out of memory with one row, any other error, or any error in ``keep`` (a
    guard's own forward) ends the run as before. ``upcoming(next batch)``, where given, is told the batch that comes
    next before ``keep`` runs (``evaluate_items`` prepares it meanwhile). Shared by probe.eval's batches and windows
    and the head sweep's engines."""
    pending = [list(b) for b in batches][::-1]  # a stack, the next batch last

    def cut() -> None:  # the next batch to at most limit.rows: planned before a back-off, or the halves of one
        while pending and len(pending[-1]) > limit.rows:
            batch = pending.pop()
            pending.extend([batch[s:s + limit.rows] for s in range(0, len(batch), limit.rows)][::-1])

    while True:
        cut()
        if not pending:
            return
        batch = pending.pop()
        try:
            measured = measure(batch)
        except (RuntimeError, MemoryError) as exc:
            if (where := out_of_memory(exc)) is None or len(batch) == 1:
                raise
        else:
            limit.largest = max(limit.largest, len(batch))
            cut()
            if upcoming is not None and pending:
                upcoming(pending[-1])
            keep(batch, measured)
            measured = None  # not held while the next batch is measured (a window's inputs are on the device)
            continue
        # out of the except block, so the exception and its traceback are gone: its frames held the failed batch's
        # padded inputs, activations and cache, which must be freed before the retry
        free_memory(loaded)
        limit.rows = (len(batch) + 1) // 2
        limit.say(f"out of memory in {where} {limit.doing} of {len(batch)} {limit.unit}: {limit.cuts} of at most "
                  f"{limit.rows} for the rest of {limit.scope}")
        pending.append(batch)


def free_memory(loaded: LoadedModel) -> None:
    """What a failed batch left: objects only the garbage collector frees (an exception held in a frame of its
    traceback), then, on a GPU, the allocator's cached blocks, so a smaller batch finds them free."""
    import gc

    gc.collect()
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()
