"""The crawl stage: a batch of (url, caption, ...) rows -> the same rows with an image or a drop reason.

`CrawlStage` is a callable class: `stage(table)` for `Dataset.map_batches`, or `await stage.crawl(table)`
on the caller's running event loop (an async Ray actor crawling several shards at once: all
concurrent calls share one in-flight limit, `fetch.max_in_flight`, and one HTTP session, so a slow
URL holds one slot, never a batch). Each body is checked as soon as it arrives, in a small thread
pool (Pillow releases the GIL), so decoding overlaps the network. Rows keep their input order and no
row is ever lost: a row that fails carries its drop reason in `status`, whatever went wrong.

Per-host limits and robots.txt are cluster-wide (hosts.py): the stage finds the budget actors by
`fetch.budget_scope`, so callers pass nothing. `TRANSIENT_REASONS` / `is_transient` name the drop
reasons worth a retry pass.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import pyarrow as pa

from pipelines.crawl.fetch import FetchConfig, Fetcher, FetchResult
from pipelines.crawl.hostplan import PLAN_DROP
from pipelines.crawl.hosts import HOST_DEFERRED
from pipelines.crawl.images import IMAGE_REASONS, ImageConfig, ImageDrop, ProcessedImage, process_image
from pipelines.crawl.robots import ROBOTS_UNAVAILABLE

log = logging.getLogger(__name__)

# Drop reasons that may go away on their own: a retry pass fetches these URLs again.
TRANSIENT_REASONS = frozenset(
    {
        "timeout", "connection_error", "dns_error", "truncated",
        "http_408", "http_425", "http_429", "http_500", "http_502", "http_503", "http_504",
        HOST_DEFERRED,  # the site asked for a long Retry-After, or had no free slot in time
        ROBOTS_UNAVAILABLE,  # robots.txt answered 5xx or not at all: nothing may be fetched for now
        "fetch_error",  # an unforeseen exception: worth one more try
    }
)  # fmt: skip


def is_transient(reason: str | None) -> bool:
    """True for a drop reason worth a retry pass (any 5xx included)."""
    if not reason:
        return False
    return reason in TRANSIENT_REASONS or (reason.startswith("http_5") and reason[5:].isdigit())


# Columns the crawl stage adds to its input rows.
OUTPUT_SCHEMA = pa.schema(
    [
        ("status", pa.string()),  # null: kept; else the drop reason
        ("jpg", pa.binary()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("original_format", pa.string()),
        ("http_status", pa.int32()),
        ("download_bytes", pa.int64()),
        ("attempts", pa.int32()),
    ]
)


def drop_stage(reason: str) -> str:
    return "image" if reason in IMAGE_REASONS else "fetch"


def result_columns(rows: list[dict[str, Any]], inputs: pa.Table) -> pa.Table:
    """Input columns (minus any stale crawl columns) followed by the crawl columns."""
    table = inputs.drop_columns([n for n in OUTPUT_SCHEMA.names if n in inputs.column_names])
    for f in OUTPUT_SCHEMA:
        table = table.append_column(f, pa.array([r.get(f.name) for r in rows], type=f.type))
    return table


def as_table(batch: pa.Table | pd.DataFrame | dict[str, Any]) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pd.DataFrame):
        return pa.Table.from_pandas(batch, preserve_index=False)
    return pa.table(batch)


class CrawlStage:
    """Fetch + image checks for a table with a `url` column (other columns pass through)."""

    def __init__(
        self,
        fetch: FetchConfig | None = None,
        image: ImageConfig | None = None,
        decode_threads: int = 2,
        num_workers: int | None = None,  # ignored: per-host limits are cluster-wide (hosts.py); kept
    ):  # only until build.py stops passing it
        self.fetch_config = fetch or FetchConfig()
        self.image_config = image or ImageConfig()
        self.fetcher = Fetcher(self.fetch_config)
        self.pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")
        self.own_loop: asyncio.AbstractEventLoop | None = None  # for the synchronous __call__

    def __call__(self, batch: pa.Table | pd.DataFrame | dict[str, Any]) -> pa.Table:
        if self.own_loop is None:
            self.own_loop = asyncio.new_event_loop()
        return self.own_loop.run_until_complete(self.crawl(batch))

    async def crawl(self, batch: pa.Table | pd.DataFrame | dict[str, Any]) -> pa.Table:
        """The crawled rows, in input order, on the running loop (concurrent calls share the limits)."""
        table = as_table(batch)
        urls = table.column("url").to_pylist() if table.num_rows else []
        planned = [None] * len(urls)
        if PLAN_DROP in table.column_names:  # rows the plan dropped (a capped host): counted, not fetched
            planned = table.column(PLAN_DROP).to_pylist()
            table = table.drop_columns([PLAN_DROP])
        rows = await asyncio.gather(*(self._one(u, d) for u, d in zip(urls, planned)))
        await self.fetcher.budget.drain()  # hand back this batch's leases now, not with the next batch
        return result_columns(rows, table)

    async def _one(self, url: Any, planned_drop: str | None = None) -> dict[str, Any]:
        if planned_drop:
            return {"status": planned_drop, "attempts": 0, "download_bytes": 0}
        if not url or not isinstance(url, str):
            return {"status": "invalid_url", "attempts": 0, "download_bytes": 0}
        fetched = await self.fetcher.fetch(url)
        row = fetch_columns(fetched)
        if not fetched.ok:
            return row
        try:
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(self.pool, process_image, fetched.body, self.image_config)
        except ImageDrop as e:
            row["status"] = e.reason
            return row
        except Exception:  # never a failed batch: a counted drop
            log.warning("image check of %r failed unexpectedly", url, exc_info=True)
            row["status"] = "image_error"
            return row
        row.update(image_columns(image))
        return row

    def close(self) -> None:
        """Closes the HTTP session (on its own loop) and the decode threads. Idempotent."""
        session_loop = self.fetcher.loop
        if self.fetcher.session is not None and session_loop is not None and not session_loop.is_closed():
            if not session_loop.is_running():
                session_loop.run_until_complete(self.fetcher.close())
            else:
                try:
                    running = asyncio.get_running_loop()
                except RuntimeError:
                    running = None
                if running is session_loop:  # close() called from a coroutine on that loop
                    session_loop.create_task(self.fetcher.close())
                else:
                    asyncio.run_coroutine_threadsafe(self.fetcher.close(), session_loop).result(10)
        self.pool.shutdown(wait=True)
        if self.own_loop is not None and not self.own_loop.is_running():
            self.own_loop.close()
            self.own_loop = None

    async def aclose(self) -> None:
        await self.fetcher.close()
        self.pool.shutdown(wait=False)


def fetch_columns(fetched: FetchResult) -> dict[str, Any]:
    return {
        "status": fetched.error,
        "http_status": fetched.status,
        "download_bytes": len(fetched.body) if fetched.body is not None else 0,
        "attempts": fetched.attempts,
    }


def image_columns(image: ProcessedImage) -> dict[str, Any]:
    return {
        "jpg": image.jpg,
        "sha256": image.sha256,
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
        "original_format": image.original_format,
    }
