"""WIT curation before download: candidates -> filters -> match -> global dedupe -> balance -> Parquet.

The Ray Data graph (streaming; one task per input file reads it batch by batch):

    input files -> ReadCandidates -> FilterStage (actor pool) -> MatchStage (actor pool, automaton built
    once per actor) -> bucket by hash(url) -> groupby(bucket).map_groups(dedupe) -> materialize
    -> global per-query counts (groupby(query).sum) -> assign rarest query -> bucket by hash(query)
    -> groupby(bucket).map_groups(cap) -> write_parquet(output)  +  output/_stats.json

Global exactness with bounded memory: exact dedupe needs every copy of a URL in one place, and the exact
cap needs every pair of a query in one place. Rather than rely on block boundaries after a repartition
(Ray may split large blocks), rows get an explicit `bucket = crc32(key) % num_buckets` and
`groupby("bucket").map_groups` hands each bucket whole to one call; a call holds 1/num_buckets of the
(already filtered and matched, so small) data. Deduplication runs after filters and matching because they
are per-row and deterministic - the result is the same as deduplicating first, with far less shuffled.
The per-query counts are a global aggregation between the two shuffles, so the rarest-query assignment
sees counts over the whole input.

Every stage reports exact per-batch counts (in, out, dropped by reason) to a named `StatsActor`, and waits
for the acknowledgement, so `_stats.json` accounts for every record.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipelines import storage
from pipelines.stats import Funnel, get_or_create_stats_actor, write_stats
from pipelines.wit.balance import assign_query, cap_per_query, query_counts
from pipelines.wit.candidates import SCHEMA, TABLE_SUFFIXES, WAT_SUFFIXES, ColumnNames, ReadCandidates
from pipelines.wit.filters import FilterConfig, TextFilter, dedupe
from pipelines.wit.io import expand_inputs
from pipelines.wit.matching import QueryMatcher
from pipelines.wit.queries import load_queries

OUTPUT_SCHEMA = pa.schema(
    [*SCHEMA, pa.field("matched_queries", pa.list_(pa.string())), pa.field("query", pa.string())]
)


@dataclass
class CurationConfig:
    """Inputs, filters, matching and balancing of the curation job."""

    inputs: list[str] = field(default_factory=list)  # tables / WAT files, or folders of them
    queries: str = "queries"  # queries.parquet, or the folder the query job wrote
    output: str = "curated"  # folder: Parquet part files + _stats.json
    columns: ColumnNames = field(default_factory=ColumnNames)
    filters: FilterConfig = field(default_factory=FilterConfig)
    max_per_query: int = 20_000
    seed: int = 0
    batch_rows: int = 8192
    num_buckets: int = 16  # hash partitions for the global dedupe and the per-query cap
    filter_actors: int = 1
    matcher_actors: int = 1
    # Ray Data shuffle for the groupbys. The sort-based pull shuffle runs as plain tasks; the hash shuffle
    # starts aggregator actors first (~20 s on a 2-CPU machine) and pays off on large clusters.
    shuffle_strategy: str = "sort_shuffle_pull_based"
    stats_actor: str = "wit_curation_stats"


def _report(stats_actor: str | None, stage: str, n_in: int, n_out: int, dropped: dict[str, int]) -> None:
    if stats_actor:
        import ray

        ray.get(get_or_create_stats_actor(stats_actor).record.remote(stage, n_in, n_out, dropped))


class FilterStage:
    def __init__(self, config: FilterConfig, stats_actor: str | None = None):
        self.filter, self.stats_actor = TextFilter(config), stats_actor

    def __call__(self, batch: pa.Table) -> pa.Table:
        out, dropped = self.filter(batch)
        _report(self.stats_actor, "text_filter", batch.num_rows, out.num_rows, dropped)
        return out


class MatchStage:
    def __init__(self, queries_uri: str, stats_actor: str | None = None):
        self.matcher, self.stats_actor = QueryMatcher(load_queries(queries_uri)), stats_actor

    def __call__(self, batch: pa.Table) -> pa.Table:
        out, dropped = self.matcher(batch)
        _report(self.stats_actor, "match", batch.num_rows, out.num_rows, dropped)
        return out


def add_bucket(batch: pa.Table, column: str, num_buckets: int) -> pa.Table:
    """`bucket` = crc32(value) % num_buckets: a stable hash (Python's hash() differs per process)."""
    buckets = [zlib.crc32(v.encode("utf-8")) % num_buckets for v in batch.column(column).to_pylist()]
    return batch.append_column("bucket", pa.array(buckets, pa.int32()))


def dedupe_bucket(group: pa.Table, stats_actor: str | None = None) -> pa.Table:
    """Dedupe one URL bucket; the survivors' query counts go to the stats actor (the global counts)."""
    out, dropped = dedupe(group)
    _report(stats_actor, "dedupe", group.num_rows, out.num_rows, dropped)
    if stats_actor:
        import ray

        counts = dict(query_counts(out))
        ray.get(get_or_create_stats_actor(stats_actor).add_counts.remote("query_counts_before", counts))
    return out.drop_columns(["bucket"])


class AssignStage:
    def __init__(self, counts: Any, num_buckets: int):
        import ray

        self.counts = ray.get(counts) if isinstance(counts, ray.ObjectRef) else counts
        self.num_buckets = num_buckets

    def __call__(self, batch: pa.Table) -> pa.Table:
        return add_bucket(assign_query(batch, self.counts), "query", self.num_buckets)


def cap_bucket(group: pa.Table, max_per_query: int, seed: int, stats_actor: str | None = None) -> pa.Table:
    out, dropped = cap_per_query(group, max_per_query, seed)
    _report(stats_actor, "balance", group.num_rows, out.num_rows, dropped)
    if stats_actor:
        import ray

        kept = Counter(out.column("query").to_pylist())
        ray.get(get_or_create_stats_actor(stats_actor).add_counts.remote("query_counts_after", dict(kept)))
    return out.drop_columns(["bucket"])


@contextmanager
def shuffle_strategy(name: str) -> Iterator[None]:
    """Use Ray Data shuffle strategy `name` inside the block (restored after: tests share a process)."""
    from ray.data.context import DataContext, ShuffleStrategy

    ctx = DataContext.get_current()
    before = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy(name)
    try:
        yield
    finally:
        ctx.shuffle_strategy = before


def curate(cfg: CurationConfig) -> dict[str, Any]:
    """Run the curation graph; returns the stats dict also written to `output/_stats.json`."""
    with shuffle_strategy(cfg.shuffle_strategy):
        return _curate(cfg)


def _curate(cfg: CurationConfig) -> dict[str, Any]:
    import ray

    started = time.time()
    files = expand_inputs(cfg.inputs, TABLE_SUFFIXES + WAT_SUFFIXES)
    if not files:
        raise ValueError(f"no candidate input files under {cfg.inputs}")
    actor = get_or_create_stats_actor(cfg.stats_actor)
    ray.get(actor.reset.remote())
    name = cfg.stats_actor

    matched = (
        ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
        .map_batches(
            ReadCandidates,
            fn_constructor_kwargs={"columns": cfg.columns, "batch_rows": cfg.batch_rows, "stats_actor": name},
            batch_size=1,
            batch_format="numpy",
            concurrency=(1, len(files)),
        )
        .map_batches(
            FilterStage,
            fn_constructor_kwargs={"config": cfg.filters, "stats_actor": name},
            batch_size=cfg.batch_rows,
            batch_format="pyarrow",
            concurrency=cfg.filter_actors,
        )
        .map_batches(
            MatchStage,
            fn_constructor_kwargs={"queries_uri": cfg.queries, "stats_actor": name},
            batch_size=cfg.batch_rows,
            batch_format="pyarrow",
            concurrency=cfg.matcher_actors,
        )
        .map_batches(add_bucket, fn_args=("url", cfg.num_buckets), batch_format="pyarrow")
    )
    deduped = (
        matched.groupby("bucket", num_partitions=cfg.num_buckets)
        .map_groups(dedupe_bucket, fn_kwargs={"stats_actor": name}, batch_format="pyarrow")
        .materialize()
    )
    # Every deduplicated row was counted exactly once by dedupe_bucket: these are the global counts.
    counts = ray.get(actor.snapshot.remote())["counters"].get("query_counts_before", {})

    balanced = (
        deduped.map_batches(
            AssignStage,
            fn_constructor_kwargs={"counts": ray.put(counts), "num_buckets": cfg.num_buckets},
            batch_format="pyarrow",
            concurrency=1,
        )
        .groupby("bucket", num_partitions=cfg.num_buckets)
        .map_groups(
            cap_bucket,
            fn_kwargs={"max_per_query": cfg.max_per_query, "seed": cfg.seed, "stats_actor": name},
            batch_format="pyarrow",
        )
    )
    storage.makedirs(cfg.output)
    if deduped.count():
        balanced.write_parquet(cfg.output)
    else:  # nothing survived: still leave a readable (empty) table with the output schema
        import pyarrow.parquet as pq

        fs, path = storage.resolve(storage.join(cfg.output, "part-empty.parquet"))
        pq.write_table(OUTPUT_SCHEMA.empty_table(), path, filesystem=fs)

    funnel = Funnel.from_dict(ray.get(actor.snapshot.remote()))
    funnel.check()
    stats = funnel.to_dict()
    seconds = time.time() - started
    n_read = stats["stages"].get("read", {}).get("out", 0)
    n_kept = stats["stages"].get("balance", {}).get("out", 0)
    stats.update(
        seconds=round(seconds, 3),
        candidates_per_second=round(n_read / seconds, 1) if seconds else None,
        num_curated=n_kept,
        inputs=files,
        queries=cfg.queries,
        max_per_query=cfg.max_per_query,
        seed=cfg.seed,
    )
    write_stats(storage.join(cfg.output, "_stats.json"), stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    from pipelines.config import parse_args
    from pipelines.ray_connect import connect

    cfg = parse_args(CurationConfig, argv, description="Curate WIT candidates before download (Ray Data).")
    connect()
    stats = curate(cfg)
    print(f"{stats['num_curated']} curated pairs -> {cfg.output} ({stats['seconds']} s)")


if __name__ == "__main__":
    main()
