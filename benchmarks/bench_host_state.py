"""Per-host state at web scale, without a network: `--hosts` hosts (default 10^6) with 1-3 URLs each
through the host budget service (hosts.py: Ray actors, O(1) decisions) and its robots.txt store
(hoststore.py: answers kept for the whole crawl, persisted as Parquet under `_hosts/`).

The driver plays the crawl's workers: per host, its first URL is answered "robots" (fetch robots.txt),
the driver hands back a robots.txt answer (404, allow-all or a Disallow, by host), then every URL of the
host is asked again and released. Hosts are generated as a stream (the driver never holds them all), so
its RSS must stay flat from 10^4 to 10^6 hosts. Then every budget actor is replaced (a restart, a resumed
build or its retry pass) and a sample of hosts is asked again: their robots.txt must come from the store.
Printed: per-actor decisions per second (time inside the actor's decisions) and end to end, the actors'
peak RSS per host, driver RSS at 10^4 / 10^5 / 10^6 hosts, robots.txt fetches (must equal the hosts), and
one JSON line with `hosts`, `robots_fetches`, `decisions_per_s`, `driver_rss_mb`.

Then the statistics: the build's real statistics step (per-domain / per-query counts aggregated from the
shard sidecars into Parquet, `benchmarks/host_stats_scale.py`'s `measure_stats`) over a synthetic crawl of
the same number of hosts: its driver RSS, time and `_stats.json` size (`--no-stats` skips it).

    python benchmarks/bench_host_state.py [--hosts 1000000] [--actors 2] [--batch 5000]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator

import _ray_setup  # noqa: F401  (repository on sys.path, loopback Ray env)
import ray

from pipelines.crawl.hosts import HostRules, budget_actor, shard_of

# Not a dependency of ours: Ray ships one, on sys.path once ray is imported.
psutil = importlib.import_module("psutil")

ROBOTS = [(404, b""), (200, b"User-agent: *\nAllow: /\n"), (200, b"User-agent: *\nDisallow: /private/\n")]


def hosts_stream(n: int, seed: int = 0) -> Iterator[tuple[str, int]]:
    """(site, URLs on it: 1-3) for n hosts, generated as they are needed."""
    rng = random.Random(seed)
    for i in range(n):
        yield f"http://h{i}.example:80", rng.randint(1, 3)


def driver_rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class Driver:
    """Batches of requests per budget actor, sent when full (what a worker's BudgetClient does)."""

    def __init__(self, actors: list, rules: HostRules, batch: int):
        self.actors, self.rules, self.batch = actors, rules, batch
        self.requests: list[list[tuple]] = [[] for _ in actors]
        self.robots_fetches = self.decisions = 0

    def host(self, site: str, urls: int, index: int) -> None:
        shard = shard_of(site, self.rules.shards)
        self.requests[shard].append((site, urls, index))
        if len(self.requests[shard]) >= self.batch:
            self.flush(shard)

    def flush(self, shard: int) -> None:
        """One round per batch: ask each host's first URL (robots), answer, then ask and release all URLs."""
        hosts, self.requests[shard] = self.requests[shard], []
        if not hosts:
            return
        actor = self.actors[shard]
        first = ray.get(actor.acquire_many.remote([(s, f"{s}/0.jpg", 1.0) for s, _, _ in hosts]))
        answers = []
        for (site, _, index), grant in zip(hosts, first):
            if grant.action == "robots":
                self.robots_fetches += 1
                answers.append((site, grant.lease, *ROBOTS[index % len(ROBOTS)], None))
        ray.get(actor.put_robots_many.remote(answers))
        asks = [(s, f"{s}/{j}.jpg", 1.0) for s, n, _ in hosts for j in range(n)]
        grants = ray.get(actor.acquire_many.remote(asks))
        releases = [(s, g.lease, 200, None) for (s, _, _), g in zip(asks, grants) if g.action == "go"]
        ray.get(
            actor.acquire_many.remote([], releases)
        )  # the releases, as a worker's next batch carries them
        self.decisions += len(first) + len(asks)

    def flush_all(self) -> None:
        for shard in range(len(self.actors)):
            self.flush(shard)


def statistics(hosts: int) -> dict:
    """The statistics step over a synthetic crawl of `hosts` hosts (host_stats_scale.measure_stats)."""
    from host_stats_scale import measure_stats

    with tempfile.TemporaryDirectory(prefix="bench_host_state-stats-") as out:
        return measure_stats(hosts, out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", type=int, default=1_000_000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--sample", type=int, default=10_000, help="hosts asked again after the restart")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-stats", action="store_true", help="skip the statistics step")
    args = parser.parse_args()
    _ray_setup.start_ray(args.cpus)
    with tempfile.TemporaryDirectory(prefix="bench_host_state-") as tmp:
        rules = HostRules(concurrency=4, rate=0, robots=True, shards=args.actors, scope="bench-host-state",
                          store=os.path.join(tmp, "_hosts"), max_hosts=100_000)  # fmt: skip
        actors = [budget_actor(rules, i) for i in range(args.actors)]
        before = ray.get([a.stats.remote() for a in actors])
        driver = Driver(actors, rules, args.batch)
        checkpoints = {10**k for k in range(4, 8) if 10**k <= args.hosts} | {args.hosts}
        rss: dict[int, float] = {}
        started = time.perf_counter()
        for i, (site, urls) in enumerate(hosts_stream(args.hosts), start=1):
            driver.host(site, urls, i)
            if i in checkpoints:
                driver.flush_all()
                rss[i] = driver_rss_mb()
        wall = time.perf_counter() - started
        ray.get([a.flush.remote() for a in actors])
        after = ray.get([a.stats.remote() for a in actors])
        files = len(os.listdir(os.path.join(tmp, "_hosts")))
        for actor in actors:  # a restart / a resumed build / the retry pass: fresh actors, same store
            ray.kill(actor)
        time.sleep(1)
        fresh = [budget_actor(rules, i) for i in range(args.actors)]
        load_started = time.perf_counter()
        ray.get([a.stats.remote() for a in fresh])
        sample = [
            s
            for i, (s, _) in enumerate(hosts_stream(args.hosts))
            if i % max(1, args.hosts // args.sample) == 0
        ]
        again = 0
        for shard, actor in enumerate(fresh):
            asks = [(s, f"{s}/0.jpg", 1.0) for s in sample if shard_of(s, rules.shards) == shard]
            grants = ray.get(actor.acquire_many.remote(asks)) if asks else []
            again += sum(g.action == "robots" for g in grants)
        reload_s = time.perf_counter() - load_started
        stored = ray.get([a.stats.remote() for a in fresh])
        for actor in fresh:
            ray.kill(actor)
    stats = {} if args.no_stats else statistics(args.hosts)
    ray.shutdown()
    report(args, driver, before, after, stored, rss, wall, files, again, len(sample), reload_s, stats)


def report(args, driver, before, after, stored, rss, wall, files, again, sampled, reload_s, stats) -> None:
    load = os.getloadavg()
    print(f"{args.hosts:,} hosts, {args.actors} budget actors, batches of {args.batch}; {args.cpus} CPUs; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
    print(f"{'actor':>6} {'decisions':>11} {'busy s':>8} {'decisions/s':>12} {'robots kept':>12} {'peak RSS MB':>12} "
          f"{'bytes/host':>11}")  # fmt: skip
    per_actor = []
    for i, (b, a) in enumerate(zip(before, after)):
        rate = a["decisions"] / a["busy_s"] if a["busy_s"] else 0.0
        per_host = (a["max_rss_mb"] - b["max_rss_mb"]) * 2**20 / max(1, a["robots"])
        per_actor.append(rate)
        print(f"{i:>6} {a['decisions']:>11,} {a['busy_s']:>8.1f} {rate:>12,.0f} {a['robots']:>12,} "
              f"{a['max_rss_mb']:>12.0f} {per_host:>11.0f}")  # fmt: skip
    print(f"end to end: {driver.decisions:,} decisions in {wall:.1f} s = {driver.decisions / wall:,.0f}/s "
          f"(driver, Ray calls and all actors together)")  # fmt: skip
    print(
        f"robots.txt fetches: {driver.robots_fetches:,} for {args.hosts:,} hosts; store: {files} Parquet files"
    )
    print(
        f"after replacing every actor: {again} of {sampled:,} sampled hosts asked for robots.txt again "
        f"(store read back in {reload_s:.1f} s; {sum(s['robots'] for s in stored):,} answers loaded)"
    )
    print("driver RSS MB: " + ", ".join(f"{n:,} hosts {mb:.0f}" for n, mb in sorted(rss.items())))
    if stats:
        print(f"statistics step over {stats['hosts']:,} hosts ({stats['rows']:,} rows, {stats['shards']:,} shards, "
              f"{stats['path']}): driver RSS {stats['driver_rss_before_mb']:.0f} -> peak {stats['driver_rss_mb']:.0f} MB, "
              f"{stats['seconds']:.1f} s, {stats['domains']:,} domains and {stats['queries']:,} queries as Parquet, "
              f"_stats.json {stats['stats_json_bytes']:,} bytes")  # fmt: skip
    print(json.dumps({
        "hosts": args.hosts,
        "robots_fetches": driver.robots_fetches + again,
        "decisions_per_s": round(min(per_actor), 0) if per_actor else 0,
        "driver_rss_mb": [round(mb, 1) for _, mb in sorted(rss.items())],
        **({"stats_driver_rss_mb": stats["driver_rss_mb"]} if stats else {}),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
