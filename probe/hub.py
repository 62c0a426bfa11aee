"""Hub aliases behave like every HF tool: read from the local cache, download what is missing when the hub is
reachable and ``HF_HUB_OFFLINE`` is not set (with huggingface_hub's own progress bars), and say exactly which of
the two failed otherwise.

Models come in two steps so that a typo costs nothing (STYLE 5): configs and tokenizer files first (validation
reads only those), weights when the model is loaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from probe.errors import BadInput, error_reason

# What a model needs before any weight is read: config, tokenizer, processor and generation settings.
META_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
# Everything needed to load it (no .bin / .pth / original/ duplicates of the safetensors weights).
WEIGHT_PATTERNS = (*META_PATTERNS, "*.safetensors")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import), else huggingface_hub's own value."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_snapshot(repo_id: str, repo_type: str = "model", patterns: Sequence[str] | None = None) -> Path:
    """Local directory of ``repo_id`` holding (at least) the files matching ``patterns``."""
    try:
        import huggingface_hub
    except ImportError:
        raise BadInput(f"{repo_id} needs huggingface_hub (pip install huggingface_hub)") from None
    kwargs = {"repo_type": repo_type, "allow_patterns": list(patterns) if patterns else None}
    if hub_offline():
        try:
            return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kwargs))
        except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends
            raise BadInput(
                f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it was not "
                f"downloaded; unset HF_HUB_OFFLINE, or download it elsewhere and pass its directory") from None
    try:  # reaches the hub; falls back to the cache by itself when the network is down
        return Path(huggingface_hub.snapshot_download(repo_id, **kwargs))
    except Exception as exc:  # noqa: BLE001 - network, auth (gated repos) and not-found errors
        raise BadInput(f"could not download {repo_id} from the Hugging Face hub and it is not in the local "
                       f"cache ({type(exc).__name__}: {error_reason(exc)})") from None
