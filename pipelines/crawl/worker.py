"""The shard worker: an async Ray actor that crawls several shards at once and writes each one itself.

`crawl_shard` reads the shard's plan slice, crawls it (`await crawl(table)`: one slow URL holds one
request slot of one shard, while the worker's other shards go on), checks the images, writes the shard
and returns a small record; no image and no per-sample object goes back to the driver. `retry_shard`
re-fetches only the URLs of a committed shard that failed for a transient reason and rewrites that
shard. Blocking work (reading, encoding, writing) runs in threads so the event loop keeps crawling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import faults, shards, storage
from pipelines.crawl import shard as shard_files
from pipelines.crawl.captions import normalise_captions
from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.crawl import result_columns
from pipelines.crawl.plan import Layout, read_pieces


class StageAdapter:
    """`await crawl(table)` over any crawl stage.

    Our `CrawlStage` has `async crawl(table)`, awaited on this actor's loop: one instance (one HTTP
    session, one in-flight limit) serves every shard in flight. A stage with only a synchronous
    `__call__` (`Img2DatasetStage`, a subprocess per call) gets one instance per shard slot, each called
    in a thread."""

    def __init__(self, cfg: CrawlConfig, slots: int):
        self.cfg = cfg
        first = self._new_stage()
        self.shared = first if hasattr(first, "crawl") else None
        self.free: asyncio.Queue | None = None
        if self.shared is None:
            self.free = asyncio.Queue()
            self.free.put_nowait(first)
            for _ in range(slots - 1):
                self.free.put_nowait(self._new_stage())

    def _new_stage(self) -> Any:
        if self.cfg.crawler == "img2dataset":
            from pipelines.crawl.img2dataset_engine import Img2DatasetStage

            return Img2DatasetStage(self.cfg)
        from pipelines.crawl.crawl import CrawlStage

        return CrawlStage(fetch=self.cfg.fetch, image=self.cfg.image, decode_threads=self.cfg.decode_threads)

    async def crawl(self, table: pa.Table) -> pa.Table:
        if self.shared is not None:
            return await self.shared.crawl(table)
        stage = await self.free.get()
        try:
            return await asyncio.to_thread(stage, table)
        finally:
            self.free.put_nowait(stage)

    async def close(self) -> None:
        """Close sessions and pools: a shared stage on this loop, per-slot stages (each with its own
        event loop) in a thread, since their close runs that loop."""
        if self.shared is not None:
            aclose = getattr(self.shared, "aclose", None)
            await aclose() if aclose else self.shared.close()
        while self.free is not None and not self.free.empty():
            stage = self.free.get_nowait()
            if hasattr(stage, "close"):
                await asyncio.to_thread(stage.close)


async def crawl_table(crawler: StageAdapter, table: pa.Table, batch_size: int) -> pa.Table:
    """Crawl `table` in calls of `batch_size` rows that run concurrently; rows stay in order. Rows that
    arrive with a drop reason in `status` (a bad caption, captions.py) are not fetched and keep it."""
    if "status" in table.column_names and table.column("status").null_count < table.num_rows:
        bad = pc.is_valid(table.column("status"))
        dropped = table.filter(bad)
        dropped = result_columns([{"status": s} for s in dropped.column("status").to_pylist()], dropped)
        todo = table.filter(pc.invert(bad))
        crawled = await crawl_table(crawler, todo, batch_size) if todo.num_rows else result_columns([], todo)
        return pa.concat_tables([crawled, dropped]).sort_by("ordinal")
    if table.num_rows <= batch_size:
        return await crawler.crawl(table)
    parts = [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]
    done = await asyncio.gather(*(crawler.crawl(p) for p in parts))
    return pa.concat_tables(done, promote_options="default")


class ShardWorker:
    """Async Ray actor (see module doc); created by `pipelines.crawl.dispatch`."""

    def __init__(self, cfg: CrawlConfig, out_uri: str, formats: Sequence[str], layout: Layout):
        self.cfg, self.out_uri, self.formats, self.layout = cfg, out_uri, list(formats), layout
        self.crawler: StageAdapter | None = None
        # img2dataset starts a subprocess per call: one call per shard.
        self.batch_size = cfg.batch_size if cfg.crawler == "ray" else cfg.samples_per_shard

    async def ready(self) -> bool:
        if self.crawler is None:  # built on the actor's own event loop
            self.crawler = StageAdapter(self.cfg, self.cfg.shards_per_worker)
        return True

    async def crawl_shard(self, shard: int, pieces: list[tuple[str, int, int]]) -> dict[str, Any]:
        await self.ready()
        name = self.layout.shard_name(shard)
        faults.maybe_fail("crawl_shard", name)
        table = await asyncio.to_thread(self._read, shard, pieces)
        crawled = await crawl_table(self.crawler, table, self.batch_size)
        return await asyncio.to_thread(self._commit, name, crawled)

    def _read(self, shard: int, pieces: list[tuple[str, int, int]]) -> pa.Table:
        table = read_pieces(pieces, shard * self.layout.samples_per_shard, self.layout.samples_per_shard)
        return normalise_captions(table, self.cfg.max_caption_chars, self.cfg.long_captions)

    def _commit(self, name: str, crawled: pa.Table) -> dict[str, Any]:
        rows = shard_files.rows_table(crawled)
        excluded = shard_files.first_copies(rows) if self.cfg.dedupe else set()
        samples = shard_files.samples_of(crawled, self.layout, excluded)
        return shard_files.commit(self.out_uri, name, samples, rows, excluded, self.formats, self._dir(name))

    async def retry_shard(self, shard: int, pieces: list[tuple[str, int, int]]) -> dict[str, Any]:
        await self.ready()
        name = self.layout.shard_name(shard)
        rows = await asyncio.to_thread(shard_files.read_rows, self.out_uri, name)
        failed = [o for o, s in zip(rows.column("ordinal").to_pylist(), rows.column("status").to_pylist())
                  if shard_files.is_transient(s)]  # fmt: skip
        table = await asyncio.to_thread(self._read, shard, pieces)
        todo = table.filter(pc.is_in(table.column("ordinal"), value_set=pa.array(failed, pa.int64())))
        crawled = await crawl_table(self.crawler, todo, self.batch_size)
        return await asyncio.to_thread(self._merge, name, rows, crawled)

    def _merge(self, name: str, rows: pa.Table, crawled: pa.Table) -> dict[str, Any]:
        """The shard with the re-fetched rows in place: files, sidecar and manifest rewritten."""
        kept = list(shards.read_shard_samples(self._file(name)))
        in_files = {s["json"]["ordinal"] for s in kept}
        new_rows = shard_files.rows_table(crawled)
        retried = set(new_rows.column("ordinal").to_pylist())
        old = rows.filter(
            pc.invert(pc.is_in(rows.column("ordinal"), value_set=pa.array(sorted(retried), pa.int64())))
        )
        merged = pa.concat_tables([old, new_rows]).sort_by("ordinal")
        # Ordinals that passed before and are not in the files were left out as duplicates: still are.
        known = {o for o, s in zip(old.column("ordinal").to_pylist(), old.column("status").to_pylist())
                 if not s and o not in in_files}  # fmt: skip
        excluded = shard_files.first_copies(merged, known) if self.cfg.dedupe else set()
        fresh = shard_files.samples_of(crawled, self.layout, excluded)
        samples = sorted([s for s in kept if s["json"]["ordinal"] not in excluded] + fresh,
                         key=lambda s: s["json"]["ordinal"])  # fmt: skip
        return shard_files.commit(
            self.out_uri, name, samples, merged, excluded, self.formats, self._dir(name)
        )

    def _dir(self, name: str) -> str:
        return shards.shard_dir(name, self.cfg.shard_prefix_chars)

    def _file(self, name: str) -> str:
        ext = ".tar" if "webdataset" in self.formats else ".parquet"
        subdir = self._dir(name)
        return storage.join(self.out_uri, f"{subdir}/{name}{ext}" if subdir else name + ext)

    async def close(self) -> None:
        if self.crawler is not None:
            await self.crawler.close()
