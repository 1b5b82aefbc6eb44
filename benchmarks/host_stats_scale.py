"""Driver memory of the build's statistics step from 10^4 to 10^6 hosts (no network).

`measure_stats(hosts, out_dir)` writes a synthetic crawl's shard sidecars and manifests (each host 1-3
URLs, a host's URLs in different shards, one query per 10 hosts, every fifth URL a 404) in Ray tasks, so
the driver holds nothing per host; then it runs the build's real statistics step (`build.finish`:
manifests -> totals and `_index.parquet`, sidecars -> `_stats_domains/`, `_stats_queries/`) and samples
the driver's RSS (and the whole local cluster's: the driver and every process under it) while it runs.

    python benchmarks/host_stats_scale.py [hosts ...]     # default 10000 100000 1000000

Prints a table and, last, one JSON line (`hosts`, `driver_rss_mb`, `seconds` of the largest run, and
`by_hosts` for all). benchmarks/bench_host_state.py calls `measure_stats`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

import psutil  # isort: skip (Ray's own copy, on sys.path once ray is imported; not a dependency of ours)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import storage  # noqa: E402
from pipelines.crawl import key_stats, shard  # noqa: E402
from pipelines.crawl.build import RunCounts, finish  # noqa: E402
from pipelines.crawl.config import CrawlConfig  # noqa: E402
from pipelines.crawl.plan import Layout, Plan  # noqa: E402

SAMPLES_PER_SHARD = 1000
SHARDS_PER_TASK = 50


def url_count(hosts: int) -> int:
    """Host h has 1 + h % 3 URLs."""
    return hosts + len(range(1, hosts, 3)) + len(range(2, hosts, 3)) + len(range(2, hosts, 3))


def hosts_of(ordinals: np.ndarray, hosts: int) -> np.ndarray:
    """The host of each URL: every host once, then the hosts with a 2nd URL, then those with a 3rd (so a
    host's URLs sit far apart, in different shards, as the crawl's hash order puts them)."""
    second = len(range(1, hosts, 3)) + len(range(2, hosts, 3))
    out = np.empty(len(ordinals), np.int64)
    first, rest = ordinals < hosts, ordinals - hosts
    out[first] = ordinals[first]
    two = ~first & (rest < second)
    k = rest[two]
    out[two] = 3 * (k // 2) + 1 + k % 2  # h % 3 in (1, 2)
    three = ~first & ~two
    out[three] = 3 * (rest[three] - second) + 2  # h % 3 == 2
    return out


def sidecar(shard_index: int, layout: Layout, hosts: int) -> pa.Table:
    first = shard_index * layout.samples_per_shard
    ordinals = np.arange(first, first + layout.shard_size(shard_index), dtype=np.int64)
    host = hosts_of(ordinals, hosts)
    kept = ordinals % 5 != 0
    return pa.table(
        {
            "ordinal": ordinals,
            "status": pa.array([None if k else "http_404" for k in kept], pa.string()),
            "sha256": [f"{o:064x}" if k else None for o, k in zip(ordinals.tolist(), kept.tolist())],
            "query": [f"q{h // 10}" for h in host.tolist()],
            "domain": [f"h{h}.example" for h in host.tolist()],
            "download_bytes": np.where(kept, 20_000, 0),
            "jpg_bytes": np.where(kept, 10_000, 0),
            "caption_truncated": np.zeros(len(ordinals), bool),
        },
        schema=shard.ROWS_SCHEMA,
    )


@ray.remote(num_cpus=1)
def _write_shards(out_uri: str, shard_ids: list[int], layout: Layout, hosts: int) -> None:
    """Sidecars and manifests of some shards, as `shard.commit` writes them (no sample files)."""
    import io

    import pyarrow.parquet as pq

    for g in shard_ids:
        rows, name = sidecar(g, layout, hosts), layout.shard_name(g)
        buf = io.BytesIO()
        pq.write_table(shard.sidecar(rows, set()), buf)
        storage.write_bytes_atomic(shard.rows_uri(out_uri, name), buf.getvalue())
        stats = {"funnel": shard.shard_funnel(rows, set()).to_dict(), "excluded": 0, "transient": 0}
        manifest = {"shard": name, "count": rows.column("status").null_count, "files": {}, "stats": stats}
        storage.write_json(storage.join(out_uri, name + ".manifest.json"), manifest)


def write_synthetic(hosts: int, out_dir: str) -> Plan:
    layout = Layout(url_count(hosts), SAMPLES_PER_SHARD)
    chunks = [list(range(i, min(i + SHARDS_PER_TASK, layout.num_shards)))
              for i in range(0, layout.num_shards, SHARDS_PER_TASK)]  # fmt: skip
    ray.get([_write_shards.remote(out_dir, c, layout, hosts) for c in chunks])
    return Plan(storage.join(out_dir, "_plan"), SAMPLES_PER_SHARD, layout.num_input)


class RssSampler:
    """Peak RSS of this process and of it plus every process under it (the local Ray cluster)."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.stop = interval_s, threading.Event()
        self.driver_peak = self.cluster_peak = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            driver = me.memory_info().rss
            cluster = driver
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # a process that just ended
                    cluster += child.memory_info().rss
            self.driver_peak = max(self.driver_peak, driver)
            self.cluster_peak = max(self.cluster_peak, cluster)
            self.stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def measure_stats(hosts: int, out_dir: str) -> dict:
    """Synthetic sidecars and manifests for `hosts` hosts under `out_dir`, then the real statistics step;
    returns hosts, rows, shards, path (one task / Ray Data), driver_rss_mb (peak during the step),
    driver_rss_before_mb, cluster_rss_mb, seconds (of the step), domains (keys written)."""
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    plan = write_synthetic(hosts, out_dir)
    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    with RssSampler() as rss:
        stats = finish(out_dir, plan, CrawlConfig(), RunCounts(), 1.0, {})
    seconds = time.perf_counter() - started
    assert stats["totals"]["input"] == plan.num_input and stats["domains"]["keys"] == hosts
    return {
        "hosts": hosts,
        "rows": plan.num_input,
        "shards": plan.layout.num_shards,
        "path": "one task" if plan.num_input <= key_stats.ROWS_PER_TASK else "ray data",
        "driver_rss_mb": round(rss.driver_peak / 2**20, 1),
        "driver_rss_before_mb": round(before / 2**20, 1),
        "cluster_rss_mb": round(rss.cluster_peak / 2**20, 1),
        "seconds": round(seconds, 2),
        "domains": stats["domains"]["keys"],
        "queries": stats["queries"]["keys"],
        "stats_json_bytes": len(storage.read_bytes(storage.join(out_dir, "_stats.json"))),
    }


def main(sizes: list[int]) -> None:
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = []
    for hosts in sizes:
        with tempfile.TemporaryDirectory(prefix="host_stats_") as out:
            results.append(measure_stats(hosts, out))
        print(f"{hosts:,} hosts done, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    cols = ["hosts", "rows", "shards", "path", "driver_rss_before_mb", "driver_rss_mb", "cluster_rss_mb",
            "seconds", "stats_json_bytes"]  # fmt: skip
    print(" | ".join(f"{c:>20}" for c in cols))
    for r in results:
        print(" | ".join(f"{r[c]:>20,}" if isinstance(r[c], int) else f"{r[c]:>20}" for c in cols))
    print(f"load average (1/5/15 min): {os.getloadavg()}; cpus: {os.cpu_count()}")
    last = results[-1]
    summary = {k: last[k] for k in ("hosts", "driver_rss_mb", "seconds")}
    summary["by_hosts"] = {
        r["hosts"]: {k: r[k] for k in ("driver_rss_mb", "seconds", "path")} for r in results
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10_000, 100_000, 1_000_000])
