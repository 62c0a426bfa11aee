"""Turn an MMMU item into model inputs: a configurable prompt in the family's chat format (ChatML for the Qwen
families; the format is a field of the family row) plus the family's image placeholders.

The template is recorded in run.json. Placeholders come from the family table; the HF processor expands them to
the right number of image tokens (we build the chat text ourselves so no processor chat template, and hence no
video processor / torchvision, is needed).
"""
from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass, fields as dataclass_fields
from itertools import accumulate
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from PIL import Image

from probe.errors import BadInput, is_int
from probe.families import Family
from probe.lm_config import chat_format, text_config_dict
from probe.mmmu import VIDEO_REF
from probe.models import LoadedModel, load_tokenizer
from probe.upstream import (anyres_patches, check_model_inputs, check_special_tokens_read, processor_image_patches,
                            processor_image_tokens)


class ItemLike(Protocol):
    # read-only members: engines only read an item, and a frozen dataclass (probe.mmmu.Item) has no settable fields
    @property
    def id(self) -> str: ...

    @property
    def question(self) -> str: ...

    @property
    def options(self) -> tuple[str, ...]: ...

    @property
    def answer(self) -> str: ...

    @property
    def images(self) -> tuple[bytes, ...]: ...

    @property
    def frames(self) -> tuple[bytes, ...]: ...

    @property
    def letters(self) -> tuple[str, ...]: ...

    def pil_images(self, max_side: int | None = None) -> list[Image.Image]: ...

    def pil_frames(self, max_side: int | None = None) -> list[Image.Image]: ...


@dataclass(frozen=True)
class PromptTemplate:
    """DESIGN §3: a system prompt asking for the letter only; user turn = images, then question and choices."""

    system: str = "Answer with the option's letter from the given choices directly."
    user: str = "Question: {question}\nChoices:\n{choices}"
    choice: str = "{letter}. {option}\n"
    assistant_prefix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, given: dict[str, Any]) -> "PromptTemplate":
        """The template of a JSON object's fields (a --template file), the rest defaults. A key that is no field is
        a ValueError naming it and the fields (the dataclass said "__init__() got an unexpected keyword
        argument")."""
        known = [f.name for f in dataclass_fields(cls)]
        if unknown := [k for k in given if k not in known]:
            raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} (the "
                             f"fields of a template: {', '.join(sorted(known))})")
        return cls(**given)

    def check(self) -> None:
        """Raise ValueError naming the field that cannot render: every field a string, and ``user`` / ``choice``
        formatting with only their own placeholders. Checked when the template is read, so a typo fails before
        a weight loads instead of as a traceback at the first item."""
        for name, value in self.to_dict().items():
            if not isinstance(value, str):
                raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
        for name, fields in (("user", {"question": "q", "choices": "c"}), ("choice", {"letter": "A", "option": "o"})):
            try:
                getattr(self, name).format(**fields)
                used = {re.split(r"[.\[]", f)[0] for _, f, _, _ in string.Formatter().parse(getattr(self, name)) if f}
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                raise ValueError(f"field {name!r} does not format with {{{'}, {'.join(fields)}}} only "
                                 f"({type(exc).__name__}: {exc})") from None
            # a placeholder left out (or escaped as {{question}}) renders a prompt without the question, the
            # choices or the letters the metrics read, and the run would score it without a word
            if missing := [f for f in fields if f not in used]:
                raise ValueError(f"field {name!r} lacks {', '.join('{' + f + '}' for f in missing)}: the model "
                                 f"would not see the item's {' and '.join(missing)}")
        # byte-level BPE and sentencepiece write a space with the word after it (" A" is one token): a prompt ending
        # in a lone space is one the model never saw (SmolLM2 then puts 0.1 % on the letters and 18 % on " A")
        if self.assistant_prefix[-1:] in (" ", "\t"):
            raise ValueError("field 'assistant_prefix' ends in a space: end it without one (the letter is then "
                             "read as ' A', the token the model writes after it)")


@dataclass(frozen=True)
class ChatFormat:
    """A family's turn markup around the template's system and user text (``{bos}`` = the tokenizer's BOS, or
    nothing; prompts are tokenised without added special tokens so every path puts it in the same place).

    Checked against the checkpoints' own Jinja templates (tests/test_checkpoint_templates.py renders each as the
    oracle) and tokenizers (Llama 2 / Mistral sentencepiece, Llama 3 and SmolLM2 byte-level BPE): ``lead`` is what
    the trained answer starts with after the prompt (Vicuna's ``ASSISTANT: A``, Mistral's ``[/INST] A``, Idefics3's
    ``Assistant: A``), so the first generated token is " A" (``ĠA`` in byte-level BPE, not ``A``); ``trim`` strips
    the user's text (Gemma's and Llama's templates do); ``text_sep`` goes before user text that no image placeholder
    precedes (Idefics3: ``User: text`` but ``User:<image>text``); ``bos``: the format starts with the tokenizer's BOS
    (as text: Vicuna, Llama 2 and 3, Mistral, Gemma, Idefics3), where ChatML's checkpoints write none (SmolLM2's BOS
    is its ``<|im_start|>``); ``markup``: its special tokens, one token each in the vocabulary of a model trained on
    it (a row's ``chat_fallbacks`` are taken where they are not); ``template_mark``: text the tokenizer's own chat
    template holds where the model was trained on the format (Llama 2's ``[INST]``: plain text in a vocabulary
    Vicuna-1.5 shares). Vicuna, Llama 2 and the Mistral formats put a space after ``{bos}``: with BOS as text,
    transformers' sentencepiece tokenizers (Metaspace, prepend "first") would read ``<s>Answer`` as ``An``+``swer``,
    not the ``▁Answer`` the model saw after its BOS id (the space is what Mistral's own template writes:
    `` [INST]``)."""

    prompt: str  # with {bos}, {system}, {user}; ends where the assistant's answer starts
    end: str | None = None  # the token that ends the assistant's turn after its answer (None: the tokenizer's EOS)
    lead: str = ""  # what the trained answer writes before the letter (" ": ``ĠA`` / ``▁A``)
    trim: bool = False  # the template strips the user's text
    text_sep: str = ""  # before user text that no image placeholder precedes
    bos: bool = False  # the prompt starts with the tokenizer's BOS (as text, where it has one)
    markup: tuple[str, ...] = ()  # the format's special tokens (ChatML's <|im_start|>, <|im_end|>)
    template_mark: str = ""  # what the tokenizer's chat_template holds for a fallback to take this format


_CHATML = ("<|im_start|>", "<|im_end|>")
_LLAMA3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_LLAMA3_TURNS = ("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|><|start_header_id|>user"
                 "<|end_header_id|>\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
CHAT_FORMATS: dict[str, ChatFormat] = {
    "chatml": ChatFormat("{bos}<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                         "<|im_start|>assistant\n", end="<|im_end|>", markup=_CHATML),
    # Vicuna-1.5 (FastChat's vicuna_v1.1), LLaVA-1.5, LLaVA-NeXT-Vicuna: the system text, a space, then the turns
    # (LLaVA's conv_vicuna_v1, -hf template)
    "vicuna": ChatFormat("{bos} {system} USER: {user} ASSISTANT:", lead=" ", bos=True),
    # Llama-2-chat (Meta's template: "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]", the content
    # stripped, the answer " B </s>"): chosen by its tokenizer's chat template, its vocabulary being Vicuna-1.5's
    "llama2": ChatFormat("{bos} [INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]", lead=" ", trim=True, bos=True,
                         template_mark="[INST]"),
    # Llama 3 Instruct (Meta's template; each content trimmed, the answer "B<|eot_id|>")
    "llama3": ChatFormat("{bos}" + _LLAMA3_TURNS, end="<|eot_id|>", trim=True, bos=True, markup=_LLAMA3),
    # Llama 3.1 (and 3.2 / 3.3) Instruct: Llama 3's turns, the system turn opening with the knowledge-date lines its
    # template writes (the date the template falls back on: 3.2's and 3.3's write the day's date where the renderer
    # has strftime_now, which would make the prompt depend on the day the run started)
    "llama3_1": ChatFormat("{bos}" + _LLAMA3_TURNS.replace(
        "{system}", "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{system}", 1),
        end="<|eot_id|>", trim=True, bos=True, markup=_LLAMA3, template_mark="Cutting Knowledge Date"),
    "mistral": ChatFormat("{bos} [INST] {system}\n\n{user} [/INST]", lead=" ", bos=True),  # no system role
    # llava-hf's LLaVA-NeXT-Mistral template: a Llama-2 <<SYS>> block before [INST], not Mistral's system-in-[INST]
    "llava_mistral": ChatFormat("{bos} <<SYS>>\n{system}\n<</SYS>>\n\n[INST] {user} [/INST]", lead=" ", bos=True),
    # LLaVA's chatml_direct (LLaVA-NeXT-34B on Yi-34B; sep_style MPT): ChatML's turns with no newline between them,
    # as LLaVA trained it and the llava-hf card prompts it (its later chat_template.json writes one after <|im_end|>)
    "chatml_direct": ChatFormat("{bos}<|im_start|>system\n{system}<|im_end|><|im_start|>user\n{user}<|im_end|>"
                                "<|im_start|>assistant\n", end="<|im_end|>", markup=_CHATML),
    # Qwen3's hybrid models think first unless the template's enable_thinking=False writes an empty think block: the
    # letter is then the first token of the answer (after "<|im_start|>assistant\n" alone it is "<think>")
    "qwen3_nothink": ChatFormat("{bos}<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                                "<|im_start|>assistant\n<think>\n\n</think>\n\n", end="<|im_end|>", markup=_CHATML),
    "gemma": ChatFormat("{bos}<start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n",
                        end="<end_of_turn>", trim=True, bos=True, markup=("<start_of_turn>", "<end_of_turn>")),
    "idefics3": ChatFormat("{bos}System: {system}<end_of_utterance>\nUser:{user}<end_of_utterance>\nAssistant:",
                           end="<end_of_utterance>", lead=" ", text_sep=" ", bos=True, markup=("<end_of_utterance>",)),
}


def holds_tokens(tokenizer: Any, texts: Sequence[str]) -> bool:
    """Each of ``texts`` is one known token of the tokenizer (as it reads text: a special token, not its pieces)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    return all(len(ids := tokenizer.encode(t, add_special_tokens=False)) == 1 and (unk is None or ids[0] != unk)
               for t in texts)


def tokenizer_fits(fmt: ChatFormat, tokenizer: Any) -> bool:
    """The tokenizer is a model's trained on ``fmt``: it holds the format's markup tokens, and its own chat template
    (``chat_template``: a string, or named ones) holds the format's ``template_mark``."""
    if fmt.markup and not holds_tokens(tokenizer, fmt.markup):
        return False
    if not fmt.template_mark:
        return True
    template = getattr(tokenizer, "chat_template", None)
    templates = template.values() if isinstance(template, Mapping) else [template]
    return any(isinstance(t, str) and fmt.template_mark in t for t in templates)


def tokenizer_chat_format(family: Family, config: Mapping[str, Any], tokenizer: Any) -> str:
    """The ``CHAT_FORMATS`` key of a model of ``family`` and ``config`` read by ``tokenizer``: its row's for its LM
    type (``probe.lm_config.chat_format``) where the row has no ``chat_by_tokenizer``, ``chat_by_lm_tokenizer`` for
    its LM type nor ``chat_fallbacks``; else the first of those formats, that one and the fallbacks the tokenizer
    fits (``tokenizer_fits``), the last where none does. The ``llama`` row: SmolLM2 holds ChatML's tokens, Llama 3
    its header tokens (3.1's template writes knowledge-date lines), a Llama-2-chat tokenizer has an ``[INST]``
    template, and Vicuna-1.5's Llama-2 vocabulary has none of these (it would read ``<|im_start|>`` as ``<``, ``|``,
    …). The LLaVA rows: a Llama 3 LM's tokenizer
    holds its header tokens, a Vicuna or Mistral LM's keeps the row's format; LLaVA-NeXT on Yi-34B (a Llama LM
    whose tokenizer holds ChatML's tokens) takes LLaVA's ``chatml_direct``."""
    name = chat_format(family, config)
    lm_type = text_config_dict(config, family).get("model_type")
    candidates = (*family.chat_by_tokenizer, *(c for lm, c in family.chat_by_lm_tokenizer if lm == lm_type), name,
                  *family.chat_fallbacks)
    if len(candidates) == 1:
        return name
    return next((c for c in candidates if tokenizer_fits(CHAT_FORMATS[c], tokenizer)), candidates[-1])


def model_chat_format(loaded: LoadedModel) -> str:
    """The ``CHAT_FORMATS`` key a loaded model is prompted in (``tokenizer_chat_format``)."""
    return tokenizer_chat_format(loaded.family, loaded.ref.config, loaded.tokenizer)


def planned_chat_format(ref: Any, tokenizer: Any | None = None) -> dict[str, Any]:
    """The chat format a model will be prompted in, read from its tokenizer (``tokenizer``, or loaded here) before a
    weight loads: its name and markup, for a run's identity (probe.heads' and probe.eval's plans). The format is
    chosen by the tokenizer (vocabulary and chat template), not the config alone (``chat_fallbacks``), so parts
    scored under one format must never be resumed under another."""
    tokenizer = load_tokenizer(ref) if tokenizer is None else tokenizer
    name = tokenizer_chat_format(ref.family, ref.config, tokenizer)
    # template_mark only chooses the format (the name records the choice): left out, so runs planned before it
    # existed keep their fingerprints
    return {"name": name} | {k: v for k, v in asdict(CHAT_FORMATS[name]).items() if k != "template_mark"}


def render_chat(template: PromptTemplate, item: ItemLike, placeholders: str, chat: str = "chatml",
                bos: str = "") -> str:
    fmt = CHAT_FORMATS[chat]
    choices = "".join(template.choice.format(letter=l, option=o) for l, o in zip(item.letters, item.options))
    text = template.user.format(question=item.question, choices=choices)
    text = text.strip() if fmt.trim else text
    user = placeholders + text if placeholders else fmt.text_sep + text
    return fmt.prompt.format(bos=bos, system=template.system, user=user) + template.assistant_prefix


def turn_end_id(loaded: LoadedModel) -> int:
    """The token a trained answer ends with: the model's chat format's end of the assistant turn (ChatML's
    ``<|im_end|>``, Gemma's ``<end_of_turn>``, Idefics3's ``<end_of_utterance>``; Vicuna and Mistral end with EOS),
    else the tokenizer's EOS where its vocabulary lacks that token. (Fine-tuning took ``<|im_end|>`` for every
    family, which a Gemma or Llama tokenizer reads as its unknown token: it trained the model to end on that.)"""
    tok = loaded.tokenizer
    fmt = model_chat_format(loaded)
    for text in filter(None, (CHAT_FORMATS[fmt].end, tok.eos_token)):
        i = tok.convert_tokens_to_ids(text)
        if isinstance(i, int) and (i != tok.unk_token_id or text == tok.unk_token):
            return i
    raise BadInput(f"{loaded.ref.spec}: its tokenizer has neither {CHAT_FORMATS[fmt].end or 'an EOS token'!r} "
                   f"(the end of the assistant turn in its {fmt} chat format) nor an EOS token to end a trained "
                   "answer with")


def letter_token_ids(tokenizer: Any, letters: Sequence[str], lead: str = "", after: str = "") -> list[int]:
    """Token id of each option letter as the first generated token: the token ``lead`` + letter adds to ``after``
    (the end of the chat format's prompt: a sentencepiece tokenizer reads a letter after "\n" as ``A``, alone as
    ``▁A``); each must be a single known token. A vocabulary without one for the lead and some capital letter (the
    tiny byte-level ones split off " A") reads every letter bare, never some of each."""
    base = tokenizer.encode(after, add_special_tokens=False) if after else []

    def tokens(text: str) -> list[int]:
        full = tokenizer.encode(after + text, add_special_tokens=False)
        return full[len(base):] if full[:len(base)] == base else tokenizer.encode(text, add_special_tokens=False)

    unk = getattr(tokenizer, "unk_token_id", None)

    def single(toks: list[int]) -> bool:
        return len(toks) == 1 and (unk is None or toks[0] != unk)

    if lead and not all(single(tokens(lead + c)) for c in string.ascii_uppercase):
        lead = ""
    ids = []
    for letter in letters:
        toks = tokens(lead + letter)
        if not single(toks):
            raise BadInput(f"option letter {letter!r} is not a single token for this tokenizer ({toks})")
        ids.append(toks[0])
    return ids


OPENERS = "([{<'\"`"  # after these the letter is written bare: "(A", "'A"


def answer_lead(fmt: ChatFormat, assistant_prefix: str) -> str:
    """What is written between the prompt's end and the letter. Right after the chat format's prompt it is the
    format's ``lead``; after a template's ``assistant_prefix`` it is a space when the prefix ends in a word or
    punctuation ("The answer is" → " A", ``ĠA`` in byte-level BPE) and nothing when it ends in whitespace or an
    opening bracket or quote ("Answer: (" → "A"). (The letters used to be read as right after the chat format, so
    such a prefix scored p(answer) on tokens the model does not write there.)"""
    if not assistant_prefix:
        return fmt.lead
    return "" if assistant_prefix[-1].isspace() or assistant_prefix[-1] in OPENERS else " "


def answer_token_ids(loaded: LoadedModel, letters: Sequence[str],
                     template: PromptTemplate = PromptTemplate()) -> list[int]:
    """``letter_token_ids`` as the model's chat format, then the template's ``assistant_prefix``, end its prompt
    (``render_chat``) and the answer starts (``answer_lead``)."""
    # once per model, letters and prefix: a benchmark asks the same few again for every item (12 % of an
    # organism-vl item's preparation)
    key = (tuple(letters), template.assistant_prefix)
    cache = getattr(loaded, "answer_ids", {})  # a stand-in for a LoadedModel (a tokenizer and a family) has none
    if (ids := cache.get(key)) is None:
        fmt = CHAT_FORMATS[model_chat_format(loaded)]
        after = fmt.prompt.rsplit("{user}", 1)[1] + template.assistant_prefix
        ids = cache[key] = letter_token_ids(loaded.tokenizer, letters, answer_lead(fmt, template.assistant_prefix),
                                            after)
    return list(ids)


def item_modalities(item: ItemLike) -> tuple[str, ...]:
    return ("text",) + (("image",) if item.images else ()) + (("video",) if item.frames else ())


def can_read(ref: Any, item: ItemLike) -> bool:
    """The model's family row probes every modality the item has (probe.families.Family.modalities)."""
    return set(item_modalities(item)) <= set(ref.family.modalities)


def check_modalities(ref: Any, items: Sequence[ItemLike]) -> None:
    for item in items:
        if not can_read(ref, item):
            lacks = [m for m in item_modalities(item) if m not in ref.family.modalities]
            raise BadInput(f"item {item.id} has {' and '.join(lacks)} but {ref.spec} ({ref.family.name}) reads "
                           f"{' and '.join(ref.family.modalities)} only")


def special_in(text: str, specials: Sequence[str]) -> str | None:
    """The first of the model's special-token strings that ``text`` holds, or None."""
    return next((s for s in specials if s in text), None)


def check_item_text(items: Sequence[ItemLike], specials: Sequence[str], model: str) -> None:
    """Refuse items whose question or options hold one of the model's special-token strings: a literal
    ``<image>`` would ask a LLaVA processor for an image nobody passed, an ``<|im_end|>`` would end the turn.
    A video item's ``<video>`` reference is the data's own marker (probe.video keeps the frames' one)."""
    for item in items:
        question = item.question.replace(VIDEO_REF, "") if item.frames else item.question  # the set's own marker
        for text in (question, *item.options):
            if (hit := special_in(text, specials)) is not None:
                raise BadInput(f"item {item.id}: its text holds {hit!r}, which {model}'s tokenizer reads as a special "
                               "token (chat markup or a media placeholder), so the model would not see the item as "
                               "written; remove or reword it")


def check_template_text(template: PromptTemplate, specials: Sequence[str], model: str) -> None:
    """Refuse a prompt template (``--template``, ``--system-prompt``) holding one of the model's special-token
    strings, as an item's text is refused: an ``<|im_end|>`` in the system prompt ends the turn early, an
    ``<image>`` asks for an image nobody passed."""
    for name, value in template.to_dict().items():
        if (hit := special_in(value, specials)) is not None:
            raise BadInput(f"the prompt template's {name} text holds {hit!r}, which {model}'s tokenizer reads as a "
                           "special token (chat markup or a media placeholder; the chat format adds its own): remove "
                           "it from --template / --system-prompt")


def check_prompts(ref: Any, items: Sequence[ItemLike], template: PromptTemplate | None = None) -> Any | None:
    """Before any weight loads, for a model whose files are on disk (a hub alias still to download is checked as
    its items are built, by build_inputs): its tokenizer and (multimodal families) processor load as load_model
    will load them, the tokenizer is not empty, and neither an item's text nor ``template``'s holds one of its
    special tokens. Returns the tokenizer it loaded (None where it checked nothing), for ``planned_chat_format``:
    a GGUF's takes seconds to read."""
    if ref.hub_repo is not None or not items:
        return None
    from probe.models import load_processors, special_tokens

    tokenizer = load_processors(ref)[0]
    specials = special_tokens(tokenizer)
    if template is not None:
        check_template_text(template, specials, ref.spec)
    check_item_text(items, specials, ref.spec)
    return tokenizer


# build_inputs' token-aligned tensors: one value per prompt token (padded, not concatenated, when items share a
# batch). The type ids mark vision tokens (0: text): Qwen2-VL-style mm_token_type_ids, Gemma 3's token_type_ids
# (its image tokens attend bidirectionally in training).
TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")
TOKEN_KEYS = ("input_ids", "attention_mask", *TYPE_KEYS)


@dataclass(frozen=True)
class Prompt:
    """An item's chat text and decoded media, checked, before tokenisation (``build_inputs``' first half)."""

    text: str
    images: list[Image.Image]
    frames: list[Image.Image]


def render_prompt(loaded: LoadedModel, item: ItemLike, template: PromptTemplate,
                  image_max_side: int | None = None) -> Prompt:
    """The item's checks (modalities, special tokens in its text and the template's), its decoded images and frames,
    and its chat text with the family's placeholders."""
    fam = loaded.family
    check_modalities(loaded.ref, [item])
    if template not in loaded.checked_templates:  # the same template for a whole run: checked once a model
        check_template_text(template, loaded.special_tokens, loaded.ref.spec)
        loaded.checked_templates.add(template)
    check_item_text([item], loaded.special_tokens, loaded.ref.spec)
    images = item.pil_images(image_max_side)
    frames = item.pil_frames(image_max_side)
    placeholders = (fam.image_placeholder or "") * len(images)
    if frames:
        placeholders += fam.video_placeholder or ""
    chat = model_chat_format(loaded)
    bos = loaded.tokenizer.bos_token if CHAT_FORMATS[chat].bos and loaded.tokenizer.bos_token else ""
    return Prompt(render_chat(template, item, placeholders, chat, bos), images, frames)


def processor_kwargs(texts: list[str], images: list[Image.Image] | list[list[Image.Image]]) -> dict[str, Any]:
    """The processor call for prompts (one or several; several are padded, see ``encode_prompts``); ``images`` one
    flat list, or one list per prompt (``MediaLayout.nested``)."""
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "add_special_tokens": False}
    if images:
        kwargs["images"] = images
    if len(texts) > 1:
        kwargs["padding"] = True
    return kwargs


def processor_refuses(loaded: LoadedModel, item: ItemLike, exc: ValueError) -> BadInput:
    reason = str(exc).strip().split("\n")[0]
    return BadInput(f"item {item.id}: {loaded.ref.spec}'s processor refuses it ({reason}); drop or fix the item")


def encode_prompt(loaded: LoadedModel, item: ItemLike, prompt: Prompt) -> dict[str, torch.Tensor]:
    """The tokenised prompt (batch of 1) with its media tensors, on the CPU, as the tokenizer, the processor or
    probe.video build it."""
    if loaded.processor is None or prompt.frames:
        enc = loaded.tokenizer(prompt.text, return_tensors="pt", add_special_tokens=False)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if prompt.frames:
            # HF processors refuse video tokens without their (torchvision) video processor: probe.video
            # expands the placeholder of the tokenised prompt and adds the frame tensors itself.
            from probe.video import add_video_inputs

            try:
                batch = add_video_inputs(loaded, batch, prompt.frames)
            except BadInput:  # probe.video's own refusal says what it is (a ValueError too)
                raise
            except ValueError as exc:  # frames the processor's rules refuse, as they would an image (Qwen's 200:1)
                raise processor_refuses(loaded, item, exc) from None
        return batch
    try:
        return dict(loaded.processor(**processor_kwargs([prompt.text], prompt.images)))
    except ValueError as exc:  # an image the processor refuses (Qwen's: one side 200 times the other, or more)
        raise processor_refuses(loaded, item, exc) from None


def finish_inputs(loaded: LoadedModel, prompt: Prompt, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``build_inputs``' last half: the guards on what tokenisation gave, then the tensors on the model's device and
    (floating point) dtype."""
    check_model_inputs(loaded.model, batch)
    # media tokens are expanded by the processor (or probe.video), also where a question names its video inline
    # (LLaVA's "<video>"): the check counts the chat markup and BOS only
    media = tuple(filter(None, (loaded.family.image_placeholder, loaded.family.video_placeholder)))
    markup = prompt.text
    for placeholder in media:
        markup = markup.replace(placeholder, "")
    check_special_tokens_read(loaded.tokenizer, markup, batch["input_ids"],
                              [s for s in loaded.special_tokens if not any(s in m for m in media)])
    out = {}
    for k, v in batch.items():
        v = v.to(loaded.device)
        out[k] = v.to(loaded.dtype) if v.is_floating_point() else v
    return out


@dataclass(frozen=True)
class Encoded:
    """An item's rendered prompt and the CPU tensors its tokenisation gave (``encode_prompt``'s, batch of 1)."""

    prompt: Prompt
    batch: dict[str, torch.Tensor]


def build_inputs(
    loaded: LoadedModel, item: ItemLike, template: PromptTemplate, image_max_side: int | None = None,
    encoded: Encoded | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenised prompt (batch of 1) with pixel tensors, on the model's device and dtype. ``encoded``: the item's
    prompt already rendered and encoded (``encode_prompts``, for the same template and image side)."""
    if encoded is None:
        prompt = render_prompt(loaded, item, template, image_max_side)
        encoded = Encoded(prompt, encode_prompt(loaded, item, prompt))
    return finish_inputs(loaded, encoded.prompt, encoded.batch)


def _grid_rows(batch: dict[str, torch.Tensor], counts: list[int]) -> dict[str, list[int]]:
    """Qwen's processors: one ``image_grid_thw`` row per image, t·h·w ``pixel_values`` rows (patches) per image."""
    if "image_grid_thw" not in batch:
        return {}
    per_image = batch["image_grid_thw"].prod(-1).tolist()
    ends = [sum(counts[:p + 1]) for p in range(len(counts))]
    return {"pixel_values": [sum(per_image[e - n:e]) for e, n in zip(ends, counts)], "image_grid_thw": counts}


def _image_rows(batch: dict[str, torch.Tensor], counts: list[int]) -> dict[str, list[int]]:
    """LLaVA-1.5's and Gemma 3's processors: one ``pixel_values`` row per image, all of one size (no patches, no
    padding); InternVL's: one per patch, ``counts`` its prompts' patches (``MediaLayout.patches``)."""
    return {"pixel_values": counts} if "pixel_values" in batch else {}


ANYRES_KEYS = ("pixel_values", "image_sizes", "batch_num_images")


def _anyres_rows(batch: dict[str, torch.Tensor], counts: list[int]) -> dict[str, list[int]]:
    """LLaVA-NeXT's and -OneVision's processors: one row per image of ``pixel_values`` (its patches, padded to the
    call's most), ``image_sizes`` and (OneVision) ``batch_num_images`` (each 1: the images come as one flat list,
    so each is patched as a prompt's only image, in one prompt's call as in a window's)."""
    return {k: counts for k in ANYRES_KEYS if k in batch}


@dataclass(frozen=True)
class MediaLayout:
    """How a processor's output for several prompts holds each prompt's own output (``encode_prompt``'s): media rows
    concatenated, token rows padded. ``rows``: how many rows of each media tensor a prompt's images take.
    ``anyres``: the model type whose patch count (``probe.upstream.anyres_patches``) tells an image's
    ``pixel_values`` patches from the call's padding — the cut keeps as many as its own most, as its own call
    pads — and whose items' image tokens must be the processor's own count for their ``image_sizes``
    (``_cuts_hold_their_media``); None: no padding inside media rows, and a constant number of image tokens per
    media row across the call. ``call_items``: the most prompts a call takes (None: a whole window). ``nested``:
    the call takes its images as one list per prompt (Gemma 3's processor reads a flat list as one prompt's images
    and refuses several prompts with it). ``patches``: an image takes as many media rows as the processor's own
    count of its patches (``probe.upstream.processor_image_patches``; InternVL's tiles and thumbnail, which its
    output does not give), so ``rows`` is given each prompt's patches, not its images."""

    rows: Callable[[dict[str, torch.Tensor], list[int]], dict[str, list[int]]]
    anyres: str | None = None
    call_items: int | None = None
    nested: bool = False
    patches: bool = False


def _media_counts(loaded: LoadedModel, layout: MediaLayout, prompts: Sequence[Prompt]) -> list[int] | None:
    """What ``MediaLayout.rows`` counts for each prompt: its images, or (``patches``) their patches by the
    processor's own count for their sizes (None where the release does not give it). No processor call."""
    counts = [len(p.images) for p in prompts]
    if not layout.patches or not any(counts):
        return counts
    sizes = torch.tensor([[im.height, im.width] for p in prompts for im in p.images])
    patches = processor_image_patches(loaded.processor, sizes)
    return None if patches is None else _per_prompt(patches, counts)


def _per_prompt(per_image: Sequence[int], counts: Sequence[int]) -> list[int]:
    """Per prompt, the sum of its images' ``per_image`` values (the images in prompt order, ``counts`` a prompt)."""
    return [sum(per_image[e - n:e]) for e, n in zip(accumulate(counts), counts)]


def _own_padding(loaded: LoadedModel, layout: MediaLayout,
                 media: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """An anyres cut's ``pixel_values`` with the window's patch padding cut back to its own call's (its images'
    most patches; none for one image alone), or None where what is cut off is not padding (zeros) or an image's
    last patch is (the patch count misread): the call's items are then encoded one by one. No processor call."""
    if layout.anyres is None or "pixel_values" not in media:
        return media
    pixels = media["pixel_values"]
    if "image_sizes" not in media:
        return None
    patches = anyres_patches(layout.anyres, loaded.processor, media["image_sizes"], pixels.shape[-1])
    if patches is None or pixels.dim() != 5 or len(patches) != len(pixels) or max(patches) > pixels.shape[1]:
        return None
    for row, n in zip(pixels, patches):
        if row[n:].any() or not row[n - 1].any():
            return None
    return {**media, "pixel_values": pixels[:, :max(patches)]}


def _cuts_hold_their_media(loaded: LoadedModel, cuts: list[Encoded], layout: MediaLayout) -> bool:
    """Whether each cut's image tokens and media rows agree, as its own call's do (``layout``: the processor's
    ``MEDIA_ROWS`` entry, the one its call was cut by). Anyres (LLaVA-NeXT, -OneVision),
    where an image's tokens follow its size: exactly the processor's own count for the cut's ``image_sizes``
    (one count for the call). Otherwise as many image tokens as its ``pixel_values`` rows give at the window's
    tokens per row (Qwen: a patch's 1/merge², LLaVA-1.5: an image's tokens, the same for every image;
    InternVL: a tile's image_seq_length, its rows cut by the processor's own count of an image's tiles), and with
    Qwen's grids one grid row per image of the prompt and the patches they name. Token rows are cut by their own
    row of the call, media rows by ``MEDIA_ROWS``' offsets: a misread of those offsets gives an item another item's
    rows, which this sees wherever the two differ in image count or size. Not seen: middle items' media swapped
    between images of one processed shape (organism-ov-si's are all 64 px), which only the ends' calls would see
    where they take part. No cheap independent checksum sees it either: the rows are resized (and cropped or
    padded) pixels, so a sum of an image's rows is not one of its own pixels, and the nearest such match by channel
    means names another image for 46 of organism-ov-si's 96 (their colours differ less than a resize moves them).
    No processor call."""
    image_token = getattr(loaded.processor, "image_token", None)
    token = loaded.tokenizer.convert_tokens_to_ids(image_token) if isinstance(image_token, str) else None
    if not is_int(token):
        return False
    tokens = [int((enc.batch["input_ids"] == token).sum()) for enc in cuts]
    if layout.anyres is not None:
        sizes = [enc.batch["image_sizes"] if "image_sizes" in enc.batch else torch.zeros(0, 2, dtype=torch.long)
                 for enc in cuts]
        if any(len(s) != len(enc.prompt.images) for s, enc in zip(sizes, cuts)):
            return False
        per_image = processor_image_tokens(loaded.processor, torch.cat(sizes)) if any(map(len, sizes)) else []
        if per_image is None:
            return False
        return tokens == _per_prompt(per_image, [len(s) for s in sizes])
    rows = []
    for enc in cuts:
        n = enc.batch["pixel_values"].shape[0] if "pixel_values" in enc.batch else 0
        grid = enc.batch.get("image_grid_thw")
        if grid is not None and (grid.shape[0] != len(enc.prompt.images) or int(grid.prod(-1).sum()) != n):
            return False
        rows.append(n)
    held, given = sum(tokens), sum(rows)
    return (held == 0) == (given == 0) and all(t * given == n * held for t, n in zip(tokens, rows))


# Processors whose output for several prompts is each prompt's own output (``encode_prompt``), padded and
# concatenated: how many rows of each media tensor a prompt's images take, and (anyres) the padding of its
# patches. Not here, as one call a window would save too little of their input building (random-config models as
# the tests build them, 1 thread, CPU time, medians of 6-8 alternating rounds, 2026-12-06): Idefics3's processor
# (it pads across prompts on the image dimension), 0.91 ms an item one call an item and 0.80 ms one raw call a
# window of 32 plus the run-time check's two calls, before any cut or check of its own (12 %, 9 % in another run;
# InternVL's: 30 %); and video items (probe.video builds those with the tokenizer and the image processor, one call
# each an item: on organism-video's set the frames' image processing was 1.77 of about 2.3 ms an item, 1.69 in calls
# of 2 to 8 items' frames and 2.19 in calls of 32; the tokenizer's 0.12 ms, 0.11 in one call: at most 4 %; since
# 2026-12-06 the frames take 0.98 of 1.69 ms, their anyres base view alone: README, Performance). Their
# items are encoded one by one. tests/test_families.py checks each row's split against the one-prompt call, tensor
# for tensor.
_GRID = MediaLayout(_grid_rows)
MEDIA_ROWS = {"Qwen2VLProcessor": _GRID, "Qwen2_5_VLProcessor": _GRID, "Qwen3VLProcessor": _GRID,
              "Qwen2_5OmniProcessor": _GRID, "LlavaProcessor": MediaLayout(_image_rows),
              "LlavaNextProcessor": MediaLayout(_anyres_rows, anyres="llava_next"),
              # OneVision's replace_image_token walks batch_num_images (a tensor) from its start for every image:
              # its time grows with the square of the call's images (organism-ov-si's image set repeated to 256
              # items, CPU time of input building: 2.1 ms an item in one call, 1.4 in calls of 32 or 16, 1.8 alone)
              "LlavaOnevisionProcessor": MediaLayout(_anyres_rows, anyres="llava_onevision", call_items=32),
              # one pixel row per image as long as pan-and-scan is off (its default; its crops would add rows, which
              # the rows' sum then refuses), a text-only prompt's list empty; one <start_of_image> per row
              "Gemma3Processor": MediaLayout(_image_rows, nested=True),
              # one pixel row per patch (tile or thumbnail), all of the tile size; the processor's own patch count
              # per image size cuts them, and an image's <IMG_CONTEXT> tokens are image_seq_length a patch
              "InternVLProcessor": MediaLayout(_image_rows, patches=True)}


def encode_prompts(loaded: LoadedModel, items: Sequence[ItemLike], template: PromptTemplate,
                   image_max_side: int | None = None) -> list[Encoded | None]:
    """Per item, what ``encode_prompt`` gives it, from one processor call over the items (their prompts padded,
    then cut apart again; a call over ``MediaLayout.call_items`` at most), or None where that call cannot serve it:
    ``build_inputs`` then encodes it alone. A processor call's own overhead (keyword checks, tensor conversions)
    was half of organism-vl's preparation item by item; this way it is paid once per window. Only for processors
    in ``MEDIA_ROWS``, and never for video items (``probe.video`` builds those). An item that fails its checks ends
    the batched part there: it and the items after it are left to ``build_inputs``, which stops at it with its own
    message, as item by item."""
    out: list[Encoded | None] = [None] * len(items)
    layout = MEDIA_ROWS.get(type(loaded.processor).__name__) if loaded.processor is not None else None
    if layout is None:
        return out
    prompts: dict[int, Prompt] = {}
    for i, item in enumerate(items):
        if item.frames:  # not decoded here only to be decoded again by build_inputs
            continue
        try:
            prompts[i] = render_prompt(loaded, item, template, image_max_side)
        except BadInput:
            break
    order = list(prompts)
    size = layout.call_items or len(order) or 1
    for s in range(0, len(order), size):
        for i, enc in _one_call(loaded, layout, items, {i: prompts[i] for i in order[s:s + size]}).items():
            out[i] = enc
    return out


def _one_call(loaded: LoadedModel, layout: MediaLayout, items: Sequence[ItemLike],
              prompts: dict[int, Prompt]) -> dict[int, Encoded]:
    """``encode_prompts``' cuts of one processor call over these prompts (by item index), checked; empty where the
    call cannot serve them (fewer than two, an image it refuses, a layout it does not know, a check that fails)."""
    if len(prompts) < 2:
        return {}
    texts = [p.text for p in prompts.values()]
    images = [im for p in prompts.values() for im in p.images]
    try:
        batch = dict(loaded.processor(**processor_kwargs(
            texts, [p.images for p in prompts.values()] if layout.nested and images else images)))
    except ValueError:  # an image it refuses: each item alone, so the message names the item
        return {}
    counts = _media_counts(loaded, layout, list(prompts.values()))
    if counts is None:
        return {}
    rows = layout.rows(batch, counts)
    media = [k for k in batch if k not in TOKEN_KEYS]
    if set(rows) != set(media) or any(sum(rows[k]) != batch[k].shape[0] for k in media):
        return {}  # not the layout MEDIA_ROWS knows (a new release): item by item, as before
    out: dict[int, Encoded] = {}
    start = dict.fromkeys(media, 0)
    for r, (i, prompt) in enumerate(prompts.items()):
        real = batch["attention_mask"][r].bool()
        one = {}
        for k, v in batch.items():
            if k not in media:
                one[k] = v[r][real][None]  # the padding cut off
            elif rows[k][r]:
                one[k] = v[start[k]:start[k] + rows[k][r]]
                start[k] += rows[k][r]
        own = _own_padding(loaded, layout, one)
        if own is None:
            return {}  # not padding where the patch count says: item by item, as before
        out[i] = Encoded(prompt, own)
    # run-time check, as probe.batch's guard checks the forward: the first and the last item with images (the cuts'
    # offsets add up over the whole call to the last) encoded alone must give their cuts, tensor for tensor; a
    # release whose layout differs would otherwise feed items their neighbours' pixels without a word, and the
    # guard measures the same inputs alone. It costs two calls a call. The items between them are checked
    # without a call (a misread there leaves both ends right): their image tokens against their media rows.
    if not _cuts_hold_their_media(loaded, list(out.values()), layout):
        return {}
    with_images = [i for i, p in prompts.items() if p.images] or list(prompts)
    for i in sorted({with_images[0], with_images[-1]}):
        want, got = encode_prompt(loaded, items[i], prompts[i]), out[i].batch
        if list(want) != list(got) or any(want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])
                                          for k in want):
            return {}  # item by item, as before
    return out
