"""The crawl graph: url+caption rows -> crawl (fetch + image checks) -> dedupe -> shards + `_stats.json`.

Exact resume and determinism come from the input, never from timing:
- every input row gets an `ordinal` (its position in the input, in order); shard `g` holds the rows
  with `ordinal // samples_per_shard == g` that survive (img2dataset's convention: a shard is a slice
  of the input, so it holds at most `samples_per_shard` samples); the key is `{g}{ordinal % S}`.
- rows of committed shards (a manifest exists) are not crawled again.
- content de-duplication keeps the first copy in input order: shard `g` drops an image whose sha256
  was kept by any shard `< g`. The driver decides shard by shard in order (Ray Data's
  `preserve_order`), with the hashes of committed shards read back from their manifests, so a rerun
  after a kill keeps exactly what an uninterrupted run keeps.
- each manifest carries its shard's funnel (input, fetch, image, dedupe: in/out/dropped by reason,
  per query, per domain, bytes), and `_stats.json` is their sum plus this run's throughput, so every
  input record is accounted for even across restarts.

Shards are written by a small thread pool in the driver while the crawl keeps streaming.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import ray

from pipelines import shards, storage
from pipelines.crawl.crawl import CrawlStage, drop_stage
from pipelines.crawl.fetch import FetchConfig
from pipelines.crawl.images import ImageConfig
from pipelines.stats import Funnel, write_stats

log = logging.getLogger(__name__)

STATS_FILE = "_stats.json"
INTERNAL_COLUMNS = ("ordinal", "group")
CRAWL_COLUMNS = (
    "status", "jpg", "sha256", "width", "height", "original_width", "original_height",
    "original_format", "http_status", "download_bytes", "attempts",
)  # fmt: skip


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
    crawler: str = "ray"  # "ray" (our fetcher) or "img2dataset" (its downloader, run per batch)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    img2dataset: Img2DatasetConfig = field(default_factory=Img2DatasetConfig)
    samples_per_shard: int = 1000  # input rows per shard; a shard holds those that survive
    dedupe: bool = True  # drop exact duplicates (sha256 of the downloaded bytes) across the dataset
    batch_size: int = 256  # URLs per crawl batch
    num_workers: int = 2  # crawl actors
    num_cpus_per_worker: float = 1.0
    # Custom resources each crawl worker asks for, e.g. {"crawl": 1} to run on the autoscaler's
    # crawl node type. Empty by default (a local Ray has no such resource).
    worker_resources: dict[str, float] = field(default_factory=dict)
    decode_threads: int = 2  # image-check threads per crawl worker
    writer_threads: int = 4  # shard writes in flight in the driver

    def __post_init__(self) -> None:
        if self.crawler not in ("ray", "img2dataset"):
            raise ValueError(f"crawler must be 'ray' or 'img2dataset', got {self.crawler!r}")
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")


# ---------------------------------------------------------------- input


@ray.remote(num_cpus=0)
def _num_rows(table: pa.Table) -> int:
    return table.num_rows


@ray.remote(num_cpus=0)
def _shard_slice(
    table: pa.Table, start: int, length: int, first_ordinal: int, samples_per_shard: int
) -> pa.Table:
    """Rows [start, start + length) of an input block, numbered from `first_ordinal`: one shard's rows."""
    table = table.slice(start, length)
    table = table.drop_columns([c for c in INTERNAL_COLUMNS if c in table.column_names])
    ordinal = pa.array(range(first_ordinal, first_ordinal + table.num_rows), type=pa.int64())
    group = pa.array([first_ordinal // samples_per_shard] * table.num_rows, type=pa.int64())
    return table.append_column("ordinal", ordinal).append_column("group", group)


def read_url_table(uri: str) -> ray.data.Dataset:
    """A url+caption table: Parquet, CSV, TSV or JSON lines (a file or a folder of them)."""
    if uri.endswith((".csv", ".csv.gz")):
        return ray.data.read_csv(uri)
    if uri.endswith((".tsv", ".tsv.gz")):
        import pyarrow.csv as pacsv

        return ray.data.read_csv(uri, parse_options=pacsv.ParseOptions(delimiter="\t"))
    if uri.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        return ray.data.read_json(uri, lines=True)
    return ray.data.read_parquet(uri)


def shard_slices(
    ds: ray.data.Dataset, samples_per_shard: int, skip_groups: set[int]
) -> tuple[ray.data.Dataset | None, int]:
    """Numbers the rows in input order (needs `preserve_order`) and cuts them into one block per shard
    (so each shard's results stream out as soon as it is crawled), leaving out `skip_groups`.
    Returns the dataset (None if nothing is left) and the number of input rows."""
    refs = ds.to_arrow_refs()
    counts = ray.get([_num_rows.remote(r) for r in refs])
    slices, offset = [], 0
    for ref, n in zip(refs, counts):
        start = 0
        while start < n:
            ordinal = offset + start
            length = min(n - start, samples_per_shard - ordinal % samples_per_shard)
            if ordinal // samples_per_shard not in skip_groups:
                slices.append(_shard_slice.remote(ref, start, length, ordinal, samples_per_shard))
            start += length
        offset += n
    return (ray.data.from_arrow_refs(slices) if slices else None), offset


def _check_columns(ds: ray.data.Dataset) -> None:
    names = ds.schema().names
    missing = {"url", "caption"} - set(names)
    if missing:
        raise ValueError(
            f"the crawl input needs columns url and caption; missing {sorted(missing)} in {names}"
        )


# ---------------------------------------------------------------- naming


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

    def shard_name(self, group: int) -> str:
        return f"{group:0{self.shard_width}d}"

    def key(self, ordinal: int) -> str:
        group, index = divmod(ordinal, self.samples_per_shard)
        return f"{self.shard_name(group)}{index:0{len(str(self.samples_per_shard - 1))}d}"

    def group_size(self, group: int) -> int:
        return min(self.samples_per_shard, self.num_input - group * self.samples_per_shard)


# ---------------------------------------------------------------- shard assembly


def domain_of(url: Any) -> str:
    try:
        return urlsplit(str(url)).hostname or "invalid"
    except ValueError:
        return "invalid"


def group_funnel(rows: list[dict[str, Any]], duplicates: set[int]) -> Funnel:
    """The funnel of one shard's input rows (ordered), `duplicates` = ordinals dropped by dedupe."""
    funnel = Funnel()
    n = len(rows)
    fetch_drops: dict[str, int] = {}
    image_drops: dict[str, int] = {}
    for r in rows:
        reason = r["status"]
        domain, query = domain_of(r["url"]), str(r.get("query") or "")
        funnel.count("per_domain_attempts", domain)
        funnel.count("per_query_input", query)
        funnel.count("bytes", "downloaded", int(r.get("download_bytes") or 0))
        if reason:
            target = image_drops if drop_stage(reason) == "image" else fetch_drops
            target[reason] = target.get(reason, 0) + 1
            funnel.count("per_domain_failures", f"{domain} {reason}")
        elif r["ordinal"] in duplicates:
            funnel.count("per_domain_failures", f"{domain} duplicate")
        else:
            funnel.count("per_domain_kept", domain)
            funnel.count("per_query_kept", query)
            funnel.count("bytes", "jpg_written", len(r["jpg"]))
    fetched = n - sum(fetch_drops.values())
    decoded = fetched - sum(image_drops.values())
    funnel.record("input", n, n, {})
    funnel.record("fetch", n, fetched, fetch_drops)
    funnel.record("image", fetched, decoded, image_drops)
    funnel.record(
        "dedupe", decoded, decoded - len(duplicates), {"duplicate": len(duplicates)} if duplicates else {}
    )
    return funnel


def to_sample(row: dict[str, Any], layout: Layout) -> dict[str, Any]:
    meta = {k: v for k, v in row.items() if k not in ("jpg", "status", "group") and v is not None}
    meta["key"] = layout.key(row["ordinal"])
    meta.setdefault("query", "")
    meta["caption"] = str(row.get("caption") or "")
    return {"key": meta["key"], "jpg": row["jpg"], "txt": meta["caption"], "json": meta}


class ShardAssembler:
    """Consumes crawled rows in input order, decides dedupe shard by shard, writes shards."""

    def __init__(
        self,
        cfg: CrawlConfig,
        out_uri: str,
        layout: Layout,
        committed: dict[str, dict],
        formats: Sequence[str],
    ):
        self.cfg = cfg
        self.formats = list(formats)
        self.out_uri = out_uri
        self.layout = layout
        self.committed = committed
        self.seen: set[str] = set()
        self.next_committed = sorted(int(name) for name in committed if name.isdigit())
        self.pool = ThreadPoolExecutor(max(1, cfg.writer_threads), thread_name_prefix="shard-writer")
        self.pending: list[Future] = []
        self.current: int | None = None
        self.rows: list[dict[str, Any]] = []
        self.written = 0
        self.kept = 0

    def add_batch(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            group = int(row["group"])
            if self.current is not None and group != self.current:
                raise RuntimeError(f"shard {self.current} is incomplete when rows of shard {group} arrive")
            self.current = group
            self.rows.append(row)
            if len(self.rows) == self.layout.group_size(group):
                self._finish_group()

    def close(self) -> None:
        if self.rows:
            self._finish_group()
        for f in self.pending:
            f.result()
        self.pool.shutdown()

    def _absorb_committed_before(self, group: int) -> None:
        while self.next_committed and self.next_committed[0] < group:
            manifest = self.committed[self.layout.shard_name(self.next_committed.pop(0))]
            self.seen.update(manifest["stats"].get("sha256", []))

    def _finish_group(self) -> None:
        group, rows = self.current, sorted(self.rows, key=lambda r: r["ordinal"])
        self.rows, self.current = [], None
        expected = self.layout.group_size(group)
        if len(rows) != expected:
            raise RuntimeError(f"shard {group}: got {len(rows)} rows, expected {expected}")
        self._absorb_committed_before(group)
        duplicates: set[int] = set()
        samples = []
        for row in rows:
            if row["status"]:
                continue
            if self.cfg.dedupe and row["sha256"] in self.seen:
                duplicates.add(row["ordinal"])
                continue
            self.seen.add(row["sha256"])
            samples.append(to_sample(row, self.layout))
        funnel = group_funnel(rows, duplicates)
        funnel.check()
        stats = {"funnel": funnel.to_dict(), "sha256": [s["json"]["sha256"] for s in samples]}
        self.kept += len(samples)
        self.written += 1
        # Bound the samples held in memory by the writer queue; .result() re-raises write errors.
        while len(self.pending) >= 2 * self.cfg.writer_threads:
            self.pending.pop(0).result()
        self.pending.append(
            self.pool.submit(
                shards.write_shard,
                samples,
                self.out_uri,
                self.layout.shard_name(group),
                self.formats,
                stats,
            )
        )


# ---------------------------------------------------------------- the graph


def crawl_stage_dataset(ds: ray.data.Dataset, cfg: CrawlConfig) -> ray.data.Dataset:
    """Adds the crawl stage (ours or img2dataset's) with its declared resources."""
    common: dict[str, Any] = {
        "batch_format": "pyarrow",
        "compute": ray.data.ActorPoolStrategy(size=cfg.num_workers),
        "num_cpus": cfg.num_cpus_per_worker,
    }
    if cfg.worker_resources:
        common["resources"] = dict(cfg.worker_resources)
    if cfg.crawler == "img2dataset":
        from pipelines.crawl.img2dataset_engine import Img2DatasetStage

        return ds.map_batches(
            Img2DatasetStage,
            fn_constructor_kwargs={"config": cfg},
            batch_size=max(cfg.batch_size, cfg.samples_per_shard),
            **common,
        )
    return ds.map_batches(
        CrawlStage,
        fn_constructor_kwargs={
            "fetch": cfg.fetch,
            "image": cfg.image,
            "num_workers": cfg.num_workers,
            "decode_threads": cfg.decode_threads,
        },
        batch_size=cfg.batch_size,
        **common,
    )


def build_crawl(
    source: str | ray.data.Dataset,
    cfg: CrawlConfig,
    out_uri: str,
    formats: Sequence[str] = ("webdataset", "parquet"),
) -> dict[str, Any]:
    """Crawls `source` (a url+caption table path, or a Dataset) into shards under `out_uri`.

    Returns the stats written to `{out_uri}/_stats.json`. Rerunning resumes: committed shards are kept.
    """
    started = time.time()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = read_url_table(source) if isinstance(source, str) else source
    _check_columns(ds)
    storage.makedirs(out_uri)
    committed = {
        name: m for name, m in shards.committed_shards(out_uri).items() if "funnel" in m.get("stats", {})
    }
    todo, num_input = shard_slices(ds, cfg.samples_per_shard, {int(n) for n in committed})
    layout = Layout(num_input, cfg.samples_per_shard)
    log.info(
        "crawl: %d input rows, %d shards, %d already committed", num_input, layout.num_shards, len(committed)
    )
    assembler = ShardAssembler(cfg, out_uri, layout, committed, formats)
    if todo is not None:
        for batch in iter_crawled(crawl_stage_dataset(todo, cfg)):
            assembler.add_batch(batch)
    assembler.close()
    return write_build_stats(out_uri, layout, cfg, started, assembler)


def iter_crawled(ds: ray.data.Dataset) -> Iterator[pa.Table]:
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2)


def write_build_stats(
    out_uri: str, layout: Layout, cfg: CrawlConfig, started: float, assembler: ShardAssembler
) -> dict[str, Any]:
    manifests = shards.committed_shards(out_uri)
    funnel = Funnel()
    for name in sorted(manifests):
        funnel.merge(manifests[name]["stats"].get("funnel", {}))
    funnel.check()
    data = funnel.to_dict()
    elapsed = time.time() - started
    total_in = data["stages"].get("input", {}).get("in", 0)
    if total_in != layout.num_input:
        raise RuntimeError(f"funnel counts {total_in} input rows but the input has {layout.num_input}")
    dropped: dict[str, int] = {}
    for entry in data["stages"].values():
        for reason, n in entry["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    kept = sum(m["count"] for m in manifests.values())
    data["totals"] = {"input": total_in, "kept": kept, "dropped": dropped, "shards": len(manifests)}
    data["run"] = {
        "crawler": cfg.crawler,
        "elapsed_s": round(elapsed, 3),
        "shards_written": assembler.written,
        "shards_skipped": len(manifests) - assembler.written,
        "samples_written": assembler.kept,
        "samples_per_s": round(assembler.kept / elapsed, 2) if elapsed > 0 else 0.0,
    }
    write_stats(storage.join(out_uri, STATS_FILE), data)
    return data
