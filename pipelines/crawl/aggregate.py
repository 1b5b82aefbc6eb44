"""`_stats.json`'s totals and `_index.parquet` from the committed shards' manifests, aggregated by tasks.

Tasks read the manifests in chunks and return partial sums (a funnel: stage totals and bytes, nothing per
domain or query: that is key_stats.py) and index rows; partial funnels are merged by a tree of tasks, so
the driver holds the listing, one funnel and the index (O(shards) numbers).
A retried task returns the same partial: the counts are data, never side effects.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipelines import shards, storage
from pipelines.stats import Funnel

INDEX_FILE = shards.INDEX_FILE
INDEX_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("num_samples", pa.int64()),
        ("tar_bytes", pa.int64()),
        ("parquet_bytes", pa.int64()),
        # Where the shard's files are, relative to the dataset folder (null: format not written): readers
        # take the shard list from here instead of listing the folder (pipelines/datasets.py).
        ("tar_path", pa.string()),
        ("parquet_path", pa.string()),
    ]
)
MANIFESTS_PER_TASK = 256
MERGE_FANOUT = 16


@ray.remote(num_cpus=0.25, max_retries=3)
def _summarise(uris: Sequence[str]) -> tuple[dict[str, Any], pa.Table, list[str]]:
    """(partial funnel, index rows, names of shards with transient failures) of some manifests."""
    funnel = Funnel()
    index: dict[str, list] = {n: [] for n in INDEX_SCHEMA.names}
    transient = []
    for uri in uris:
        m = storage.read_json(uri)
        funnel.merge(m["stats"].get("funnel", {}))
        files = m.get("files", {})
        index["shard"].append(m["shard"])
        index["num_samples"].append(int(m["count"]))
        index["tar_bytes"].append(sum(v for k, v in files.items() if k.endswith(".tar")))
        index["parquet_bytes"].append(sum(v for k, v in files.items() if k.endswith(".parquet")))
        index["tar_path"].append(next((k for k in files if k.endswith(".tar")), None))
        index["parquet_path"].append(next((k for k in files if k.endswith(".parquet")), None))
        if m["stats"].get("transient"):
            transient.append(m["shard"])
    return funnel.to_dict(), pa.table(index, schema=INDEX_SCHEMA), transient


@ray.remote(num_cpus=0.25, max_retries=3)
def _merge(*partials: dict[str, Any]) -> dict[str, Any]:
    funnel = Funnel()
    for p in partials:
        funnel.merge(p)
    return funnel.to_dict()


def _tree_merge(refs: list[Any]) -> dict[str, Any]:
    while len(refs) > 1:
        refs = [_merge.remote(*refs[i : i + MERGE_FANOUT]) for i in range(0, len(refs), MERGE_FANOUT)]
    return ray.get(refs[0]) if refs else Funnel().to_dict()


def summarise(out_uri: str) -> tuple[dict[str, Any], pa.Table, list[str]]:
    """(funnel of every committed shard, the index sorted by shard, shards with transient failures)."""
    names = sorted(shards.committed_names(out_uri))  # the index of a finished build, else a listing
    uris = [storage.join(out_uri, name + shards.MANIFEST_SUFFIX) for name in names]
    chunks = [uris[i : i + MANIFESTS_PER_TASK] for i in range(0, len(uris), MANIFESTS_PER_TASK)]
    refs = [_summarise.options(num_returns=3).remote(chunk) for chunk in chunks]
    funnel = _tree_merge([r[0] for r in refs])  # partial funnels stay in the object store
    index_parts = ray.get([r[1] for r in refs])
    index = pa.concat_tables(index_parts) if index_parts else INDEX_SCHEMA.empty_table()
    transient = sorted(name for part in ray.get([r[2] for r in refs]) for name in part)
    return funnel, index.sort_by("shard"), transient


def write_index(out_uri: str, index: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(index, buf)
    storage.write_bytes_atomic(storage.join(out_uri, INDEX_FILE), buf.getvalue())


def totals(funnel: dict[str, Any], index: pa.Table) -> dict[str, Any]:
    dropped: dict[str, int] = {}
    for entry in funnel["stages"].values():
        for reason, n in entry["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    return {
        "input": funnel["stages"].get("input", {}).get("in", 0),
        "kept": int(pc.sum(index.column("num_samples")).as_py() or 0),
        "dropped": dropped,
        "shards": index.num_rows,
    }
