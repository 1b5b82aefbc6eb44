"""One shard, from crawled rows to committed files (pure functions over Arrow tables; no Ray).

A shard worker turns its crawled plan slice into:
- `{name}.tar` / `{name}.parquet`: the samples (rows that passed the checks and are not duplicates),
  written atomically (shards.write_shard_files);
- `_rows/{name}.parquet`: the sidecar, one small row per input row (ordinal, drop reason, sha256, query,
  domain, bytes, caption truncated, left out as a duplicate; no image): what the global dedupe, the retry
  pass and every count are computed from (per domain and per query: key_stats.py);
- `{name}.manifest.json` last (the commit): stage totals only (the funnel and bytes; never a count per
  domain or query), the number of duplicates its files leave out and of transient failures a retry pass
  could fetch.

The funnel of a shard is a function of its sidecar and of the ordinals its files leave out as
duplicates, so recomputing it (after compaction or a retry) gives what one clean pass gives.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Sequence
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import shards, storage
from pipelines.crawl import crawl as crawl_module
from pipelines.crawl.captions import CAPTION_REASONS
from pipelines.crawl.plan import Layout
from pipelines.stats import Funnel

ROWS_DIR = "_rows"
ROWS_SCHEMA = pa.schema(
    [
        ("ordinal", pa.int64()),
        ("status", pa.string()),
        ("sha256", pa.string()),
        ("query", pa.string()),
        ("domain", pa.string()),
        ("download_bytes", pa.int64()),
        ("jpg_bytes", pa.int64()),
        ("caption_truncated", pa.bool_()),
    ]
)
# The sidecar as written: the rows plus whether the shard's files leave the row out as a duplicate.
SIDECAR_SCHEMA = ROWS_SCHEMA.append(pa.field("duplicate", pa.bool_()))
NOT_METADATA = ("jpg", "status", "shard", "caption_truncated")  # the key carries the shard; ordinal stays


def is_transient(reason: str | None) -> bool:
    return bool(reason) and crawl_module.is_transient(reason)


def drop_stage(reason: str) -> str:
    if reason in CAPTION_REASONS:
        return "caption"
    return "image" if reason in crawl_module.IMAGE_REASONS else "fetch"


def domain_of(url: Any) -> str:
    try:
        return urlsplit(str(url)).hostname or "invalid"
    except ValueError:
        return "invalid"


def rows_table(crawled: pa.Table) -> pa.Table:
    """The sidecar of crawled rows: what every count is computed from (no image bytes)."""
    jpg = crawled.column("jpg").to_pylist()
    queries = crawled.column("query").to_pylist() if "query" in crawled.column_names else [None] * len(jpg)
    truncated = (
        crawled.column("caption_truncated").to_pylist()
        if "caption_truncated" in crawled.column_names
        else [False] * len(jpg)
    )
    data = {
        "ordinal": crawled.column("ordinal"),
        "status": crawled.column("status"),
        "sha256": crawled.column("sha256"),
        "query": [str(q or "") for q in queries],
        "domain": [domain_of(u) for u in crawled.column("url").to_pylist()],
        "download_bytes": [int(b or 0) for b in crawled.column("download_bytes").to_pylist()],
        "jpg_bytes": [len(j) if j is not None else 0 for j in jpg],
        "caption_truncated": [bool(t) for t in truncated],
    }
    return pa.table(data, schema=ROWS_SCHEMA)


def first_copies(rows: pa.Table, already: Collection[int] = ()) -> set[int]:
    """Ordinals of rows that passed the checks but repeat an earlier row's sha256 in this shard."""
    seen: set[str] = set()
    duplicates = set(already)
    for r in sorted(rows.to_pylist(), key=lambda r: r["ordinal"]):
        if r["status"] or r["ordinal"] in duplicates:
            continue
        if r["sha256"] in seen:
            duplicates.add(r["ordinal"])
        seen.add(r["sha256"])
    return duplicates


def shard_funnel(rows: pa.Table, excluded: Collection[int]) -> Funnel:
    """The funnel of one shard: `rows` = its sidecar, `excluded` = ordinals left out as duplicates. Stage
    totals and bytes only: counts per domain and per query are data (key_stats.py), never manifest keys."""
    funnel = Funnel()
    drops: dict[str, dict[str, int]] = {"caption": {}, "fetch": {}, "image": {}}
    truncated = 0
    for r in rows.to_pylist():
        reason = r["status"]
        funnel.count("bytes", "downloaded", r["download_bytes"])
        if reason:
            target = drops[drop_stage(reason)]
            target[reason] = target.get(reason, 0) + 1
        elif r["ordinal"] not in excluded:
            funnel.count("bytes", "jpg_written", r["jpg_bytes"])
            truncated += bool(r.get("caption_truncated"))
    n = rows.num_rows
    captioned = n - sum(drops["caption"].values())
    fetched = captioned - sum(drops["fetch"].values())
    decoded = fetched - sum(drops["image"].values())
    funnel.record("input", n, n, {})
    funnel.record("caption", n, captioned, drops["caption"])
    funnel.record("fetch", captioned, fetched, drops["fetch"])
    funnel.record("image", fetched, decoded, drops["image"])
    funnel.record(
        "dedupe", decoded, decoded - len(excluded), {"duplicate": len(excluded)} if excluded else {}
    )
    funnel.add_counts("captions", {"truncated": truncated})
    funnel.check()
    return funnel


def to_sample(row: dict[str, Any], layout: Layout) -> dict[str, Any]:
    meta = {k: v for k, v in row.items() if k not in NOT_METADATA and v is not None}
    meta["key"] = layout.key(row["ordinal"])
    meta.setdefault("query", "")
    meta["caption"] = str(row.get("caption") or "")
    return {"key": meta["key"], "jpg": row["jpg"], "txt": meta["caption"], "json": meta}


def samples_of(crawled: pa.Table, layout: Layout, excluded: Collection[int]) -> list[dict[str, Any]]:
    """The samples of crawled rows that passed the checks and are not excluded, in ordinal order."""
    ok = [r for r in crawled.to_pylist() if not r["status"] and r["ordinal"] not in excluded]
    return [to_sample(r, layout) for r in sorted(ok, key=lambda r: r["ordinal"])]


def rows_uri(out_uri: str, name: str) -> str:
    return storage.join(out_uri, ROWS_DIR, f"{name}.parquet")


def sidecar_uris(out_uri: str) -> list[str]:
    """The sidecars of the committed shards, in shard order (from the index where there is one)."""
    return [rows_uri(out_uri, name) for name in sorted(shards.committed_names(out_uri))]


def read_rows(out_uri: str, name: str) -> pa.Table:
    table = pq.read_table(io.BytesIO(storage.read_bytes(rows_uri(out_uri, name))))
    return table.select(ROWS_SCHEMA.names).cast(ROWS_SCHEMA)


def sidecar(rows: pa.Table, excluded: Collection[int]) -> pa.Table:
    """`rows` as written: with `duplicate` (left out of the files as a duplicate) for the counts."""
    duplicate = pa.array([o in excluded for o in rows.column("ordinal").to_pylist()], pa.bool_())
    return rows.append_column(SIDECAR_SCHEMA.field("duplicate"), duplicate)


def commit(
    out_uri: str,
    name: str,
    samples: Sequence[dict[str, Any]],
    rows: pa.Table,
    excluded: Collection[int],
    formats: Sequence[str],
    subdir: str = "",
) -> dict[str, Any]:
    """Write a shard's files (under `subdir`: shards.shard_dir), its sidecar, then its manifest (the
    commit). Returns the small record."""
    files = shards.write_shard_files(samples, out_uri, name, formats, subdir)
    buf = io.BytesIO()
    pq.write_table(sidecar(rows, excluded), buf)
    storage.write_bytes_atomic(rows_uri(out_uri, name), buf.getvalue())
    transient = sum(1 for s in rows.column("status").to_pylist() if is_transient(s))
    stats = {
        "funnel": shard_funnel(rows, excluded).to_dict(),
        "excluded": len(excluded),
        "transient": transient,
    }
    manifest = shards.write_manifest(samples, out_uri, name, files, stats)
    return {"shard": name, "count": manifest["count"], "input": rows.num_rows, "transient": transient}
