"""Turn an MMMU item into model inputs: a configurable ChatML prompt plus the family's image placeholders.

The template is recorded in run.json. Placeholders come from the family table; the HF processor expands them to
the right number of image tokens (we build the chat text ourselves so no processor chat template, and hence no
video processor / torchvision, is needed).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

import torch
from PIL import Image

from probe.errors import BadInput
from probe.models import LoadedModel


class ItemLike(Protocol):
    id: str
    question: str
    options: tuple[str, ...]
    answer: str
    images: tuple[bytes, ...]
    frames: tuple[bytes, ...]

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


def render_chat(template: PromptTemplate, item: ItemLike, placeholders: str) -> str:
    choices = "".join(template.choice.format(letter=l, option=o) for l, o in zip(item.letters, item.options))
    user = template.user.format(question=item.question, choices=choices)
    return (
        f"<|im_start|>system\n{template.system}<|im_end|>\n"
        f"<|im_start|>user\n{placeholders}{user}<|im_end|>\n"
        f"<|im_start|>assistant\n{template.assistant_prefix}"
    )


def letter_token_ids(tokenizer: Any, letters: Sequence[str]) -> list[int]:
    """Token id of each option letter as the first generated token; each must be a single token."""
    ids = []
    for letter in letters:
        toks = tokenizer.encode(letter, add_special_tokens=False)
        if len(toks) != 1:
            raise BadInput(f"option letter {letter!r} is not a single token for this tokenizer ({toks})")
        ids.append(toks[0])
    return ids


def check_modalities(ref: Any, items: Sequence[ItemLike]) -> None:
    """A text-only model (no placeholder in its family row) cannot take image or video items."""
    for item in items:
        if (item.images and ref.family.image_placeholder is None) or (
                item.frames and ref.family.video_placeholder is None):
            raise BadInput(f"item {item.id} has images or video but {ref.spec} ({ref.family.name}) is text-only")


def build_inputs(
    loaded: LoadedModel, item: ItemLike, template: PromptTemplate, image_max_side: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenised prompt (batch of 1) with pixel tensors, on the model's device and dtype."""
    fam = loaded.family
    check_modalities(loaded.ref, [item])
    images = item.pil_images(image_max_side)
    frames = item.pil_frames(image_max_side)
    placeholders = (fam.image_placeholder or "") * len(images)
    if frames:
        placeholders += fam.video_placeholder or ""
    text = render_chat(template, item, placeholders)
    if frames and images:
        raise BadInput(f"item {item.id} has both images and video; one modality per item is supported")
    if loaded.processor is None or frames:
        enc = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if frames:
            # HF processors refuse video tokens without their (torchvision) video processor: probe.video
            # expands the placeholder of the tokenised prompt and adds the frame tensors itself.
            from probe.video import add_video_inputs

            batch = add_video_inputs(loaded, batch, frames)
    else:
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        batch = dict(loaded.processor(**kwargs))
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            continue
        v = v.to(loaded.device)
        out[k] = v.to(loaded.dtype) if v.is_floating_point() else v
    return out
