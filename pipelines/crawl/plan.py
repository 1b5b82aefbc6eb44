"""The crawl plan: the ordered input rows, numbered and cut into shards.

`_plan/_plan.json` lists the plan's parts (file, first ordinal, rows) in crawl order and is written last,
so it is the plan's commit. A row's `ordinal` is its position in the whole input and its shard is
`ordinal // samples_per_shard`; a shard worker reads only its shard's rows (`read_pieces`: the row groups
that hold them) and numbers them. Two ways to make the parts:
- a Parquet input (a file, or a folder of .parquet files) is its own plan: the parts are the input files
  themselves, counted from their footers in the driver; nothing is read or rewritten (a billion-row input
  costs one footer read per file). Used when no row group is larger than `DIRECT_MAX_GROUP_ROWS`, so a
  shard never reads much more than its rows;
- any other input (CSV, JSON lines, a Ray Dataset such as the curation's output) is written once by Ray
  Data tasks as `_plan/part-NNNNNN.parquet`, in the dataset's order, with row groups of one shard.
A rerun reuses the plan when its fingerprint (content settings + input listing) matches, and refuses
otherwise, naming what differs.

Naming (`Layout`) is img2dataset's convention: shard `g` is a slice of the input, so it holds at most
`samples_per_shard` samples, and a sample's key is `{shard name}{ordinal % samples_per_shard}`.
"""

from __future__ import annotations

import bisect
import functools
import io
import itertools
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines import storage
from pipelines.fingerprint import check_reusable, write_fingerprint

PLAN_DIR = "_plan"
PLAN_FILE = "_plan.json"
PLAN_COLUMNS = ("ordinal", "shard")
WRITES_IN_FLIGHT = 16  # plan-part writes the driver keeps in flight while the input streams
# A Parquet input whose row groups are all at most this many rows is its own plan (module doc): a shard
# then reads at most one such group more than its rows.
DIRECT_MAX_GROUP_ROWS = 256 * 1024
FOOTER_READS_IN_FLIGHT = 32


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
    # (file, first ordinal, rows): a name inside the plan folder, or the full URI of an input file
    parts: list[tuple[str, int, int]] = field(default_factory=list)

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
                out.append((self._part_uri(name), start - first, take))
                start += take
            i += 1
        return out

    def _part_uri(self, name: str) -> str:
        return name if storage.is_s3(name) or name.startswith("/") else storage.join(self.uri, name)

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
    table = with_ordinals(table, first, samples_per_shard)
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
    return commit_plan(plan, fp)


def read_pieces(pieces: list[tuple[str, int, int]], first_ordinal: int, samples_per_shard: int) -> pa.Table:
    """One shard's rows (in a worker), numbered from `first_ordinal`: only the row groups of each piece's
    file that hold its rows are read."""
    tables = []
    for uri, start, rows in pieces:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            ends = list(
                itertools.accumulate(pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups))
            )
            first = bisect.bisect_right(ends, start)
            last = bisect.bisect_right(ends, start + rows - 1)
            table = pf.read_row_groups(list(range(first, last + 1)))
        offset = start - (ends[first - 1] if first else 0)
        table = table.slice(offset, rows)
        tables.append(table.drop_columns([c for c in PLAN_COLUMNS if c in table.column_names]))
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    return with_ordinals(table, first_ordinal, samples_per_shard)


def with_ordinals(table: pa.Table, first: int, samples_per_shard: int) -> pa.Table:
    """`table` with `ordinal` (first, first + 1, ...) and `shard` (ordinal // samples_per_shard) appended."""
    ordinals = range(first, first + table.num_rows)
    table = table.append_column("ordinal", pa.array(ordinals, type=pa.int64()))
    return table.append_column("shard", pa.array([o // samples_per_shard for o in ordinals], type=pa.int64()))


def parquet_inputs(uri: str) -> list[str] | None:
    """The full URIs of a Parquet input's files in plan order (a file, or a folder's .parquet files sorted
    by path, names starting with _ or . left out); None when the input is not only Parquet."""
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        infos = [i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(("_", "."))]
    if not infos or not all(i.path.endswith(".parquet") for i in infos):
        return None
    return sorted(f"s3://{i.path}" if storage.is_s3(uri) else os.path.abspath(i.path) for i in infos)


def _footer(uri: str) -> pq.FileMetaData:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata


def _row_groups(uri: str) -> list[int]:
    meta = _footer(uri)
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def parquet_schema(uri: str) -> pa.Schema:
    """One Parquet file's schema, from its footer."""
    return _footer(uri).schema.to_arrow_schema()


def direct_plan(files: list[str], out_uri: str, samples_per_shard: int, fp: Mapping[str, Any]) -> Plan | None:
    """Parquet input files (`parquet_inputs`) as their own plan (module doc), committed; None when one has
    a row group larger than `DIRECT_MAX_GROUP_ROWS` (then `write_plan` rewrites the input)."""
    with ThreadPoolExecutor(FOOTER_READS_IN_FLIGHT) as pool:
        groups = list(pool.map(_row_groups, files))
    if any(rows > DIRECT_MAX_GROUP_ROWS for g in groups for rows in g):
        return None
    plan = Plan(plan_uri(out_uri), samples_per_shard)
    for file, rows in zip(files, (sum(g) for g in groups)):
        if rows:
            plan.parts.append((file, plan.num_input, rows))
            plan.num_input += rows
    return commit_plan(plan, fp)


def commit_plan(plan: Plan, fp: Mapping[str, Any]) -> Plan:
    """Write `_plan.json` (the plan's commit) and the fingerprint it was made from."""
    storage.makedirs(plan.uri)
    storage.write_json(storage.join(plan.uri, PLAN_FILE), plan.to_dict())
    write_fingerprint(plan.uri, fp)
    return plan
