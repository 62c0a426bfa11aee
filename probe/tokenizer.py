"""An offline byte-level BPE tokenizer carrying the special tokens of the Qwen2 / Qwen2-VL / LLaVA families.

No hub is reachable here, so tiny test models and the trained organisms use a tokenizer trained locally with
the `tokenizers` library. Single capital letters are guaranteed to be single tokens (the probe reads the logits
of option letters at the first generated position).
"""
from __future__ import annotations

import string
from typing import Callable, Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
# Qwen2's pre-tokenization (digits one by one). transformers 5 rebuilds it whenever a directory loads as
# Qwen2Tokenizer (AutoTokenizer does for model_type "qwen2" but not for "qwen2_vl"), so a tokenizer.json that
# carried anything else would read text differently depending on which model it sits next to.
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
)

# The config attributes that name this tokenizer's media tokens, per family whose builds set them (probe.tiny,
# probe.archs, the organisms of probe.zoo): the one place a tiny model's image/video token ids come from.
_QWEN_VISION_TOKENS = (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))
MEDIA_TOKENS: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen2_vl": _QWEN_VISION_TOKENS,
    "qwen2_5_vl": _QWEN_VISION_TOKENS,
    "qwen3_vl": _QWEN_VISION_TOKENS,
    "llava_onevision": (("image_token_id", "<image>"), ("video_token_id", "<video>")),
}


def media_ids(family: str, ids: Callable[[str], int]) -> dict[str, int]:
    """``family``'s config attributes naming its media tokens (MEDIA_TOKENS; none for a family not there), each
    the id ``ids`` (a tokenizer's ``convert_tokens_to_ids``) gives its token."""
    return {attr: ids(token) for attr, token in MEDIA_TOKENS.get(family, ())}


# ChatML, rendering HF content lists; `image_token`/`video_token` are substituted per family.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}__IMAGE__"
    "{% elif part['type'] == 'video' %}__VIDEO__"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template_for(image_placeholder: str | None, video_placeholder: str | None) -> str:
    return CHAT_TEMPLATE.replace("__IMAGE__", image_placeholder or "").replace(
        "__VIDEO__", video_placeholder or ""
    )


def special_ids(tok: PreTrainedTokenizerBase) -> dict[str, int]:
    """A config's text special ids for a tokenizer of ``build_tokenizer``: BOS and padding ``<|endoftext|>``, EOS the
    end of a ChatML turn ``<|im_end|>`` (Qwen2's choice), in that order."""
    ids = tok.convert_tokens_to_ids
    return {"bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>")}


def build_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 1024,
    image_placeholder: str | None = "<|vision_start|><|image_pad|><|vision_end|>",
    video_placeholder: str | None = "<|vision_start|><|video_pad|><|vision_end|>",
    extra_special: tuple[str, ...] = (),
    named_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` (deterministic for a fixed corpus) and wrap it for transformers.

    ``extra_special`` are further special tokens, appended after the learnt vocabulary (existing ids do not move);
    ``named_tokens`` become tokenizer attributes some processors read (Gemma 3's ``boi_token``, InternVL's
    ``context_image_token``, ...)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Letters and digits on their own so option letters are single tokens whatever the corpus.
    seed_lines = [" ".join(string.ascii_uppercase), " ".join(string.digits)]
    tok.train_from_iterator(list(seed_lines) + list(corpus), trainer)
    # Family tokens go after the learnt vocabulary (as real checkpoints append theirs), so every other id is the
    # same as in the plain tokenizer: a tiny Qwen2.5 base and a tiny Omni thinker share their common rows.
    tok.add_special_tokens([t for t in extra_special if t not in SPECIAL_TOKENS])
    # Served with Qwen2's pre-tokenizer; the merges above stay as learnt (multi-digit ones simply go unused).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        model_max_length=32768,
        **({"extra_special_tokens": dict(named_tokens)} if named_tokens else {}),
    )
    wrapped.chat_template = chat_template_for(image_placeholder, video_placeholder)
    return wrapped
