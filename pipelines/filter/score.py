"""The CLIP-score filter: an absolute threshold, or exactly the top fraction of the scored pairs.

The exact top fraction takes two passes over the store and no sample: (1) every shard returns a histogram
of its scores over `bins` fixed buckets of [-1, 1] (summed on the driver: O(bins)); the bucket that holds
the k-th highest score follows from the cumulative counts; (2) every shard returns its (score, key) pairs
inside that one bucket, which the driver sorts to find the k-th pair exactly. Ties in score are broken by
key, so exactly k pairs pass, whatever the partitioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOW_SCORE = "low_clip_score"


@dataclass(frozen=True)
class Cut:
    """Keep a pair when score > threshold, or score == threshold and (tie_key is None or key <= tie_key)."""

    threshold: float
    tie_key: str | None = None

    def keep(self, scores: np.ndarray, keys: list[str]) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float32)
        t = np.float32(self.threshold)
        above, equal = scores > t, scores == t
        if self.tie_key is None:
            return above | equal
        return above | (equal & np.array([k <= self.tie_key for k in keys], dtype=bool))


def buckets(scores: np.ndarray, bins: int) -> np.ndarray:
    """The histogram bucket of each score (cosines in [-1, 1]; anything outside lands in an end bucket)."""
    b = np.floor((np.asarray(scores, dtype=np.float64) + 1.0) / 2.0 * bins).astype(np.int64)
    return np.clip(b, 0, bins - 1)


def histogram(scores: np.ndarray, bins: int) -> np.ndarray:
    return np.bincount(buckets(scores, bins), minlength=bins)


def boundary_bucket(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(bucket holding the k-th highest score, how many scores lie in higher buckets); k >= 1."""
    above = np.concatenate([np.cumsum(hist[::-1])[::-1][1:], [0]])  # scores in buckets > b
    b = int(np.nonzero((above < k) & (above + hist >= k))[0][0])
    return b, int(above[b])


def top_count(n_scored: int, fraction: float) -> int:
    """How many pairs the top `fraction` keeps (rounded to the nearest pair)."""
    return min(n_scored, math.floor(fraction * n_scored + 0.5))


def exact_cut(boundary: list[tuple[float, str]], need: int) -> Cut:
    """The cut that keeps the `need` best (score desc, key asc) pairs of the boundary bucket."""
    ranked = sorted(boundary, key=lambda p: (-p[0], p[1]))
    score, key = ranked[need - 1]
    return Cut(float(score), key)


def no_pair() -> Cut:
    return Cut(math.inf, None)
