"""``python -m figures KIND DIR``: redraw figures from saved result files only."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Sequence

from probe.errors import ArgParser, BadInput, check_out_path, cli_main
from probe.results import note_outputs

# kind → (module, function taking the result dir and returning the written paths)
KINDS: dict[str, tuple[str, str]] = {
    "eval": ("figures.eval", "draw_eval"),
    "heads": ("figures.heads", "draw_heads"),
    "merge": ("figures.merge", "draw_merge"),
    "report": ("figures.report", "build_report"),
    "shift": ("figures.shift", "draw_shift"),
    "steps": ("figures.steps", "draw_steps"),
    "trajectory": ("figures.trajectory", "draw_trajectory"),
}


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgParser(prog="python -m figures", description=__doc__)
    p.add_argument("kind", choices=sorted(KINDS), help="which result directory type to draw")
    p.add_argument("dir", type=Path, nargs="+",
                   help="result directory written by the matching command (steps: several probe.eval runs, one "
                   "panel each; the figure goes into the first; report: a python -m analyses.replicate output)")
    args = p.parse_args(argv)
    for d in args.dir:
        if not d.is_dir():
            raise BadInput(f"{d} is not a directory")
    if len(args.dir) > 1 and args.kind != "steps":
        raise BadInput(f"{args.kind} draws one result directory")
    check_out_path(args.dir[0], "DIR")  # drawn into (a read-only one was a traceback at the first figure)
    module, func = KINDS[args.kind]
    written = getattr(importlib.import_module(module), func)(args.dir if args.kind == "steps" else args.dir[0])
    note_outputs(args.dir[0], written)  # an analyses output's --overwrite may replace what was drawn into it
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
