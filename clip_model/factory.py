"""`create_model`: an untrained CLIP of a named configuration. configs.py holds the names, model.py the
modules (and imports configs); this module joins them, so that no import goes back from configs to model."""

from __future__ import annotations

import torch

from .configs import get_config
from .model import CLIP


def create_model(name: str, device: torch.device | str | None = None, **overrides) -> CLIP:
    """An untrained `CLIP` of the named configuration (OpenAI initialisation). `device="meta"` builds it
    without allocating weights (for counting parameters and FLOPs)."""
    config = get_config(name, **overrides)
    if device is None:
        return CLIP.from_config(config)
    with torch.device(device):
        return CLIP.from_config(config)
