"""Zero-shot classification metrics: top-1/top-5, per-class accuracy, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clip_model.zero_shot import zero_shot_logits


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], ks: Sequence[int] = (1, 5)
) -> dict:
    """Metrics of [N, C] scores against [N] integer labels. Per-class accuracy is None for a class
    without examples; the confusion matrix is rows = true class, columns = predicted class."""
    n, c = logits.shape
    if n != len(labels):
        raise ValueError(f"{n} predictions but {len(labels)} labels")
    if c != len(class_names):
        raise ValueError(f"{c} classes in the scores but {len(class_names)} class names")
    labels = labels.long().cpu()
    ranked = logits.float().cpu().topk(min(max(ks), c), dim=-1).indices
    hits = ranked == labels[:, None]
    result: dict = {"n": n, "num_classes": c}
    for k in ks:
        result[f"top{k}"] = float(hits[:, :k].any(dim=1).float().mean()) if n else float("nan")
    pred = ranked[:, 0]
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones(n, dtype=torch.long), accumulate=True)
    support = confusion.sum(dim=1)
    correct = confusion.diagonal()
    result["per_class"] = {
        name: {
            "accuracy": (float(correct[i]) / float(support[i])) if support[i] else None,
            "n": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    valid = support > 0
    result["mean_per_class"] = (
        float((correct[valid].float() / support[valid].float()).mean()) if n else float("nan")
    )
    result["confusion"] = confusion.tolist()
    result["class_names"] = list(class_names)
    return result


def evaluate_zero_shot(
    image_features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, class_names: Sequence[str]
) -> dict:
    """Zero-shot metrics of image features [N, D] against a classifier [D, C] from build_zero_shot_classifier."""
    return classification_metrics(zero_shot_logits(image_features, weights), labels, class_names)
