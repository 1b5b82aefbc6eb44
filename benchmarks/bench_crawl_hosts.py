"""The crawl on a heavy-tailed loopback web: does one hot host slow every other host, and is politeness exact?

One asyncio process (benchmarks/loopback_web.py) serves `--hosts` hosts, each on its own 127.10.x.y
address (loopback only), with robots.txt of every kind (404, allow, Disallow: /private/, 503, Crawl-delay:
1). Two URL lists of `--urls` URLs, crawled by the real job (`jobs/build_wit.py` against a separately
started Ray head, per-host rate `--rate`/s and concurrency `--concurrency`, the plan ordered by host):
- zipf: one hot host holds 5% of the URLs, the other hosts a Zipf share each (at least one URL);
- even: the same number of URLs spread evenly over the same hosts (the control).
The server records per host the time each request arrived, the peak of TCP connections open at once and
the robots.txt fetches. Printed: a table per list, then one JSON line with
- other_hosts_ratio: the other hosts' request rate in `zipf` over all hosts' rate in `even` (target >= 0.9);
- hot_rate: the hot host's achieved request rate (target within 5% of --rate);
- hot_max_per_s: the most hot-host requests in any one-second window (target <= --rate);
- peak_tcp_per_host: the most TCP connections any host had open at once (target <= --concurrency);
- robots_per_host_max: the most robots.txt fetches of any host (target 1).
CPU is summed over every process of the Ray cluster and the driver (psutil), as in bench_crawl.py.

    python benchmarks/bench_crawl_hosts.py                      # the issue's size: 4,000 hosts, 8,000 URLs
    python benchmarks/bench_crawl_hosts.py --hosts 1000 --urls 2000   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import _ray_setup  # noqa: F401  (repository on sys.path, loopback Ray env)
import pyarrow as pa
import pyarrow.parquet as pq
from bench_crawl import ProcessMeter, cluster_pids, tree
from loopback_web import host_address

from pipelines.local_cluster import LocalRayCluster, free_ports
from pipelines.storage import read_json

ROOT = _ray_setup.ROOT
HOT_SHARE = 0.05
ROBOT_KINDS = ["404"] * 10 + ["disallow"] * 5 + ["5xx"] * 2 + ["crawl_delay"] * 2 + ["allow"]


def robots_kinds(hosts: int, tail_from: int) -> list[str]:
    """Host 0 (the hot host) answers 404; Crawl-delay only on tail hosts (index >= tail_from), where a
    one-per-second host still fits the crawl; the kinds cycle over the others."""
    kinds = ["404"]
    for i in range(1, hosts):
        kind = ROBOT_KINDS[i % len(ROBOT_KINDS)]
        kinds.append("404" if kind == "crawl_delay" and i < tail_from else kind)
    return kinds


def zipf_counts(hosts: int, urls: int) -> list[int]:
    """URLs per host: host 0 holds 5%; the others at least one each plus a Zipf share (1/(k+10))."""
    hot = round(HOT_SHARE * urls)
    rest = urls - hot - (hosts - 1)
    weights = [1.0 / (k + 10) for k in range(1, hosts)]
    total = sum(weights)
    counts = [1 + int(rest * w / total) for w in weights]
    for k in range(urls - hot - sum(counts)):  # rounding: the remainder to the heaviest hosts
        counts[k % len(counts)] += 1
    return [hot, *counts]


def url_table(path: str, counts: list[int], kinds: list[str], port: int) -> None:
    """Every host's URLs (a tenth of a Disallow host's under /private/), shuffled by a fixed seed."""
    import random

    urls = []
    for i, n in enumerate(counts):
        for j in range(n):
            folder = "private" if kinds[i] == "disallow" and j % 10 == 9 else "img"
            urls.append(f"http://{host_address(i)}:{port}/{folder}/{i * 100_000 + j}.jpg")
    random.Random(0).shuffle(urls)
    pq.write_table(pa.table({"url": urls, "caption": [f"picture {i}" for i in range(len(urls))]}), path)


def control(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
        return json.loads(r.read())


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most requests whose arrival times fit in one window of `window` seconds."""
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def measure(seen: dict, kinds: list[str], hot: str | None) -> dict:
    times = {h: sorted(t) for h, t in seen["times"].items()}
    others = sorted(t for h, ts in times.items() if h != hot for t in ts)
    gaps = [b - a for h, ts in times.items() if h != hot and len(ts) > 1 for a, b in zip(ts, ts[1:])]
    delay_hosts = {host_address(i) for i, k in enumerate(kinds) if k == "crawl_delay"}
    delay_gaps = [b - a for h in delay_hosts for ts in [times.get(h, [])] for a, b in zip(ts, ts[1:])]
    out = {
        "requests": sum(len(t) for t in times.values()),
        "hosts_seen": len(times),
        "other_rate": rate(others),
        "other_last_s": others[-1] - others[0] if others else 0.0,
        "min_gap_s": min(gaps, default=0.0),
        "crawl_delay_min_gap_s": min(delay_gaps, default=0.0),
        "peak_tcp": max(seen["peak"].values(), default=0),
        "robots_max": max(seen["robots"].values(), default=0),
        "robots_total": sum(seen["robots"].values()),
        "forbidden_hits": sum(seen["forbidden"].values()),
    }
    if hot is not None:
        hot_times = times.get(hot, [])
        hot_gaps = [b - a for a, b in zip(hot_times, hot_times[1:])]
        out.update(hot_rate=rate(hot_times), hot_max_per_s=max_in_window(hot_times),
                   hot_min_gap_s=min(hot_gaps, default=0.0), hot_requests=len(hot_times))  # fmt: skip
    return out


def run_job(cluster: LocalRayCluster, urls: str, out: str, args: argparse.Namespace) -> dict:
    overrides = [
        f"urls={urls}", f"output={out}", "formats=[webdataset]", f"crawl.samples_per_shard={args.per_shard}",
        f"crawl.num_workers={args.cpus}", "crawl.num_cpus_per_worker=1", "crawl.shards_per_worker=4",
        "crawl.fetch.allowed_networks=[127.0.0.0/8]", "crawl.fetch.max_retries=0",
        f"crawl.fetch.per_host_rate={args.rate}", f"crawl.fetch.per_host_concurrency={args.concurrency}",
        "crawl.host_plan.spread=true", "crawl.image.image_size=64", "crawl.image.min_size=16",
    ]  # fmt: skip
    env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONPATH=ROOT)
    started = time.time()
    driver = subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs/build_wit.py"), *overrides], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    with ProcessMeter(lambda: cluster_pids(cluster) | tree(driver.pid)) as meter:
        output, _ = driver.communicate()
    if driver.returncode:
        raise RuntimeError(f"build_wit.py failed ({driver.returncode}):\n{output[-3000:]}")
    stats = read_json(os.path.join(out, "_stats.json"))
    return {"wall_s": time.time() - started, "cpu_s": meter.cpu_s, "elapsed_s": stats["run"]["elapsed_s"],
            "kept": stats["totals"]["kept"], "input": stats["totals"]["input"],
            "dropped": stats["totals"]["dropped"]}  # fmt: skip


def start_server(port: int, control_port: int, spec: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks/loopback_web.py"), str(port),
                               str(control_port), spec], env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
    if server.stdout.readline().strip() != "ready":
        raise RuntimeError("the loopback web did not start")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", type=int, default=4000)
    parser.add_argument("--urls", type=int, default=8000)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--per-shard", type=int, default=256)
    args = parser.parse_args()
    zipf = zipf_counts(args.hosts, args.urls)
    even = [args.urls // args.hosts + (i < args.urls % args.hosts) for i in range(args.hosts)]
    kinds = robots_kinds(args.hosts, tail_from=next(i for i, n in enumerate(zipf) if i and n <= 2))
    port, control_port = free_ports(2)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_crawl_hosts-") as tmp:
        spec = os.path.join(tmp, "spec.json")
        with open(spec, "w") as f:
            json.dump({"kinds": kinds}, f)
        server = start_server(port, control_port, spec)
        cluster = LocalRayCluster(num_cpus=args.cpus).start()
        try:
            for name, counts in (("even", even), ("zipf", zipf)):
                urls = os.path.join(tmp, f"{name}.parquet")
                url_table(urls, counts, kinds, port)
                control(control_port, "/reset")
                job = run_job(cluster, urls, os.path.join(tmp, name), args)
                seen = control(control_port, "/stats")
                results[name] = {**job, **measure(seen, kinds, host_address(0) if name == "zipf" else None)}
        finally:
            cluster.stop()
            server.terminate()
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(f"{args.hosts} hosts, {args.urls} URLs, per host {args.rate}/s and {args.concurrency} at once; "
          f"{args.cpus} CPUs; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
    rows = [("kept / input", lambda r: f"{r['kept']} / {r['input']}"), ("build s", "elapsed_s"),
            ("job wall s", "wall_s"), ("cluster CPU s", "cpu_s"), ("requests", "requests"),
            ("other hosts req/s", "other_rate"), ("other hosts last s", "other_last_s"),
            ("min gap s (others)", "min_gap_s"), ("Crawl-delay min gap s", "crawl_delay_min_gap_s"),
            ("peak TCP per host", "peak_tcp"), ("robots.txt max/host", "robots_max"),
            ("robots.txt fetches", "robots_total"), ("forbidden hits", "forbidden_hits"),
            ("hot req/s", "hot_rate"), ("hot max in 1 s", "hot_max_per_s"), ("hot min gap s", "hot_min_gap_s")]  # fmt: skip
    print(f"{'':24}{'even':>14}{'zipf':>14}")
    for label, key in rows:
        cells = []
        for name in ("even", "zipf"):
            r = results[name]
            value = key(r) if callable(key) else r.get(key, "")
            cells.append(f"{value:>14.3f}" if isinstance(value, float) else f"{value!s:>14}")
        print(f"{label:24}{''.join(cells)}")
    for name in ("even", "zipf"):
        print(f"{name} dropped: {results[name]['dropped']}")
    zipf, even = results["zipf"], results["even"]
    print(json.dumps({
        "other_hosts_ratio": round(zipf["other_rate"] / even["other_rate"], 3) if even["other_rate"] else None,
        "hot_rate": round(zipf["hot_rate"], 3),
        "hot_max_per_s": zipf["hot_max_per_s"],
        "peak_tcp_per_host": max(zipf["peak_tcp"], even["peak_tcp"]),
        "robots_per_host_max": max(zipf["robots_max"], even["robots_max"]),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
