"""Zero-shot classification metrics: top-1/top-5, per-class accuracy, confusion matrix.

`classification_metrics` takes a whole [N, C] score matrix; `TopKTally` takes predictions a batch at a time
(what an actor pool returns), so 50,000 images x 1,000 classes never sit on the driver as one matrix."""

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


# Above this many classes the results keep per-class accuracy but no C x C confusion matrix (1,000 classes
# would make a million-entry list in results.json and an unreadable plot).
MAX_CONFUSION_CLASSES = 100


class TopKTally:
    """Streamed classification metrics: `add` [n, k] class indices (best first) and [n] labels per batch;
    `result` gives what `classification_metrics` gives for the same predictions. Memory: O(C) counts (and the
    C x C confusion matrix up to MAX_CONFUSION_CLASSES), whatever the number of images."""

    def __init__(self, class_names: Sequence[str], ks: Sequence[int] = (1, 5)):
        self.class_names = list(class_names)
        self.ks = tuple(ks)
        c = len(self.class_names)
        self.n = 0
        self.hits = {k: 0 for k in self.ks}
        self.support = torch.zeros(c, dtype=torch.long)
        self.correct = torch.zeros(c, dtype=torch.long)
        self.confusion = torch.zeros(c, c, dtype=torch.long) if c <= MAX_CONFUSION_CLASSES else None

    @property
    def k(self) -> int:
        """How many classes `add` needs per image."""
        return min(max(self.ks), len(self.class_names))

    def add(self, topk: torch.Tensor, labels: torch.Tensor) -> None:
        topk, labels = torch.as_tensor(topk).long(), torch.as_tensor(labels).long()
        if len(labels) == 0:
            return
        hits = topk[:, : self.k] == labels[:, None]
        for k in self.ks:
            self.hits[k] += int(hits[:, :k].any(dim=1).sum())
        pred = topk[:, 0]
        ones = torch.ones(len(labels), dtype=torch.long)
        self.support.index_add_(0, labels, ones)
        self.correct.index_add_(0, labels, (pred == labels).long())
        if self.confusion is not None:
            self.confusion.index_put_((labels, pred), ones, accumulate=True)
        self.n += len(labels)

    def result(self) -> dict:
        n, c = self.n, len(self.class_names)
        result: dict = {"n": n, "num_classes": c}
        for k in self.ks:
            result[f"top{k}"] = self.hits[k] / n if n else float("nan")
        s, ok = self.support, self.correct
        result["per_class"] = {
            name: {"accuracy": (float(ok[i]) / float(s[i])) if s[i] else None, "n": int(s[i])}
            for i, name in enumerate(self.class_names)
        }
        valid = s > 0
        result["mean_per_class"] = float((ok[valid].float() / s[valid].float()).mean()) if n else float("nan")
        if self.confusion is not None:
            result["confusion"] = self.confusion.tolist()
        result["class_names"] = list(self.class_names)
        return result


def evaluate_zero_shot(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    class_names: Sequence[str],
    chunk: int = 4096,
) -> dict:
    """Zero-shot metrics of image features [N, D] against a classifier [D, C] from build_zero_shot_classifier,
    scored `chunk` images at a time (no [N, C] matrix)."""
    if len(image_features) != len(labels):
        raise ValueError(f"{len(image_features)} predictions but {len(labels)} labels")
    if weights.shape[1] != len(class_names):
        raise ValueError(f"{weights.shape[1]} classes in the scores but {len(class_names)} class names")
    tally = TopKTally(class_names)
    for start in range(0, len(labels), chunk):
        logits = zero_shot_logits(image_features[start : start + chunk], weights)
        tally.add(logits.topk(tally.k, dim=-1).indices, labels[start : start + chunk])
    return tally.result()
