"""Per-query rebalancing after the other filters: at most `max_per_query` surviving pairs per query, chosen
by pipelines/wit/balance.py's rule (the smallest seeded hashes per query, so reruns keep the same pairs).

A pair's query is the `query` of its shard metadata: the query our curation assigned it (the rarest of
its matched queries, balance.assign_query). Pairs without a query are not capped.
"""

from __future__ import annotations

import pyarrow as pa

from pipelines.wit.balance import cap_per_query

OVER_CAP = "over_query_cap"


def cap_group(table: pa.Table, max_per_query: int, seed: int) -> pa.Table:
    """One query's rows: those beyond the cap get reason `over_query_cap` (none is removed)."""
    n = table.num_rows
    probe = pa.table(
        {
            "query": table["query"],
            "url": table["key"],
            "caption": pa.array([""] * n, pa.string()),
            "i": pa.array(range(n), pa.int64()),
        }
    )
    kept, _ = cap_per_query(probe, max_per_query, seed)
    keep = set(kept["i"].to_pylist())
    reasons = ["" if i in keep else OVER_CAP for i in range(n)]
    return table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))


def apply(ds, max_per_query: int, seed: int, columns: list[str]):
    """The Ray Data dataset `ds` (decision rows) with the cap applied to its kept rows with a query."""
    eligible = ds.filter(expr="reason == '' and query != ''")
    rest = ds.filter(expr="reason != '' or query == ''")
    capped = eligible.groupby("query").map_groups(
        lambda t: cap_group(t, max_per_query, seed).select(columns), batch_format="pyarrow"
    )
    return rest.select_columns(columns).union(capped)
