"""python -m probe.zoo build --out DIR [--quick] [--steps N] [--seed S] [--exclude-validation] [--ship]
python -m probe.zoo data --out DIR [--n 24] [--seed 1] [--split train]"""
from __future__ import annotations

from pathlib import Path

from probe.errors import ArgParser, out_dir


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="python -m probe.zoo", description="Build the trained tiny organisms (build) or write fresh "
                    "items of their tasks (data); each subcommand's --help says what it writes where.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    build_help = ("regenerate data and organisms (deterministic on one machine; another CPU rounds differently and "
                  "trains other weights)")
    b = sub.add_parser("build", help=build_help, description=f"Build the trained tiny organisms: {build_help}. "
                       "Writes DIR/data/, DIR/organism-{base,vl,ov-si,video}/ and DIR/quality.json; --ship copies "
                       "them into the package.",
                       examples=["python -m probe.zoo build --out runs/zoo --quick     # CI smoke test: tiny data, 20 steps",
                                 "python -m probe.zoo build --out runs/zoo-held-out --exclude-validation",
                                 "python -m probe.eval --models runs/zoo/organism-vl --data probe/zoo/data/image"])
    b.add_argument("--out", type=out_dir, required=True, metavar="DIR",
                   help="where data/, organism-*/ and quality.json are written")
    b.add_argument("--quick", action="store_true", help="tiny data and few steps (CI smoke test)")
    b.add_argument("--steps", type=int, default=None, help="override the training steps of every organism: N per "
                   "stage, and at most N of the vision tower's pretraining (default: each organism's recipe; --quick: 20 "
                   "per stage)")
    b.add_argument("--seed", type=int, default=0, help="seed of the data, initialisation and training (default: 0)")
    b.add_argument("--threads", type=int, default=2,
                   help="CPU threads (default: 2): organism-base trains on all; the three extensions on threads // 2 "
                   "each, in two processes at once when there are two or more")
    b.add_argument("--reuse", action="store_true",
                   help="keep the data and the organisms already built in --out from the same seed, sizes, "
                   "--exclude-validation and recipe (resume an interrupted build); anything else is rebuilt")
    b.add_argument("--only", nargs="+", choices=("base", "vl", "ov-si", "video"), default=None,
                   help="build only these organisms (the others must already be in --out; with --reuse) (default: "
                   "all four)")
    b.add_argument("--exclude-validation", action="store_true",
                   help="train on the train splits less every validation item of any set, to measure how the "
                   "organisms generalise to what they never saw (the shipped organisms are built without it: three "
                   "subjects are closed sets the train split enumerates whole; README, \"How held out\")")
    b.add_argument("--ship", action="store_true", help="copy the result into the package (maintainers); refused "
                   "when an organism misses the 90 %% bar on its own modality")
    data_help = ("fresh MMMU-format items of the organisms' tasks, none of them a validation item of any set (e.g. a "
                 "train split to fine-tune on; the shipped sets are validation only)")
    d = sub.add_parser("data", help=data_help, description=f"Write {data_help}, and print the four set "
                       "directories.",
                       examples=["python -m probe.zoo data --out runs/data",
                                 "python -m analyses.finetune --model organism-vl --data image=runs/data/image "
                                 "--steps 50 --out runs/ft-image"])
    d.add_argument("--out", type=out_dir, required=True, metavar="DIR",
                   help="where text/, image/, image_single/ and video/ are written (must not exist yet)")
    d.add_argument("--n", type=int, default=24, help="items per subject (default: 24)")
    d.add_argument("--seed", type=int, default=1,
                   help="seed of the generators (default: 1; the shipped validation sets are seed 0)")
    d.add_argument("--split", default="train", help="split name of the files (default: train)")
    args = ap.parse_args(argv)
    from probe.errors import BadInput, check_counts
    from probe.zoo.build import build, ship

    if args.cmd == "data":
        return make_data(args.out, args.n, args.seed, args.split)

    check_counts(args, ("steps", "threads"))
    if args.seed < 0:
        raise BadInput(f"--seed must be ≥ 0, got {args.seed}")
    check_build_out(args.out)
    build(args.out, quick=args.quick, steps=args.steps, seed=args.seed, threads=args.threads, reuse=args.reuse,
          only=args.only, exclude_validation=args.exclude_validation)
    if args.ship:
        ship(args.out)
    return 0


def check_build_out(out: Path, hint: str = "build elsewhere, then --ship copies it in") -> None:
    """A build writes data/ and organism-*/ into ``out``: a directory, and not the package's own zoo (the shipped
    organisms and validation sets change only through --ship, which holds a build to the bar first). ``data``
    writes there neither: it reads the shipped validation sets (to leave their items out), and its folders inside
    one of them read as a subject without data files, which stopped every command reading that set."""
    from probe.errors import BadInput, check_out_path
    from probe.zoo import package_root

    check_out_path(out)
    zoo = package_root().resolve()
    if out.resolve() == zoo or zoo in out.resolve().parents:
        raise BadInput(f"--out {out} is inside the package's zoo ({zoo}); {hint}")


def make_data(out: Path, n: int, seed: int, split: str) -> int:
    """``probe.zoo data``: the organisms' generators into a new dir, written whole or not at all."""
    import re
    import shutil

    from probe.errors import BadInput
    from probe.results import partial_path
    from probe.zoo.build import build_fresh_data

    if n < 1 or seed < 0 or not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise BadInput(f"--n must be ≥ 1, --seed ≥ 0 and --split a plain name, got {n}, {seed}, {split!r}")
    check_build_out(out, "its shipped organisms and validation sets are never written to: pick a directory "
                    "elsewhere")
    if out.exists():
        raise BadInput(f"--out {out} exists; pick a new directory")
    remove_stale_partials(out)
    tmp = partial_path(out)  # two runs at once never share it; --out is never replaced, so no atomic_dir-like swap
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        dirs = build_fresh_data(tmp, n, seed, split)
        try:
            tmp.rename(out)
        except OSError as exc:  # another command made --out meanwhile
            raise BadInput(f"--out {out}: {exc.strerror}; pick a new directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in dirs:
        print(out / name)
    return 0


def remove_stale_partials(out: Path) -> None:
    """The half-drawn dirs beside ``out`` that killed ``data`` runs left (``.NAME.partial-TAG`` and its ``.draw``;
    TAG = ``probe.results.writer_tag``)."""
    import re

    from probe.results import WRITER_TAG, remove_stale_dirs

    remove_stale_dirs(out.parent, rf"\.\.?{re.escape(out.name)}\.partial-(?P<tag>{WRITER_TAG})(\.draw)?")


if __name__ == "__main__":
    from probe.errors import cli_main

    raise SystemExit(cli_main(main))
