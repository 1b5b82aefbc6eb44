"""Head-of-line blocking: the real job on one loopback URL list, clean and with one URL in 256 hanging
until the read timeout. A hanging URL must hold one request slot, never a shard's worker: the target is
tail / clean >= 0.8 (before the shard worker: ~0.05). Images/s = kept images / the build's elapsed time
(from `_stats.json`, Ray's start-up excluded); the job runs against a separately started head.

    python benchmarks/bench_crawl_tail.py [--images 8192] [--cpus 2] [--read-timeout 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import _ray_setup  # noqa: F401  (repository on sys.path, loopback Ray env)
import pyarrow as pa
import pyarrow.parquet as pq
from bench_build_scale import run_job, start_server

from pipelines.local_cluster import LocalRayCluster, free_ports
from pipelines.storage import read_json

HANG_EVERY = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--shards-per-worker", type=int, default=8)
    parser.add_argument("--read-timeout", type=float, default=2.0)
    args = parser.parse_args()
    (port,) = free_ports(1)
    server = start_server(port)
    cluster = LocalRayCluster(num_cpus=args.cpus).start()
    # One loopback host stands for the whole web (as in bench_crawl.py): its budget must not be the limit,
    # or the hanging URLs would measure how many of one site's leases they hold, not head-of-line blocking.
    extra = (f"crawl.fetch.read_timeout_s={args.read_timeout}", f"crawl.fetch.total_timeout_s={args.read_timeout * 2}",
             f"crawl.shards_per_worker={args.shards_per_worker}", "crawl.fetch.max_in_flight=128",
             "crawl.fetch.per_host_concurrency=100000")  # fmt: skip
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_crawl_tail-") as tmp:
            for variant in ("clean", "tail"):
                hang = variant == "tail"
                urls = [f"http://127.0.0.1:{port}/{'hang' if hang and i % HANG_EVERY == 7 else 'img'}/{i}.jpg"
                        for i in range(args.images)]  # fmt: skip
                path = os.path.join(tmp, f"{variant}.parquet")
                pq.write_table(
                    pa.table({"url": urls, "caption": [f"picture {i}" for i in range(len(urls))]}), path
                )
                out = os.path.join(tmp, variant)
                _, _, wall = run_job(cluster.address, path, out, args.per_shard, max(1, args.cpus), extra)
                stats = read_json(os.path.join(out, "_stats.json"))
                kept, elapsed = stats["totals"]["kept"], stats["run"]["elapsed_s"]
                results[variant] = {
                    "kept": kept,
                    "elapsed_s": elapsed,
                    "wall_s": wall,
                    "images_per_s": kept / elapsed,
                    "dropped": stats["totals"]["dropped"],
                }
    finally:
        cluster.stop()
        server.terminate()
    print(f"{'variant':>8} {'kept':>7} {'build s':>8} {'job wall s':>11} {'images/s':>9}")
    for name, r in results.items():
        print(
            f"{name:>8} {r['kept']:>7} {r['elapsed_s']:>8.1f} {r['wall_s']:>11.1f} {r['images_per_s']:>9.1f}"
            f"  dropped: {r['dropped']}"
        )
    clean, tail = results["clean"]["images_per_s"], results["tail"]["images_per_s"]
    print(json.dumps({"images_per_s_clean": round(clean, 1), "images_per_s_tail": round(tail, 1),
                      "ratio": round(tail / clean, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
