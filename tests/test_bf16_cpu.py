"""bf16 on the CPU: what tests/test_gpu.py asserts of half precision on a GPU (exact == naive, per-head KL ranked as
in fp32, batched evaluation's guard and answers), with its helpers and its stated tolerances, on fewer items so CI
runs them. They check the engines' bf16 code paths (casts, the fp32 LM head, masking gates in the model's dtype), not
a GPU's kernels: cuBLAS picks kernels, and orders of summation, by shape, where the CPU's bf16 matmuls and sdpa give
a row the same sums whatever the batch around it (2026-12-07, Intel Xeon with AMX/AVX-512 BF16 and with oneDNN off:
exact − naive |Δp| ≤ 6e-7 on the four organisms, as in fp32). So on the CPU the fast paths must also match their
one-item oracles to fp32's guard tolerance (1e-3), which catches what bf16's 0.05 lets through: logits rounded to
bf16 (the fp32 LM head bypassed) in the exact engine moved p(answer) by up to 0.004 (organism-vl) and 0.006 (ov-si),
in batched evaluation by 0.006, and every stated tolerance still held (mutants tried 2026-12-07)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_gpu import (_items, _load, _per_head_kl, _sweep, assert_answers_as_fp32, assert_exact_equals_naive_in_half,
                      assert_ranks_heads_as_fp32)

from probe.sweep import GUARD_TOLERANCE

CPU_TOLERANCE = GUARD_TOLERANCE[torch.float32]  # batch-invariant sums: fast path and oracle agree as in fp32


@pytest.fixture(scope="module")
def loaded():
    """``loaded(alias, dtype)``: the organism on the CPU, loaded once for the module (the tests leave it as found)."""
    cache: dict = {}
    torch.set_num_threads(1)  # 2 shared cores and two xdist workers

    def get(alias: str, dtype: str):
        if (alias, dtype) not in cache:
            cache[alias, dtype] = _load(alias, dtype, device="cpu")
        return cache[alias, dtype]

    return get


def _max_dp(a: list, b: list) -> float:
    """Largest |Δp| over any option of any item between two runs of evaluate_items."""
    return max(float((x.logp.float().exp() - y.logp.float().exp()).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("alias", ["organism-vl", "organism-ov-si"])
def test_exact_equals_naive_in_bf16_on_the_cpu(loaded, alias):
    m, items = loaded(alias, "bfloat16"), _items(alias, 2)
    naive, exact = _sweep("naive", m, items), _sweep("exact", m, items)
    assert m.model.dtype == torch.bfloat16
    assert_exact_equals_naive_in_half(naive, exact)
    np.testing.assert_allclose(exact["p_answer"], naive["p_answer"], atol=CPU_TOLERANCE, rtol=0)
    np.testing.assert_allclose(exact["kl"], naive["kl"], atol=CPU_TOLERANCE, rtol=0)


def test_per_head_kl_in_bf16_on_the_cpu_ranks_heads_as_fp32_does(loaded):
    items = _items("organism-vl", 4)  # 32 items on a GPU; on the CPU 4 gave 0.998, 32 gave 0.998 (2026-12-07)
    fp32, bf16 = (_per_head_kl(_sweep("exact", loaded("organism-vl", d), items)) for d in ("float32", "bfloat16"))
    assert_ranks_heads_as_fp32(fp32, bf16, "organism-vl")
    assert not np.allclose(fp32.values, bf16.values, atol=1e-4, rtol=0)  # really two precisions


def test_batched_evaluation_in_bf16_on_the_cpu_passes_its_guard_and_answers_as_fp32(loaded):
    from probe.batch import evaluate_items
    from probe.sweep import SweepConfig, first_token_measure, prepare_item

    items, cfg = _items("organism-vl", 16), SweepConfig(max_new_tokens=3)
    half = loaded("organism-vl", "bfloat16")
    got = evaluate_items(half, items, cfg, batch_size=4, window=1)  # the guard runs in each of the 4 windows
    alone = [first_token_measure(half, *prepare_item(half, item, cfg), cfg) for item in items]  # the guard's oracle
    assert_answers_as_fp32(got, evaluate_items(loaded("organism-vl", "float32"), items, cfg, batch_size=4))
    assert _max_dp(got, alone) <= CPU_TOLERANCE  # every item, not only the rows the guard picks
    assert pd.Series([m.response for m in got]).equals(pd.Series([m.response for m in alone]))


@pytest.mark.parametrize("family, data", [("qwen2_vl", "image"), ("llava_onevision", "video")])
def test_a_bf16_models_inputs_carry_its_dtype_in_their_pixels_and_leave_the_ids_alone(family, data, tiny_dirs):
    """build_inputs' casts (mut48): pixels (images or video frames) in the model's dtype, ids, masks and grids as
    tokenised. Mutants leaving the pixels in fp32 or casting only ``pixel_values`` passed every bf16 test: these
    towers cast pixels to their own dtype first, so the numbers agree, but the fp32 copy takes twice the device
    memory (on a GPU) and a tower that does not cast would fail. Oracle: encode_prompt's CPU tensors cast by hand."""
    from conftest import REPO

    from probe.mmmu import load_items
    from probe.models import load_model, resolve_model
    from probe.prompting import PromptTemplate, build_inputs, encode_prompt, render_prompt

    loaded = load_model(resolve_model(str(tiny_dirs[family])), dtype="bfloat16", device="cpu")
    item = load_items(str(REPO / "probe/zoo/data" / data), limit=1)[0][0]
    raw = encode_prompt(loaded, item, render_prompt(loaded, item, PromptTemplate(), None))
    got = build_inputs(loaded, item, PromptTemplate())
    floats = sorted(k for k, v in raw.items() if v.is_floating_point())
    assert floats == [f"pixel_values{'_videos' if data == 'video' else ''}"]
    assert sorted(got) == sorted(raw)
    for k, v in raw.items():
        want = v.to(torch.bfloat16) if k in floats else v
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
