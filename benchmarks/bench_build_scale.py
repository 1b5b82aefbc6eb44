"""Driver cost of `jobs/build_wit.py` as the input grows: the driver must hold a plan and counts only.

A loopback URL list of N small distinct images per size (default 5k, 20k, 80k; realistic alt-text captions,
2% 404s, 1% on a host refusing connections, 3% slow answers), built by the real job
against a separately started `ray start --head` (so the driver is one process of its own). Per size:
driver CPU-seconds (user + sys of the job's process alone, from wait4: Ray's workers belong to the head),
driver peak RSS, kept images/s (wall). `driver_us_per_image` is the marginal cost: driver CPU added per
kept image from the previous size to this one (the first size: total / kept), so the fixed start-up
(imports, ray.init, Ray Data planning) is not counted per image. Targets: <= 20 us per image, RSS growth
< 15% from the smallest to the largest size.

    python benchmarks/bench_build_scale.py [--sizes 5000 20000 80000] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _ray_setup  # noqa: F401  (repository on sys.path, loopback Ray env)
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.alt_text import alt_text_captions
from pipelines.local_cluster import LocalRayCluster, free_ports
from pipelines.storage import read_json

ROOT = _ray_setup.ROOT


def start_server(port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "benchmarks/loopback_images.py"), str(port)], env=env
    )
    import socket

    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("loopback image server did not start")


def url_of(port: int, dead_port: int, i: int) -> str:
    """A web-like mix: 2% missing (404), 1% on a host that refuses connections, 3% slow, the rest fast."""
    kind = i % 100
    if kind < 2:
        return f"http://127.0.0.1:{port}/missing/{i}.jpg"
    if kind < 3:
        return f"http://127.0.0.1:{dead_port}/img/{i}.jpg"
    if kind < 6:
        return f"http://127.0.0.1:{port}/slow/{i}.jpg"
    return f"http://127.0.0.1:{port}/img/{i}.jpg"


def run_job(
    address: str, urls: str, out: str, per_shard: int, workers: int, extra: tuple[str, ...] = ()
) -> tuple[float, float, float]:
    """(driver CPU s, driver peak RSS MB, wall s) of one `jobs/build_wit.py` run."""
    args = [sys.executable, os.path.join(ROOT, "jobs/build_wit.py"), f"urls={urls}", f"output={out}",
            "formats=[webdataset]", f"crawl.samples_per_shard={per_shard}", f"crawl.num_workers={workers}",
            "crawl.num_cpus_per_worker=1", "crawl.shards_per_worker=4", "crawl.fetch.allowed_networks=[127.0.0.0/8]",
            "crawl.fetch.per_host_rate=100000", "crawl.fetch.per_host_concurrency=64", "crawl.fetch.max_retries=0",
            "crawl.image.image_size=64", "crawl.image.min_size=16", *extra]  # fmt: skip
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONPATH=ROOT)
    started = time.time()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
    # wait4: the driver's own CPU and peak RSS (Ray's workers are the head's children, not its).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"build_wit.py failed ({proc.returncode})")
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 80000])
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args()
    port, dead_port = free_ports(2)  # nothing listens on dead_port: connection refused
    server = start_server(port)
    cluster = LocalRayCluster(num_cpus=args.cpus).start()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_build_scale-") as tmp:
            for n in args.sizes:
                urls = os.path.join(tmp, f"urls{n}.parquet")
                pq.write_table(pa.table({"url": [url_of(port, dead_port, i) for i in range(n)],
                                         "caption": alt_text_captions(n, seed=n)}), urls)  # fmt: skip
                out = os.path.join(tmp, f"out{n}")
                cpu, rss, wall = run_job(cluster.address, urls, out, args.per_shard, max(1, args.cpus))
                kept = read_json(os.path.join(out, "_stats.json"))["totals"]["kept"]
                rows.append({"size": n, "kept": kept, "cpu_s": cpu, "rss_mb": rss, "wall_s": wall})
    finally:
        cluster.stop()
        server.terminate()
    us = []
    for i, r in enumerate(rows):
        prev = rows[i - 1] if i else {"cpu_s": 0.0, "kept": 0}
        us.append(1e6 * (r["cpu_s"] - prev["cpu_s"]) / max(1, r["kept"] - prev["kept"]))
    print(
        f"{'size':>8} {'kept':>8} {'driver cpu s':>13} {'us/image':>9} {'driver RSS MB':>14} {'images/s':>9}"
    )
    for r, u in zip(rows, us):
        print(f"{r['size']:>8} {r['kept']:>8} {r['cpu_s']:>13.2f} {u:>9.1f} {r['rss_mb']:>14.0f} "
              f"{r['kept'] / r['wall_s']:>9.0f}")  # fmt: skip
    print(json.dumps({
        "sizes": [r["size"] for r in rows],
        "driver_us_per_image": [round(u, 2) for u in us],
        "driver_rss_mb": [round(r["rss_mb"], 1) for r in rows],
        "images_per_s": [round(r["kept"] / r["wall_s"], 1) for r in rows],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
