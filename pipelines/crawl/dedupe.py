"""Exact content dedupe across the dataset, then compaction: published shards hold no duplicate.

Over the per-shard sidecars (`_rows/*.parquet`, no images), the rows that passed the image checks are
grouped by sha256; in each group the first copy in input order (smallest ordinal) wins and the others are
duplicates. The duplicates are then grouped by shard and each affected shard is compacted: its files
rewritten without them (atomically), its funnel recomputed, its manifest rewritten last. No set of hashes
lives in the driver. Up to `ROWS_PER_PARTITION` input rows (one shuffle partition's worth) one task finds
the duplicates and one task per affected shard compacts it; above that, a Ray Data job hash-shuffles the
sidecar rows (bounded memory per task). Ray Data's fixed cost (an executor, shuffle actors: ~15 s on two
cores) would otherwise dominate every build of less than a few million rows.

Idempotent and resumable: the result depends only on the sidecars, and a shard's manifest records how many
duplicates its files already leave out. Duplicates only ever grow (a retry pass adds images, never removes
one), and the files only ever leave out true duplicates, so an equal count means the shard is up to date
and is not rewritten. A build killed during compaction redoes the remaining shards on rerun.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from pipelines import shards, storage
from pipelines.crawl import shard as shard_files
from pipelines.crawl.plan import Layout

ROWS_PER_PARTITION = 2_000_000  # sidecar rows per shuffle partition (about 100 MB of hashes)


def passed_rows(batch: pa.Table) -> pa.Table:
    """Rows that passed every check: (ordinal, sha256)."""
    return batch.filter(pc.is_null(batch.column("status"))).select(["ordinal", "sha256"])


def all_later_copies(rows: pa.Table, samples_per_shard: int) -> pa.Table:
    """(shard, ordinal) of every row of `rows` (ordinal, sha256) but the first in input order of its sha256
    (all groups at once, vectorised; also the per-group step of the shuffled dedupe)."""
    rows = rows.sort_by([("sha256", "ascending"), ("ordinal", "ascending")])
    ordinals = pa.array([], pa.int64())
    if rows.num_rows > 1:
        sha = rows.column("sha256")
        later = pc.equal(sha.slice(1), sha.slice(0, rows.num_rows - 1))  # the same hash as the row before
        ordinals = rows.column("ordinal").slice(1).filter(later).combine_chunks()
    shards = pc.divide(ordinals, pa.scalar(samples_per_shard, pa.int64()))  # integer division for ints
    return pa.table({"shard": shards, "ordinal": ordinals})


def compact_shard(group: pa.Table, out_uri: str, layout: Layout, formats: Sequence[str]) -> pa.Table:
    """Rewrite one shard without its duplicates, unless its files already leave exactly those out."""
    shard = group.column("shard")[0].as_py()
    name = layout.shard_name(shard)
    duplicates = set(group.column("ordinal").to_pylist())
    manifest = storage.read_json(storage.join(out_uri, name + shards.MANIFEST_SUFFIX))
    if manifest["stats"].get("excluded", 0) == len(duplicates):
        return pa.table({"shard": [shard], "rewritten": [0]})
    rows = shard_files.read_rows(out_uri, name)
    ext = ".tar" if "webdataset" in formats else ".parquet"
    path = next(p for p in manifest["files"] if p.endswith(ext))  # relative: `{subdir}/{name}{ext}`
    samples = [s for s in shards.read_shard_samples(storage.join(out_uri, path))
               if s["json"]["ordinal"] not in duplicates]  # fmt: skip
    shard_files.commit(out_uri, name, samples, rows, duplicates, formats, path.rpartition("/")[0])
    return pa.table({"shard": [shard], "rewritten": [1]})


@ray.remote(max_retries=3)
def _find_duplicates(out_uri: str, samples_per_shard: int) -> dict[int, pa.Table]:
    """shard -> its duplicates (shard, ordinal), for the shards that have any (one task, small builds)."""
    fs, _ = storage.resolve(out_uri)
    files = [storage.resolve(uri)[1] for uri in shard_files.sidecar_uris(out_uri)]
    sidecars = pads.dataset(files, filesystem=fs, format="parquet")
    duplicates = all_later_copies(passed_rows(sidecars.to_table(columns=["ordinal", "status", "sha256"])),
                                  samples_per_shard)  # fmt: skip
    shards = duplicates.column("shard")
    return {s: duplicates.filter(pc.equal(shards, s)) for s in pc.unique(shards).to_pylist()}


@ray.remote(max_retries=3)
def _compact(group: pa.Table, out_uri: str, layout: Layout, formats: Sequence[str]) -> int:
    return compact_shard(group, out_uri, layout, formats).column("rewritten")[0].as_py()


def dedupe_and_compact(
    out_uri: str, layout: Layout, formats: Sequence[str], rows_per_partition: int = ROWS_PER_PARTITION
) -> int:
    """Find the duplicates across all committed shards and compact the affected ones. Returns how many
    shards were rewritten."""
    rows_dir = storage.join(out_uri, shard_files.ROWS_DIR)
    if layout.num_input == 0 or not storage.exists(rows_dir):
        return 0
    partitions = max(1, min(1024, math.ceil(layout.num_input / rows_per_partition)))
    if partitions == 1:
        groups = ray.get(_find_duplicates.remote(out_uri, layout.samples_per_shard))
        return sum(ray.get([_compact.remote(g, out_uri, layout, list(formats)) for g in groups.values()]))
    fs, _ = storage.resolve(rows_dir)
    paths = [storage.resolve(uri)[1] for uri in shard_files.sidecar_uris(out_uri)]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["ordinal", "status", "sha256"])
    duplicates = (
        ds.map_batches(passed_rows, batch_format="pyarrow", batch_size=None)
        .groupby("sha256", num_partitions=partitions)
        .map_groups(
            all_later_copies,
            batch_format="pyarrow",
            fn_kwargs={"samples_per_shard": layout.samples_per_shard},
        )
    )
    compacted = duplicates.groupby("shard", num_partitions=partitions).map_groups(
        compact_shard,
        batch_format="pyarrow",
        fn_kwargs={"out_uri": out_uri, "layout": layout, "formats": list(formats)},
    )
    total = compacted.sum("rewritten")
    return int(total or 0)
