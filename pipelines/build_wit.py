"""The whole WIT build as one job: curation (queries, candidates, filters, matching, balancing) -> crawl ->
image checks -> dedupe -> shards + `_stats.json`.

Either `urls` names a plain url+caption table (curation skipped) or the curation config runs first. The
curated pairs are a checkpoint of their own: when `{curation.output}/_stats.json` exists they are reused,
so a rerun after a kill goes straight to the crawl, which resumes from its committed shards. Curated rows
are crawled in the order of a hash of (url, caption): deterministic whatever order curation wrote them
in, and it spreads each domain's URLs over the crawl instead of hitting one host in bursts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from pipelines import storage
from pipelines.crawl.build import STATS_FILE, CrawlConfig, build_crawl, read_url_table
from pipelines.stats import write_stats
from pipelines.wit.curate import CurationConfig, curate


@dataclass
class BuildWITConfig:
    """Sources -> curated url+caption pairs -> crawled image-text shards."""

    output: str = "wit_shards"  # shard folder: local path or s3://bucket/prefix
    formats: list[str] = field(default_factory=lambda: ["webdataset", "parquet"])
    # A url+caption table (Parquet/CSV/TSV/JSONL file or folder): when set, curation is skipped.
    urls: str = ""
    curation: CurationConfig = field(default_factory=CurationConfig)
    crawl: CrawlConfig = field(default_factory=CrawlConfig)


def crawl_order(batch: pa.Table) -> pa.Table:
    keys = [
        int.from_bytes(hashlib.blake2b(f"{u}\0{c}".encode(), digest_size=8).digest(), "big", signed=True)
        for u, c in zip(batch.column("url").to_pylist(), batch.column("caption").to_pylist())
    ]
    return batch.append_column("crawl_order", pa.array(keys, pa.int64()))


def curated_source(cfg: BuildWITConfig) -> tuple[ray.data.Dataset, dict[str, Any]]:
    stats_uri = storage.join(cfg.curation.output, "_stats.json")
    curation_stats = storage.read_json(stats_uri) if storage.exists(stats_uri) else curate(cfg.curation)
    ds = ray.data.read_parquet(cfg.curation.output, file_extensions=["parquet"])
    ds = ds.map_batches(crawl_order, batch_format="pyarrow").sort(["crawl_order", "url", "caption"])
    return ds.drop_columns(["crawl_order"]), curation_stats


def build_wit(cfg: BuildWITConfig) -> dict[str, Any]:
    """Runs (or resumes) the build; returns the stats written to `{output}/_stats.json`."""
    if cfg.urls:
        stats = build_crawl(read_url_table(cfg.urls), cfg.crawl, cfg.output, cfg.formats)
    else:
        source, curation_stats = curated_source(cfg)
        stats = build_crawl(source, cfg.crawl, cfg.output, cfg.formats)
        stats["curation"] = curation_stats
        write_stats(storage.join(cfg.output, STATS_FILE), stats)
    return stats
