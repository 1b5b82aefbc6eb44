"""One optimizer step's forward and backward, optionally split into micro-batches without changing the loss.

Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): a contrastive loss couples every pair in the batch, so ordinary gradient accumulation over
micro-batches would shrink the set of negatives. Instead:
  1. embed every micro-batch without autograd and keep only the embeddings;
  2. compute the loss over the whole batch (all-gathered across ranks by `clip_loss`) and its gradient with
     respect to the embeddings and the logit scale;
  3. re-run each micro-batch with autograd and backpropagate the cached embedding gradients into the weights.
The weights receive exactly the gradient of one big step, while activation memory is that of one micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from clip_model.loss import clip_loss


class FeatureModel(nn.Module):
    """CLIP seen by the trainer: forward returns (image features, text features, logit scale multiplier).

    Wrapping it this way keeps the logit scale inside the DDP forward, so DDP sees every parameter used."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.clip.encode_image(images), self.clip.encode_text(tokens), self.clip.logit_scale.exp()


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (all ranks must take the same skip decision, or DDP hangs)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad)
    return bool(bad.item() == 0)


def forward_backward(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    accum_steps: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
) -> tuple[torch.Tensor, bool]:
    """Accumulate into `.grad` the gradient of the contrastive loss over this rank's batch (and, under a
    process group, the global batch). Returns (loss, finite). A non-finite loss is not backpropagated.

    `model` is a `FeatureModel` (possibly wrapped in DDP); `autocast` makes the mixed-precision context;
    `scale_loss` is `GradScaler.scale` for fp16."""
    if accum_steps == 1:
        with autocast():
            image_features, text_features, logit_scale = model(images, tokens)
        loss = clip_loss(image_features, text_features, logit_scale)
        finite = all_finite(loss)
        if finite:
            scale_loss(loss).backward()
        return loss.detach(), finite

    image_chunks, token_chunks = images.chunk(accum_steps), tokens.chunk(accum_steps)
    if len(image_chunks) != accum_steps:
        raise ValueError(f"batch of {images.shape[0]} cannot be split into {accum_steps} micro-batches")

    # 1. Embeddings of every micro-batch, no activations kept.
    with torch.no_grad(), autocast():
        outputs = [model(i, t) for i, t in zip(image_chunks, token_chunks)]
    image_features = torch.cat([o[0] for o in outputs]).float().requires_grad_()
    text_features = torch.cat([o[1] for o in outputs]).float().requires_grad_()
    logit_scale = outputs[0][2].float().requires_grad_()

    # 2. The loss over the whole batch and its gradient with respect to the embeddings.
    loss = clip_loss(image_features, text_features, logit_scale)
    finite = all_finite(loss)
    if not finite:
        return loss.detach(), False
    loss.backward()
    image_grads = image_features.grad.chunk(accum_steps)
    text_grads = text_features.grad.chunk(accum_steps)
    scale_grad = logit_scale.grad / accum_steps  # every micro-batch re-uses the scale: split its gradient

    # 3. Re-run each micro-batch and push the cached gradients into the weights (one DDP all-reduce).
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for k in range(accum_steps):
        last = k == accum_steps - 1
        with contextlib.nullcontext() if last else no_sync():
            with autocast():
                image_out, text_out, scale_out = model(image_chunks[k], token_chunks[k])
            surrogate = (
                (image_out.float() * image_grads[k]).sum()
                + (text_out.float() * text_grads[k]).sum()
                + scale_out.float() * scale_grad
            )
            scale_loss(surrogate).backward()
    return loss.detach(), True
