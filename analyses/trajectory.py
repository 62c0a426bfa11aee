"""Map checkpoints in weight space (section 6.2, Figure 4; DESIGN §6).

    python -m analyses.trajectory --base qwen2 --experts qwen2-vl llava-ov-si --merged runs/merged \\
        --runs runs/ft-text runs/ft-image --out runs/trajectory

Two features per checkpoint, both against a reference (``--ref``, default the base), both streamed:
``norms`` is the paper's vector of per-tensor ‖θ − θ_ref‖ (one entry per LM tensor); ``sketch`` is a seeded
count-sketch projection of the whole delta (``analyses.sketch``). Each is mapped with PCA and t-SNE (perplexity
clamped below the number of points). A ``--runs`` dir holds ``checkpoint-<step>`` subdirs (HF Trainer), drawn
as a trajectory in step order. Writes ``points.csv``, ``features.npz``, ``coords.csv`` (name, kind, run, step,
feature, method, x, y), ``run.json`` and ``trajectory_<feature>.{png,pdf}``.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from analyses.align import Alignment, align, check_delta_finite
from analyses.checkpoints import (Checkpoint, add_output_args, check_inputs_and_out, open_checkpoint,
                                  progress, quiet_progress, reserve_descriptors)
from analyses.finetune import checkpoint_dirs
from analyses.sketch import SKETCH_CHUNK, SKETCH_DIMS, CountSketch
from analyses.writer import atomic_dir, check_output, check_replaceable, returns_finished, run_request
from probe.errors import (TENSOR_MEMORY_HINT, ArgParser, BadInput, cli_main, in_path, out_dir, parse_options,
                          says_out_of_memory)
from probe.results import distinct_names, json_text, results_line

COMMAND = "analyses.trajectory"  # what its output manifests name


@dataclass
class TrajectoryConfig:
    out: Path
    base: str
    experts: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    ref: str | None = None
    sketch_dim: int = 256
    seed: int = 0
    perplexity: float = 30.0
    overwrite: bool = False
    allow_bin: bool = False
    figures: bool = True

    def __post_init__(self) -> None:
        self.out = out_dir(self.out)  # from Python a str too, ~ expanded as the CLI's --out


@dataclass
class Point:
    name: str
    kind: str  # base | expert | merged | run
    path: str
    run: str = ""
    step: int | None = None


def run_points(run_dir: str, label: str | None = None) -> list[Point]:
    """``checkpoint-<step>`` subdirs of a fine-tuning run, in step order, named ``label@step`` (default: the
    run folder's name)."""
    d = Path(run_dir)
    label = label or d.name
    if not d.is_dir():
        raise BadInput(f"--runs {run_dir}: not a directory")
    steps = checkpoint_dirs(d, f"--runs {run_dir}: ")
    for sub in sorted(d.glob("checkpoint-*")):  # one of another name was skipped: a run short of a point
        if sub.is_dir() and sub not in steps.values():
            raise BadInput(f"--runs {run_dir}: {sub.name} is not checkpoint-<step> with a whole-number step")
    if not steps:
        raise BadInput(f"--runs {run_dir}: no checkpoint-<step> subdirectories")
    return [Point(f"{label}@{s}", "run", str(p), label, s) for s, p in sorted(steps.items())]


def collect_points(cfg: TrajectoryConfig) -> list[Point]:
    pts = [Point(cfg.base, "base", cfg.base)]
    pts += [Point(m, "expert", m) for m in cfg.experts]
    pts += [Point(m, "merged", m) for m in cfg.merged]
    # runs in folders of the same name (seed0/mixed, seed1/mixed) keep apart: one trajectory each
    for r, label in zip(cfg.runs, distinct_names([str(Path(r).resolve()) for r in cfg.runs])):
        pts += run_points(r, label)
    # a point's name is its key in coords.csv: two of one name (--experts run@10 beside a run's checkpoint-10) were
    # written with exit 0 and then refused by the redraw as one point repeated
    first: dict[str, Point] = {}
    for p in pts:
        if (q := first.setdefault(p.name, p)).path != p.path:  # one path twice: check_inputs_and_out says so
            raise BadInput(f"two checkpoints would both be the point {p.name!r}: {q.path} and {p.path}; rename one")
    return pts


def stream_features(ref: Checkpoint, ckpts: Sequence[Checkpoint], names: Sequence[str], sketch: CountSketch,
                    ref_name: str = "ref") -> tuple[list[str], np.ndarray, np.ndarray, Alignment]:
    """Per checkpoint: per-tensor ‖θ − θ_ref‖ and the count sketch of θ − θ_ref, reading each tensor once; and the
    alignment, whose ``vocab`` and ``head`` say what the vocabulary and tied-head rules did (rows beyond the common
    ones are in no feature; a tied checkpoint's embedding is its lm_head where another has its own)."""
    al = align([ref, *ckpts], [ref_name, *names], use="features")
    norms = np.zeros((len(ckpts), len(al.tensors)))
    sk = torch.zeros((len(ckpts), sketch.dim), dtype=torch.float64)
    for t, plan in enumerate(progress(al.tensors, desc="features", unit="tensor", leave=False)):
        views = [ck.view(info).reshape(-1) for ck, info in zip([ref, *ckpts], plan.infos)]
        sq = [0.0] * len(ckpts)
        for c, lo in enumerate(range(0, plan.common, SKETCH_CHUNK)):
            hi = min(plan.common, lo + SKETCH_CHUNK)
            r = views[0][lo:hi].float()
            # hashed over the reference's whole chunk, then cut to the common rows: element j keeps its bucket and
            # sign whichever companions share the run (one of fewer rows only leaves rows out)
            buckets, signs = sketch.hashes(plan.canon, c, min(SKETCH_CHUNK, plan.ref.numel - lo))
            buckets, signs = buckets[:hi - lo], signs[:hi - lo]
            for i, v in enumerate(views[1:]):
                d = v[lo:hi].float() - r
                sq[i] += float(d.double().pow(2).sum())
                sketch.update(sk[i], d, buckets, signs)
        for i, (v, info) in enumerate(zip(views[1:], plan.infos[1:])):
            if not np.isfinite(sq[i]):
                check_delta_finite(views[0], ref_name, plan.infos[0].key, v, names[i], info.key)
            norms[i, t] = np.sqrt(sq[i])
        del views
        for ck, info in zip([ref, *ckpts], plan.infos):
            ck.release(info)
    return [p.canon for p in al.tensors], norms, sk.numpy(), al


def embed_2d(x: np.ndarray, perplexity: float, seed: int) -> tuple[dict[str, np.ndarray], float | None, list[float]]:
    """PCA and t-SNE coordinates, the t-SNE perplexity used (clamped to n − 1: sklearn needs it below n; None when
    t-SNE is skipped: fewer than 3 points, or all of them one point, where its scaling divides by zero) and the
    share of variance each principal component explains. The points are embedded in the order of their values
    (and returned in the order given): the same points listed in another order get the same bits."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    order = np.lexsort(x.T[::-1])  # by the first coordinate, then the next, ...; equal rows are equal wherever
    x = x[order]
    back = np.argsort(order)
    n = x.shape[0]
    out: dict[str, np.ndarray] = {}
    k = min(2, n, x.shape[1])
    pca = PCA(n_components=k, random_state=seed)
    with np.errstate(invalid="ignore", divide="ignore"):  # points that all coincide: 0/0 variance shares (→ 0)
        out["pca"] = np.pad(pca.fit_transform(x), ((0, 0), (0, 2 - k)))
    explained = [float(v) for v in np.nan_to_num(pca.explained_variance_ratio_)]
    used = None
    if n >= 3 and float(np.ptp(x, axis=0).max(initial=0.0)) > 0:
        used = float(min(perplexity, n - 1))
        out["tsne"] = TSNE(n_components=2, perplexity=used, init="pca" if k == 2 else "random", random_state=seed,
                           method="exact" if n <= 500 else "barnes_hut").fit_transform(x)  # exact: fast for few points
    return {method: xy[back] for method, xy in out.items()}, used, explained


def trajectory_request(cfg: TrajectoryConfig, points: Sequence[Point]) -> dict:
    """What a trajectory output is computed from (``run_request``): its options and every checkpoint it maps
    (``collect_points``'s: a run's checkpoint saved since is another input)."""
    return run_request(cfg, [p.path for p in points] + ([cfg.ref] if cfg.ref else []))


@returns_finished("run.json")
def run_trajectory(cfg: TrajectoryConfig) -> dict[str, Any]:
    """``python -m analyses.trajectory`` from Python: writes coords.csv, points.csv, features.npz, run.json and the
    figures into ``cfg.out`` and returns run.json's content (θ_ref, perplexity used, PCA variance shares); an output
    already finished with the same inputs is kept and its run.json returned.
    ``figures.results.Trajectory.read(cfg.out)`` reads it back with coords.csv as a frame; ``trajectory(**options)``
    takes the command's options as keywords and returns it so. Bad input raises ``probe.errors.BadInput``."""
    check_output(cfg.out, cfg.overwrite, COMMAND, lambda: trajectory_request(cfg, collect_points(cfg)))
    if cfg.sketch_dim not in SKETCH_DIMS:
        raise BadInput(f"--sketch-dim must be in {SKETCH_DIMS.start} .. {SKETCH_DIMS.stop - 1}, got {cfg.sketch_dim}")
    if not (math.isfinite(cfg.perplexity) and cfg.perplexity > 0):  # NaN passes a plain "<= 0" test
        raise BadInput(f"--perplexity must be a finite number > 0, got {cfg.perplexity}")
    if not 0 <= cfg.seed < 2**32:  # sklearn's PCA and t-SNE take random_state in 0 .. 2^32 - 1
        raise BadInput(f"--seed must be in 0 .. 2^32 - 1, got {cfg.seed}")
    points = collect_points(cfg)
    if len(points) < 2:
        raise BadInput("need at least two checkpoints (base plus --experts/--merged/--runs)")
    with ExitStack() as stack:
        ckpts = [stack.enter_context(open_checkpoint(p.path, cfg.allow_bin)) for p in points]
        ref = stack.enter_context(open_checkpoint(cfg.ref, cfg.allow_bin)) if cfg.ref else ckpts[0]
        check_inputs_and_out(cfg.out, ckpts, [ref])  # a point twice would sit on itself and skew t-SNE
        check_replaceable(cfg.out, cfg.overwrite, COMMAND)
        reserve_descriptors([*ckpts, ref])  # every checkpoint is streamed side by side
        tensors, norms, sketch, al = stream_features(ref, ckpts, [p.name for p in points],
                                                     CountSketch(cfg.sketch_dim, cfg.seed), cfg.ref or cfg.base)
    coords: list[list[Any]] = []
    perplexity_used, explained, coincide, maps = None, {}, [], {}
    for feature, x in (("norms", norms), ("sketch", sketch)):
        emb, used, explained[feature] = embed_2d(x, cfg.perplexity, cfg.seed)
        perplexity_used = used if used is not None else perplexity_used
        if used is None and len(points) >= 3:
            coincide.append(feature)
        maps[feature] = list(emb)
        for method, xy in emb.items():
            for p, (a, b) in zip(points, xy):
                coords.append([p.name, p.kind, p.run, "" if p.step is None else p.step, feature, method, float(a), float(b)])
    run = {
        "ref": cfg.ref or cfg.base,
        "n_points": len(points),
        "n_tensors": len(tensors),
        "vocab": al.vocab,  # vocabulary sizes that differ: only the common rows are in the features
        "lm_head": al.head,  # tied and untied heads mixed: each tied checkpoint's embedding is its lm_head
        "sketch": {"kind": "count sketch (sparse JL)", "dim": cfg.sketch_dim, "seed": cfg.seed, "chunk": SKETCH_CHUNK},
        "perplexity_requested": cfg.perplexity,
        "perplexity_used": perplexity_used,
        "tsne": ("skipped: fewer than 3 points" if len(points) < 3 else
                 f"skipped for {', '.join(coincide)}: every point is the same point" if coincide else
                 "sklearn TSNE (exact up to 500 points)"),
        "maps": maps,  # per feature, the methods mapped (coords.csv holds n_points rows of each)
        "pca_explained_variance": explained,  # per feature, the share of PC1 and PC2
    }
    with atomic_dir(cfg.out, cfg.overwrite, COMMAND, trajectory_request(cfg, points)) as tmp:
        with open(tmp / "points.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["name", "kind", "run", "step", "path"])
            for p in points:
                w.writerow([p.name, p.kind, p.run, "" if p.step is None else p.step, p.path])
        with open(tmp / "coords.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["name", "kind", "run", "step", "feature", "method", "x", "y"])
            w.writerows(coords)
        np.savez(tmp / "features.npz", names=np.array([p.name for p in points]), tensors=np.array(tensors),
                 norms=norms, sketch=sketch)
        (tmp / "run.json").write_text(json_text(run), encoding="utf-8")
        if cfg.figures:
            from figures.trajectory import draw_trajectory

            draw_trajectory(tmp)
    print(f"{len(points)} checkpoints mapped; " + results_line(cfg.out, "trajectory"))
    return run


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="python -m analyses.trajectory",
        examples=["python -m analyses.trajectory --base organism-base --experts organism-vl organism-video --merged runs/avg --runs runs/ft/mixed runs/ft-lora --out runs/traj  # after analyses.merge's and analyses.finetune's examples",
                  "python -m figures trajectory runs/traj     # redraw the figures from the saved files"],
        description="Map checkpoints in weight space: per-tensor ‖θ − θ_ref‖ and a streamed random-projection "
        "sketch of θ − θ_ref, embedded with PCA and t-SNE (paper section 6.2, Figure 4). Writes OUT/coords.csv, points.csv, features.npz, "
        "run.json and, unless --no-figures, trajectory_{norms,sketch}.{png,pdf}.",
    )
    p.add_argument("--base", required=True, help="base LLM (dir or alias); also the reference unless --ref")
    p.add_argument("--experts", nargs="+", default=[], help="modality-extended models (default: none)")
    p.add_argument("--merged", nargs="+", default=[],
                   help="merged models (e.g. python -m analyses.merge outputs) (default: none)")
    p.add_argument("--runs", nargs="+", type=in_path, default=[],
                   help="fine-tuning run dirs holding checkpoint-<step> subdirs (default: none)")
    p.add_argument("--ref", help="reference θ_ref for the deltas (default: --base)")
    p.add_argument("--sketch-dim", type=int, default=256,
                   help=f"sketch dimension, {SKETCH_DIMS.start} to {SKETCH_DIMS.stop - 1} (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sketch, PCA and t-SNE (default: 0)")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity, clamped to n_points - 1 (default: 30)")
    add_output_args(p, "output dir (coords.csv, points.csv, features.npz, run.json, figures)")
    return p


def config(a: argparse.Namespace) -> TrajectoryConfig:
    """The TrajectoryConfig of parsed arguments (``build_parser``'s): the command line's and
    ``trajectory(**options)``'s."""
    return TrajectoryConfig(a.out, a.base, a.experts, a.merged, [str(r) for r in a.runs], a.ref, a.sketch_dim, a.seed,
                            a.perplexity, a.overwrite, a.allow_bin, not a.no_figures)


@says_out_of_memory(TENSOR_MEMORY_HINT)
def trajectory(**options: Any) -> Any:
    """The weight-space map from Python, e.g. ``trajectory(base="organism-base", experts=["organism-vl",
    "organism-video"], merged=["runs/merged"], out="runs/trajectory")``: the options of ``python -m
    analyses.trajectory --help`` as keywords (a list for several values, True for a flag). An output already
    finished with the same inputs is kept, as the command does. Returns the output read back, a
    ``figures.results.Trajectory`` (``.coords``, ``.info``, ``.sketch``); a refused value raises
    ``probe.errors.BadInput``, an unknown keyword ``TypeError``."""
    from figures.results import Trajectory

    a = parse_options(build_parser(), options)
    with quiet_progress(a.quiet):
        run_trajectory(config(a))
    return Trajectory.read(a.out)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    with quiet_progress(a.quiet):
        run_trajectory(config(a))
    return 0


main.memory_hint = TENSOR_MEMORY_HINT  # type: ignore[attr-defined]  # read by cli_main


if __name__ == "__main__":
    sys.exit(cli_main(main))
