"""FSDP loading benchmark: what each rank of ``torchrun … -m analyses.finetune --fsdp`` holds while the model loads
and is sharded, when rank 0 alone reads the checkpoint and the other ranks build it on the meta device
(``probe.fsdp.load_for_sharding``, what --fsdp does) against every rank reading the whole checkpoint first (how
--fsdp loaded before), same model, one run.

    python bench/fsdp_load.py                       # Qwen2-7B's layer shapes, 2 layers, 32k vocab
    python bench/fsdp_load.py --layers 4 --processes 4 --source-dtype float32

The checkpoint is saved in bfloat16, as real ones are, and loaded in float32, as full fine-tuning holds it.

``--step`` measures instead what a rank holds beyond its shards in one training step (forward under the loop's
autocast or in float32, backward, gradients reduce-scattered; 2 rows of 64 tokens a rank): with float32 weights
and bfloat16 autocast, are the step's bfloat16 casts of every weight held whole until the backward, as
``probe.models.check_trains_fits`` assumes for ``--fsdp``? Prints each precision's peak beyond the shards and
the difference, against the bfloat16 copy of all the weights, and what the check counts beyond the weight shards
for such a step: the gradient shards, the weights a forward gathers whole (``fsdp_gathered_bytes``: the root group
and two decoder layers), the gradients the backward holds whole (``fsdp_backward_grad_bytes``: the root group's and
two decoder layers'), and under autocast the bfloat16 copy of every weight (AdamW's moments come with the
optimiser's step, which this does not run).

Each way runs under ``torch.distributed.run`` on the CPU (gloo): load, then ``probe.fsdp.shard``. Prints per rank the
seconds, the peak resident anonymous memory beyond what the process held before loading (sampled every 2 ms;
pages of the mapped checkpoint file are not counted) and what it still holds after sharding, and checks that both
ways give every rank the same shards, bit for bit. Random weights built from probe.archs (no download).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lora_save import peak_extra, rss  # noqa: E402
from probe.errors import ArgParser, check_counts, cli_main  # noqa: E402

WAYS = {"rank0": "rank 0 reads, others meta (--fsdp now)", "every": "every rank reads (before)"}
STEPS = {"float32": "one step in float32", "bfloat16": "one step under bf16 autocast"}


def step_worker(precision: str, source: str, out: str) -> None:
    """One rank: load and shard ``source`` as --fsdp does, then one forward and backward of 2 rows of 64 random
    tokens (``precision``: the loop's bfloat16 autocast, or float32); appends the step's peak resident memory beyond
    what the rank held with its shards to ``out`` (one JSON line)."""
    import contextlib

    from probe import fsdp
    from probe.models import resolve_model

    rank, world = fsdp.init(cpu=True)
    ref = resolve_model(source)
    loaded = fsdp.load_for_sharding(ref, "float32", "cpu", rank)
    fsdp.shard(loaded.model, ref.family.layers_path, torch.device("cpu"), world)
    model = loaded.model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(rank))
    cast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16" else contextlib.nullcontext())

    saved: dict[int, int] = {}  # storage → bytes of the weight-sized bfloat16 tensors autograd keeps

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bfloat16 and t.dim() == 2 and t.numel() >= 2**20:  # a weight's cast, not activations
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with cast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()

    seconds, peak = peak_extra(step)
    casts = sum(p.numel() * 2 for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps({"way": precision, "rank": rank, "seconds": seconds, "peak": peak,
                            "saved_casts": sum(saved.values()), "matmul_weights_bf16": casts}) + "\n")


def check_counts_beyond_shards(source: Path, processes: int) -> dict[str, int]:
    """What ``check_trains_fits`` counts a rank holding beyond its weight shards in a step of ``--step``'s, each
    precision: the gradient shards, ``fsdp_gathered_bytes`` and ``fsdp_backward_grad_bytes`` (every parameter
    trains), and under autocast the bfloat16 copy of every weight; float32 weights, from the config alone."""
    from probe.dispatch import module_nbytes
    from probe.models import fsdp_backward_grad_bytes, fsdp_gathered_bytes, resolve_model, skeleton_of

    ref = resolve_model(str(source))
    skeleton = skeleton_of(ref, torch.float32)
    weights = module_nbytes(skeleton)
    params = [p for p in skeleton.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in params)
    layers = ref.family.layers_path
    fp32 = (grads / processes + fsdp_gathered_bytes(skeleton, layers)
            + fsdp_backward_grad_bytes(skeleton, layers, params))
    return {"float32": int(fp32), "bfloat16": int(fp32) + weights // 2}


def shard_check(tensors: list[torch.Tensor]) -> str:
    """What the two ways' ranks compare, bit for bit: a SHA-256 of each tensor's dtype, shape and raw bytes, in
    order (a sum of the elements passed -0.0 for 0.0 and failed on a NaN)."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # its buffer, not a copy
    return h.hexdigest()


def worker(way: str, source: str, out: str) -> None:
    """One rank: load ``source`` the ``way`` given, shard it, append its numbers to ``out`` (one JSON line)."""
    from probe import fsdp
    from probe.models import load_model, resolve_model

    rank, world = fsdp.init(cpu=True)
    ref = resolve_model(source)
    start = rss()

    def load_and_shard():
        if way == "rank0":
            loaded = fsdp.load_for_sharding(ref, "float32", "cpu", rank)
        else:
            loaded = load_model(ref, dtype="float32", logits_fp32=False)
        fsdp.shard(loaded.model, ref.family.layers_path, torch.device("cpu"), world)
        return loaded

    held = []
    seconds, peak = peak_extra(lambda: held.append(load_and_shard()))
    after = rss() - start
    model = held[0].model
    line = {"way": way, "rank": rank, "seconds": seconds, "peak": peak, "after": after,
            "check": shard_check([*(p.to_local() for p in model.parameters()), *model.buffers()])}
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="python bench/fsdp_load.py", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of Qwen2-7B's shape (default: 2)")
    ap.add_argument("--vocab-size", type=int, default=32000, help="vocabulary (default: 32000)")
    ap.add_argument("--processes", type=int, default=2, help="torchrun processes (default: 2)")
    ap.add_argument("--source-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="the checkpoint's dtype (default: bfloat16); it loads in float32")
    ap.add_argument("--step", action="store_true", help="measure one training step's memory beyond the shards "
                    "in float32 and under bf16 autocast instead of the loading")
    args = ap.parse_args(argv)
    check_counts(args, ["layers", "vocab_size", "processes"])
    from probe.archs import build_random

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        built = build_random("qwen2-7b", source, dtype=args.source_dtype, layers=args.layers,
                             vocab_size=args.vocab_size)
        built.model.save_pretrained(source)
        n_params = sum(p.numel() for p in built.model.parameters())
        del built
        counted = check_counts_beyond_shards(source, args.processes)
        results = Path(tmp) / "results.jsonl"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        for way in STEPS if args.step else WAYS:
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.processes),
                            __file__, "--worker", way, str(source), str(results)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    gb = 1e9
    if args.step:
        print(f"Qwen2-7B layer shapes, {args.layers} layers, vocab {args.vocab_size}: {n_params / 1e6:.0f}M "
              f"parameters in float32 ({n_params * 4 / gb:.2f} GB; their bfloat16 copy {n_params * 2 / gb:.2f} GB), "
              f"{args.processes} gloo processes under --fsdp, one step of 2 rows x 64 tokens a rank")
        print(f"{'step':<32}{'rank':>5}{'seconds':>9}{'peak beyond the shards GB':>27}{'bf16 casts saved GB':>21}")
        for r in sorted(rows, key=lambda r: (list(STEPS).index(r["way"]), r["rank"])):
            print(f"{STEPS[r['way']]:<32}{r['rank']:>5}{r['seconds']:>9.2f}{r['peak'] / gb:>27.2f}"
                  f"{r['saved_casts'] / gb:>21.2f}")
        print(f"the bfloat16 copy of every matmul weight: {rows[0]['matmul_weights_bf16'] / gb:.2f} GB")
        extra = [next(r["peak"] for r in rows if r["way"] == "bfloat16" and r["rank"] == k)
                 - next(r["peak"] for r in rows if r["way"] == "float32" and r["rank"] == k)
                 for k in range(args.processes)]
        print("autocast's extra a rank: " + ", ".join(f"{e / gb:.2f}" for e in extra)
              + f" GB, against {n_params * 2 / gb:.2f} GB for a bfloat16 copy of every weight (what "
              "check_trains_fits counts)")
        for way in STEPS:
            peak = max(r["peak"] for r in rows if r["way"] == way)
            print(f"{STEPS[way]}: check_trains_fits counts {counted[way] / gb:.2f} GB beyond the weight shards, the "
                  f"highest rank's peak {peak / gb:.2f} GB ({(counted[way] - peak) / gb:+.2f} GB)")
        return 0
    print(f"Qwen2-7B layer shapes, {args.layers} layers, vocab {args.vocab_size}: {n_params / 1e6:.0f}M parameters, "
          f"saved in {args.source_dtype}, loaded in float32 ({n_params * 4 / gb:.2f} GB); {args.processes} gloo "
          "processes, load then probe.fsdp.shard")
    print(f"{'way':<42}{'rank':>5}{'seconds':>9}{'peak extra GB':>15}{'held after GB':>15}")
    for r in sorted(rows, key=lambda r: (list(WAYS).index(r["way"]), r["rank"])):
        print(f"{WAYS[r['way']]:<42}{r['rank']:>5}{r['seconds']:>9.2f}{r['peak'] / gb:>15.2f}{r['after'] / gb:>15.2f}")
    total = {way: sum(r["peak"] for r in rows if r["way"] == way) for way in WAYS}
    check = {way: sorted((r["rank"], r["check"]) for r in rows if r["way"] == way) for way in WAYS}
    same = check["rank0"] == check["every"]
    print(f"sum of the ranks' peaks: {total['every'] / gb:.2f} GB before, {total['rank0'] / gb:.2f} GB now "
          f"({total['every'] / max(total['rank0'], 1):.1f}x less); same shards: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        (step_worker if sys.argv[2] in STEPS else worker)(*sys.argv[2:])
    else:
        sys.exit(cli_main(main))
