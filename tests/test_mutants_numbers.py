"""Tests written against surviving mutants of a second mutation-testing audit (mut45b: merge formulas, salience,
metrics, parsing, the exact engine's decoding): each compares the code with an independent oracle (a hand
computation, a formula written out here), never with the helper under test."""
from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------------------------------------
# probe.sweep.overflow_steps: the first non-finite step of a row that was still generating


def test_overflow_steps_by_hand():
    """Three rows, end token 2, by hand: row 0 ends at step 1 and its logits are NaN only after that (padding: no
    overflow); row 1's logits are NaN at the very step that produced its end token (an overflow: the end token is
    the argmax of NaN); row 2 never ends and has one Inf logit at steps 2 and 3 (the first, 2, is reported). Mutants
    every test passed: all positions after an end token counted (the end token's own step included, or none
    excluded), the last bad step reported, a row with one finite logit called finite."""
    from probe.sweep import overflow_steps

    tokens = torch.tensor([[1, 2, 0, 0], [1, 2, 0, 0], [1, 3, 3, 3]])
    steps = [torch.zeros(3, 5) for _ in range(4)]
    steps[2][0] = math.nan
    steps[3][0] = math.nan
    steps[1][1] = math.nan
    steps[2][2, 4] = math.inf
    steps[3][2, 0] = -math.inf
    assert overflow_steps(steps, tokens, {2}) == [None, 1, 2]


# --------------------------------------------------------------------------------------------------------
# probe.parsing: tier 1's opening choice needs the letter's own option text right after it


def test_an_opening_letter_without_its_own_text_right_after_it_is_no_opening_choice():
    """"A. Not red: the answer is B" opens with A, whose option "red" follows only later: not the prompt's choice
    line "A. red", so tier 1 passes and the answer phrase (tier 2) gives B. A mutant that took the option's text
    anywhere after the letter read A, and every test passed. Oracle: the documented tiers, by hand."""
    from probe.parsing import parse_choice

    options = ["red", "blue", "green", "yellow"]
    assert parse_choice("A. Not red: the answer is B", options) == "B"
    assert parse_choice("A. red, not the answer B", options) == "A"  # its own text right after it: tier 1


def test_options_that_are_lone_letters_leave_every_letter_a_choice():
    """Options "A".."D" (an item whose choices are labels): they mark no echo span, so the answer phrase (tier 2)
    decides "A is wrong; the answer is B" and "(C)" decides "A? No: (C)". A mutant that let them mark spans
    blocked every letter tier and fell to tier 6, the earliest option text, A; every test passed. Oracle: the
    documented rule, by hand."""
    from probe.parsing import parse_choice

    options = ["A", "B", "C", "D"]
    assert parse_choice("A is wrong; the answer is B", options) == "B"
    assert parse_choice("A? No: (C)", options) == "C"


# --------------------------------------------------------------------------------------------------------
# analyses.merge_methods.run_fingerprint: what of a salience run a merge's manifest depends on


def test_a_salience_runs_fingerprint_follows_its_status_but_not_its_timestamps(tmp_path):
    """The same heads.csv and plan with another run.json status (the run restarted, now "running") is another input
    to the merge (else a finished merge could be kept over a run that is no longer complete); a new timestamp
    alone is not. A mutant that left the status out passed every merge and salience test. Oracle: the docstring's
    list of what a merge reads, checked by editing run.json by hand."""
    import json

    from analyses.merge_methods import run_fingerprint

    run = tmp_path / "heads"
    run.mkdir()
    (run / "heads.csv").write_text("layer,head,kl\n0,0,0.5\n", encoding="utf-8")
    info = {"plan": {"model_path": "m"}, "model_resolved_path": "/m", "status": "complete", "started": "t0"}

    def fingerprint(**edit) -> str:
        (run / "run.json").write_text(json.dumps(info | edit), encoding="utf-8")
        return run_fingerprint(run)

    done = fingerprint()
    assert fingerprint(started="t1") == done
    assert fingerprint(status="running") != done
    assert fingerprint(model_resolved_path="/other") != done
