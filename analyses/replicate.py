"""``python -m analyses.replicate``: the paper's pipeline in one command (DESIGN §11).

    python -m analyses.replicate [--config FILE | --quick] [--only STAGE …] --out DIR

Stages, in order, each writing its raw outputs to ``DIR/<stage>/`` through the existing commands' Python APIs
(no second copy of any of them):

- ``data``       training items for the salience sweeps and fine-tuning (organisms' generators), if configured
- ``table3``     probe.eval: the base and every expert on every data set (paper Table 3)
- ``heads``      probe.heads: every expert on its own modality, the base on text (Figure 2)
- ``shift``      analyses.shift: Δavg per tensor (Eq. 3; "Qwen2-VL shifts 10×")
- ``merge``      analyses.merge: Eq. 1 average, Eq. 4 shift-weighted, salience-guided, TIES; carriers = experts
- ``table4``     probe.eval: the merged LMs on text (Table 4)
- ``table5``     probe.eval: each expert's carriers of the merged LMs on its own modality (Table 5)
- ``finetune``   analyses.finetune: the Eq. 4 carrier fine-tuned once per data choice (Figure 3, 4a)
- ``steps``      probe.eval over every run's checkpoints (Figure 3)
- ``trajectory`` analyses.trajectory: the runs around the merge (4a), base, experts and merges (4b)
- ``report``     figures.report: DIR/report.md and a self-contained DIR/report.html

Resumable: a stage whose fingerprint (its config section, the content of its input models and data, and its
upstream stages' fingerprints) matches a completed ``DIR/stages/<stage>.json`` is skipped, unless its dir no longer
holds what it wrote or a stage it read completed again since (``stale_reason``); a stage killed half-way
continues through its command's own resume (evaluation parts, sweep chunks, fine-tuning checkpoints, the merges
and maps finished before the kill), in a copied or moved DIR too (``computed_at``); a stage
whose inputs changed is deleted and rerun, and so is everything downstream of it. One run at a time holds DIR.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from analyses.replicate_config import (DEFAULT_CONFIG, GENERATED, QUICK_CONFIG, ReplicateConfig, check_machine,
                                       parse_config)
from probe.devices import Placement
from probe.errors import (ArgParser, BadInput, check_out_apart, check_out_path, cli_main, in_path, out_dir,
                          out_inside, parse_options, releases_claims, says_out_of_memory)
from probe.heads import SOFTWARE, software_differences, versions
from probe.results import (Moved, content_fingerprint, file_sha256, has_contents, json_digest, json_object,
                           lock_out_dir, moved_inputs)

MARKER = "replicate.json"  # marks DIR as ours: only then are stage dirs inside it ever deleted
STATE_DIR = "stages"  # DIR/stages/<stage>.json: fingerprint, status, seconds (beside, not inside, the outputs)


def short(spec: str) -> str:
    """A model's directory-safe name: the rule analyses.merge names its carriers by."""
    from analyses.merge_methods import carrier_name

    return carrier_name(spec)


@dataclass
class Context:
    cfg: ReplicateConfig
    out: Path
    quiet: bool
    fingerprints: dict[str, str]  # model spec or data dir → content fingerprint
    paths: dict[str, str]  # model spec → the directory it resolved to (this checkout's organisms, a hub snapshot)
    # what device = "auto" and dtype = "auto" resolved to here ({"dtype": "bfloat16", "device_type": "cuda"}): a part of
    # every section, so stages completed on a CPU (float32) are not kept beside stages run on a GPU (bfloat16)
    precision: dict[str, str] | None = None
    placement: Placement | None = None  # where the stages run: the first line printed, recorded in replicate.json
    was_at: str | None = None  # the folder replicate.json named before this run: where a record without "out" ran

    def section(self, name: str) -> dict[str, Any]:
        """The config section a stage's fingerprint holds, with the precision it runs in."""
        return self.cfg.section(name) | ({"resolved": self.precision} if self.precision else {})

    def data_dir(self, label: str) -> str:
        return self.cfg.data[label]

    def heads_dir(self, label: str) -> str:
        return str(self.out / "data" / label) if self.cfg.heads.data == GENERATED else self.data_dir(label)

    def merge_dir(self, method: str) -> Path:
        return self.out / "merge" / method

    def carrier(self, method: str, expert: str) -> Path:
        return self.merge_dir(method) / "carriers" / short(expert)

    def experts(self) -> list[tuple[str, str]]:
        return list(zip(self.cfg.models.experts, self.cfg.models.own))

    def placement_args(self) -> list[str]:
        return ["--device", self.cfg.device, "--dtype", self.cfg.dtype] + (["--quiet"] if self.quiet else [])


# ---- stages: each calls one command's Python API -------------------------------------------------------------

def run_eval(ctx: Context, models: Sequence[str], data: Sequence[str], out: Path, reference: str | None,
             limit: int | None) -> None:
    from probe import eval as probe_eval

    e = ctx.cfg.eval
    argv = (["--models", *map(str, models), "--data", *data, "--split", e.split,
             "--seed", str(ctx.cfg.seed), "--out", str(out)] + ctx.placement_args()
            + (["--batch-size", str(e.batch_size)] if e.batch_size is not None else [])  # None: by device
            + (["--limit", str(limit)] if limit else []) + ([] if e.generate else ["--no-generate"])
            + (["--reference", str(reference)] if reference else []))
    probe_eval.run(probe_eval.build_parser().parse_args(argv))


def stage_data(ctx: Context) -> None:
    if not ctx.cfg.train.generate:
        return
    from probe.zoo.build import build_fresh_data

    build_fresh_data(ctx.out / "data", ctx.cfg.train.generate, ctx.cfg.train.seed)


def stage_table3(ctx: Context) -> None:
    m = ctx.cfg.models
    run_eval(ctx, [m.base, *m.experts], list(ctx.cfg.data.values()), ctx.out / "table3", m.base, ctx.cfg.eval.limit)


def stage_heads(ctx: Context) -> None:
    from probe import heads as probe_heads

    h = ctx.cfg.heads
    jobs = [(e, ctx.heads_dir(label)) for e, label in ctx.experts()]
    if h.base_on_text:
        jobs.append((ctx.cfg.models.base, ctx.heads_dir(ctx.cfg.eval.text)))
    for model, data in jobs:
        argv = (["--model", model, "--data", data, "--split", h.split, "--batch-size", str(h.batch_size),
                 "--out", str(ctx.out / "heads" / short(model))] + ctx.placement_args()
                + (["--limit", str(h.limit)] if h.limit else []) + ([] if h.generate else ["--no-generate"]))
        print(f"[heads] {model} on {data}", file=sys.stderr)
        probe_heads.run(probe_heads.build_parser().parse_args(argv))


def drop_damaged(out: Path) -> Path:
    """``out``, an analyses output of a resumed stage, deleted if it cannot be kept: a file it lists is gone (deleted
    by hand while the stage was down), or it has no readable listing; its command then computes it again. A whole
    one is kept: its command finds it finished (the stage's fingerprint covers what it was computed from)."""
    from probe.results import gone_entries, read_manifest

    if out.exists() and gone_entries(out, read_manifest(out) or {}) != []:
        shutil.rmtree(out)
    return out


def stage_shift(ctx: Context) -> None:
    from analyses.shift import ShiftConfig, run_shift

    m = ctx.cfg.models
    run_shift(ShiftConfig(m.base, list(m.experts), drop_damaged(ctx.out / "shift")))  # finished before a kill: kept


def stage_merge(ctx: Context) -> None:
    from analyses.merge import METHODS, MergeConfig, reads, run_merge

    m, g = ctx.cfg.models, ctx.cfg.merge
    # a resumed stage keeps the methods merged before the kill (run_merge finds them finished: a 7B merge reads
    # every model again); run_stage clears the dir of a stage that is not resumed, and a method killed mid-merge
    # left only a hidden partial dir, which its rerun removes
    for method in g.methods:
        out = drop_damaged(ctx.merge_dir(method))
        # the [merge] settings this method reads, as analyses.merge's METHOD_OPTIONS says (--alpha0 to shift, ...)
        options: dict[str, Any] = {f.name: getattr(g, f.name) for f in fields(g) if reads(f.name, method)}
        if METHODS[method].reads_shift:
            options["shift_dir"] = ctx.out / "shift"
        if method == "salience":
            options |= dict(salience=[ctx.out / "heads" / short(e) for e in m.experts],
                            base_salience=ctx.out / "heads" / short(m.base) if g.salience_base else None)
        # average: Eq. 1 over all the LMs, the paper's "Qwen2-Text/VL/Video/SI" row; the others merge the experts
        models, base = ([m.base, *m.experts], None) if method == "average" else (list(m.experts), m.base)
        cfg = MergeConfig(models=models, method=method, out=out, base=base, carriers=list(m.experts), **options)
        print(f"[merge] {method}", file=sys.stderr)
        run_merge(cfg)
        if method == "salience":
            from figures.merge import draw_merge
            from probe.results import note_outputs, remove_stale_temps

            note_outputs(out, draw_merge(out))  # part of the output: `python -m analyses.merge --overwrite` replaces it
            remove_stale_temps(out)  # a figure's temp file left by a kill while it was drawn (the merge itself kept)


def stage_table4(ctx: Context) -> None:
    m = ctx.cfg.models
    models = [m.base] + [str(ctx.merge_dir(x)) for x in ctx.cfg.merge.methods]
    run_eval(ctx, models, [ctx.data_dir(ctx.cfg.eval.text)], ctx.out / "table4", m.base, ctx.cfg.eval.limit)


def stage_table5(ctx: Context) -> None:
    for expert, label in ctx.experts():
        models = [expert] + [str(ctx.carrier(x, expert)) for x in ctx.cfg.merge.methods]
        print(f"[table5] carriers of {expert} on {label}", file=sys.stderr)
        run_eval(ctx, models, [ctx.data_dir(label)], ctx.out / "table5" / short(expert), expert,
                 ctx.cfg.eval.limit)


def stage_finetune(ctx: Context) -> None:
    from analyses.finetune import FinetuneConfig, run_finetune

    ft = ctx.cfg.finetune
    dirs = ctx.cfg.train_dirs(ctx.out)
    for name, mix in ft.runs.items():
        print(f"[finetune] run {name}: mix {mix}", file=sys.stderr)
        run_finetune(FinetuneConfig(
            model=str(ctx.carrier("shift", ft.carrier)), data={k: dirs[k] for k in mix}, mix=dict(mix),
            out=ctx.out / "finetune" / name, steps=ft.steps, save_steps=list(ft.save_steps), split="train",
            lr=ft.lr, lm_lr=ft.lm_lr, batch=ft.batch_size, warmup=ft.warmup, seed=ctx.cfg.seed,
            device=ctx.cfg.device, dtype=ctx.cfg.dtype, lora=ft.lora, quiet=ctx.quiet, micro_batch=ft.micro_batch,
            gradient_checkpointing=ft.gradient_checkpointing))


def checkpoints(run_dir: Path) -> list[Path]:
    from analyses.finetune import checkpoint_dirs

    return [d for _, d in sorted(checkpoint_dirs(run_dir).items())]


def stage_steps(ctx: Context) -> None:
    ft = ctx.cfg.finetune
    for name in ft.runs:
        cks = checkpoints(ctx.out / "finetune" / name)
        print(f"[steps] run {name}: {len(cks)} checkpoints", file=sys.stderr)
        run_eval(ctx, [str(c) for c in cks], [ctx.data_dir(x) for x in ft.eval_data], ctx.out / "steps" / name,
                 str(cks[0]), ft.eval_limit)


def stage_trajectory(ctx: Context) -> None:
    from analyses.trajectory import TrajectoryConfig, run_trajectory

    m, t = ctx.cfg.models, ctx.cfg.trajectory
    eq4 = str(ctx.merge_dir("shift"))
    runs = [str(ctx.out / "finetune" / n) for n in ctx.cfg.finetune.runs]
    # 4a: where fine-tuning takes the merge, deltas from the merge; 4b: the merges among the models they merge.
    # A resumed stage keeps a map finished before the kill (run_trajectory finds it finished)
    run_trajectory(TrajectoryConfig(drop_damaged(ctx.out / "trajectory" / "fig4a"), m.base, merged=[eq4], runs=runs,
                                    ref=eq4, sketch_dim=t.sketch_dim, seed=ctx.cfg.seed, perplexity=t.perplexity))
    run_trajectory(TrajectoryConfig(drop_damaged(ctx.out / "trajectory" / "fig4b"), m.base, experts=list(m.experts),
                                    merged=[str(ctx.merge_dir(x)) for x in ctx.cfg.merge.methods],
                                    sketch_dim=t.sketch_dim, seed=ctx.cfg.seed, perplexity=t.perplexity))


def stage_report(ctx: Context) -> None:
    from figures.report import build_report

    for path in build_report(ctx.out):
        print(path)


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    run: Callable[[Context], None]
    inputs: Callable[[Context], Any]  # what besides upstream stages decides its outputs
    # what a complete stage has left in DIR (files or output dirs whose manifests list the rest): gone, it reruns
    outputs: Callable[[ReplicateConfig, Path], list[Path]] = lambda c, o: []
    # drawn afresh every run from the other stages' results (the report): never skipped, continued or cleared
    fresh: bool = False


def _models(ctx: Context) -> dict[str, Any]:
    """The models' contents and their roles: which is the base, the experts in order (the merge's reference and
    carriers follow it) and each expert's own data label (what heads and table5 run it on). Contents alone left a
    swapped ``models.own`` skipping every stage with the old pairing's results. And where each resolved (see
    ``_data``: an alias resolves to this checkout's organisms)."""
    m = ctx.cfg.models
    return {"content": {s: ctx.fingerprints[s] for s in [m.base, *m.experts]}, "base": m.base,
            "experts": list(m.experts), "own": list(m.own), "paths": {s: ctx.paths[s] for s in [m.base, *m.experts]}}


def _data(ctx: Context, labels: Sequence[str]) -> dict[str, list[str]]:
    """Each set's directory and content. The directories too: the commands record them (probe.eval's run
    fingerprint, shift's base path that the merge checks), so a stage killed and then resumed from another checkout
    (the same organisms and sets at other paths) was refused by its command on every rerun."""
    return {label: [ctx.data_dir(label), ctx.fingerprints[ctx.data_dir(label)]] for label in labels}


def _finetune_inputs(ctx: Context) -> dict[str, Any]:
    """Training settings and sets; not what the checkpoints are evaluated on (that is the steps stage's)."""
    keep = {k: v for k, v in ctx.section("finetune").items() if k not in ("eval_data", "eval_limit")}
    train = (ctx.cfg.train_dirs(Path("DIR")) if ctx.cfg.train.generate  # their content: the data stage's fingerprint
             else {k: [v, content_fingerprint(v)] for k, v in ctx.cfg.train.data.items()})
    from analyses.finetune import LOOP_IDENTITY

    return keep | {"train": train, **LOOP_IDENTITY}  # runs from before the schedule fix rerun


EVAL_FILES = ("scores.csv", "run.json", "eval.png")  # of a probe.eval run: what the report reads


def _eval_out(d: Path) -> list[Path]:
    return [d / f for f in EVAL_FILES]


def _sweeps(c: ReplicateConfig) -> list[str]:
    """The models stage heads sweeps: each expert, and the base when it is swept on text."""
    return [*c.models.experts, *([c.models.base] if c.heads.base_on_text else [])]


def _checkpoints(c: ReplicateConfig, o: Path) -> list[Path]:
    from analyses.finetune import checkpoint_steps

    steps = checkpoint_steps(c.finetune.save_steps, c.finetune.steps)
    return [o / "finetune" / n / f for n in c.finetune.runs for f in ["run.json", *(f"checkpoint-{s}" for s in steps)]]


STAGES: list[Stage] = [
    # items that repeat a validation item are left out of the training data (before: 12-16 of 96-128 per set), and
    # since 2026-12-05 its near-duplicates too (build.content_key; before: 15 of 336 at the default 24 per subject):
    # a DIR whose data stage left them in makes it again
    Stage("data", (), stage_data,
          lambda c: [c.section("train"), "validation items and their near-duplicates excluded",
                     # the section's "seed" is the top-level seed (section() puts it over train.seed), so items of
                     # another train.seed were kept; added only where items are generated, so a run of given sets
                     # (train.generate = 0, nothing made) keeps its stages
                     *([{"train.seed": c.cfg.train.seed}] if c.cfg.train.generate else [])],
          lambda c, o: [Path(d) for d in c.train_dirs(o).values()] if c.train.generate else []),
    Stage("table3", (), stage_table3, lambda c: [c.section("eval"), _models(c), _data(c, list(c.cfg.data))],
          lambda c, o: _eval_out(o / "table3")),
    Stage("heads", ("data",), stage_heads,
          lambda c: [c.section("heads"), _models(c), _data(c, [*c.cfg.models.own, c.cfg.eval.text])],
          lambda c, o: [o / "heads" / short(m) / f for m in _sweeps(c) for f in ("heads.csv", "baseline.json")]),
    Stage("shift", (), stage_shift, _models, lambda c, o: [o / "shift"]),
    Stage("merge", ("shift", "heads"), stage_merge, lambda c: [c.section("merge"), _models(c)],
          lambda c, o: [o / "merge" / m for m in c.merge.methods]),
    Stage("table4", ("merge",), stage_table4, lambda c: [c.section("eval"), _data(c, [c.cfg.eval.text])],
          lambda c, o: _eval_out(o / "table4")),
    Stage("table5", ("merge",), stage_table5, lambda c: [c.section("eval"), _data(c, c.cfg.models.own)],
          lambda c, o: [p for e in c.models.experts for p in _eval_out(o / "table5" / short(e))]),
    Stage("finetune", ("merge", "data"), stage_finetune, lambda c: _finetune_inputs(c), _checkpoints),
    Stage("steps", ("finetune",), stage_steps,
          lambda c: [c.section("eval"), c.section("finetune"), _data(c, c.cfg.finetune.eval_data)],
          lambda c, o: [p for n in c.finetune.runs for p in _eval_out(o / "steps" / n)]),
    Stage("trajectory", ("merge", "finetune"), stage_trajectory, lambda c: c.section("trajectory"),
          lambda c, o: [o / "trajectory" / f for f in ("fig4a", "fig4b")]),
    Stage("report", tuple(s for s in ("table3", "heads", "shift", "merge", "table4", "table5", "steps",
                                      "trajectory")), stage_report, lambda c: "always", fresh=True),
]
BY_NAME = {s.name: s for s in STAGES}


def fingerprints(ctx: Context) -> dict[str, str]:
    """Each stage's fingerprint: its inputs and its upstream stages' fingerprints, in stage order."""
    fps: dict[str, str] = {}
    for s in STAGES:
        fps[s.name] = json_digest([s.name, s.inputs(ctx), [fps[d] for d in s.needs]])
    return fps


def missing_outputs(stage: str, cfg: ReplicateConfig, out: Path) -> list[Path]:
    """What a complete stage wrote that is gone now (deleted by hand): its named outputs, and every entry of the
    output manifests (probe.results.MANIFEST) of its output dirs. The driver reruns such a stage, the report
    refuses it: either way no table cell turns into "—" and no figure drops out without a word."""
    from probe.results import gone_entries, read_manifest

    gone = []
    for p in BY_NAME[stage].outputs(cfg, out):
        if not p.exists():
            gone.append(p)
        elif (manifest := read_manifest(p)) is not None:  # an unreadable one: the files' readers name what is wrong
            gone += [p / e for e in gone_entries(p, manifest) or ()]
    return gone


def gone_text(gone: Sequence[Path]) -> str:
    """The first missing output, and how many more, for a message."""
    return f"{gone[0]}" + (f" (and {len(gone) - 1} more)" if len(gone) > 1 else "")


def read_state(out: Path, name: str) -> dict[str, Any]:
    """A stage's record (``write_state``); {} when it is missing, unparsable or not an object: no record."""
    return json_object(out / STATE_DIR / f"{name}.json") or {}


def write_state(out: Path, name: str, state: dict[str, Any]) -> None:
    from probe.results import atomic_write_json

    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / STATE_DIR / f"{name}.json", state)


# what ``python -m figures`` draws into a stage's dir: read by no stage (the data sets' images are inside their
# parquet files), and redrawn in place by the README's own workflow, whose drawing code may change a figure's bytes
FIGURE_SUFFIXES = (".png", ".pdf")


BIG_FILE = 64 << 20  # bytes: an output file over this is read once per (size, mtime), its digest kept (DigestCache)
DIGEST_CACHE = "file_digests.json"  # DIR/stages/file_digests.json: "stage/path" → [size, mtime_ns, sha256 hex]
# a record's "outputs_form" when its "outputs" digest took every file's bytes; a record without it (before
# 2026-12-07) took a file over BIG_FILE by its size and mtime, and is checked by that rule (legacy_output_digest)
CONTENT = "content"


@dataclass
class DigestCache:
    """The SHA-256 of each big output file of a run (over BIG_FILE), by its path in the run, size and mtime: an
    unchanged run reads none of them again, a copy (``cp -r``: new mtimes) reads each once. A file edited with its
    size and mtime put back is seen once its entry is gone (the price of not reading 15 GB at every check); an
    edit that moves its mtime is read again."""
    out: Path
    entries: dict[str, Any]
    seen: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, out: Path) -> DigestCache:
        return cls(out, json_object(out / STATE_DIR / DIGEST_CACHE) or {})

    def sha256(self, f: Path, st: os.stat_result) -> bytes:
        key = f.relative_to(self.out).as_posix()
        self.seen.add(key)
        e = self.entries.get(key)
        if isinstance(e, list) and e[:2] == [st.st_size, st.st_mtime_ns] and len(e) == 3 and isinstance(e[2], str) \
                and re.fullmatch("[0-9a-f]{64}", e[2]):
            return bytes.fromhex(e[2])
        digest = file_sha256(f)
        after = f.stat()
        if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):  # not rewritten while it was read
            self.entries[key] = [st.st_size, st.st_mtime_ns, digest.hex()]
        else:
            self.entries.pop(key, None)
        return digest

    def save(self, stage: str, before: dict[str, Any]) -> None:
        """Write the entries back when they changed, less those of ``stage``'s files not seen now (deleted, or
        the stage ran again). A run dir it cannot write into (a read-only copy's report) reads them again."""
        self.entries = {k: v for k, v in self.entries.items() if k in self.seen or not k.startswith(f"{stage}/")}
        if self.entries != before:
            from probe.results import atomic_write_json

            try:
                atomic_write_json(self.out / STATE_DIR / DIGEST_CACHE, self.entries)
            except OSError:
                pass


def is_figure(f: Path) -> bool:
    return f.suffix in FIGURE_SUFFIXES


def output_digest(out: Path, stage: str) -> str:
    """What a stage's dir holds (content_fingerprint of every file's bytes, a big file's digest kept in
    DigestCache), recorded when the stage completes and by each stage that reads it: its fingerprint holds its
    inputs only, so a heads.csv edited or a merged model's weights replaced by hand, or an upstream stage run again
    (its run.json times it), left every later stage skipped with numbers of the earlier outputs. Its figures are
    left out (FIGURE_SUFFIXES): a redraw (`python -m figures shift DIR/shift`) changes no number, and it made the
    stage and every stage after it run again. Not a big file's size and mtime: a copied run (new mtimes) ran its
    big stages again, a 7B merge among them."""
    cache = DigestCache.read(out)
    before = dict(cache.entries)
    digest = content_fingerprint(out / stage, hash_limit=BIG_FILE, skip=is_figure, big=cache.sha256)
    cache.save(stage, before)
    return "no files" if digest.startswith("name:") else digest  # not the path: a data stage with nothing to make


def legacy_output_digest(out: Path, stage: str) -> str:
    """``output_digest`` as records before 2026-12-07 have it: a big file by its size and mtime."""
    digest = content_fingerprint(out / stage, hash_limit=BIG_FILE, skip=is_figure)
    return "no files" if digest.startswith("name:") else digest


def recorded_outputs(out: Path, stage: str) -> dict[str, str]:
    """The record's part that says what the stage's dir holds (``stale_reason`` checks it)."""
    return {"outputs": output_digest(out, stage), "outputs_form": CONTENT}


def recorded_as(state: dict[str, Any]) -> list[Any]:
    """The digests a stage reading this one may hold of its outputs: the record's, and where the record was moved
    from size and mtime to content unchanged (``run_stage``), the one it had before."""
    return [state.get("outputs"), *([state["legacy_outputs"]] if "legacy_outputs" in state else [])]


def upstream_closure(stage: str) -> set[str]:
    """Every stage ``stage`` reads, directly or through others (the pipeline's graph, ``Stage.needs``)."""
    seen: set[str] = set()
    todo = list(BY_NAME[stage].needs)
    while todo:
        if (d := todo.pop()) not in seen:
            seen.add(d)
            todo += BY_NAME[d].needs
    return seen


def upstream_digests(out: Path, stage: Stage) -> dict[str, Any]:
    """The outputs of the stages ``stage`` reads, as their records say they completed (None: no such record)."""
    return {d: read_state(out, d).get("outputs") for d in stage.needs}


def stale_reason(out: Path, name: str) -> str | None:
    """Why a stage recorded complete does not hold what its record says, though its fingerprint matches: its dir
    changed since it completed, or a stage it reads has completed again since. None when it is whole (or its record
    is from before these were recorded: nothing to compare)."""
    st = read_state(out, name)
    now = output_digest if st.get("outputs_form") == CONTENT else legacy_output_digest
    if (saved := st.get("outputs")) is not None and saved != now(out, name):
        return f"its outputs in {out / name} changed since it completed (edited or replaced by hand?)"
    if moved := upstream_moved(out, BY_NAME[name], st):
        return f"stage {', '.join(moved)} completed again since it ran, with other outputs"
    return None


def upstream_moved(out: Path, stage: Stage, state: dict[str, Any]) -> list[str]:
    """The stages ``stage`` reads whose outputs are not those its record ``state`` says it read (an upstream stage
    completed again since); [] where the record says nothing of them (from before they were recorded)."""
    read = state.get("upstream")
    if not isinstance(read, dict):
        return []
    return [d for d in stage.needs if read.get(d) not in recorded_as(read_state(out, d))]


def ran_elsewhere(ctx: Context, state: dict[str, Any]) -> str | None:
    """The folder a stage's record says it ran in (its ``out``; a record from before: the one replicate.json named)
    when that is not ``ctx.out``: the run was copied or moved since. None when it ran here, or nothing says where."""
    ran, real = state.get("out", ctx.was_at), state.get("resolved_out")
    if isinstance(real, str):  # a relative "out" resolved from the cwd it ran in: continued from another cwd, the same
        return None if Path(real) == ctx.out.resolve() else real  # folder had looked moved, the stage started over
    if not isinstance(ran, str) or Path(ran) == ctx.out or Path(ran).resolve() == ctx.out.resolve():
        return None
    return ran


def computed_at(ctx: Context, state: dict[str, Any]) -> Moved | None:
    """Where a killed stage's parts named the run's own files when that is not ``ctx.out`` as spelt now: the folder
    its record says it ran in (``ran_elsewhere``), or where its first parts were (``parts_at``: continued in a copy,
    then killed there again, its parts still name them there); or the same folder spelt otherwise (``--out run``
    killed, continued as ``--out ../run`` from a folder inside: analyses.merge's request names its --shift as
    spelt, so its finished merges were "of other options or inputs", exit 2 on every rerun). None when they name
    them here, as spelt now."""
    at = state.get("parts_at")
    here = str(ctx.out.resolve())
    if isinstance(at, dict) and isinstance(at.get("out"), str) and isinstance(at.get("resolved_out"), str):
        then, real = at["out"], at["resolved_out"]
    elif (real := ran_elsewhere(ctx, state)) is not None:
        then = state.get("out", ctx.was_at)  # a record without resolved_out: ran_elsewhere's "out", as spelt
        real = str(Path(real).resolve()) if "resolved_out" not in state and Path(real).is_absolute() else real
    elif isinstance(state.get("out"), str) and isinstance(state.get("resolved_out"), str):
        then, real = state["out"], state["resolved_out"]  # here, spelt as then
    else:
        return None
    return None if (real, then) == (here, str(ctx.out)) else Moved(str(ctx.out), then, here, real)


def parts_at(moved: Moved | None) -> dict[str, Any]:
    """The record's part that says where a stage's kept parts name the run's files (``computed_at``)."""
    return {} if moved is None else {"parts_at": {"out": moved.then, "resolved_out": moved.then_resolved}}


def run_stage(ctx: Context, stage: Stage, fp: str) -> str:
    state = read_state(ctx.out, stage.name)
    if not stage.fresh and state.get("fingerprint") == fp and state.get("status") == "complete":
        if gone := missing_outputs(stage.name, ctx.cfg, ctx.out):
            print(f"== {stage.name}: its output {gone_text(gone)} is gone: running it again", file=sys.stderr)
        elif reason := stale_reason(ctx.out, stage.name):
            print(f"== {stage.name}: {reason}: running it again", file=sys.stderr)
        else:
            if "outputs" not in state:  # completed before outputs were recorded: from now on an edit is seen
                write_state(ctx.out, stage.name, state | recorded_outputs(ctx.out, stage.name)
                            | {"upstream": upstream_digests(ctx.out, stage)})
            elif state.get("outputs_form") != CONTENT:  # a big file by its mtime, just found whole: by content now
                # (a copy, new mtimes, keeps it), the digest the stages reading it hold kept beside (stale_reason)
                write_state(ctx.out, stage.name, state | recorded_outputs(ctx.out, stage.name)
                            | {"legacy_outputs": state["outputs"]})
            print(f"== {stage.name}: unchanged, skipped ({state.get('seconds', 0):.0f} s when run)", file=sys.stderr)
            return "skipped"
        state = {}  # from nothing: what is left of it is not known to be whole
    sdir = ctx.out / stage.name
    upstream = upstream_digests(ctx.out, stage)
    resumed = state.get("fingerprint") == fp and not stage.fresh
    if resumed and upstream_moved(ctx.out, stage, state):
        # its parts were computed from the outputs an upstream stage had before it ran again
        print(f"== {stage.name}: its inputs from an upstream stage changed since it started: starting it again",
              file=sys.stderr)
        resumed = False
    now = {k: v for k, v in versions().items() if k in SOFTWARE}
    if resumed and (moved := software_differences(state.get("versions"), now)):
        # its commands would refuse to mix two setups' parts (and ask for an --overwrite this driver has not got)
        then = ", ".join(f"{k} {state['versions'].get(k)} (now {now[k]})" for k in moved)
        print(f"== {stage.name}: its parts were computed under {then}: starting it again", file=sys.stderr)
        resumed = False
    # its commands name the run's own files they read by their paths (merge's --shift, table4's merges, a heads
    # run's generated set): parts computed before a copy or move are kept where those paths, read as where they
    # were then, name the same inputs (the commands compare their content as before); a copy's resume was refused
    # as another run's output ("of other options or inputs"), and then started over
    moved = computed_at(ctx, state) if resumed else None
    if moved is not None and moved.then_resolved != moved.now_resolved:
        print(f"== {stage.name}: its parts were computed in {moved.then} (the run was moved or copied since): "
              "continuing them here", file=sys.stderr)
    if sdir.exists() and not resumed and not stage.fresh:  # a fresh stage's dir holds no parts to drop
        shutil.rmtree(sdir)  # inputs or software changed (or no record): its outputs no longer belong to this run
    print(f"== {stage.name}: {'continuing' if resumed else 'running'}", file=sys.stderr)
    t0, c0 = time.perf_counter(), time.process_time()
    started = state.get("started") if resumed else time.strftime("%Y-%m-%dT%H:%M:%S%z")
    where = {"out": str(ctx.out), "resolved_out": str(ctx.out.resolve())}
    running = {"stage": stage.name, "fingerprint": fp, "status": "running", **where, "versions": now,
               "upstream": upstream}
    write_state(ctx.out, stage.name, running | {"started": started} | parts_at(moved))
    try:
        with moved_inputs(moved) if moved is not None else nullcontext():
            stage.run(ctx)
    except BadInput as exc:
        if moved is None:
            raise
        # a part not provably the same work here (a file over 64 MB is fingerprinted by its mtime, which cp -r
        # renews): its command refused it, as it would on every rerun; computed again from nothing instead
        print(f"== {stage.name}: its parts computed in {moved.then} cannot be kept here ({exc}): starting it "
              "again", file=sys.stderr)
        shutil.rmtree(sdir, ignore_errors=True)
        resumed, moved, started = False, None, time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_state(ctx.out, stage.name, running | {"started": started})
        stage.run(ctx)
    seconds = time.perf_counter() - t0
    # CPU seconds of all this process's threads: what the stage costs, whatever else shares the machine
    write_state(ctx.out, stage.name, {"stage": stage.name, "fingerprint": fp, "status": "complete",
                                      **where, "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                      "seconds": round(seconds, 1),
                                      "cpu_seconds": round(time.process_time() - c0, 1), "resumed": resumed,
                                      "versions": now, "upstream": upstream, **parts_at(moved),
                                      **({} if stage.fresh else recorded_outputs(ctx.out, stage.name))})
    print(f"== {stage.name}: done in {seconds:.1f} s", file=sys.stderr)
    return "ran"


def build_parser() -> argparse.ArgumentParser:
    from probe.heads import _Help

    p = ArgParser(
        prog="python -m analyses.replicate", formatter_class=_Help,
        examples=["python -m analyses.replicate --out runs/replicate        # the organisms, about 4 minutes on 2 CPU cores",
                  "python -m analyses.replicate --quick --out /tmp/quick      # a smoke run",
                  "python -m analyses.replicate --config analyses/configs/paper-7b.toml --out runs/replicate-7b",
                  "python -m figures report runs/replicate  # rebuild report.md/html and its figures from the saved "
                  "stages"],
        description="Run the paper's pipeline end to end (Tables 3-5, Figures 2-4, Eq. 1/3/4, salience and TIES "
        "merges), resumably, and write DIR/report.md and DIR/report.html.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", type=in_path, default=None,
                   help=f"TOML settings (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])}, the "
                   "organisms; analyses/configs/paper-7b.toml documents the real models)")
    g.add_argument("--quick", action="store_true", help=f"the CI settings ({QUICK_CONFIG.name}): few items, few steps")
    p.add_argument("--only", nargs="+", choices=[s.name for s in STAGES], metavar="STAGE",
                   help=f"run only these stages (their inputs must be complete), then rebuild the report from every "
                   f"stage's saved results: {', '.join(BY_NAME)} (default: every stage; one unchanged since it finished is "
                   "skipped)")
    p.add_argument("--out", type=out_dir, required=True, metavar="DIR", help="output directory (one subdirectory per stage)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_out_inputs(out: Path, cfg: ReplicateConfig, models: dict[str, str]) -> None:
    """--out neither is nor holds an input (a model, a data set, the config: a stage whose inputs changed is deleted
    whole, with whatever lay in its dir), nor lies inside a data set or a model: a model's and a set's fingerprints
    count every file below them, so the run's own files made each rerun start every stage over (and the data
    set, once it held the run's folder, stopped at table3, and so did every other command reading it)."""
    sets = [d for d in [*cfg.data.values(), *([] if cfg.train.generate else cfg.train.data.values())]
            if d.lower() != "mmmu"]
    check_out_apart(out, [*(("model", p) for p in models.values()), *(("data set", d) for d in sets),
                          ("config", cfg.source)], data=sets)
    if hit := out_inside(out, [("model", p) for p in models.values()]):
        raise BadInput(f"--out {out} is inside the model {hit[1]}, whose fingerprint counts every file below it: "
                       "each rerun would find it changed and start every stage over; pick an --out outside it")


def prepare(args: argparse.Namespace) -> tuple[Context, dict[str, str]]:
    """Everything checked before a byte is written: config, machine, paths, the out dir, --only."""
    path = QUICK_CONFIG if args.quick else (args.config or DEFAULT_CONFIG)
    cfg = parse_config(path)
    resolved, placement = check_machine(cfg)
    out: Path = args.out
    check_out_path(out)  # not under a file, and writable
    check_out_inputs(out, cfg, resolved)
    if out.exists() and (not out.is_dir() or (has_contents(out) and not (out / MARKER).is_file())):
        raise BadInput(f"--out {out}: exists and is not a python -m analyses.replicate output")
    out = first_spelling(out)
    fps = {spec: content_fingerprint(p) for spec, p in resolved.items()}
    fps |= {d: content_fingerprint(d) for d in cfg.data.values()}
    was_at = marked(out, "out")
    ctx = Context(cfg, out, args.quiet, fps, resolved, {"dtype": placement.dtype, "device_type": placement.device_type},
                  placement, was_at if isinstance(was_at, str) else None)
    stage_fps = fingerprints(ctx)
    if args.only:
        wanted = set(args.only)
        for name in args.only:
            for dep in BY_NAME[name].needs:
                st = read_state(out, dep)
                if dep in wanted:
                    continue
                if not (st.get("status") == "complete" and st.get("fingerprint") == stage_fps[dep]):
                    raise BadInput(f"--only {name}: it needs stage {dep!r}, which is not complete with these "
                                   f"settings{run_with_other_config(out, cfg)}; add it to --only or run without "
                                   "--only")
                if gone := missing_outputs(dep, cfg, out):
                    raise BadInput(f"--only {name}: it needs stage {dep!r}, whose output {gone[0]} is gone; add "
                                   "it to --only or run without --only")
                if reason := stale_reason(out, dep):
                    raise BadInput(f"--only {name}: it needs stage {dep!r}, which cannot be kept: {reason}; add "
                                   "it to --only or run without --only")
    return ctx, stage_fps


def marked(out: Path, key: str) -> Any:
    """``key`` of ``out``'s replicate.json (MARKER, written when a run starts); None when the file is missing,
    unreadable or not an object."""
    return (json_object(out / MARKER) or {}).get(key)


def run_with_other_config(out: Path, cfg: ReplicateConfig) -> str:
    """`` (DIR was run with FILE: give --config FILE, or --quick, again)`` when ``out``'s replicate.json names
    another config file than this run's, else nothing: ``--only report`` on a ``--quick`` run without ``--quick``
    said only that a stage was "not complete with these settings"."""
    saved = marked(out, "config_file")
    if not isinstance(saved, str) or not saved or Path(saved).resolve() == Path(cfg.source).resolve():
        return ""
    again = "--quick" if Path(saved).resolve() == QUICK_CONFIG.resolve() else f"--config {saved}"
    return f" ({out} was run with {saved}: give {again} again)"


def first_spelling(out: Path) -> Path:
    """``out`` as its replicate.json spells it, when that names the same folder from here: the stages name the
    models they evaluate by their paths under ``out`` (probe.eval labels its rows by them), so a rerun typing ``out``
    otherwise (absolute for relative, through a link) looked for rows no table had (exit 2 at the report) and found
    a killed eval stage's parts of "other models"."""
    saved = marked(out, "out")
    return Path(saved) if isinstance(saved, str) and Path(saved).resolve() == out.resolve() else out


def earlier_outs(out: Path) -> list[str]:
    """The folders a copied or moved ``out`` was run at before, as replicate.json spelt them: its stages' files name
    the merges and checkpoints they read by their paths there, and the report reads those names as under ``out``
    (``figures.results.Replication.model_label``), so the stages are kept rather than run again."""
    before = [x for x in [*(marked(out, "earlier_outs") or []), marked(out, "out")] if isinstance(x, str) and x]
    return [x for x in dict.fromkeys(before) if x != str(out)]


@releases_claims
def run(args: argparse.Namespace) -> Path:
    """The pipeline of parsed arguments (``build_parser``'s); returns its --out once the report is written. From
    Python, ``replicate(**options)`` takes the options as keywords and returns the output read back."""
    ctx, stage_fps = prepare(args)
    out = ctx.out
    # held to the end: a second run into this --out is refused rather than continue (or delete) our stages
    lock_out_dir(out)
    from probe.results import atomic_write_json, remove_stale_temps

    for d in (out, out / STATE_DIR):  # a SIGKILL before an atomic write's rename left its temp file (a live one's stay)
        remove_stale_temps(d)

    p = ctx.placement
    print(p.description, flush=True)  # on stdout, as probe.heads: a refusal in a stage is stderr's one line
    atomic_write_json(out / MARKER, {"out": str(out), "earlier_outs": earlier_outs(out),
                                     "config_file": ctx.cfg.source, "config": asdict(ctx.cfg),
                                     "placement": p.record(),
                                     "stages": [s.name for s in STAGES], "fingerprints": stage_fps,
                                     "model_content": ctx.fingerprints})
    t0 = time.perf_counter()
    for stage in STAGES:
        if args.only and stage.name not in args.only:
            continue
        run_stage(ctx, stage, stage_fps[stage.name])
    if args.only and "report" not in args.only:  # else report.md kept the numbers of the stages before this run
        run_stage(ctx, BY_NAME["report"], stage_fps["report"])
    print(f"all done in {time.perf_counter() - t0:.1f} s; report: {out / 'report.md'}, {out / 'report.html'}",
          file=sys.stderr)
    return out


@says_out_of_memory()
def replicate(**options: Any) -> Any:
    """The whole pipeline from Python, e.g. ``replicate(quick=True, out="runs/replicate")``: the options of
    ``python -m analyses.replicate --help`` as keywords. Resumes as the command does (finished stages with the same
    inputs are kept). Returns the output read back, a ``figures.results.Replication``; bad input raises
    ``probe.errors.BadInput``."""
    from analyses.checkpoints import quiet_progress
    from figures.results import Replication

    args = parse_options(build_parser(), options)
    with quiet_progress(args.quiet):
        return Replication.read(run(args))


def main(argv: Sequence[str] | None = None) -> int:
    from analyses.checkpoints import quiet_progress  # torch: here, so that figures reads a saved state without it

    args = build_parser().parse_args(argv)
    with quiet_progress(args.quiet):  # the analyses stages run in this process
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
