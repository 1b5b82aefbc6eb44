"""The crawl stage: a batch of (url, caption, ...) rows -> the same rows with an image or a drop reason.

`CrawlStage` is a callable class for `Dataset.map_batches` (one instance per worker keeps its HTTP
connections, DNS cache and per-host limits across batches). It fetches every URL of the batch
concurrently and runs the image checks on each body as soon as it arrives, in a small thread pool
(Pillow releases the GIL), so decoding overlaps the network. No row is ever lost: a row that fails
carries its drop reason in `status`.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import pyarrow as pa

from pipelines.crawl.fetch import FetchConfig, Fetcher, FetchResult
from pipelines.crawl.images import ImageConfig, ImageDrop, ProcessedImage, process_image

# Drop reasons of the image checks; every other reason belongs to the fetch stage.
IMAGE_REASONS = frozenset({"decode_error", "decompression_bomb", "too_small", "aspect_ratio"})

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
    """Fetch + image checks for a batch with a `url` column (other columns pass through)."""

    def __init__(
        self,
        fetch: FetchConfig | None = None,
        image: ImageConfig | None = None,
        num_workers: int = 1,
        decode_threads: int = 2,
    ):
        self.fetch_config = fetch or FetchConfig()
        self.image_config = image or ImageConfig()
        self.fetcher = Fetcher(self.fetch_config, rate_share=num_workers)
        self.pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")

    def __call__(self, batch: pa.Table | pd.DataFrame | dict[str, Any]) -> pa.Table:
        table = as_table(batch)
        urls = table.column("url").to_pylist() if table.num_rows else []
        rows = self.fetcher.loop.run_until_complete(self._crawl(urls))
        return result_columns(rows, table)

    async def _crawl(self, urls: list[str | None]) -> list[dict[str, Any]]:
        in_flight = asyncio.Semaphore(self.fetch_config.max_in_flight)
        loop = asyncio.get_running_loop()

        async def one(url: str | None) -> dict[str, Any]:
            if not url or not isinstance(url, str):
                return {"status": "invalid_url", "attempts": 0, "download_bytes": 0}
            async with in_flight:
                fetched = await self.fetcher.fetch(url)
            row = fetch_columns(fetched)
            if not fetched.ok:
                return row
            try:
                image = await loop.run_in_executor(self.pool, process_image, fetched.body, self.image_config)
            except ImageDrop as e:
                row["status"] = e.reason
                return row
            row.update(image_columns(image))
            return row

        return list(await asyncio.gather(*(one(u) for u in urls)))

    def close(self) -> None:
        self.fetcher.close()
        self.pool.shutdown()


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
