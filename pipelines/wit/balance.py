"""Balancing: at most `max_per_query` pairs per query (the paper's 20,000), exact and deterministic.

The rule (documented choice; MetaCLIP's `t / max(count, t)` sampling only bounds the *expected* count):
1. Count, over all matched pairs, how many contain each query (`query_counts`, a global aggregation).
2. Assign each pair to its rarest matched query - smallest global count, ties broken by the query string
   (`assign_query`). Rare queries thus keep every pair they have, and head queries such as "photo" absorb
   only pairs that match nothing rarer, which is what flattens the head of the distribution.
3. Per assigned query, keep the `max_per_query` pairs with the smallest `balance_key` - a seeded BLAKE2b
   hash of (url, caption) (`cap_per_query`). The choice depends only on content and seed, never on input
   order or partitioning, so a rerun with the same seed keeps the same pairs and the cap holds exactly.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa


def query_counts(batch: pa.Table) -> Counter:
    """How many pairs of `batch` contain each query (column `matched_queries`)."""
    counts: Counter = Counter()
    for queries in batch.column("matched_queries").to_pylist():
        counts.update(queries)
    return counts


def assign_query(batch: pa.Table, counts: Mapping[str, int]) -> pa.Table:
    """Add `query`: each row's matched query with the smallest global count (ties: smallest string)."""
    assigned = [
        min(queries, key=lambda q: (counts.get(q, 0), q))
        for queries in batch.column("matched_queries").to_pylist()
    ]
    if "query" in batch.column_names:
        batch = batch.drop_columns(["query"])
    return batch.append_column("query", pa.array(assigned, pa.string()))


def balance_key(url: str, caption: str, seed: int) -> int:
    digest = hashlib.blake2b(f"{url}\x00{caption}".encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big")


def cap_per_query(batch: pa.Table, max_per_query: int, seed: int = 0) -> tuple[pa.Table, dict[str, int]]:
    """Keep at most `max_per_query` rows per `query`; `batch` must hold every row of its queries."""
    if batch.num_rows == 0:
        return batch, {}
    keys = [
        balance_key(u, c, seed)
        for u, c in zip(batch.column("url").to_pylist(), batch.column("caption").to_pylist())
    ]
    df = pd.DataFrame({"query": batch.column("query").to_pylist(), "key": np.array(keys, dtype=np.uint64)})
    order = df.sort_values(["query", "key"], kind="stable")
    rank = order.groupby("query", sort=False).cumcount()
    keep = np.zeros(len(df), dtype=bool)
    keep[order.index[rank.to_numpy() < max_per_query]] = True
    out = batch.filter(pa.array(keep))
    n_dropped = batch.num_rows - out.num_rows
    return out, ({"over_query_cap": n_dropped} if n_dropped else {})
