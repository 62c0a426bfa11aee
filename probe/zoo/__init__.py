"""Trained tiny organisms: a miniature Qwen2 family (text, image, single-image LLaVA-OV, video) shipped with
the package so that every command means something offline (issue 4).

``organism_dir(name)`` is what ``probe.models`` calls for a ``organism:<name>`` source. The organisms are
ordinary Hugging Face model directories under ``probe/zoo/organisms/organism-<name>/``; their validation sets
(MMMU-format parquet) are under ``probe/zoo/data/<modality>/``. Three subjects (Knowledge, Colour_Shape,
Spatial) are closed sets the training split enumerates whole, so half the validation items are training items:
the sets measure in-distribution skill (README, "How held out is 'held out'?"; ``build --exclude-validation``
trains without them). No item of ``probe.zoo.build.build_fresh_data`` is a validation item of any set.
``python -m probe.zoo build`` regenerates all of it, deterministically on one machine (another CPU's rounding
trains other weights; README, "Build time").
"""
from __future__ import annotations

from pathlib import Path

from probe.errors import BadInput

ORGANISMS: tuple[str, ...] = ("base", "vl", "ov-si", "video")
# What a report on the shipped organisms says about their validation sets (README, "How held out is 'held out'?").
VALIDATION_NOTE = (
    "The organisms' validation sets (`probe/zoo/data`) measure in-distribution skill: Knowledge, Colour_Shape and "
    "Spatial are closed sets that the organisms' training split enumerates whole, so about half the validation "
    "items are training items, and organisms trained without them lose Knowledge and, in most builds, Spatial "
    "(README, \"How held out is 'held out'?\"). Read accuracies on those sets as skill on the task space, partly "
    "recall, not generalisation to unseen items.")
# Which bundled validation set is each organism's own modality.
MODALITY: dict[str, str] = {"base": "text", "vl": "image", "ov-si": "image_single", "video": "video"}


def package_root() -> Path:
    return Path(__file__).parent


def organisms_root() -> Path:
    return package_root() / "organisms"


def organism_dir(name: str) -> Path:
    """Directory of the shipped organism ``name`` (``base``, ``vl``, ``ov-si``, ``video``)."""
    name = name.removeprefix("organism-")
    if name not in ORGANISMS:
        raise BadInput(f"unknown organism {name!r}; known: {', '.join(ORGANISMS)}")
    path = organisms_root() / f"organism-{name}"
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise BadInput(
            f"organism-{name} is not built or not shipped ({path} missing); "
            f"run `python -m probe.zoo build --out DIR` and pass DIR/organism-{name}"
        )
    return path


def validation_dir(modality: str) -> Path:
    """The bundled validation set of one modality (text, image, image_single, video)."""
    path = package_root() / "data" / modality
    if not path.is_dir():
        raise BadInput(f"no bundled validation set for modality {modality!r} ({path} missing)")
    return path


def organism_validation_dir(name: str) -> Path:
    """The bundled validation set of an organism's own modality."""
    return validation_dir(MODALITY[name.removeprefix("organism-")])
