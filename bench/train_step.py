"""Training-step benchmark: the loop's step (modality parts, logits only where a label is predicted) against the
whole batch padded together with transformers' own loss (the step before), same rows, same model, one run.

    python bench/train_step.py                    # the organisms, batches mixed as their recipes mix them
    python bench/train_step.py --repeats 10 --threads 2

Each case draws one seeded batch of 24 rows in the recipe's proportions (organism-video: 80 % clips, 20 % single
images; organism-vl: 80 % images, 20 % text; organism-base: text) from the shipped validation sets, and times
forward + backward (no optimiser step) of both variants alternately, median over ``--repeats``. Also prints the
largest difference between the two variants' gradients, which the tests bound (tests/test_zoo.py).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe.errors import ArgParser, check_counts, cli_main  # noqa: E402
from probe.mmmu import load_mmmu  # noqa: E402
from probe.models import LoadedModel  # noqa: E402
from probe.train import collate, encode, label_count, label_loss, model_inputs, modality_parts  # noqa: E402
from probe.zoo import organism_dir, validation_dir  # noqa: E402
from probe.zoo.build import OWN, _load  # noqa: E402

CASES = {"video": ("image_single", 0.2), "vl": ("text", 0.2), "base": (None, 0.0)}


def batch_rows(loaded: LoadedModel, name: str, batch: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    own = encode(loaded, load_mmmu(validation_dir(OWN[name]), "validation")[0], True)
    mixed, share = CASES[name]
    n_mix = round(batch * share)
    rows = rng.choices(own, k=batch - n_mix)
    if mixed:
        rows += rng.choices(encode(loaded, load_mmmu(validation_dir(mixed), "validation")[0], True), k=n_mix)
    rng.shuffle(rows)
    return rows


def whole(loaded: LoadedModel, rows: list[dict]) -> None:
    loaded.model(**model_inputs(collate(rows, loaded.tokenizer.pad_token_id))).loss.backward()


def parts(loaded: LoadedModel, rows: list[dict]) -> None:
    n_labels = label_count(rows)
    for part in modality_parts(rows).values():
        label_loss(loaded.model, collate(part, loaded.tokenizer.pad_token_id), n_labels).backward()


def grads(loaded: LoadedModel, step: Callable[[LoadedModel, list[dict]], None],
          rows: list[dict]) -> dict[str, torch.Tensor]:
    loaded.model.zero_grad(set_to_none=True)
    step(loaded, rows)
    return {n: p.grad.clone() for n, p in loaded.model.named_parameters() if p.grad is not None}


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="python bench/train_step.py", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organisms", nargs="+", default=list(CASES), choices=list(CASES), help="cases to time (default: all)")
    ap.add_argument("--batch-size", "--batch", type=int, default=24,
                    help="rows per batch, as analyses.finetune's --batch-size (--batch: the old name) (default: 24)")
    ap.add_argument("--repeats", type=int, default=6, help="timed repeats, median reported (default: 6)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the batch drawn (default: 0)")
    args = ap.parse_args(argv)
    check_counts(args, ("batch_size", "repeats", "threads"))
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), batch {args.batch_size}, median of {args.repeats}")
    print("| organism | rows (tokens) | whole batch, padded | parts + logits_to_keep | speed-up | max |Δ grad| |")
    print("|---|---|---|---|---|---|")
    for name in args.organisms:
        loaded = _load(organism_dir(f"organism-{name}"))
        loaded.model.train()
        rows = batch_rows(loaded, name, args.batch_size, args.seed)
        lengths = sorted(r["input_ids"].shape[0] for r in rows)
        diff = max(float((a - b).abs().max()) for a, b in zip(grads(loaded, whole, rows).values(),
                                                                 grads(loaded, parts, rows).values()))
        times: dict[str, list[float]] = {"whole": [], "parts": []}
        for _ in range(args.repeats):
            for label, step in (("whole", whole), ("parts", parts)):
                loaded.model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                step(loaded, rows)
                times[label].append(time.perf_counter() - t0)
        a, b = statistics.median(times["whole"]), statistics.median(times["parts"])
        print(f"| organism-{name} | {len(rows)} ({lengths[0]}–{lengths[-1]}) | {a:.3f} s | {b:.3f} s | "
              f"**{a / b:.2f}×** | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
