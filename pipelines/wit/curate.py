"""WIT curation before download: candidates -> filters -> match -> global dedupe -> balance -> Parquet.

The Ray Data graph (streaming; one read task per input file, reading it batch by batch):

    files -> ReadCandidates -> FilterStage (actor pool) -> MatchStage (actor pool, automaton built once per
    actor) -> materialize -> bucket = crc32(url) % B -> groupby(bucket).map_groups(dedupe) -> materialize
    -> funnel of read/filter/match/dedupe (groupby-sum of the tally rows)
    -> per-query counts (groupby(query).sum) -> AssignStage (rarest query + per-batch pre-cap, actor pool)
    -> bucket = crc32(query) % B' -> groupby(bucket).map_groups(cap) -> materialize -> write_parquet
    + output/_stats.json, then output/_fingerprint.json (the "finished" mark that `curate_or_reuse` checks)

Counts are data, never side effects: every stage appends tally rows to its output (pipelines/wit/tally.py)
and the funnel is an aggregation of them; the per-query counts are aggregations of the data rows. A task
Ray retries (a lost node; the tests inject faults) replaces its output, tallies included, so the funnel,
the per-query counts and the balancing that uses them do not change.

Global exactness with bounded memory: exact dedupe needs every copy of a URL in one place, and the exact
cap every pair of a query. Rows get an explicit `bucket = crc32(key) % B` and `groupby("bucket")` hands
each bucket whole to one call. B is derived from the number of rows going into the shuffle (known once
the stream is materialized there, which costs nothing: a shuffle waits for all its input anyway) and
`rows_per_bucket`, so a call holds about that many rows whatever the input size. Before the cap shuffle
each batch keeps only its `max_per_query` smallest keys per query (the global smallest are among them).
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.faults import maybe_fail
from pipelines.fingerprint import FINGERPRINT_FILE, check_reusable, fingerprint, write_fingerprint
from pipelines.pools import Pool
from pipelines.stats import Funnel, write_stats
from pipelines.wit.balance import assign_query, cap_per_query
from pipelines.wit.candidates import SCHEMA, TABLE_SUFFIXES, WAT_SUFFIXES, ColumnNames, ReadCandidates
from pipelines.wit.filters import FilterConfig, TextFilter, dedupe
from pipelines.wit.io import expand_inputs
from pipelines.wit.matching import QueryMatcher
from pipelines.wit.queries import load_queries
from pipelines.wit.raydata import concurrency, execution, files_dataset
from pipelines.wit.tally import data_rows, emit, funnel_of, split

OUTPUT_SCHEMA = pa.schema(
    [*SCHEMA, pa.field("matched_queries", pa.list_(pa.string())), pa.field("query", pa.string())]
)
# What shapes the curated output (the fingerprint); pool sizes, buckets and batch sizes do not.
FINGERPRINT_KEYS = ("inputs", "queries", "columns", "filters", "max_per_query", "seed")
STATS_FILE = "_stats.json"


@dataclass
class CurationConfig:
    """Inputs, filters, matching and balancing of the curation job."""

    inputs: list[str] = field(default_factory=list)  # tables / WAT files, or folders of them
    queries: str = "queries"  # queries.parquet, or the folder the query job wrote
    output: str = "curated"  # folder: Parquet part files + _stats.json + _fingerprint.json
    columns: ColumnNames = field(default_factory=ColumnNames)
    filters: FilterConfig = field(default_factory=FilterConfig)
    max_per_query: int = 20_000
    seed: int = 0
    batch_rows: int = 8192
    rows_per_bucket: int = 1_000_000  # target rows per map_groups call of the dedupe and the cap
    num_buckets: int = 0  # 0: derived from rows_per_bucket and the input; > 0: fixed
    read_pool: Pool = field(default_factory=Pool)  # pools: (min, max) actors, max 0 = grows with the cluster
    filter_pool: Pool = field(default_factory=Pool)
    match_pool: Pool = field(default_factory=Pool)
    assign_pool: Pool = field(default_factory=Pool)
    # Ray Data shuffle for the groupbys. The sort-based pull shuffle runs as plain tasks; the hash shuffle
    # starts aggregator actors first (~20 s on a 2-CPU machine) and pays off on large clusters.
    shuffle_strategy: str = "sort_shuffle_pull_based"
    redo: bool = False  # curate again even when `output` holds a curation made from other settings

    def __post_init__(self) -> None:
        for name in ("max_per_query", "batch_rows", "rows_per_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_buckets < 0:
            raise ValueError("num_buckets must be >= 0 (0 = derived from rows_per_bucket)")


# ---------------------------------------------------------------- stages (plain callables over Arrow)


def batch_key(rows: pa.Table) -> str:
    """A stable name for a batch (same rows -> same key, on any worker): its size and a crc of its URLs."""
    crc = 0
    for url in rows.column("url").to_pylist():
        crc = zlib.crc32(url.encode("utf-8"), crc)
    return f"{rows.num_rows}-{crc:08x}"


class FilterStage:
    def __init__(self, config: FilterConfig):
        self.filter = TextFilter(config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, passed = split(batch)
        out, dropped = self.filter(rows) if rows.num_rows else (rows, {})
        # Tests: fail after the work, as a lost worker would (a counter bumped by then would count twice).
        maybe_fail("curate_filter", batch_key(rows))
        return emit(out, passed, "text_filter", rows.num_rows, dropped)


class MatchStage:
    def __init__(self, queries_uri: str):
        self.matcher = QueryMatcher(load_queries(queries_uri))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, passed = split(batch)
        out, dropped = self.matcher(rows)
        maybe_fail("curate_match", batch_key(rows))
        return emit(out, passed, "match", rows.num_rows, dropped)


def add_bucket(batch: pa.Table, column: str, num_buckets: int) -> pa.Table:
    """`bucket` = crc32(value) % num_buckets: a stable hash (Python's hash() differs per process).

    Tally rows (null `column`) go to bucket 0, whose call passes them through."""
    values = batch.column(column).to_pylist()
    buckets = [zlib.crc32(v.encode("utf-8")) % num_buckets if v is not None else 0 for v in values]
    return batch.append_column("bucket", pa.array(buckets, pa.int32()))


def dedupe_bucket(group: pa.Table) -> pa.Table:
    """Dedupe one URL bucket: its survivors, the earlier stages' tally rows it holds, its own tally rows."""
    rows, passed = split(group.drop_columns(["bucket"]))
    out, dropped = dedupe(rows)
    return emit(out, passed, "dedupe", rows.num_rows, dropped)


def count_queries(batch: pa.Table, column: str) -> pa.Table:
    """(query, n) partial counts of one batch; `column` holds a list of queries or one query per row."""
    values = batch.column(column).to_pylist()
    counts: Counter = Counter()
    if column == "matched_queries":
        for queries in values:
            counts.update(queries)
    else:
        counts.update(values)
    return pa.table({"query": list(counts), "n": pa.array(list(counts.values()), pa.int64())})


class AssignStage:
    """Each row's rarest matched query (exact global counts), then a per-batch pre-cap, then its bucket."""

    def __init__(self, count_refs: list[Any], num_buckets: int, max_per_query: int, seed: int):
        import ray

        self.counts: dict[str, int] = {}
        for table in ray.get(list(count_refs)):
            self.counts.update(zip(table.column("query").to_pylist(), table.column("n").to_pylist()))
        self.num_buckets, self.max_per_query, self.seed = num_buckets, max_per_query, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        # The global `max_per_query` smallest keys of a query are among each batch's smallest: dropping the
        # rest here changes nothing but what the shuffle has to move.
        capped, _ = cap_per_query(assign_query(batch, self.counts), self.max_per_query, self.seed)
        return add_bucket(capped, "query", self.num_buckets)


def cap_bucket(group: pa.Table, max_per_query: int, seed: int) -> pa.Table:
    out, _ = cap_per_query(group.drop_columns(["bucket"]), max_per_query, seed)
    return out


# ---------------------------------------------------------------- the graph


def buckets_for(cfg: CurationConfig, num_rows: int) -> int:
    """Hash buckets for a shuffle of `num_rows` rows: `num_buckets` when fixed, else rows / rows_per_bucket."""
    return cfg.num_buckets or max(1, math.ceil(num_rows / cfg.rows_per_bucket))


def _query_counts(rows: Any, column: str, num_buckets: int) -> Any:
    """Materialized Dataset of (query, n): the exact global count of each query in `column`."""
    return (
        rows.map_batches(count_queries, fn_kwargs={"column": column}, batch_format="pyarrow")
        .groupby("query", num_partitions=num_buckets)
        .sum("n")
        .rename_columns({"sum(n)": "n"})
        .materialize()
    )


def _as_dict(counts: Any) -> dict[str, int]:
    df = counts.to_pandas()
    return {str(q): int(n) for q, n in sorted(zip(df["query"], df["n"]))} if len(df) else {}


def _matched(cfg: CurationConfig, files: list[str]) -> Any:
    """read -> filter -> match, materialized: data rows and the three stages' tally rows."""
    return (
        files_dataset(files)
        .map_batches(
            ReadCandidates,
            fn_constructor_kwargs={"columns": cfg.columns, "batch_rows": cfg.batch_rows},
            batch_size=1,
            batch_format="numpy",
            concurrency=concurrency(cfg.read_pool, cap=len(files)),
        )
        .map_batches(
            FilterStage,
            fn_constructor_kwargs={"config": cfg.filters},
            batch_size=cfg.batch_rows,
            batch_format="pyarrow",
            concurrency=concurrency(cfg.filter_pool),
        )
        .map_batches(
            MatchStage,
            fn_constructor_kwargs={"queries_uri": cfg.queries},
            batch_size=cfg.batch_rows,
            batch_format="pyarrow",
            concurrency=concurrency(cfg.match_pool),
        )
        .materialize()
    )


def _deduped(cfg: CurationConfig, matched: Any) -> Any:
    """Deduplicated rows plus every tally row so far (read, filter, match, dedupe), materialized."""
    buckets = buckets_for(cfg, matched.count())  # rows, tally rows included: the shuffle's size
    return (
        matched.map_batches(add_bucket, fn_args=("url", buckets), batch_format="pyarrow")
        .groupby("bucket", num_partitions=buckets)
        .map_groups(dedupe_bucket, batch_format="pyarrow")
        .materialize()
    )


def _balanced(cfg: CurationConfig, rows: Any, counts: Any, num_rows: int) -> Any:
    buckets = buckets_for(cfg, num_rows)
    return (
        rows.map_batches(
            AssignStage,
            fn_constructor_kwargs={
                "count_refs": counts.to_arrow_refs(),
                "num_buckets": buckets,
                "max_per_query": cfg.max_per_query,
                "seed": cfg.seed,
            },
            batch_size=cfg.batch_rows,
            batch_format="pyarrow",
            concurrency=concurrency(cfg.assign_pool),
        )
        .groupby("bucket", num_partitions=buckets)
        .map_groups(cap_bucket, fn_args=(cfg.max_per_query, cfg.seed), batch_format="pyarrow")
        .materialize()
    )


def _write_output(cfg: CurationConfig, balanced: Any | None) -> None:
    if balanced is not None and balanced.count():
        balanced.write_parquet(cfg.output)
    else:  # nothing survived: still leave a readable (empty) table with the output schema
        fs, path = storage.resolve(storage.join(cfg.output, "part-empty.parquet"))
        pq.write_table(OUTPUT_SCHEMA.empty_table(), path, filesystem=fs)


def clear_output(uri: str) -> None:
    """Remove what a previous (finished or interrupted) curation left in `uri`: parts, stats, fingerprint."""
    for name in storage.list_files(uri):
        base = name.rsplit("/", 1)[-1]
        if base.endswith(".parquet") or base in (STATS_FILE, FINGERPRINT_FILE):
            storage.delete(name)


def curate(cfg: CurationConfig) -> dict[str, Any]:
    """Run the curation graph; returns the stats dict also written to `output/_stats.json`."""
    with execution(cfg.shuffle_strategy):
        return _curate(cfg)


def _curate(cfg: CurationConfig) -> dict[str, Any]:
    started = time.time()
    files = expand_inputs(cfg.inputs, TABLE_SUFFIXES + WAT_SUFFIXES)
    storage.makedirs(cfg.output)
    clear_output(cfg.output)
    funnel, before, after, balanced, n_rows = Funnel(), {}, {}, None, 0
    if files:
        deduped = _deduped(cfg, _matched(cfg, files))
        funnel = funnel_of(deduped)
        n_rows = funnel.stages["dedupe"]["out"]
    if n_rows:
        rows = deduped.map_batches(data_rows, batch_format="pyarrow")  # a cheap filter, run twice
        counts = _query_counts(rows, "matched_queries", buckets_for(cfg, n_rows))
        balanced = _balanced(cfg, rows, counts, n_rows)
        after_counts = _query_counts(balanced, "query", buckets_for(cfg, n_rows))
        before, after = _as_dict(counts), _as_dict(after_counts)
    _write_output(cfg, balanced)
    for stage in ("read", "text_filter", "match", "dedupe"):
        funnel.record(stage, 0, 0)  # a stage that saw nothing still appears in the funnel
    n_in = funnel.stages.get("dedupe", {}).get("out", 0)
    n_out = sum(after.values())
    funnel.record("balance", n_in, n_out, {"over_query_cap": n_in - n_out})
    funnel.add_counts("query_counts_before", before)
    funnel.add_counts("query_counts_after", after)
    funnel.check()
    return _finish_stats(cfg, funnel, files, started)


def _finish_stats(cfg: CurationConfig, funnel: Funnel, files: list[str], started: float) -> dict[str, Any]:
    stats = funnel.to_dict()
    seconds = time.time() - started
    n_read = stats["stages"].get("read", {}).get("out", 0)
    stats.update(
        seconds=round(seconds, 3),
        candidates_per_second=round(n_read / seconds, 1) if seconds else None,
        num_curated=stats["stages"]["balance"]["out"],
        inputs=files,
        queries=cfg.queries,
        max_per_query=cfg.max_per_query,
        seed=cfg.seed,
    )
    write_stats(storage.join(cfg.output, STATS_FILE), stats)
    return stats


# ---------------------------------------------------------------- reuse


def curation_fingerprint(cfg: CurationConfig) -> dict[str, Any]:
    """What the curated output depends on: the settings in FINGERPRINT_KEYS and the input files."""
    settings = {k: getattr(cfg, k) for k in FINGERPRINT_KEYS}
    settings = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in settings.items()}
    return fingerprint(settings, [*cfg.inputs, cfg.queries])


def curate_or_reuse(cfg: CurationConfig) -> dict[str, Any]:
    """The stats of a finished curation in `cfg.output` made from the same settings and inputs, else curate.

    A finished curation made from other settings or inputs raises `StaleOutput` naming the differences,
    unless `cfg.redo`. The fingerprint is written last: an interrupted curation is never reused."""
    current = curation_fingerprint(cfg)
    stats_uri = storage.join(cfg.output, STATS_FILE)
    reusable = not cfg.redo and check_reusable(cfg.output, current, "curation", "curation.redo")
    if reusable and storage.exists(stats_uri):
        return storage.read_json(stats_uri)
    stats = curate(cfg)
    write_fingerprint(cfg.output, current)
    return stats


def main(argv: list[str] | None = None) -> None:
    from pipelines.config import parse_args
    from pipelines.ray_connect import connect

    cfg = parse_args(CurationConfig, argv, description="Curate WIT candidates before download (Ray Data).")
    connect()
    stats = curate_or_reuse(cfg)
    print(f"{stats['num_curated']} curated pairs -> {cfg.output} ({stats['seconds']} s)")


if __name__ == "__main__":
    main()
