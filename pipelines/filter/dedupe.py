"""Semantic dedupe like SemDeDup (Abbas et al., 2023): seeded k-means over the unit-norm image embeddings,
then inside each cluster a pair is a duplicate when its cosine to a better pair of the cluster exceeds the
threshold. "Better" is a deterministic order: higher CLIP score, then lower key; the first pair of a group
of duplicates is the representative that stays.

k-means is scikit-learn's MiniBatchKMeans fitted with `partial_fit` one shard at a time (memory: one shard's
embeddings); the in-cluster pass holds one cluster and compares it in blocks of rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NEAR_DUPLICATE = "near_duplicate"
BLOCK = 1024  # rows compared at once inside a cluster: memory BLOCK x cluster size


def fit_centroids(batches: Iterable[np.ndarray], clusters: int, seed: int) -> np.ndarray:
    """Unit-norm centroids [k, D] of the embeddings in `batches` (k = min(clusters, rows seen))."""
    from sklearn.cluster import MiniBatchKMeans

    pending: list[np.ndarray] = []
    model = None
    for x in batches:
        if len(x):
            pending.append(np.asarray(x, dtype=np.float32))
        # partial_fit's first call needs at least k rows; later calls take each shard as it comes.
        if model is None and sum(len(p) for p in pending) < clusters:
            continue
        if pending:
            if model is None:
                model = MiniBatchKMeans(n_clusters=clusters, random_state=seed, n_init=3, batch_size=1024)
            model.partial_fit(np.concatenate(pending))
            pending = []
    if model is None:  # fewer rows than clusters: every row its own centroid
        rows = np.concatenate(pending) if pending else np.zeros((0, 1), np.float32)
        return _unit(rows)
    return _unit(model.cluster_centers_.astype(np.float32))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def assign(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (by cosine) of each row."""
    if len(embeddings) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmax(np.asarray(embeddings, np.float32) @ centroids.T, axis=1)


def duplicates(keys: list[str], scores: np.ndarray, embeddings: np.ndarray, threshold: float) -> list[str]:
    """For each row of one cluster, the key of the better row it duplicates ("" = keep)."""
    order = sorted(range(len(keys)), key=lambda i: (-float(scores[i]), keys[i]))
    x = _unit(np.asarray(embeddings, np.float32)[order])
    dup_of = [""] * len(keys)
    for lo in range(0, len(order), BLOCK):
        sims = x[lo : lo + BLOCK] @ x[: lo + BLOCK].T  # each row against every row before it
        for j in range(sims.shape[0]):
            row = sims[j, : lo + j]
            if len(row) and row.max() > threshold:
                dup_of[order[lo + j]] = keys[order[int(row.argmax())]]
    return dup_of
