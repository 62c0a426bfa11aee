"""``shift.csv``, analyses.shift's table, and its one reader: torch-free, so that ``python -m figures shift`` (and
``report``) draw it without loading torch (importing ``analyses.shift`` for its reader did, ~2 s)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from probe.errors import BadInput

if TYPE_CHECKING:
    import pandas as pd

COMMAND = "analyses.shift"  # what its output manifests name
COLUMNS = ["model", "tensor", "layer", "module", "numel", "delta_avg", "delta_max", "rel_l2"]


def read_shift_csv(path: Path) -> "pd.DataFrame":
    """A saved ``shift.csv``, checked row by row: the one reader of it (``analyses.merge --shift`` takes its Δavg
    from it, ``figures.shift`` draws it). Every column is there and parses; a model and a tensor on every row; a
    layer index or none (embeddings, the final norm); a tensor of some size; a Δavg that Eq. 3 can give (finite,
    ≥ 0); each tensor of a model once. Anything else would be a crash, a cell drawn as another layer's, a tensor
    averaged in twice, or a merge α without a word: one BadInput naming the file and the line."""
    import numpy as np

    from figures import read_table

    text = dict.fromkeys(["model", "tensor", "module"], str)
    df = read_table(path, {**text, "layer": float, "numel": int, "delta_avg": float}, source=f"python -m {COMMAND}",
                    bounds={"delta_avg": (0.0, math.inf)},  # a mean |Δ|
                    keep_default_na=False, na_values=[""], dtype=text)  # a model named "1" or "NA" stays itself
    for bad, why in ((df["model"].isna(), "empty model"), (df["tensor"].isna(), "empty tensor"),
                     (df["layer"].notna() & ((df["layer"] % 1 != 0) | (df["layer"] < 0)),
                      "layer must be a whole number ≥ 0 or empty"),
                     (df["numel"] <= 0, "numel must be a whole number > 0"),
                     (~np.isfinite(df["delta_avg"]), "delta_avg must be a finite number"),
                     (df.duplicated(["model", "tensor"]) | df.duplicated(["model", "layer", "module"]),
                      "repeats a tensor of its model")):
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise BadInput(f"{path}: line {i + 2}: {why} (model {df['model'].iloc[i]}, tensor {df['tensor'].iloc[i]})")
    return df
