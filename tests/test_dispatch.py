"""One model over several devices (probe.dispatch, DESIGN §12): the plan on substituted GPU inventories (meta
device, the real 7B/72B shapes), and the engines on a model dispatched through accelerate's hooks giving the
numbers of the undispatched model."""
from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pandas as pd
import pytest
import torch

from probe.devices import DeviceQuery, resolve_placement
from probe.errors import BadInput

GIB = 1 << 30
H100 = 85_029_158_912  # torch.cuda.get_device_properties().total_memory of an 80 GB H100
H200 = 150_754_820_096


def _gpus(n: int, memory: int = H100, name: str = "NVIDIA H100 80GB HBM3") -> DeviceQuery:
    return DeviceQuery((name,) * n, True, True, 16, (memory,) * n)


def _meta(name: str, dtype=torch.bfloat16):
    import transformers

    from probe.archs import ARCHS, build_config
    from probe.dispatch import meta_model
    from probe.families import FAMILIES

    fam = FAMILIES[ARCHS[name].family]
    return meta_model(getattr(transformers, fam.model_class), build_config(name), dtype), fam


# ------------------------------------------------------------------------------------------------ placement


def test_auto_spreads_over_every_visible_gpu_and_torchrun_ranks_share_them(monkeypatch):
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    p = resolve_placement(query=_gpus(4))
    assert p.all_devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3") and p.device == "cuda:0" and p.spread
    assert p.device_memory == (H100,) * 4 and p.dtype == "bfloat16"
    assert p.description.startswith("devices cuda:0,cuda:1,cuda:2,cuda:3 (4 × NVIDIA H100 80GB HBM3, one model")
    # torchrun: 2 ranks on 8 GPUs → 4 each; 8 ranks → one each (no spreading)
    assert resolve_placement(query=_gpus(8), local_rank=1, local_world=2).all_devices == tuple(
        f"cuda:{i}" for i in range(4, 8))
    one = resolve_placement(query=_gpus(8), local_rank=5, local_world=8)
    assert one.all_devices == ("cuda:5",) and not one.spread
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_placement(query=_gpus(4)).all_devices == ("cuda:0", "cuda:1")
    with pytest.raises(BadInput, match="cannot be shared evenly"):
        resolve_placement(query=_gpus(3))
    with pytest.raises(BadInput, match="8 ranks on this machine, 4 GPU\\(s\\) visible"):
        resolve_placement(query=_gpus(4), local_rank=5, local_world=8)


def test_explicit_gpu_lists_and_single_gpus():
    assert resolve_placement("cuda:2,cuda:0", query=_gpus(4)).all_devices == ("cuda:2", "cuda:0")
    assert resolve_placement("cuda", query=_gpus(4), local_rank=None).all_devices == ("cuda:0",)
    for bad, match in (("cuda:0,cuda:0", "distinct GPUs"), ("cuda:0,cpu", "distinct GPUs"),
                       ("cuda:0,cuda:9", "only 4 GPU"), ("cuda,cuda:0", "distinct GPUs"),  # cuda is rank 0's GPU
                       ("cuda:-1", "unknown --device 'cuda:-1'"), ("cuda:a", "unknown --device 'cuda:a'"),
                       ("cuda:00,cuda:0", "unknown --device 'cuda:00'"), ("cuda:0,", "unknown --device ''")):
        with pytest.raises(BadInput, match=match):
            resolve_placement(bad, query=_gpus(4))
    with pytest.raises(BadInput, match="no CUDA GPU is visible"):
        resolve_placement("cuda:0,cuda:1", query=DeviceQuery((), False, True, 2))


def _ratios(sizes, first, last, ends, capacity) -> list[float]:
    """Each device's load over its capacity, the largest first: block j holds the layers up to ``ends[j]`` (the
    first device also the embeddings and tower, ``first``; the last the norm and head, ``last``)."""
    bounds = [0, *ends]
    loads = [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]
    loads[0] += first
    loads[-1] += last
    return sorted((load / c for load, c in zip(loads, capacity)), reverse=True)


def _evenest_split(sizes, first, last, capacity):
    """The oracle (brute force over every way to cut the layers into len(capacity) contiguous blocks in device
    order, any of them empty): the least sorted load vector in lexicographic order — the fullest device as light
    as possible (its first element: the best split's), then the next fullest, and so on."""
    n, k = len(sizes), len(capacity)
    return min(_ratios(sizes, first, last, [*cuts, n], capacity)
               for cuts in itertools.combinations_with_replacement(range(n + 1), k - 1))


def _random_splits(seed: int):
    """300 random (sizes, first, last, capacity, ends): the planner's split of random layers, extras and
    capacities (every other case on equal devices, given as no capacities)."""
    from probe.dispatch import balance_layers

    rng = random.Random(seed)
    for trial in range(300):
        n, k = rng.randint(1, 7), rng.randint(1, 4)
        sizes = [rng.randint(1, 20) for _ in range(n)]
        first, last = rng.randint(0, 60), rng.randint(0, 30)
        capacity = [1] * k if trial % 2 else [rng.randint(1, 4) for _ in range(k)]
        yield sizes, first, last, capacity, balance_layers(sizes, first, last, k, capacity if trial % 2 == 0 else ())


def test_balance_layers_is_the_best_contiguous_split():
    """The DP against brute force over every way to cut the layers (random sizes, extras and capacities). A device
    may hold no layers: the DP gave every device one at least, so the first device held the embeddings, the tower
    and a layer where the tower alone was its share (Qwen2-VL-7B over 8 GPUs: 2.71 GiB on cuda:0, not 2.27), and
    mixed GPUs were balanced by bytes, not by their memory."""
    from probe.dispatch import balance_layers

    for sizes, first, last, capacity, ends in _random_splits(0):
        assert len(ends) == len(capacity) and ends[-1] == len(sizes) and all(a <= b for a, b in zip([0] + ends, ends))
        assert _ratios(sizes, first, last, ends, capacity)[0] == _evenest_split(sizes, first, last, capacity)[0]
    # the tower outweighs the layers' share: the first device holds it alone (10, not tower + a layer = 12)
    assert balance_layers([2, 2, 2, 2], 10, 0, 3)[0] == 0


def test_layers_below_the_fullest_device_are_split_evenly_too():
    """Only the fullest device's load was minimised: with the tower (or the head) the fullest, the other devices'
    blocks were any split under it, and the DP's tie-break gave the later devices every layer they could take.
    Qwen2-VL-7B over 8 H100s: cuda:1 held 1 layer (0.4 GiB), cuda:2-6 5 each (2.2 GiB); now 4, 4, 4, 4, 5, 5. Eight
    equal layers under a tower of 10 over 3 devices came out as blocks (0, 0, 8): the middle GPU idle (dropped from
    the map) and all eight layers, their activations and KV cache on the last. Oracle: brute force, the
    lexicographically least sorted load vector."""
    from probe.dispatch import balance_layers

    assert balance_layers([1] * 8, 10, 0, 3) == [0, 4, 8]
    for sizes, first, last, capacity, ends in _random_splits(1):
        got = _ratios(sizes, first, last, ends, capacity)
        assert got == _evenest_split(sizes, first, last, capacity), (sizes, first, last, capacity, ends)


def _fewest_bytes(sizes: list[int], first: int, last: int, k: int) -> int:
    """The oracle: the smallest largest load of any contiguous split into k blocks (any empty), by bisection on the
    load with a greedy fill (each device but the last takes layers while they fit), not the planner's DP."""
    def fits(cap: int) -> bool:
        i = 0
        for j in range(k - 1):
            load = first if j == 0 else 0
            if load > cap:
                return False
            while i < len(sizes) and load + sizes[i] <= cap:
                load, i = load + sizes[i], i + 1
        return sum(sizes[i:]) + last + (first if k == 1 else 0) <= cap

    lo, hi = 0, first + last + sum(sizes)
    while lo < hi:
        lo, hi = (lo, (lo + hi) // 2) if fits((lo + hi) // 2) else ((lo + hi) // 2 + 1, hi)
    return lo


@pytest.mark.parametrize("name,n_gpus", [("qwen2-vl-72b", 4), ("qwen2-72b", 2), ("qwen2-vl-7b", 3),
                                         ("llava-ov-7b", 4)])
@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")  # LLaVA's lone image_newline
def test_plan_of_the_real_shapes_covers_every_weight_and_is_balanced(name, n_gpus):
    """Meta-device dry run of the real architectures: every parameter and buffer placed exactly once, layers in
    contiguous ascending blocks, tower and embeddings first, norm and lm_head last, the fullest device as light as
    any contiguous split allows (``_fewest_bytes``)."""
    from accelerate.utils import check_device_map

    from probe.dispatch import plan_device_map

    model, fam = _meta(name)
    devices = [f"cuda:{i}" for i in range(n_gpus)]
    plan = plan_device_map(model, fam.layers_path, fam.norm_path, fam.lm_head_path, devices, (H200,) * n_gpus)
    check_device_map(model, plan.device_map)  # raises if a weight is not covered
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for n in names:  # exactly one key is a prefix of every weight name
        assert sum(n == k or n.startswith(k + ".") for k in plan.device_map) == 1, n
    layers = model.get_submodule(fam.layers_path)
    per_layer = [plan.device_map[f"{fam.layers_path}.{i}"] for i in range(len(layers))]
    assert per_layer == sorted(per_layer, key=devices.index) and set(per_layer) == set(devices)
    assert plan.device_map[fam.lm_head_path] == devices[-1] == plan.device_map[fam.norm_path]
    assert plan.device_map[fam.layers_path.rsplit(".", 1)[0] + ".embed_tokens"] == devices[0]
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert sum(plan.nbytes) == total
    sizes = [sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()]) for layer in layers]
    last = sum(t.numel() * t.element_size() for name in (fam.norm_path, fam.lm_head_path)
               for t in model.get_submodule(name).parameters())
    assert max(plan.nbytes) == _fewest_bytes(sizes, total - sum(sizes) - last, last, n_gpus)
    if name.endswith("72b"):
        assert total > 140e9  # bf16: the reason it needs several GPUs


def test_a_tower_heavier_than_a_share_sits_alone_on_the_first_gpu():
    """Qwen2-VL-7B over 8 GPUs: the vision tower and embeddings (2.27 GiB, indivisible) outweigh an eighth of the
    model, so no map has a fuller device than them: the optimum is their bytes, reached with cuda:0 holding no
    layer. Every device got a layer before, cuda:0 the tower, the embeddings and one (2.71 GiB). Oracle: the lower
    bound, the pre-layer units' bytes summed from the model's own parameters."""
    from probe.dispatch import plan_device_map

    model, fam = _meta("qwen2-vl-7b")
    devices = [f"cuda:{i}" for i in range(8)]
    plan = plan_device_map(model, fam.layers_path, fam.norm_path, fam.lm_head_path, devices, (H100,) * 8)

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    layers = model.get_submodule(fam.layers_path)
    tail = nbytes(model.get_submodule(fam.norm_path)) + nbytes(model.get_submodule(fam.lm_head_path))
    tower_and_embeddings = nbytes(model) - sum(nbytes(layer) for layer in layers) - tail
    assert max(plan.nbytes) == plan.nbytes[0] == tower_and_embeddings
    assert plan.layer_blocks[0] == (0, 0) and plan.devices == tuple(devices)
    assert plan.summary().startswith("device map: cuda:0 no layers (2.3 GiB), cuda:1 layers 0-")
    assert sum(plan.nbytes) == nbytes(model)


def test_gpus_of_several_sizes_fill_the_same_share_of_their_memory():
    """Qwen2-72B (135 GiB in bf16) over two 80 GB H100s and a 24 GB card: balanced by bytes (about 45 GiB each) the map
    overfilled the small card and was refused ("does not fit"), though 71.9 + 71.9 + 19.6 GiB usable hold it. Now
    each device fills the same share of what it can hold; refused only where the usable memory itself is short.
    Oracle: each device's load against its usable bytes, worked out here from the headroom constants."""
    from probe.dispatch import HEADROOM_BYTES, HEADROOM_FRACTION, plan_device_map

    model, fam = _meta("qwen2-72b")
    args = (model, fam.layers_path, fam.norm_path, fam.lm_head_path, ["cuda:0", "cuda:1", "cuda:2"])
    small = 24 * 10**9
    memory = (H100, H100, small)
    plan = plan_device_map(*args, memory)
    usable = [m * HEADROOM_FRACTION - HEADROOM_BYTES for m in memory]
    assert all(need <= have for need, have in zip(plan.nbytes, usable))
    assert plan.nbytes[2] < plan.nbytes[0] and plan.layer_blocks[-1][1] == 80
    with pytest.raises(BadInput, match="does not fit on 3 device"):  # 71.9 + 19.6 + 19.6 GiB < 135 GiB
        plan_device_map(*args, (H100, small, small))


def test_a_plan_that_cannot_fit_is_bad_input_before_any_weight_loads():
    from probe.dispatch import plan_device_map

    model, fam = _meta("qwen2-72b")
    args = (model, fam.layers_path, fam.norm_path, fam.lm_head_path)
    with pytest.raises(BadInput, match="does not fit on 1 device"):
        plan_device_map(*args, ["cuda:0"], (H100,))
    plan = plan_device_map(*args, ["cuda:0", "cuda:1"], (H200, H200))
    assert all(n < 0.92 * H200 for n in plan.nbytes)
    assert "cuda:0 layers 0-" in plan.summary()


def test_tied_lm_head_stays_with_the_embeddings(tiny_dirs):
    import transformers

    from probe.dispatch import meta_model, plan_device_map
    from probe.families import FAMILIES

    config = transformers.AutoConfig.from_pretrained(tiny_dirs["qwen2"])
    config.tie_word_embeddings = True
    model = meta_model(transformers.Qwen2ForCausalLM, config, torch.float32)
    fam = FAMILIES["qwen2"]
    plan = plan_device_map(model, fam.layers_path, fam.norm_path, fam.lm_head_path, ["cuda:0", "cuda:1"])
    assert plan.device_map["lm_head"] == plan.device_map["model.embed_tokens"] == "cuda:0"
    assert plan.device_map["model.norm"] == "cuda:1"
    # the shared matrix is counted once (it used to weigh on the first device twice, skewing the split and the
    # fit check): the loads add up to the model's own bytes, and so on devices that share a name
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # shared once
    for devices in (["cuda:0", "cuda:1"], ["cpu", "cpu", "cpu"]):
        plan = plan_device_map(model, fam.layers_path, fam.norm_path, fam.lm_head_path, devices)
        assert sum(plan.nbytes) == total


# ------------------------------------------------------------------------------------------------ engines


@pytest.fixture(scope="module")
def items(data_dir):
    from probe.mmmu import load_items

    return load_items(str(data_dir), limit=2)[0]


def _sweep(engine, loaded, items, generate, attribution_items: int = 1):
    from probe.sweep import SweepConfig, get_engine

    g = loaded.geometry
    heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    cfg = SweepConfig(generate=generate, batch_size=5, max_new_tokens=3, attribution_items=attribution_items)
    return pd.DataFrame(get_engine(engine)(loaded, items, heads, cfg))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_engines_on_a_model_dispatched_over_three_cpu_devices_equal_the_plain_model(family, tiny_dirs, load_tiny,
                                                                                    items):
    """load_model(devices=3 × cpu) goes through the planner and accelerate's hooks (AlignDevicesHook on every
    unit); exact (with decoding), naive and attribution give the undispatched model's numbers exactly."""
    from probe.models import load_model, resolve_model

    plain = load_tiny(family, "sdpa")
    spread = load_model(resolve_model(str(tiny_dirs[family])), devices=("cpu", "cpu", "cpu"))
    assert spread.device_plan is not None and len(spread.device_plan.devices) == 3
    assert all(getattr(layer, "_hf_hook", None) is not None for layer in spread.layers)  # really dispatched
    assert getattr(plain.layers[0], "_hf_hook", None) is None
    for engine, generate in (("exact", True), ("naive", False), ("attribution", False)):
        a, b = _sweep(engine, plain, items, generate), _sweep(engine, spread, items, generate)
        assert a["kl"].max() > 1e-6  # masking changed something: the equality below is not 0 == 0
        np.testing.assert_array_equal(a["kl"], b["kl"])
        np.testing.assert_array_equal(a["p_answer"], b["p_answer"])
        assert (a["response"] == b["response"]).all()
    # attribution with the items right-padded into one pass, across the devices: the plain model's one-item numbers
    a, b = _sweep("attribution", plain, items, False), _sweep("attribution", spread, items, False, len(items))
    np.testing.assert_allclose(b["kl"], a["kl"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(b["p_answer"], a["p_answer"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied,blocks", [(True, ((0, 0), (0, 1), (1, 2), (2, 3), (3, 4))),
                                         (False, ((0, 1), (1, 2), (2, 3), (3, 4), (4, 4)))])
def test_engines_with_a_device_holding_no_layer_equal_the_plain_model(tied, blocks, tiny_dirs, items, tmp_path):
    """The maps the planner makes with a layerless device, over five CPU devices: a head tied to the embeddings
    sits with them on a first device holding no layer (the logits come back to it from the last layer's device);
    untied, the norm and head sit alone on the last (the last layer on another device than the head). Exact (with
    decoding) and attribution give the undispatched model's numbers exactly."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from conftest import text_only
    from probe.models import load_model, resolve_model

    path = tiny_dirs["qwen2"]
    if tied:  # the tiny Qwen2 with its head tied: config says so, the weights hold no lm_head of their own
        path = shutil.copytree(path, tmp_path / "tied")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        (path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}), encoding="utf-8")
        weights = load_file(path / "model.safetensors")
        del weights["lm_head.weight"]
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    ref = resolve_model(str(path))
    plain, spread = load_model(ref), load_model(ref, devices=("cpu",) * 5)
    head = spread.model.get_submodule(ref.family.lm_head_path)
    assert (head.weight is spread.model.get_input_embeddings().weight) is tied
    assert spread.device_plan.layer_blocks == blocks
    assert all(getattr(layer, "_hf_hook", None) is not None for layer in spread.layers)
    texts = [text_only(items[0])]
    for engine, generate in (("exact", True), ("attribution", False)):  # naive is the model's own forward
        a, b = _sweep(engine, plain, texts, generate), _sweep(engine, spread, texts, generate)
        assert a["kl"].max() > 1e-6
        np.testing.assert_array_equal(a["kl"], b["kl"])
        np.testing.assert_array_equal(a["p_answer"], b["p_answer"])
        assert (a["response"] == b["response"]).all()


def test_batched_evaluation_of_a_dispatched_model_equals_the_plain_model(tiny_dirs, load_tiny, data_dir):
    """probe.eval's path (probe.batch.evaluate_items: left-padded batches of 4 through generate, accelerate's hooks
    on every unit, the first device holding no layer) gives the plain model's option log-probs and answers bit for
    bit on the synthetic set's multiple-choice items (8, two batches)."""
    import torch

    from probe.batch import evaluate_items
    from probe.mmmu import load_items
    from probe.models import load_model, resolve_model
    from probe.sweep import SweepConfig

    every = load_items(str(data_dir))[0]
    plain = load_tiny("qwen2_vl", "sdpa")
    spread = load_model(resolve_model(str(tiny_dirs["qwen2_vl"])), devices=("cpu", "cpu", "cpu"))
    assert spread.device_plan.layer_blocks[0] == (0, 0)
    cfg = SweepConfig(generate=True, max_new_tokens=4)
    a, b = evaluate_items(plain, every, cfg, 4), evaluate_items(spread, every, cfg, 4)
    assert len(a) == len(every) > 4 and len({round(float(m.logp.max()), 3) for m in a}) > 1
    assert all(torch.equal(x.logp, y.logp) and x.response == y.response for x, y in zip(a, b))


def test_the_exact_engine_moves_the_residual_to_each_layers_device(load_tiny, items):
    """Meta-device dry run without accelerate hooks (nothing moves tensors for the engine): layers 2-3, norm and
    lm_head on "meta". run_rows must carry the residual from the CPU layers onto them, or torch raises."""
    from probe.exact import clean_pass, run_rows
    from probe.prompting import PromptTemplate, build_inputs
    from probe.upstream import LayerCall, to_device

    plain = load_tiny("qwen2", "sdpa")
    import copy

    model = copy.deepcopy(plain.model)
    loaded = dataclasses.replace(plain, model=model)
    text_item = dataclasses.replace(items[0], images=(), question=items[0].question.replace("<image", "(image"))
    clean = clean_pass(loaded, build_inputs(loaded, text_item, PromptTemplate()), keep_cache=False)
    for i in (2, 3):
        loaded.layers[i].to("meta")
        clean.calls[i] = LayerCall(clean.calls[i].hidden.to("meta"), to_device(clean.calls[i].kwargs, "meta"))
    model.get_submodule(loaded.family.norm_path).to("meta")
    model.get_submodule(loaded.family.lm_head_path).to("meta")
    loaded = dataclasses.replace(loaded, device=torch.device("meta"))
    assert [d.type for d in loaded.layer_devices] == ["cpu", "cpu", "meta", "meta"]
    logits = run_rows(loaded, clean, [(0, 1), (1, 0), (3, 2)])
    assert logits.device.type == "meta" and logits.shape == (3, model.config.vocab_size)
    with pytest.raises(RuntimeError):  # the oracle of the check: a residual left behind is an error
        loaded.layers[2](clean.calls[1].hidden, **clean.calls[1].kwargs)


@pytest.mark.parametrize("meta_layers, meta_norm, meta_head, injected_at", [
    ((), True, True, None),  # the norm and LM head on the device after the last layer's: the residual follows
    ((), False, True, None),  # the LM head alone on the next device: the norm's output follows it
    ((), False, False, None),  # every module on the CPU, the main device elsewhere: the logits go back to it
    ((2, 3), True, True, 2),  # an addition recorded between layers (DeepStack) joins the residual where it is
])
def test_the_masked_rows_tail_runs_each_module_on_its_own_device(meta_layers, meta_norm, meta_head, injected_at,
                                                                 load_tiny, items):
    """run_rows' hops after the layers (mut48): the final norm's input on the norm's device, the LM head's on the
    head's, the logits on the main device (``loaded.device``), a between-layer addition on the residual's device.
    A mutant dropping any one move passed the all-meta tail of the test above (norm, head and main device were one
    device there). Oracle: each module's input device seen by a forward pre-hook against where its weights are; CPU
    and "meta" stand in for two devices (a meta tensor cannot be copied back, so only moves towards meta are
    built; the addition here sits on the CPU for that reason)."""
    import copy

    from probe.exact import clean_pass, run_rows
    from probe.prompting import PromptTemplate, build_inputs
    from probe.upstream import LayerCall, to_device

    plain = load_tiny("qwen2", "sdpa")
    model = copy.deepcopy(plain.model)
    loaded = dataclasses.replace(plain, model=model)
    text_item = dataclasses.replace(items[0], images=(), question=items[0].question.replace("<image", "(image"))
    clean = clean_pass(loaded, build_inputs(loaded, text_item, PromptTemplate()), keep_cache=False)
    for i in meta_layers:
        loaded.layers[i].to("meta")
        clean.calls[i] = LayerCall(clean.calls[i].hidden.to("meta"), to_device(clean.calls[i].kwargs, "meta"))
    if injected_at is not None:
        clean.injected[injected_at] = torch.zeros_like(clean.calls[0].hidden)
    norm, head = model.get_submodule(loaded.family.norm_path), model.get_submodule(loaded.family.lm_head_path)
    for module, on_meta in ((norm, meta_norm), (head, meta_head)):
        if on_meta:
            module.to("meta")
    seen: list[tuple[str, str, str]] = []
    watched = [(f"layer {i}", layer) for i, layer in enumerate(loaded.layers)] + [("norm", norm), ("head", head)]
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.append(
        (name, args[0].device.type, next(mod.parameters()).device.type))) for name, m in watched]
    loaded = dataclasses.replace(loaded, device=torch.device("meta"))
    try:
        logits = run_rows(loaded, clean, [(0, 1), (1, 0), (3, 2)])
    finally:
        for h in hooks:
            h.remove()
    assert [name for name, _, _ in seen] == [name for name, _ in watched]
    assert all(got == want for _, got, want in seen), seen
    assert logits.device.type == "meta" and logits.shape == (3, model.config.vocab_size)


def test_a_layer_call_is_kept_on_the_layers_device_keywords_included():
    """record_layer_call(device=...) moves the residual and every tensor among the keywords, nested ones included
    (rotary cos/sin come as a tuple), and leaves the rest as it is (mut48: a mutant moving the residual alone passed
    the meta-device tests, which move the calls themselves). Oracle: each tensor's device and values by hand."""
    from probe.upstream import record_layer_call

    hidden, cos, sin, ids = torch.randn(1, 3, 4), torch.randn(1, 3, 2), torch.randn(1, 3, 2), torch.arange(3)[None]
    call = record_layer_call((hidden,), {"position_embeddings": (cos, sin), "position_ids": ids, "attention_mask": None,
                                         "extra": {"mask": [ids]}}, torch.device("meta"))
    assert call.hidden.device.type == "meta" and call.hidden.shape == hidden.shape
    assert isinstance(call.kwargs["position_embeddings"], tuple)
    moved = [*call.kwargs["position_embeddings"], call.kwargs["position_ids"], call.kwargs["extra"]["mask"][0]]
    assert [t.device.type for t in moved] == ["meta"] * 4
    assert [t.shape for t in moved] == [cos.shape, sin.shape, ids.shape, ids.shape]
    assert call.kwargs["attention_mask"] is None
    kept = record_layer_call((hidden,), {"position_ids": ids})  # no device: the tensors as the hook saw them
    assert kept.hidden is hidden and kept.kwargs["position_ids"] is ids


def test_device_cuda_without_a_gpu_exits_2_with_one_line(tmp_path, data_dir, tiny_dirs, capfd):
    from probe.errors import cli_main
    from probe.heads import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    for device in ("cuda", "cuda:0,cuda:1"):
        args = ["--model", str(tiny_dirs["qwen2"]), "--data", str(data_dir), "--device", device, "--quiet",
                "--out", str(tmp_path / "r")]
        assert cli_main(main, args) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA GPU is visible" in err[0]
        assert not (tmp_path / "r").exists()


def test_load_model_refuses_a_map_that_cannot_fit_before_reading_weights(tiny_dirs, monkeypatch):
    """The memory check runs on the meta-device plan, before from_pretrained opens a weight file."""
    import transformers

    from probe.models import load_model, resolve_model

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the plan was checked")

    monkeypatch.setattr(transformers.Qwen2VLForConditionalGeneration, "from_pretrained", no_weights)
    with pytest.raises(BadInput, match="does not fit on 2 device"):
        load_model(resolve_model(str(tiny_dirs["qwen2_vl"])), devices=("cpu", "cpu"), device_memory=(GIB, GIB // 2))


def test_a_spread_model_dropped_is_freed_before_the_next_model_loads(tiny_dirs):
    """accelerate's hooks hold a dispatched model in reference cycles (module.forward is a partial of the module), so
    `del loaded` (probe.eval between its models, analyses.replicate between stages) freed nothing until Python's
    cyclic collector happened to run: on GPUs the next model (a second 72B) loaded beside the first one's weights.
    load_model collects it first (the collector is off here, so only that can free it)."""
    import gc
    import weakref

    from probe.models import load_model, resolve_model

    ref = resolve_model(str(tiny_dirs["qwen2"]))
    was = gc.isenabled()
    gc.disable()
    try:
        first = load_model(ref, devices=("cpu", "cpu"))
        gone = weakref.ref(first.model)
        del first
        assert gone() is not None  # the cycles keep it
        load_model(ref, devices=("cpu", "cpu"))
        assert gone() is None
    finally:
        if was:
            gc.enable()


def test_a_float32_model_on_devices_turns_tf32_convolutions_off(tiny_dirs):
    """float32 away from one CPU (a GPU, or a map over several devices, as here with CPU stand-ins) turns cuDNN's
    TF32 convolutions off (on by default, unlike matmuls): the vision towers' patch convolutions then run in
    float32 as the CPU's do. A bfloat16 load, or float32 on the CPU alone, leaves the flag as it was."""
    from probe.models import load_model, resolve_model

    ref = resolve_model(str(tiny_dirs["qwen2_vl"]))
    was = torch.backends.cudnn.allow_tf32
    try:
        for kwargs, tf32 in (({"devices": ("cpu", "cpu"), "dtype": "bfloat16"}, True), ({}, True),
                             ({"devices": ("cpu", "cpu")}, False)):
            torch.backends.cudnn.allow_tf32 = True
            load_model(ref, **kwargs)
            assert torch.backends.cudnn.allow_tf32 is tf32, kwargs
    finally:
        torch.backends.cudnn.allow_tf32 = was


# ------------------------------------------------------------------------------------------------ free GPU memory


def _fake_gpus(monkeypatch, free: list[int], total: int, read: list[int] | None = None) -> None:
    """torch.cuda as a machine with ``len(free)`` GPUs of ``total`` bytes would answer, ``free[i]`` of GPU i free
    (another process holding the rest); each GPU whose free memory is asked for is appended to ``read``. Skipped
    where a GPU is visible: conftest then hides it from DeviceQuery.probe."""
    import contextlib
    from types import SimpleNamespace

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)

    def mem_get_info(index=None):
        if read is not None:
            read.append(index)
        return free[index], total

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: len(free))
    monkeypatch.setattr(cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    monkeypatch.setattr(cuda, "get_device_properties", lambda index=None: SimpleNamespace(total_memory=total))
    monkeypatch.setattr(cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(cuda, "device", lambda index: contextlib.nullcontext())


def test_a_gpu_another_process_holds_gets_fewer_layers(monkeypatch):
    """The fit used each GPU's total memory: with another process holding 80 GB of the first of two H200s, Qwen2-72B
    (135 GiB in bf16) was split evenly, 67.7 GiB onto a GPU with 65.9 GiB free, and ran out of memory in the load.
    Now the placement carries what torch.cuda.mem_get_info says is free, read only on the GPUs the process is given
    (reading one makes a CUDA context there), and the map gives that GPU fewer layers. Oracle: the patched free
    bytes, and their usable share worked out from the headroom constants; where mem_get_info fails, the totals."""
    from probe.dispatch import HEADROOM_BYTES, HEADROOM_FRACTION, plan_device_map

    held = 80 * 10**9
    read: list[int] = []
    _fake_gpus(monkeypatch, [H200 - held, H200], H200, read)
    p = resolve_placement(query=DeviceQuery.probe())
    assert p.all_devices == ("cuda:0", "cuda:1") and p.device_memory == (H200 - held, H200)
    assert p.memory_kind == "free" and sorted(read) == [0, 1]
    assert p.description.startswith("devices cuda:0,cuda:1 (2 × NVIDIA H200, one model split by layers; "
                                    f"{(H200 - held) / GIB:.1f} / {H200 / GIB:.1f} GiB free)")
    model, fam = _meta("qwen2-72b")
    args = (model, fam.layers_path, fam.norm_path, fam.lm_head_path, p.all_devices)
    plan, by_total = plan_device_map(*args, p.device_memory), plan_device_map(*args, (H200, H200))
    usable = (H200 - held) * HEADROOM_FRACTION - HEADROOM_BYTES
    assert by_total.nbytes[0] > usable >= plan.nbytes[0]
    assert plan.layer_blocks[0][1] < by_total.layer_blocks[0][1]
    read.clear()
    one = resolve_placement(query=DeviceQuery.probe(), local_rank=1, local_world=2)
    assert one.device_memory == (H200,) and read == [1]  # rank 1 reads its own GPU only

    def no_info(index=None):
        raise RuntimeError("CUDA driver too old")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_info)
    p = resolve_placement(query=DeviceQuery.probe())
    assert p.device_memory == (H200, H200) and p.memory_kind == "total"
    assert p.description.startswith("devices cuda:0,cuda:1 (2 × NVIDIA H200, one model split by layers; "
                                    f"{H200 / GIB:.1f} / {H200 / GIB:.1f} GiB total, free unknown)")
    little = H200 - 100 * 10**9
    with pytest.raises(BadInput, match=rf"cuda:0 would hold .* GiB of weights, {little / GIB:.1f} GiB free \("):
        plan_device_map(*args, (little, little), memory_kind="free")


def test_a_model_that_fits_no_gpus_free_memory_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    """A GPU another process fills: the model is refused before anything is written, the line naming the free
    memory it was checked against (the total would have let it load, into an out-of-memory crash)."""
    from probe.errors import cli_main
    from probe.eval import main

    _fake_gpus(monkeypatch, [GIB // 2], H200)  # half a GiB free: nothing usable past the headroom
    out = tmp_path / "eval"
    assert cli_main(main, ["--models", "organism-base", "--data", "probe/zoo/data/text", "--limit", "2",
                           "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: organism-base: its weights take") and "\n" not in err
    assert "more than cuda:0 can hold (512.0 MiB free, 0.0 MiB usable)" in err, err
    assert not out.exists()
