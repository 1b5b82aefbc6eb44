"""The filters' Ray Data graph over the embedding store, and the selection it ends in.

1. summary pass (one task per store file): counts, score histogram, extremes -> the score cut (an exact
   second pass over the boundary bucket for `top_fraction`);
2. k-means fitted in one task streaming the kept embeddings shard by shard;
3. decision rows (one task per store file) -> split into dropped rows and kept rows; kept rows grouped by
   cluster for the in-cluster dedupe, then by assigned query for the per-query cap;
4. all rows grouped by shard -> selection files + one record per shard.
The driver holds O(shards + bins + clusters x D) plus the per-query counts; every count is data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from pipelines.filter import dedupe, rebalance, rows, score
from pipelines.filter.config import FilterConfig
from pipelines.filter.score import Cut
from pipelines.filter.select import write_selection

ROW_COLUMNS = ["shard", "row", "key", "query", "score", "reason", "dup_of", "dup_shard"]


@dataclass
class Summary:
    n: int = 0
    scored: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    hist: np.ndarray | None = None
    extremes: list[dict] = field(default_factory=list)


def _per_store(store: list[str], fn, **kwargs):
    """A dataset of fn(uri, **kwargs) rows, one task per store file."""
    import ray

    def apply(batch):
        out = [fn(str(u), **kwargs) for u in batch["uri"]]
        return {k: np.array([o[k] for o in out], dtype=object) for k in out[0]}

    return ray.data.from_items(
        [{"uri": u} for u in store], override_num_blocks=max(1, len(store))
    ).map_batches(apply, batch_size=1, num_cpus=0.5)


def summarise(store: list[str], bins: int) -> Summary:
    s = Summary(hist=np.zeros(bins, dtype=np.int64))
    for rec in _per_store(store, rows.summary, bins=bins).iter_rows():
        s.n += int(rec["n"])
        s.scored += int(rec["scored"])
        for reason, k in json.loads(rec["dropped"]).items():
            s.dropped[reason] = s.dropped.get(reason, 0) + k
        idx = np.frombuffer(rec["hist_bins"], np.int64)
        s.hist[idx] += np.frombuffer(rec["hist_counts"], np.int64)
        s.extremes = sorted(s.extremes + json.loads(rec["extremes"]), key=lambda e: (e["score"], e["key"]))
        s.extremes = s.extremes[: rows.EXTREMES] + s.extremes[rows.EXTREMES :][-rows.EXTREMES :]
    return s


def decide_cut(cfg: FilterConfig, store: list[str], s: Summary) -> Cut:
    if cfg.score.threshold is not None:
        return Cut(cfg.score.threshold)
    if cfg.score.top_fraction is None:
        return Cut(-np.inf)
    need = score.top_count(s.scored, cfg.score.top_fraction)
    if need == 0:
        return score.no_pair()
    bucket, above = score.boundary_bucket(s.hist, need)
    pairs = []
    ds = _per_store(
        store,
        lambda u, **kw: {"pairs": json.dumps(rows.boundary_pairs(u, **kw))},
        bins=cfg.score.bins,
        bucket=bucket,
    )
    for rec in ds.iter_rows():
        pairs.extend((float(p), str(k)) for p, k in json.loads(rec["pairs"]))
    return score.exact_cut(pairs, need - above)


def fit_centroids(cfg: FilterConfig, store: list[str], cut: Cut) -> np.ndarray:
    """k-means in one Ray task that streams the store (memory: one shard's embeddings)."""
    import ray

    def fit() -> np.ndarray:
        batches = (rows.kept_embeddings(u, cut) for u in store)
        return dedupe.fit_centroids(batches, cfg.dedupe.clusters, cfg.dedupe.seed)

    return ray.get(ray.remote(num_cpus=1)(fit).remote())


def _dedupe_group(threshold: float):
    def run(group):
        emb = np.stack([np.frombuffer(b, np.float16) for b in group["emb"]]).astype(np.float32)
        keys = [str(k) for k in group["key"]]
        dup_of = dedupe.duplicates(keys, group["score"], emb, threshold)
        shard_of = dict(zip(keys, group["shard"]))
        group = dict(group)
        group["dup_of"] = np.array(dup_of, dtype=object)
        group["dup_shard"] = np.array([shard_of[d] if d else "" for d in dup_of], dtype=object)
        group["reason"] = np.array([dedupe.NEAR_DUPLICATE if d else "" for d in dup_of], dtype=object)
        return {k: group[k] for k in ROW_COLUMNS}

    return run


def run_filters(cfg: FilterConfig, store: list[str], cut: Cut, centroids: np.ndarray | None):
    """Records (one per shard with rows) of the selection written under cfg.output."""
    decisions = _per_store_rows(store, cut, centroids)
    alive = decisions.filter(expr="reason == ''")
    dead = decisions.filter(expr="reason != ''").select_columns(ROW_COLUMNS)
    if centroids is not None:
        alive = alive.groupby("cluster").map_groups(_dedupe_group(cfg.dedupe.threshold), batch_format="numpy")
    else:
        alive = alive.select_columns(ROW_COLUMNS)
    if cfg.rebalance.max_per_query:
        alive = rebalance.apply(alive, cfg.rebalance.max_per_query, cfg.rebalance.seed, ROW_COLUMNS)
    return (
        dead.union(alive)
        .groupby("shard")
        .map_groups(write_selection, fn_kwargs={"output": cfg.output}, batch_format="numpy")
        .iter_rows()
    )


def _per_store_rows(store: list[str], cut: Cut, centroids):
    import ray

    def apply(batch):
        parts = [rows.decision_rows(str(u), cut, centroids) for u in batch["uri"]]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    ds = ray.data.from_items([{"uri": u} for u in store], override_num_blocks=max(1, len(store)))
    return ds.map_batches(apply, batch_size=1, num_cpus=0.5)
