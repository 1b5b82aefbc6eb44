"""`crawler: img2dataset`: img2dataset's downloader behind the same crawl stage.

img2dataset pins pandas<3 and pulls opencv, albumentations and wandb, so it lives in its own venv
(scripts/setup_img2dataset.sh) and runs as a subprocess per crawl call. It writes Parquet with one row per
input (failures included, with `status` and `error_message`); the rows come back in the crawl stage's
schema (drop reasons mapped onto ours), and the same shard worker de-duplicates and writes the same
shards and the same `_stats.json`. Before handing URLs over, the stage applies our SSRF guard, which img2dataset
does not have; per-host politeness and resume stay ours (only uncommitted rows reach this stage).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.crawl import as_table, result_columns
from pipelines.crawl.fetch import AddressGuard

RESIZE_MODES = {"keep_aspect": "keep_ratio", "center_crop": "center_crop", "none": "no"}
RUNNER = """
import json, sys
from img2dataset import download

if __name__ == "__main__":
    download(**json.load(open(sys.argv[1])))
"""


def map_error(status: str | None, message: str | None) -> str:
    """img2dataset's (status, error_message) -> our drop reason."""
    message = message or ""
    low = message.lower()
    if m := re.search(r"HTTP Error (\d{3})", message):
        # urllib reports a redirect loop as "HTTP Error 302: ... infinite loop"
        return "too_many_redirects" if m.group(1).startswith("30") else f"http_{m.group(1)}"
    if "x-robots-tag" in low:
        return "robots_opt_out"
    if "image too small" in low:
        return "too_small"
    if "aspect ratio too large" in low:
        return "aspect_ratio"
    if "image area too large" in low:
        return "decompression_bomb"
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if "redirect" in low:
        return "too_many_redirects"
    if status == "failed_to_resize":
        return "decode_error"
    if "incompleteread" in low or "incomplete read" in low:
        return "truncated"
    if "connection" in low or "urlopen error" in low:
        return "connection_error"
    return "download_error"


def venv_python(venv: str) -> Path:
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(
            f"img2dataset venv not found at {venv}: run scripts/setup_img2dataset.sh (or set img2dataset.venv)"
        )
    return python


class Img2DatasetStage:
    """Runs img2dataset on a batch of url+caption rows; output schema = `CrawlStage`'s."""

    def __init__(self, config: CrawlConfig):
        self.config = config
        self.python = venv_python(config.img2dataset.venv)
        self.guard = AddressGuard(config.fetch.allowed_networks)
        self.dns: dict[str, bool] = {}

    def __call__(self, batch: pa.Table | Any) -> pa.Table:
        table = as_table(batch)
        urls = table.column("url").to_pylist()
        rows: list[dict[str, Any]] = [{} for _ in urls]
        to_fetch = []
        for i, url in enumerate(urls):
            reason = self.refuse(url)
            if reason:
                rows[i] = {"status": reason, "attempts": 0, "download_bytes": 0}
            else:
                to_fetch.append(i)
        if to_fetch:
            fetched = self.run(table.take(to_fetch))
            for i in to_fetch:
                rows[i] = fetched.get(i, {"status": "download_error"})
        return result_columns(rows, table)

    def refuse(self, url: Any) -> str | None:
        """Our URL checks that img2dataset lacks: scheme and the SSRF guard."""
        if not isinstance(url, str) or not url:
            return "invalid_url"
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:
            return "invalid_url"
        if parts.scheme not in ("http", "https") or not host:
            return "invalid_url"
        if host not in self.dns:
            self.dns[host] = self._host_allowed(host)
        return None if self.dns[host] else "blocked_address"

    def _host_allowed(self, host: str) -> bool:
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            try:
                addresses = [info[4][0] for info in socket.getaddrinfo(host, None)]
            except OSError:
                return True  # img2dataset reports the DNS failure itself
        return all(self.guard.is_allowed(a) for a in addresses)

    def run(self, table: pa.Table) -> dict[int, dict[str, Any]]:
        """img2dataset on `table`; results by row position in `table`."""
        cfg, i2d = self.config, self.config.img2dataset
        with tempfile.TemporaryDirectory(prefix="img2dataset-") as tmp:
            rows_in = pa.table(
                {
                    "url": table.column("url"),
                    "caption": pa.array([str(c or "") for c in table.column("caption").to_pylist()]),
                    "row": pa.array(range(table.num_rows), pa.int64()),
                }
            )
            pq.write_table(rows_in, f"{tmp}/input.parquet")
            args = {
                "url_list": f"{tmp}/input.parquet",
                "input_format": "parquet",
                "url_col": "url",
                "caption_col": "caption",
                "save_additional_columns": ["row"],
                "output_folder": f"{tmp}/out",
                "output_format": "parquet",
                "processes_count": i2d.processes_count,
                "thread_count": i2d.thread_count,
                "number_sample_per_shard": max(1, table.num_rows),
                "image_size": cfg.image.image_size,
                "resize_mode": RESIZE_MODES[cfg.image.resize_mode],
                "resize_only_if_bigger": True,
                "encode_quality": cfg.image.jpeg_quality,
                "encode_format": "jpg",
                "min_image_size": cfg.image.min_size,
                "max_aspect_ratio": cfg.image.max_aspect_ratio,
                "max_image_area": cfg.image.max_pixels,
                "timeout": i2d.timeout_s,
                "retries": i2d.retries,
                "compute_hash": "sha256",
                "user_agent_token": cfg.fetch.user_agent_token,
                "disallowed_header_directives": cfg.fetch.disallowed_robots_directives
                if cfg.fetch.honour_robots_tag
                else [],
                "enable_wandb": False,
                "extract_exif": False,
                "distributor": "multiprocessing",
            }
            Path(f"{tmp}/args.json").write_text(json.dumps(args))
            Path(f"{tmp}/run.py").write_text(RUNNER)
            env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", WANDB_SILENT="true")
            proc = subprocess.run(
                [str(self.python), f"{tmp}/run.py", f"{tmp}/args.json"],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"img2dataset failed ({proc.returncode}): {proc.stderr[-2000:]}")
            return read_output(Path(f"{tmp}/out"))


def read_output(folder: Path) -> dict[int, dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.parquet")):
        for r in pq.read_table(path).to_pylist():
            if r["status"] == "success":
                row = {
                    "status": None,
                    "jpg": r["jpg"],
                    "sha256": r["sha256"],
                    "width": r["width"],
                    "height": r["height"],
                    "original_width": r["original_width"],
                    "original_height": r["original_height"],
                    "download_bytes": 0,  # img2dataset does not report it
                    "attempts": 1,
                }
            else:
                row = {
                    "status": map_error(r["status"], r["error_message"]),
                    "download_bytes": 0,
                    "attempts": 1,
                }
            results[int(r["row"])] = row
    return results
