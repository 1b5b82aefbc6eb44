"""Counts per domain and per query as data: Parquet tables aggregated from the shards' sidecars.

`_stats_domains/` (domain, input, kept, dropped, duplicate, download_bytes) and `_stats_queries/` (query,
input, kept, dropped) sit beside `_stats.json`, each a folder of Parquet parts that any Parquet reader
takes (`read_table(out_uri, "domains")`, `pq.read_table(folder)`, `ray.data.read_parquet(folder)`);
`_stats.json` gets only their sizes and top-K rows. The driver never holds a row per domain or query:
up to `ROWS_PER_TASK` sidecar rows one task groups them with pyarrow; above that a Ray Data job
hash-shuffles them (one `groupby(["table", "key"]).sum` for both tables, bounded memory per task), writes
the parts and returns the top-K of each block. `kept + dropped = input` per key, `duplicate` is part of `dropped`.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from pipelines import storage
from pipelines.crawl.shard import sidecar_uris

TABLES = {"domains": "domain", "queries": "query"}  # name -> key column
FOLDER = "_stats_{}"  # beside _stats.json
SUMS = {
    "domains": ["input", "kept", "dropped", "duplicate", "download_bytes"],
    "queries": ["input", "kept", "dropped"],
}
TOP_BY = {"domains": "input", "queries": "kept"}
READ_COLUMNS = ["status", "query", "domain", "duplicate", "download_bytes"]
ROWS_PER_TASK = 1_000_000  # sidecar rows one task groups in memory (about 100 MB)
ROWS_PER_PARTITION = 500_000  # sidecar rows per shuffle partition above that
TOP_K = 20


def folder(out_uri: str, name: str) -> str:
    return storage.join(out_uri, FOLDER.format(name))


def count_rows(batch: pa.Table) -> pa.Table:
    """Sidecar rows -> one row of 0/1 counts each, with its domain and query."""
    kept = pc.and_(
        pc.is_null(batch.column("status")), pc.invert(pc.fill_null(batch.column("duplicate"), False))
    )
    ones = pa.array(np.ones(batch.num_rows, np.int64))
    kept = pc.cast(kept, pa.int64())
    return pa.table(
        {
            "domain": batch.column("domain"),
            "query": pc.fill_null(batch.column("query"), ""),
            "input": ones,
            "kept": kept,
            "dropped": pc.subtract(ones, kept),
            "duplicate": pc.cast(pc.fill_null(batch.column("duplicate"), False), pa.int64()),
            "download_bytes": pc.fill_null(batch.column("download_bytes"), 0),
        }
    )


def group(counts: pa.Table, name: str) -> pa.Table:
    """Per-key sums of `count_rows` rows (or of partial sums), sorted by key."""
    key, sums = TABLES[name], SUMS[name]
    out = counts.group_by(key).aggregate([(c, "sum") for c in sums])
    out = out.rename_columns([c.removesuffix("_sum") for c in out.column_names])
    return out.select([key, *sums]).sort_by(key)


def top(table: pa.Table, name: str, k: int) -> pa.Table:
    """The `k` rows with the most `TOP_BY[name]` (ties: by key), in that order."""
    return table.sort_by([(TOP_BY[name], "descending"), (TABLES[name], "ascending")]).slice(0, k)


def _write(table: pa.Table, out_uri: str, name: str) -> None:
    """`table` as the only part of its folder (one task's result)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(storage.join(folder(out_uri, name), "part-00000.parquet"), buf.getvalue())


def _sidecar_paths(out_uri: str) -> tuple[Any, list[str]]:
    fs, _ = storage.resolve(out_uri)
    return fs, [storage.resolve(uri)[1] for uri in sidecar_uris(out_uri)]


@ray.remote(num_cpus=0.5, max_retries=3)
def _in_one_task(out_uri: str, k: int) -> dict[str, list[dict[str, Any]]]:
    """Small builds: every sidecar in one task, each table one part; returns the top-K rows per table."""
    fs, files = _sidecar_paths(out_uri)
    counts = count_rows(pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=READ_COLUMNS))
    tops = {}
    for name in TABLES:
        table = group(counts, name)
        _write(table, out_uri, name)
        tops[name] = top(table, name, k).to_pylist()
    return tops


def _tagged(table: pa.Table, name: str) -> pa.Table:
    """Rows of table `name` in the long layout of the shuffle: `key` for the key column, plus `table`."""
    table = table.rename_columns(["key" if c == TABLES[name] else c for c in table.column_names])
    return table.append_column("table", pa.array([name] * table.num_rows, pa.string()))


def _both_tables(batch: pa.Table) -> pa.Table:
    """Sidecar rows -> (table, key, counts) rows for both tables, so that one shuffle groups them all."""
    counts = count_rows(batch)
    sums = SUMS["domains"]  # every count; `_one_table` keeps a table's own
    return pa.concat_tables([_tagged(counts.select([key, *sums]), name) for name, key in TABLES.items()])


def _summed(batch: pa.Table) -> pa.Table:
    """Ray Data's `sum(col)` names back to `col`."""
    return batch.rename_columns([c[4:-1] if c.startswith("sum(") else c for c in batch.column_names])


def _one_table(batch: pa.Table, name: str) -> pa.Table:
    rows = batch.filter(pc.equal(batch.column("table"), name))
    return rows.rename_columns([TABLES[name] if c == "key" else c for c in rows.column_names]).select(
        [TABLES[name], *SUMS[name]]
    )


def _tops(batch: pa.Table, k: int) -> pa.Table:
    """The top-K rows of each table in a block, in the long layout (the driver picks the global ones)."""
    parts = [_tagged(top(_one_table(batch, name), name, k), name) for name in TABLES]
    return pa.concat_tables(parts, promote_options="default")  # queries lack duplicate, download_bytes


def _with_ray_data(out_uri: str, num_rows: int, k: int) -> dict[str, list[dict[str, Any]]]:
    """Large builds: one hash shuffle groups both tables (bounded memory per task); the grouped rows (one
    per key, in the object store, spilled if need be) are written per table; the driver sees the top-K
    rows of each block."""
    fs, paths = _sidecar_paths(out_uri)
    partitions = max(2, min(1024, math.ceil(2 * num_rows / ROWS_PER_PARTITION)))
    grouped = (
        ray.data.read_parquet(paths, filesystem=fs, columns=READ_COLUMNS)
        .map_batches(_both_tables, batch_format="pyarrow")
        .groupby(["table", "key"], num_partitions=partitions)
        .sum(SUMS["domains"])
        .map_batches(_summed, batch_format="pyarrow")
        .materialize()
    )
    for name in TABLES:
        target_fs, target_path = storage.resolve(folder(out_uri, name))
        table = grouped.map_batches(_one_table, fn_args=(name,), batch_format="pyarrow")
        table.write_parquet(target_path, filesystem=target_fs)
    best = pa.Table.from_pylist(
        grouped.map_batches(_tops, fn_args=(k,), batch_format="pyarrow", batch_size=None).take_all()
    )
    return {
        name: top(_one_table(best, name), name, k).to_pylist() if best.num_rows else [] for name in TABLES
    }


def write_key_stats(out_uri: str, num_rows: int, k: int = TOP_K) -> dict[str, Any]:
    """Write `_stats_domains/` and `_stats_queries/` from the committed shards' sidecars (`num_rows` rows
    in all), replacing earlier ones; returns what `_stats.json` keeps: per table its folder, number of
    keys and top-K rows."""
    for name in TABLES:
        storage.delete(folder(out_uri, name))  # a rerun's parts replace the last run's, never add to them
    if num_rows == 0:
        tops: dict[str, list] = {name: [] for name in TABLES}
        for name in TABLES:
            empty = pa.schema([(TABLES[name], pa.string())] + [(c, pa.int64()) for c in SUMS[name]])
            _write(empty.empty_table(), out_uri, name)
    elif num_rows <= ROWS_PER_TASK:
        tops = ray.get(_in_one_task.remote(out_uri, k))
    else:
        tops = _with_ray_data(out_uri, num_rows, k)
    return {
        name: {
            "path": FOLDER.format(name),
            "keys": num_keys(out_uri, name),
            f"top_{TOP_BY[name]}": tops[name],
        }
        for name in TABLES
    }


def num_keys(out_uri: str, name: str) -> int:
    """Rows of a written table, from its parts' footers."""
    total = 0
    for uri in storage.list_files(folder(out_uri, name), ".parquet"):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def read_table(out_uri: str, name: str) -> pa.Table:
    """A whole per-key table (`"domains"` or `"queries"`), sorted by key: for readers and tests."""
    fs, path = storage.resolve(folder(out_uri, name))
    files = [storage.resolve(uri)[1] for uri in storage.list_files(folder(out_uri, name), ".parquet")]
    return pads.dataset(files, filesystem=fs, format="parquet").to_table().sort_by(TABLES[name])
