"""The whole WIT build as one job: curation (queries, candidates, filters, matching, balancing) -> crawl
plan -> shard workers (crawl, image checks, shard writing) -> dedupe -> `_stats.json`, `_index.parquet`.

Either `urls` names a plain url+caption table (curation skipped, crawled in input order) or the curation
runs first (`curate_or_reuse` reuses a finished curation only when its fingerprint matches). Curated rows
are crawled in the order of a hash of (url, caption): deterministic whatever order curation wrote them in,
and it spreads each domain's URLs over the crawl instead of hitting one host in bursts. The plan is written once under the
output and reused by a rerun only when the curation's settings and files are the ones it was made from
(else the job names what differs; `redo=true` starts the output over).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from pipelines import shards, storage
from pipelines.config import config_to_dict
from pipelines.crawl import aggregate, key_stats
from pipelines.crawl.build import STATS_FILE, build_crawl
from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.plan import PLAN_DIR
from pipelines.crawl.shard import ROWS_DIR
from pipelines.fingerprint import input_listing
from pipelines.wit.curate import CurationConfig, curate_or_reuse


@dataclass
class BuildWITConfig:
    """Sources -> curated url+caption pairs -> crawled image-text shards."""

    output: str = "wit_shards"  # shard folder: local path or s3://bucket/prefix
    formats: list[str] = field(default_factory=lambda: ["webdataset", "parquet"])
    # A url+caption table (Parquet/CSV/TSV/JSONL file or folder): when set, curation is skipped.
    urls: str = ""
    curation: CurationConfig = field(default_factory=CurationConfig)
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    # Delete this build's plan, shards and stats under `output` and start over (after a settings change).
    redo: bool = False


def crawl_order(batch: pa.Table) -> pa.Table:
    keys = [
        int.from_bytes(hashlib.blake2b(f"{u}\0{c}".encode(), digest_size=8).digest(), "big", signed=True)
        for u, c in zip(batch.column("url").to_pylist(), batch.column("caption").to_pylist())
    ]
    return batch.append_column("crawl_order", pa.array(keys, pa.int64()))


class CuratedSource:
    """The curated pairs in crawl order, curating first; remembers the curation's stats."""

    def __init__(self, cfg: CurationConfig):
        self.cfg = cfg
        self.curation_stats: dict[str, Any] | None = None

    def __call__(self) -> ray.data.Dataset | None:
        self.curation_stats = curate_or_reuse(self.cfg)  # refuses a curation made from other settings
        if not self.files():  # an empty curation result: an empty dataset
            return None
        ds = ray.data.read_parquet(self.cfg.output, file_extensions=["parquet"])
        ds = ds.map_batches(crawl_order, batch_format="pyarrow").sort(["crawl_order", "url", "caption"])
        return ds.drop_columns(["crawl_order"])

    def files(self) -> list[dict[str, Any]]:
        if not storage.exists(self.cfg.output):
            return []
        return [r for r in input_listing([self.cfg.output]) if r["uri"].endswith(".parquet")]

    def settings(self) -> dict[str, Any]:
        """What the plan is made from: the curation's config and its Parquet files."""
        return {"curation": config_to_dict(self.cfg), "curated_files": self.files()}

    def stats(self) -> dict[str, Any]:
        if self.curation_stats is None:  # the plan was reused: curation did not run now
            uri = storage.join(self.cfg.output, STATS_FILE)
            self.curation_stats = storage.read_json(uri) if storage.exists(uri) else {}
        return {"curation": self.curation_stats}


def clear_output(out_uri: str) -> None:
    """Remove what a build writes under `out_uri` (plan, sidecars, shards, manifests, stats, index)."""
    for folder in (PLAN_DIR, ROWS_DIR):
        storage.delete(storage.join(out_uri, folder))
    for name in key_stats.TABLES:
        storage.delete(key_stats.folder(out_uri, name))
    suffixes = (".tar", ".parquet", shards.MANIFEST_SUFFIX, STATS_FILE)
    for uri in storage.list_files(out_uri):
        if uri.endswith(suffixes) or uri.endswith(aggregate.INDEX_FILE):
            storage.delete(uri)


def build_wit(cfg: BuildWITConfig) -> dict[str, Any]:
    """Runs (or resumes) the build; returns the stats written to `{output}/_stats.json`."""
    if cfg.redo:
        clear_output(cfg.output)
    if cfg.urls:
        return build_crawl(cfg.urls, cfg.crawl, cfg.output, cfg.formats)
    source = CuratedSource(cfg.curation)
    return build_crawl(
        source, cfg.crawl, cfg.output, cfg.formats, settings=source.settings, extra_stats=source.stats
    )
