"""The selection: per input shard `{output}/selection/{shard}.parquet` (one string column `key`, the kept
keys in the shard's row order; zero rows when nothing is kept) and `_selection.json` (the contract shared
with the trainer and the evaluation: data_uri, shards, input, kept, dropped by reason)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

SELECTION_DIR = "selection"
SELECTION_FILE = "_selection.json"
DUP_EXAMPLES = 4  # duplicate pairs a shard reports for the report's examples


def selection_uri(output: str, shard: str) -> str:
    return storage.join(output, SELECTION_DIR, f"{shard}.parquet")


def write_keys(output: str, shard: str, keys: list[str]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": pa.array(keys, pa.string())}), buf)
    storage.write_bytes_atomic(selection_uri(output, shard), buf.getvalue())


def write_selection(group: Mapping[str, np.ndarray], output: str) -> dict[str, np.ndarray]:
    """map_groups over one shard's decision rows: writes its selection file, returns one record (shard,
    n, kept, dropped as JSON, a few duplicate pairs as JSON)."""
    shard = str(group["shard"][0])
    order = np.argsort(np.asarray(group["row"], dtype=np.int64), kind="stable")
    reasons = [str(group["reason"][i]) for i in order]
    keys = [str(group["key"][i]) for i in order]
    write_keys(output, shard, [k for k, r in zip(keys, reasons) if not r])
    dropped = {r: reasons.count(r) for r in sorted(set(reasons) - {""})}
    dups = [
        {
            "key": keys[j],
            "shard": shard,
            "dup_of": str(group["dup_of"][i]),
            "dup_shard": str(group["dup_shard"][i]),
        }
        for j, i in enumerate(order)
        if group["dup_of"][i]
    ][:DUP_EXAMPLES]
    record = {
        "shard": shard,
        "n": len(keys),
        "kept": reasons.count(""),
        "dropped": json.dumps(dropped),
        "dups": json.dumps(dups),
    }
    return {k: np.array([v], dtype=object) for k, v in record.items()}


def write_summary(output: str, data_uri: str, shards: int, n_in: int, kept: int, dropped: dict) -> dict:
    summary = {"data_uri": data_uri, "shards": shards, "input": n_in, "kept": kept, "dropped": dropped}
    storage.write_json(storage.join(output, SELECTION_DIR, SELECTION_FILE), summary)
    return summary
