"""``python -m figures KIND DIR``: redraw figures from saved result files only."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from probe.errors import ArgParser, BadInput, check_out_path, cli_main, in_path, releases_claims
from probe.results import hold_drawn_dir, note_outputs, remove_stale_temps

# kind → what it reads and writes (for --help)
READS: dict[str, str] = {
    "eval": "a probe.eval --out: eval.png/pdf",
    "heads": "a probe.heads --out: heatmap_{accuracy,prob_accuracy,kl}.png/pdf",
    "merge": "an analyses.merge --out of a salience merge: merge_heads.png/pdf",
    "report": "an analyses.replicate --out: report.md, report.html, report_figures/",
    "shift": "an analyses.shift --out: shift_models and one shift_heatmap per model, png/pdf",
    "steps": "probe.eval runs over fine-tuning checkpoints, one panel each: steps.png/pdf in the first",
    "trajectory": "an analyses.trajectory --out: trajectory_sketch and trajectory_norms, png/pdf",
}
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


@releases_claims  # the drawn dir's lock ends with the drawing, called from Python too
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgParser(prog="python -m figures", formatter_class=argparse.RawDescriptionHelpFormatter,
                  description="Redraw figures from saved result files only (no model is loaded); each is written "
                  "into the result directory.\n\nkinds:\n" + "".join(f"  {k:<11}{v}\n" for k, v in READS.items()),
                  examples=["python -m figures heads runs/heads", "python -m figures eval runs/eval",
                            "python -m figures steps runs/steps/text runs/steps/image",
                            "python -m figures report runs/replicate"])
    p.add_argument("kind", choices=sorted(KINDS), help="which result directory type to draw (see kinds)")
    p.add_argument("dir", type=in_path, nargs="+",
                   help="result directory written by the matching command (steps: several probe.eval runs, one "
                   "panel each; the figure goes into the first; report: a python -m analyses.replicate output)")
    args = p.parse_args(argv)
    for d in args.dir:
        if not d.is_dir():
            raise BadInput(f"{d} is not a directory")
    if len(args.dir) > 1 and args.kind != "steps":
        raise BadInput(f"{args.kind} draws one result directory")
    check_out_path(args.dir[0], "DIR")  # drawn into (a read-only one was a traceback at the first figure)
    hold_drawn_dir(args.dir[0])  # refused while a command writes or replaces it, and it while this draws
    module, func = KINDS[args.kind]
    written = getattr(importlib.import_module(module), func)(args.dir if args.kind == "steps" else args.dir[0])
    note_outputs(args.dir[0], written)  # an analyses output's --overwrite may replace what was drawn into it
    for d in sorted({args.dir[0], *(p.parent for p in written)}):  # a killed redraw's temp files (figures of a
        remove_stale_temps(d)  # sweep's own run are cleared by its rerun; a redraw's were left for good)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
