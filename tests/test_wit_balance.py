"""Balancing: the cap holds exactly, the rarest query is assigned, the choice depends only on the seed."""

from __future__ import annotations

import random
from collections import Counter

import pyarrow as pa

from pipelines.wit.balance import assign_query, cap_per_query, query_counts


def _table(n=2000, seed=1):
    rng = random.Random(seed)
    queries = ["photo", "dog", "cat", "zebra"]
    weights = [60, 25, 12, 3]
    rows = []
    for _ in range(n):
        k = rng.randint(1, 3)
        rows.append(sorted(set(rng.choices(queries, weights, k=k))))
    return pa.table(
        {"url": [f"https://x/{i}.jpg" for i in range(n)], "caption": ["c"] * n, "matched_queries": rows}
    )


def test_rarest_query_and_exact_cap():
    table = _table()
    counts = query_counts(table)
    assigned = assign_query(table, counts)
    for queries, q in zip(
        assigned.column("matched_queries").to_pylist(), assigned.column("query").to_pylist()
    ):
        assert counts[q] == min(counts[m] for m in queries)
    before = Counter(assigned.column("query").to_pylist())
    out, dropped = cap_per_query(assigned, max_per_query=100, seed=7)
    after = Counter(out.column("query").to_pylist())
    assert after == {q: min(n, 100) for q, n in before.items()}  # exact cap, small queries untouched
    assert dropped == {"over_query_cap": sum(max(0, n - 100) for n in before.values())}


def test_deterministic_under_seed_and_order():
    assigned = assign_query(_table(), query_counts(_table()))
    a, _ = cap_per_query(assigned, 50, seed=3)
    shuffled = assigned.take(random.Random(0).sample(range(assigned.num_rows), assigned.num_rows))
    b, _ = cap_per_query(shuffled, 50, seed=3)
    c, _ = cap_per_query(assigned, 50, seed=4)
    urls = lambda t: set(t.column("url").to_pylist())  # noqa: E731
    assert urls(a) == urls(b) and urls(a) != urls(c)
