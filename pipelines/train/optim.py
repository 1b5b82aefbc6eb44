"""AdamW with the paper's decoupled weight decay (not on gains, biases, embeddings or the logit scale) and
a linear warm-up followed by cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn


def exclude_from_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Gains and biases (every tensor of rank < 2: norms, biases, logit_scale, class token) and embeddings."""
    return param.ndim < 2 or "embedding" in name or name.endswith("logit_scale")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if exclude_from_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Multiplier of the base lr at step s: linear from 1/warmup to 1, then cosine down to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
