"""Organism aliases work in the analyses commands, and the numbers match a direct computation."""
from __future__ import annotations

import json

import pandas as pd
import torch
from safetensors.torch import load_file

from probe.models import model_path


def test_shift_and_merge_on_organism_aliases(tmp_path):
    from analyses import merge, shift

    assert shift.main(["--base", "organism-base", "--models", "organism-vl", "organism-video",
                       "--out", str(tmp_path / "shift"), "--no-figures"]) == 0
    table = pd.read_csv(tmp_path / "shift" / "shift.csv")
    base = load_file(model_path("organism-base") / "model.safetensors")
    vl = load_file(model_path("organism-vl") / "model.safetensors")  # Qwen2-VL keeps model.layers.* on disk
    row = table[(table["model"] == "organism-vl") & (table["tensor"] == "layers.1.self_attn.o_proj.weight")]
    key = "model.layers.1.self_attn.o_proj.weight"
    direct = (base[key].float() - vl[key].float()).abs().mean().item()
    assert abs(float(row["delta_avg"].iloc[0]) - direct) <= 1e-6 * max(1.0, direct) and direct > 0
    summary = json.loads((tmp_path / "shift" / "summary.json").read_text())
    assert "organism-vl" in json.dumps(summary)

    out = tmp_path / "avg"
    assert merge.main(["--models", "organism-base", "organism-vl", "--method", "average", "--out", str(out)]) == 0
    merged = load_file(out / "model.safetensors")
    expect = ((base[key].float() + vl[key].float()) / 2).to(base[key].dtype)
    assert torch.equal(merged[key], expect)
    # the organisms' build records stay theirs: a merge (and its carriers) is another model
    assert (model_path("organism-vl") / "organism.json").is_file() and (out / "config.json").is_file()
    assert not list(out.rglob("organism.json"))
