"""Counts per domain and per query are data: Parquet tables from the sidecars, the same from one task and
from the Ray Data shuffle, kept + dropped = input per key, and `_stats.json` keeps only the top rows."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.crawl import key_stats, shard


def sidecar_rows(first: int, domains: list[str], statuses: list[str | None]) -> pa.Table:
    n = len(domains)
    return pa.table(
        {
            "ordinal": list(range(first, first + n)),
            "status": pa.array(statuses, pa.string()),
            "sha256": [f"{i:064x}" for i in range(first, first + n)],
            "query": [d.split(".")[0] for d in domains],
            "domain": domains,
            "download_bytes": [100] * n,
            "jpg_bytes": [50] * n,
            "caption_truncated": [False] * n,
        },
        schema=shard.ROWS_SCHEMA,
    )


def write_shards(out: str) -> None:
    """Three committed shards (sidecar + manifest): a.org 4 URLs (one 404, one duplicate), b.org 3, c.org 1."""
    shards = [
        (["a.org", "b.org", "a.org"], [None, None, "http_404"], set()),
        (["b.org", "a.org", "c.org"], [None, None, "caption_empty"], {4}),
        (["a.org", "b.org"], [None, "timeout"], set()),
    ]
    first = 0
    for g, (domains, statuses, duplicates) in enumerate(shards):
        rows = sidecar_rows(first, domains, statuses)
        buf = io.BytesIO()
        pq.write_table(shard.sidecar(rows, duplicates), buf)
        storage.write_bytes_atomic(shard.rows_uri(out, f"{g:05d}"), buf.getvalue())
        storage.write_json(f"{out}/{g:05d}.manifest.json", {"shard": f"{g:05d}", "count": 0, "stats": {}})
        first += len(domains)


def test_counts_per_key_one_task_and_ray_data_agree(ray_local, tmp_path, monkeypatch):
    out = str(tmp_path)
    write_shards(out)
    small = key_stats.write_key_stats(out, num_rows=8, k=2)
    domains = key_stats.read_table(out, "domains").to_pylist()
    assert domains == [
        {"domain": "a.org", "input": 4, "kept": 2, "dropped": 2, "duplicate": 1, "download_bytes": 400},
        {"domain": "b.org", "input": 3, "kept": 2, "dropped": 1, "duplicate": 0, "download_bytes": 300},
        {"domain": "c.org", "input": 1, "kept": 0, "dropped": 1, "duplicate": 0, "download_bytes": 100},
    ]
    queries = key_stats.read_table(out, "queries").to_pylist()
    assert [(q["query"], q["input"], q["kept"]) for q in queries] == [("a", 4, 2), ("b", 3, 2), ("c", 1, 0)]
    assert small["domains"] == {"path": "_stats_domains", "keys": 3, "top_input": domains[:2]}
    assert small["queries"]["top_kept"] == queries[:2] and small["queries"]["keys"] == 3

    monkeypatch.setattr(key_stats, "ROWS_PER_TASK", 0)  # the path of builds above a million rows
    large = key_stats.write_key_stats(out, num_rows=8, k=2)
    assert large == small
    assert key_stats.read_table(out, "domains").to_pylist() == domains  # the parts were replaced
    assert key_stats.read_table(out, "queries").to_pylist() == queries
