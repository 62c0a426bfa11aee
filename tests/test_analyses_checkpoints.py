"""Checkpoint layer: every layout of DESIGN §1, layout invariance, bad input -> exit 2 with one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from analyses import merge, shift, tiny, trajectory
from analyses.checkpoints import open_checkpoint
from probe.errors import BadInput, cli_main


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    return tiny.build_zoo(tmp_path_factory.mktemp("zoo"))


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    code = cli_main(main, [str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_bad(code: int, err: str, out: Path, *needles: str) -> None:
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("name,layout", [
    ("base", "qwen2"), ("vl", "qwen2_vl"), ("vl_tf4", "qwen2_vl_tf4"), ("ov", "llava_onevision"),
    ("ov_tf4", "llava_onevision_tf4"), ("ov_lmms", "llava_next_original"), ("au", "qwen2_audio"),
])
def test_layout_detected_and_lm_mapped(zoo, name, layout):
    with open_checkpoint(str(zoo[name])) as ck:
        assert ck.layout.name == layout
        assert set(ck.lm) == set(open_checkpoint(str(zoo["base"])).lm)  # 27 canonical LM tensors
        assert ck.other or name == "base"


def test_same_weights_in_two_layouts_identical(zoo, tmp_path, capsys):
    for a, b in (("ov", "ov_tf4"), ("ov", "ov_lmms"), ("vl", "vl_tf4")):
        rows = {}
        for m in (a, b):
            assert run_cli(shift.main, ["--base", zoo["base"], "--models", zoo[m], "--out", tmp_path / f"s{m}{a}{b}",
                                        "--no-figures"], capsys)[0] == 0
            rows[m] = [ln.split(",", 1)[1] for ln in (tmp_path / f"s{m}{a}{b}" / "shift.csv").read_text().splitlines()[1:]]
            assert run_cli(merge.main, ["--base", zoo["base"], "--models", zoo[m], zoo["q1"], "--out",
                                        tmp_path / f"m{m}{a}{b}"], capsys)[0] == 0
        assert rows[a] == rows[b]
        ta = load_file(tmp_path / f"m{a}{a}{b}" / "model.safetensors")
        tb = load_file(tmp_path / f"m{b}{a}{b}" / "model.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_bin_only_with_flag(zoo, tmp_path, capsys):
    d = tmp_path / "binmodel"
    d.mkdir()
    (d / "config.json").write_text((zoo["q1"] / "config.json").read_text())
    torch.save(load_file(zoo["q1"] / "model.safetensors"), d / "pytorch_model.bin")
    out = tmp_path / "o"
    code, err = run_cli(shift.main, ["--base", zoo["base"], "--models", d, "--out", out, "--no-figures"], capsys)
    assert_bad(code, err, out, "--allow-bin")
    code, _ = run_cli(shift.main, ["--base", zoo["base"], "--models", d, zoo["q1"], "--out", out, "--no-figures",
                                   "--allow-bin"], capsys)
    assert code == 0
    s = json.loads((out / "summary.json").read_text())["per_model"]
    assert s[str(d)]["mean_delta_avg"] == s[str(zoo["q1"])]["mean_delta_avg"]


def test_summary_records_each_models_dtypes(zoo, tmp_path, capsys):
    """summary.json's one "dtype" was the base's first tensor's, whatever the models held (an fp16 or mixed model
    beside an fp32 base read "torch.float32"). Each entry (base and every model) records the dtypes of its LM
    tensors now; the oracle is the dtypes written into the hand-made files' headers."""
    import struct

    def header_dtypes(d: Path) -> list[str]:
        raw = (d / "model.safetensors").read_bytes()
        head = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
        names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
        return sorted({names[v["dtype"]] for k, v in head.items() if k != "__metadata__"})

    made = {}
    for name, cast in (("half", lambda k: torch.float16), ("mixed", lambda k: torch.bfloat16 if "mlp" in k else None)):
        d = made[name] = tmp_path / name
        shutil.copytree(zoo["q1"], d)
        w = load_file(d / "model.safetensors")
        save_file({k: v.to(cast(k) or v.dtype) for k, v in w.items()}, d / "model.safetensors",
                  metadata={"format": "pt"})
    out = tmp_path / "s"
    assert run_cli(shift.main, ["--base", zoo["base"], "--models", made["half"], made["mixed"], "--out", out,
                                "--no-figures"], capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["base"]["dtypes"] == header_dtypes(zoo["base"]) == ["float32"]
    assert [e["dtypes"] for e in summary["models"]] == [header_dtypes(made["half"]), header_dtypes(made["mixed"])]
    assert header_dtypes(made["mixed"]) == ["bfloat16", "float32"]
    assert "dtype" not in summary  # the base's first tensor's alone: gone, not kept with a misleading meaning


def corrupt_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard(zoo, tmp_path, capsys):
    d = corrupt_copy(zoo["ov"], tmp_path / "ov_missing")
    (d / "model-00003-of-00009.safetensors").unlink()
    out = tmp_path / "o"
    code, err = run_cli(merge.main, ["--base", zoo["base"], "--models", d, "--method", "shift", "--out", out], capsys)
    assert_bad(code, err, out, "missing shard", "model-00003-of-00009")


def test_corrupt_file(zoo, tmp_path, capsys):
    d = corrupt_copy(zoo["q1"], tmp_path / "q_trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    out = tmp_path / "o"
    code, err = run_cli(merge.main, ["--models", d, zoo["base"], "--method", "average", "--out", out], capsys)
    assert_bad(code, err, out, "corrupt")
    f.write_bytes(b"\xff" * 64)
    code, err = run_cli(merge.main, ["--models", d, zoo["base"], "--method", "average", "--out", out], capsys)
    assert_bad(code, err, out, "corrupt")


def test_safetensors_ranges_that_overlap_or_leave_bytes_over_are_corrupt(zoo, tmp_path, capsys):
    """Two tensors over the same bytes (one read as the other: exit 0 with wrong numbers) or bytes after the last
    tensor: the safetensors library, and so transformers, refuses both files; the analyses do too."""
    from safetensors import SafetensorError, safe_open

    d = corrupt_copy(zoo["q1"], tmp_path / "q_overlap")
    f = d / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
    header[a]["data_offsets"] = header[b]["data_offsets"]  # same shape and dtype: only the ranges tell
    text = json.dumps(header, separators=(",", ":")).encode()
    f.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:])
    variants = {"overlap": f.read_bytes(), "bytes after": raw + b"\0" * 8}
    out = tmp_path / "o"
    for needle, data in variants.items():
        f.write_bytes(data)
        with pytest.raises(SafetensorError):  # the oracle: the reader transformers uses
            safe_open(str(f), "pt")
        for main, argv in ((shift.main, ["--base", zoo["base"], "--models", d, "--no-figures"]),
                           (merge.main, ["--models", zoo["base"], d, "--method", "average"]),
                           (trajectory.main, ["--base", zoo["base"], "--experts", d, "--no-figures"])):
            code, err = run_cli(main, [*argv, "--out", out], capsys)
            assert_bad(code, err, out, "corrupt", "q_overlap", needle)


@pytest.mark.parametrize("raw", [b"[1, 2]", b"\xff\xfe{\x00"])
def test_a_config_json_that_is_not_a_json_object_is_bad_input(zoo, tmp_path, capsys, raw):
    """A JSON array, or bytes that are not UTF-8, in config.json was a traceback (exit 1) in every command."""
    d = corrupt_copy(zoo["q1"], tmp_path / "q_cfg")
    (d / "config.json").write_bytes(raw)
    out = tmp_path / "o"
    for main, argv in ((shift.main, ["--base", zoo["base"], "--models", d, "--no-figures"]),
                       (merge.main, ["--models", zoo["base"], d, "--method", "average"]),
                       (trajectory.main, ["--base", d, "--experts", zoo["vl"], "--no-figures"])):
        code, err = run_cli(main, [*argv, "--out", out], capsys)
        assert_bad(code, err, out, "unreadable config.json", "q_cfg")


def test_nan_tensor_named(zoo, tmp_path, capsys):
    d = corrupt_copy(zoo["q1"], tmp_path / "q_nan")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    for main, argv in ((merge.main, ["--base", zoo["base"], "--models", zoo["vl"], d, "--method", "shift"]),
                       (merge.main, ["--models", zoo["base"], d, "--method", "average"]),
                       (shift.main, ["--base", zoo["base"], "--models", d, "--no-figures"])):
        out = tmp_path / "o"
        code, err = run_cli(main, [*argv, "--out", out], capsys)
        assert_bad(code, err, out, "NaN", "model.layers.1.mlp.up_proj.weight", "q_nan")


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "num_hidden_layers"])
def test_a_config_without_its_head_layout_is_refused(zoo, tmp_path, capsys, key):
    """shift and merge read only tensors and took a config.json without hidden_size (exit 0; the merge copied it
    into its output), while probe.heads and probe.eval refuse it: every command refuses it now."""
    d = corrupt_copy(zoo["q1"], tmp_path / "q_cfg")
    cfg = json.loads((d / "config.json").read_text())
    del cfg[key]
    (d / "config.json").write_text(json.dumps(cfg))
    for main, argv in ((merge.main, ["--models", zoo["base"], d, "--method", "average"]),
                       (shift.main, ["--base", zoo["base"], "--models", d, "--no-figures"]),
                       (trajectory.main, ["--base", zoo["base"], "--experts", d, "--no-figures"])):
        out = tmp_path / "o"
        code, err = run_cli(main, [*argv, "--out", out], capsys)
        assert_bad(code, err, out, f"{d}: config lacks {key!r}: cannot tell the head layout")


def test_lm_shapes_differ(zoo, tmp_path, capsys):
    big = tiny.write_model("qwen2", tmp_path / "wide", tiny.base_lm(5, hidden_size=48), hidden_size=48)
    out = tmp_path / "o"
    code, err = run_cli(merge.main, ["--base", zoo["base"], "--models", big, "--out", out], capsys)
    assert_bad(code, err, out, "LM shapes differ")
    deep = tiny.write_model("qwen2", tmp_path / "deep", tiny.base_lm(5, num_hidden_layers=3), num_hidden_layers=3)
    code, err = run_cli(merge.main, ["--models", deep, zoo["base"], "--method", "average", "--out", out], capsys)
    assert_bad(code, err, out, "LM tensor sets differ")
    # the other way round: the reference (base, first model, trajectory ref) has fewer layers than an expert, whose
    # extra layers would otherwise vanish from the merge and the shift table
    for main, argv in ((merge.main, ["--base", zoo["base"], "--models", zoo["vl"], deep, "--method", "shift"]),
                       (merge.main, ["--models", zoo["base"], deep, "--method", "average"]),
                       (shift.main, ["--base", zoo["base"], "--models", deep, "--no-figures"])):
        code, err = run_cli(main, [*argv, "--out", out], capsys)
        assert_bad(code, err, out, "LM tensor sets differ", "layers.2.", "is in " + str(deep))


def test_same_shapes_split_into_other_heads_are_refused(zoo, tmp_path, capsys):
    """8 heads of 4 (4 KV) give every LM tensor the shape 4 heads of 8 (2 KV) give: shapes alone let a merge mix
    unrelated head rows with exit 0, and put an LM into a carrier whose config splits it into other heads."""
    kw = dict(num_attention_heads=8, num_key_value_heads=4)
    other = tiny.write_model("qwen2", tmp_path / "h8", tiny.base_lm(5, **kw), **kw)
    carrier = tiny.write_model("qwen2_vl", tmp_path / "vl8", tiny.base_lm(6, **kw), **kw)
    with open_checkpoint(str(zoo["base"])) as a, open_checkpoint(str(other)) as b:
        assert {k: a.infos[v].shape for k, v in a.lm.items()} == {k: b.infos[v].shape for k, v in b.lm.items()}
    out = tmp_path / "o"
    for main, argv, who in ((merge.main, ["--base", zoo["base"], "--models", other, "--method", "shift"], other),
                            (merge.main, ["--models", other, zoo["base"], "--method", "average"], zoo["base"]),
                            (merge.main, ["--base", zoo["base"], "--models", zoo["q1"], "--carrier", carrier], carrier),
                            (shift.main, ["--base", zoo["base"], "--models", other, "--no-figures"], other),
                            (trajectory.main, ["--base", zoo["base"], "--experts", zoo["q1"], other, "--no-figures"],
                             other)):
        code, err = run_cli(main, [*argv, "--out", out], capsys)
        assert_bad(code, err, out, "LM architectures differ", f"{who} has 2 layers, {8 if who != zoo['base'] else 4} "
                   "heads")


def test_impossible_head_counts_in_config_json(zoo, tmp_path, capsys):
    """0 or "four" heads: the merge copied the reference's config into an LM no class loads; now exit 2 naming it."""
    out = tmp_path / "o"
    for value, needle in ((0, "got 0"), ("four", "got 'four'"), (3, "3 attention heads of 8 in 2 key/value groups")):
        bad = tmp_path / f"bad-{value}"
        shutil.copytree(zoo["q1"], bad)
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps(cfg | {"num_attention_heads": value, "head_dim": 8}))
        for argv in (["--models", bad, zoo["base"]], ["--models", zoo["base"], bad]):
            code, err = run_cli(merge.main, [*argv, "--method", "average", "--out", out], capsys)
            assert_bad(code, err, out, f"{bad}: config", needle)


def test_a_model_twice_or_out_over_an_input(zoo, tmp_path, capsys):
    """A model listed twice would count twice in every mean; --out on (or above) an input would replace it under
    --overwrite. Both are refused and the input is left as it was."""
    out = tmp_path / "o"
    for main, argv in ((merge.main, ["--models", zoo["vl"], zoo["vl"], "--method", "average"]),
                       (shift.main, ["--base", zoo["base"], "--models", zoo["vl"], zoo["vl"], "--no-figures"])):
        code, err = run_cli(main, [*argv, "--out", out], capsys)
        assert_bad(code, err, out, f"{zoo['vl']} is listed twice", "list each model once")
    code, err = run_cli(merge.main, ["--models", zoo["vl"], f"{zoo['vl']}/", "--method", "average", "--out", out],
                        capsys)  # one checkpoint under two names: both named
    assert_bad(code, err, out, f"{zoo['vl']}/ and {zoo['vl']} are the same checkpoint", "list each model once")
    victim = corrupt_copy(zoo["vl"], tmp_path / "victim")
    before = sorted((f.name, f.read_bytes()) for f in victim.iterdir())
    for main, argv in ((merge.main, ["--base", zoo["base"], "--models", victim, zoo["q1"], "--method", "average"]),
                       (merge.main, ["--models", zoo["base"], zoo["q1"], "--method", "average", "--carrier", victim]),
                       (shift.main, ["--base", zoo["base"], "--models", victim, "--no-figures"])):
        for target in (victim, tmp_path):
            code, err = run_cli(main, [*argv, "--out", target, "--overwrite"], capsys)
            assert code == 2 and "would replace the input" in err and err.count("\n") == 1, err
    assert sorted((f.name, f.read_bytes()) for f in victim.iterdir()) == before


def test_unknown_layout(zoo, tmp_path, capsys):
    d = corrupt_copy(zoo["q1"], tmp_path / "neox")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"  # no layout row (llama has one since issue 21)
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o"
    code, err = run_cli(shift.main, ["--base", zoo["base"], "--models", d, "--out", out], capsys)
    assert_bad(code, err, out, "unsupported model_type 'gpt_neox'")
    cfg["model_type"] = "qwen2_vl"  # a known type whose keys match none of its layouts
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(shift.main, ["--base", zoo["base"], "--models", d, "--out", out], capsys)
    assert_bad(code, err, out, "unknown checkpoint layout")



def test_a_second_copy_of_the_lm_in_another_layout_is_refused(zoo, tmp_path, capsys):
    """A Qwen2-VL holding its LM twice, as published (model.layers.) and as transformers 4 wrote it
    (model.language_model.layers., values + 1): read as the published layout, the second copy was put aside as
    vision tower (a carrier would copy it) and the shift measured one copy, while transformers loads one of the two
    without a word. Refused by every command, in one line naming a key of the second layout."""
    d = corrupt_copy(zoo["vl"], tmp_path / "vl_twice")
    f = d / "model.safetensors"
    sd = load_file(f)
    sd |= {"model.language_model." + k[len("model."):]: v + 1 for k, v in sd.items() if k.startswith("model.")}
    save_file(sd, f, metadata={"format": "pt"})
    before = f.read_bytes()
    out = tmp_path / "o"
    for main, argv in ((shift.main, ["--base", zoo["base"], "--models", d, "--no-figures"]),
                       (merge.main, ["--models", zoo["base"], d, "--method", "average"]),
                       (trajectory.main, ["--base", zoo["base"], "--experts", d, "--no-figures"])):
        code, err = run_cli(main, [*argv, "--out", out], capsys)
        assert_bad(code, err, out, str(d), "keys of two layouts", "model.language_model.", "qwen2_vl_tf4")
    assert f.read_bytes() == before


@pytest.mark.parametrize("name", ["ov", "ov_lmms", "au"])
def test_a_config_without_model_type_is_refused(zoo, tmp_path, capsys, name):
    """The layout is read from config.json's model_type and the keys (DESIGN §1). A config without model_type was
    matched against every layout, and where one layout's markers fit (LLaVA-OneVision, the lmms-lab original,
    Qwen2-Audio) it was read as that family, a guess the probe never makes (it refuses such a config): refused."""
    d = corrupt_copy(zoo[name], tmp_path / name)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["model_type"]
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o"
    code, err = run_cli(shift.main, ["--base", zoo["base"], "--models", d, "--out", out, "--no-figures"], capsys)
    assert_bad(code, err, out, f"{d}/config.json has no model_type")

def test_existing_output_and_unknown_model(zoo, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = run_cli(merge.main, ["--models", zoo["base"], zoo["q1"], "--method", "average", "--out", out], capsys)
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").exists()
    code, _ = run_cli(merge.main, ["--models", zoo["base"], zoo["q1"], "--method", "average", "--out", out,
                                   "--overwrite"], capsys)
    assert code == 2 and (out / "keep.txt").exists()  # not a merge output: see test_overwrite_replaces_only_…
    (out / "keep.txt").unlink()
    code, _ = run_cli(merge.main, ["--models", zoo["base"], zoo["q1"], "--method", "average", "--out", out,
                                   "--overwrite"], capsys)
    assert code == 0 and (out / "model.safetensors").is_file()
    # the same merge of other models: a finished output of another request, said so (test_a_finished_output_…)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    code, err = run_cli(merge.main, ["--models", zoo["base"], zoo["vl"], "--method", "average", "--out", out], capsys)
    assert code == 2 and f"error: {out} holds a finished analyses.merge output of other options or inputs" in err
    code, err = run_cli(shift.main, ["--base", zoo["base"], "--models", zoo["q1"], "--out", out], capsys)
    assert code == 2 and f"error: {out} exists; pass --overwrite" in err  # another command's output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    o2 = tmp_path / "o2"
    code, err = run_cli(merge.main, ["--models", "no-such-model", "--method", "average", "--out", o2], capsys)
    assert_bad(code, err, o2, "no-such-model")
    code, err = run_cli(merge.main, ["--models", "qwen2-vl", "--method", "average", "--out", o2], capsys)
    assert_bad(code, err, o2, "local Hugging Face cache")


FINISHED_RUNS = {  # command, its first arguments, an option that changes the output, the report it returns
    "shift": (shift, lambda z: ["--base", z["base"], "--models", z["q1"]], ["--no-figures"], "summary.json"),
    "merge": (merge, lambda z: ["--models", z["base"], z["q1"], "--method", "average"], ["--shard-size", "1MB"],
              "merge.json"),
    "trajectory": (trajectory, lambda z: ["--base", z["base"], "--experts", z["q1"], z["vl"]], ["--seed", "1"],
                   "run.json"),
}


@pytest.mark.parametrize("command", FINISHED_RUNS)
def test_a_finished_output_rerun_is_a_no_op(zoo, tmp_path, capsys, command):
    """A kill that lands after the output was swapped in leaves a finished output; rerunning the same command (same
    options, inputs of the same content) exits 0 saying so and touches nothing, as a resumed sweep does. Another
    option, an input whose files changed, a file gone from the output, or an output from before manifests kept
    their request: refused in one line, the output untouched."""
    from probe.results import MANIFEST

    module, first, other, report = FINISHED_RUNS[command]
    q1 = tmp_path / "q1"
    shutil.copytree(zoo["q1"], q1)
    zoo = {**zoo, "q1": q1}
    out = tmp_path / "out"
    argv = [*first(zoo), "--out", out]
    assert run_cli(module.main, argv, capsys)[0] == 0
    state = lambda: sorted((str(p), p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")  # noqa: E731
                           for p in out.rglob("*"))
    before = state()
    code = cli_main(module.main, [str(a) for a in argv])
    printed = capsys.readouterr()
    assert code == 0 and f"{out} already holds this finished analyses.{command} output" in printed.out, printed
    assert state() == before
    config = {"shift": shift.ShiftConfig(str(zoo["base"]), [str(q1)], out),
              "merge": merge.MergeConfig([str(zoo["base"]), str(q1)], "average", out),
              "trajectory": trajectory.TrajectoryConfig(out, str(zoo["base"]), experts=[str(q1), str(zoo["vl"])])}
    run = {"shift": shift.run_shift, "merge": merge.run_merge, "trajectory": trajectory.run_trajectory}[command]
    assert run(config[command]) == json.loads((out / report).read_text())  # the API returns the saved report
    code, err = run_cli(module.main, [*argv, *other], capsys)
    assert code == 2 and f"error: {out} holds a finished analyses.{command} output of other options or inputs" in err
    saved = (q1 / "config.json").read_bytes()
    (q1 / "config.json").write_text(json.dumps({**json.loads(saved), "note": "edited"}))  # other content, same path
    code, err = run_cli(module.main, argv, capsys)
    assert code == 2 and "of other options or inputs" in err
    (q1 / "config.json").write_bytes(saved)
    assert run_cli(module.main, argv, capsys)[0] == 0  # the content is what counts, not the file's mtime
    assert state() == before
    gone = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)[-1]
    data = gone.read_bytes()
    gone.unlink()
    code, err = run_cli(module.main, argv, capsys)
    assert code == 2 and f"holds this finished analyses.{command} output, but {gone.relative_to(out)} is gone" in err
    gone.write_bytes(data)
    (out / report).write_text("{")  # torn by hand: said, not a traceback
    code, err = run_cli(module.main, argv, capsys)
    assert code == 2 and f"error: {out / report}: unreadable, in a finished analyses.{command} output" in err
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "request"}))
    code, err = run_cli(module.main, argv, capsys)  # an output written before manifests kept their request
    assert code == 2 and f"already holds a finished analyses.{command} output (nothing to resume)" in err
    assert run_cli(module.main, [*argv, "--overwrite"], capsys)[0] == 0
    assert json.loads((out / MANIFEST).read_text())["request"] == manifest["request"]


def test_figures_drawn_into_a_shift_table_leave_the_merge_that_read_it_finished(zoo, tmp_path, capsys):
    """A merge reads a --shift table's shift.csv and summary.json, not its figures. It fingerprinted every file below
    the table, so after the README's ``python -m figures shift DIR`` drew into a table written with --no-figures, the
    same merge rerun was refused as "of other options or inputs". Now the figures count for nothing, the data still
    count, and an output whose manifest fingerprinted the figures too (written before) still reads as finished."""
    from figures.shift import draw_shift
    from probe.results import MANIFEST, content_fingerprint

    table, out = tmp_path / "shift", tmp_path / "merged"
    assert run_cli(shift.main, ["--base", zoo["base"], "--models", zoo["q1"], "--out", table, "--no-figures"],
                   capsys)[0] == 0
    argv = ["--base", zoo["base"], "--models", zoo["q1"], "--shift", table, "--out", out]
    assert run_cli(merge.main, argv, capsys)[0] == 0
    assert draw_shift(table)  # figures into the table, as `python -m figures shift` draws them
    code = cli_main(merge.main, [str(a) for a in argv])
    printed = capsys.readouterr()
    assert code == 0 and f"{out} already holds this finished analyses.merge output" in printed.out, printed.err
    # a manifest of before: the table's fingerprint over every file, figures included (the formula by hand)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    entry = next(e for e in manifest["request"]["inputs"] if Path(e[0]) == table)
    entry[1] = content_fingerprint(table)
    (out / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    assert run_cli(merge.main, argv, capsys)[0] == 0
    with (table / "shift.csv").open("a", encoding="utf-8") as f:  # the data changed: another input
        f.write("\n")
    code, err = run_cli(merge.main, argv, capsys)
    assert code == 2 and f"error: {out} holds a finished analyses.merge output of other options or inputs" in err


def test_overwrite_replaces_only_an_earlier_output_of_the_same_command(zoo, tmp_path, capsys):
    """--overwrite swaps the whole --out for the new output: it used to delete whatever the folder held (``--out
    runs --overwrite`` wiped every run). Now it replaces only an earlier output of the same command holding nothing
    it did not write (its manifest, or for older outputs the file the command always writes); anything else is
    refused with one line and left as it was. Figures drawn into an output later belong to it."""
    from figures.__main__ import main as figures_main
    from probe.results import MANIFEST

    commands = {
        "shift": (shift.main, ["--base", zoo["base"], "--models", zoo["vl"], "--no-figures"]),
        "merge": (merge.main, ["--models", zoo["base"], zoo["q1"], "--method", "average", "--carrier", zoo["vl"]]),
        "trajectory": (trajectory.main, ["--base", zoo["base"], "--experts", zoo["vl"], zoo["q1"], "--no-figures"]),
    }
    for kind, (main, argv) in commands.items():
        out = tmp_path / kind
        assert run_cli(main, [*argv, "--out", out], capsys)[0] == 0
        assert json.loads((out / MANIFEST).read_text())["command"] == f"analyses.{kind}"
        if kind != "merge":  # figures drawn later into a --no-figures output are part of it
            assert run_cli(figures_main, [kind, str(out)], capsys)[0] == 0
        assert run_cli(main, [*argv, "--out", out, "--overwrite"], capsys)[0] == 0  # its own: replaced
        if kind == "merge":  # a file added deep inside the output (a carrier) is the user's too
            inner = out / "carriers" / next(p.name for p in (out / "carriers").iterdir()) / "my_eval.csv"
            inner.write_text("mine")
            code, err = run_cli(main, [*argv, "--out", out, "--overwrite"], capsys)
            assert code == 2 and f"{inner.relative_to(out).as_posix()}, which" in err, err
            assert inner.read_text() == "mine"
            inner.unlink()
        (out / "notes.txt").write_text("mine")
        (out / "my_runs").mkdir()
        (out / "my_runs" / "a.csv").write_text("mine")
        before = sorted((p.relative_to(out), p.is_file() and p.read_bytes()) for p in out.rglob("*"))
        code, err = run_cli(main, [*argv, "--out", out, "--overwrite"], capsys)
        assert code == 2 and err.count("\n") == 1 and "did not write" in err, err
        assert "my_runs, " in err and "notes.txt, which" in err and "my_runs/a.csv" not in err, err
        assert sorted((p.relative_to(out), p.is_file() and p.read_bytes()) for p in out.rglob("*")) == before
    runs = tmp_path / "runs"  # a folder of other things, or another command's output
    (runs / "a").mkdir(parents=True)
    for kind, (main, argv) in commands.items():
        for target in (runs, tmp_path / ("merge" if kind == "shift" else "shift")):
            code, err = run_cli(main, [*argv, "--out", target, "--overwrite"], capsys)
            assert code == 2 and f"is not an earlier analyses.{kind} output" in err and err.count("\n") == 1, err
    assert (runs / "a").is_dir()
    import os

    clean = tmp_path / "clean"
    assert run_cli(shift.main, [*commands["shift"][1], "--out", clean], capsys)[0] == 0
    cwd = Path.cwd()
    os.chdir(clean)  # --out . from inside an earlier output: the swap would rename the shell's dir (a traceback)
    try:
        before = sorted(p.name for p in Path(".").iterdir())
        code, err = run_cli(shift.main, [*commands["shift"][1], "--out", ".", "--overwrite"], capsys)
        assert code == 2 and "holds the current directory" in err and err.count("\n") == 1, err
        assert sorted(p.name for p in Path(".").iterdir()) == before
    finally:
        os.chdir(cwd)
    import shutil

    legacy = tmp_path / "shift"  # an output from before the manifest: recognised by its shift.csv, and replaced
    shutil.rmtree(legacy / "my_runs")   # only when it holds nothing but what shift writes
    (legacy / MANIFEST).unlink()
    code, err = run_cli(shift.main, [*commands["shift"][1], "--out", legacy, "--overwrite"], capsys)
    assert code == 2 and "notes.txt, which analyses.shift did not write" in err and (legacy / "notes.txt").exists()
    (legacy / "notes.txt").unlink()
    assert run_cli(shift.main, [*commands["shift"][1], "--out", legacy, "--overwrite"], capsys)[0] == 0


def test_quiet_silences_the_progress_bars_and_only_inside(zoo, tmp_path, capfd):
    argv = ["--base", zoo["base"], "--models", zoo["vl"], "--no-figures"]
    for k, quiet in enumerate((False, True, False)):  # the last: a quiet run leaves later ones their bars
        capfd.readouterr()
        out = tmp_path / f"q{k}"
        assert cli_main(shift.main, [str(a) for a in [*argv, "--out", out, *(["--quiet"] if quiet else [])]]) == 0
        err = capfd.readouterr().err
        assert ("tensor/s" in err) != quiet, err


@pytest.mark.parametrize("args,needle", [
    (["--method", "weighted", "--weights", "nan", "1"], "--weights[0] must be a finite number"),
    (["--method", "weighted", "--weights", "-1", "2"], "--weights must be >= 0"),
    # the range checks below had no test: each mutated away, every test still passed
    (["--method", "weighted", "--weights", "0", "0"], "--weights must have a positive sum"),
    # as given (no shares of the sum) all 0 wrote a model of zeros, exit 0
    (["--method", "weighted", "--no-normalize", "--weights", "0", "0"],
     "--weights must have a positive sum (all 0 takes nothing from any model: with --no-normalize every merged "
     "tensor would be 0)"),
    (["--method", "weighted", "--weights", "1"], "--weights: give one weight per model (2)"),
    (["--method", "ties", "--density", "0"], "--density must be in (0, 1]"),
    (["--method", "ties", "--density", "1.5"], "--density must be in (0, 1]"),
    (["--method", "shift", "--alpha0", "1.5"], "--alpha0 must be in [0, 1]"),
    (["--method", "shift", "--alpha0", "-0.1"], "--alpha0 must be in [0, 1]"),
    (["--method", "task_arithmetic", "--lambda", "nan"], "--lambda must be a finite number"),
    (["--method", "shift", "--temperature", "inf"], "--temperature must be a finite number"),
    (["--method", "average", "--shard-size", "0"], "--shard-size must be at least 1 byte"),
    (["--method", "average", "--shard-size", "."], "bad size '.'"),  # tracebacks before: no digits, and inf
    (["--method", "average", "--shard-size", "1.2.3MB"], "bad size '1.2.3MB'"),
    (["--method", "average", "--shard-size", "9" * 400], "bad size '999"),
    (["--method", "average", "--shard-size", "5iB"], "bad size '5iB'"),  # a KeyError traceback before: "i" alone
    # a finite number whose bytes are not (1e300 TB): an OverflowError traceback before, exit 1
    (["--method", "average", "--shard-size", "1" + "0" * 300 + "TB"], "bad size '1000"),
    (["--method", "shift", "--temperature", "0"], "--temperature must be > 0"),
    (["--method", "salience", "--salience", "a", "b", "--salience-temperature", "0"],
     "--salience-temperature must be > 0"),
    # an option of another method is refused, never silently ignored
    (["--method", "average", "--rest", "layer"], "--salience / --base-salience / --rest only apply to --method salience"),
    (["--method", "average", "--weights", "1", "1"], "--weights only applies to --method weighted"),
    (["--method", "average", "--shift", "."], "--shift only applies to --method shift or salience"),
    (["--method", "weighted", "--weights", "1", "1", "--alpha0", "0.5"],
     "--alpha0 only applies to --method shift or salience, not weighted"),
])
def test_merge_numbers_must_be_finite_and_in_range(zoo, tmp_path, capsys, args, needle):
    """NaN passes every range comparison and inf turns a softmax into NaN: both are refused by name up front."""
    out = tmp_path / "o"
    code, err = run_cli(merge.main, ["--base", zoo["base"], "--models", zoo["vl"], zoo["q1"], *args, "--out", out],
                        capsys)
    assert_bad(code, err, out, needle)


@pytest.mark.parametrize("method", [m for m, spec in merge.METHODS.items() if spec.needs_base])
def test_a_base_relative_merge_without_its_base_is_refused(method, zoo, tmp_path, capsys):
    out = tmp_path / "o"
    extra = ["--salience", "a", "b"] if method == "salience" else []
    code, err = run_cli(merge.main, ["--models", zoo["vl"], zoo["q1"], "--method", method, *extra, "--out", out],
                        capsys)
    assert_bad(code, err, out, f"--method {method} needs --base")


def resaved(tmp: Path, name: str, first: dict, second: dict) -> tuple[Path, dict, dict]:
    """save_pretrained run twice into one dir, as a training script that saves twice does: the first save's
    weights, then perturbed ones; returns the dir and both state dicts."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(**tiny.text_kwargs()))
    d = tmp / name
    m.save_pretrained(d, **first)
    old = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05)
    m.save_pretrained(d, **second)
    return d, old, {k: v.clone() for k, v in m.state_dict().items()}


def test_single_file_and_index_in_one_dir_is_bad_input_everywhere(zoo, tmp_path, capsys):
    """transformers loads model.safetensors and ignores model.safetensors.index.json; the analyses followed the
    index, so shift and merge measured and merged weights probe.eval never ran (or, with the shards deleted,
    refused a loadable model). Both orders are refused by the analyses and the probe alike, nothing written."""
    from probe.models import resolve_model

    a, _, _ = resaved(tmp_path, "single_then_sharded", {}, {"max_shard_size": "20KB"})
    b, _, _ = resaved(tmp_path, "sharded_then_single", {"max_shard_size": "20KB"}, {})
    for d in (a, b):
        assert (d / "model.safetensors").is_file() and (d / "model.safetensors.index.json").is_file()
        needles = (str(d), "model.safetensors and model.safetensors.index.json",
                   "transformers would load model.safetensors", "delete the stale one")
        out = tmp_path / "o"
        for main, argv in ((shift.main, ["--base", zoo["base"], "--models", d, "--no-figures"]),
                           (merge.main, ["--base", zoo["base"], "--models", d, zoo["q1"], "--method", "shift"]),
                           (merge.main, ["--models", zoo["base"], zoo["q1"], "--method", "average",
                                         "--carrier", d])):
            code, err = run_cli(main, [*argv, "--out", out], capsys)
            assert_bad(code, err, out, *needles)
        with pytest.raises(BadInput) as exc:  # what probe.eval / probe.heads / analyses.finetune resolve with
            resolve_model(str(d))
        assert all(n in str(exc.value) for n in needles) and "\n" not in str(exc.value)


def test_weights_entry_is_what_transformers_loads(tiny_dirs, tmp_path):
    """The rule leaves every ordinary layout alone: shipped organisms, tiny builds, a sharded dir, a .bin dir, and
    a Hugging Face cache snapshot (files are symlinks into blobs/)."""
    from probe.models import model_path, weights_entry

    for alias in ("organism-base", "organism-vl", "organism-ov-si", "organism-video"):
        assert weights_entry(model_path(alias)) == model_path(alias) / "model.safetensors"
    for d in tiny_dirs.values():
        assert weights_entry(d).name == "model.safetensors"
    single, old, new = resaved(tmp_path, "one", {}, {})  # the same layout twice: transformers replaces the file
    assert weights_entry(single).name == "model.safetensors"
    with open_checkpoint(str(single)) as ck:
        assert torch.equal(ck.view(ck.lm_info("norm.weight")), new["model.norm.weight"])
    sharded, _, _ = resaved(tmp_path, "two", {"max_shard_size": "20KB"}, {"max_shard_size": "20KB"})
    assert weights_entry(sharded).name == "model.safetensors.index.json"
    snap = tmp_path / "hub" / "snapshots" / "abc123"
    blobs = tmp_path / "hub" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in sharded.iterdir():
        (blobs / f"sha-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f"sha-{f.name}")
    assert weights_entry(snap).name == "model.safetensors.index.json"
    with open_checkpoint(str(snap)) as ck, open_checkpoint(str(sharded)) as ref:
        assert ck.lm == ref.lm
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(new, binary / "pytorch_model.bin")
    assert weights_entry(binary).name == "pytorch_model.bin"
    (tmp_path / "empty").mkdir()
    assert weights_entry(tmp_path / "empty") is None


def test_stale_rotary_buffers_of_old_checkpoints_are_not_lm_weights(zoo, tmp_path, capsys):
    """Llama-2-era checkpoints (lmsys/vicuna-7b-v1.5, the llama family's example) store a buffer
    ``model.layers.{i}.self_attn.rotary_emb.inv_freq`` per layer, which transformers ignores on load (it recomputes
    it). The analyses read it as an LM weight: shift of such a base against an expert without it (any checkpoint
    saved since) exited 2 ('LM tensor sets differ'), and with it on both sides it was a row of Δ 0 in every layer,
    diluting the mean Δavg. Now it is a non-LM tensor: the results equal those of the same base without it."""
    from transformers import AutoModelForCausalLM

    old = shutil.copytree(zoo["base"], tmp_path / "old")
    sd = load_file(old / "model.safetensors")
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    sd.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv.clone() for i in range(2)})
    save_file(sd, old / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(old).state_dict()  # the oracle: transformers' own reading
    assert not any(k.endswith("rotary_emb.inv_freq") and ".layers." in k for k in loaded)
    twin = shutil.copytree(old, tmp_path / "twin")
    rows = {}
    for name, base, models in (("clean", zoo["base"], [zoo["vl"], zoo["q1"]]), ("old", old, [zoo["vl"], twin])):
        code, err = run_cli(shift.main, ["--base", base, "--models", *models, "--out", tmp_path / f"s-{name}",
                                         "--no-figures"], capsys)
        assert code == 0, err
        rows[name] = (tmp_path / f"s-{name}" / "shift.csv").read_text().splitlines()
    vl = [r for r in rows["old"] if r.startswith(str(zoo["vl"]))]
    assert vl == [r for r in rows["clean"] if r.startswith(str(zoo["vl"]))]  # as if the buffers were not there
    assert not any("inv_freq" in r for r in rows["old"])  # nor a row of Δ 0 for the twin
    assert cli_main(trajectory.main, [str(a) for a in ["--base", old, "--experts", zoo["vl"], "--no-figures",
                                                       "--out", tmp_path / "t"]]) == 0
    assert cli_main(merge.main, [str(a) for a in ["--base", old, "--models", zoo["vl"], zoo["q1"],
                                                  "--out", tmp_path / "m"]]) == 0


def _set_header(f: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header (any length, padded to 8 bytes), its data section untouched."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


@pytest.mark.parametrize("damage, needle", [
    ("shorter than 8 bytes", "corrupt safetensors file (shorter than its header)"),
    ("offsets not numbers", "corrupt safetensors entry 'model.norm.weight'"),
    ("no weight file", "no weight files (*.safetensors)"),
    ("index not JSON", "model.safetensors.index.json: corrupt index (no weight_map)"),
    ("no embedding", "no LM tensors found under layout qwen2"),
])
def test_each_damaged_checkpoint_is_one_line_naming_it(zoo, tmp_path, capsys, damage, needle):
    """Damage the checks of analyses.checkpoints name, each in one checkpoint given to shift, merge and trajectory:
    exit 2, one line naming the file or the dir, nothing written, the inputs as they were."""
    src = zoo["ov"] if damage == "index not JSON" else zoo["q1"]
    d = corrupt_copy(src, tmp_path / "damaged")
    f = d / "model.safetensors"
    if damage == "shorter than 8 bytes":
        f.write_bytes(b"\x01\x02")
    elif damage == "offsets not numbers":
        _set_header(f, lambda h: h["model.norm.weight"].update(data_offsets=["a", "b"]))
    elif damage == "no weight file":
        f.unlink()
    elif damage == "index not JSON":
        (d / "model.safetensors.index.json").write_text("{")
    else:  # the decoder layers without the token embedding they read
        save_file({k: v for k, v in load_file(f).items() if "embed_tokens" not in k}, f)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    out = tmp_path / "o"
    for main, argv in ((shift.main, ["--base", zoo["base"], "--models", d, "--no-figures"]),
                       (merge.main, ["--models", zoo["base"], d, "--method", "average"]),
                       (trajectory.main, ["--base", zoo["base"], "--experts", d, "--no-figures"])):
        code, err = run_cli(main, [*argv, "--out", out], capsys)
        assert_bad(code, err, out, needle, "damaged")
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def tied_config_copy(src: Path, dst: Path, equal: bool = False, text_level: bool = False) -> Path:
    """A copy of ``src`` (its own lm_head in the weights) whose config.json says tie_word_embeddings true (at the top,
    or in text_config alone, which ties a composite model too); with ``equal`` its lm_head is made the embedding."""
    d = shutil.copytree(src, dst)
    cfg = json.loads((d / "config.json").read_text())
    (cfg["text_config"] if text_level else cfg)["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    if equal:
        sd = load_file(d / "model.safetensors")
        head, embed = (next(k for k in sd if k.endswith(n)) for n in ("lm_head.weight", "embed_tokens.weight"))
        sd[head] = sd[embed].clone()
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_a_config_tying_an_lm_head_the_weights_hold_apart_is_refused_everywhere(zoo, tiny_dirs, data_dir, tmp_path,
                                                                                 capsys):
    """config.json ties lm_head to embed_tokens, the weights hold an lm_head of other values: transformers 5.25 runs
    the file's (its warning silenced by the commands), a loader following the config the embedding, and shift,
    merge and trajectory measured and merged the file's with exit 0. Each command refuses it in one line naming the
    checkpoint, nothing written, inputs unchanged; also when only a composite model's text_config ties."""
    from probe import eval as probe_eval
    from probe.models import resolve_model

    plain = tied_config_copy(zoo["q1"], tmp_path / "q1-tied")
    nested = tied_config_copy(zoo["ov"], tmp_path / "ov-tied", text_level=True)
    probe_model = tied_config_copy(tiny_dirs["qwen2"], tmp_path / "tiny-tied")
    before = {p: p.read_bytes() for d in (plain, nested, probe_model) for p in d.rglob("*") if p.is_file()}
    out = tmp_path / "o"
    for d in (plain, nested):
        needles = (str(d), "ties lm_head to embed_tokens", "lm_head.weight) that differs from the embedding")
        for main, argv in ((shift.main, ["--base", zoo["base"], "--models", d, "--no-figures"]),
                           (merge.main, ["--models", zoo["base"], d, "--method", "average"]),
                           (merge.main, ["--models", zoo["base"], zoo["q1"], "--method", "average", "--carrier", d]),
                           (trajectory.main, ["--base", zoo["base"], "--experts", d, "--no-figures"])):
            code, err = run_cli(main, [*argv, "--out", out], capsys)
            assert_bad(code, err, out, *needles)
    with pytest.raises(BadInput, match="ties lm_head to embed_tokens"):  # what probe.heads / probe.eval resolve with
        resolve_model(str(nested))
    code, err = run_cli(probe_eval.main, ["--models", probe_model, "--data", data_dir, "--limit", "2", "--quiet"
                                          , "--out", out], capsys)
    assert_bad(code, err, out, str(probe_model), "ties lm_head to embed_tokens")
    assert {p: p.read_bytes() for d in (plain, nested, probe_model) for p in d.rglob("*") if p.is_file()} == before


def test_a_tied_config_over_a_bin_checkpoint_is_checked_as_over_safetensors(zoo, tmp_path, capsys):
    """The same tie check on a pytorch_model.bin (probe.models.check_loaded_lm reads it with torch.load mmap, the
    analyses through --allow-bin): an lm_head other than the embedding under a tied config is refused in one line by
    resolve_model and by shift, nothing written; the same lm_head stored twice (how save_pretrained writes a tied
    .bin: one storage) is read as the safetensors copy is."""
    from probe.models import resolve_model

    sd = load_file(zoo["q1"] / "model.safetensors")
    head, embed = (next(k for k in sd if k.endswith(n)) for n in ("lm_head.weight", "embed_tokens.weight"))
    assert not torch.equal(sd[head], sd[embed])
    cfg = json.loads((zoo["q1"] / "config.json").read_text()) | {"tie_word_embeddings": True}
    differ, equal = tmp_path / "bin-differ", tmp_path / "bin-equal"
    for d, weights in ((differ, sd), (equal, sd | {head: sd[embed]})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        torch.save(weights, d / "pytorch_model.bin")
    before = {p: p.read_bytes() for d in (differ, equal) for p in d.rglob("*") if p.is_file()}
    with pytest.raises(BadInput, match=f"{differ}: config.json ties lm_head to embed_tokens.*{head}"):
        resolve_model(str(differ))
    out = tmp_path / "o"
    code, err = run_cli(shift.main, ["--base", zoo["base"], "--models", differ, "--no-figures", "--allow-bin",
                                     "--out", out], capsys)
    assert_bad(code, err, out, str(differ), "ties lm_head to embed_tokens", f"{head}) that differs from the embedding")
    resolve_model(str(equal))
    code, err = run_cli(shift.main, ["--base", zoo["base"], "--models", equal, "--no-figures", "--allow-bin",
                                     "--out", out], capsys)
    assert code == 0, err
    assert {p: p.read_bytes() for d in (differ, equal) for p in d.rglob("*") if p.is_file()} == before


def test_a_tied_config_whose_lm_head_equals_the_embedding_still_works(zoo, tmp_path, capsys):
    """The same lm_head stored twice (a .bin checkpoint always holds both) is one model whichever is run: read as
    before, and a merge into it as a carrier unties its config, since the merged head is no longer its embedding
    (else the carrier written would be the refused conflict above)."""
    from probe.models import resolve_model

    d = tied_config_copy(zoo["q1"], tmp_path / "q1-same", equal=True)
    resolve_model(str(d))
    code, err = run_cli(shift.main, ["--base", zoo["base"], "--models", d, "--no-figures", "--out", tmp_path / "s"],
                        capsys)
    assert code == 0, err
    out = tmp_path / "m"
    code, err = run_cli(merge.main, ["--models", zoo["base"], zoo["q1"], "--method", "average", "--carrier", d,
                                     "--quiet", "--out", out], capsys)
    assert code == 0, err
    carrier = out / "carriers" / d.name
    assert json.loads((carrier / "config.json").read_text())["tie_word_embeddings"] is False
    with open_checkpoint(str(carrier)) as ck:
        assert not torch.equal(ck.view(ck.lm_info("lm_head.weight")), ck.view(ck.lm_info("embed_tokens.weight")))
    resolve_model(str(carrier))


TOWER = "visual.blocks.0.attn.proj.bias"  # a 1-D float32 tensor of the vision tower, which a carrier copies as it is


def _dims(h: dict, new) -> None:
    """The tower tensor's shape [n] replaced by ``new(n)`` (each the same element count, so the bytes fit)."""
    (n,) = h[TOWER]["shape"]
    h[TOWER]["shape"] = new(n)


@pytest.mark.parametrize("damage, edit", [
    ("negative dims", lambda h: _dims(h, lambda n: [-1, -n])),
    ("float dims", lambda h: _dims(h, lambda n: [float(n)])),
    ("string dims", lambda h: _dims(h, lambda n: [str(n)])),
    ("bool dims", lambda h: _dims(h, lambda n: [True, n])),
    ("float offsets", lambda h: h[TOWER].update(data_offsets=[float(x) for x in h[TOWER]["data_offsets"]])),
    ("metadata not strings", lambda h: h["__metadata__"].update(format=1)),
])
def test_a_header_the_safetensors_library_refuses_is_corrupt(zoo, tmp_path, capsys, damage, edit):
    """Shapes and offsets that are no non-negative integers, metadata that is no string map: the safetensors library
    (the oracle: transformers' reader) refuses each file; the analyses read the numbers as int() made of them (16.0,
    "16", true as 1) and merged with exit 0, its carrier written with that header (-1 × -16 as it was: a carrier
    transformers cannot load)."""
    from safetensors import SafetensorError, safe_open

    d = corrupt_copy(zoo["vl"], tmp_path / "vl_header")
    f = d / "model.safetensors"
    _set_header(f, edit)
    with pytest.raises(SafetensorError):
        safe_open(str(f), "pt")
    before = f.read_bytes()
    out = tmp_path / "o"
    code, err = run_cli(merge.main, ["--base", zoo["base"], "--models", d, zoo["q1"], "--carrier", d, "--out", out],
                        capsys)
    assert_bad(code, err, out, "corrupt safetensors", "vl_header")
    assert f.read_bytes() == before


def test_unsigned_integer_tensors_are_read_not_called_corrupt(zoo, tmp_path, capsys):
    """U16/U32/U64 are safetensors dtypes (the library reads them): a carrier holding such a buffer beside its
    tower was refused as a "corrupt safetensors entry". Its bytes are copied into the carrier as they are."""
    from safetensors import safe_open

    d = corrupt_copy(zoo["vl"], tmp_path / "vl_u32")
    f = d / "model.safetensors"
    ids = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    save_file({**load_file(f), "visual.ids": ids}, f, metadata={"format": "pt"})
    _set_header(f, lambda h: h["visual.ids"].update(dtype="U32"))
    with safe_open(str(f), "pt") as fh:  # the oracle
        assert fh.get_slice("visual.ids").get_dtype() == "U32"
    out = tmp_path / "m"
    code, err = run_cli(merge.main, ["--base", zoo["base"], "--models", d, zoo["q1"], "--carrier", d, "--out", out],
                        capsys)
    assert code == 0, err
    with safe_open(str(out / "carriers" / "vl_u32" / "model.safetensors"), "pt") as fh:
        assert fh.get_slice("visual.ids").get_dtype() == "U32"
        assert torch.equal(fh.get_tensor("visual.ids").view(torch.int32), ids)


@pytest.mark.parametrize("obj", [[torch.ones(2)], torch.ones(2)])
def test_a_bin_that_is_no_state_dict_is_bad_input(zoo, tmp_path, capsys, obj):
    """A pytorch_model.bin holding a list or a bare tensor (probe.models.bin_shapes: "not a state dict") was an
    AttributeError traceback (exit 1) in every analyses command."""
    d = tmp_path / "binlist"
    d.mkdir()
    (d / "config.json").write_text((zoo["q1"] / "config.json").read_text())
    torch.save(obj, d / "pytorch_model.bin")
    out = tmp_path / "o"
    code, err = run_cli(shift.main, ["--base", zoo["base"], "--models", d, "--out", out, "--no-figures",
                                     "--allow-bin"], capsys)
    assert_bad(code, err, out, "not a state dict", "pytorch_model.bin")


@pytest.mark.parametrize("key", [7, ("model.norm.weight", 1)])
def test_a_bin_with_a_tensor_under_a_key_that_is_no_name_is_bad_input(zoo, tmp_path, capsys, key):
    """A pytorch_model.bin whose state dict holds a tensor under an int (or tuple) key was a TypeError traceback
    (exit 1) in every analyses command (sorting str against int in the shard check) and in the probe's reader: one
    line naming the file and the key, from both, and nothing written."""
    from probe.models import resolve_model

    d = tmp_path / "binint"
    d.mkdir()
    (d / "config.json").write_text((zoo["q1"] / "config.json").read_text())
    weights = load_file(zoo["q1"] / "model.safetensors")
    weights[key] = torch.ones(2)
    torch.save(weights, d / "pytorch_model.bin")
    out = tmp_path / "o"
    code, err = run_cli(shift.main, ["--base", zoo["base"], "--models", d, "--out", out, "--no-figures",
                                     "--allow-bin"], capsys)
    assert_bad(code, err, out, "pytorch_model.bin", "not a string name", repr(key))
    with pytest.raises(BadInput, match="not a string name"):
        resolve_model(str(d))


def test_shift_and_trajectory_run_twice_reordered_or_through_a_link_give_the_same_numbers(zoo, tmp_path, capsys):
    """Two runs into two folders write the same bytes, every file (neither records a time); the models listed in
    another order, one of them through a symbolic link, give the same numbers per model, to the bit, each row
    named as typed. Oracle: the first run."""
    import pandas as pd

    link = tmp_path / "link-vl"
    link.symlink_to(zoo["vl"], target_is_directory=True)
    typed = [zoo["vl"], zoo["ov"], zoo["q1"]]
    variants = {"a": typed, "b": typed, "other": [zoo["q1"], zoo["ov"], link]}
    for name, models in variants.items():
        for main, flag in ((shift.main, "--models"), (trajectory.main, "--experts")):
            code, err = run_cli(main, ["--base", zoo["base"], flag, *models, "--no-figures", "--quiet", "--out",
                                       tmp_path / f"{main.__module__.split('.')[-1]}-{name}"], capsys)
            assert code == 0, err
    for kind in ("shift", "trajectory"):
        a, b = tmp_path / f"{kind}-a", tmp_path / f"{kind}-b"
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files), kind
    where = {str(p): str(Path(p).resolve()) for p in [zoo["base"], *typed, link]}
    for kind, table, col, keys in (("shift", "shift.csv", "model", ["model", "tensor"]),
                                   ("trajectory", "coords.csv", "name", ["name", "feature", "method"])):
        got, want = (pd.read_csv(tmp_path / f"{kind}-{v}" / table) for v in ("other", "a"))
        assert set(got[col]) != set(want[col])  # the link's rows are named as typed
        got[col], want[col] = got[col].map(where), want[col].map(where)
        assert not got[col].isna().any() and not want[col].isna().any()
        in_order = [f.sort_values(keys, ignore_index=True) for f in (got, want)]
        pd.testing.assert_frame_equal(*in_order, check_exact=True)


def test_a_sharded_bin_checkpoint_needs_allow_bin_as_a_single_one_does(zoo, tmp_path, capsys):
    """.bin weights are read only with --allow-bin, sharded (pytorch_model.bin.index.json, as transformers writes
    them) as well as whole: without the index check a sharded .bin was unpickled unasked (a mutant dropping it
    passed every test). With the flag it reads as the same model's safetensors do."""
    sd = load_file(zoo["q1"] / "model.safetensors")
    d = tmp_path / "binshards"
    d.mkdir()
    (d / "config.json").write_text((zoo["q1"] / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    keys = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in halves.items():
        torch.save({k: sd[k] for k in part}, d / name)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}), encoding="utf-8")
    out = tmp_path / "o"
    code, err = run_cli(shift.main, ["--base", zoo["base"], "--models", d, "--out", out, "--no-figures"], capsys)
    assert_bad(code, err, out, "only .bin weights", "--allow-bin")
    with open_checkpoint(str(d), allow_bin=True) as ck, open_checkpoint(str(zoo["q1"])) as want:
        assert ck.lm == want.lm
        for canon in want.lm:
            assert torch.equal(ck.view(ck.lm_info(canon)), want.view(want.lm_info(canon))), canon


def test_an_lm_tensor_under_two_keys_of_one_layout_is_refused(zoo, tmp_path, capsys):
    """model.lm_head.weight and lm_head.weight both read as the canonical lm_head.weight in the plain layout
    (model. is stripped from one, lm_head. kept on the other). Read one over the other, the later key in the
    file (model.lm_head.weight) became the head while transformers loads lm_head.weight and drops the other:
    refused, naming both keys (a mutant keeping the last passed every test)."""
    d = corrupt_copy(zoo["q1"], tmp_path / "two_heads")
    f = d / "model.safetensors"
    sd = load_file(f)
    sd["model.lm_head.weight"] = sd["lm_head.weight"] + 1
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(BadInput, match=r"two tensors map to LM name 'lm_head\.weight' "
                                       r"\(lm_head\.weight, model\.lm_head\.weight\)"):
        open_checkpoint(str(d))


def test_tensors_at_offsets_off_the_8_byte_grid_read_as_the_safetensors_library_reads_them(tmp_path):
    """safetensors packs tensors back to back, so one after an odd count of 4-byte or 2-byte values starts off the
    8-byte grid (a norm of odd width; a fine-tuned head of odd vocabulary). Each view equals the safetensors
    library's own load (a reader rounding offsets to 8 bytes passed every test: the zoo's tensors all have even
    sizes; one without the empty-tensor case raised ValueError on a 0-element tensor)."""
    from analyses.checkpoints import SafetensorsFile

    g = torch.Generator().manual_seed(0)
    want = {"a": torch.randn(3, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
            "c": torch.randn(2, 3, generator=g), "d": torch.arange(7, dtype=torch.int16),
            "e": torch.empty(0, 3)}  # no bytes at all: torch.frombuffer refuses a count of 0
    save_file(want, tmp_path / "odd.safetensors")
    f = SafetensorsFile(tmp_path / "odd.safetensors")
    assert any(info.start % 8 for info in f.tensors.values())  # the case under test occurs
    got = load_file(tmp_path / "odd.safetensors")
    for key, info in f.tensors.items():
        assert torch.equal(f.view(info), got[key]) and torch.equal(got[key], want[key]), key
    f.close()


def test_weight_files_under_no_standard_name_are_read_together(zoo, tmp_path):
    """Without model.safetensors or an index, every *.safetensors file of the directory is the checkpoint (the
    documented rule of _weight_files and check_shard_keys): the LM split over two such files reads as the whole
    model (a reader of the first file alone passed every test)."""
    sd = load_file(zoo["q1"] / "model.safetensors")
    d = tmp_path / "loose"
    d.mkdir()
    (d / "config.json").write_text((zoo["q1"] / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, d / "part-a.safetensors", metadata={"format": "pt"})
    save_file({k: sd[k] for k in keys[1::2]}, d / "part-b.safetensors", metadata={"format": "pt"})
    with open_checkpoint(str(d)) as ck, open_checkpoint(str(zoo["q1"])) as want:
        assert ck.lm == want.lm
        for canon in want.lm:
            assert torch.equal(ck.view(ck.lm_info(canon)), want.view(want.lm_info(canon))), canon
