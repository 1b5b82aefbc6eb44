"""`CrawlConfig`: what the crawl does (fetch, image checks, dedupe, shard size) and how it is run (pool of
shard workers, shards in flight per worker, retry pass)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipelines.crawl.fetch import FetchConfig
from pipelines.crawl.hostplan import HostPlanConfig
from pipelines.crawl.images import ImageConfig
from pipelines.pools import Pool


@dataclass
class Img2DatasetConfig:
    # The venv holding img2dataset (scripts/setup_img2dataset.sh); relative to the working dir.
    venv: str = ".venv-img2dataset"
    processes_count: int = 1
    thread_count: int = 32
    timeout_s: int = 10
    retries: int = 0


@dataclass
class CrawlConfig:
    crawler: str = "ray"  # "ray" (our fetcher) or "img2dataset" (its downloader, run per shard)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    img2dataset: Img2DatasetConfig = field(default_factory=Img2DatasetConfig)
    # The crawl order by host: spread, slow lane or cap (pipelines/crawl/hostplan.py).
    host_plan: HostPlanConfig = field(default_factory=HostPlanConfig)
    samples_per_shard: int = 1000  # input rows per shard; a shard holds those that survive
    dedupe: bool = True  # drop exact duplicates (sha256 of the downloaded bytes) across the dataset
    batch_size: int = 256  # URLs per crawl call inside a shard (calls of one shard run concurrently)
    # Shard workers (async actors): each crawls `shards_per_worker` shards at once, so one slow URL holds
    # one shard's slot, never the worker. `num_workers > 0` is shorthand for a fixed pool of that size.
    pool: Pool = field(default_factory=Pool)
    num_workers: int = 0
    shards_per_worker: int = 4
    num_cpus_per_worker: float = 1.0
    # Custom resources each crawl worker asks for, e.g. {"crawl": 1} to run on the autoscaler's
    # crawl node type. Empty by default (a local Ray has no such resource).
    worker_resources: dict[str, float] = field(default_factory=dict)
    decode_threads: int = 2  # image-check threads per crawl worker
    max_shard_attempts: int = 4  # a shard whose worker fails (or dies) is given to another this often
    # Re-fetch the URLs that failed for a transient reason (timeouts, 5xx, 429, deferred hosts) into
    # their shards, then update dedupe and counts: the result equals a build without those failures.
    retry_failed: bool = False
    # Captions longer than this many characters are dropped (`caption_too_long`) or, with
    # `long_captions: truncate`, cut to it and counted (pipelines/crawl/captions.py).
    max_caption_chars: int = 1000
    long_captions: str = "drop"
    # 0: shard files flat beside the manifests (img2dataset's layout, brace lists work); n > 0: under a
    # folder of n hex digits of the shard name's hash (16**n S3 prefixes); `_index.parquet` locates them.
    shard_prefix_chars: int = 0

    def __post_init__(self) -> None:
        if self.crawler not in ("ray", "img2dataset"):
            raise ValueError(f"crawl.crawler must be 'ray' or 'img2dataset', got {self.crawler!r}")
        if self.samples_per_shard < 1:
            raise ValueError(f"crawl.samples_per_shard must be >= 1, got {self.samples_per_shard}")
        for key in ("batch_size", "shards_per_worker", "max_shard_attempts", "decode_threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"crawl.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_caption_chars < 1:
            raise ValueError(f"crawl.max_caption_chars must be >= 1, got {self.max_caption_chars}")
        if not 0 <= self.shard_prefix_chars <= 8:
            raise ValueError(f"crawl.shard_prefix_chars must be 0..8, got {self.shard_prefix_chars}")
        if self.long_captions not in ("drop", "truncate"):
            raise ValueError(f"crawl.long_captions must be 'drop' or 'truncate', got {self.long_captions!r}")
        if self.num_workers < 0:
            raise ValueError("crawl.num_workers must be >= 0 (0: use crawl.pool)")
        if self.num_workers:
            self.pool = Pool(self.num_workers, self.num_workers)

    def worker_resources_request(self) -> dict[str, float]:
        """What one shard worker asks of the cluster (for the pool bounds)."""
        return {"CPU": self.num_cpus_per_worker, **self.worker_resources}

    def content_settings(self) -> dict[str, Any]:
        """The settings that shape the shards' content (the plan's fingerprint): not pool sizes; the
        per-host rate only where it shapes the crawl order."""
        settings = {
            "crawler": self.crawler,
            "samples_per_shard": self.samples_per_shard,
            "dedupe": self.dedupe,
            "captions": [self.max_caption_chars, self.long_captions],
            "image": asdict(self.image),
        }
        if self.host_plan.spread:
            settings["host_plan"] = {**asdict(self.host_plan), "per_host_rate": self.fetch.per_host_rate}
        return settings

    def with_host_budget(self, out_uri: str, workers: int) -> CrawlConfig:
        """This config with the host budget sized for `workers` shard workers (when not set), its robots.txt
        store under the output, and its actors on the crawl nodes (the workers' custom resources)."""
        from pipelines.crawl.hosts import budget_shards_for
        from pipelines.storage import join

        fetch = replace(
            self.fetch,
            budget_shards=self.fetch.budget_shards or budget_shards_for(workers),
            host_store=self.fetch.host_store or join(out_uri, "_hosts"),
            budget_resources=self.fetch.budget_resources or dict(self.worker_resources),
        )
        return replace(self, fetch=fetch)
