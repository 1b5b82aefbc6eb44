"""The crawl build: plan -> shard workers -> retry pass -> dedupe + compaction -> `_stats.json`, `_index.parquet`.

The driver holds the plan (parts and row counts), the names of committed shards (by listing) and counts;
every row, image and hash stays in tasks and files:
1. plan (pipelines/crawl/plan.py): the input numbered in order and cut into shards (a Parquet input is
   its own plan; any other is written once);
2. shard workers (worker.py, dispatch.py): each crawls, checks and writes whole shards and returns a small
   record; a rerun crawls only the shards without a manifest;
3. retry pass (`crawl.retry_failed=true`): re-fetches only the URLs that failed for a transient reason,
   into their shards;
4. dedupe (dedupe.py): exact sha256 duplicates across the dataset, first copy in input order wins,
   affected shards rewritten;
5. stats (aggregate.py, key_stats.py): `_stats.json` (totals, drop reasons, top-K domains and queries),
   `_stats_domains/` and `_stats_queries/` (Parquet, from the sidecars) and, last, `_index.parquet`
   (shard -> samples, bytes).
The shards are the same bytes whatever the number of workers and the order in which shards finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from pipelines import shards, storage
from pipelines.crawl import aggregate, key_stats
from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.dedupe import dedupe_and_compact
from pipelines.crawl.dispatch import ShardPool, worker_count
from pipelines.crawl.hostplan import host_ordered
from pipelines.crawl.hosts import flush_budgets, hold_budget_actors
from pipelines.crawl.plan import Plan, direct_plan, parquet_inputs, parquet_schema, reusable_plan, write_plan
from pipelines.fingerprint import fingerprint, input_listing
from pipelines.progress import StageLog
from pipelines.stats import Funnel, write_stats

log = logging.getLogger(__name__)

STATS_FILE = "_stats.json"
Source = str | ray.data.Dataset | Callable[[], "ray.data.Dataset | None"]


class InputError(ValueError):
    """A missing or unusable input (reported in one line by the job)."""


# What a lost node (a spot interruption, a drained or crashed machine) raises out of a Ray Data run. Ray
# retries plain tasks itself, but not every Ray Data operator outlives the node its actors sat on.
NODE_LOSS = (
    ray.exceptions.ActorDiedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError, ray.exceptions.WorkerCrashedError,
)  # fmt: skip


def caused_by_node_loss(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, NODE_LOSS) or isinstance(getattr(seen, "cause", None), NODE_LOSS):
            return True
        # A task error whose cause could not be deserialized keeps only the text of the cause.
        if isinstance(seen, ray.exceptions.RayError) and "its node has died" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def rerun_on_node_loss(step: Callable[[], Any], what: str, attempts: int = 3) -> Any:
    """Run an idempotent Ray Data step again when a node died under it (plan, dedupe: both resumable)."""
    for attempt in range(1, attempts + 1):
        try:
            return step()
        except Exception as e:
            if attempt == attempts or not caused_by_node_loss(e):
                raise
            log.warning(
                "%s: a node was lost (%s); running it again (%d/%d)",
                what,
                type(e).__name__,
                attempt,
                attempts,
            )


def read_url_table(uri: str) -> ray.data.Dataset:
    """A url+caption table: Parquet, CSV, TSV or JSON lines (a file or a folder of them)."""
    if uri.endswith((".csv", ".csv.gz")):
        ds = ray.data.read_csv(uri)
    elif uri.endswith((".tsv", ".tsv.gz")):
        import pyarrow.csv as pacsv

        ds = ray.data.read_csv(uri, parse_options=pacsv.ParseOptions(delimiter="\t"))
    elif uri.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        ds = ray.data.read_json(uri, lines=True)
    else:
        ds = ray.data.read_parquet(uri)
    require_columns(uri, ds.schema().names)
    return ds


def require_columns(uri: str, names: Sequence[str]) -> None:
    missing = {"url", "caption"} - set(names)
    if missing:
        raise InputError(f"{uri}: the crawl input needs columns url and caption; missing {sorted(missing)}")


@dataclass
class RunCounts:
    """What this run did (the driver's only per-run state besides the plan)."""

    shards_written: int = 0
    samples_written: int = 0
    shards_retried: int = 0
    shards_compacted: int = 0


def ensure_plan(source: Source, cfg: CrawlConfig, out_uri: str, fp_settings: Callable[[], dict]) -> Plan:
    """The committed plan when it was made from these settings and inputs, else a new one."""
    fp = fingerprint(fp_settings())
    plan = reusable_plan(out_uri, fp)
    if plan is not None:
        return plan
    if isinstance(source, str):
        return plan_url_table(source, cfg, out_uri, fp)
    ds = source if isinstance(source, ray.data.Dataset) else source()
    return write_plan(crawl_order(ds, cfg), out_uri, cfg.samples_per_shard, fp)


def crawl_order(ds: ray.data.Dataset | None, cfg: CrawlConfig) -> ray.data.Dataset | None:
    """The rows in the crawl order by host (hostplan.py), or as they are when `host_plan.spread` is off."""
    if ds is None or not cfg.host_plan.spread:
        return ds
    workers = worker_count(cfg, 1 << 40)  # the pool's size: what sets the crawl's expected pace
    return host_ordered(ds, cfg.host_plan, cfg.fetch.per_host_rate, workers)


def plan_url_table(uri: str, cfg: CrawlConfig, out_uri: str, fp: Mapping[str, Any]) -> Plan:
    """A url+caption table's plan: its own Parquet files when they can be (plan.py), else rewritten."""
    if not storage.exists(uri):
        raise InputError(f"input not found: {uri}")
    files = parquet_inputs(uri)
    if files is not None:
        require_columns(uri, parquet_schema(files[0]).names)
        plan = None if cfg.host_plan.spread else direct_plan(files, out_uri, cfg.samples_per_shard, fp)
        if plan is not None:
            return plan
    return write_plan(crawl_order(read_url_table(uri), cfg), out_uri, cfg.samples_per_shard, fp)


def crawl_shards(
    plan: Plan, cfg: CrawlConfig, out_uri: str, formats: Sequence[str], counts: RunCounts
) -> None:
    """Crawl the shards without a manifest, then (if asked) retry the transient failures."""
    layout = plan.layout
    done = shards.committed_names(out_uri)
    pending = [g for g in range(layout.num_shards) if layout.shard_name(g) not in done]
    log.info("crawl: %d input rows, %d shards, %d to crawl", plan.num_input, layout.num_shards, len(pending))
    retry: list[int] = []
    if cfg.retry_failed and layout.num_shards:
        retry = [int(n) for n in aggregate.summarise(out_uri)[2]]  # committed earlier, failures to retry
    if not pending and not retry:
        return
    workers = worker_count(cfg, max(len(pending), len(retry)))
    cfg = cfg.with_host_budget(out_uri, workers)
    budgets = hold_budget_actors(cfg.fetch.host_rules()) if cfg.fetch.budget != "local" else []
    pool = ShardPool(cfg, (cfg, out_uri, list(formats), layout), workers)
    try:
        stage = StageLog("crawl")
        for record in pool.run("crawl_shard", pending, lambda g: (plan.pieces(g),)):
            counts.shards_written += 1
            counts.samples_written += record["count"]
            if cfg.retry_failed and record["transient"]:
                retry.append(int(record["shard"]))
            stage.beat(
                f"{counts.shards_written:,} of {len(pending):,} shards, {counts.samples_written:,} samples"
            )
        stage.done(f"{counts.shards_written:,} shards written, {counts.samples_written:,} samples")
        if retry:
            stage = StageLog("retry pass")
            for _ in pool.run("retry_shard", sorted(set(retry)), lambda g: (plan.pieces(g),)):
                counts.shards_retried += 1
            stage.done(f"{counts.shards_retried:,} shards retried")
    finally:
        pool.close()
        flush_budgets(budgets)
        del budgets  # the crawl is over: the actors may go


def build_crawl(
    source: Source,
    cfg: CrawlConfig,
    out_uri: str,
    formats: Sequence[str] = ("webdataset", "parquet"),
    settings: Callable[[], Mapping[str, Any]] | None = None,
    extra_stats: Callable[[], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Crawls `source` (a url+caption table path, a Dataset, or a function giving one) into shards under
    `out_uri`; returns the stats written to `{out_uri}/_stats.json`. A rerun resumes.

    `settings` gives what else shaped the input (e.g. the curation's config and files) for the plan's
    fingerprint; `extra_stats` gives sections added to `_stats.json` (e.g. the curation's)."""
    started = time.time()
    storage.makedirs(out_uri)

    def fp_settings() -> dict:
        base = {"crawl": cfg.content_settings(), "formats": sorted(formats)}
        if isinstance(source, str):
            base["source"] = input_listing([source])
        return {**base, **(settings() if settings else {})}

    stage = StageLog("plan")
    plan = rerun_on_node_loss(lambda: ensure_plan(source, cfg, out_uri, fp_settings), "plan")
    stage.done(f"{plan.num_input:,} rows in {plan.layout.num_shards:,} shards")
    counts = RunCounts()
    crawl_shards(plan, cfg, out_uri, formats, counts)
    if cfg.dedupe:
        stage = StageLog("dedupe")
        counts.shards_compacted = rerun_on_node_loss(
            lambda: dedupe_and_compact(out_uri, plan.layout, formats), "dedupe"
        )
        stage.done(f"{counts.shards_compacted:,} shards compacted")
    stats = finish(out_uri, plan, cfg, counts, time.time() - started, extra_stats() if extra_stats else {})
    return stats


def finish(
    out_uri: str, plan: Plan, cfg: CrawlConfig, counts: RunCounts, elapsed: float, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """`_stats.json` from the manifests (aggregated by tasks) and the per-key tables from the sidecars,
    then `_index.parquet`, the last write."""
    funnel, index, _ = aggregate.summarise(out_uri)
    Funnel.from_dict(funnel).check()
    data: dict[str, Any] = dict(funnel)
    data["totals"] = aggregate.totals(funnel, index)
    if data["totals"]["input"] != plan.num_input:
        raise RuntimeError(
            f"the shards count {data['totals']['input']} input rows but the plan has {plan.num_input}"
        )
    data["run"] = {
        "crawler": cfg.crawler,
        "elapsed_s": round(elapsed, 3),
        "shards_written": counts.shards_written,
        "shards_skipped": plan.layout.num_shards - counts.shards_written,
        "shards_retried": counts.shards_retried,
        "shards_compacted": counts.shards_compacted,
        "samples_written": counts.samples_written,
        "samples_per_s": round(counts.samples_written / elapsed, 2) if elapsed > 0 else 0.0,
    }
    data.update(key_stats.write_key_stats(out_uri, plan.num_input))
    data.update(extra)
    write_stats(storage.join(out_uri, STATS_FILE), data)
    aggregate.write_index(out_uri, index)
    return data
