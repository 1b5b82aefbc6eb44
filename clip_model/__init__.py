"""CLIP model, preprocessing and checkpoints (no Ray here)."""

from .checkpoint import load, save_openai_checkpoint, to_openai_state_dict
from .configs import CLIPConfig, available_models, get_config
from .factory import create_model
from .loss import clip_loss
from .model import CLIP
from .tokenizer import Tokenizer
from .transform import image_transform

# Contrastive loss (clip_model/loss.py, added by the trainer helper): imported above.

__all__ = [
    "CLIP",
    "CLIPConfig",
    "Tokenizer",
    "available_models",
    "clip_loss",
    "create_model",
    "get_config",
    "image_transform",
    "load",
    "save_openai_checkpoint",
    "to_openai_state_dict",
]
