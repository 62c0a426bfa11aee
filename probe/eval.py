"""``python -m probe.eval``: models × data sets with error bars — the paper's Tables 3, 4 and 5 (DESIGN §8).

Every model (alias, directory, organism, merged output or carrier) answers every data set through the probe's
own prompt, parser and metrics, no head masked, several items per forward (probe.batch). Per model × data set ×
subject (and ``all``): n_items, accuracy, probability accuracy and mean p(answer), each with a seeded 95 %
bootstrap interval, and with ``--reference`` the paired difference to that model on the same items. A model that
cannot read a data set's modality gets a row with n_items 0 and a note, never 0 %.

Writes DIR/scores.csv, items.parquet, table.md, eval.{png,pdf}, run.json; one part per (model, data set) in
DIR/parts/, so a killed run continues where it stopped.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from probe.errors import (ArgParser, BadInput, check_counts, cli_main, counted, parse_options, releases_claims,
                          says_out_of_memory, undone_on_bad_input)
from probe.families import ALIASES
from probe.heads import (_Help, _progress, add_placement_args, add_prompt_args, add_run_args,
                         check_out_apart_from_inputs, load_template, run_versions, saved_run_info)

if TYPE_CHECKING:  # annotations only: the command imports the model code when it runs, not for --help
    import pandas as pd

    from probe.devices import Placement
    from probe.mmmu import Item
    from probe.models import LoadedModel, ModelRef
    from probe.prompting import PromptTemplate
    from probe.sweep import SweepConfig

DEFAULT_OUT = "runs/eval"
ITEM_COLUMNS = ["model", "data", "item_id", "subject", "answer", "pred", "correct", "prob_pred", "prob_correct",
                "p_answer", "response"]
SCORE_COLUMNS = ["model", "data", "subject", "n_items", "accuracy", "accuracy_lo", "accuracy_hi", "prob_accuracy",
                 "prob_accuracy_lo", "prob_accuracy_hi", "p_answer", "p_answer_lo", "p_answer_hi", "diff_accuracy",
                 "diff_lo", "diff_hi", "diff_prob_accuracy", "diff_prob_lo", "diff_prob_hi", "diff_n", "note"]
ALL = "all"


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="python -m probe.eval", formatter_class=_Help,
        examples=["python -m probe.eval --models organism-base organism-vl --data probe/zoo/data/text probe/zoo/data/image",
                  "python -m probe.eval --models qwen2 runs/merged --data mmmu --reference qwen2 --out runs/eval-merge",
                  "python -m probe.eval --models runs/ft/mixed/checkpoint-* --data probe/zoo/data/text --no-generate",
                  "python -m figures eval runs/eval      # redraw eval.png/pdf from the saved files"],
        description="Evaluate models on MMMU-format data sets (accuracy, probability accuracy, p(answer)) with "
        "seeded 95% bootstrap intervals and paired differences to a reference model. Writes OUT/scores.csv, "
        "items.parquet, table.md (models × data sets), eval.{png,pdf} and run.json; a killed run resumes per "
        "(model, data set) from OUT/parts/.")
    p.add_argument("--models", nargs="+", required=True,
                   help=f"aliases ({', '.join(ALIASES)}) or HF model dirs (merged outputs and carriers too; or .gguf files)")
    p.add_argument("--data", nargs="+", required=True,
                   help="MMMU-layout dirs (<root>/<Subject>/<split>[-*].parquet), 'mmmu', or the organisms' sets "
                   "probe/zoo/data/{text,image,image_single,video}")
    p.add_argument("--split", default="validation", help="dataset split")
    p.add_argument("--subjects", nargs="+", default=None, help="subject folders to use (default: all)")
    p.add_argument("--limit", type=int, default=None, help="first N multiple-choice items of each data set (default: all)")
    p.add_argument("--reference", default=None,
                   help="model to compare every other one against (paired difference on the same items); "
                   "added to --models if missing (default: none, no paired differences)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="items per forward at most (default: 32 on a CPU, 256 on a GPU); a batch is cut where "
                        "padding would pass 10 %% of its real tokens on a CPU, 50 %% on a GPU, and one that runs out "
                        "of memory is halved (so is a window of items whose input preparation does), and the rest of "
                        "that model and data set run at the smaller size")
    add_placement_args(p, "recorded with the results")
    p.add_argument("--no-generate", action="store_true",
                   help="skip greedy generation: probability accuracy and p(answer) only (accuracy NaN)")
    add_prompt_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals (default: 0)")
    add_run_args(p, DEFAULT_OUT, "eval.png/pdf")
    return p


@dataclass(frozen=True)
class DataSet:
    name: str  # label in the tables (the folder name, or the spec when folder names collide)
    spec: str
    path: str
    fingerprint: str
    n_items: int
    n_skipped_open: int
    subjects: list[str]

    @property
    def stream(self) -> str:
        """The key of this set's bootstrap streams: its folder's own name, which (unlike the label, longer when
        another --data shares that name) does not depend on the other sets of the run."""
        from probe.results import distinct_names

        return distinct_names([self.spec])[0]


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the spec as given
    path: str
    family: str
    fingerprint: str  # the weights (probe.models.model_fingerprint): a model changed in place is another run


@dataclass(frozen=True)
class EvalPlan:
    """Everything that decides the per-item results, validated before a weight loads (STYLE 5)."""

    models: list[ModelEntry]
    data: list[DataSet]
    not_applicable: dict[str, str]  # "model|data" → why, for a model that cannot read some (or all) of the items
    unreadable: dict[str, dict[str, int]]  # "model|data" → {subject: items of it the model cannot read}
    template: dict[str, str]
    # model name → the turn markup its prompts are wrapped in (probe.prompting.planned_chat_format): chosen by its
    # tokenizer's vocabulary too, so parts scored under one format are never resumed under another (as probe.heads)
    chat_formats: dict[str, dict[str, Any]]
    settings: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        """What the fingerprint digests (``plan_identity`` of the plan)."""
        return plan_identity(asdict(self))

    def fingerprint(self) -> str:
        """The plan's digest (``identity``)."""
        from probe.results import json_digest

        return json_digest(self.identity())

    def n_unread(self, model: str, data: str, subject: str = ALL) -> int:
        """Items of a data set (one subject, or all) the model cannot read, so is not scored on."""
        lost = self.unreadable.get(f"{model}|{data}", {})
        return sum(lost.values()) if subject == ALL else lost.get(subject, 0)


def plan_identity(plan: dict[str, Any]) -> dict[str, Any]:
    """What a plan (``asdict(EvalPlan)``, as run.json keeps it) is as a run's identity: each data set and model
    directory by where it is, not as typed (``data_location``): a rerun that spells a set's path otherwise (relative,
    absolute, ``./x/``) was refused as a different run. A model is its place in --models and its directory, not its
    name: the name labels rows and decides no number (a model's intervals are its data set's streams), so a resume
    that names it otherwise (its alias or its directory, ``DIR/``, relative from another working dir) continues, its
    kept parts relabelled (``read_pair_part``). A set's name stays: it keys the set's bootstrap streams. A refusal
    names what differs here (``prepare_out_dir``), not in the spelling."""
    import copy

    from probe.mmmu import data_location
    from probe.models import model_location
    from probe.results import as_computed

    plan = copy.deepcopy(plan)
    names = [m.pop("name") for m in plan["models"]]
    for ds in plan["data"]:
        ds["spec"] = data_location(ds["spec"])
    for m in plan["models"]:
        m["path"] = model_location(m["path"])
    # the "model|data" keys by place; which pairs are not applicable (the note's text names the model)
    place = {f"{n}|{ds['name']}": f"{m}|{d}" for m, n in enumerate(names) for d, ds in enumerate(plan["data"])}
    plan["not_applicable"] = sorted(place.get(k, k) for k in plan["not_applicable"])
    plan["unreadable"] = {place.get(k, k): v for k, v in plan["unreadable"].items()}
    plan["chat_formats"] = [plan["chat_formats"].get(n) for n in names]
    ref = plan["settings"]["reference"]
    plan["settings"]["reference"] = names.index(ref) if ref in names else ref
    return as_computed(plan)  # a model or set inside a moved analyses.replicate run: where its parts named it


def make_plan(args: argparse.Namespace) -> tuple[EvalPlan, list[ModelRef], dict[tuple[int, int], list[Item]],
                                                 PromptTemplate, Placement]:
    from probe.devices import resolve_placement
    from probe.mmmu import data_location, data_spec, load_items
    from probe.models import model_fingerprint, resolve_model
    from probe.prompting import can_read, check_prompts, planned_chat_format
    from probe.results import distinct_names

    check_counts(args, ("limit", "batch_size", "max_new_tokens", "image_max_side"))
    if args.seed < 0:  # numpy's bootstrap generator refuses it, but only after run.json and the parts are written
        raise BadInput(f"--seed must be ≥ 0, got {args.seed}")
    placement = resolve_placement(args.device, args.dtype, args.attn_implementation)
    args.data = [data_spec(s) for s in args.data]  # MMMU is mmmu: one label and bootstrap stream
    specs = list(args.models)
    same = [data_location(s) for s in args.data]  # text, ./text
    for group, what in ((specs, "model"), (same, "data set")):
        dup = sorted({s for s in group if group.count(s) > 1})
        if dup:
            raise BadInput(f"{what} {dup[0]!r} given twice")
    refs = [resolve_model(s) for s in specs]
    seen: dict[tuple[str, str | None], str] = {}
    for ref in refs:  # organism-base and its directory, or DIR and DIR/: one model, evaluated twice under two names
        if (twin := seen.setdefault(checkpoint_key(ref), ref.spec)) != ref.spec:
            raise BadInput(f"models {twin!r} and {ref.spec!r} are the same checkpoint ({ref.path}); give it once")
    if args.reference is not None and args.reference not in specs:
        ref = resolve_model(args.reference)
        if checkpoint_key(ref) in seen:  # --reference names a listed model another way: compare with that one
            args.reference = seen[checkpoint_key(ref)]
        else:
            specs.insert(0, args.reference)
            refs.insert(0, ref)
    datasets, items = [], {}
    for (name, spec), subjects in zip(zip(distinct_names(args.data), args.data), subjects_per_set(args)):
        its, report = load_items(spec, split=args.split, subjects=subjects, limit=args.limit)
        if ALL in report.subjects:  # its rows would be the set's totals, and the tables could not tell them apart
            raise BadInput(f"data set {spec}: a subject named {ALL!r} clashes with the per-set total rows of "
                           "scores.csv; rename that folder")
        items[name] = its
        datasets.append(DataSet(name, spec, data_location(spec),
                                report.fingerprint, len(its), report.n_skipped_open, list(report.subjects)))
    template = load_template(args)
    na: dict[str, str] = {}
    unreadable: dict[str, dict[str, int]] = {}
    scored = {}  # (model, data set) → the items the model is scored on: all it can read
    tokenizers: dict[str, Any] = {}  # spec → the tokenizer check_prompts loaded, for the plan's chat format
    for m, ref in enumerate(refs):
        for d, ds in enumerate(datasets):
            readable = [can_read(ref, i) for i in items[ds.name]]
            scored[m, d] = [i for i, ok in zip(items[ds.name], readable) if ok]
            lost = [i for i, ok in zip(items[ds.name], readable) if not ok]
            if lost:  # scored on the items it can read; the rest are named in the notes, never counted as wrong
                kinds = sorted({"video" if i.frames else "image" for i in lost})
                na[f"{ref.spec}|{ds.name}"] = (f"not applicable: {ref.spec} ({ref.family.name}) cannot read "
                                               f"{'/'.join(kinds)} items")
                unreadable[f"{ref.spec}|{ds.name}"] = {s: sum(i.subject == s for i in lost)
                                                       for s in sorted({i.subject for i in lost})}
        tokenizers[ref.spec] = check_prompts(ref, [i for d in range(len(datasets)) for i in scored[m, d]],
                                             template)
    settings = {"dtype": placement.dtype, "device_type": placement.device_type,
                "attn_implementation": args.attn_implementation,
                "generate": not args.no_generate, "max_new_tokens": args.max_new_tokens,
                "image_max_side": args.image_max_side, "split": args.split,
                # which subjects, not their order as typed: the loader reads each once in (subject, number) order,
                # so reordered or repeated names are the same items and numbers (probe.heads keeps the set, sorted)
                "subjects": None if args.subjects is None else sorted(set(args.subjects)),
                "limit": args.limit, "seed": args.seed, "reference": args.reference}  # the last two: scores.csv
    entries = [ModelEntry(r.spec, str(r.path), r.family.name, model_fingerprint(r)) for r in refs]
    formats = {r.spec: planned_chat_format(r, tokenizers.get(r.spec)) for r in refs}
    plan = EvalPlan(entries, datasets, na, unreadable, template.to_dict(), formats, settings)
    return plan, refs, scored, template, placement


def checkpoint_key(ref: Any) -> tuple[str, str | None]:
    """What tells two model specs apart: the resolved directory (and GGUF file in it)."""
    return str(Path(ref.path).resolve()), ref.gguf_file


def subjects_per_set(args: argparse.Namespace) -> list[list[str] | None]:
    """--subjects over several data sets: each set takes the named subjects it has; a name no set has, or a set
    with none of the names, is bad input naming the sets."""
    if args.subjects is None or len(args.data) == 1:
        return [args.subjects] * len(args.data)
    from probe.mmmu import discover, resolve_data

    have = [set(discover(resolve_data(d, args.split, args.subjects), args.split)) for d in args.data]
    unknown = [s for s in args.subjects if not any(s in h for h in have)]
    if unknown:
        listing = "; ".join(f"{d}: {', '.join(sorted(h))}" for d, h in zip(args.data, have))
        raise BadInput(f"unknown subject(s) {', '.join(unknown)}: in none of the data sets ({listing})")
    picked = [[s for s in args.subjects if s in h] for h in have]
    for d, p, h in zip(args.data, picked, have):
        if not p:
            raise BadInput(f"--subjects: data set {d} has none of {', '.join(args.subjects)} "
                           f"(its subjects: {', '.join(sorted(h))}); leave it out or name one of them")
    return picked


def part_file(out: Path, m: int, d: int) -> Path:
    return out / "parts" / f"model{m:03d}_data{d:03d}.parquet"


def scored_pairs(plan: dict[str, Any]) -> list[tuple[int, int]]:
    """The (model, data set) pairs of a plan (``asdict(EvalPlan)``, as run.json holds it) that score items, a part
    each: every pair but those whose model can read none of the set's items (``unreadable`` counts them)."""
    return [(m, d) for m, e in enumerate(plan["models"]) for d, ds in enumerate(plan["data"])
            if int(ds["n_items"]) > sum(plan["unreadable"].get(f"{e['name']}|{ds['name']}", {}).values())]


def pair_parts(out: Path, info: dict[str, Any]) -> list[Path]:
    """The part files of the run whose run.json (or run_info) is ``info``: one per scored (model, data set) pair.
    What the assembly's run.json signs (``probe.results.parts_signature``), and rank 0 of ``evaluate`` waits for."""
    return [part_file(out, m, d) for m, d in scored_pairs(info["plan"])]


def scored_already(out: Path, plan: EvalPlan, overwrite: bool) -> set[int]:
    """The models (indices into ``plan.models``) a resume of this very run (run.json's fingerprint is this plan's,
    which holds each model's ``model_fingerprint``) has a part of on every data set it scores: it loads none of
    them, so their load's checks (``preflight``, ``check_fits``: a meta build, for a GGUF file a parse of its
    header) are not made again. Read-only, before ``prepare_out_dir``; any doubt (no run.json, another run,
    ``--overwrite``, a part missing) leaves the model to be checked, and a part that is there is still read and
    checked against this run as every resume's is (``read_pair_part``)."""
    from probe.results import read_run_json

    saved = read_run_json(out) if not overwrite and (out / "run.json").is_file() else None
    if not isinstance(saved, dict) or saved.get("fingerprint") != plan.fingerprint():
        return set()
    pairs = scored_pairs(asdict(plan))
    return {m for m in range(len(plan.models)) if all(part_file(out, mm, d).is_file() for mm, d in pairs if mm == m)}


def read_pair_part(out: Path, plan: EvalPlan, scored: dict[tuple[int, int], list[Item]], m: int,
                   d: int) -> pd.DataFrame:
    """The saved part of model ``m`` on data set ``d``, checked to be of this run (the fingerprint it keeps,
    ``probe.results.check_part_run``: one of another run with the same items, other weights, was scored as this
    run's) and to hold one row per item the plan scores there, of that model and set: a part copied in from another
    run (a shorter --limit, other items) or edited was scored as this run's, its n and accuracy those of its own
    rows, exit 0."""
    from probe.results import PART_RUN, check_part_rows, check_part_run, part_metadata, read_part

    path = part_file(out, m, d)
    check_part_run(path, plan.fingerprint())
    df = read_part(path, ITEM_COLUMNS)
    model, data = plan.models[m].name, plan.data[d].name
    if part_metadata(path, PART_RUN) is not None and df["model"].nunique() == 1:
        # written by this run (its fingerprint) under the name the model had then (tiny-qwen2, now its directory):
        # the same model (the fingerprint holds its place and directory), labelled as this run names it
        df["model"] = model
    check_part_rows(path, df, ["model", "data", "subject", "item_id"],
                    [(model, data, it.subject, it.id) for it in scored[m, d]], f"items of {model} on {data}")
    return df


def evaluate_pair(loaded: LoadedModel, model_name: str, ds: DataSet, items: Sequence[Item], cfg: SweepConfig,
                  batch_size: int | None, bar: Any, quiet: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """The item rows of one model on one data set, and its batching as run.json records it (``BatchLimit.record``).
    ``batch_size`` None: the model's device's default (``default_batch_size``)."""
    from probe.batch import BatchLimit, default_batch_size, evaluate_items, past_bar
    from probe.sweep import BASELINE, measurement_row

    limit = BatchLimit(default_batch_size(loaded) if batch_size is None else batch_size, past_bar(bar, quiet))
    rows = []
    for item, m in zip(items, evaluate_items(loaded, items, cfg, limit, progress=bar.update)):
        row = measurement_row(item, BASELINE, BASELINE, m, m.logp)
        rows.append({"model": model_name, "data": ds.name} | {k: row[k] for k in ITEM_COLUMNS[2:]})
    return rows, limit.record()


def pair_batching(out: Path, plan: EvalPlan, pairs: Sequence[tuple[int, int]], saved: Any) -> dict[str, Any]:
    """run.json's ``batching``: per "model|data" pair whose part is on disk, in plan order, the record its part keeps
    (``probe.results.part_record``: written with it by whichever rank or run computed it), else, for a part written
    before parts kept one, the record of the run.json resumed (``saved``, its ``batching``)."""
    from probe.results import part_record

    old = saved if isinstance(saved, dict) else {}
    records: dict[str, Any] = {}
    for m, d in pairs:
        key, path = f"{plan.models[m].name}|{plan.data[d].name}", part_file(out, m, d)
        if path.is_file() and (record := part_record(path) or old.get(key)) is not None:
            records[key] = record
    return records


@releases_claims
@undone_on_bad_input
def run(args: argparse.Namespace) -> Path:
    """The evaluation of parsed arguments (``build_parser``'s); returns its --out once complete. From Python,
    ``evaluate(**options)`` takes the options as keywords and returns the result read back."""
    import pandas as pd

    from probe.devices import rank_world
    from probe.results import (atomic_write_json, atomic_write_parquet, check_same_run_on_every_rank, claim_out_dir,
                               parts_signature, prepare_out_dir, results_line, stop_recorded)

    from probe.models import check_fits, preflight

    plan, refs, scored, template, placement = make_plan(args)
    done = scored_already(args.out, plan, args.overwrite)
    for m, ref in enumerate(refs):  # a damaged or too large later model is found before the first one's results are
        if m in done:  # written; one this run has scored on every set is not loaded again, so neither is it checked
            continue
        preflight(ref)
        check_fits(ref, placement.dtype, placement.all_devices, placement.device_memory, placement.memory_kind)
    out: Path = args.out
    check_out_apart_from_inputs(out, [ref.path for ref in refs], [d.spec for d in plan.data], args.template)
    rank, world = rank_world()
    check_same_run_on_every_rank(plan.identity())  # before --out is looked at or written
    resumed = prepare_out_dir(out, plan.fingerprint(), args.overwrite, command="probe.eval", plan=asdict(plan),
                              identity=plan_identity)
    saved = saved_run_info(out) if resumed else {}
    pairs = scored_pairs(asdict(plan))
    # under torchrun each rank takes every WORLD_SIZE-th (model, data set) pair (it read no RANK: K ranks did all)
    todo = [(m, d) for i, (m, d) in enumerate(pairs) if i % world == rank and not part_file(out, m, d).is_file()]
    # the parts a resume keeps are read now: a damaged one is named before anything runs or is printed
    frames = {(m, d): read_pair_part(out, plan, scored, m, d) for m, d in pairs if part_file(out, m, d).is_file()}
    run_info: dict[str, Any] = {"command": "probe.eval", "fingerprint": plan.fingerprint(), "plan": asdict(plan),
                                "versions": run_versions(out, saved, bool(todo), bool(frames)),
                                "placement": placement.record(),
                                "argv": sys.argv[1:], "status": "running",
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if resumed:
        run_info["started"] = saved.get("started", run_info["started"])
    # per "model|data" pair computed (by this process, another rank or the runs it resumed): the batch size asked,
    # the largest batch that ran, and the sizes an out-of-memory back-off left (BatchLimit.record), each kept in its
    # pair's part (pair_batching). Outside the plan: how the numbers were batched, not what was asked (they move in
    # the last bits, as with --batch-size)
    batching = run_info["batching"] = pair_batching(out, plan, pairs, saved.get("batching"))
    t0 = time.perf_counter()
    if todo:
        from probe.models import load_model
        from probe.sweep import SweepConfig

        cfg = SweepConfig(template=template, generate=not args.no_generate, max_new_tokens=args.max_new_tokens,
                          image_max_side=args.image_max_side)
        if (out / "run.json").is_file():  # a resume claims the dir at once: the same command started twice would
            claim_out_dir(out, plan.fingerprint())  # otherwise compute the same parts side by side
        print(placement.description, flush=True)  # stdout: a model refused as it loads is stderr's one line
        bar = _progress(sum(len(scored[pair]) for pair in todo), args.quiet, "eval", unit="item")
        with stop_recorded(out, run_info):  # a check that stops the run says so in run.json
            for m in sorted({m for m, _ in todo}):
                loaded = load_model(refs[m], dtype=placement.dtype, device=placement.device,
                                    attn_implementation=args.attn_implementation, devices=placement.all_devices,
                                    device_memory=placement.device_memory, memory_kind=placement.memory_kind)
                if not (out / "run.json").is_file():  # only once a model loaded: failures leave no directory
                    claim_out_dir(out, plan.fingerprint())
                    atomic_write_json(out / "run.json", run_info)
                for d in [d for mm, d in todo if mm == m]:
                    ds = plan.data[d]
                    bar.set_description(f"eval {plan.models[m].name} on {ds.name}")
                    rows, ran = evaluate_pair(loaded, plan.models[m].name, ds, scored[m, d], cfg, args.batch_size,
                                              bar, args.quiet)
                    batching[f"{plan.models[m].name}|{ds.name}"] = ran
                    # with its rows, the record and whose run it is: the rank that assembles reads them back
                    atomic_write_parquet(part_file(out, m, d), pd.DataFrame.from_records(rows, columns=ITEM_COLUMNS),
                                         record=ran, run=plan.fingerprint())
                    frames[m, d] = read_pair_part(out, plan, scored, m, d)  # as a resume would read it
                del loaded
        bar.close()
    missing = [(m, d) for m, d in pairs if not part_file(out, m, d).is_file()]
    if missing:  # other ranks still working; the last one to finish assembles
        print(f"rank {rank}: done; waiting for {len(missing)} (model, data set) pairs from other ranks",
              file=sys.stderr)
        return out
    assembled = parts_signature(pair_parts(out, run_info))  # the parts read here (rank 0's evaluate() waits for it)
    frames |= {p: read_pair_part(out, plan, scored, *p) for p in pairs if p not in frames}  # other ranks'
    run_info["batching"] = pair_batching(out, plan, pairs, saved.get("batching"))  # other ranks' too
    if not todo:  # nothing to compute (a resume, or every pair n/a): results are still this run's writes
        claim_out_dir(out, plan.fingerprint())
        if not (out / "run.json").is_file():
            atomic_write_json(out / "run.json", run_info)
    items_df = (pd.concat([frames[p] for p in pairs], ignore_index=True) if pairs
                else pd.DataFrame(columns=ITEM_COLUMNS))
    scores = score_table(items_df, plan, args.reference, args.seed)
    write_results(out, items_df, scores, plan)
    if not args.no_figures:  # before "complete": a run that says so has its figure
        from figures.eval import draw_eval

        draw_eval(out)
    run_info |= {"status": "complete", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": args.seed,
                 "reference": args.reference, "elapsed_s_this_process": round(time.perf_counter() - t0, 3),
                 "parts": assembled}
    atomic_write_json(out / "run.json", run_info)
    print(summary(out / "table.md"))
    print(results_line(out, "eval"))
    return out


def score_table(items: pd.DataFrame, plan: EvalPlan, reference: str | None, seed: int) -> pd.DataFrame:
    """scores.csv: per model × data set × subject (and 'all') the means with bootstrap intervals and, against
    the reference, paired differences on the items both answered."""
    import pandas as pd

    from probe.stats import NAN, bootstrap_mean

    rows = []
    for entry in plan.models:
        for ds in plan.data:
            why = plan.not_applicable.get(f"{entry.name}|{ds.name}", "")
            mine = items[(items["model"] == entry.name) & (items["data"] == ds.name)]
            ref = items[(items["model"] == reference) & (items["data"] == ds.name)] if reference else None
            for subject in [ALL, *ds.subjects]:
                sub = mine if subject == ALL else mine[mine["subject"] == subject]
                # the reference's items of this row: of a mixed set, a text LM reads none of an image subject
                ref_sub = ref if ref is None or subject == ALL else ref[ref["subject"] == subject]
                # one resampling stream per data set, the same for every model (common random numbers): a model's
                # interval depends on its answers only, not on its name or path; 'all' of one subject = it
                key = ds.stream
                n_lost = plan.n_unread(entry.name, ds.name, subject)
                note = ""
                if n_lost:  # the whole row, or the part of it the scores leave out
                    note = why if not len(sub) else f"{n_lost} of {n_lost + len(sub)} items {why}"
                row: dict[str, Any] = {"model": entry.name, "data": ds.name, "subject": subject,
                                       "n_items": int(len(sub)), "note": note}
                for metric, col in (("accuracy", "correct"), ("prob_accuracy", "prob_correct"),
                                    ("p_answer", "p_answer")):
                    iv = bootstrap_mean(sub[col].to_numpy(), seed, f"{key}|{metric}") if len(sub) else NAN
                    row |= {metric: iv.value, f"{metric}_lo": iv.lo, f"{metric}_hi": iv.hi}
                row["note"] = "; ".join(filter(None, [row["note"], all_alike_note(row), alike_p_answer_note(row)]))
                diffs = {"accuracy": NAN, "prob_accuracy": NAN}
                n_paired = None
                if ref_sub is not None and len(sub) and entry.name != reference and len(ref_sub):
                    diffs, n_paired = paired_differences(sub, ref_sub, seed, key)
                    if n_paired < len(sub):  # the reference read fewer: diff ≠ this row's accuracy − the reference's
                        row["note"] = "; ".join(filter(None, [row["note"], f"diff over the {n_paired} of {len(sub)} "
                                                                             f"items {reference} also answered"]))
                elif ref_sub is not None and len(sub) and entry.name != reference:  # the reference read none of the
                    # row's items: say why the diff columns are empty (a text LM as reference on an image set or
                    # on an image subject of a mixed set)
                    ref_why = plan.not_applicable.get(f"{reference}|{ds.name}", f"{reference} answered none of it")
                    row["note"] = "; ".join(filter(None, [row["note"], "no diff: the reference "
                                                          + ref_why.removeprefix("not applicable: ")]))
                row["note"] = "; ".join(filter(None, [row["note"], alike_diff_note(diffs, n_paired)]))
                row |= {"diff_accuracy": diffs["accuracy"].value, "diff_lo": diffs["accuracy"].lo,
                        "diff_hi": diffs["accuracy"].hi, "diff_prob_accuracy": diffs["prob_accuracy"].value,
                        "diff_prob_lo": diffs["prob_accuracy"].lo, "diff_prob_hi": diffs["prob_accuracy"].hi,
                        "diff_n": n_paired}
                rows.append(row)
    return pd.DataFrame.from_records(rows, columns=SCORE_COLUMNS).astype({"diff_n": "Int64"})  # a count, or empty


def paired_differences(items: Any, ref_items: Any, seed: int, stream: str,
                       level: float | None = None) -> tuple[dict[str, Any], int]:
    """Accuracy and probability accuracy of ``items`` minus ``ref_items`` (two models' rows of items.parquet on one
    data set) over the items both answered, with the paired bootstrap intervals of the set's ``stream``
    (``DataSet.stream``), and how many items paired. scores.csv's diff columns, and any comparison of two models of
    a saved run (figures.findings), are these. ``level``: the intervals' (None: probe.stats.LEVEL, 95 %); the same
    resamples at any level."""
    from probe.stats import LEVEL, paired_difference

    # the items both answered; ids need only be unique within a subject (the loader checks)
    paired = items.merge(ref_items, on=["subject", "item_id"], suffixes=("", "_ref"))
    return {metric: paired_difference(paired[col].to_numpy(), paired[f"{col}_ref"].to_numpy(), seed,
                                      f"{stream}|diff|{metric}", level=LEVEL if level is None else level)
            for metric, col in (("accuracy", "correct"), ("prob_accuracy", "prob_correct"))}, len(paired)


def all_alike_note(row: dict[str, Any]) -> str:
    """For a row whose accuracy or probability accuracy is 0 % or 100 % (its bootstrap interval has zero width
    however few the items): the exact 95 % interval such a score allows."""
    from probe.stats import reported_interval

    parts = []
    for value in (1.0, 0.0):
        metrics = [m for m in ("accuracy", "prob_accuracy") if row[m] == value]
        lo, hi = reported_interval(value, value, value, row["n_items"])  # (value, value) for no items
        if metrics and (lo, hi) != (value, value):
            parts.append(f"{' and '.join(metrics)} {'all right' if value else 'all wrong'} (zero-width bootstrap "
                         f"interval, exact 95 % Clopper-Pearson [{100 * lo:.1f}, {100 * hi:.1f}])")
    return "; ".join(parts)


def zero_width(what: str, value: str, n: int, kind: str = "") -> str:
    """The note of a statistic whose bootstrap interval has zero width because its ``n`` values are all alike (one
    item is the extreme case): every resample is the same, so the interval says nothing about the error."""
    where = f"its 1 {kind}item" if n == 1 else f"every one of the {n} {kind}items"
    return f"{what} {value} on {where} (zero-width bootstrap interval: nothing to resample)"


def alike_diff_note(diffs: dict[str, Any], n_paired: int | None) -> str:
    """For a paired difference whose items all differ alike (every pair agrees: 0; or every pair flips the same
    way: ±1), where the bootstrap interval has zero width however few the pairs: say so, so [0, 0] is not read as
    a certain tie."""
    return "; ".join(zero_width(f"diff_{m}", f"{iv.value:+g}", n_paired, "paired ")
                     for m, iv in diffs.items() if n_paired and iv.lo == iv.hi)


def alike_p_answer_note(row: dict[str, Any]) -> str:
    """For a row whose mean p(answer) has a zero-width interval (one item, or every item's p(answer) the same, as a
    saturated bf16 softmax gives): say so. Accuracy and probability accuracy need no such note here: a zero-width
    interval of a rate is 0 % or 100 %, which ``all_alike_note`` covers with the exact interval."""
    if row["n_items"] and row["p_answer_lo"] == row["p_answer_hi"]:  # NaN (not measured) compares unequal
        return zero_width("p_answer", f"{row['p_answer']:.3g}", row["n_items"])
    return ""


# what a † beside a cell means (table.md's legend, and the replication report's)
ALIKE_MARK = "† every item right (or every item wrong): the bootstrap interval has zero width however few the items"


def _cell(r: Any, metric: str, n_lost: int = 0) -> str:
    if r.n_items == 0:
        return "n/a"
    v, lo, hi = getattr(r, metric), getattr(r, f"{metric}_lo"), getattr(r, f"{metric}_hi")
    if v != v:  # NaN: not measured (--no-generate)
        return "—"
    part = f" ({r.n_items} of {r.n_items + n_lost} items)" if n_lost else ""  # not comparable with a whole row
    alike = "†" if v in (0.0, 1.0) else ""  # a zero-width bootstrap interval: see the note
    return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]{alike}{part}"


WIDE_SUBJECTS = 12  # past this many subjects a set's table turns to one row per subject


# what GFM reads as a mark wherever it stands in a line: '\\' escapes, '`' code, '*' emphasis, '$' math (GitHub),
# '<' HTML or an autolink, '[' ']' a link, '&' an entity, '~' strikethrough, '|' a table cell's end
_MD_MARKS = re.compile(r"([\\`*$<>\[\]&~|])")
# '_' opens or closes emphasis only beside a non-alphanumeric: ``image_single`` stays as written
_MD_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")
# what md_text escaped (a mark, or '_'), read back for the terminal; in a table row '|' stays escaped
_MD_ESCAPED = re.compile(r"\\([\\`*$<>\[\]&~|_])")
_MD_ESCAPED_IN_ROW = re.compile(r"\\([\\`*$<>\[\]&~_])")


def md_text(name: str) -> str:
    """A user-chosen name (a model's path, a set's or subject's folder, a run's name) as markdown text that GFM shows
    as written, in a table cell or in prose: each mark character backslash-escaped (``a*b*c`` was a<em>b</em>c,
    ``<b>`` HTML, ``[x](y)`` a link, ``$x$`` math on GitHub, a '|' split the cell in two) and a newline a space (it
    ended the row). Plain names (``organism-vl``, ``image_single``) come back unchanged; scores.csv and the JSON
    files keep every name as given."""
    text = _MD_MARKS.sub(r"\\\1", " ".join(str(name).splitlines()))
    return _MD_UNDERSCORE.sub(r"\\_", text)


def md_code(name: str) -> str:
    """A name as a markdown code span (shown as written: GFM reads no mark inside one), or as ``md_text`` when it
    holds a '`', which would end the span."""
    text = " ".join(str(name).splitlines())
    return md_text(text) if "`" in text or not text.strip() else f"`{text}`"


def markdown_table(scores: Any, plan: EvalPlan, metric: str) -> str:
    """Models × data sets (the paper's layout), then one models × subjects table per data set; a set of more than
    WIDE_SUBJECTS subjects (MMMU's 30, MMLU's 57) gets subjects × models instead, one row per subject, so the table
    stays as wide as the model list rather than a line of 57 cells."""
    names = [ds.name for ds in plan.data]
    lines = [f"| model | {' | '.join(map(md_text, names))} |", "|---" * (len(names) + 1) + "|"]
    top = scores[scores["subject"] == ALL].set_index(["model", "data"])
    for e in plan.models:
        cells = [_cell(top.loc[(e.name, n)], metric, plan.n_unread(e.name, n)) for n in names]
        lines.append(f"| {md_text(e.name)} | {' | '.join(cells)} |")
    blocks = ["\n".join(lines)]
    for ds in plan.data:
        subs = ds.subjects
        sub = scores[scores["data"] == ds.name].set_index(["model", "subject"])
        n = counted(ds.n_items, "item")
        cell = lambda e, s: _cell(sub.loc[(e.name, s)], metric, plan.n_unread(e.name, ds.name, s))  # noqa: E731
        if len(subs) > WIDE_SUBJECTS:
            head = [f"| {md_text(ds.name)} ({n}): subject | {' | '.join(md_text(e.name) for e in plan.models)} |",
                    "|---" * (len(plan.models) + 1) + "|"]
            body = [f"| {md_text(s)} | " + " | ".join(cell(e, s) for e in plan.models) + " |" for s in subs]
        else:
            head = [f"| {md_text(ds.name)} ({n}) | {' | '.join(map(md_text, subs))} |", "|---" * (len(subs) + 1) + "|"]
            body = [f"| {md_text(e.name)} | " + " | ".join(cell(e, s) for s in subs) + " |" for e in plan.models]
        blocks.append("\n".join(head + body))
    return "\n\n".join(blocks)


def write_results(out: Path, items: Any, scores: Any, plan: EvalPlan) -> None:
    from probe.results import atomic_write_bytes, atomic_write_parquet

    atomic_write_parquet(out / "items.parquet", items)
    atomic_write_bytes(out / "scores.csv", scores.to_csv(index=False).encode())
    metric = "accuracy" if plan.settings["generate"] else "prob_accuracy"
    title = "accuracy" if metric == "accuracy" else "probability accuracy"
    top = scores[scores["subject"] == ALL]
    whole = sorted({r.note for r in top.itertuples() if r.n_items == 0 and r.note})
    # "scored on N items" only where the model left some of the set out (its cells say "N of M items" too); a row
    # scored on the whole set that has a note (a 100 % score, a diff note) gives the note alone; a note names models
    # (the one that cannot read a set, the reference), so it goes in through md_text as they do
    part = [f"- {md_text(r.model)} on {md_text(r.data)}: {'scored on %d items; ' % r.n_items if plan.n_unread(r.model, r.data) else ''}"
            f"{md_text(r.note)}\n" for r in top.itertuples() if r.n_items > 0 and r.note]
    # MMMU's own scores count open-ended items too: a set's "(N items)" is not its size when some were left out
    skipped = [f"- {md_text(ds.name)}: {ds.n_skipped_open} open-ended items skipped; scores are over its {ds.n_items} "
               "multiple-choice items\n" for ds in plan.data if ds.n_skipped_open]
    alike = [f"- {ALIKE_MARK}; scores.csv's note gives the exact 95 % (Clopper-Pearson) interval\n"
             ] if scores[metric].isin([0.0, 1.0]).any() else []
    text = (f"# Evaluation: {title} in %, 95 % bootstrap interval\n\n{markdown_table(scores, plan, metric)}\n\n"
            + "".join(f"- n/a: {md_text(n.removeprefix('not applicable: '))}\n" for n in whole) + "".join(part)
            + "".join(skipped) + "".join(alike))
    atomic_write_bytes(out / "table.md", text.encode())


def summary(table_md: Path) -> str:
    """What a finished run prints of its table.md: the heading (which metric: with --no-generate it is the
    probability accuracy), the models × data sets table and the notes that say what its n/a and † cells mean; the
    per-subject tables stay in the file."""
    blocks = table_md.read_text(encoding="utf-8").strip().split("\n\n")
    notes = [blocks[-1]] if blocks[-1].startswith("- ") else []
    text = "\n".join([blocks[0].removeprefix("# ") + ":", blocks[1], *notes])
    return "\n".join(map(_terminal_text, text.splitlines()))


def _terminal_text(line: str) -> str:
    """A line of table.md as a terminal shows it: ``md_text``'s escapes undone (``\\[39.8, 100.0\\]`` was printed
    as such), but for a table row's ``\\|``, which keeps the row's cells apart."""
    return (_MD_ESCAPED_IN_ROW if line.startswith("|") else _MD_ESCAPED).sub(r"\1", line)


@says_out_of_memory()
def evaluate(**options: Any) -> Any:
    """The evaluation from Python, e.g. ``evaluate(models=["organism-base", "organism-vl"], data=["probe/zoo/data/
    text"], limit=16, reference="organism-base", out="runs/eval")``: the options of ``python -m probe.eval --help``
    as keywords (a list for several values, True for a flag). Resumes or refuses an existing --out as the command
    does. Returns the finished run read back, a ``figures.results.EvalRun`` (``.scores``, ``.items``,
    ``.row(model, data)``, ``.paired(model, reference, data)``); bad input raises ``probe.errors.BadInput``.

    Under ``torchrun`` (RANK / WORLD_SIZE set; each rank calls ``evaluate`` with the same options) every rank
    evaluates its (model, data set) pairs and the last to finish assembles the outputs, as on the command line; rank
    0 then waits for that assembly (``probe.results.read_on_rank_0``) and returns the EvalRun, and every other rank
    returns None once its own pairs are written. Rank 0 waits as long as the other ranks run: launch them together
    (torchrun does), not one after another from one process."""
    from figures.results import EvalRun
    from probe.results import read_on_rank_0

    return read_on_rank_0(run(parse_options(build_parser(), options)), EvalRun.read, pair_parts)


def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
