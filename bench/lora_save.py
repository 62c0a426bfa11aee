"""LoRA checkpoint benchmark: the streamed merge analyses.finetune writes (``write_lora_merge``: the source's tensors
one at a time, each adapted projection plus its B·A·α/R) against peft's merge of a float32 copy of the whole model
(``deepcopy(model).float().merge_and_unload().save_pretrained``, how checkpoints were saved before), same model,
same adapter, one run.

    python bench/lora_save.py                       # Qwen2-7B's layer shapes, 2 layers, 32k vocab, frozen bf16
    python bench/lora_save.py --layers 4 --dtype float32

The source is saved in the frozen weights' dtype, as real checkpoints are (bf16). Prints each way's wall time and
the extra resident anonymous memory it needed at its peak (sampled every 2 ms), and checks
that both wrote the same weights (loaded back through transformers, bit for bit). Random weights built from
probe.archs (no download); the rank-16 adapter has random B, so every projection moves.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses.finetune import add_lora, write_lora_merge  # noqa: E402
from analyses.writer import copy_side_files  # noqa: E402
from probe.archs import build_random  # noqa: E402
from probe.errors import ArgParser, check_counts, cli_main  # noqa: E402
from probe.models import load_model, resolve_model  # noqa: E402


def rss() -> int:
    """Resident anonymous memory (RssAnon): what a save must hold; pages of a mapped checkpoint file are
    reclaimable and not counted."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def peak_extra(fn: Callable[[], object]) -> tuple[float, int]:
    """Seconds ``fn`` took and the most resident memory it held beyond what was resident when it started."""
    start, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    return seconds, max(peak[0], rss()) - start


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="python bench/lora_save.py", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of Qwen2-7B's shape (default: 2)")
    ap.add_argument("--vocab-size", type=int, default=32000, help="vocabulary (default: 32000)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="the frozen weights' dtype, and the source checkpoint's (default: bfloat16)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapter (default: 16)")
    args = ap.parse_args(argv)
    check_counts(args, ["layers", "vocab_size", "rank"])
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        built = build_random("qwen2-7b", source, dtype=args.dtype, layers=args.layers, vocab_size=args.vocab_size)
        built.model.save_pretrained(source)
        n_params = sum(p.numel() for p in built.model.parameters())
        del built
        loaded = add_lora(load_model(resolve_model(str(source)), dtype=args.dtype, logits_fp32=False), args.rank)
        with torch.no_grad():
            for name, p in loaded.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.01)
        streamed, copied = Path(tmp) / "streamed", Path(tmp) / "copied"
        streamed.mkdir()
        t_new, m_new = peak_extra(lambda: write_lora_merge(loaded, source, streamed))
        t_old, m_old = peak_extra(
            lambda: copy.deepcopy(loaded.model).float().merge_and_unload().save_pretrained(copied))
        for d in (streamed, copied):  # tokenizer files, as save_checkpoint adds them
            copy_side_files(source, d, keep_existing=True)
        a = dict(load_model(resolve_model(str(streamed))).model.named_parameters())
        b = dict(load_model(resolve_model(str(copied))).model.named_parameters())
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gb = 1e9
    print(f"Qwen2-7B layer shapes, {args.layers} layers, vocab {args.vocab_size}: {n_params / 1e6:.0f}M parameters, "
          f"frozen {args.dtype} ({n_params * (2 if args.dtype == 'bfloat16' else 4) / gb:.2f} GB), LoRA rank "
          f"{args.rank}")
    print(f"{'way':<42}{'seconds':>9}{'extra peak GB':>15}")
    print(f"{'peft merge of a float32 copy (before)':<42}{t_old:>9.2f}{m_old / gb:>15.2f}")
    print(f"{'streamed from the source (write_lora_merge)':<42}{t_new:>9.2f}{m_new / gb:>15.2f}")
    print(f"memory: {m_old / max(m_new, 1):.1f}x less; time: {t_old / t_new:.2f}x; same weights: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(cli_main(main))
