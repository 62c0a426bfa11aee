"""``python -m probe.heads``: mask one attention head at a time and measure MMMU salience (paper §5.2, Fig. 2).

Writes DIR/heads.csv, baseline.json, items.parquet, heatmap_{accuracy,prob_accuracy,kl}.{png,pdf}, run.json.
Resumable: the same command after a kill continues from the finished chunks.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import platform
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from probe.errors import (ArgParser, BadInput, ascii_int, check_counts, check_out_apart, cli_main, in_path, out_dir,
                          parse_options, releases_claims, says_out_of_memory, undone_on_bad_input)
from probe.devices import outside_inference_mode
from probe.families import ALIASES

if TYPE_CHECKING:  # annotations only: the command imports the model code when it runs, not for --help
    from probe.batch import BatchLimit
    from probe.devices import Placement
    from probe.mmmu import Item
    from probe.models import ModelRef
    from probe.prompting import PromptTemplate

DEFAULT_MODEL = "organism-vl"
DEFAULT_OUT = "runs/heads"
METHODS = ("exact", "naive", "attribution")


def parse_index_spec(spec: str, n: int, what: str) -> list[int]:
    """'all' | '3' | '0-3,7' → sorted indices, each checked against 0..n-1."""
    if spec.strip().lower() == "all":
        return list(range(n))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            first = ascii_int(lo)  # int() read '٣' as 3
            last = ascii_int(hi) if dash else first
        except ValueError:
            raise BadInput(f"bad --{what}s spec {spec!r}: use 'all', '3', or '0-3,7'") from None
        if last < first:  # '3-1' used to select nothing and pass silently beside other parts ('0,3-1' → [0])
            raise BadInput(f"bad --{what}s spec {spec!r}: range {part!r} ends below its start")
        for i in range(first, last + 1):
            if not 0 <= i < n:
                raise BadInput(f"{what} {i} out of range 0..{n - 1}")
            out.add(i)
    return sorted(out)


def default_data_for(model_spec: str) -> Path:
    """An organism's own bundled validation set; the synthetic MMMU-format set for anything else."""
    if (name := organism_of(model_spec)) is not None:
        from probe.zoo import organism_validation_dir

        return organism_validation_dir(name)
    from probe.synthetic import default_data_dir

    return default_data_dir()


def organism_of(model_spec: str) -> str | None:
    """The shipped organism (``vl``, …) a model is, named by its alias or by its directory however typed (relative,
    ``DIR/``, a link: ``model_location``), else None: one model, one default data set. Its directory had the
    synthetic set, its alias its own, so a resume typing the model the other way was another run."""
    alias = ALIASES.get(model_spec)
    if alias is not None:
        kind, _, name = alias.source.partition(":")
        return name if kind == "organism" else None
    from probe.models import model_location
    from probe.zoo import ORGANISMS, organisms_root

    where = Path(model_location(model_spec))
    return next((n for n in ORGANISMS if where == (organisms_root() / f"organism-{n}").resolve()), None)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults only where they say something (not None / False; a default of 0 is shown)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="python -m probe.heads",
        examples=["python -m probe.heads                                   # the embedded default: organism-vl on its image set",
                  "python -m probe.heads --model qwen2-vl --data mmmu --split validation --out runs/qwen2-vl",
                  "python -m probe.heads --model organism-base --data probe/zoo/data/text --layers 0-1 --no-generate",
                  "torchrun --nproc-per-node 8 -m probe.heads --model qwen2-vl --data mmmu --batch-size 28 --out runs/qwen2-vl-mmmu",
                  "python -m figures heads runs/heads                      # redraw the heatmaps from the saved files"],
        description="Mask each attention head of the LLM decoder in turn and measure accuracy, "
        "probability accuracy and KL(orig||masked) on MMMU multiple-choice items. Writes OUT/heads.csv (one row "
        "per head), baseline.json, items.parquet (per item × head), heatmap_{accuracy,prob_accuracy,kl}.{png,pdf} "
        "and run.json; a killed run resumes from OUT/parts/.",
        formatter_class=_Help,
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"alias ({', '.join(ALIASES)}) or a local HF model dir (or a .gguf file)")
    p.add_argument("--data", default=None,
                   help="MMMU root dir (<root>/<Subject>/<split>[-*].parquet) or 'mmmu' for the HF cache; "
                   "default: the model's own bundled validation set (organisms) or the synthetic MMMU-format set")
    p.add_argument("--split", default="validation", help="dataset split")
    p.add_argument("--subjects", nargs="+", default=None, help="subject folders to use (default: all)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N multiple-choice items (default: all)")
    p.add_argument("--layers", default="all", help="layers to sweep: 'all', '3', '0-3,7'")
    p.add_argument("--heads", default="all", help="query heads to sweep in each layer: 'all', '0-3,7'")
    p.add_argument("--method", choices=METHODS, default="exact",
                   help="exact: cached-residual batched sweep; naive: one full run per head (oracle); "
                   "attribution: first-order gradient estimate (approximate)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="masked rows per forward (exact engine); halved for the rest of the run where a batch runs "
                        "out of memory")
    p.add_argument("--attribution-items", type=int, default=1,
                   help="items per forward + backward of --method attribution; several are right-padded into one "
                        "pass, same numbers, more memory (README, On GPUs); halved where a pass runs out of memory")
    add_placement_args(p, "masking does not depend on it; recorded with the results")
    p.add_argument("--no-generate", action="store_true",
                   help="skip greedy generation: accuracy left empty (NaN), much faster (prob_accuracy and KL only)")
    add_prompt_args(p)
    p.add_argument("--chunk-size", type=int, default=8, help="items per resumable unit of work")
    add_run_args(p, DEFAULT_OUT, "heatmaps")
    return p


@dataclass(frozen=True)
class Plan:
    """Everything validated before a weight is loaded (STYLE 5)."""

    model_spec: str
    model_path: str
    model_fingerprint: str  # the weights (probe.models.model_fingerprint): a model changed in place is another run
    family: str
    n_layers: int
    n_heads: int
    layers: list[int]
    heads: list[int]
    data_dir: str
    data_fingerprint: str
    n_items: int
    n_skipped_open: int
    subjects: list[str]
    method: str
    template: dict[str, str]
    # the turn markup the template is wrapped in (probe.prompting.planned_chat_format): chosen by the tokenizer's
    # vocabulary too, so parts scored under one format are never resumed under another
    chat_format: dict[str, Any]
    settings: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        """What the fingerprint digests (``plan_identity`` of the plan)."""
        return plan_identity(asdict(self))

    def fingerprint(self) -> str:
        """The plan's digest (``identity``)."""
        from probe.results import json_digest

        return json_digest(self.identity())


def plan_identity(plan: dict[str, Any]) -> dict[str, Any]:
    """What a plan (``asdict(Plan)``, as run.json keeps it) is as a run's identity, by probe.eval's rule
    (``probe.eval.plan_identity``): its model and data by where they are, not as typed (``model_location``,
    ``data_location``: relative, absolute, ``./x/``, a link are one place). The model's name (``model_spec``) is
    left out: it labels baseline.json and the heatmaps and decides no number (the weights are ``model_path``'s and
    ``model_fingerprint``'s, the default data its directory's, ``organism_of``), so a resume that names it otherwise
    (its alias or its directory, ``DIR/``) continues, labelled as now. It was kept as typed: such a resume was
    refused, and a refusal of another change named ``model_spec`` too. A refusal names what differs here
    (``probe.results.different_run``)."""
    from probe.mmmu import data_location
    from probe.models import model_location
    from probe.results import as_computed

    plan = {k: v for k, v in plan.items() if k != "model_spec"} | {"model_path": model_location(plan["model_path"])}
    return as_computed(plan | {"data_dir": data_location(plan["data_dir"])})  # probe.eval's rule for a moved run


def load_template(args: argparse.Namespace) -> PromptTemplate:
    from probe.prompting import PromptTemplate

    template = PromptTemplate()
    if args.template is not None:
        try:
            fields = json.loads(args.template.read_text(encoding="utf-8"))
            if not isinstance(fields, dict):
                raise TypeError(f"want a JSON object of PromptTemplate fields, got {type(fields).__name__}")
            template = PromptTemplate.from_dict(fields)
            template.check()
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
            raise BadInput(f"--template {args.template}: {exc}") from None
    if args.system_prompt is not None:
        template = PromptTemplate(**(template.to_dict() | {"system": args.system_prompt}))
    return template


def add_run_args(p: argparse.ArgumentParser, default_out: str, figures: str) -> None:
    """Where a resumable run goes and how loud it is (probe.heads, probe.eval)."""
    p.add_argument("--out", type=out_dir, default=Path(default_out), help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the run already in --out (parts/ and the files named above; nothing else is "
                   "deleted); without it the same run resumes and a different one is refused")
    p.add_argument("--no-figures", action="store_true", help=f"do not draw {figures}")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """How items become prompts and answers, shared by probe.heads and probe.eval (one prompt builder)."""
    p.add_argument("--max-new-tokens", type=int, default=5, help="tokens generated for the accuracy parser")
    p.add_argument("--image-max-side", type=int, default=None,
                   help="downscale images so the longer side is at most this many pixels (default: as they are)")
    p.add_argument("--system-prompt", default=None,
                   help="replace the template's system prompt (default: the template's own; the built-in one asks "
                   "for the option's letter only)")
    p.add_argument("--template", type=in_path, default=None,
                   help="JSON file with PromptTemplate fields (system, user, choice, assistant_prefix); a field left "
                   "out keeps its built-in value (default: the built-in template, probe.prompting.PromptTemplate)")


def add_placement_args(p: argparse.ArgumentParser, attn_note: str) -> None:
    """--device / --dtype / --attn-implementation, shared by every command that runs a model (probe.devices)."""
    p.add_argument("--device", default="auto",
                   help="auto (this process's GPUs: all visible ones, under torchrun the rank's share; several → "
                        "one model split by layers; no GPU → cpu), cpu, cuda, cuda:1, or a list cuda:0,cuda:1")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16, float16")
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                   help=f"attention kernel ({attn_note})")


def make_plan(args: argparse.Namespace) -> tuple[Plan, ModelRef, list[Item], PromptTemplate, Placement]:
    from probe.devices import resolve_placement
    from probe.mmmu import load_items
    from probe.models import model_fingerprint, resolve_model
    from probe.prompting import check_modalities, check_prompts, planned_chat_format

    check_counts(args, ("limit", "batch_size", "attribution_items", "chunk_size", "max_new_tokens", "image_max_side"))
    placement = resolve_placement(args.device, args.dtype, args.attn_implementation)
    ref = resolve_model(args.model)
    g = ref.geometry
    layers = parse_index_spec(args.layers, g.n_layers, "layer")
    heads = parse_index_spec(args.heads, g.n_heads, "head")
    data = args.data if args.data is not None else str(default_data_for(args.model))
    items, report = load_items(data, split=args.split, subjects=args.subjects, limit=args.limit)
    try:
        check_modalities(ref, items)
    except BadInput as e:
        if args.data is not None:
            raise
        # the default set, not an item the user chose: a text LM (smollm2-135m, tiny-qwen2, …) cannot read it
        raise BadInput(f"--model {args.model} reads {' and '.join(ref.family.modalities)} only, and the default "
                       f"data (the bundled synthetic MMMU-format set) holds image items: give --data, e.g. "
                       f"--data probe/zoo/data/text") from e
    template = load_template(args)
    tokenizer = check_prompts(ref, items, template)
    settings = {
        "dtype": placement.dtype, "device_type": placement.device_type,
        "attn_implementation": args.attn_implementation, "generate": not args.no_generate,
        "max_new_tokens": args.max_new_tokens, "image_max_side": args.image_max_side,
        "split": args.split, "limit": args.limit, "chunk_size": args.chunk_size,
    }
    plan = Plan(
        model_spec=args.model, model_path=str(ref.path), model_fingerprint=model_fingerprint(ref),
        family=ref.family.name, n_layers=g.n_layers,
        n_heads=g.n_heads, layers=layers, heads=heads, data_dir=str(data),
        data_fingerprint=report.fingerprint, n_items=len(items), n_skipped_open=report.n_skipped_open,
        subjects=list(report.subjects), method=args.method, template=template.to_dict(),
        chat_format=planned_chat_format(ref, tokenizer), settings=settings,
    )
    return plan, ref, items, template, placement


def versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__, "omniprobe": "0.1.0",
            "omniprobe_code": code_digest()}


@functools.cache  # once per process: the source it runs, not edits made on disk while it runs
def code_digest() -> str:
    """A digest of the toolkit's own source (probe/ and analyses/ .py files): its version number stays 0.1.0
    across edits and upgrades, so this is what tells a resume that the code computing its parts changed."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(p for pkg in ("probe", "analyses") for p in (root / pkg).rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# what a run's numbers depend on: kernels, processors, rope (torch, transformers) and the toolkit's own code
SOFTWARE = ("torch", "transformers", "omniprobe_code")


def saved_run_info(out: Path) -> dict[str, Any]:
    """The run.json a resumed run left (empty when unreadable: prepare_out_dir has already vouched for it)."""
    from probe.results import read_run_json

    saved = read_run_json(out)
    return saved if isinstance(saved, dict) else {}


def software_differences(saved: Any, now: dict[str, str]) -> list[str]:
    """The SOFTWARE keys whose recorded version is not this process's; none for a record that holds no versions,
    and no code digest compared for one made before it was recorded."""
    if not isinstance(saved, dict):
        return []
    return [k for k in SOFTWARE if (k in saved or k != "omniprobe_code") and saved.get(k) != now.get(k)]


def check_same_software(out: Path, saved: Any, now: dict[str, str]) -> None:
    """A resume that computes parts must run the torch, transformers and omniprobe code its finished parts ran: an
    upgrade between the kill and the resume would mix two versions' numbers in one table, and run.json would name
    only the last. (A run.json from before the code digest was recorded is checked on the other two.)"""
    if differ := software_differences(saved, now):
        then = ", ".join(f"{k} {saved.get(k)}" for k in differ)
        raise BadInput(f"--out {out} holds parts computed under {then}, but this process runs "
                       f"{', '.join(f'{k} {now.get(k)}' for k in differ)}: the table would mix both versions' "
                       f"numbers; resume under {then}, or pass --overwrite")


def run_versions(out: Path, saved: dict[str, Any], computes: bool, kept: bool) -> dict[str, str]:
    """The versions run.json records: this process's, checked against those of the parts a resume keeps when it
    computes beside them; a resume that computes nothing keeps its parts' versions on record."""
    now = versions()
    if computes and kept:
        check_same_software(out, saved.get("versions"), now)
    elif not computes and isinstance(saved.get("versions"), dict):
        return saved["versions"]
    return now


def check_out_not_model(out: Path, model_dirs: Sequence[Path]) -> None:
    """--out must not be a model's own directory: the run's files would join the model's and change its
    fingerprint (a folder inside it is fine: the fingerprint reads the model's own files only)."""
    for path in model_dirs:
        if out.resolve() == Path(path).resolve():
            raise BadInput(f"--out {out} is the directory of model {path}: the run's files would join the model's "
                           "and change its fingerprint; use a folder inside it or elsewhere")


def check_out_apart_from_inputs(out: Path, model_dirs: Sequence[Path], data: Sequence[str],
                                template: Path | None) -> None:
    """--out is neither a model's directory (``check_out_not_model``) nor one that holds a model, a data set or
    the template, nor inside a data set (``probe.errors.check_out_apart``). ``data``: the sets as given (``mmmu``,
    the hub's cache, is left to the hub)."""
    check_out_not_model(out, model_dirs)
    local = [d for d in data if d.lower() != "mmmu"]
    check_out_apart(out, [*(("model", m) for m in model_dirs), *(("data set", d) for d in local),
                          *([("template", template)] if template is not None else [])], data=local)


@releases_claims
@undone_on_bad_input
@outside_inference_mode  # a notebook's inference_mode: the attribution engine's backward needs a graph
def run(args: argparse.Namespace) -> Path:
    """The sweep of parsed arguments (``build_parser``'s); returns its --out once complete. From Python,
    ``sweep(**options)`` takes the options as keywords and returns the result read back."""
    from probe.devices import rank_world
    from probe.results import (atomic_write_json, check_part_rows, check_part_run, check_same_run_on_every_rank,
                               claim_out_dir, part_path, parts_signature, prepare_out_dir, read_part, read_parts,
                               stop_recorded, write_outputs)

    plan, ref, items, template, placement = make_plan(args)
    out: Path = args.out
    check_out_apart_from_inputs(out, [ref.path], [plan.data_dir], args.template)
    rank, world = rank_world()
    check_same_run_on_every_rank(plan.identity())  # before --out is looked at or written
    resumed = prepare_out_dir(out, plan.fingerprint(), args.overwrite, command="probe.heads", plan=asdict(plan),
                              identity=plan_identity)
    if args.attribution_items != 1 and plan.method != "attribution":  # after the checks: bad input stays one line
        print(f"warning: --attribution-items {args.attribution_items} has no effect with --method {plan.method}",
              file=sys.stderr)
    saved = saved_run_info(out) if resumed else {}
    device = placement.device

    chunks = [items[i:i + args.chunk_size] for i in range(0, len(items), args.chunk_size)]
    todo = [c for c in range(len(chunks)) if c % world == rank and not part_path(out, c).is_file()]
    pairs = [(l, h) for l in plan.layers for h in plan.heads]

    def check_chunk(c: int, df: Any) -> None:
        """A part holds the chunk's rows: each item's baseline and one per swept head. A readable part of other rows
        (another run's, an edited file) was summarised as this run's: a baseline of 1 item beside heads of 2."""
        from probe.sweep import BASELINE

        check_part_run(part_path(out, c), plan.fingerprint())
        check_part_rows(part_path(out, c), df, ["subject", "item_id", "layer", "head"],
                        [(it.subject, it.id, l, h) for it in chunks[c] for l, h in [(BASELINE, BASELINE), *pairs]],
                        "(item, head) rows of that chunk")

    # the parts a resume keeps, read and checked now (a damaged one is named before hours run) and kept for the end
    kept = {c: read_part(part_path(out, c)) for c in range(len(chunks)) if part_path(out, c).is_file()}
    for c, df in kept.items():
        check_chunk(c, df)
    run_info = {
        "command": "probe.heads", "fingerprint": plan.fingerprint(), "plan": asdict(plan),
        "versions": run_versions(out, saved, bool(todo), bool(kept)),
        # plan.model_path is the spec's path as given, relative to this process's cwd: analyses.merge, run elsewhere,
        # matches a salience run to its model by this one (outside the plan: old runs resume as before)
        "model_resolved_path": str(ref.path.resolve()),
        "argv": sys.argv[1:], "approximate": plan.method == "attribution",
        "placement": placement.record(),
        "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # per process that computed parts (another rank's, or a run's it resumed, too): its chunks, the batch size asked
    # (--batch-size, or --attribution-items), the largest batch that ran and the size an out-of-memory back-off left
    # (BatchLimit.record), each chunk's kept in its part (chunk_batching). Outside the plan: how the numbers were
    # batched, not what was asked (they move in the last bits, as --batch-size does)
    batching = run_info["batching"] = chunk_batching(out, len(chunks), saved.get("batching"))
    t0 = time.perf_counter()
    if todo:
        from probe.models import check_fits, load_model
        from probe.sweep import SweepConfig, get_engine
        from probe.results import atomic_write_parquet
        import pandas as pd

        if resuming := (out / "run.json").is_file():  # claimed at once: the same command started twice would
            claim_out_dir(out, plan.fingerprint())  # otherwise compute the same parts side by side
        with stop_recorded(out, run_info):  # a check that stops the run says so in run.json
            check_fits(ref, placement.dtype, placement.all_devices, placement.device_memory, placement.memory_kind)
            # on stdout, as progress: a refusal as the model loads, or at the claim after it, is stderr's one line
            print(placement.description, flush=True)
            loaded = load_model(ref, dtype=placement.dtype, device=device, attn_implementation=args.attn_implementation,
                                devices=placement.all_devices, device_memory=placement.device_memory,
                                memory_kind=placement.memory_kind)
            if not resuming:  # only once the model loaded: failures leave no directory
                claim_out_dir(out, plan.fingerprint())
                atomic_write_json(out / "run.json", run_info)
            cfg = SweepConfig(template=template, generate=not args.no_generate, max_new_tokens=args.max_new_tokens,
                              image_max_side=args.image_max_side, batch_size=args.batch_size,
                              attribution_items=args.attribution_items)
            engine = get_engine(plan.method)
            if plan.method == "exact":
                from probe.upstream import untested_warning

                if warning := untested_warning():
                    print(warning, file=sys.stderr)
            bar = _progress(sum(len(chunks[c]) for c in todo) * (len(pairs) + 1), args.quiet,
                            f"{ref.family.name} {plan.method}")
            limit = batch_limit(plan.method, args, bar)
            extra = {"limit": limit} if limit is not None else {}
            if limit is not None:  # this process's entry, kept up to date (a stopped run's run.json shows it too)
                batching.append(ran := {"chunks": []} | limit.record())
            process = uuid.uuid4().hex  # which chunks' records are this process's (chunk_batching)
            for c in todo:
                rows = engine(loaded, chunks[c], pairs, cfg, progress=bar.update, **extra)
                record = None if limit is None else {"process": process} | limit.record()
                # the record with the rows, in one rename: the rank that assembles reads it back
                atomic_write_parquet(part_path(out, c), pd.DataFrame.from_records(rows), record=record,
                                     run=plan.fingerprint())
                if limit is not None:
                    ran |= {"chunks": ran["chunks"] + [c]} | limit.record()
        bar.close()
    missing = [c for c in range(len(chunks)) if not part_path(out, c).is_file()]
    if missing:  # other ranks still working; the last one to finish assembles
        print(f"rank {rank}: done; waiting for {len(missing)} chunks from other ranks", file=sys.stderr)
        return out
    if not todo:  # a resume with nothing to compute still rewrites the outputs and run.json: it holds the dir too
        claim_out_dir(out, plan.fingerprint())
    assembled = parts_signature(chunk_parts(out, run_info))  # the parts read here (rank 0's sweep() waits for it)
    items_df = read_parts(out, range(len(chunks)), check_chunk, kept)  # this run's and other ranks' parts too
    run_info["batching"] = chunk_batching(out, len(chunks), saved.get("batching"))  # other ranks' too
    heads = write_outputs(out, items_df, {"n_skipped_open": plan.n_skipped_open, "method": plan.method,
                                          "model": plan.model_spec, "approximate": plan.method == "attribution",
                                          "data": Path(plan.data_dir).name, "split": plan.settings["split"]})
    if not args.no_figures:  # before "complete": a run that says so has its figures
        from figures.heads import draw_heads

        draw_heads(out)
    run_info |= {"status": "complete", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "elapsed_s_this_process": round(time.perf_counter() - t0, 3), "parts": assembled}
    if resumed:
        run_info["started"] = saved.get("started")
    atomic_write_json(out / "run.json", run_info)
    _print_summary(out, heads)
    return out


def chunk_batching(out: Path, n_chunks: int, saved: Any) -> list[dict[str, Any]]:
    """run.json's ``batching``: one entry per process whose chunks' parts are on disk (whichever rank or run computed
    them), in the order of its first chunk: ``{"chunks": [...]}`` and its ``BatchLimit.record`` as of its last chunk
    there (each part keeps the record its process had when it wrote it, ``probe.results.part_record``). Parts written
    before parts kept one keep the entries of the run.json resumed (``saved``, its ``batching``), cut to those
    chunks, first."""
    from probe.results import part_path, part_record

    on_disk = [c for c in range(n_chunks) if part_path(out, c).is_file()]
    records = {c: part_record(part_path(out, c)) for c in on_disk}
    unrecorded = {c for c, r in records.items() if r is None or not isinstance(r.get("process"), str)}
    kept = [e for e in saved if isinstance(e, dict) and isinstance(e.get("chunks"), list)] if isinstance(
        saved, list) else []
    old = [e | {"chunks": [c for c in e["chunks"] if c in unrecorded]} for e in kept]
    processes: dict[str, dict[str, Any]] = {}
    for c in on_disk:
        if c not in unrecorded:
            entry = processes.setdefault(records[c]["process"], {"chunks": []})
            entry |= {"chunks": entry["chunks"] + [c]} | {k: v for k, v in records[c].items() if k != "process"}
    return [e for e in old if e["chunks"]] + list(processes.values())


def batch_limit(method: str, args: argparse.Namespace, bar: Any) -> BatchLimit | None:
    """The batch cap the exact and attribution engines share over this process's chunks (``probe.batch.BatchLimit``:
    halved where a batch runs out of memory, for the rest of the run), its back-off lines written past the progress
    bar unless --quiet, as probe.eval does; None for the naive engine, which runs one row a forward."""
    from probe.batch import BatchLimit, past_bar

    say = past_bar(bar, args.quiet)
    if method == "exact":
        return BatchLimit(args.batch_size, say, unit="masked rows", scope="this run")
    if method == "attribution":
        return BatchLimit(args.attribution_items, say, scope="this run")
    return None


def _progress(total: int, quiet: bool, desc: str, unit: str = "run"):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=quiet, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def _print_summary(out: Path, heads) -> None:
    from probe.results import results_line

    base = json.loads((out / "baseline.json").read_text(encoding="utf-8"))
    acc = base["accuracy"]
    estimated = base.get("method") == "attribution"
    why = "attribution estimates no generated text" if estimated else "--no-generate"
    acc = f"n/a ({why})" if acc is None or acc != acc else f"{acc:.3f}"  # null when nothing was generated
    print(f"baseline: accuracy {acc}  prob_accuracy {base['prob_accuracy']:.3f}  "
          f"n_items {base['n_items']}  (skipped open-ended: {base['n_skipped_open']})")
    if len(heads):
        # a drop is a multiple of 1/n: on few items most heads tie, and KL says which of them moved the answer most
        worst = heads.sort_values(["prob_accuracy_drop", "kl"], ascending=False, kind="stable").head(3)
        for r in worst.itertuples():
            print(f"  L{r.layer}.H{r.head}: prob_accuracy {r.prob_accuracy:.3f} "
                  f"(drop {r.prob_accuracy_drop:+.3f}), KL {r.kl:.4f}"
                  + (" [attribution estimate]" if estimated else ""))  # as the heatmaps' titles mark it
    print(results_line(out, "heads"))


def chunk_parts(out: Path, info: dict) -> list[Path]:
    """The part files of the run whose run.json (or run_info) is ``info``: one per chunk of its plan's items. What
    the assembly's run.json signs (``probe.results.parts_signature``), and rank 0 of ``sweep`` waits for."""
    from probe.results import part_path

    plan = info["plan"]
    return [part_path(out, c) for c in range(-(-int(plan["n_items"]) // int(plan["settings"]["chunk_size"])))]


@says_out_of_memory()
def sweep(**options: Any) -> Any:
    """The head sweep from Python, e.g. ``sweep(model="organism-vl", limit=16, layers="0-1", out="runs/h")``: the
    options of ``python -m probe.heads --help`` as keywords (``batch_size=8`` for ``--batch-size 8``, True for a
    flag; none: the embedded default into runs/heads). Resumes or refuses an existing --out as the command does.
    Returns the finished sweep read back, a ``figures.results.HeadSweep`` (``.heads``, ``.baseline``, ``.items``,
    ``.grid(metric)``); bad input raises ``probe.errors.BadInput`` where the command exits 2, an unknown keyword
    ``TypeError``.

    Under ``torchrun`` (RANK / WORLD_SIZE set; each rank calls ``sweep`` with the same options) every rank computes
    its chunks and the last to finish assembles the outputs, as on the command line; rank 0 then waits for that
    assembly (``probe.results.read_on_rank_0``) and returns the HeadSweep, and every other rank returns None once
    its own chunks are written. Rank 0 waits as long as the other ranks run: launch them together (torchrun does),
    not one after another from one process."""
    from figures.results import HeadSweep
    from probe.results import read_on_rank_0

    return read_on_rank_0(run(parse_options(build_parser(), options)), HeadSweep.read, chunk_parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
