"""Salience-guided merging (DESIGN §9), task arithmetic and TIES against independent oracles: an in-memory
implementation written slice by slice, the degenerate cases, Eq. 4 on the rest, and mergekit 0.1.5."""
from __future__ import annotations

import csv
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analyses import merge, tiny
from analyses.formulas import TiesTrim, TrimSearch, ties_merge
from conftest import canonical, change_weights_in_place
from test_analyses_merge import run, tiny_qwen2_view

L, H, KV, D = 2, 4, 2, 8  # analyses.tiny.TEXT: 2 layers × 4 query heads, 2 KV heads, head_dim 32 / 4


def write_run(path: Path, kl: torch.Tensor, status: str = "complete", layers: int = L, heads: int = H,
              model: Path | None = None, fingerprint: str | None = None,
              drops: tuple[torch.Tensor, torch.Tensor] | None = None, **plan_extra) -> Path:
    """A probe.heads output dir holding only what the merge reads: heads.csv and run.json (with the measured
    model's path when ``model`` is given, and its fingerprint then when ``fingerprint`` is). The drops are kl / 2
    and kl / 3 unless ``drops`` gives (accuracy_drop, prob_accuracy_drop) tables of their own."""
    path.mkdir(parents=True)
    rows = ["layer,head,accuracy,prob_accuracy,kl,n_items,accuracy_drop,prob_accuracy_drop,p_answer"]
    for layer in range(layers):
        for h in range(heads):
            v = float(kl[layer, h]) if layer < kl.shape[0] and h < kl.shape[1] else 0.1
            acc, prob = (v / 2, v / 3) if drops is None else (float(drops[0][layer, h]), float(drops[1][layer, h]))
            rows.append(f"{layer},{h},0.5,0.5,{v!r},8,{acc!r},{prob!r},0.5")
    (path / "heads.csv").write_text("\n".join(rows) + "\n")
    plan = {"plan": {"model_path": str(model)}} if model is not None else {}
    if fingerprint is not None:
        plan["plan"]["model_fingerprint"] = fingerprint
    if plan:
        plan["plan"] |= plan_extra
    (path / "run.json").write_text(json.dumps({"status": status} | plan))
    return path


def eq3(base: torch.Tensor, theta: torch.Tensor) -> float:
    """Eq. 3's Δavg = mean |θ_base − θ| written out here (the fp32 difference, averaged in fp64), not
    analyses.formulas' delta_avg: an oracle of its own for the merge, which shares that module."""
    return float((base.float() - theta.float()).double().abs().mean())


def in_memory_salience(base, experts, tables, tau, alpha0, base_table=None, heads=(H, KV, D), rest="shift"):
    """DESIGN §9 written out slice by slice (loops over heads), the rest by Eq. 4 (τ 1e-3, Δavg by eq3), or
    (``rest="layer"``) a decoder layer's other tensors by the same rule on the mean ŝ of its heads.
    ``heads``: (query heads, KV heads, head width) of the LM, as its config.json states them."""
    n_heads, n_kv, d = heads
    shat = [t.double().clamp_min(0) / t.double().clamp_min(0).mean() for t in ([base_table] if base_table is not None else []) + tables]
    thetas = [base] + experts

    def weights(values):  # one slice: [participants]
        w = torch.softmax(torch.tensor(values, dtype=torch.float64) / tau, 0)
        return w.tolist() if base_table is not None else [alpha0] + [(1 - alpha0) * x for x in w.tolist()]

    out = {}
    for name, ref in base.items():
        parts = name.split(".")
        if (len(parts) >= 5 and parts[2] == "self_attn" and parts[3] in ("q_proj", "k_proj", "v_proj", "o_proj")
                and parts[3:] != ["o_proj", "bias"]):  # o_proj's bias is added after the heads are summed
            layer, proj = int(parts[1]), parts[3][0]
            acc = torch.zeros(ref.shape, dtype=torch.float32)
            units = n_heads if proj in "qo" else n_kv
            for j in range(units):
                if proj in "qo":
                    s = [t[layer, j] for t in shat]
                else:
                    s = [t[layer, j * (n_heads // n_kv):(j + 1) * (n_heads // n_kv)].mean() for t in shat]
                sl = slice(j * d, (j + 1) * d)
                for w, th in zip(weights([float(x) for x in s]), thetas):
                    x = th[name].float()
                    if proj == "o":
                        acc[:, sl] += w * x[:, sl]
                    else:
                        acc[sl] += w * x[sl]
            out[name] = acc
        else:
            if rest == "layer" and parts[0] == "layers":  # embeddings, the final norm and lm_head stay on Eq. 4
                coeffs = weights([float(t[int(parts[1])].mean()) for t in shat])
            else:  # Eq. 3 and 4 written out, not analyses.formulas' (which the merge itself calls)
                deltas = torch.tensor([eq3(ref, e[name]) for e in experts], dtype=torch.float64)
                coeffs = [alpha0, *((1 - alpha0) * torch.softmax(deltas / 1e-3, 0)).tolist()]
            acc = torch.zeros(ref.shape, dtype=torch.float32)
            for c, th in zip(coeffs, thetas):
                acc += c * th[name].float()
            out[name] = acc
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    return tiny.build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sal")
    g = torch.Generator().manual_seed(0)
    tables = [torch.rand(L, H, generator=g) * 3 for _ in range(3)]
    return {"tables": tables, "dirs": [write_run(root / f"e{i}", t) for i, t in enumerate(tables)],
            "base_table": torch.rand(L, H, generator=g), "base_dir": None, "root": root}


@pytest.mark.parametrize("with_base", [False, True])
def test_salience_merge_equals_in_memory(zoo, runs, tmp_path, with_base, capfd):
    experts = [zoo["vl"], zoo["ov"], zoo["au"]]  # Qwen2-VL, LLaVA-OneVision, Qwen2-Audio layouts
    extra = []
    if with_base:
        extra = ["--base-salience", write_run(tmp_path / "b", runs["base_table"])]
    out = tmp_path / "m"
    assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience", "--salience",
               *runs["dirs"], *extra, "--salience-temperature", 0.5, "--alpha0", 0.4, "--out", out) == 0
    got = canonical(out)
    want = in_memory_salience(canonical(zoo["base"]), [canonical(e) for e in experts], runs["tables"], 0.5, 0.4,
                              runs["base_table"] if with_base else None)
    for name, t in want.items():
        torch.testing.assert_close(got[name].float(), t, rtol=1e-6, atol=1e-7, msg=name)
    rows = list(csv.DictReader(open(out / "merge_weights.csv")))
    q = [r for r in rows if r["tensor"] == "layers.1.self_attn.q_proj.weight" and r["slice"] == f"rows {D}:{2 * D}"]
    assert len(q) == 4 and sum(float(r["weight"]) for r in q) == pytest.approx(1.0)
    o = [r for r in rows if r["tensor"] == "layers.0.self_attn.o_proj.weight"]
    assert {r["slice"] for r in o} == {f"columns {h * D}:{(h + 1) * D}" for h in range(H)}
    assert json.loads((out / "merge.json").read_text())["salience"]["metric"] == "kl"
    # python -m figures merge: the weight grids it draws are the CSV's q_proj slices
    from figures.merge import draw_merge, head_weights

    grids = head_weights(__import__("pandas").read_csv(out / "merge_weights.csv"))
    assert list(grids) == [str(zoo["base"]), *map(str, experts)] and grids[str(zoo["vl"])].shape == (L, H)
    assert sum(g[1, 1] for g in grids.values()) == pytest.approx(1.0)
    assert [p.suffix for p in draw_merge(out)] == [".png", ".pdf"]
    # its last line names that drawing command (it said where the merge went, not how to draw it)
    assert capfd.readouterr().out.strip().splitlines()[-1] == f"results in {out}/ (figures: python -m figures merge {out})"



def test_each_salience_metric_weights_heads_by_its_own_column_and_the_defaults_are_kl_tau_1_alpha0_half(zoo, tmp_path):
    """--salience-metric takes s_i(L, h) from its own heads.csv column, kl by default, with --salience-temperature 1
    and --alpha0 0.5 by default (DESIGN §9). The other tests write the three columns in proportion (kl, kl / 2,
    kl / 3), which ŝ = s / mean s cannot tell apart, and pass τ_s and α0: a merge reading the wrong column or with
    other defaults passed them. Here each column is a table of its own, and each merge is the in-memory oracle's
    on that column."""
    experts = [zoo["vl"], zoo["ov"]]
    g = torch.Generator().manual_seed(3)
    tables = {"kl": [torch.rand(L, H, generator=g) * 3 for _ in experts],
              "accuracy_drop": [torch.rand(L, H, generator=g) * 1.2 - 0.2 for _ in experts],  # some < 0: clamped
              "prob_accuracy_drop": [torch.rand(L, H, generator=g) * 0.8 - 0.2 for _ in experts]}
    dirs = [write_run(tmp_path / f"e{i}", tables["kl"][i],
                      drops=(tables["accuracy_drop"][i], tables["prob_accuracy_drop"][i])) for i in range(len(experts))]
    base, thetas = canonical(zoo["base"]), [canonical(e) for e in experts]
    merged = {}
    for metric, extra, tau in (("kl", [], 1.0), ("accuracy_drop", ["--salience-metric", "accuracy_drop"], 1.0),
                               ("prob_accuracy_drop", ["--salience-metric", "prob_accuracy_drop",
                                                       "--salience-temperature", 0.5], 0.5)):
        out = tmp_path / metric
        assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience", "--salience",
                   *dirs, *extra, "--out", out) == 0
        merged[metric] = got = canonical(out)
        want = in_memory_salience(base, thetas, [t.double() for t in tables[metric]], tau, 0.5)
        for name, t in want.items():
            torch.testing.assert_close(got[name].float(), t, rtol=1e-6, atol=1e-7, msg=f"{metric}: {name}")
        info = json.loads((out / "merge.json").read_text())
        assert (info["salience"]["metric"], info["salience"]["temperature"], info["alpha0"]) == (metric, tau, 0.5)
    q = "layers.1.self_attn.q_proj.weight"  # anti-tautology: the three columns give three different merges
    assert not torch.equal(merged["kl"][q], merged["accuracy_drop"][q])
    assert not torch.equal(merged["accuracy_drop"][q], merged["prob_accuracy_drop"][q])


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_head_slices_follow_the_configs_head_width_not_hidden_over_heads(family, shared_root, tmp_path):
    """Qwen3 and Gemma 3 state a head_dim (24 here) other than hidden / heads (16): q/k/v rows and o_proj columns
    are 24 wide per head, and the q/k norms (one vector shared by every head) and Gemma's tied embedding merge with
    the rest. Oracle: DESIGN §9 written slice by slice with the config's head layout, on a base and two experts
    (the base plus noise of different scales), with and without the base's own salience run."""
    from filelock import FileLock
    from safetensors.torch import save_file

    from probe.tiny import tiny_dir

    with FileLock(str(shared_root / "tiny.lock")):  # built once per session, shared by workers (conftest.tiny_dirs)
        base = tiny_dir(family)
    cfg = json.loads((base / "config.json").read_text())  # plain causal LMs: the text config is the top level
    n_layers, n_heads, n_kv, d = (cfg[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                   "head_dim"))
    assert d * n_heads != cfg["hidden_size"] and n_kv < n_heads  # the case this test is for, with GQA
    experts = []
    for i, scale in enumerate((0.01, 0.002)):
        e = shutil.copytree(base, tmp_path / f"e{i}")
        g = torch.Generator().manual_seed(i)
        for f in e.glob("*.safetensors"):
            save_file({k: t + scale * torch.randn(t.shape, generator=g) for k, t in load_file(f).items()}, f,
                      metadata={"format": "pt"})
        experts.append(e)
    g = torch.Generator().manual_seed(7)
    tables = [torch.rand(n_layers, n_heads, generator=g) * 3 for _ in range(3)]
    runs = [write_run(tmp_path / f"r{i}", t, layers=n_layers, heads=n_heads) for i, t in enumerate(tables)]
    thetas = [canonical(m) for m in (base, *experts)]
    assert any(".q_norm." in n for n in thetas[0])
    for with_base in (False, True):
        out = tmp_path / f"m{with_base}"
        extra = ["--base-salience", runs[0]] if with_base else []
        assert run(merge.main, "--base", base, "--models", *experts, "--method", "salience", "--salience", *runs[1:],
                   *extra, "--salience-temperature", 0.5, "--alpha0", 0.3, "--quiet", "--out", out) == 0
        got = canonical(out)
        want = in_memory_salience(thetas[0], thetas[1:], tables[1:], 0.5, 0.3, tables[0] if with_base else None,
                                  heads=(n_heads, n_kv, d))
        assert set(got) == set(want)
        for name, t in want.items():
            torch.testing.assert_close(got[name].float(), t, rtol=1e-6, atol=1e-7, msg=name)


def test_which_tensors_a_head_owns():
    """q/k/v weights and biases by rows, o_proj's weight by columns; o_proj's bias (Llama's attention_bias), added
    once after the heads are summed, belongs to no head and is merged with the rest of its layer."""
    from analyses.salience import SalienceWeights
    from probe.lm_config import HeadGeometry

    geo = HeadGeometry(n_layers=L, n_heads=H, n_kv_heads=KV, head_dim=D, hidden_size=H * D)
    g = torch.Generator().manual_seed(0)
    w = SalienceWeights.build([torch.rand(L, H, generator=g) for _ in range(2)], geo, 1.0, 0.5, with_base=False)
    expect = {"q_proj.weight": (0, H * D), "q_proj.bias": (0, H * D), "k_proj.weight": (0, KV * D),
              "v_proj.bias": (0, KV * D), "o_proj.weight": (1, H * D)}
    for name, (axis, n) in expect.items():
        shape = (n, H * D) if axis == 0 else (H * D, n)
        got_axis, vec = w.slice_coefficients(f"layers.1.self_attn.{name}", shape[:1] if "bias" in name else shape)
        assert got_axis == axis and vec.shape == (3, n), name
    assert torch.equal(w.slice_coefficients("layers.1.self_attn.o_proj.weight", (H * D, H * D))[1][:, ::D], w.head[:, 1])
    assert w.slice_coefficients("layers.1.self_attn.o_proj.bias", (H * D,)) is None
    assert w.layer_coefficients("layers.1.self_attn.o_proj.bias") == w.layer[:, 1].tolist()


def test_equal_saliences_give_eq1_and_eq2(zoo, tmp_path):
    experts = [zoo["vl"], zoo["ov"]]
    flat = [write_run(tmp_path / f"f{i}", torch.full((L, H), 0.7)) for i in range(2)]
    base, th = canonical(zoo["base"]), [canonical(e) for e in experts]
    heads = [n for n in base if ".self_attn." in n and n.split(".")[3] in ("q_proj", "k_proj", "v_proj", "o_proj")]
    # with the base's run: every head slice is the plain average of all three (Eq. 1)
    out = tmp_path / "eq1"
    assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience", "--salience", *flat,
               "--base-salience", write_run(tmp_path / "fb", torch.full((L, H), 2.0)), "--out", out) == 0
    got = canonical(out)
    for n in heads:
        torch.testing.assert_close(got[n], (base[n] + th[0][n] + th[1][n]) / 3, rtol=1e-6, atol=1e-7)
    # without it: α0 for the base, the rest shared equally (Eq. 2 with weights α0, (1-α0)/2, (1-α0)/2)
    out = tmp_path / "eq2"
    assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience", "--salience", *flat,
               "--alpha0", 0.3, "--out", out) == 0
    got = canonical(out)
    for n in heads:
        torch.testing.assert_close(got[n], 0.3 * base[n] + 0.35 * th[0][n] + 0.35 * th[1][n], rtol=1e-6, atol=1e-7)


def test_dominant_expert_copies_its_slice(zoo, tmp_path):
    experts = [zoo["vl"], zoo["ov"]]
    s0 = torch.full((L, H), 0.1)
    s0[1, 2] = 50.0  # expert 0 relies on L1.H2 alone
    dirs = [write_run(tmp_path / "a", s0), write_run(tmp_path / "b", torch.full((L, H), 0.1))]
    out = tmp_path / "m"
    assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience", "--salience", *dirs,
               "--alpha0", 0.0, "--salience-temperature", 0.01, "--out", out) == 0
    got, vl = canonical(out), canonical(zoo["vl"])
    sl = slice(2 * D, 3 * D)
    torch.testing.assert_close(got["layers.1.self_attn.q_proj.weight"][sl], vl["layers.1.self_attn.q_proj.weight"][sl])
    torch.testing.assert_close(got["layers.1.self_attn.q_proj.bias"][sl], vl["layers.1.self_attn.q_proj.bias"][sl])
    torch.testing.assert_close(got["layers.1.self_attn.o_proj.weight"][:, sl], vl["layers.1.self_attn.o_proj.weight"][:, sl])


def test_temperatures_so_small_that_the_logits_overflow_give_the_limit(zoo, tmp_path):
    """--salience-temperature / --temperature 1e-320: ŝ/τ and Δ/τ were inf, softmax NaN, and the merge stopped with
    'merged tensor … overflows' (exit 2, naming no input at fault). The limit τ → 0 is argmax, ties shared."""
    from analyses.formulas import salience_weights, shift_softmax

    assert shift_softmax([0.004, 0.001, 0.004], 5e-324) == [0.5, 0.0, 0.5]
    assert shift_softmax([0.004, 0.001], 1e-3) == pytest.approx([1 / (1 + 2.718281828459045 ** -3), 0.0474258731])
    shat = torch.tensor([[2.0, 0.5], [1.0, 0.5]], dtype=torch.float64)
    assert torch.equal(salience_weights(shat, 1e-320, None), torch.tensor([[1.0, 0.5], [0.0, 0.5]], dtype=torch.float64))
    experts = [zoo["vl"], zoo["ov"]]
    s0 = torch.full((L, H), 0.1)
    s0[1, 2] = 50.0
    dirs = [write_run(tmp_path / "a", s0), write_run(tmp_path / "b", torch.full((L, H), 0.1))]
    out = tmp_path / "m"
    assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience", "--salience", *dirs,
               "--alpha0", 0.0, "--salience-temperature", 1e-320, "--temperature", 1e-320, "--out", out) == 0
    got, base, th = canonical(out), canonical(zoo["base"]), [canonical(e) for e in experts]
    sl = slice(2 * D, 3 * D)
    assert torch.equal(got["layers.1.self_attn.q_proj.weight"][sl], th[0]["layers.1.self_attn.q_proj.weight"][sl])
    # head 0: ŝ = 1 for the flat expert, 0.1 / mean(s0) < 1 for the other: the flat one's slice, whole
    assert torch.equal(got["layers.1.self_attn.q_proj.weight"][:D], th[1]["layers.1.self_attn.q_proj.weight"][:D])
    name = "layers.0.mlp.up_proj.weight"  # Eq. 4 with α0 = 0: the expert of larger Δavg, whole
    top = max(range(2), key=lambda i: eq3(base[name], th[i][name]))
    assert torch.equal(got[name], th[top][name].float())


def test_rest_shift_leaves_non_head_tensors_as_eq4(zoo, runs, tmp_path):
    experts = [zoo["vl"], zoo["ov"], zoo["au"]]
    a, b = tmp_path / "sal", tmp_path / "shift"
    assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience",
               "--salience", *runs["dirs"], "--out", a) == 0
    assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "shift", "--out", b) == 0
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    others = [k for k in sa if not any(f"self_attn.{p}_proj" in k for p in "qkvo")]
    assert len(others) > 5
    for k in others:
        assert torch.equal(sa[k], sb[k]), k  # bit for bit
    # and --rest layer gives layer tensors the layer's mean-salience weights, not Eq. 4
    c = tmp_path / "layer"
    assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience",
               "--salience", *runs["dirs"], "--rest", "layer", "--out", c) == 0
    sc = load_file(c / "model.safetensors")
    assert not torch.equal(sc["model.layers.0.mlp.up_proj.weight"], sa["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(sc["model.norm.weight"], sa["model.norm.weight"])  # outside the layers: Eq. 4 either way
    # ... with its Δavg computed on the fly, as merge.json says (it said shift_source null under --rest layer)
    assert json.loads((c / "merge.json").read_text())["shift_source"] == "computed"
    base, vl = canonical(zoo["base"]), canonical(zoo["vl"])
    rows = [r for r in csv.DictReader(open(c / "merge_weights.csv"))
            if r["tensor"] == "norm.weight" and r["model"] == str(zoo["vl"])]
    assert len(rows) == 1 and float(rows[0]["delta_avg"]) == pytest.approx(eq3(base["norm.weight"], vl["norm.weight"]))


def test_rest_layer_weights_a_layers_other_tensors_by_its_mean_head_salience(zoo, runs, tmp_path):
    """--rest layer: MLP, norms (and o_proj's bias) of layer L by softmax over the layer's mean ŝ (the base at α0
    without its own run), Eq. 4 outside the layers. The test above only showed it differs from Eq. 4: a layer rule
    on the raw s, or on the mean of the head weights, passed it."""
    experts = [zoo["vl"], zoo["ov"], zoo["au"]]
    base, thetas = canonical(zoo["base"]), [canonical(e) for e in experts]
    for with_base in (False, True):
        extra = ["--base-salience", write_run(tmp_path / "b", runs["base_table"])] if with_base else []
        out = tmp_path / f"m{with_base}"
        assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience", "--salience",
                   *runs["dirs"], *extra, "--rest", "layer", "--salience-temperature", 0.5, "--alpha0", 0.3,
                   "--quiet", "--out", out) == 0
        got = canonical(out)
        want = in_memory_salience(base, thetas, runs["tables"], 0.5, 0.3, runs["base_table"] if with_base else None,
                                  rest="layer")
        assert set(got) == set(want) and "layers.1.mlp.up_proj.weight" in want
        for name, t in want.items():
            torch.testing.assert_close(got[name].float(), t, rtol=1e-6, atol=1e-7, msg=f"{with_base}: {name}")


def test_head_slices_streamed_in_many_row_blocks_are_the_one_block_merge_bit_for_bit(zoo, runs, tmp_path,
                                                                                     monkeypatch):
    """merge_slices streams a head-owned tensor in blocks of MERGE_CHUNK // columns rows, each with its own rows'
    weights (q/k/v) or every column's (o_proj). The tiny models' tensors fit one block, so the per-block offsets ran
    only on real sizes (a 7B q_proj is 49 blocks); with 96-element chunks (3 rows a block, a short last one) the
    merge must be the one-block merge bit for bit, and the in-memory oracle's. A row wider than a chunk (a real
    tensor past 262,144 columns; here 20-element chunks of 32-column rows) was a view error traceback (exit 1): it
    goes in column blocks of one row, a short last one, with the same bits."""
    experts = [zoo["vl"], zoo["ov"]]
    argv = ["--base", zoo["base"], "--models", *experts, "--method", "salience", "--salience", *runs["dirs"][:2],
            "--salience-temperature", 0.5, "--alpha0", 0.3, "--quiet"]
    assert run(merge.main, *argv, "--out", tmp_path / "whole") == 0
    whole = canonical(tmp_path / "whole")
    want = in_memory_salience(canonical(zoo["base"]), [canonical(e) for e in experts], runs["tables"][:2], 0.5, 0.3)
    assert whole["layers.1.self_attn.q_proj.weight"].shape == whole["layers.1.self_attn.o_proj.weight"].shape == (32, 32)
    for chunk in (96, 20):
        monkeypatch.setattr(merge, "MERGE_CHUNK", chunk)
        assert run(merge.main, *argv, "--out", tmp_path / f"blocks{chunk}") == 0
        blocks = canonical(tmp_path / f"blocks{chunk}")
        assert whole.keys() == blocks.keys() == want.keys()
        for name, t in want.items():
            assert torch.equal(blocks[name], whole[name]), (chunk, name)
            torch.testing.assert_close(blocks[name].float(), t, rtol=1e-6, atol=1e-7, msg=f"{chunk}: {name}")


def test_salience_merge_is_bit_stable_with_carriers(zoo, runs, tmp_path):
    experts = [zoo["vl"], zoo["ov"], zoo["au"]]
    outs = []
    for name in ("a", "b"):
        outs.append(tmp_path / name / "merged")  # same name: carriers record it
        assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", "salience", "--salience",
                   *runs["dirs"], "--carrier", zoo["vl"], "--out", outs[-1]) == 0
    for rel in ("model.safetensors", "carriers/vl/model.safetensors"):
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_figures_merge_refuses_a_salience_run_swept_again_since_the_merge(zoo, runs, tmp_path, capfd):
    """python -m figures merge reads each participant's salience from its run dir at draw time: a run swept again
    there after the merge (here one head's KL raised) was drawn beside weights computed from the old saliences,
    exit 0. Now a run whose fingerprint is not among the merge's recorded inputs exits 2 naming it, and the
    figures already there are left as they were; the unchanged run draws as before. The merge resolves its LM
    type once and the drawing reads each heads.csv once (the bytes fingerprinted are the bytes drawn): each was
    done twice."""
    import pandas as pd

    from figures.__main__ import main as figures_main

    dirs = [Path(shutil.copytree(d, tmp_path / "runs" / d.name)) for d in runs["dirs"][:2]]
    out = tmp_path / "m"
    resolved, reads = [], []
    lm_type, read_bytes, read_csv = merge.causal_lm_type, Path.read_bytes, pd.read_csv
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(merge, "causal_lm_type", lambda *a: resolved.append(a) or lm_type(*a))
        mp.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or read_bytes(self))
        mp.setattr(pd, "read_csv", lambda f, *a, **k: reads.append(getattr(f, "name", "bytes")) or read_csv(f, *a, **k))
        assert run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["ov"], "--method", "salience",
                   "--salience", *dirs, "--quiet", "--out", out) == 0
        assert len(resolved) == 1, resolved
        reads.clear()
        assert run(figures_main, "merge", out) == 0
        assert reads.count("heads.csv") == 2, reads  # one read per run
    drawn = {p: p.read_bytes() for p in out.glob("merge_heads*")}
    assert drawn
    table = dirs[1] / "heads.csv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines[:-1] + ["1,3,0.5,0.5,9.0,8,4.5,3.0,0.5"]) + "\n")
    capfd.readouterr()
    assert run(figures_main, "merge", out) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith(f"error: salience run {dirs[1].resolve()} changed since the merge") and "\n" not in err, err
    assert {p: p.read_bytes() for p in out.glob("merge_heads*")} == drawn
    table.write_text("\n".join(lines) + "\n")  # the run the merge read, back: drawn again, the same figure
    assert run(figures_main, "merge", out) == 0
    assert (out / "merge_heads.png").read_bytes() == drawn[out / "merge_heads.png"]


def test_a_merge_leaves_every_input_as_it_was(zoo, runs, tmp_path):
    """Models, carriers, the shift table and the salience runs a merge reads (mapped, fingerprinted, their side
    files copied into the carriers) keep their bytes, modes and mtimes through a merge, the same merge found
    finished, its --overwrite, and a TIES merge (conftest.tree_manifest)."""
    from analyses import shift
    from conftest import tree_manifest

    experts = [zoo["vl"], zoo["ov"], zoo["au"]]
    assert run(shift.main, "--base", zoo["base"], "--models", *experts, "--no-figures", "--quiet",
               "--out", tmp_path / "s") == 0
    roots = [*zoo.values(), runs["root"], tmp_path / "s"]
    before = tree_manifest(*roots)
    argv = ["--base", zoo["base"], "--models", *experts, "--carrier", zoo["vl"], zoo["ov_lmms"], "--quiet"]
    for extra in (["--method", "salience", "--salience", *runs["dirs"], "--shift", tmp_path / "s"],) * 2 + (
            ["--method", "salience", "--salience", *runs["dirs"], "--shift", tmp_path / "s", "--overwrite"],
            ["--method", "ties"]):
        assert run(merge.main, *argv, *extra, "--out", tmp_path / extra[1]) == 0
    assert tree_manifest(*roots) == before


def test_a_salience_sweep_computed_again_is_the_same_input_to_the_merge(zoo, runs, tmp_path, capfd):
    """The merge's manifest fingerprinted every file of a salience run, its run.json timestamps included: the same
    sweep computed again (same heads.csv, plan and model) made a finished merge 'of other options or inputs'. Now
    what the merge reads counts; a changed salience still does."""
    dirs = [Path(shutil.copytree(d, tmp_path / "runs" / d.name)) for d in runs["dirs"]]
    out = tmp_path / "merged"
    argv = ["--base", zoo["base"], "--models", zoo["vl"], zoo["ov"], zoo["au"], "--method", "salience", "--salience",
            *dirs, "--out", out]
    assert run(merge.main, *argv) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for d in dirs:  # the sweep again: new times, versions and figures beside the same table and plan
        info = json.loads((d / "run.json").read_text())
        (d / "run.json").write_text(json.dumps({**info, "started": "2026-12-06T10:00:00+0000", "elapsed_s": 9.5,
                                                "versions": {"torch": "2.99"}}))
        (d / "heatmap_kl.png").write_bytes(b"another drawing")
    capfd.readouterr()
    assert run(merge.main, *argv) == 0 and "already holds this finished analyses.merge output" in capfd.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    table = dirs[1] / "heads.csv"
    lines = table.read_text().splitlines()
    assert lines[-1].startswith("1,3,")
    table.write_text("\n".join(lines[:-1] + ["1,3,0.5,0.5,9.0,8,4.5,3.0,0.5"]) + "\n")  # head (1, 3) far more salient
    assert run(merge.main, *argv) == 2
    assert "holds a finished analyses.merge output of other options or inputs" in capfd.readouterr().err


def _bad(tmp_path, zoo, dirs, *extra):
    from probe.errors import cli_main

    out = tmp_path / "never"
    code = cli_main(merge.main, [str(a) for a in ["--base", zoo["base"], "--models", zoo["vl"], zoo["ov"], "--method",
                                                   "salience", "--salience", *dirs, *extra, "--out", out]])
    return code, out


@pytest.mark.parametrize("case", ["shape", "transposed", "missing", "partial", "nan", "count", "negative", "swapped",
                                  "base_run", "nothing_hurt", "repeated"])
def test_bad_salience_runs_exit_2(case, zoo, tmp_path, capfd):
    good = write_run(tmp_path / "good", torch.ones(L, H), model=zoo["vl"])
    bad = {
        "shape": lambda: write_run(tmp_path / "x", torch.ones(3, H), layers=3),
        # as many heads in all as the model, in other layers: the line said "8 pairs, but 2 layers x 4 heads"
        "transposed": lambda: write_run(tmp_path / "x", torch.ones(H, L), layers=H, heads=L),
        "missing": lambda: tmp_path / "nowhere",
        "partial": lambda: write_run(tmp_path / "x", torch.ones(L, H), status="running"),
        "nan": lambda: write_run(tmp_path / "x", torch.full((L, H), float("nan"))),
        "count": lambda: None,
        "negative": lambda: write_run(tmp_path / "x", torch.full((L, H), -0.5)),
        "swapped": lambda: write_run(tmp_path / "x", torch.ones(L, H), model=zoo["vl"]),  # vl's run again, for ov
        "base_run": lambda: write_run(tmp_path / "x", torch.ones(L, H), model=zoo["base"]),
        "nothing_hurt": lambda: write_run(tmp_path / "x", torch.zeros(L, H)),  # was 'salience: …', naming no run
        "repeated": lambda: write_run(tmp_path / "x", torch.ones(L, H)),  # a row written twice, below
    }[case]()
    if case == "repeated":  # every head is there: the line said "sweep every head", which the run had done
        lines = (bad / "heads.csv").read_text().splitlines()
        (bad / "heads.csv").write_text("\n".join(lines + [lines[2]]) + "\n")
    dirs = [good] if bad is None else [good, bad]
    code, out = _bad(tmp_path, zoo, dirs)
    err = capfd.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert {"shape": "layers x",
            "transposed": f"covers {L * H} (layer, head) pairs of {H} layers x {L} heads, but {zoo['ov']} has {L} "
                          f"layers x {H} heads",
            "missing": "not a probe.heads run", "partial": "not complete",
            "nan": "NaN", "count": "one probe.heads run per",
            "negative": "kl must lie in [-1e-06, inf] for every head, one has -0.5; not a probe.heads salience",
            "swapped": f"measured {zoo['vl']}, but it is given for {zoo['ov']}",
            "base_run": f"measured {zoo['base']}, but it is given for {zoo['ov']}",
            "nothing_hurt": f"{tmp_path / 'x' / 'heads.csv'}: kl is ≤ 0 for every head (no removal hurt {zoo['ov']}",
            "repeated": f"{tmp_path / 'x' / 'heads.csv'}: {L * H + 1} rows for {L * H} (layer, head) pairs; one row per "
                        "head (a file appended to twice?)",
            }[case] in err
    assert not out.exists() and not list(tmp_path.glob(".never.partial-*"))


@pytest.mark.parametrize("metric,value,shown", [("prob_accuracy_drop", 21.0, "7"), ("accuracy_drop", -12.0, "-6")])
def test_a_drop_beyond_one_is_no_salience(metric, value, shown, zoo, tmp_path, capfd):
    """A drop in (prob-)accuracy lies in [-1, 1]: heads.csv with a prob_accuracy_drop of 7 was merged with exit 0
    (only kl was range-checked), while python -m figures heads refused the same file. Exit 2 naming the run."""
    good = write_run(tmp_path / "good", torch.ones(L, H), model=zoo["vl"])
    table = torch.full((L, H), 0.3)
    table[1, 2] = value  # write_run: accuracy_drop = value / 2, prob_accuracy_drop = value / 3
    bad = write_run(tmp_path / "x", table)
    code, out = _bad(tmp_path, zoo, [good, bad], "--salience-metric", metric)
    err = capfd.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err == (f"error: {bad / 'heads.csv'}: {metric} must lie in [-1, 1] for every head, one has {shown}; not a "
                   "probe.heads salience")
    assert not out.exists()


@pytest.mark.parametrize("case", ["short_row", "no_generate"])
def test_heads_csv_as_pandas_writes_it(case, zoo, tmp_path, capfd):
    """A row cut short (its last fields None in csv.DictReader) stopped the merge with a TypeError traceback (exit
    1); a --no-generate run's accuracy, an empty cell as pandas writes NaN, was 'unreadable (could not convert
    string to float)' instead of the NaN refusal that says why. Both exit 2 naming the cause."""
    good = write_run(tmp_path / "good", torch.ones(L, H), model=zoo["vl"])
    bad = write_run(tmp_path / "x", torch.ones(L, H))
    lines = (bad / "heads.csv").read_text().splitlines()
    if case == "short_row":
        lines[3] = ",".join(lines[3].split(",")[:5])  # layer, head, accuracy, prob_accuracy, kl
        metric = "prob_accuracy_drop"
    else:  # accuracy and accuracy_drop empty, as probe.heads --no-generate writes them
        lines[1:] = [",".join(f if i not in (2, 6) else "" for i, f in enumerate(ln.split(","))) for ln in lines[1:]]
        metric = "accuracy_drop"
    (bad / "heads.csv").write_text("\n".join(lines) + "\n")
    code, out = _bad(tmp_path, zoo, [good, bad], "--salience-metric", metric)
    err = capfd.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert {"short_row": "a row has fewer fields than the header",
            "no_generate": "accuracy_drop is NaN (empty or infinite) for some heads; a --no-generate or "
                           "attribution run"}[case] in err
    assert not out.exists()


def test_weights_of_a_layer_past_the_configs_depth_are_refused_before_anything_is_written(zoo, tmp_path, capfd):
    """A checkpoint may hold decoder layers its config.json does not build (check_lm_sizes skips them; the load
    drops them), and a probe.heads run of it sweeps the config's layers only: the salience merge took that 1-layer
    heads.csv, began writing, and stopped at layer 1's q_proj with an IndexError traceback (exit 1). Exit 2, one
    line naming the tensor, nothing written."""
    models = {}
    for name in ("base", "vl", "ov"):
        d = models[name] = Path(shutil.copytree(zoo[name], tmp_path / name))
        cfg = json.loads((d / "config.json").read_text())
        cfg.get("text_config", cfg)["num_hidden_layers"] = 1  # the weights keep both layers
        (d / "config.json").write_text(json.dumps(cfg))
    dirs = [write_run(tmp_path / f"r{i}", torch.rand(1, H) + 0.1, layers=1) for i in range(2)]
    capfd.readouterr()
    out = tmp_path / "m"
    assert run(merge.main, "--base", models["base"], "--models", models["vl"], models["ov"], "--method", "salience",
               "--salience", *dirs, "--quiet", "--out", out) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith(f"error: --base {models['base']}: its weights hold layers.1.") and "\n" not in err, err
    assert "past the num_hidden_layers 1 of its config.json" in err, err
    assert not out.exists() and not list(tmp_path.glob(".m.*"))


def test_a_salience_merge_checks_the_layers_held_once(zoo, runs, tmp_path, monkeypatch):
    """probe.families.check_layers_held ran twice over the base's LM names in a salience merge: once for the salience
    tables (SalienceWeights.check_tensors, whose words the test above pins) and again for the class the merged LM is
    written as (check_lm_fits_class), over the same config and names. Oracle: the calls counted, with their names."""
    import probe.families
    from analyses import salience

    calls = []
    real = probe.families.check_layers_held
    count = lambda n, names, where: calls.append(where) or real(n, names, where)  # noqa: E731
    monkeypatch.setattr(probe.families, "check_layers_held", count)
    monkeypatch.setattr(salience, "check_layers_held", count)
    assert run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["ov"], "--method", "salience",
               "--salience", *runs["dirs"][:2], "--quiet", "--out", tmp_path / "m") == 0
    assert calls == [f"--base {zoo['base']}"], calls


def _merged_warnings(zoo, dirs, out, capfd) -> list[str]:
    """A salience merge of vl and ov by the runs ``dirs`` into ``out`` (it must succeed): its stderr lines."""
    capfd.readouterr()
    assert run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["ov"], "--method", "salience",
               "--salience", *dirs, "--quiet", "--out", out) == 0
    return capfd.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "\udcff"])
def test_a_run_json_that_is_not_an_object_is_read_alike_by_every_salience_reader(text, tmp_path):
    """The salience readers take run.json through probe.results.read_run_json: one that is not JSON, not UTF-8 or not
    an object is 'unreadable' to read_salience, unchecked (with a warning) to check_run_model and fingerprinted
    whole by run_fingerprint (invalid UTF-8 was a UnicodeDecodeError traceback in the first two)."""
    from analyses.merge_methods import run_fingerprint
    from analyses.salience import check_run_model, read_salience
    from probe.errors import BadInput
    from probe.lm_config import HeadGeometry
    from probe.results import content_fingerprint

    run = write_run(tmp_path / "r", torch.ones(L, H))
    (run / "run.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(BadInput, match=r"run\.json: unreadable$"):
        read_salience(run, "kl", HeadGeometry(L, H, KV, D, H * D), "e1")
    assert "does not name the model it measured" in check_run_model(run, "e1", {})["warnings"][0]
    assert run_fingerprint(run) == content_fingerprint(run)


def test_merge_json_says_what_each_run_measured_and_warnings_never_precede_a_refusal(zoo, tmp_path, capfd):
    """merge.json named the salience runs by path only, not the model, data and engine they measured, and an
    attribution-patching estimate (probe.heads --method attribution) was used as silently as the exact sweep. A
    warning for one run printed before another run's refusal put two lines on stderr."""
    plans = [dict(data_dir="/data/image", data_fingerprint="d1", n_items=96, method="attribution"),
             dict(data_dir="/data/video", data_fingerprint="d2", n_items=72, method="exact")]
    dirs = [write_run(tmp_path / f"r{i}", torch.rand(L, H) + 0.1, model=m, **plans[i])
            for i, m in enumerate((zoo["vl"], zoo["ov"]))]
    out = tmp_path / "m"
    err = _merged_warnings(zoo, dirs, out, capfd)
    assert len(err) == 1 and err[0].startswith(f"warning: salience run {dirs[0]} is an attribution-patching"), err
    measured = json.loads((out / "merge.json").read_text())["salience"]["measured"]
    assert [{k: r[k] for k in plans[0]} for r in measured] == plans
    assert [(r["run"], r["for"], r["model"]) for r in measured] == [(str(d), str(m), str(m)) for d, m in
                                                                    zip(dirs, (zoo["vl"], zoo["ov"]))]
    # run 1 warns (attribution), run 2 is refused (it measured vl): the refusal is the only line
    swapped = write_run(tmp_path / "sw", torch.rand(L, H) + 0.1, model=zoo["vl"])
    code, never = _bad(tmp_path, zoo, [dirs[0], swapped])
    err = capfd.readouterr().err.strip()
    assert code == 2 and err.startswith("error: salience run") and "\n" not in err, err
    assert not never.exists()


def test_a_run_of_weights_changed_since_is_refused(zoo, tmp_path, capfd):
    """An expert retrained or re-merged in place after its salience run was merged by its old weights' saliences
    (exit 0): the run's recorded model fingerprint is now compared with the participant's files."""
    import shutil

    from probe.models import local_fingerprint

    vl = shutil.copytree(zoo["vl"], tmp_path / "vl")
    dirs = [write_run(tmp_path / "a", torch.rand(L, H) + 0.1, model=vl, fingerprint=local_fingerprint(vl)),
            write_run(tmp_path / "b", torch.rand(L, H) + 0.1, model=zoo["ov"])]  # an older run.json: unchecked
    args = ["--base", zoo["base"], "--models", vl, zoo["ov"], "--method", "salience", "--salience", *dirs]
    assert run(merge.main, *args, "--out", tmp_path / "before") == 0
    change_weights_in_place(vl, "layers.0.self_attn.q_proj.weight")
    capfd.readouterr()
    assert run(merge.main, *args, "--out", tmp_path / "after") == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith(f"error: salience run {dirs[0]} measured {vl} before its files changed") and "\n" not in err
    assert not (tmp_path / "after").exists()


@pytest.mark.parametrize("split, warned", [("validation", True), ("test", True), ("train", False), (None, False)])
def test_a_sweep_of_the_validation_split_warns(split, warned, zoo, tmp_path, capfd):
    """A salience run that swept an evaluation split (probe.heads' default, validation) sets the merge's head
    weights from the items the merge is then scored on; the merge said nothing of it. Now one warning per such
    run, and merge.json records each run's split."""
    extra = {"settings": {"split": split}} if split else {}
    dirs = [write_run(tmp_path / f"r{i}", torch.rand(L, H) + 0.1, model=m, data_dir=f"/data/{i}", **extra)
            for i, m in enumerate((zoo["vl"], zoo["ov"]))]
    out = tmp_path / "m"
    err = _merged_warnings(zoo, dirs, out, capfd)
    if warned:
        assert len(err) == 2 and all(f"swept the {split!r} split of /data/" in w and "not a held-out" in w
                                     for w in err), err
        # the way out it names exists: MMMU has no train split, nor have the bundled sets (--split train there
        # exits 2); probe.zoo data writes one
        assert all("MMMU's dev split" in w and "python -m probe.zoo data" in w for w in err), err
    else:
        assert err == [], err
    measured = json.loads((out / "merge.json").read_text())["salience"]["measured"]
    assert [r["split"] for r in measured] == [split, split]


def test_runs_made_from_another_cwd_are_matched_to_their_models(tiny_dirs, data_dir, tmp_path, monkeypatch, capfd):
    """probe.heads records the --model path as given; a relative one, resolved by a merge run in another directory,
    pointed nowhere: swapped runs passed with two warnings (exit 0, each expert merged by the other's saliences).
    The run now records the absolute path too; an older run.json's relative one is told apart by its fingerprint."""
    from safetensors.torch import save_file

    from probe.errors import cli_main
    from probe.heads import main as heads_main

    models, runs = tmp_path / "models", tmp_path / "runs"
    for i, name in enumerate(("base", "vl", "vl2")):
        d = shutil.copytree(tiny_dirs["qwen2_vl"], models / name)
        tensors = load_file(d / "model.safetensors")  # three different models of one geometry
        key = next(k for k in tensors if k.endswith("layers.0.mlp.up_proj.weight"))
        tensors[key] = tensors[key] + i
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.chdir(models)
    for name in ("vl", "vl2"):  # the full sweep the merge needs, on one item
        assert cli_main(heads_main, ["--model", name, "--data", str(data_dir), "--limit", "1", "--no-generate",
                                     "--no-figures", "--quiet", "--out", str(runs / name)]) == 0
    monkeypatch.chdir(runs)
    args = ["--base", "../models/base", "--models", "../models/vl", "../models/vl2", "--method", "salience"]
    assert run(merge.main, *args, "--salience", "vl", "vl2", "--out", tmp_path / "ok") == 0
    capfd.readouterr()
    assert run(merge.main, *args, "--salience", "vl2", "vl", "--out", tmp_path / "swapped") == 2
    err = capfd.readouterr().err.strip()
    assert err == ("error: salience run vl2 measured ../models/vl2, but it is given for ../models/vl; give each model "
                   "its own run, in the order of --models"), err
    for name in ("vl", "vl2"):  # a run.json from before: the relative path alone
        info = json.loads((runs / name / "run.json").read_text())
        del info["model_resolved_path"]
        (runs / name / "run.json").write_text(json.dumps(info))
    assert run(merge.main, *args, "--salience", "vl", "vl2", "--out", tmp_path / "ok_old") == 0
    # the sweeps read data_dir's validation split: that warning only (test_a_sweep_of_the_validation_split_warns)
    assert [w for w in capfd.readouterr().err.splitlines() if "warning" in w and "'validation' split" not in w] == []
    assert run(merge.main, *args, "--salience", "vl2", "vl", "--out", tmp_path / "swapped_old") == 2
    assert "measured ../models/vl2, but it is given for ../models/vl" in capfd.readouterr().err
    assert not (tmp_path / "swapped").exists() and not (tmp_path / "swapped_old").exists()


# --------------------------------------------------------------------------------------------------------
# task arithmetic and TIES: mergekit 0.1.5 parity on plain Qwen2 checkpoints, and LMs taken out of carriers


def _mergekit(tmp_path: Path, method: str, base: Path, models: list[Path], params: str) -> dict[str, torch.Tensor]:
    cfg = tmp_path / f"{method}.yml"
    cfg.write_text(f"merge_method: {method}\ndtype: float32\nbase_model: {tiny_qwen2_view(base, tmp_path)}\n"
                   f"parameters: {{{params}}}\nmodels:\n" + "".join(
                       f"  - model: {tiny_qwen2_view(m, tmp_path)}\n    parameters: {{weight: 1.0, density: "
                       f"{0.3 if method == 'ties' else 1.0}}}\n" for m in models))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    subprocess.run([str(exe), str(cfg), str(tmp_path / f"mk_{method}"), "--lazy-unpickle"], check=True,
                   capture_output=True)
    mk = {}
    for f in (tmp_path / f"mk_{method}").glob("*.safetensors"):
        mk.update(load_file(f))
    return mk


@pytest.mark.parametrize("method,args,params", [
    ("task_arithmetic", ["--lambda", "0.7"], "lambda: 0.7"),
    ("ties", ["--density", "0.3", "--lambda", "0.9"], "lambda: 0.9"),
])
def test_equals_mergekit(method, args, params, zoo, tmp_path):
    experts = [zoo["q1"], zoo["vl"], zoo["ov"]]  # mergekit reads the carriers' LMs as plain Qwen2 views
    out = tmp_path / "ours"
    assert run(merge.main, "--base", zoo["base"], "--models", *experts, "--method", method, *args, "--out", out) == 0
    mk = _mergekit(tmp_path, method, zoo["base"], experts, params)
    ours = load_file(out / "model.safetensors")
    for k in ours:
        torch.testing.assert_close(ours[k], mk[k], rtol=1e-5, atol=1e-6, msg=k)
    if method == "ties":  # and the in-memory definition, on the same inputs
        base, th = canonical(zoo["base"]), [canonical(e) for e in experts]
        for name in base:
            want = ties_merge(base[name], [t[name] for t in th], 0.3, 0.9)
            torch.testing.assert_close(ours[merge.lm_disk_key(name)], want, rtol=1e-6, atol=1e-7)


def task_vectors() -> dict[str, torch.Tensor]:
    """Task vectors of every kind the trim meets: fp32 noise, bf16 deltas (few distinct values, many ties), one
    entry, all zero, signed zeros with ±inf, subnormals beside normals, a long constant run."""
    g = torch.Generator().manual_seed(3)
    b = torch.randn(4000, generator=g).bfloat16()
    return {
        "fp32": torch.randn(5000, generator=g) * 0.01,
        "bf16": (b.float() + 0.01 * torch.randn(4000, generator=g)).bfloat16().float() - b.float(),
        "one": torch.tensor([-2.5]),
        "zeros": torch.zeros(100),
        "signed_zeros_inf": torch.tensor([-0.0, 0.0, 1.0, -1.0, float("inf"), -float("inf"), 3.0, -0.0]),
        "subnormal": torch.cat([torch.full((40,), 1e-40), torch.full((3,), -3e-39), torch.randn(20, generator=g)]),
        "constant_run": torch.cat([torch.full((300,), 0.125), torch.randn(50, generator=g)]),
    }


@pytest.mark.parametrize("kind", list(task_vectors()))
@pytest.mark.parametrize("density", [1e-9, 0.05, 0.2, 0.5, 0.99, 1.0])
def test_streamed_trim_search_finds_kthvalues_threshold(kind, density, monkeypatch):
    """``TrimSearch`` (the streamed merge's trim: radix select on |δ|'s bits, two passes over chunks in any order,
    memory independent of the tensor) gives ``TiesTrim.of``'s k-th largest |δ| (torch.kthvalue over the whole δ)
    bit for bit, and the same count of tied entries to keep; the streamed TIES merge itself never calls kthvalue
    (it held the whole δ, its |δ| and kthvalue's copy in fp32: gigabytes for a 7B model's embedding)."""
    delta = task_vectors()[kind]
    want = TiesTrim.of(delta, density)
    search = TrimSearch(delta.numel(), density)
    order = torch.randperm((delta.numel() + 36) // 37, generator=torch.Generator().manual_seed(1)).tolist()
    for second in (False, True):
        for c in order[::-1] if second else order:  # chunks out of order: the counts do not care
            search.count(delta[c * 37:(c + 1) * 37])
        if not second:
            search.end_pass()
    got = search.trim()
    assert struct.pack("<f", got.threshold) == struct.pack("<f", want.threshold), (got, want)
    assert got.ties_left == want.ties_left
    keep = got.mask(delta)
    assert int(keep.sum()) == max(1, int(density * delta.numel()))  # exactly k, ties included


def test_the_streamed_ties_merge_holds_no_whole_task_vector(zoo, tmp_path, monkeypatch):
    """The streamed TIES merge finds its thresholds by ``TrimSearch``; kthvalue (over a whole δ) is not called,
    and its output is the in-memory definition's and mergekit's (test_equals_mergekit[ties])."""
    def refuse(*a, **k):
        raise AssertionError("kthvalue: the whole task vector in memory")

    monkeypatch.setattr(torch, "kthvalue", refuse)
    assert run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["q1"], "--method", "ties", "--quiet",
               "--out", tmp_path / "t") == 0


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5])
def test_ties_trim_keeps_exactly_k_when_bf16_deltas_tie(density):
    """bf16 checkpoints give deltas of few distinct values, so many tie with the k-th largest |δ|: the trim keeps
    exactly k entries like mergekit's ``magnitude`` (which once kept every tie here), the same ones outside the
    ties, the lowest-index ties first, and the same mask whether it sees the tensor whole or in row chunks."""
    from mergekit.sparsify import magnitude
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g).bfloat16()
    expert = (base.float() + 0.01 * torch.randn(64, 48, generator=g)).bfloat16()
    delta = expert.float() - base.float()
    k = max(1, int(density * delta.numel()))
    whole = TiesTrim.of(delta, density)
    tied = delta.abs() == whole.threshold
    assert int(tied.sum()) > 1 and int((delta.abs() >= whole.threshold).sum()) > k  # the case that went wrong
    ours = whole.mask(delta)
    theirs = magnitude(delta, density) != 0
    assert int(ours.sum()) == int(theirs.sum()) == k
    assert torch.equal(ours[~tied], theirs[~tied])
    kept_ties = ours[tied].nonzero().squeeze(1)
    assert torch.equal(kept_ties, torch.arange(len(kept_ties)))  # the first ties in flat order
    chunked = TiesTrim.of(delta, density)
    assert torch.equal(torch.cat([chunked.mask(delta[r:r + 5]) for r in range(0, 64, 5)]), ours)
    assert chunked.ties_left == 0


def test_normalise_salience_by_hand():
    """ŝ = max(s, 0) / mean max(s, 0), worked out by hand; a table with no positive salience is refused (it was
    reachable only through read_salience's own check, so dividing by a zero mean passed every test)."""
    from analyses.formulas import normalise_salience

    s = torch.tensor([[3.0, -1.0, 0.0], [1.0, 2.0, -5.0]])  # clamped: [[3, 0, 0], [1, 2, 0]], mean 1
    got = normalise_salience(s)
    assert got.dtype == torch.float64
    assert got.tolist() == [[3.0, 0.0, 0.0], [1.0, 2.0, 0.0]]
    assert normalise_salience(torch.tensor([[0.5, 1.5]])).tolist() == [[0.5, 1.5]]  # already mean 1: unchanged
    assert normalise_salience(torch.tensor([[4.0, 0.0], [0.0, 0.0]])).tolist() == [[4.0, 0.0], [0.0, 0.0]]
    for bad in (torch.zeros(2, 3), torch.tensor([[-1.0, 0.0], [-2.0, -0.5]])):
        with pytest.raises(ValueError, match="zero for every head"):
            normalise_salience(bad)
    # finite saliences whose sum overflows a float (heads.csv takes any KL ≥ 0): ŝ was s / inf = 0 everywhere, so
    # the model whose heads matter most got the least weight; the ratios are those of the table scaled down
    huge = torch.tensor([[10.0, 17.0], [0.0, 15.0]], dtype=torch.float64) * 1e307  # Σ = 4.2e308
    assert torch.isfinite(huge).all() and not torch.isfinite(huge.sum())
    want = [[10 / 10.5, 17 / 10.5], [0.0, 15 / 10.5]]
    assert normalise_salience(huge).flatten().tolist() == pytest.approx(sum(want, []), rel=1e-12)


# merge_weights.csv's columns (DESIGN §9: tensor, slice, model, weight): each means one thing for every method
WEIGHTS_HEADER = ["tensor", "slice", "model", "delta_avg", "weight", "trim_threshold"]
COLUMN_METHODS = {"average": [], "weighted": ["--weights", 3, 1, 1], "shift": ["--alpha0", 0.4],
                  "task_arithmetic": ["--lambda", 0.3], "ties": ["--density", 0.3, "--lambda", 0.7], "salience": []}


def _column_merge(method: str, zoo, runs, out: Path) -> list[str]:
    """The command line of a ``method`` merge of the three experts into ``out`` (run by the caller)."""
    experts = [zoo["vl"], zoo["ov"], zoo["au"]]
    sal = ["--salience", *runs["dirs"]] if method == "salience" else []
    return ["--base", zoo["base"], "--models", *experts, "--method", method, *COLUMN_METHODS[method], *sal,
            "--quiet", "--out", out]


def _slice_of(t: torch.Tensor, sl: str) -> torch.Tensor:
    """The part of ``t`` a merge_weights.csv slice names ("all", "rows a:b", "columns a:b")."""
    if sl == "all":
        return t
    what, span = sl.split(" ")
    a, b = map(int, span.split(":"))
    return t[a:b] if what == "rows" else t[:, a:b]


@pytest.mark.parametrize("method", list(COLUMN_METHODS))
def test_each_merge_weights_column_means_one_thing(method, zoo, runs, tmp_path):
    """One 'alpha' column held each model's coefficient for every method but ties, where it held the trim
    threshold. Now ``weight`` is w_i of θ_slice = Σ_i w_i θ_i,slice for every method that has one: the merged
    slice rebuilt from the file's weights is the merged model's, the weights are the method's formula written
    out (1/n, the normalised --weights, [1 − λn, λ, …]) and sum to 1 where they are convex (task arithmetic's too:
    affine), and the trim threshold column is empty. Ties has no weight (empty on every row); its
    ``trim_threshold`` is the top-k magnitude cut of each task vector computed directly, k = max(1, ⌊density ·
    numel⌋). merge.json's means are the columns' means per model, null for the column the method leaves empty."""
    out = tmp_path / method
    assert run(merge.main, *_column_merge(method, zoo, runs, out)) == 0
    with open(out / "merge_weights.csv", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == WEIGHTS_HEADER
    info = json.loads((out / "merge.json").read_text(encoding="utf-8"))
    names = [str(zoo["base"]), *(str(zoo[e]) for e in ("vl", "ov", "au"))]
    thetas = dict(zip(names, [canonical(zoo["base"]), *(canonical(zoo[e]) for e in ("vl", "ov", "au"))]))
    base, got = thetas[names[0]], canonical(out)
    assert {r["tensor"] for r in rows} == set(base)  # every tensor has its rows
    col, empty = ("trim_threshold", "weight") if method == "ties" else ("weight", "trim_threshold")
    assert all(r[empty] == "" for r in rows) and info[f"mean_{empty}"] is None
    means = {m: sum(float(r[col]) for r in rows if r["model"] == m) / sum(r["model"] == m for r in rows)
             for m in {r["model"] for r in rows}}
    assert info[f"mean_{col}"] == pytest.approx(means, rel=1e-12)
    if method == "ties":
        assert {r["model"] for r in rows} == set(names[1:]) and len(rows) == 3 * len(base)
        for r in rows:
            d = (thetas[r["model"]][r["tensor"]].float() - base[r["tensor"]].float()).abs().reshape(-1)
            k = max(1, int(0.3 * d.numel()))
            assert float(r["trim_threshold"]) == float(torch.topk(d, k).values[-1]), (r["model"], r["tensor"])
        return
    slices: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        slices.setdefault((r["tensor"], r["slice"]), {})[r["model"]] = float(r["weight"])
    direct = {"average": [1 / 3] * 3, "weighted": [3 / 5, 1 / 5, 1 / 5], "task_arithmetic": [1 - 3 * 0.3] + [0.3] * 3}
    for (tensor, sl), w in slices.items():
        if method in direct:
            want = dict(zip(names if method == "task_arithmetic" else names[1:], direct[method]))
            assert w == pytest.approx(want, rel=1e-12), (tensor, sl)
        else:  # shift, salience: convex weights with the base's own row
            assert set(w) == set(names) and all(0.0 <= x <= 1.0 for x in w.values()), (tensor, sl)
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-9), (tensor, sl)
        rebuilt = sum(x * _slice_of(thetas[m][tensor].double(), sl) for m, x in w.items())
        torch.testing.assert_close(_slice_of(got[tensor].double(), sl), rebuilt, rtol=1e-5, atol=1e-6,
                                   msg=f"{tensor} {sl}")
    if method == "salience":
        assert any(sl != "all" for _, sl in slices)  # head slices, weighted by salience


def _as_before(out: Path, method: str) -> None:
    """Rewrite ``out``'s merge_weights.csv and merge.json as analyses.merge wrote them before 2026-12-06: one
    ``alpha`` column (ties: the trim threshold, else the weight) after delta_avg, each cell's text as it was, and
    merge.json's ``mean_alpha`` in place of mean_weight and mean_trim_threshold."""
    col = "trim_threshold" if method == "ties" else "weight"
    with open(out / "merge_weights.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(out / "merge_weights.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["tensor", "slice", "model", "delta_avg", "alpha"])
        w.writerows([r["tensor"], r["slice"], r["model"], r["delta_avg"], r[col]] for r in rows)
    info = json.loads((out / "merge.json").read_text(encoding="utf-8"))
    old = {}
    for k, v in info.items():
        if k == "mean_weight":
            old["mean_alpha"] = info[f"mean_{col}"]
        elif k != "mean_trim_threshold":
            old[k] = v
    (out / "merge.json").write_text(json.dumps(old, indent=2), encoding="utf-8")


@pytest.mark.parametrize("method", ["salience", "ties", "task_arithmetic"])
def test_a_merge_written_before_the_weight_column_reads_draws_and_resumes_as_before(method, zoo, runs, tmp_path,
                                                                                      capfd):
    """Result dirs of earlier runs hold merge_weights.csv's 'alpha' column and merge.json's mean_alpha: written
    here by hand from a new merge (cell texts kept), they read back as the new merge does (``Merge.read``: the same
    weights frame, ties' alpha as its trim threshold, and the same info, mean_alpha as mean_weight or ties'
    mean_trim_threshold), ``python -m figures merge`` draws a salience merge's the same (the same PNG bytes), and
    the same command again finds it finished (exit 0, nothing rewritten) while other options are refused as before."""
    import pandas as pd

    from figures.__main__ import main as figures_main
    from figures.merge import draw_merge
    from figures.results import Merge

    new, old = tmp_path / "new", tmp_path / "old"
    assert run(merge.main, *_column_merge(method, zoo, runs, new)) == 0
    shutil.copytree(new, old)
    _as_before(old, method)
    assert (old / "merge_weights.csv").read_text(encoding="utf-8").startswith("tensor,slice,model,delta_avg,alpha\n")
    a, b = Merge.read(new), Merge.read(old)
    pd.testing.assert_frame_equal(a.weights, b.weights)
    assert a.info == b.info and b.info["mean_trim_threshold" if method == "ties" else "mean_weight"]
    if method == "salience":
        assert {k: v.tolist() for k, v in a.head_weights().items()} == {k: v.tolist()
                                                                        for k, v in b.head_weights().items()}
        draw_merge(new)  # both drawn by this process (the merge drew them too)
        assert run(figures_main, "merge", old) == 0
        assert (old / "merge_heads.png").read_bytes() == (new / "merge_heads.png").read_bytes()
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    capfd.readouterr()
    assert run(merge.main, *_column_merge(method, zoo, runs, old)) == 0
    assert "already" in capfd.readouterr().out
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    other = _column_merge(method, zoo, runs, old)
    other[other.index("--models") + 3:other.index("--models") + 4] = []  # two experts, not three
    if method == "salience":
        other.remove(runs["dirs"][2])
    assert run(merge.main, *other) == 2
    assert "holds a finished analyses.merge output of other options or inputs" in capfd.readouterr().err
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before


def test_a_config_deeper_than_the_weights_is_refused_before_anything_is_written(zoo, tmp_path, capfd):
    """The reverse of the case above: config.json declares a layer (here layer 2) its weights do not hold. A
    probe.heads run sweeps the config's layers, so a 3-layer heads.csv matched the geometry and the merge went on
    with salience for a layer nothing in it merges. Exit 2, one line naming the missing layer, nothing written."""
    models = {}
    for name in ("base", "vl", "ov"):
        d = models[name] = Path(shutil.copytree(zoo[name], tmp_path / name))
        cfg = json.loads((d / "config.json").read_text())
        cfg.get("text_config", cfg)["num_hidden_layers"] = L + 1  # the weights keep layers 0 and 1 only
        (d / "config.json").write_text(json.dumps(cfg))
    dirs = [write_run(tmp_path / f"r{i}", torch.rand(L + 1, H) + 0.1, layers=L + 1) for i in range(2)]
    capfd.readouterr()
    out = tmp_path / "m"
    code = run(merge.main, "--base", models["base"], "--models", models["vl"], models["ov"], "--method", "salience",
               "--salience", *dirs, "--quiet", "--out", out)
    err = capfd.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: --base {models['base']}: ") and "\n" not in err, err
    assert f"num_hidden_layers {L + 1}" in err and f"no tensors of layer {L} " in err, err
    assert not out.exists() and not list(tmp_path.glob(".m.*"))


def test_a_salience_merge_reads_each_heads_csv_once_and_records_what_it_read(zoo, tmp_path, monkeypatch):
    """analyses.merge read each run's heads.csv twice: once for its values (read_salience), once for the manifest's
    fingerprint (run_fingerprint), so a table rewritten between the two reads was merged by one content and recorded
    as another. Now it is opened once, and the manifest records the fingerprint of those very bytes."""
    import io

    from analyses.merge_methods import run_fingerprint
    from probe.results import read_manifest

    dirs = [write_run(tmp_path / f"r{i}", torch.rand(L, H) + 0.1) for i in range(2)]
    opened: list[str] = []
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        if Path(str(file)).name == "heads.csv":
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr("builtins.open", counting_open)
    out = tmp_path / "m"
    assert run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["ov"], "--method", "salience",
               "--salience", *dirs, "--quiet", "--out", out) == 0
    monkeypatch.undo()
    assert sorted(opened) == sorted(str(d / "heads.csv") for d in dirs), opened
    recorded = [fp for _, fp in read_manifest(out)["request"]["inputs"]]
    for d in dirs:  # an independent oracle: the fingerprint of the file's bytes, as they still are
        assert run_fingerprint(d, (d / "heads.csv").read_bytes()) in recorded


@pytest.mark.parametrize("with_base", [False, True])
def test_the_order_of_the_experts_changes_no_merged_bit(zoo, runs, tmp_path, with_base):
    """The experts (each with its own salience run) listed in another order give the same merged bits: the head
    slices' fp32 sums and their softmax ran in the order typed, and moved by an ulp (1 bf16 ulp in 19 of the
    organisms' 51 tensors)."""
    experts = [zoo["vl"], zoo["ov"], zoo["au"]]
    extra = ["--base-salience", write_run(tmp_path / "b", runs["base_table"])] if with_base else []
    got = []
    for name, idx in (("typed", [0, 1, 2]), ("reordered", [2, 0, 1])):
        out = tmp_path / name
        assert run(merge.main, "--base", zoo["base"], "--models", *[experts[i] for i in idx], "--method",
                   "salience", "--salience", *[runs["dirs"][i] for i in idx], *extra, "--quiet", "--out", out) == 0
        got.append(canonical(out))
    moved = [k for k in got[0] if not torch.equal(got[0][k], got[1][k])]
    assert got[0].keys() == got[1].keys() and not moved, moved[:3]
    # anti-tautology: the experts' slices did move the merge away from the base
    assert not torch.equal(got[0]["layers.0.self_attn.q_proj.weight"],
                           canonical(zoo["base"])["layers.0.self_attn.q_proj.weight"])


def test_a_heads_csv_without_the_metric_is_named_so_not_unreadable(tmp_path):
    """read_salience's own refusals inside its csv-reading block (a missing column, a short row) pass as raised: the
    block's ``except ValueError`` (a cell that is no number) would have reworded them as "unreadable (…)" once
    BadInput is a ValueError."""
    from analyses.salience import read_salience
    from probe.errors import BadInput
    from probe.lm_config import HeadGeometry

    run = write_run(tmp_path / "r", torch.ones(L, H))
    heads = run / "heads.csv"
    heads.write_text("layer,head\n0,0\n")
    with pytest.raises(BadInput) as caught:
        read_salience(run, "kl", HeadGeometry(L, H, KV, D, H * D), "e1")
    assert str(caught.value) == f"{heads}: no 'kl' column"
