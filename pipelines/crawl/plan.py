"""The crawl plan: the ordered input rows, numbered and cut into shards, written once as Parquet.

`{output}/_plan/part-NNNNNN.parquet` hold the input rows in crawl order with two more columns: `ordinal`
(position in the whole input) and `shard` (`ordinal // samples_per_shard`); `_plan/_plan.json` lists the
parts (name, first ordinal, rows) and is written last, so it is the plan's commit. A shard worker reads
only its shard's rows (at most two row groups of one or two parts). A rerun reuses the plan when its
fingerprint (content settings + input listing) matches, and refuses otherwise, naming what differs.

Naming (`Layout`) is img2dataset's convention: shard `g` is a slice of the input, so it holds at most
`samples_per_shard` samples, and a sample's key is `{shard name}{ordinal % samples_per_shard}`.
"""

from __future__ import annotations

import bisect
import functools
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines import storage
from pipelines.fingerprint import check_reusable, write_fingerprint

PLAN_DIR = "_plan"
PLAN_FILE = "_plan.json"
PLAN_COLUMNS = ("ordinal", "shard")
WRITES_IN_FLIGHT = 16  # plan-part writes the driver keeps in flight while the input streams


@dataclass(frozen=True)
class Layout:
    num_input: int
    samples_per_shard: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_input // self.samples_per_shard)

    @property
    def shard_width(self) -> int:
        return max(5, len(str(max(0, self.num_shards - 1))))

    def shard_name(self, shard: int) -> str:
        return f"{shard:0{self.shard_width}d}"

    def key(self, ordinal: int) -> str:
        shard, index = divmod(ordinal, self.samples_per_shard)
        return f"{self.shard_name(shard)}{index:0{len(str(self.samples_per_shard - 1))}d}"

    def shard_size(self, shard: int) -> int:
        return min(self.samples_per_shard, self.num_input - shard * self.samples_per_shard)


@dataclass
class Plan:
    uri: str  # the plan folder
    samples_per_shard: int
    num_input: int = 0
    parts: list[tuple[str, int, int]] = field(default_factory=list)  # (file name, first ordinal, rows)

    @property
    def layout(self) -> Layout:
        return Layout(self.num_input, self.samples_per_shard)

    def pieces(self, shard: int) -> list[tuple[str, int, int]]:
        """(part uri, first row in the part, rows) covering shard `shard`'s rows, in order."""
        start = shard * self.samples_per_shard
        end = min(start + self.samples_per_shard, self.num_input)
        i = bisect.bisect_right(self._firsts, start) - 1
        out = []
        while start < end:
            name, first, rows = self.parts[i]
            take = min(end, first + rows) - start
            if take > 0:
                out.append((storage.join(self.uri, name), start - first, take))
                start += take
            i += 1
        return out

    @functools.cached_property
    def _firsts(self) -> list[int]:  # first ordinal of each part (read once the plan is complete)
        return [p[1] for p in self.parts]

    def to_dict(self) -> dict[str, Any]:
        return {"samples_per_shard": self.samples_per_shard, "num_input": self.num_input, "parts": self.parts}

    @classmethod
    def load(cls, uri: str) -> Plan:
        data = storage.read_json(storage.join(uri, PLAN_FILE))
        parts = [tuple(p) for p in data["parts"]]
        return cls(uri, data["samples_per_shard"], data["num_input"], parts)  # type: ignore[arg-type]


def plan_uri(out_uri: str) -> str:
    return storage.join(out_uri, PLAN_DIR)


def reusable_plan(out_uri: str, fp: Mapping[str, Any]) -> Plan | None:
    """The committed plan under `out_uri` when it was made from `fp`; None when there is none.
    Raises `StaleOutput` (naming the differences) when it was made from other settings or inputs."""
    uri = plan_uri(out_uri)
    if not storage.exists(storage.join(uri, PLAN_FILE)):
        return None
    if not check_reusable(uri, fp, "the crawl plan", "redo"):
        return None
    return Plan.load(uri)


def _part_bytes(table: pa.Table, first: int, samples_per_shard: int) -> bytes:
    table = table.drop_columns([c for c in PLAN_COLUMNS if c in table.column_names])
    ordinal = pa.array(range(first, first + table.num_rows), type=pa.int64())
    shard = pa.array([o // samples_per_shard for o in range(first, first + table.num_rows)], type=pa.int64())
    table = table.append_column("ordinal", ordinal).append_column("shard", shard)
    buf = io.BytesIO()
    # Row groups of one shard's size: a shard's slice touches at most two of them.
    pq.write_table(table, buf, row_group_size=samples_per_shard)
    return buf.getvalue()


@ray.remote(num_cpus=0.25, max_retries=3)
def _write_part(table: pa.Table, uri: str, first: int, samples_per_shard: int) -> None:
    storage.write_bytes_atomic(uri, _part_bytes(table, first, samples_per_shard))


def _ordered_blocks(ds: ray.data.Dataset) -> Iterator[tuple[Any, int]]:
    """(block ref, rows) in the dataset's order. Order is kept for this dataset only (its own context),
    never for later pipelines of the process; the driver sees refs and row counts, not rows."""
    ds.context.execution_options.preserve_order = True
    for bundle in ds.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            if entry.metadata.num_rows:
                yield entry.ref, entry.metadata.num_rows


def write_plan(
    ds: ray.data.Dataset | None, out_uri: str, samples_per_shard: int, fp: Mapping[str, Any]
) -> Plan:
    """Number `ds`'s rows in order, write them as the plan's parts, then commit the plan."""
    uri = plan_uri(out_uri)
    storage.makedirs(uri)
    plan = Plan(uri, samples_per_shard)
    pending: list[ray.ObjectRef] = []
    for ref, rows in _ordered_blocks(ds) if ds is not None else ():
        name = f"part-{len(plan.parts):06d}.parquet"
        pending.append(_write_part.remote(ref, storage.join(uri, name), plan.num_input, samples_per_shard))
        plan.parts.append((name, plan.num_input, rows))
        plan.num_input += rows
        if len(pending) >= WRITES_IN_FLIGHT:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
    ray.get(pending)
    storage.write_json(storage.join(uri, PLAN_FILE), plan.to_dict())
    write_fingerprint(uri, fp)
    return plan


def read_pieces(pieces: list[tuple[str, int, int]]) -> pa.Table:
    """One shard's plan rows (in a worker): only the row groups that hold them are read."""
    tables = []
    for uri, start, rows in pieces:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            group_rows = pf.metadata.row_group(0).num_rows
            first, last = start // group_rows, (start + rows - 1) // group_rows
            table = pf.read_row_groups(list(range(first, last + 1)))
        tables.append(table.slice(start - first * group_rows, rows))
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
