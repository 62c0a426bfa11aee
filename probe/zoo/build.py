"""Build the organisms: data → tokenizer → organism-base (from scratch) → vl / ov-si / video (LM from base).

Every model is trained on exactly the probe's prompt (``probe.prompting.build_inputs`` with the default
``PromptTemplate``), loss on the answer letter and ``<|im_end|>``, so the first generated token is the letter.
Models are built from configs, saved as ordinary HF directories, and loaded back through ``probe.models`` — the
same code path as a real checkpoint. Shipped weights are bfloat16; quality is measured on the saved weights.
Deterministic: fixed seeds, string-seeded ``random.Random`` data, single-threaded data preparation.
"""
from __future__ import annotations

import functools
import json
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, TypeVar

import torch

from probe.families import FAMILIES
from probe.metrics import option_log_probs, prob_choice
from probe.models import NO_HUB_KERNELS
# a build's own records (build.json, organism.json, quality.json) are read with json_object: a missing or damaged
# one (cut mid-write, edited) vouches for nothing, so it is rebuilt, --only asks for base and ship refuses
from probe.results import WRITER_TAG, json_object, partial_path, remove_stale_dirs
from probe.tiny import save_model_dir
from probe.prompting import PromptTemplate
from probe.train import TrainConfig, collate, encode, is_lm_param, model_inputs
from probe.train import train as train_loop
from probe.zoo import tasks_image, tasks_text, tasks_video

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

    from probe.models import LoadedModel

TEMPLATE = PromptTemplate()
Item = TypeVar("Item")
IMAGE_SIZE = 64
VL_SUBJECTS = ("Colour_Shape", "Counting", "Spatial", "Comparison")
SI_SUBJECTS = ("Colour_Shape", "Counting", "Spatial")
# Text includes "Scenes": the image questions with each picture described in words, so organism-base already
# answers them from text and the extensions mostly have to make image tokens read like those words (as a
# real VLM starts from an LM that already talks about colours).
TEXT_SUBJECTS = (*tasks_text.SUBJECTS, "Scenes")
MODALITY_SUBJECTS = {"text": TEXT_SUBJECTS, "image": VL_SUBJECTS, "image_single": SI_SUBJECTS,
                     "video": tasks_video.SUBJECTS}
LM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
          num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False,
          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


@dataclass(frozen=True)
class Stage:
    """One training stage: its steps and each part's learning rate (0 freezes the part), warm-up then cosine."""

    steps: int
    lm_lr: float
    projector_lr: float = 0.0  # Qwen2-VL's merger, LLaVA's projector and row newline
    tower_lr: float = 0.0
    warmup: int = 50
    name: str = ""


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    batch: int = 24
    vision_steps: int = 0  # pretrain_vision steps before the stages (the tower's own CLIP/SigLIP-like training)
    text_mix: float = 0.0  # share of the training pool drawn from the text training set (all its subjects)
    image_mix: float = 0.0  # share drawn from the single-image training set (LLaVA-Video mixes OneVision data in)
    vision_head: str = "token"  # pretrain_vision's head: "token" (shared per token) or "flat" (all tokens at once)
    vision_tags: str = ""  # extra per-token targets of the token head, comma-separated: "cell", "frame", "word"
    stands_for: str = ""  # the real recipe this one mirrors (README, quality.json)

    @property
    def lm_lr_steps(self) -> float:
        """Σ LM rate × steps over the stages: how hard the LM was trained (the shift it should cause)."""
        return sum(s.lm_lr * s.steps for s in self.stages)


# The extensions mirror the real models' recipes (issue 19; README "The recipe, and why"), scaled to minutes:
# - vl like Qwen2-VL (Wang et al. 2024, §2.2): the most extensive fine-tuning of the family, full parameters; ViT
#   trained with the LLM frozen, then every parameter, then the LLM with the ViT frozen (the merger belongs to
#   Qwen2-VL's ViT); the LM trained longest and hardest.
# - ov-si like LLaVA-OneVision-SI (Li et al. 2024): the projector aligned first with LM and tower frozen (lr 1e-3),
#   then the whole model with the LM at a lower rate and the tower 5× below it (LLaVA: LM 1e-5, tower 2e-6).
# - video like LLaVA-Video (Zhang et al. 2024): LLaVA-OneVision's recipe on video, with single-image data mixed in
#   as LLaVA-Video's training mixes OneVision data; no text replay (paper question 1 in miniature).
# organism-base: text from scratch, one stage. The vision pretraining (stand-in for CLIP/SigLIP) precedes all.
# Step counts and video's batch of 16 (a batch of clips costs twice one of pictures) fit the build into 20 min on
# 2 cores; what each cut cost is measured in the README.
FULL = {
    "base": Recipe((Stage(900, 3e-3),)),
    "vl": Recipe((Stage(100, 0.0, 5e-4, 5e-4, name="ViT, LLM frozen"),
                  Stage(1000, 1e-3, 5e-4, 5e-4, name="all parameters"),
                  Stage(150, 1e-3, 0.0, 0.0, name="LLM, ViT frozen")),
                 vision_steps=150, text_mix=0.2, vision_tags="cell,word",
                 stands_for="Qwen2-VL: ViT with the LLM frozen, then full-parameter, then LLM-only instruction tuning"),
    "ov-si": Recipe((Stage(100, 0.0, 1e-3, 0.0, warmup=20, name="projector alignment"),
                     Stage(500, 2e-4, 2e-4, 4e-5, name="full model, LM at a lower rate")),
                    vision_steps=150, text_mix=0.3,
                    stands_for="LLaVA-OneVision-SI: projector alignment (LM and tower frozen), then the full model "
                    "with the LM at 1e-5 and the tower at 2e-6"),
    "video": Recipe((Stage(200, 0.0, 1e-3, 0.0, warmup=20, name="projector alignment"),
                     Stage(1000, 4e-4, 4e-4, 8e-5, name="full model on video + single images")),
                    batch=16, vision_steps=300, vision_head="flat", image_mix=0.2,
                    stands_for="LLaVA-Video: LLaVA-OneVision's stages on video, OneVision image data mixed in"),
}
# Own-modality accuracy every shipped organism reaches (tests/test_zoo.py; a build that misses it is not shipped).
BAR = 0.9
# Items per subject per split.
FULL_DATA = {"train": 1500, "validation": 32}
QUICK_DATA = {"train": 24, "validation": 8}


_TAG = ""  # the organism being built: extensions log from two processes at once


def log(msg: str) -> None:
    print(f"[zoo {time.strftime('%H:%M:%S')}{_TAG}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- data


def build_data(root: Path, sizes: dict[str, int], seed: int = 0, held_out: str | None = None) -> dict[str, Path]:
    """MMMU-format parquet per modality: text, image (4 subjects), image_single (3), video (3).

    The generators draw each split independently, and three subjects are small closed sets that 1,500 draws
    enumerate whole (Knowledge's 36 facts, Colour_Shape's 160 and Spatial's 80 items; README, "How held out is
    'held out'?"), so a train split drawn as is holds every validation item of those (at 1,500 per subject: 61 of
    128 text, 76 of 128 image, 78 of 96 single-image and 32 of 96 video items in all). With ``held_out`` (e.g.
    "validation") every other split drops the items of that split of every modality (the image and single-image
    sets share those scenes), which measures generalisation to the combinations left out.
    """
    from probe.synthetic import write_mmmu_parquet

    out = {}
    tasks_text.build_text_dataset(root / "text", sizes, seed)
    for split, n in sizes.items():
        write_mmmu_parquet({"Scenes": tasks_image.generate_text_rows(n, seed, split)}, root / "text", split)
    out["text"] = root / "text"
    for modality in ("image", "image_single"):
        for split, n in sizes.items():
            rows = {s: tasks_image.generate_rows(n, f"{seed}:{modality}", s, split, IMAGE_SIZE)
                    for s in MODALITY_SUBJECTS[modality]}
            write_mmmu_parquet(rows, root / modality, split)
        out[modality] = root / modality
    tasks_video.build_video_dataset(root / "video", sizes, seed, IMAGE_SIZE)
    out["video"] = root / "video"
    if held_out in sizes:
        held = split_keys(out.values(), held_out)
        for d in out.values():
            for split in sizes:
                if split != held_out:
                    drop_items(d, split, held)
    return out


def split_keys(dirs: Iterable[Path], split: str,
               keys: Sequence[Callable[[dict[str, Any]], tuple | None]] | None = None) -> set[tuple]:
    """The ``item_key`` (or each of ``keys``; a None key is no key) of every item of ``split`` in the MMMU-layout
    ``dirs``."""
    import pyarrow.parquet as pq

    rows = [r for d in dirs for f in sorted(d.glob(f"*/{split}-*.parquet")) for r in pq.read_table(f).to_pylist()]
    return {k for key in keys or (item_key,) for k in map(key, rows) if k is not None}


def drop_items(d: Path, split: str, held: set[tuple], n: int | None = None) -> list[str]:
    """Rewrite each subject's ``split`` file of MMMU-layout ``d`` without the items whose ``item_key`` is in
    ``held``, keeping the first ``n`` (all when None) and renumbering ids 1 … k; returns the subjects left with
    fewer than ``n``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    short = []
    for f in sorted(d.glob(f"*/{split}-*.parquet")):
        table = pq.read_table(f)
        kept = [r for r in table.to_pylist() if item_key(r) not in held and content_key(r) not in held][:n]
        short += [f.parent.name] if n is not None and len(kept) < n else []
        for i, r in enumerate(kept):  # ids (and image and frame names, which carry them) numbered 1 … k
            old, new = r["id"], f"{split}_{f.parent.name}_{i + 1}"
            r["id"] = new
            for picture in [r.get(f"image_{k}") for k in range(1, 8)] + list(r.get("video") or []):
                if picture and picture.get("path"):
                    picture["path"] = picture["path"].replace(f"{old}_", f"{new}_", 1)
        pq.write_table(pa.Table.from_pylist(kept, schema=table.schema), f, compression="zstd")
    return short


def _png_pixels(png: bytes) -> bytes:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB").tobytes()


def item_key(row: dict[str, Any]) -> tuple:
    """What makes two rows the same item: question, options and the pixels of every image and video frame (not
    their PNG bytes, which another Pillow may encode differently)."""
    pictures = [row[f"image_{k}"]["bytes"] for k in range(1, 8) if row.get(f"image_{k}")]
    frames = [f["bytes"] for f in row.get("video") or []]
    return row["question"], row["options"], tuple(map(_png_pixels, pictures)), tuple(map(_png_pixels, frames))


def content_key(row: dict[str, Any]) -> tuple | None:
    """What an item asks of what it shows, apart from wording, modality and continuous detail: two items with the
    same content key are near-duplicates that ``item_key`` tells apart. None for items whose ``item_key`` is their
    content already.

    - a scene question (image, single-image, and organism-base's Scenes, which describes the same scenes in words):
      its kind and each scene's set of (shape, colour, slot). A Scenes item lists its shapes in draw order, so
      "red circle left, blue star top." and "blue star top, red circle left." are one item, and both are the image
      item that shows that scene with that question.
    - a Motion clip: its question (colour, shape), answer (direction) and static distractor; where across the
      frame the path runs is a continuous draw whose clips differ in a few pixels.
    """
    explanation = json.loads(row.get("explanation") or "{}")
    if explanation.get("scenes"):  # an image item (Comparison keeps its two scenes in order: the answer names one)
        scenes = tuple(tuple(sorted((s["kind"], s["colour"], s["slot"]) for s in sc["shapes"]))
                       for sc in explanation["scenes"])
        return "scene", explanation["kind"], scenes
    if explanation.get("kind") in tasks_image.BUILDERS:  # a Scenes item: its scenes only in the question's words
        groups = re.split(r"Image \d+:", row["question"])
        scenes = tuple(tuple(sorted((kind, colour, slot) for colour, kind, slot in _SHAPE_WORDS.findall(g)))
                       for g in groups if _SHAPE_WORDS.search(g))
        return "scene", explanation["kind"], scenes
    frames = explanation.get("frames")
    if frames and row["question"].startswith("<video> Which way does the"):
        distractor = tuple(frames[0][0]) if len(frames[0]) > 1 else None
        return "motion", row["question"], row["answer"], distractor
    return None


_SHAPE_WORDS = re.compile(rf"\b({'|'.join(tasks_image.COLOUR_OPTIONS)}) ({'|'.join(tasks_image.SHAPE_OPTIONS)}) "
                          rf"({'|'.join(tasks_image.POSITION_OPTIONS)})\b")


def held_out_keys() -> set[tuple]:
    """The items of the shipped validation sets, every modality (what every report is measured on): their
    ``item_key`` and their ``content_key`` (a near-duplicate of a validation item is held out with it)."""
    from probe.zoo import validation_dir

    return split_keys(map(validation_dir, MODALITY_SUBJECTS), "validation", (item_key, content_key))


def build_fresh_data(root: Path, n: int, seed: int, split: str = "train") -> dict[str, Path]:
    """``n`` items per subject of every modality, none of them an item of the shipped validation sets or a
    near-duplicate of one (``content_key``).

    Each subject draws twice as many (more if needed), drops the validation items, keeps the first ``n`` and
    renumbers them (24 per subject at seed 1 would otherwise repeat, within each modality alone, 12 of 128 text,
    13 of 128 image, 16 of 96 single-image and 1 of 96 video validation items).
    """
    from probe.errors import BadInput

    tmp = root.parent / f".{root.name}.draw"  # not partial_dir: a draw short of items is discarded and redrawn larger
    held = held_out_keys()  # once: it decodes every validation picture and frame
    for factor in (2, 4, 8, 16):
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            dirs = build_data(tmp, {split: factor * n}, seed)
            short = [f"{m}/{s}" for m, d in dirs.items() for s in drop_items(d, split, held, n)]
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not short:
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
            return {m: root / m for m in dirs}
        shutil.rmtree(tmp, ignore_errors=True)
    raise BadInput(f"fewer than {n} items outside the validation sets in {', '.join(short[:3])}: ask for fewer")


def tokenizer_corpus(seed: int = 0) -> list[str]:
    from probe.synthetic import ALL_KINDS, QUESTION_BUILDERS

    # the prompt template's fixed words: its user turn with nothing filled in
    corpus = [TEMPLATE.system, TEMPLATE.user.format(question="", choices=""), "user assistant system"]
    for s in tasks_text.SUBJECTS:
        for r in tasks_text.generate_rows(200, f"tok{seed}", s, "train"):
            corpus.append(r["question"] + " " + " ".join(eval_list(r["options"])))
    rng = random.Random(f"omniprobe-tok:{seed}")
    for _ in range(100):
        for k in ALL_KINDS:
            q = QUESTION_BUILDERS[k](rng, False)
            corpus.append(q.text + " " + " ".join(q.options))
    for s in tasks_video.SUBJECTS:  # one generator per subject: changing one task leaves the others' text alone
        vrng = random.Random(f"omniprobe-tok:{seed}:{s}")
        for _ in range(100):
            text, options, _, _ = tasks_video.BUILDERS[s](vrng, 4)
            corpus.append(text + " " + " ".join(options))
    return corpus


def eval_list(s: str) -> list[str]:
    import ast

    return list(ast.literal_eval(s))


# ------------------------------------------------------------------------------------------- models


def init_organism(name: str, tok: PreTrainedTokenizerBase, out_dir: Path, base_dir: Path | None, seed: int) -> Path:
    """Write an untrained organism (LM copied from organism-base when given) with tokenizer and processor."""
    import transformers as T
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from probe.tokenizer import chat_template_for, media_ids, special_ids

    torch.manual_seed(seed)
    special = special_ids(tok)
    text = dict(LM, vocab_size=len(tok), **special)
    ids = tok.convert_tokens_to_ids
    image_processor = None
    if name == "base":
        family = "qwen2"
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**text))
    elif name == "vl":
        family = "qwen2_vl"
        text = text | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                           "mrope_section": [4, 2, 2]}}
        cfg = T.Qwen2VLConfig(
            text_config=text,
            vision_config=dict(depth=2, embed_dim=64, hidden_size=LM["hidden_size"], num_heads=2, mlp_ratio=2,
                               patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
            **special, **media_ids(family, ids),
        )
        model = T.Qwen2VLForConditionalGeneration(cfg)
        # 48 px → a 3×3 grid of merged 16-px tokens whose centres are the scene slots: one shape per token.
        image_processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=48 * 48, patch_size=8,
                                                   merge_size=2, temporal_patch_size=2)
    else:
        family = "llava_onevision"
        size, patch = (48, 16) if name == "ov-si" else (64, 8)  # ov-si: 3×3 patches centred on the slots
        cfg = T.LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2") | text,
            vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=2, image_size=size, patch_size=patch),
            **special, **media_ids(family, ids),
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            image_grid_pinpoints=[[size, size]],
        )
        model = T.LlavaOnevisionForConditionalGeneration(cfg)
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                                          image_grid_pinpoints=[[size, size]], crop_size=None)
    if base_dir is not None:
        base = T.Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **NO_HUB_KERNELS)
        model.model.language_model.load_state_dict(base.model.state_dict())
        model.lm_head.load_state_dict(base.lm_head.state_dict())
    fam = FAMILIES[family]
    tok = _copy_tok(tok)
    tok.chat_template = chat_template_for(fam.image_placeholder, fam.video_placeholder)
    return save_model_dir(model, tok, image_processor, out_dir)


def _copy_tok(tok):
    import copy

    return copy.deepcopy(tok)


# ------------------------------------------------------------------------------------------- training


def train(loaded: LoadedModel, rows: list[dict], recipe: Recipe, seed: int) -> list[float]:
    """The project's one training loop (probe.train), once per stage of the organism's recipe."""
    losses: list[float] = []
    for i, st in enumerate(recipe.stages):
        loaded.model.requires_grad_(True)  # each stage freezes what its zero rates say, nothing else
        log(f"  stage {i + 1}/{len(recipe.stages)} {st.name or ''}: {st}")
        cfg = TrainConfig(steps=st.steps, lr=st.tower_lr, lm_lr=st.lm_lr, projector_lr=st.projector_lr,
                          batch=recipe.batch, warmup=st.warmup, seed=seed + 1000 * i,
                          # the schedule and weight decay (every parameter) the shipped organisms were trained with
                          schedule="overlapped", decay_all=True)
        losses += train_loop(loaded, rows, cfg, log=log)
    loaded.model.requires_grad_(True)
    return losses


# Stand-in for the CLIP/SigLIP pretraining a real vision tower has before it meets the LM: tower and projector
# learn to say which shape of which colour sits in each cell of the picture, through a linear head thrown away
# afterwards. Without it the tower's features collapsed to one vector while the LM learned the answer prior.
# The "flat" head reads all tokens at once (content may spread over tokens); the "token" head is shared by the
# tokens the LM receives, so each must carry its own cell's content.
Shapes = list[tuple[str, str, float, float]]  # (kind, colour, x, y), x and y fractions of the side
Sample = tuple["Image.Image", Shapes, int]  # a picture (or one frame), its shapes, its frame number (0: a picture)
# Tokens per side of the grid each organism's vision side gives the LM per picture, and through which path:
# vl 48 px / 8-px patches merged 2×2 → 3×3; ov-si 48 px / 16-px patches → 3×3 (LLaVA-OneVision puts this base
# view first); video 64 px / 8-px patches pooled 2×2 per frame → 4×4. Scene slots sit on token centres.
TOKEN_GRID = {"vl": ("image", 3), "ov-si": ("image", 3), "video": ("video", 4)}


def cell_targets(shapes: Shapes, kinds: Sequence[str], colours: Sequence[str], side: int) -> torch.Tensor:
    """[2, side*side] class per cell, row-major: shape kind and colour (0 = empty, else 1 + index)."""
    out = torch.zeros(2, side * side, dtype=torch.long)
    for kind, colour, x, y in shapes:
        cell = min(side - 1, int(y * side)) * side + min(side - 1, int(x * side))
        out[0, cell], out[1, cell] = 1 + kinds.index(kind), 1 + colours.index(colour)
    return out


def _pixels(loaded, images) -> dict[str, torch.Tensor]:
    """The image processor's tensors for ``images`` (what ``get_image_features`` takes)."""
    return {k: v for k, v in loaded.processor.image_processor(images=images, return_tensors="pt").items()
            if isinstance(v, torch.Tensor)}


def token_features(loaded: LoadedModel, images: Sequence[Image.Image], path: str, side: int) -> torch.Tensor:
    """[n_images, side*side, hidden]: the grid tokens the LM receives for each picture (one frame for video)."""
    enc = _pixels(loaded, images)
    if path == "video":  # each picture as a one-frame video: the pooled per-frame tokens, then the newline
        return loaded.model.model.get_video_features(enc["pixel_values"][:, :1]).pooler_output[
            :, : side * side]
    return torch.stack([f[: side * side] for f in loaded.model.model.get_image_features(**enc).pooler_output])


def flat_features(loaded: LoadedModel, images: Sequence[Image.Image]) -> torch.Tensor:
    """[n_images, tokens*hidden]: every image-path token of each picture, flattened."""
    feats = loaded.model.model.get_image_features(**_pixels(loaded, images)).pooler_output
    return torch.stack([f.reshape(-1) for f in feats])


def pretrain_vision(loaded: LoadedModel, sample: Callable[[random.Random], Sample], grid: tuple[str, int], steps: int,
                    seed: int, head_kind: str = "token", tags: str = "", lr: float = 2e-3,
                    batch: int = 32) -> dict[str, float]:
    """Train the non-LM parameters on cell targets; ``sample(rng) -> (PIL image, shapes, frame number)``,
    ``grid = (path, side)`` as in ``TOKEN_GRID``. ``head_kind="token"``: one linear head shared by the grid tokens, each
    predicting its own cell; ``"flat"``: one head reads all image-path tokens flattened and predicts every cell
    (the first variant). ``tags`` (token head only) adds per-token targets so that the LM can find a token by
    what it says: ``cell`` — the token's own cell (where a shape is), ``frame`` — the picture's frame number (when,
    read from the video's progress bar), ``word`` — a token showing a shape must score the LM's own input embeddings
    of its colour and shape words highest (LLaVA's alignment idea without captions: the LM already reads "red
    circle" in organism-base's Scenes texts). Returns the last batch's accuracies.

    This stands in for the vision tower's own pretraining (the paper's towers come pretrained, e.g. SigLIP), before
    any prompt exists: its targets are per-token classes read by a throwaway head, not answer tokens of the LM. So it
    is not a second copy of the one training loop (probe.train, prompt → label tokens → the LM's loss), which every
    stage after it uses."""
    kinds = tasks_image.SHAPE_OPTIONS + tuple(k for k in tasks_video.KINDS if k not in tasks_image.SHAPE_OPTIONS)
    colours = tasks_image.COLOUR_OPTIONS
    path, side = grid
    rng = random.Random(f"omniprobe-vision-pretrain:{seed}")
    torch.manual_seed(seed)
    params = [p for n, p in loaded.model.named_parameters() if not is_lm_param(n, loaded)]
    n_k, n_c = len(kinds) + 1, len(colours) + 1
    n_tags = {"cell": side * side, "frame": tasks_video.N_FRAMES}
    tag_list = [t for t in tags.split(",") if t] if head_kind == "token" else []
    words = "word" in tag_list
    tag_list = [t for t in tag_list if t != "word"]
    n_t = sum(n_tags[t] for t in tag_list)
    if words:  # class index (0 = empty) → the vocabulary id of " colour" / " kind", as the Scenes texts write them
        embed = loaded.model.get_input_embeddings().weight.detach()
        word_id = [torch.tensor([-100] + [loaded.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in ws])
                   for ws in (kinds, colours)]
    if head_kind == "flat":
        with torch.no_grad():
            dim = flat_features(loaded, [sample(rng)[0]]).shape[1]
        head = torch.nn.Linear(dim, side * side * (n_k + n_c))
        features = flat_features
    else:
        head = torch.nn.Linear(loaded.model.config.text_config.hidden_size, n_k + n_c + n_t)
        features = functools.partial(token_features, path=path, side=side)
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr, weight_decay=0.0)
    loaded.model.train()
    t0 = time.time()
    for step in range(steps):
        drawn = [sample(rng) for _ in range(batch)]
        target = torch.stack([cell_targets(sh, kinds, colours, side) for _, sh, _ in drawn])  # [B, 2, cells]
        feats = features(loaded, [im for im, _, _ in drawn])  # [B, cells, hidden]
        logits = head(feats).reshape(batch, side * side, n_k + n_c + n_t)
        kind_logits, colour_logits = logits[..., :n_k], logits[..., n_k:n_k + n_c]
        loss = (torch.nn.functional.cross_entropy(kind_logits.flatten(0, 1), target[:, 0].flatten())
                + torch.nn.functional.cross_entropy(colour_logits.flatten(0, 1), target[:, 1].flatten()))
        tag_acc, at = {}, n_k + n_c
        for tag in tag_list:  # every token, empty or not, names its cell / its picture's frame
            want = (torch.arange(side * side).repeat(batch) if tag == "cell"
                    else torch.tensor([t for _, _, t in drawn]).repeat_interleave(side * side))
            tag_logits = logits[..., at:at + n_tags[tag]].flatten(0, 1)
            loss = loss + torch.nn.functional.cross_entropy(tag_logits, want)
            tag_acc[tag] = float((tag_logits.argmax(-1) == want).float().mean())
            at += n_tags[tag]
        if words:  # empty cells carry -100 and are ignored
            vocab_logits = feats.flatten(0, 1) @ embed.T
            for i, name in enumerate(("kind_word", "colour_word")):
                want = word_id[i][target[:, i].flatten()]
                loss = loss + torch.nn.functional.cross_entropy(vocab_logits, want)
                top2 = (vocab_logits.topk(2, dim=-1).indices == want[:, None]).any(-1)  # two words, one vector
                tag_acc[name] = float(top2[want >= 0].float().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            occupied = target[:, 0] > 0
            acc = {"kind": float((kind_logits.argmax(-1) == target[:, 0])[occupied].float().mean()),
                   "colour": float((colour_logits.argmax(-1) == target[:, 1])[occupied].float().mean())}
            acc |= tag_acc
            log(f"  vision step {step:4d}  loss {float(loss.detach()):.4f}  cell accuracy "
                + " ".join(f"{k} {v:.2f}" for k, v in acc.items()) + f"  ({time.time() - t0:.0f}s)")
    loaded.model.eval()
    return acc


def mix_in(extra: Sequence[Item], n_modality: int, shares: dict[str, float], label: str, seed: int) -> list[Item]:
    """Items of the set ``label`` to add to ``n_modality`` rows of the organism's own modality so that every set in
    ``shares`` makes up its share of the pool (as real VLM recipes mix text, and LLaVA-Video image data, in)."""
    n = min(len(extra), round(n_modality * shares[label] / (1 - sum(shares.values()))))
    return random.Random(f"omniprobe-{label}-replay:{seed}").sample(list(extra), n)


def scene_sample(rng: random.Random) -> Sample:
    from probe.synthetic import SLOTS, draw_scene

    scene = tasks_image.random_scene(rng)
    return draw_scene(scene, IMAGE_SIZE), [(s.kind, s.colour, *SLOTS[s.slot]) for s in scene.shapes], 0


def frame_sample(rng: random.Random) -> Sample:
    """One frame of a random video question, with its frame number."""
    _, _, _, frames = tasks_video.BUILDERS[rng.choice(tasks_video.SUBJECTS)](rng, tasks_video.N_FRAMES)
    t = rng.randrange(len(frames))
    return tasks_video.render_images(frames, IMAGE_SIZE)[t], frames[t], t


@torch.no_grad()
def evaluate(loaded: LoadedModel, rows: list[dict], batch_size: int = 32) -> dict[str, float]:
    """Forward-only: accuracy = full-vocabulary argmax at the first generated position is the right letter;
    prob_accuracy = argmax over the item's option letters."""
    loaded.model.eval()
    pad = loaded.tokenizer.pad_token_id
    n = acc = pacc = 0
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i:i + batch_size], pad)
        inputs = {k: v.to(loaded.device) for k, v in model_inputs(batch).items() if k != "labels"}
        inputs = {k: v.to(loaded.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        logits = loaded.model(**inputs).logits.float()
        last = logits[torch.arange(logits.shape[0]), batch["_last"]]
        letters = batch["_letters"]
        for j in range(last.shape[0]):
            ids = letters[j][letters[j] >= 0]
            right = int(ids[batch["_answer"][j]])
            acc += int(last[j].argmax()) == right
            pacc += int(prob_choice(option_log_probs(last[j], ids))) == int(batch["_answer"][j])
            n += 1
    return {"accuracy": acc / n, "prob_accuracy": pacc / n, "n_items": n}


# ------------------------------------------------------------------------------------------- driver


def _load(path: Path):
    from probe.models import load_model, resolve_model

    return load_model(resolve_model(str(path)), dtype="float32")


def _save_bf16(loaded, out_dir: Path) -> None:
    from probe.models import set_config_dtype

    set_config_dtype(loaded.model.config, torch.bfloat16)
    loaded.model.to(torch.bfloat16).save_pretrained(out_dir)
    loaded.model.to(torch.float32)
    set_config_dtype(loaded.model.config, torch.float32)


def _shortened(r: Recipe, quick: bool, steps: int | None) -> Recipe:
    """``--quick``: 20 steps per stage, small batches; ``--steps N``: N steps per stage, and at most N steps of the
    vision tower's pretraining (so that a short smoke build is short everywhere)."""
    if quick:
        r = replace(r, stages=tuple(replace(s, steps=20, warmup=min(s.warmup, 5)) for s in r.stages), batch=8,
                    vision_steps=min(r.vision_steps, 10))
    return r if steps is None else replace(r, stages=tuple(replace(s, steps=steps) for s in r.stages),
                                           vision_steps=min(r.vision_steps, steps))


OWN = {"base": "text", "vl": "image", "ov-si": "image_single", "video": "video"}
# organism-base trains on all threads; the extensions on max(1, threads // 2) each, whatever runs, so a rebuild
# of one gives the same bits. With --threads >= 2 the two lanes run in two processes at once: two small models on
# one thread each use two cores better than one model on two (torch's CPU scaling at these sizes is ~1.5×).
# Lanes balanced by measured cost: video 914 s against vl then ov-si 1,018 s (README "Build time", run 1).
LANES = (("video",), ("vl", "ov-si"))


def build_organism(name: str, out: Path, tok: PreTrainedTokenizerBase, items: dict, recipe: Recipe,
                   seed: int) -> dict[str, Any]:
    """Initialise, train, save (bf16) and measure ``organism-<name>`` under ``out``; returns its quality entry."""
    global _TAG
    _TAG = f" {name}"
    try:
        return _build_organism(name, out, tok, items, recipe, seed)
    finally:
        _TAG = ""


def _build_organism(name: str, out: Path, tok, items: dict, recipe: Recipe, seed: int) -> dict[str, Any]:
    t0, k = time.time(), tuple(OWN).index(name)
    # built in a hidden dir and renamed once measured: a kill leaves the previous organism or none, never untrained
    # weights under the organism's name (which any command would load)
    final = out / f"organism-{name}"
    d = partial_path(final)  # not partial_dir: a failed build's dir is kept, until build() clears a dead writer's
    shutil.rmtree(d, ignore_errors=True)
    init_organism(name, tok, d, None if name == "base" else out / "organism-base", seed + k)
    loaded = _load(d)
    train_items = list(items[OWN[name]]["train"])
    log(f"organism-{name}: encoding {len(train_items)} training items")
    rows = encode(loaded, train_items, True)
    shares = {label: share for label, share in (("text", recipe.text_mix), ("image_single", recipe.image_mix))
              if share}
    n_own = len(rows)
    for label in shares:  # only the sampled items are encoded
        rows += encode(loaded, mix_in(items[label]["train"], n_own, shares, label, seed), True)
    if recipe.vision_steps:
        log(f"organism-{name}: pretraining the vision tower ({recipe.vision_steps} steps)")
        pretrain_vision(loaded, frame_sample if name == "video" else scene_sample, TOKEN_GRID[name],
                        recipe.vision_steps, seed + 200 + k, recipe.vision_head, recipe.vision_tags)
    log(f"organism-{name}: {len(recipe.stages)} stage(s) on {len(rows)} rows ({n_own} {OWN[name]}, mixed in: {shares})")
    losses = train(loaded, rows, recipe, seed + 100 + k)
    _save_bf16(loaded, d)
    train_s = time.time() - t0
    shipped = _load(d)  # measure what ships: bf16 weights through the ordinary loading path
    # the threads it trained on: its bits depend on them, and --reuse keeps it only for a build that gives it as many
    res = {"train_seconds": round(train_s, 1), "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
           "recipe": asdict(recipe), "threads": torch.get_num_threads()}
    evals = {"own": OWN[name]} if name == "base" else {"own": OWN[name], "text": "text"}
    for label, modality in evals.items():
        val = encode(shipped, items[modality]["validation"], False)
        res[label] = evaluate(shipped, val) | {"modality": modality}
    (d / "organism.json").write_text(json.dumps({"name": f"organism-{name}"} | res, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    d.rename(final)
    log(f"organism-{name}: {json.dumps({k2: v for k2, v in res.items() if k2 != 'recipe'})}")
    return res


def _load_items(data: dict[str, Path], splits) -> dict[str, dict[str, list]]:
    from probe.mmmu import load_mmmu

    return {m: {s: load_mmmu(d, s)[0] for s in splits} for m, d in data.items()}


def _lane(names: Sequence[str], out: Path, tok, data: dict[str, Path], splits, recipes: dict[str, Recipe],
          seed: int, threads: int) -> dict[str, dict[str, Any]]:
    """One worker process: the extensions in ``names`` one after another (``data``: their modalities and text)."""
    torch.set_num_threads(threads)
    items = _load_items(data, splits)
    return {n: build_organism(n, out, tok, items, recipes[n], seed) for n in names}


def build(out: Path, quick: bool = False, steps: int | None = None, seed: int = 0, threads: int = 2,
          reuse: bool = False, only: Sequence[str] | None = None, exclude_validation: bool = False) -> dict[str, Any]:
    """Regenerate data and all four organisms under ``out``; returns the quality table (also quality.json).

    ``exclude_validation``: train on the train splits less every validation item (``build_data``'s ``held_out``);
    the shipped organisms were built without it."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from probe.tokenizer import build_tokenizer

    torch.set_num_threads(threads)
    t_start = time.time()
    out = Path(out)
    sizes = QUICK_DATA if quick else FULL_DATA
    held_out = "validation" if exclude_validation else None
    stamp = {"seed": seed, "sizes": sizes, "train_excludes": held_out}
    recipes = {k: _shortened(r, quick, steps) for k, r in FULL.items()}
    same_data = json_object(out / "data" / "build.json") == stamp
    if only and "base" not in only:  # every extension starts from organism-base: it must be this build's
        check_base(out, same_data, recipes["base"])
    reuse = reuse and same_data  # organisms of other data are rebuilt
    names = [n for n in OWN if not only or n in only]
    built = {n: e for n in names if reuse and (e := reusable(out, n, recipes[n], threads)) is not None}
    todo = [n for n in names if n not in built]
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_dirs(out, rf"\.organism-[a-z-]+\.partial-(?P<tag>{WRITER_TAG})")  # organisms a kill left half-built
    log(f"data → {out / 'data'}")
    if reuse:
        data = {m: out / "data" / m for m in MODALITY_SUBJECTS}  # resuming: same seed, same data
    else:
        (out / "data" / "build.json").unlink(missing_ok=True)  # a kill while rewriting must not leave it vouching
        data = build_data(out / "data", sizes, seed, held_out)
        (out / "data" / "build.json").write_text(json.dumps(stamp), encoding="utf-8")
    items = _load_items(data, sizes)
    log(f"tokenizer ({time.time() - t_start:.0f}s)")
    tok = build_tokenizer(tokenizer_corpus(seed), 1024)
    quality: dict[str, Any] = {"seed": seed, "quick": quick, "organisms": {},
                               "train_items": {m: len(v["train"]) for m, v in items.items()},
                               "train_excludes": held_out}
    for name in built:
        log(f"organism-{name}: reusing {out / f'organism-{name}'}")
    if "base" in todo:  # every extension starts from it
        built["base"] = build_organism("base", out, tok, items, recipes["base"], seed)
    lanes = [[n for n in lane if n in todo] for lane in LANES]
    lanes = [lane for lane in lanes if lane]
    per_lane = extension_threads(threads)
    if threads >= 2 and len(lanes) > 1:
        log(f"extensions in {len(lanes)} processes of {per_lane} thread(s): {lanes}")
        with ProcessPoolExecutor(len(lanes), mp_context=get_context("spawn")) as pool:
            jobs = [pool.submit(_lane, lane, out, tok, {m: data[m] for m in {OWN[n] for n in lane} | {"text", "image_single"}},
                                tuple(sizes), recipes, seed, per_lane) for lane in lanes]
            for job in jobs:
                built |= job.result()
    else:  # one lane left, or --threads 1: in this process, on the thread count a lane would get (same bits)
        torch.set_num_threads(per_lane)
        for lane in lanes:
            built |= {n: build_organism(n, out, tok, items, recipes[n], seed) for n in lane}
    for name in OWN:  # the table in the family's order, whatever finished first or was reused
        if name in built:
            quality["organisms"][f"organism-{name}"] = built[name]
    quality["build_seconds"] = round(time.time() - t_start, 1)
    if not only:
        (out / "quality.json").write_text(json.dumps(quality, indent=1), encoding="utf-8")
    elif (full := json_object(out / "quality.json")) is not None:  # the full build's table, with what --only rebuilt
        full["organisms"] = full.get("organisms", {}) | {f"organism-{n}": built[n] for n in todo}
        (out / "quality.json").write_text(json.dumps(full, indent=1), encoding="utf-8")
    log(f"done in {quality['build_seconds']}s")
    for name, entry in quality["organisms"].items():  # another machine's build can land on either side of it
        mark = f"  BELOW the {BAR:.0%} bar" if below_bar({name: entry}) else ""
        log(f"{name}: own {entry['own']['accuracy']:.1%} ({entry['own']['modality']}){mark}")
    return quality


def _recipe_json(recipe: Recipe) -> Any:
    return json.loads(json.dumps(asdict(recipe)))  # as organism.json holds it


def extension_threads(threads: int) -> int:
    """The torch threads each extension's lane trains on in ``build(threads=...)`` (see ``LANES``)."""
    return max(1, threads // 2)


def organism_threads(name: str, threads: int) -> int:
    """The torch threads ``build(threads=...)`` trains ``organism-<name>`` on (see ``LANES``)."""
    return threads if name == "base" else extension_threads(threads)


def reusable(out: Path, name: str, recipe: Recipe, threads: int) -> dict[str, Any] | None:
    """``--reuse``: the quality entry of the ``organism-<name>`` in ``out`` when it is what this build would train
    (same recipe, on as many threads), else None (rebuilt: another recipe, or one built before organism.json
    recorded its threads). One trained on another thread count is refused: its last bits differ, and a resumed
    build would mix two builds' organisms."""
    from probe.errors import BadInput

    d = out / f"organism-{name}"
    done = json_object(d / "organism.json")
    if done is None or done.get("recipe") != _recipe_json(recipe) or not isinstance(done.get("threads"), int):
        return None
    if done["threads"] != (want := organism_threads(name, threads)):
        raise BadInput(f"--reuse: {d} was trained on {done['threads']} thread(s), and this build's --threads "
                       f"{threads} trains it on {want} thread(s) (other bits); resume with the --threads that built "
                       f"it, or rebuild without --reuse")
    return {k: v for k, v in done.items() if k != "name"}


def check_base(out: Path, same_data: bool, recipe: Recipe) -> None:
    """``--only`` without base: the organism-base in ``out`` must be built from this build's data (seed, sizes,
    --exclude-validation) and recipe, else the extensions would start from another LM (another tokenizer's rows)."""
    from probe.errors import BadInput

    done = json_object(out / "organism-base" / "organism.json")
    if done is None:
        why = "is not built"
    elif not same_data:
        why = "was built from other data (another --seed, size or --exclude-validation)"
    elif done.get("recipe") != _recipe_json(recipe):
        why = "was built with another recipe (--quick or --steps)"
    else:
        return
    raise BadInput(f"{out / 'organism-base'} {why}, and the extensions start from it: add base to --only")


def below_bar(entries: dict[str, dict[str, Any]]) -> list[str]:
    """The organisms (name → quality entry, as organism.json holds it) whose own-modality accuracy misses ``BAR``."""
    return [name for name, entry in entries.items() if entry["own"]["accuracy"] < BAR]


def ship(out: Path) -> None:
    """Copy built organisms and the validation sets into the package (probe/zoo/organisms, probe/zoo/data); a
    build whose organisms miss the bar on their own modality is refused (the tests hold the shipped ones to it)."""
    from probe.errors import BadInput
    from probe.zoo import organisms_root, package_root

    out = Path(out)
    quality = json_object(out / "quality.json")
    # each organism's own organism.json: an organism rebuilt alone (--only) is not in an older quality.json
    entries = {f"organism-{n}": json_object(out / f"organism-{n}" / "organism.json") for n in OWN}
    if quality is None or quality.get("quick") or None in entries.values():
        raise BadInput(f"{out} holds no complete full build (quality.json and all four organisms): nothing shipped")
    if below_bar(entries):
        raise BadInput(f"not shipped: {', '.join(below_bar(entries))} below the {BAR:.0%} bar on its own modality "
                       f"(its organism.json in {out})")
    for name in ("base", "vl", "ov-si", "video"):
        src, dst = out / f"organism-{name}", organisms_root() / f"organism-{name}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    for modality in MODALITY_SUBJECTS:
        dst = package_root() / "data" / modality
        if dst.exists():
            shutil.rmtree(dst)
        for f in sorted((out / "data" / modality).glob("*/validation-*.parquet")):
            (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / f.parent.name / f.name)
    shutil.copy2(out / "quality.json", organisms_root() / "quality.json")
