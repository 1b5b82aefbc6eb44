"""Per-host budgets for the whole crawl: concurrency, request rate, back-off and robots.txt, per site.

Why a budget service and not a plan that routes each host's URLs to one worker: a shard is a slice of
the curated plan, and the worker that crawls a shard writes it. Routing by host would either scatter
a shard's rows over many workers (so no worker could write it) or make one shard per host (one huge
shard for a popular host, millions of tiny ones for the tail, and a shard order that no longer
follows the plan). A service keeps shards as they are and only decides *when* a request may start.

So each site (scheme://host:port) has one owner: `HostBudget` shard `crc32(site) % budget_shards`,
an async Ray actor named after the crawl's `budget_scope` and a digest of its rules. The build's driver
creates them (`hold_budget_actors`), so they live as long as the crawl whatever worker dies; a worker
finds them by name (`get_if_exists`: a crawl stage used without a build makes them itself). Before each request a worker
awaits `acquire(site, url)`; the answer is a `Grant`:
- "go" after `delay_s`: the request may start (a concurrency lease is held until `release`, and the
  start time is spaced by the site's rate, capped by its robots.txt Crawl-delay);
- "robots": this worker fetches the site's robots.txt (once for the whole crawl, per TTL) and hands
  the answer back with `put_robots`; the others wait for it;
- "drop" with a reason: robots.txt disallows the URL, robots.txt is unreachable for now, or the site
  is deferred (it asked for a Retry-After longer than we wait, or its next free slot is further away
  than `max_wait_s`). Deferral reasons are transient: the retry pass fetches those URLs later, and
  the worker's slot is free at once (no worker ever sleeps on one host for minutes).
`release(site, lease, status, retry_after)` is fire-and-forget: it frees the lease and backs the site
off alone on 429/503 (Retry-After, else exponential). A lease whose worker died expires after
`lease_s`. Without Ray (unit tests, one process) the same class runs in-process.

Memory: per-site state lives in an LRU of `max_hosts` sites per shard (robots.txt policies
included); an evicted idle site is simply asked for its robots.txt again if it comes back. More shards
= more cache and more acquire throughput; the shard count is part of the budget's identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.crawl.robots import RobotsPolicy, policy_from_response

HOST_DEFERRED = "host_deferred"
# How long a request waits for a budget actor that is being restarted (its node died) or made again.
ACTOR_WAIT_S = 60.0
BACKOFF_STATUS = frozenset({429, 503})


@dataclass(frozen=True)
class HostRules:
    """The budget every site gets (filled from `FetchConfig`)."""

    concurrency: int = 4  # requests in flight per site, whole crawl
    rate: float = 10.0  # request starts per second per site, whole crawl (0: no limit)
    max_wait_s: float = 60.0  # a URL whose site has no slot sooner is deferred, not waited for
    max_retry_after_s: float = 30.0  # a longer Retry-After defers the site for that long
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    lease_s: float = 60.0  # a lease not released by then (its worker died) is reclaimed
    robots: bool = True
    robots_token: str = "clip-wit-ray"
    robots_ttl_s: float = 86_400.0  # RFC 9309: a cached robots.txt should not be used for more than 24 h
    robots_retry_s: float = 300.0  # an unreachable robots.txt is asked again after this long
    max_hosts: int = 100_000  # sites remembered per budget shard (LRU)
    shards: int = 4
    scope: str = "crawl"

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Grant:
    action: str  # "go", "robots" (fetch robots.txt, then put_robots) or "drop"
    delay_s: float = 0.0
    lease: int = 0
    reason: str | None = None


@dataclass
class SiteState:
    leases: dict[int, float] = field(default_factory=dict)  # lease id -> expiry (monotonic)
    next_start: float = 0.0
    paused_until: float = 0.0
    deferred_until: float = 0.0
    failures: int = 0  # consecutive 429/503 answers
    robots: RobotsPolicy | None = None
    robots_expires: float = 0.0
    robots_lease: int = 0  # the lease of the worker fetching robots.txt now (0: none)
    # Set (and replaced) whenever a lease or robots.txt changes, to wake the waiting acquires.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def live_leases(self, now: float) -> int:
        for lease in [k for k, expiry in self.leases.items() if expiry < now]:
            del self.leases[lease]
            if lease == self.robots_lease:
                self.robots_lease = 0
        return len(self.leases)

    @property
    def idle(self) -> bool:
        return not self.leases


class HostBudget:
    """The budgets of the sites of one shard. Used as a Ray async actor or in-process."""

    def __init__(self, rules: HostRules):
        self.rules = rules
        self.sites: OrderedDict[str, SiteState] = OrderedDict()
        # Lease ids from the clock, so a release meant for a restarted actor's predecessor frees nothing.
        self.next_lease = time.time_ns()

    async def acquire(self, site: str, url: str) -> Grant:
        state = self._state(site)
        waited_until = time.monotonic() + self.rules.max_wait_s
        while True:
            now = time.monotonic()
            grant = self._decide(state, url, now)
            if grant is not None:
                return grant
            if now >= waited_until:
                return Grant("drop", reason=HOST_DEFERRED)
            expiry = min(state.leases.values(), default=now + 1.0)  # a dead worker's lease ends then
            await self._wait(state, max(0.01, min(1.0, waited_until - now, expiry - now)))

    async def acquire_many(
        self, requests: list[tuple[str, str]], releases: list[tuple] = ()
    ) -> list[Grant | None]:
        """Batched: first `releases` (argument tuples of `release`), then a grant for each request that
        can be decided now; None for one that must wait (the caller then awaits `acquire`)."""
        self.release_many(releases)
        now = time.monotonic()
        return [self._decide(self._state(site), url, now) for site, url in requests]

    def release_many(self, releases: list[tuple]) -> None:
        for args in releases:
            self._release(*args)

    async def release(self, site: str, lease: int, status: int | None = None,
                      retry_after: float | None = None) -> None:  # fmt: skip
        self._release(site, lease, status, retry_after)

    async def put_robots(self, site: str, lease: int, status: int | None, body: bytes | None,
                         error: str | None = None) -> None:  # fmt: skip
        """The answer to the robots.txt fetch that `acquire` asked for with `lease`."""
        state = self._state(site)
        policy = policy_from_response(status, body, error)
        state.robots = policy
        ttl = self.rules.robots_retry_s if policy.drop_reason else self.rules.robots_ttl_s
        state.robots_expires = time.monotonic() + ttl
        if state.robots_lease == lease:
            state.robots_lease = 0
        self._release(site, lease, status if status in BACKOFF_STATUS else None)

    def _release(self, site: str, lease: int, status: int | None, retry_after: float | None = None) -> None:
        state = self._state(site)
        state.leases.pop(lease, None)
        now = time.monotonic()
        if status in BACKOFF_STATUS:
            state.failures += 1
            pause = retry_after
            if pause is None:
                pause = min(self.rules.backoff_max_s, self.rules.backoff_base_s * 2 ** (state.failures - 1))
            if pause > self.rules.max_retry_after_s:
                state.deferred_until = max(state.deferred_until, now + pause)
            else:
                state.paused_until = max(state.paused_until, now + pause)
        elif status is not None and status < 500:
            state.failures = 0
        state.notify()

    # ------------------------------------------------------------ internals

    def _decide(self, state: SiteState, url: str, now: float) -> Grant | None:
        """A grant now, or None to wait for a change (a released lease or robots.txt)."""
        active = state.live_leases(now)
        if state.deferred_until > now:
            return Grant("drop", reason=HOST_DEFERRED)
        need_robots = False
        if self.rules.robots:
            if state.robots is not None and state.robots_expires > now:
                refusal = state.robots.refusal(url, self.rules.robots_token)
                if refusal is not None:
                    return Grant("drop", reason=refusal)
            elif state.robots_lease:
                return None  # another worker is fetching robots.txt
            else:
                need_robots = True
        if active >= max(1, self.rules.concurrency):
            return None
        start = max(now, state.next_start, state.paused_until)
        if start - now > self.rules.max_wait_s:
            return Grant("drop", reason=HOST_DEFERRED)
        state.next_start = start + self._interval(state)
        lease = self.next_lease
        self.next_lease += 1
        state.leases[lease] = start + self.rules.lease_s
        if need_robots:
            state.robots_lease = lease
            return Grant("robots", start - now, lease)
        return Grant("go", start - now, lease)

    def _interval(self, state: SiteState) -> float:
        interval = 1.0 / self.rules.rate if self.rules.rate > 0 else 0.0
        if state.robots is not None:  # Crawl-delay caps the rate further, never raises it
            interval = max(interval, state.robots.crawl_delay(self.rules.robots_token))
        return interval

    def _state(self, site: str) -> SiteState:
        state = self.sites.get(site)
        if state is None:
            state = self.sites[site] = SiteState()
            self._evict()
        else:
            self.sites.move_to_end(site)
        return state

    def _evict(self) -> None:
        excess = len(self.sites) - self.rules.max_hosts
        for site in list(self.sites)[: max(0, excess) * 2]:
            if excess <= 0:
                break
            if self.sites[site].idle:
                del self.sites[site]
                excess -= 1

    @staticmethod
    async def _wait(state: SiteState, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.changed.wait(), timeout)


def shard_of(site: str, shards: int) -> int:
    """Stable across processes (Python's hash() is salted per process)."""
    return zlib.crc32(site.encode()) % max(1, shards)


@dataclass
class Batch:
    """Requests and releases on their way to one budget shard in the next call."""

    requests: list[tuple[str, str]] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    releases: list[tuple] = field(default_factory=list)


class BudgetClient:
    """A worker's way to the host budgets: Ray actors when running under Ray, else one in-process budget.

    `mode`: "cluster" (Ray actors, created on first use), "local" (in-process), or "auto" (cluster
    when Ray is initialised, as in every Ray worker). In cluster mode acquires and releases go to each
    budget shard in batches (`acquire_many`), one call in flight per shard at a time: a busy
    worker pays one actor call per batch instead of two per request; an acquire that must wait
    (site at its concurrency limit, robots.txt being fetched) follows up with a blocking `acquire`.
    """

    def __init__(self, rules: HostRules, mode: str = "auto"):
        self.rules = rules
        self.mode = mode
        self.local: HostBudget | None = None
        self.actors: dict[int, Any] = {}
        self.batches: dict[int, Batch] = {}
        self.busy: set[int] = set()  # shards with a batched call in flight
        self.calls: set[asyncio.Task] = set()  # those calls' tasks (kept from the GC)

    @property
    def clustered(self) -> bool:
        if self.mode == "auto":
            import ray

            return ray.is_initialized()
        return self.mode == "cluster"

    async def acquire(self, site: str, url: str) -> Grant:
        if not self.clustered:
            return await self._local().acquire(site, url)
        index = shard_of(site, self.rules.shards)
        future = asyncio.get_running_loop().create_future()
        batch = self._batch(index)
        batch.requests.append((site, url))
        batch.futures.append(future)
        try:
            grant = await future
        except (
            Exception
        ):  # the batched call failed (its actor died): asked again directly, which waits it out
            grant = None
        if grant is None:
            grant = await self._call(index, "acquire", site, url)
        return grant

    async def release(self, site: str, lease: int, status: int | None = None,
                      retry_after: float | None = None) -> None:  # fmt: skip
        if not self.clustered:
            await self._local().release(site, lease, status, retry_after)
        else:  # sent with the next batch; a lost release only expires later (lease_s)
            self._batch(shard_of(site, self.rules.shards)).releases.append((site, lease, status, retry_after))

    async def put_robots(self, site: str, lease: int, status: int | None, body: bytes | None,
                         error: str | None) -> None:  # fmt: skip
        if not self.clustered:
            await self._local().put_robots(site, lease, status, body, error)
        else:
            await self._call(
                shard_of(site, self.rules.shards), "put_robots", site, lease, status, body, error
            )

    async def drain(self) -> None:
        """Sends every queued release and waits for the calls in flight (end of a batch, close)."""
        while self.batches or self.calls:
            for index in [i for i in self.batches if i not in self.busy]:
                self._flush(index)
            if self.calls:
                await asyncio.wait(list(self.calls), timeout=10)
            else:
                await asyncio.sleep(0)

    def _batch(self, index: int) -> Batch:
        batch = self.batches.get(index)
        if batch is None:
            batch = self.batches[index] = Batch()
            if index not in self.busy:
                asyncio.get_running_loop().call_soon(self._flush, index)
        return batch

    def _flush(self, index: int) -> None:
        """Sends shard `index` its batch. One call per shard at a time: what arrives meanwhile waits
        for the answer and goes as the next batch, so batches grow with the load (Nagle's rule)."""
        batch = self.batches.pop(index, None)
        if batch is None:
            return
        try:
            ref = self._actor(index).acquire_many.remote(batch.requests, batch.releases)
        except Exception as e:
            self.actors.pop(index, None)
            for future in batch.futures:
                future.set_exception(e)
            return
        self.busy.add(index)
        task = asyncio.ensure_future(self._deliver(index, ref, batch.futures))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)

    async def _deliver(self, index: int, ref: Any, futures: list[asyncio.Future]) -> None:
        try:
            grants = await ref
        except Exception as e:
            self.actors.pop(index, None)
            grants = [e] * len(futures)
        finally:
            self.busy.discard(index)
            if index in self.batches:
                self._flush(index)
        for future, grant in zip(futures, grants):
            if future.done():
                continue
            if isinstance(grant, Exception):
                future.set_exception(grant)
            else:
                future.set_result(grant)

    async def _call(self, index: int, method: str, *args: Any) -> Any:
        """A direct call to budget shard `index`. Its actor may have gone with its node (Ray restarts it
        elsewhere while its owner lives; it is unavailable meanwhile) or with the worker that made it (made
        again here): either is waited out, up to `ACTOR_WAIT_S`, rather than failing the URL."""
        from ray.exceptions import RayActorError

        deadline, delay = time.monotonic() + ACTOR_WAIT_S, 0.1
        while True:
            try:
                return await getattr(self._actor(index), method).remote(*args)
            except RayActorError:
                if time.monotonic() + delay > deadline:
                    raise
                self.actors.pop(index, None)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    def _local(self) -> HostBudget:
        if self.local is None:
            self.local = HostBudget(self.rules)
        return self.local

    def _actor(self, index: int) -> Any:
        actor = self.actors.get(index)
        if actor is None:
            actor = self.actors[index] = budget_actor(self.rules, index)
        return actor


def budget_actor(rules: HostRules, index: int) -> Any:
    """Budget shard `index` of the crawl `rules.scope` (created if no worker made it yet)."""
    import ray

    remote = ray.remote(HostBudget)
    return remote.options(
        name=f"host-budget-{rules.scope}-{rules.digest()}-{index}",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=100_000,  # every waiting acquire is one coroutine
        max_restarts=-1,
    ).remote(rules)


def hold_budget_actors(rules: HostRules) -> list[Any]:
    """Every budget shard of `rules`, created (or found) by the caller, which then owns them: the build's
    driver calls this so that a worker's death (which ends the actors that worker created) never takes
    a site's leases, back-off and robots.txt with it. Keep the list for as long as the crawl runs."""
    return [budget_actor(rules, index) for index in range(rules.shards)]
