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
"""
from __future__ import annotations

import os

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


def _sweep(engine: str, loaded, items, generate: bool = False, batch_size: int = 16) -> pd.DataFrame:
    from probe.sweep import SweepConfig, get_engine

    g = loaded.geometry
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    cfg = SweepConfig(generate=generate, batch_size=batch_size, max_new_tokens=3)
    return pd.DataFrame(get_engine(engine)(loaded, items, heads, cfg))


def _per_head_kl(df: pd.DataFrame) -> pd.Series:
    return df[df["layer"] >= 0].groupby(["layer", "head"])["kl"].mean()


@pytest.mark.parametrize("alias", ORGANISMS)
def test_exact_equals_naive_in_bf16(alias):
    loaded = _load(alias, "bfloat16")
    items = _items(alias, 8)
    naive, exact = _sweep("naive", loaded, items), _sweep("exact", loaded, items)
    assert list(zip(naive["item_id"], naive["layer"], naive["head"])) == list(
        zip(exact["item_id"], exact["layer"], exact["head"]))
    assert np.abs(naive["p_answer"] - exact["p_answer"]).max() <= 0.05
    assert (np.abs(naive["kl"] - exact["kl"]) <= 0.05 + 0.1 * naive["kl"]).all()
    assert (naive["prob_pred"] == exact["prob_pred"]).mean() >= 0.95
    assert exact.loc[exact["layer"] >= 0, "kl"].max() > 0.05  # trained heads matter: not 0 == 0


@pytest.mark.parametrize("alias", ORGANISMS)
def test_per_head_kl_in_bf16_ranks_heads_as_fp32_does(alias):
    items = _items(alias)
    fp32 = _per_head_kl(_sweep("exact", _load(alias, "float32"), items))
    bf16 = _per_head_kl(_sweep("exact", _load(alias, "bfloat16"), items))
    rho = spearmanr(fp32.values, bf16.values)[0]
    assert rho >= 0.99, f"{alias}: Spearman {rho:.4f}"


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
    assert np.mean([int(a.logp.argmax()) == int(b.logp.argmax()) for a, b in zip(got, want)]) >= 0.95


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
