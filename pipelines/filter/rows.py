"""Per-shard steps over the store (plain functions over one store file, testable without Ray): the first
pass's summary (counts, score histogram, extremes), the boundary bucket's pairs, the k-means input, and
the decision rows that the filters mark.

A decision row: shard, row, key, query, score, reason ("" = still kept), dup_of, cluster, emb (unit-norm
fp16 image embedding as bytes, only while the dedupe needs it).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.filter import dedupe, score
from pipelines.filter.score import Cut

EXTREMES = 12  # lowest and highest scored pairs kept per shard for the report


def read_store(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def _embeddings(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    dim = arr.type.list_size
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def summary(uri: str, bins: int) -> dict:
    """Rows, scored rows, the sparse score histogram and the extreme pairs of one store file."""
    t = read_store(uri, ["row", "key", "shard", "reason", "score"])
    scored = pc.equal(t["reason"], "")
    s = t.filter(scored)
    scores = s["score"].to_numpy(zero_copy_only=False).astype(np.float32)
    hist = score.histogram(scores, bins)
    nz = np.nonzero(hist)[0]
    order = np.argsort(scores, kind="stable")
    picks = sorted(set(order[:EXTREMES].tolist()) | set(order[-EXTREMES:].tolist()))
    extremes = [
        {"score": float(scores[i]), "key": s["key"][i].as_py(), "shard": s["shard"][i].as_py()} for i in picks
    ]
    reasons = [r for r in t["reason"].to_pylist() if r]
    return {
        "n": t.num_rows,
        "scored": len(scores),
        "dropped": json.dumps({r: reasons.count(r) for r in sorted(set(reasons))}),
        "hist_bins": nz.astype(np.int64).tobytes(),
        "hist_counts": hist[nz].astype(np.int64).tobytes(),
        "extremes": json.dumps(extremes),
    }


def boundary_pairs(uri: str, bins: int, bucket: int) -> list[tuple[float, str]]:
    """(score, key) of the scored pairs of one store file that fall in histogram bucket `bucket`."""
    t = read_store(uri, ["key", "reason", "score"]).filter(pc.equal(pc.field("reason"), ""))
    scores = t["score"].to_numpy(zero_copy_only=False).astype(np.float32)
    hit = np.nonzero(score.buckets(scores, bins) == bucket)[0]
    keys = t["key"].to_pylist()
    return [(float(scores[i]), keys[i]) for i in hit]


def kept_embeddings(uri: str, cut: Cut) -> np.ndarray:
    """Image embeddings of the pairs of one store file that pass the score cut (k-means input)."""
    t = read_store(uri, ["key", "reason", "score", "image_emb"]).filter(pc.equal(pc.field("reason"), ""))
    keep = cut.keep(t["score"].to_numpy(zero_copy_only=False), t["key"].to_pylist())
    return _embeddings(t.filter(pa.array(keep))["image_emb"]) if keep.any() else np.zeros((0, 1), np.float32)


def decision_rows(uri: str, cut: Cut, centroids: np.ndarray | None) -> dict[str, np.ndarray]:
    """Every row of one store file with the store's or the score filter's reason, and its cluster."""
    t = read_store(uri, ["row", "key", "shard", "query", "reason", "score", "image_emb"])
    n = t.num_rows
    reason = np.array(t["reason"].to_pylist(), dtype=object)
    scores = t["score"].to_numpy(zero_copy_only=False).astype(np.float32)
    keys = t["key"].to_pylist()
    scored = reason == ""
    low = scored & ~cut.keep(np.nan_to_num(scores, nan=-np.inf), keys)
    reason[low] = score.LOW_SCORE
    alive = reason == ""
    emb = (
        _embeddings(t["image_emb"].fill_null([0.0] * t["image_emb"].type.list_size))
        if n
        else np.zeros((0, 1))
    )
    cluster = np.full(n, -1, dtype=np.int64)
    if centroids is not None and alive.any():
        cluster[alive] = dedupe.assign(emb[alive], centroids)
    return {
        "shard": np.array(t["shard"].to_pylist(), dtype=object),
        "row": t["row"].to_numpy().astype(np.int64),
        "key": np.array(keys, dtype=object),
        "query": np.array([q or "" for q in t["query"].to_pylist()], dtype=object),
        "score": np.nan_to_num(scores, nan=0.0),
        "reason": reason,
        "dup_of": np.array([""] * n, dtype=object),
        "dup_shard": np.array([""] * n, dtype=object),
        "cluster": cluster,
        "emb": np.array(
            [e.astype(np.float16).tobytes() if a else b"" for e, a in zip(emb, alive)], dtype=object
        ),
    }
