"""Merge the LLMs of modality-extended models (sections 5.1, 5.3; DESIGN §5) and transplant the result.

    python -m analyses.merge --base qwen2 --models qwen2-vl llava-video llava-ov-si --method shift \\
        --carrier qwen2-vl llava-ov-si --out runs/merged

Methods: ``average`` (Eq. 1), ``weighted`` (Eq. 2, ``--weights``), ``shift`` (Eq. 4: α_i = softmax(Δavg_i/τ)
per tensor, θ = α0 θ_0 + (1 − α0) Σ α_i θ_i; defaults as released α0 = 0.5, τ = 1e-3), ``salience`` (DESIGN §9:
head-owned slices of q/k/v/o weighted by the participants' head salience from ``probe.heads`` runs, the rest by
Eq. 4 or by layer salience), and the baselines ``task_arithmetic`` (θ_0 + λ Σ (θ_i − θ_0)) and ``ties`` (trim,
elect sign, disjoint mean), as mergekit defines them but on LMs taken out of any carrier. Only LM tensors are
merged, streamed chunk by chunk in fp32 and written in the input dtype (or ``--dtype``). ``DIR`` is a causal-LM
dir that ``AutoModelForCausalLM`` loads, with ``merge_weights.csv`` (every tensor's or head slice's weight per model;
ties: each expert's trim threshold) and ``merge.json``;
``DIR/carriers/<name>/`` is each carrier with its LM replaced and every other tensor copied bit-exact.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from analyses.align import Alignment, TensorPlan, align, check_delta_finite, check_finite, paired_chunks
from analyses.checkpoints import (Checkpoint, add_output_args, check_each_once, check_inputs_and_out, check_out_outside,
                                  checkpoint_fingerprint, chunks, open_checkpoint, progress, quiet_progress,
                                  reserve_descriptors)
from analyses.formulas import (FORMULAS, ShiftStats, average_coefficients, shift_coefficients,
                                task_arithmetic_coefficients, ties_combine, TrimSearch, weighted_coefficients)
from analyses.merge_methods import COMMAND, METHOD_KINDS, WEIGHTS_HEADER, MethodKind, carrier_name, run_fingerprint
from analyses.salience import METRICS as SALIENCE_METRICS
from analyses.salience import SalienceWeights, check_run_model, read_salience
from analyses.shift import CHUNK
from analyses.shift_csv import read_shift_csv
from analyses.writer import (SHARD_BYTES, Entry, ShardedWriter, atomic_dir, check_output, check_replaceable,
                             copy_side_files, parse_size, returns_finished, run_request)
from probe.errors import (TENSOR_MEMORY_HINT, ArgParser, BadInput, check_counts, cli_main, in_path, out_dir,
                          parse_options, says_out_of_memory)
from probe.families import CAUSAL_LM, LAYOUTS, causal_lm_type, check_lm_fits_class
from probe.families import lm_disk_key as layout_key
from probe.lm_config import class_text_values, untie_word_embeddings
from probe.models import loads_tied
from probe.results import json_object, json_text, results_line


def eq1_coefficients(cfg: MergeConfig) -> list[float]:
    """Eq. 1 (``analyses.formulas.average_coefficients``): 1/n for each --models entry."""
    return average_coefficients(len(cfg.models))


def eq2_coefficients(cfg: MergeConfig) -> list[float]:
    """Eq. 2 (``analyses.formulas.weighted_coefficients``): the --weights, normalised unless --no-normalize."""
    return weighted_coefficients(cfg.weights or [], cfg.normalize)


def task_arithmetic_of(cfg: MergeConfig) -> list[float]:
    """Task arithmetic, θ_0 + λ Σ (θ_i − θ_0) (``analyses.formulas.task_arithmetic_coefficients``):
    [1 − λn, λ, …, λ] of [θ_0, θ_1, …, θ_n]."""
    return task_arithmetic_coefficients(len(cfg.models), cfg.lam)


@dataclass(frozen=True)
class Method(MethodKind):
    """A ``--method``: its data (analyses.merge_methods, torch-free for figures) and its coefficients."""

    # the same coefficients for every tensor: cfg → one per --models entry (a base gets 0), or one per
    # [base, *models]; None: chosen per tensor (Eq. 4 from each tensor's Δavg, salience's slices and layers) or
    # by a kernel of its own (ties)
    fixed: Callable[[MergeConfig], list[float]] | None = None


FIXED_COEFFICIENTS = {"average": eq1_coefficients, "weighted": eq2_coefficients, "task_arithmetic": task_arithmetic_of}
METHODS = {name: Method(**asdict(kind), fixed=FIXED_COEFFICIENTS.get(name)) for name, kind in METHOD_KINDS.items()}
TOKENIZER_FILES = ("tokenizer", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template", "generation_config.json")
RAW_CHUNK = 64 << 20  # bytes per bit-exact copy step
FLOAT32_MAX = torch.finfo(torch.float32).max
MERGE_CHUNK = 1 << 18  # elements per combine step: the 1 MB fp32 accumulator and cast buffer stay in L2 cache


# what --dtype may ask the merged LM to be written in (the math is fp32 whatever it is)
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeConfig:
    models: list[str]
    method: str
    out: Path
    base: str | None = None
    weights: list[float] | None = None
    normalize: bool = True
    alpha0: float = 0.5
    temperature: float = 1e-3
    carriers: list[str] = field(default_factory=list)
    shift_dir: Path | None = None
    shard_size: int = SHARD_BYTES
    overwrite: bool = False
    allow_bin: bool = False
    lam: float = 1.0  # task_arithmetic / ties scale λ
    density: float = 0.2  # ties: share of each task vector kept
    salience: list[Path] = field(default_factory=list)  # one probe.heads run per --models entry
    base_salience: Path | None = None
    salience_metric: str = "kl"
    salience_temperature: float = 1.0
    rest: str = "shift"  # salience: non-head tensors by Eq. 4 ("shift") or by layer salience ("layer")
    threads: int = 1  # torch threads of the elementwise combine (the same bits with any count)
    dtype: str | None = None  # the merged LM's dtype when asked (DESIGN §5); None: each tensor's input dtype

    def __post_init__(self) -> None:  # from Python, paths as str too, ~ expanded as the CLI's are
        self.out = out_dir(self.out)
        self.shift_dir = None if self.shift_dir is None else in_path(self.shift_dir)
        self.salience = [in_path(r) for r in self.salience]
        self.base_salience = None if self.base_salience is None else in_path(self.base_salience)

    def validate(self) -> None:
        numbers = {"--alpha0": self.alpha0, "--temperature": self.temperature, "--lambda": self.lam,
                   "--density": self.density, "--salience-temperature": self.salience_temperature,
                   **{f"--weights[{i}]": w for i, w in enumerate(self.weights or [])}}
        for flag, v in numbers.items():  # NaN passes every range check below; inf makes a softmax NaN
            if not math.isfinite(v):
                raise BadInput(f"{flag} must be a finite number, got {v}")
        if any(w < 0 for w in self.weights or []):
            raise BadInput("--weights must be >= 0 (Eq. 2 mixes the models; for task negation use task_arithmetic "
                           "with a negative --lambda)")
        if self.shard_size < 1:
            raise BadInput(f"--shard-size must be at least 1 byte, got {self.shard_size}")
        check_counts(self, ("threads",))  # ≥ 1, and no more than the machine can start (check_threads)
        if self.dtype is not None and self.dtype not in OUT_DTYPES:
            raise BadInput(f"--dtype must be one of {', '.join(OUT_DTYPES)}, got {self.dtype!r}")
        if self.method not in METHODS:
            raise BadInput(f"--method must be one of {', '.join(METHODS)}")
        if not self.models:
            raise BadInput("--models: give at least one model")
        if METHODS[self.method].needs_base and self.base is None:
            raise BadInput(f"--method {self.method} needs --base")
        if self.method == "salience":
            if len(self.salience) != len(self.models):
                raise BadInput(f"--salience: give one probe.heads run per --models entry ({len(self.models)})")
            if self.salience_metric not in SALIENCE_METRICS:
                raise BadInput(f"--salience-metric must be one of {', '.join(SALIENCE_METRICS)}")
            if not self.salience_temperature > 0:
                raise BadInput("--salience-temperature must be > 0")
            if self.rest not in ("shift", "layer"):
                raise BadInput("--rest must be shift or layer")
        elif self.salience or self.base_salience or self.rest != "shift":
            raise BadInput("--salience / --base-salience / --rest only apply to --method salience")
        if reads("density", self.method) and not 0.0 < self.density <= 1.0:
            raise BadInput("--density must be in (0, 1]")
        if self.method == "weighted":
            if not self.weights or len(self.weights) != len(self.models):
                raise BadInput(f"--weights: give one weight per model ({len(self.models)})")
            if sum(self.weights) <= 0:  # all 0 (none is negative): 0/0 shares, or with --no-normalize a model of 0s
                raise BadInput("--weights must have a positive sum (all 0 takes nothing from any model"
                               + (": with --no-normalize every merged tensor would be 0)" if not self.normalize
                                  else ")"))
        elif self.weights:
            raise BadInput("--weights only applies to --method weighted")
        self.check_float32_range()
        if not 0.0 <= self.alpha0 <= 1.0:
            raise BadInput("--alpha0 must be in [0, 1]")
        if not self.temperature > 0:
            raise BadInput("--temperature must be > 0")
        if self.shift_dir is not None and not METHODS[self.method].reads_shift:
            shifted = " or ".join(m for m, f in METHODS.items() if f.reads_shift)
            raise BadInput(f"--shift only applies to --method {shifted}")
        if self.shift_dir is not None and not (self.shift_dir / "shift.csv").is_file():
            raise BadInput(f"--shift {self.shift_dir}: no shift.csv there (run python -m analyses.shift)")
        # before check_output: a merge already written inside them would read as one of other inputs
        check_out_outside(self.out, [*([("--shift", self.shift_dir)] if self.shift_dir else []),
                                     *(("--salience", r) for r in self.salience),
                                     *([("--base-salience", self.base_salience)] if self.base_salience else [])])
        # a merge written before 2026-12-07 fingerprinted its --shift table's figures too
        check_output(self.out, self.overwrite, COMMAND, lambda: merge_request(self),
                     lambda: merge_request(self, dir_figures=True))

    def check_float32_range(self) -> None:
        """The merge multiplies fp32 tensors by its coefficients: one past the float32 range is bad input."""
        if self.method == "weighted":
            flag, value = "--weights", max(self.weights or [0.0])
            coeffs = eq2_coefficients(self)
        elif reads("lam", self.method):  # ties scales its merged task vector by λ as task arithmetic does
            flag, value = "--lambda", self.lam
            coeffs = [self.lam, *task_arithmetic_of(self)]
        else:
            return
        if any(abs(c) > FLOAT32_MAX for c in coeffs):
            raise BadInput(f"{flag} {value:g}: beyond the float32 range (±{FLOAT32_MAX:.3g}) the merge computes in")


def lm_disk_key(canon: str) -> str:
    """Canonical LM name -> causal-LM checkpoint key (every class in families.CAUSAL_LM names them alike)."""
    return layout_key(LAYOUTS["qwen2"], canon)


class ShiftTable:
    """Δavg per (model, tensor) from a saved ``analyses.shift`` run. Each participant is matched by its resolved
    path and the fingerprint of its files (summary.json), never by the name given on the command line: ``m1`` run
    from another directory, or a model retrained in place, is a different model whose Δavg would swap the α."""

    def __init__(self, shift_dir: Path, base: Checkpoint, models: Sequence[Checkpoint]):
        rows = read_shift_csv(shift_dir / "shift.csv")
        table = dict(zip(zip(rows["model"], rows["tensor"]), rows["delta_avg"].tolist()))
        summary = json_object(shift_dir / "summary.json") or {}  # missing or unreadable: lacks the keys below
        try:
            sbase, entries = summary["base"], summary["models"]
            for e in [sbase, *entries]:
                e["name"], e["resolved_path"], e["fingerprint"]  # noqa: B018
        except (KeyError, TypeError):
            raise BadInput(f"--shift {shift_dir}: summary.json is missing or lacks the models' paths and "
                           "fingerprints (an older analyses.shift); rerun python -m analyses.shift") from None
        self.check(shift_dir, sbase, base, "base")
        self.table = table
        # a pair of tied heads has no lm_head row (analyses.shift): its Δ is the embedding's
        self.tied_pair = [base.tied and m.tied for m in models]
        self.names = []
        have = {m for m, _ in table}
        for m in models:
            e = next((e for e in entries if Path(e["resolved_path"]) == m.path.resolve()), None)
            if e is None:
                raise BadInput(f"--shift {shift_dir}: no shift of model {m.name} ({m.path.resolve()}); it holds "
                               f"{', '.join(e['resolved_path'] for e in entries)}")
            self.check(shift_dir, e, m, "model")
            if e["name"] not in have:
                raise BadInput(f"--shift {shift_dir}: no rows for model {m.name} in shift.csv")
            self.names.append(e["name"])

    @staticmethod
    def check(shift_dir: Path, entry: dict[str, Any], ck: Checkpoint, role: str) -> None:
        if Path(entry["resolved_path"]) != ck.path.resolve():
            raise BadInput(f"--shift {shift_dir}: computed against {role} {entry['resolved_path']}, "
                           f"not {ck.path.resolve()}")
        if entry["fingerprint"] != checkpoint_fingerprint(ck):
            raise BadInput(f"--shift {shift_dir}: {role} {ck.name} ({ck.path.resolve()}) changed since "
                           "analyses.shift ran (its files differ); rerun python -m analyses.shift")

    def deltas(self, canon: str) -> list[float]:
        try:
            return [self.table[(nm, "embed_tokens.weight" if canon == "lm_head.weight" and tied else canon)]
                    for nm, tied in zip(self.names, self.tied_pair)]
        except KeyError as exc:
            raise BadInput(f"--shift: no delta_avg for {exc.args[0]}") from None


@dataclass(frozen=True)
class WeightRow:
    """One row of merge_weights.csv (``analyses.merge_methods.WEIGHTS_HEADER``): each column means one thing, and is
    empty where a method has no such number."""

    tensor: str
    slice: str  # "all", "rows a:b" or "columns a:b"
    model: str
    weight: float | None  # w_i of θ_slice = Σ_i w_i θ_i,slice; None for ties (no per-model coefficient)
    delta_avg: float | None = None  # the Eq. 4 Δavg the weight came from
    trim_threshold: float | None = None  # ties: the k-th largest |θ_i − θ_0| of the tensor, kept by the trim


def row_blocks(rows: int, cols: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) blocks of at most ``size`` elements in row-major order, so the blocks written one after the
    other are the tensor: whole rows while one fits, else one row in column blocks (a row past ``size`` columns,
    262,144 by default, overran the fixed-size buffers)."""
    rows_per, cols_per = max(1, size // cols), min(cols, size)
    for r0 in range(0, rows, rows_per):
        for c0 in range(0, cols, cols_per):
            yield r0, min(rows, r0 + rows_per), c0, min(cols, c0 + cols_per)


@dataclass
class Merger:
    """Streams one merge; ``inputs[0]`` is the reference (base, else the first model)."""

    cfg: MergeConfig
    inputs: list[Checkpoint]
    names: list[str]
    al: Alignment
    has_base: bool
    shift_table: ShiftTable | None = None
    salience: SalienceWeights | None = None
    weight_rows: list[WeightRow] = field(default_factory=list)
    _acc: torch.Tensor = field(default_factory=lambda: torch.empty(MERGE_CHUNK, dtype=torch.float32))
    _tmp: torch.Tensor = field(default_factory=lambda: torch.empty(MERGE_CHUNK, dtype=torch.float32))
    order: list[int] = field(init=False)

    def __post_init__(self) -> None:
        # The fp32 sums run over the inputs in one order, that of their resolved directories, not the order they
        # were typed in: a merge is of a set of models, and --models reordered moved the last bit of a weighted,
        # shift or salience merge (1 bf16 ulp in 27 of the 51 tensors of the organisms' shift merge).
        self.order = sorted(range(len(self.inputs)), key=lambda i: str(Path(self.inputs[i].path).resolve()))

    def coefficients(self, plan: TensorPlan, views: Sequence[torch.Tensor]) -> tuple[list[float], list[float] | None]:
        """Each input's coefficient for this tensor (METHODS[method].fixed, salience's layer rule, else Eq. 4), and
        the Δavg they came from (None when none did)."""
        fixed = METHODS[self.cfg.method].fixed
        if fixed is not None:
            coeffs = fixed(self.cfg)  # a base that is no participant (Eq. 1, 2) only supplies vocabulary rows: 0
            return [0.0] * (len(self.inputs) - len(coeffs)) + coeffs, None
        if self.salience is not None and self.cfg.rest == "layer":
            layer = self.salience.layer_coefficients(plan.canon)
            if layer is not None:
                return layer, None
        deltas = self.shift_table.deltas(plan.canon) if self.shift_table is not None else self.eq3_deltas(plan, views)
        return shift_coefficients(deltas, self.cfg.alpha0, self.cfg.temperature), deltas  # Eq. 4

    def eq3_deltas(self, plan: TensorPlan, views: Sequence[torch.Tensor]) -> list[float]:
        """Eq. 3 on the fly, as analyses.shift computes it: one extra pass, Σ|Δ| over the rows both have."""
        sums = [0.0] * len(self.cfg.models)
        for j, b, v in paired_chunks(plan, views, CHUNK):
            sums[j - 1] += ShiftStats.abs_sum(b, v)
        for total, v, nm, info in zip(sums, views[1:], self.names[1:], plan.infos[1:]):
            if not math.isfinite(total):
                check_delta_finite(views[0], self.names[0], plan.infos[0].key, v, nm, info.key)
        return [total / max(plan.common_with(j), 1) for j, total in enumerate(sums, start=1)]

    def merge_tensor(self, plan: TensorPlan, sink: Any) -> None:
        views = [ck.view(info).reshape(-1) for ck, info in zip(self.inputs, plan.infos)]
        sliced = self.salience.slice_coefficients(plan.canon, plan.ref.shape) if self.salience else None
        if sliced is not None:
            self.merge_slices(plan, views, *sliced, sink)
        elif self.cfg.method == "ties":
            self.merge_ties(plan, views, sink)
        else:
            self.merge_linear(plan, views, sink)
        del views
        for ck, info in zip(self.inputs, plan.infos):
            ck.release(info)

    def merge_linear(self, plan: TensorPlan, views: list[torch.Tensor], sink: Any) -> None:
        coeffs, deltas = self.coefficients(plan, views)
        for j, (nm, c) in enumerate(zip(self.names, coeffs)):
            if j == 0 and self.has_base and not METHODS[self.cfg.method].base_row:
                continue  # the base only supplies vocabulary rows here
            d = deltas[j - 1] if deltas is not None and j > 0 else None
            self.weight_rows.append(WeightRow(plan.canon, "all", nm, c, delta_avg=d))
        terms = [(views[i], coeffs[i]) for i in self.order if coeffs[i] != 0.0]
        with torch_threads(self.cfg.threads):
            for lo, hi in chunks(plan.common, MERGE_CHUNK):
                out = sink.buffer(hi - lo)
                acc = self.combine(terms, lo, hi, out)
                if not finite_output(acc, out):  # NaN/Inf in an input or an overflow: one pass, in cache
                    self.raise_nonfinite(plan, views, lo, hi, out.dtype)
                sink.write(out)
        self.copy_tail(plan, views[0], sink)
        del terms

    def merge_slices(self, plan: TensorPlan, views: list[torch.Tensor], axis: int, weights: torch.Tensor,
                     sink: Any) -> None:
        """Salience-weighted head slices (DESIGN §9): θ = Σ_i w_i ⊙ θ_i with w_i constant on each head's rows
        (q, and k/v per KV group) or columns (o). Streamed in blocks of whole rows through the same reused fp32
        buffers as ``combine``, inputs in ``order`` (bit-stable, whatever order they were typed in)."""
        shape = plan.ref.shape
        self.weight_rows.extend(WeightRow(t, sl, m, w)
                                for t, sl, m, w in self.salience.slice_rows(plan.canon, self.names))
        cols = shape[1] if len(shape) == 2 else 1
        w = weights.float()
        with torch_threads(self.cfg.threads):
            for r0, r1, c0, c1 in row_blocks(shape[0], cols, MERGE_CHUNK):
                n = (r1 - r0) * (c1 - c0)
                acc, tmp = self._acc[:n].view(r1 - r0, c1 - c0), self._tmp[:n].view(r1 - r0, c1 - c0)
                for n_done, i in enumerate(self.order):
                    tmp.copy_(views[i][r0 * cols:r1 * cols].view(r1 - r0, cols)[:, c0:c1])
                    wi = w[i, r0:r1, None] if axis == 0 else w[i][None, c0:c1]
                    if n_done == 0:
                        torch.mul(tmp, wi, out=acc)
                    else:
                        acc.addcmul_(tmp, wi)
                flat = acc.reshape(-1)
                out = sink.buffer(n)
                out.copy_(flat)
                if not finite_output(flat, out):
                    self.raise_nonfinite(plan, views, r0 * cols + c0, (r1 - 1) * cols + c1, out.dtype)
                sink.write(out)

    def merge_ties(self, plan: TensorPlan, views: list[torch.Tensor], sink: Any) -> None:
        """TIES, streamed: two passes over the common rows find every expert's trim (k-th largest |δ|, and how
        many entries tied with it to keep; ``analyses.formulas.TrimSearch``), then chunk by chunk trim, elect sign,
        disjoint mean (``analyses.formulas.ties_combine``). Memory stays a few chunks whatever the tensor's size."""
        base, experts = views[0], views[1:]
        searches = [TrimSearch(plan.common, self.cfg.density) for _ in experts]

        def count_pass() -> None:
            for lo, hi in chunks(plan.common, MERGE_CHUNK):
                b = base[lo:hi].float()
                for s, v in zip(searches, experts):
                    s.count(v[lo:hi].float() - b)

        with torch_threads(self.cfg.threads):
            count_pass()
            for s in searches:
                s.end_pass()
            count_pass()
            trims = [s.trim() for s in searches]
            for nm, tr in zip(self.names[1:], trims):
                self.weight_rows.append(WeightRow(plan.canon, "all", nm, None, trim_threshold=tr.threshold))
            order = [i - 1 for i in self.order if i > 0]  # the experts in the order of the fp32 sums
            for lo, hi in chunks(plan.common, MERGE_CHUNK):
                b = base[lo:hi].float()
                merged = ties_combine(b, [experts[j][lo:hi].float() - b for j in order], [trims[j] for j in order],
                                      self.cfg.lam)
                out = sink.buffer(hi - lo)
                out.copy_(merged)
                if not finite_output(merged, out):
                    self.raise_nonfinite(plan, views, lo, hi, out.dtype)
                sink.write(out)
        self.copy_tail(plan, base, sink)

    def copy_tail(self, plan: TensorPlan, ref: torch.Tensor, sink: Any) -> None:
        """The vocabulary rows only the reference has, copied as they are (DESIGN §5), refused with NaN/Inf like
        the merged rows (every method: TIES wrote a base's NaN there with exit 0)."""
        for lo, hi in chunks(plan.ref.numel - plan.common, MERGE_CHUNK):
            tail = ref[plan.common + lo:plan.common + hi]
            check_finite(tail, self.names[0], plan.ref.key)
            out = sink.buffer(hi - lo)
            out.copy_(tail)
            sink.write(out)

    def combine(self, terms: Sequence[tuple[torch.Tensor, float]], lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """out = Σ c·x[lo:hi], accumulated in fp32 (elementwise: any chunk size gives the same bits); returns the
        fp32 accumulator."""
        acc, tmp = self._acc[:hi - lo], self._tmp[:hi - lo]
        if not terms:
            acc.zero_()
        for i, (v, c) in enumerate(terms):
            x = v[lo:hi]
            if x.dtype != torch.float32:
                tmp.copy_(x)  # vectorised cast into a reused buffer: no page faults, no bf16 math
                x = tmp
            if i == 0:
                torch.mul(x, c, out=acc)
            else:
                acc.add_(x, alpha=c)
        out.copy_(acc)
        return acc

    def raise_nonfinite(self, plan: TensorPlan, views: Sequence[torch.Tensor], lo: int, hi: int,
                        dtype: torch.dtype) -> None:
        """Name the input tensor with NaN/Inf, else report the merged tensor as overflowing."""
        for v, nm, info in zip(views, self.names, plan.infos):
            check_finite(v[lo:hi], nm, info.key)
        raise BadInput(f"merged tensor {plan.canon} overflows {str(dtype).removeprefix('torch.')} (the output keeps "
                       f"{self.names[0]}'s dtype)")


def narrow(dtype: torch.dtype) -> bool:
    """An output dtype whose range ends well inside float32's (float16: 65504), so a finite fp32 result can cast
    to inf (bf16 shares float32's exponent: not narrow)."""
    return dtype.is_floating_point and torch.finfo(dtype).max < 1e38


def finite_output(acc: torch.Tensor, out: torch.Tensor) -> bool:
    """No NaN/Inf in the fp32 result ``acc``, nor in ``out``, its cast to the output dtype (checked only where
    that can overflow: the extra pass would slow every bf16 merge)."""
    return bool(torch.isfinite(acc.sum())) and (not narrow(out.dtype)
                                                 or bool(torch.isfinite(out.sum(dtype=torch.float32))))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch kernels on ``n`` threads (``--threads``, default 1). The combine is one pass per input over
    cache-sized chunks: on a machine shared with other jobs OpenMP's per-kernel barrier waits for a descheduled
    thread and costs more than a second thread gains (the background shard writer runs on the other core); on an
    idle one more threads are faster (README, Merge benchmark)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def merged_config(ref: Checkpoint, dtype: torch.dtype, vocab_rows: int, tied: bool,
                  model_type: str | None = None) -> dict[str, Any]:
    """A causal-LM config from the reference's text config, so ``AutoModelForCausalLM`` loads the merged LM: the
    family table's ``lm_model_type`` (Qwen2 for Qwen2-VL, Qwen2.5-VL and the Omni thinker, Qwen3 for Qwen3-VL, the
    text config's own type for LLaVA, Idefics3, InternVL and Gemma 3).

    Built as a plain dict (importing transformers would cost seconds per merge); only a reference whose text class
    is not the class written (Qwen2-VL's qwen2_vl_text) asks transformers what that class builds for the keys its
    text config leaves out (``class_text_values``). The tests load it with ``AutoModelForCausalLM`` for every family
    and compare its config with the reference's text config.
    """
    tc = {k: v for k, v in ref.text_config.items()
          if k not in ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version",
                       "torch_dtype", "dtype", "text_config", "vision_config", "audio_config")
          and not k.startswith("mm_") and not k.endswith("_token_id") or k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    for key in ("rope_parameters", "rope_scaling"):
        rope = tc.get(key)
        if isinstance(rope, dict) and ("mrope_section" in rope or "mrope" in (rope.get("rope_type"), rope.get("type"))):
            # M-RoPE is a Qwen2-VL input convention; on text alone it equals plain RoPE with the same theta.
            theta = rope.get("rope_theta", tc.get("rope_theta"))
            tc[key] = {"rope_type": "default", "rope_theta": theta} if key == "rope_parameters" else None
            if theta is None:  # left to its class (Qwen2-VL's 1e6, Qwen3-VL's 5e5): class_text_values below
                tc.pop(key)
    # what the reference's text config leaves to its own class, written out where the class the LM is written as
    # builds another value (a Qwen2-VL text config without rope theta, RMS eps, key/value heads: 1e6, 1e-5, 8; the
    # Qwen2 LM written from it built 1e4, 1e-6, 32 and computed other logits, or refused its k/v tensors)
    model_type = model_type or causal_lm_type(ref.family, ref.text_config)  # run_merge passes the one it checked
    try:
        tc.update(class_text_values(tc, ref.text_config.get("model_type"), model_type))
    except BadInput as exc:
        raise BadInput(f"{ref.path}: {exc}") from None
    tc.update(model_type=model_type, architectures=[CAUSAL_LM[model_type]], vocab_size=vocab_rows,
              tie_word_embeddings=tied, dtype=str(dtype).removeprefix("torch."))
    return tc


def write_carrier(carrier: Checkpoint, merged: Checkpoint, dest: Path, shard_size: int,
                  merged_name: str) -> dict[str, Any]:
    """Copy ``carrier`` with its LM tensors replaced by ``merged``'s (vocab rule: merged common rows, then the
    carrier's own rows); every non-LM tensor is copied byte for byte. ``merged_name`` is the merge's final
    name (``merged`` is still read from its temp dir, whose name would make equal merges differ byte-wise)."""
    dest.mkdir(parents=True)
    keys = sorted(carrier.infos, key=lambda k: (str(carrier.infos[k].file), carrier.infos[k].start))
    lm_by_key = {v: c for c, v in carrier.lm.items()}
    src = {k: carrier.infos[k] for k in keys}
    add_head = carrier.tied and not merged.tied  # else the carrier would tie the merged head back to its embedding
    # a carrier whose own lm_head equals its embedding may say tie_word_embeddings true (probe.models.check_tied_head):
    # the merged head differs from the merged embedding, so its config must untie them too
    untie = add_head or (not merged.tied and loads_tied(carrier.config, carrier.family))
    if add_head:
        head = layout_key(carrier.layout, "lm_head.weight")
        keys.append(head)
        lm_by_key[head] = "lm_head.weight"
        src[head] = carrier.lm_info("lm_head.weight")  # its embedding: rows past the merged vocab come from it
    entries = [Entry(k, src[k].dtype, src[k].shape) for k in keys]
    writer = ShardedWriter(dest, entries, shard_size, {"merged_from": merged_name})
    n_lm = 0
    for key in progress(keys, desc=f"carrier {dest.name}", unit="tensor", leave=False):
        info = src[key]
        with writer.tensor(key) as sink:
            canon = lm_by_key.get(key)
            if canon is None:
                f = carrier.file(info)
                raw = f.raw(info)
                for lo in range(0, len(raw), RAW_CHUNK):
                    sink.write(raw[lo:lo + RAW_CHUNK])
                del raw
            else:
                n_lm += 1
                minfo = merged.lm_info(canon)
                m = merged.view(minfo).reshape(-1)
                c = carrier.view(info).reshape(-1)
                rows = min(minfo.shape[0], info.shape[0]) if info.shape else 0
                common = rows * (info.numel // info.shape[0]) if info.shape and info.shape[0] else info.numel
                for lo, hi in chunks(common, CHUNK):
                    part = m[lo:hi].to(info.dtype)
                    # m[lo:hi], not part, is the result: a float16 sum of finite float16 values can itself overflow
                    if narrow(info.dtype) and not narrow(minfo.dtype) and not finite_output(m[lo:hi], part):
                        raise BadInput(f"carrier {dest.name}: the merged {canon} overflows its "
                                       f"{str(info.dtype).removeprefix('torch.')} (the carrier keeps its dtype)")
                    sink.write(part)
                for lo, hi in chunks(info.numel - common, CHUNK):
                    sink.write(c[common + lo:common + hi].clone())
                del m, c
                merged.release(minfo)
        carrier.release(info)
    writer.close()
    copied = copy_side_files(carrier.path, dest)
    if untie:
        config = untie_word_embeddings(carrier.config, carrier.family)
        (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {"name": dest.name, "source": str(carrier.path), "layout": carrier.layout.name,
            "lm_tensors_replaced": n_lm, "tensors_copied_bit_exact": len(keys) - n_lm, "files_copied": copied,
            "lm_head_added": add_head}


def merge_request(cfg: MergeConfig, read: Mapping[Path, str] | None = None, dir_figures: bool = False) -> dict:
    """What a merge output is computed from (``run_request``): its options, and the models, carriers, shift table
    (not its figures, unless ``dir_figures``: as merges before 2026-12-07 recorded it) and salience runs it reads;
    ``read``: a run's fingerprint as ``load_salience`` read it (else it is read here)."""
    runs = [*cfg.salience, *([cfg.base_salience] if cfg.base_salience else [])]
    read = read or {}
    return run_request(cfg, [*([cfg.base] if cfg.base else []), *cfg.models, *cfg.carriers],
                       [cfg.shift_dir] if cfg.shift_dir else [],
                       [(r, read[Path(r)] if Path(r) in read else run_fingerprint(Path(r))) for r in runs],
                       dir_figures)


@returns_finished("merge.json")
def run_merge(cfg: MergeConfig) -> dict[str, Any]:
    """``python -m analyses.merge`` from Python: writes the merged LM (an HF dir), merge_weights.csv, merge.json and
    ``carriers/<name>/`` into ``cfg.out`` and returns merge.json's content (method, parameters, ``mean_weight`` per
    model, ``carriers``); an output already finished with the same inputs is kept and its merge.json returned as
    written (one from before 2026-12-06 holds ``mean_alpha``: ``Merge.read`` reads it as ``mean_weight``).
    ``figures.results.Merge.read(cfg.out)`` reads it back with the weights as a frame; ``merge(**options)`` takes
    the command's options as keywords and returns it so. Bad input raises ``probe.errors.BadInput``."""
    cfg.validate()
    t0 = time.perf_counter()
    with ExitStack() as stack:
        opened = lambda s: stack.enter_context(open_checkpoint(s, cfg.allow_bin))  # noqa: E731
        base = opened(cfg.base) if cfg.base else None
        models = [opened(m) for m in cfg.models]
        carriers = [opened(c) for c in cfg.carriers]
        inputs = ([base] if base else []) + models
        names = ([cfg.base] if base else []) + list(cfg.models)
        if base and cfg.base in cfg.models:  # the base listed as an expert too: its α0 rows (shift, salience,
            names[0] = f"{cfg.base} (base)"  # task arithmetic) and its expert rows must not share one name
        check_inputs_and_out(cfg.out, models, ([base] if base else []) + carriers)  # base may be in --models
        check_each_once(carriers, "carrier")  # --carrier X X wrote carriers/X and an identical carriers/X-2
        check_replaceable(cfg.out, cfg.overwrite, COMMAND)
        reserve_descriptors([*inputs, *carriers])
        al = align(inputs, names)  # shapes, vocab rule: all checked before anything is written
        for car in carriers:
            align([inputs[0], car], [names[0], car.name])
        shift_table = ShiftTable(cfg.shift_dir, base, models) if cfg.shift_dir and base else None
        salience, read = load_salience(cfg, base, models, names, al) if cfg.method == "salience" else (None, None)
        merger = Merger(cfg, inputs, names, al, base is not None, shift_table, salience)
        ref = inputs[0]
        try:  # named by its checkpoint: the family's line alone left the user to guess which input it meant
            lm_type = causal_lm_type(ref.family, ref.text_config)
        except BadInput as exc:
            raise BadInput(f"{names[0]} ({ref.path}): {exc}") from None
        # a salience merge's tables checked the base's layers (load_salience), over ref's config and these names
        check_lm_fits_class(lm_type, ref.text_config, [p.canon for p in al.tensors], f"{names[0]} ({ref.path})",
                            layers_held=salience is not None)
        asked = OUT_DTYPES[cfg.dtype] if cfg.dtype else None  # DESIGN §5: the input dtype unless asked
        entries = [Entry(lm_disk_key(p.canon), asked or p.ref.dtype, p.ref.shape) for p in al.tensors]
        embed = next(p for p in al.tensors if p.canon == "embed_tokens.weight")
        # before the merge: a config it cannot write is refused before hours of tensors, not after
        config = merged_config(ref, asked or embed.ref.dtype, embed.ref.shape[0], al.tied, lm_type)
        with atomic_dir(cfg.out, cfg.overwrite, COMMAND, merge_request(cfg, read)) as tmp:
            with ShardedWriter(tmp, entries, cfg.shard_size, {"merge_method": cfg.method}, background=True) as writer:
                for plan, e in zip(progress(al.tensors, desc=f"merge ({cfg.method})", unit="tensor"), entries):
                    with writer.tensor(e.key) as sink:
                        merger.merge_tensor(plan, sink)
                writer.close()
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
            tok_src = ref.path
            copied = copy_side_files(tok_src, tmp, TOKENIZER_FILES)
            write_weights(tmp / "merge_weights.csv", merger.weight_rows)
            t_lm = time.perf_counter() - t0
            carrier_reports = []
            if carriers:
                merged = stack.enter_context(open_checkpoint(str(tmp)))
                used: set[str] = set()
                for car in carriers:
                    nm = unique_name(carrier_name(car.name, car.path), used)
                    carrier_reports.append(write_carrier(car, merged, tmp / "carriers" / nm, cfg.shard_size,
                                                           Path(cfg.out).name))
            report = {
                "method": cfg.method,
                "equation": FORMULAS[cfg.method].equation,
                "base": cfg.base,
                "models": list(cfg.models),
                "reference": names[0],
                "weights": cfg.weights if cfg.method == "weighted" else None,
                "normalize": cfg.normalize if reads("no_normalize", cfg.method) else None,
                "alpha0": cfg.alpha0 if reads("alpha0", cfg.method) else None,
                "temperature": cfg.temperature if reads("temperature", cfg.method) else None,
                # salience --rest layer too: embeddings, the final norm and lm_head stay on Eq. 4
                "shift_source": str(cfg.shift_dir) if shift_table else (
                    "computed" if METHODS[cfg.method].reads_shift else None),
                "lambda": cfg.lam if reads("lam", cfg.method) else None,
                "density": cfg.density if reads("density", cfg.method) else None,
                "salience": {"runs": [str(p) for p in cfg.salience],
                             "base_run": str(cfg.base_salience) if cfg.base_salience else None,
                             # as given, and resolved: figures merge reads the runs from any cwd
                             "resolved_runs": [str(p.resolve()) for p in cfg.salience],
                             "resolved_base_run": str(cfg.base_salience.resolve()) if cfg.base_salience else None,
                             # and where the merge was: runs moved with it (a copied replicate run) are found
                             # at their place relative to it (figures.merge.moved_run)
                             "resolved_out": str(Path(cfg.out).resolve()),
                             "metric": cfg.salience_metric, "temperature": cfg.salience_temperature,
                             "rest": cfg.rest,
                             # each run's model, data, items, engine (and its warnings): what the weights came from
                             "measured": salience.runs} if salience else None,
                # each model's mean over its rows (null where the method has no such column: ties' weight,
                # every other method's trim threshold)
                "mean_weight": model_means(merger.weight_rows, "weight"),
                "mean_trim_threshold": model_means(merger.weight_rows, "trim_threshold"),
                "n_tensors": len(al.tensors),
                "dtype": str(asked or embed.ref.dtype),
                "math_dtype": "float32",
                "shards": writer.names,
                "vocab": al.vocab,
                "lm_head": al.head,
                "tie_word_embeddings": al.tied,
                "tokenizer_files": copied,
                "carriers": carrier_reports,
                "seconds_lm": round(t_lm, 3),
                "seconds_total": round(time.perf_counter() - t0, 3),
            }
            (tmp / "merge.json").write_text(json_text(report), encoding="utf-8")
            for c in carriers:
                c.close()  # release mappings before the rename
    if al.vocab:
        print(f"vocabulary sizes differ, rule applied: {json.dumps(al.vocab)}", file=sys.stderr)
    if al.head:
        print(f"tied and untied lm_heads: {al.head['rule']}; the merged LM has its own lm_head", file=sys.stderr)
    print(f"merged {len(al.tensors)} LM tensors ({cfg.method}) -> {cfg.out}")
    for c in report["carriers"]:  # where each evaluable model went (probe.eval --models takes these dirs)
        print(f"carrier {c['source']} -> {Path(cfg.out) / 'carriers' / c['name']}")
    if cfg.method == "salience":  # the one method python -m figures merge draws
        print(results_line(cfg.out, "merge"))
    return report


def unique_name(name: str, used: set[str]) -> str:
    out, i = name, 2
    while out in used:
        out, i = f"{name}-{i}", i + 1
    used.add(out)
    return out


def write_weights(path: Path, rows: Sequence[WeightRow]) -> None:
    """merge_weights.csv: one row per tensor (slice "all") or head slice per model, numbers as repr (exact)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(WEIGHTS_HEADER)
        for r in rows:
            cells = [getattr(r, c) for c in WEIGHTS_HEADER]
            w.writerow([v if isinstance(v, str) else "" if v is None else repr(v) for v in cells])


def model_means(rows: Sequence[WeightRow], column: str) -> dict[str, float] | None:
    """merge.json's mean of a merge_weights.csv column per model; None where no row has a value in it."""
    acc: dict[str, list[float]] = {}
    for r in rows:
        if (v := getattr(r, column)) is not None:
            acc.setdefault(r.model, []).append(v)
    return {m: sum(v) / len(v) for m, v in acc.items()} or None


def load_salience(cfg: MergeConfig, base: Checkpoint, models: Sequence[Checkpoint], names: Sequence[str],
                  al: Alignment) -> tuple[SalienceWeights, dict[Path, str]]:
    """The participants' salience runs, checked against the base's head geometry (base run first if given) and
    that geometry against the LM tensors ``al`` merges; with each run's fingerprint (``run_fingerprint``) of the
    heads.csv bytes its weights were read from."""
    from probe.lm_config import HeadGeometry

    geometry = HeadGeometry.from_text_config(base.text_config)
    runs = ([(cfg.base_salience, names[0])] if cfg.base_salience else []) + list(zip(cfg.salience, names[1:]))
    read = [read_salience(Path(d), cfg.salience_metric, geometry, nm) for d, nm in runs]
    tables = [grid for grid, _ in read]
    participants = dict(zip(names, [base.path, *(m.path for m in models)]))
    records = [check_run_model(Path(d), nm, participants) for d, nm in runs]
    weights = SalienceWeights.build(tables, geometry, cfg.salience_temperature, cfg.alpha0,
                                    cfg.base_salience is not None, records)
    weights.check_tensors([(p.canon, p.ref.shape) for p in al.tensors], f"--base {base.path}")
    for w in (w for r in records for w in r["warnings"]):  # after every refusal: an error stays the only line
        print(f"warning: {w}", file=sys.stderr)
    return weights, {Path(d): run_fingerprint(Path(d), raw) for (d, _), (_, raw) in zip(runs, read)}


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="python -m analyses.merge",
        examples=["python -m analyses.merge --base organism-base --models organism-vl organism-video --method average --out runs/avg",
                  "python -m analyses.merge --base organism-base --models organism-vl organism-video --method shift --shift runs/shift --carrier organism-vl --out runs/eq4",
                  "python -m probe.heads --model organism-vl --out runs/heads-vl       # each expert's salience, on its "
                  "own data",
                  "python -m probe.heads --model organism-video --out runs/heads-video",
                  "python -m analyses.merge --base organism-base --models organism-vl organism-video --method salience --salience runs/heads-vl runs/heads-video --out runs/sal",
                  "python -m figures merge runs/sal     # a salience merge's head weights beside each expert's "
                  "salience: merge_heads.png/pdf"],
        description="Merge the LLM backbones of modality-extended models (paper Eq. 1, 2, 4) and optionally "
        "transplant the merged LM into each multimodal carrier. Writes OUT as a Hugging Face model dir "
        "(AutoModelForCausalLM loads it) with merge_weights.csv (each tensor's or head slice's weight per model; ties: "
        "each expert's trim threshold) and "
        "merge.json, and OUT/carriers/<name>/ per --carrier.",
    )
    p.add_argument("--base", help="base LLM (dir or alias); required by --method "
                   f"{', '.join(m for m, f in METHODS.items() if f.needs_base)}; for "
                   f"{'/'.join(m for m, f in METHODS.items() if not f.needs_base)} it only supplies config, tokenizer "
                   "and extra vocabulary rows (list it in --models to include it) (default: none; then the first of "
                   "--models supplies them)")
    p.add_argument("--models", nargs="+", required=True, help="models whose LMs are merged (dirs or aliases)")
    p.add_argument("--method", choices=list(METHODS), default="shift",
                   help="average (Eq. 1), weighted (Eq. 2), shift (Eq. 4; default), salience (head salience runs "
                   "decide each head's weights), task_arithmetic, ties")
    p.add_argument("--weights", nargs="+", type=float,
                   help="Eq. 2 weights, one per --models entry; --method weighted only, which requires them "
                   "(default: none)")
    p.add_argument("--no-normalize", action="store_true", help="use --weights as given (default: sum to 1)")
    p.add_argument("--alpha0", type=float, help="Eq. 4 weight of the base (default: 0.5, as released)")
    p.add_argument("--temperature", type=float,
                   help="Eq. 4 softmax temperature tau: alpha_i = softmax(delta_avg_i / tau) (default: 1e-3)")
    p.add_argument("--shift", type=in_path, dest="shift_dir", metavar="DIR",
                   help="reuse Δavg from a python -m analyses.shift output dir instead of recomputing (default: computed "
                   "here from --base and --models)")
    p.add_argument("--carrier", nargs="+", default=[], dest="carriers", metavar="M",
                   help="multimodal models to receive the merged LM (written to OUT/carriers/<name>/) (default: none, the "
                   "merged LM alone)")
    p.add_argument("--salience", nargs="+", type=in_path, default=[], metavar="DIR",
                   help="salience: one complete python -m probe.heads run per --models entry, same order; --method salience "
                   "requires them (default: none)")
    p.add_argument("--base-salience", type=in_path, metavar="DIR",
                   help="salience: a probe.heads run of the base on text; then the base competes by salience "
                   "too instead of keeping --alpha0 (default: none, the base keeps --alpha0)")
    p.add_argument("--salience-metric", choices=SALIENCE_METRICS,
                   help="salience: heads.csv column used as s_i(L, h) (default: kl)")
    p.add_argument("--salience-temperature", type=float,
                   help="salience: softmax temperature over normalised saliences (default: 1.0)")
    p.add_argument("--rest", choices=("shift", "layer"), default="shift",
                   help="salience: non-head tensors by Eq. 4 (shift; default) or by the layer's mean salience")
    p.add_argument("--lambda", type=float, dest="lam",
                   help="task_arithmetic / ties: scale of the merged task vector (default: 1.0)")
    p.add_argument("--density", type=float,
                   help="ties: share of each task vector kept, by magnitude (default: 0.2)")
    p.add_argument("--shard-size", default="5GB",
                   help="largest safetensors shard: bytes, or 500MB, 2GiB (GB 10^9 bytes, GiB 2^30) (default: 5GB)")
    p.add_argument("--dtype", choices=list(OUT_DTYPES),
                   help="write the merged LM in this dtype (default: the inputs' dtype, the reference's where they "
                   "differ; the math is fp32 either way); carriers keep their own")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the combine (default: 1, fastest on a machine shared with other jobs; more "
                   "are faster on an idle one); the merged bits do not depend on it")
    add_output_args(p, "output HF model dir", figures=False)
    return p


# options a method reads (dest, flag, methods): given to another method they would be ignored, so they are refused
METHOD_OPTIONS = (("alpha0", "--alpha0", ("shift", "salience")), ("temperature", "--temperature", ("shift", "salience")),
                  ("salience_metric", "--salience-metric", ("salience",)),
                  ("salience_temperature", "--salience-temperature", ("salience",)),
                  ("lam", "--lambda", ("task_arithmetic", "ties")), ("density", "--density", ("ties",)),
                  ("no_normalize", "--no-normalize", ("weighted",)))


def reads(dest: str, method: str) -> bool:
    """Whether ``method`` reads the MergeConfig setting ``dest`` (METHOD_OPTIONS): merge.json records it only then."""
    return any(d == dest and method in methods for d, _, methods in METHOD_OPTIONS)


def method_options(a: argparse.Namespace) -> dict[str, Any]:
    """The method's settings as given, else MergeConfig's defaults; one given to a method that ignores it (e.g.
    --density with task_arithmetic, which would have merged untrimmed, exit 0) is bad input."""
    for dest, flag, methods in METHOD_OPTIONS:
        if getattr(a, dest) not in (None, False) and a.method not in methods:
            raise BadInput(f"{flag} only applies to --method {' or '.join(methods)}, not {a.method}")
    return {dest: getattr(a, dest) for dest, _, _ in METHOD_OPTIONS if dest != "no_normalize"
            and getattr(a, dest) is not None}


def config(a: argparse.Namespace) -> MergeConfig:
    """The MergeConfig of parsed arguments (``build_parser``'s): the command line's and ``merge(**options)``'s."""
    return MergeConfig(
        models=a.models, method=a.method, out=a.out, base=a.base, weights=a.weights, normalize=not a.no_normalize,
        carriers=a.carriers, shift_dir=a.shift_dir, shard_size=parse_size(a.shard_size), overwrite=a.overwrite,
        allow_bin=a.allow_bin, salience=a.salience, base_salience=a.base_salience, rest=a.rest, threads=a.threads,
        dtype=a.dtype,
        **method_options(a),
    )


@says_out_of_memory(TENSOR_MEMORY_HINT)
def merge(**options: Any) -> Any:
    """The merge from Python, e.g. ``merge(base="organism-base", models=["organism-vl", "organism-video"],
    method="shift", carriers=["organism-vl"], out="runs/merged")``: the options of ``python -m analyses.merge
    --help`` as keywords, each by its destination (``carriers`` for ``--carrier``, ``shift_dir`` for ``--shift``,
    ``lam`` for ``--lambda``; a list for several values, True for a flag). An output already finished with the same
    inputs is kept, as the command does. Returns the output read back, a ``figures.results.Merge`` (``.weights``,
    ``.info``, ``.model``, ``.carriers``); a refused value raises ``probe.errors.BadInput``, an unknown keyword
    ``TypeError``."""
    from figures.results import Merge

    a = parse_options(build_parser(), options)
    with quiet_progress(a.quiet):
        run_merge(config(a))
    return Merge.read(a.out)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    with quiet_progress(a.quiet):
        run_merge(config(a))
    return 0


main.memory_hint = TENSOR_MEMORY_HINT  # type: ignore[attr-defined]  # read by cli_main


if __name__ == "__main__":
    sys.exit(cli_main(main))
