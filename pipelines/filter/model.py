"""Checkpoints the filter scores with: a trainer run folder, OpenAI's state-dict `.pt`, or an open_clip
training checkpoint (`{"epoch": ..., "state_dict": {"module.visual...": ...}}`).

Plain state-dict files are read with `torch.load(weights_only=True)` (no code runs) and their key prefixes
normalised here: DDP's `module.`, torch.compile's `_orig_mod.`, open_clip's `text.` tower of custom-text
models; open_clip-only scalars (`logit_bias`) are dropped. Everything else (TorchScript archives, a trainer
folder's weights file) goes through `clip_model.checkpoint` / pipelines/evaluation/embed.py, whose loader
owns safe loading.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping

import torch

from pipelines import storage
from pipelines.evaluation.embed import EvalModelError, find_weights

PREFIXES = ("module.", "_orig_mod.")
DROPPED_KEYS = ("logit_bias",)


def normalise_state_dict(raw: Mapping) -> dict[str, torch.Tensor]:
    """An OpenAI-layout state dict from an OpenAI or open_clip one (wrapper and prefixes removed)."""
    if isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    out = {}
    for key, value in raw.items():
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith("text."):  # open_clip CustomTextCLIP: the text tower under `text.`
            key = key[len("text.") :]
        if key not in DROPPED_KEYS and isinstance(value, torch.Tensor):
            out[key] = value
    return out


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/", 1)[-1].startswith("code/") for name in zf.namelist())


def load_clip(checkpoint: str, device: str | torch.device = "cpu"):
    """A fp32 CLIP in eval mode from any checkpoint the filter accepts (local or s3://)."""
    import clip_model

    weights = find_weights(checkpoint)
    path = storage.local_file(weights)
    try:
        if _is_torchscript(path):
            return clip_model.load(path, device=device)
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, Mapping):
            raise EvalModelError(f"checkpoint {weights} holds a {type(raw).__name__}, not a state dict")
        return clip_model.load(normalise_state_dict(raw), device=device)
    except EvalModelError:
        raise
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise EvalModelError(f"checkpoint {weights} cannot be loaded as a CLIP model: {e}") from e
