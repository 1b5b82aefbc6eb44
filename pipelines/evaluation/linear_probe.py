"""Linear probe: L2-regularised multinomial logistic regression on frozen image features (CLIP paper,
appendix A.3), fitted full-batch with L-BFGS in torch.

The regularisation is chosen on a validation split with the paper's search: C = 1/lambda on a coarse grid
10^-6, 10^-4, ..., 10^6, then the interval around the best value is halved until the resolution is
8 steps per decade. The chosen C is refitted on train + validation and scored on the test split.
Objective (sklearn's convention, divided by n): mean cross-entropy + ||W||^2 / (2 C n); the bias is free.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@contextmanager
def _threads_for(work: int):
    """One intra-op thread for small problems: L-BFGS makes hundreds of tiny calls, and waking a thread pool
    for each costs far more than the arithmetic (seen: 100x slower on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    if work < 5_000_000:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class LogisticRegression:
    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]
    C: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.weight + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(dim=-1)


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    C: float,
    max_iter: int = 1000,
    init: LogisticRegression | None = None,
) -> LogisticRegression:
    x, y = features.float(), labels.long()
    n, d = x.shape
    weight = torch.zeros(d, num_classes) if init is None else init.weight.clone()
    bias = torch.zeros(num_classes) if init is None else init.bias.clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )
    penalty = 1.0 / (2.0 * C * n)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _threads_for(n * d * num_classes):
        optimizer.step(closure)
    return LogisticRegression(weight.detach(), bias.detach(), C)


def accuracy(model: LogisticRegression, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model.predict(features) == labels.long()).float().mean()) if len(labels) else float("nan")


def split_train_val(
    labels: torch.Tensor, val_fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (train, val), stratified: each class gives about val_fraction of its examples (at least one
    when it has two or more) to validation."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


@dataclass
class ProbeSearch:
    best_C: float
    history: list[dict] = field(default_factory=list)  # {"C", "val_accuracy", "val_loss"} per fit


def search_C(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    coarse_log10: tuple[float, ...] = (-6, -4, -2, 0, 2, 4, 6),
    steps_per_decade: int = 8,
    max_iter: int = 1000,
) -> ProbeSearch:
    """The paper's parametric binary search over log10(C)."""
    scores: dict[float, tuple[float, float]] = {}
    history: list[dict] = []
    warm: LogisticRegression | None = None

    def score(log_c: float) -> tuple[float, float]:
        nonlocal warm
        log_c = round(log_c, 6)
        if log_c not in scores:
            model = fit_logistic_regression(train_x, train_y, num_classes, 10.0**log_c, max_iter, init=warm)
            warm = model
            val_loss = float(F.cross_entropy(model.logits(val_x), val_y.long()))
            scores[log_c] = (accuracy(model, val_x, val_y), -val_loss)
            history.append({"C": 10.0**log_c, "val_accuracy": scores[log_c][0], "val_loss": val_loss})
        return scores[log_c]

    # Ties on accuracy are broken by validation loss.
    best = max(coarse_log10, key=score)
    step = (coarse_log10[1] - coarse_log10[0]) if len(coarse_log10) > 1 else 1.0
    while step > 1.0 / steps_per_decade:
        step /= 2
        best = max((best, best - step, best + step), key=score)
    return ProbeSearch(best_C=10.0**best, history=history)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int | None = None,
    val_x: torch.Tensor | None = None,
    val_y: torch.Tensor | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    steps_per_decade: int = 8,
) -> dict:
    """Choose C on validation (given, or split off the training set), refit on train + val, score test."""
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    if val_x is None:
        train_idx, val_idx = split_train_val(train_y, val_fraction, seed)
        if len(val_idx) == 0:
            raise ValueError("linear probe: too few training examples to split off a validation set")
        fit_x, fit_y, val_x, val_y = (
            train_x[train_idx],
            train_y[train_idx],
            train_x[val_idx],
            train_y[val_idx],
        )
    else:
        fit_x, fit_y = train_x, train_y
    search = search_C(
        fit_x, fit_y, val_x, val_y, num_classes, steps_per_decade=steps_per_decade, max_iter=max_iter
    )
    model = fit_logistic_regression(
        torch.cat([fit_x, val_x]), torch.cat([fit_y, val_y]), num_classes, search.best_C, max_iter
    )
    return {
        "accuracy": accuracy(model, test_x, test_y),
        "train_accuracy": accuracy(model, torch.cat([fit_x, val_x]), torch.cat([fit_y, val_y])),
        "C": search.best_C,
        "lambda": 1.0 / search.best_C,
        "n_train": len(fit_y),
        "n_val": len(val_y),
        "n_test": len(test_y),
        "search": search.history,
        "predictions": model.predict(test_x).tolist(),
    }
