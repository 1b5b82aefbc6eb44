"""CLIP's symmetric contrastive loss, sharded the way the paper describes.

Each rank embeds its local batch of ``b`` pairs. Under an initialised process group the embeddings of
all ``W`` ranks are all-gathered (``B = W * b`` columns) and the rank computes only its own ``b`` rows of
the image-to-text and text-to-image logits: ``b x B`` instead of ``B x B``. The gather is differentiable:
its backward sums the incoming gradients over the ranks and keeps the slice that belongs to the local
embeddings, so every rank gets the full gradient of the global loss with respect to its own embeddings.
With DDP averaging the parameter gradients over ranks, training matches one process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns the rank's slice of the summed gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world = _distributed()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        parts[rank] = tensor  # the local slice is the input itself (same values)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every slice: sum the gradients over ranks, keep ours.
        grad = grad_output.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_features(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' features concatenated in rank order (differentiable), and this rank's row offset."""
    rank, world = _distributed()
    if world == 1:
        return features, 0
    return _GatherWithGrad.apply(features), rank * features.shape[0]


def loss_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The precision the loss is computed in: the callers' own (float64 stays float64), at least float32
    (half-precision logits and log-softmax lose too much; autocast outputs are upcast as before)."""
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric cross-entropy over scaled cosine similarities of a batch of matching pairs.

    Args:
        image_features: ``[b, d]`` image embeddings of this rank's local batch, **unnormalised**
            (they are L2-normalised here, in float32, or float64 when given float64).
        text_features: ``[b, d]`` text embeddings; row ``i`` is the caption of image ``i``.
        logit_scale: the multiplier applied to the cosine similarities, i.e. ``model.logit_scale.exp()``
            (not the log-parameter itself).

    Returns:
        The mean over this rank's ``b`` rows of ``(CE(image -> texts) + CE(text -> images)) / 2``, in the
        features' precision (float64 stays float64; float16/bfloat16 are computed in float32).
        When a process group is initialised the negatives are the whole global batch (features are
        all-gathered; every rank must pass the same ``b``) and the mean of the ranks' losses is the loss of
        the global batch; without torch.distributed it is the plain single-process loss.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"image/text feature shapes differ: {image_features.shape} vs {text_features.shape}")
    dtype = loss_dtype(image_features.dtype, text_features.dtype)
    image_features = F.normalize(image_features.to(dtype), dim=-1)
    text_features = F.normalize(text_features.to(dtype), dim=-1)
    all_images, offset = gather_features(image_features)
    all_texts, _ = gather_features(text_features)
    if isinstance(logit_scale, torch.Tensor):
        logit_scale = logit_scale.to(dtype)
    logits_per_image = logit_scale * image_features @ all_texts.t()  # [b, B]: local rows only
    logits_per_text = logit_scale * text_features @ all_images.t()  # [b, B]
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
