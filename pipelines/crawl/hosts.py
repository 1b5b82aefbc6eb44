"""Per-host budgets for the whole crawl: concurrency, request rate, back-off and robots.txt, per site.

Why a budget service and not a plan that routes each host's URLs to one worker: a shard is a slice of
the crawl plan, and the worker that crawls a shard writes it. Routing by host would either scatter a
shard's rows over many workers (so no worker could write it) or make one shard per host. A service keeps
shards as they are and only decides *when* a request may start; the plan (hostplan.py) spreads each
host's URLs over the crawl so that what a shard asks of a host fits the host's budget.

So each site (scheme://host:port) has one owner: `HostBudget` shard `crc32(site) % shards`, an async Ray
actor named after the crawl's `budget_scope` and a digest of its rules. The build's driver creates them
(`hold_budget_actors`: their number derived from the crawl's workers, placed on crawl nodes), so they live
as long as the crawl whatever worker dies; a worker finds them by name (`get_if_exists`). A worker asks
`acquire(site, url)` and never waits inside the actor; the answer is a `Grant`:
- "go": the request may start at `start_at` (wall clock, at most `lead` ahead, the worker's round trip
  to this actor: the worker sleeps until then, so starts are spaced as the server sees them); a concurrency lease is held until `release`, and
  the site's next start is `next_s` from now;
- "wait": not before `delay_s` from now (the site is at its concurrency limit, another worker is
  fetching its robots.txt, or its next start is further than `lead` away). The worker's frontier
  (frontier.py) serves other hosts meanwhile;
- "robots": this worker fetches the site's robots.txt (once for the whole crawl) and hands the answer
  back with `put_robots`;
- "drop" with a reason: robots.txt disallows the URL, robots.txt is unreachable for now, or the site
  is deferred (a Retry-After longer than we wait, or no start within `max_wait_s`). Deferral reasons are
  transient: the retry pass fetches those URLs later.
`release(site, lease, status, retry_after)` is fire-and-forget: it frees the lease and backs the site
off alone on 429/503 (Retry-After, else exponential). A lease whose worker died expires after `lease_s`.
Without Ray (unit tests, one process) the same class runs in-process.

Cost and memory: every call is O(1) per request (a dict lookup; no scan, no waiter to wake). Rate and
lease state lives in an LRU of `max_hosts` sites per shard (an evicted idle site only forgets when it
may start next, at least one interval ago); robots.txt answers live in the shard's `RobotsStore`
(hoststore.py), never evicted and persisted under the output's `_hosts/`, so a site's robots.txt is
fetched once for the whole crawl, its resumes and its retry pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipelines.crawl.hoststore import RobotsStore, write_table
from pipelines.crawl.robots import RobotsPolicy

log = logging.getLogger(__name__)
HOST_DEFERRED = "host_deferred"
# How long a request waits for a budget actor that is being restarted (its node died) or made again.
ACTOR_WAIT_S = 60.0
BACKOFF_STATUS = frozenset({429, 503})
# A "go" is given at most `lead` before its start, the asking worker's round trip to the budget (at least
# LEAD_S, at most MAX_LEAD_S): the answer reaches the worker in time, and its in-flight slot is reserved
# no longer before its request starts than the answer took to come anyway.
LEAD_S = 0.05
MAX_LEAD_S = 1.0
# Starts are spaced by the interval plus this fraction of it, so that the jitter between the grant's start
# and the request reaching the server never brings two starts closer than 1/rate.
SPACING_MARGIN = 0.03
MIN_SLACK_S = 0.002  # at high rates the margin is below any clock's jitter: a late start may be this late
POLL_S = 0.05  # the shortest "wait" (concurrency full, robots.txt being fetched elsewhere)
# Budget actors per shard worker when their number is derived from the pool (`budget_shards: 0`).
WORKERS_PER_BUDGET = 8


@dataclass(frozen=True)
class HostRules:
    """The budget every site gets (filled from `FetchConfig`)."""

    concurrency: int = 4  # requests in flight per site, whole crawl
    rate: float = 10.0  # request starts per second per site, whole crawl (0: no limit)
    max_wait_s: float = 60.0  # a URL whose site has no start sooner is deferred, not waited for
    max_retry_after_s: float = 30.0  # a longer Retry-After defers the site for that long
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    lease_s: float = 60.0  # a lease not released by then (its worker died) is reclaimed
    robots: bool = True
    robots_token: str = "clip-wit-ray"
    robots_ttl_s: float = 86_400.0  # RFC 9309: a cached robots.txt should not be used for more than 24 h
    robots_retry_s: float = 300.0  # an unreachable robots.txt is asked again after this long
    max_hosts: int = 100_000  # sites whose rate state is remembered per budget shard (LRU)
    shards: int = 4
    scope: str = "crawl"
    store: str = ""  # the robots.txt store's folder (`{output}/_hosts`); empty: in memory only
    resources: tuple[tuple[str, float], ...] = ()  # custom resources the actors ask for (crawl nodes)

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def budget_shards_for(workers: int) -> int:
    """Budget actors for a pool of `workers` shard workers (one per `WORKERS_PER_BUDGET`, at least one)."""
    return max(1, math.ceil(workers / WORKERS_PER_BUDGET))


@dataclass
class Grant:
    action: str  # "go", "wait", "robots" (fetch robots.txt, then put_robots) or "drop"
    delay_s: float = 0.0  # wait: ask again after this long; go/robots: the start is this far ahead
    lease: int = 0
    reason: str | None = None
    start_at: float = 0.0  # go/robots: wall-clock time the request may start
    next_s: float = 0.0  # go/robots: from now until the site's next start
    # go: how late after `start_at` the request may still start; a later one would come closer than 1/rate
    # to the next grant's request, so it gives the grant back instead (the spacing margin; inf: no rate).
    slack_s: float = math.inf


@dataclass
class SiteState:
    leases: dict[int, float] = field(default_factory=dict)  # lease id -> expiry (wall clock)
    next_start: float = 0.0
    paused_until: float = 0.0
    deferred_until: float = 0.0
    failures: int = 0  # consecutive 429/503 answers
    robots_lease: int = 0  # the lease of the worker fetching robots.txt now (0: none)

    def live_leases(self, now: float) -> int:
        """Leases held now (at most `concurrency` entries: expired ones are dropped here)."""
        for lease in [k for k, expiry in self.leases.items() if expiry < now]:
            del self.leases[lease]
            if lease == self.robots_lease:
                self.robots_lease = 0
        return len(self.leases)

    def forgettable(self, now: float) -> bool:
        return not self.leases and max(self.paused_until, self.deferred_until) < now


class HostBudget:
    """The budgets of the sites of one shard. Used as a Ray async actor or in-process."""

    def __init__(self, rules: HostRules, index: int = 0):
        self.rules = rules
        self.index = index
        self.sites: OrderedDict[str, SiteState] = OrderedDict()
        self.robots = RobotsStore(rules.store, rules.shards, index, rules.max_hosts)
        self.loaded: asyncio.Future | None = None
        self.decisions = 0
        self.busy_s = 0.0  # time spent deciding (for the decisions-per-second figure)
        # Lease ids from the clock, so a release meant for a restarted actor's predecessor frees nothing.
        self.next_lease = time.time_ns()

    async def acquire(self, site: str, url: str, lead: float = LEAD_S) -> Grant:
        return (await self.acquire_many([(site, url, lead)]))[0]

    async def acquire_many(
        self, requests: list[tuple[str, str, float]], releases: list[tuple] = ()
    ) -> list[Grant]:
        """Batched: first `releases` (argument tuples of `release`), then a grant for each (site, url, lead)."""
        await self._load()
        began = time.perf_counter()
        self.release_many(releases)
        now = time.time()
        grants = [self._decide(site, url, now, lead) for site, url, lead in requests]
        self.decisions += len(grants)
        self.busy_s += time.perf_counter() - began
        await self._flush()
        return grants

    def release_many(self, releases: list[tuple]) -> None:
        for args in releases:
            self._release(*args)

    async def release(self, site: str, lease: int, status: int | None = None, retry_after: float | None = None,
                      started: float | None = None) -> None:  # fmt: skip
        self._release(site, lease, status, retry_after, started)

    async def put_robots(self, site: str, lease: int, status: int | None, body: bytes | None,
                         error: str | None = None, started: float | None = None) -> None:  # fmt: skip
        """The answer to the robots.txt fetch that `acquire` asked for with `lease` (sent at `started`)."""
        await self.put_robots_many([(site, lease, status, body, error, started)])

    async def put_robots_many(self, answers: list[tuple]) -> None:
        """Batched `put_robots` (argument tuples)."""
        await self._load()
        for args in answers:
            self._put_robots(*args)
        await self._flush()

    def _put_robots(self, site: str, lease: int, status: int | None, body: bytes | None, error: str | None,
                    started: float | None = None) -> None:  # fmt: skip
        self.robots.put(site, status, body, error)
        state = self._state(site)
        if state.robots_lease == lease:
            state.robots_lease = 0
        if started is None:  # when the robots.txt request was sent: at the latest, when its lease began
            started = state.leases.get(lease, time.time() + self.rules.lease_s) - self.rules.lease_s
        self._release(site, lease, status if status in BACKOFF_STATUS else None, None, started)

    def stats(self) -> dict[str, Any]:
        """Counts and costs of this shard: sites, robots.txt answers, decisions and their time, peak RSS."""
        import resource

        return {"sites": len(self.sites), "robots": len(self.robots.answers), "decisions": self.decisions,
                "busy_s": self.busy_s, "robots_files": self.robots.files_written,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip

    async def flush(self) -> None:
        """Write the pending robots.txt answers now (the end of a crawl)."""
        await self._flush(force=True)

    def _release(self, site: str, lease: int, status: int | None, retry_after: float | None = None,
                 started: float | None = None) -> None:  # fmt: skip
        state = self._state(site)
        expiry = state.leases.pop(lease, None)
        now = time.time()
        interval = self._interval(self._policy(site, now))
        if started is not None:  # the request went out late: the next starts count from when it did
            state.next_start = max(state.next_start, started + interval)
        elif expiry is not None and status is None:
            # Never sent (given back, or its caller went away): if no start was granted after it, the
            # next may come when it would have (no request went out then, so the spacing still holds).
            began = expiry - self.rules.lease_s
            if abs(state.next_start - (began + interval)) < 1e-6:
                state.next_start = began
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

    # ------------------------------------------------------------ internals

    def _decide(self, site: str, url: str, now: float, lead: float = LEAD_S) -> Grant:
        state = self._state(site)
        active = state.live_leases(now)
        if state.deferred_until > now:
            return Grant("drop", reason=HOST_DEFERRED)
        policy, need_robots = None, False
        if self.rules.robots:
            policy = self._policy(site, now)
            if policy is not None:
                refusal = policy.refusal(url, self.rules.robots_token)
                if refusal is not None:
                    return Grant("drop", reason=refusal)
            elif state.robots_lease:
                return Grant("wait", max(POLL_S, self._interval(None)))  # another worker is fetching it
            else:
                need_robots = True
        interval = self._interval(policy)
        if active >= max(1, self.rules.concurrency):  # asked again soon (another worker's lease may end)
            return Grant("wait", POLL_S)
        start = max(now, state.next_start, state.paused_until)
        if start - now > self.rules.max_wait_s:
            return Grant("drop", reason=HOST_DEFERRED)
        lead = min(MAX_LEAD_S, max(LEAD_S, lead))
        if interval > 0:  # a spaced start is set far enough ahead for the answer to arrive before it
            start = max(start, now + lead / 2)
        if start - now > lead:
            return Grant("wait", start - now - lead)
        state.next_start = start + interval
        lease = self.next_lease
        self.next_lease += 1
        state.leases[lease] = start + self.rules.lease_s
        if need_robots:
            state.robots_lease = lease
        action = "robots" if need_robots else "go"
        slack = (
            max(MIN_SLACK_S, interval * SPACING_MARGIN / (1.0 + SPACING_MARGIN)) if interval > 0 else math.inf
        )
        return Grant(action, start - now, lease, start_at=start, next_s=state.next_start - now, slack_s=slack)

    def _policy(self, site: str, now: float) -> RobotsPolicy | None:
        """The site's robots.txt policy while it is fresh, else None (to be fetched)."""
        known = self.robots.get(site)
        if known is None:
            return None
        policy, fetched_at = known
        ttl = self.rules.robots_retry_s if policy.drop_reason else self.rules.robots_ttl_s
        return policy if fetched_at + ttl > now else None

    def _interval(self, policy: RobotsPolicy | None) -> float:
        interval = 1.0 / self.rules.rate if self.rules.rate > 0 else 0.0
        if policy is not None:  # Crawl-delay caps the rate further, never raises it
            interval = max(interval, policy.crawl_delay(self.rules.robots_token))
        return interval * (1.0 + SPACING_MARGIN)

    def _state(self, site: str) -> SiteState:
        state = self.sites.get(site)
        if state is not None:
            self.sites.move_to_end(site)
            return state
        state = self.sites[site] = SiteState()
        if len(self.sites) > self.rules.max_hosts:
            # O(1): the least recently used site goes if it holds nothing; a busy one gets another turn.
            oldest, old = next(iter(self.sites.items()))
            if old.forgettable(time.time()):
                del self.sites[oldest]
            else:
                self.sites.move_to_end(oldest)
        return state

    async def _load(self) -> None:
        """Read the store's earlier answers once, before the first decision (a restarted actor too)."""
        if self.loaded is None:
            self.loaded = asyncio.ensure_future(asyncio.to_thread(self.robots.load))
        await self.loaded

    async def _flush(self, force: bool = False) -> None:
        if force or self.robots.due():
            taken = self.robots.take_pending()
            if taken is not None:
                await asyncio.to_thread(write_table, *taken)


def shard_of(site: str, shards: int) -> int:
    """Stable across processes (Python's hash() is salted per process)."""
    return zlib.crc32(site.encode()) % max(1, shards)


@dataclass
class Batch:
    """Requests and releases on their way to one budget shard in the next call."""

    requests: list[tuple[str, str, float]] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    releases: list[tuple] = field(default_factory=list)


class BudgetClient:
    """A worker's way to the host budgets: Ray actors when running under Ray, else one in-process budget.

    `mode`: "cluster" (Ray actors, created on first use), "local" (in-process), or "auto" (cluster
    when Ray is initialised, as in every Ray worker). In cluster mode acquires and releases go to each
    budget shard in batches (`acquire_many`), one call in flight per shard at a time: a busy
    worker pays one actor call per batch instead of two per request. No call ever waits in the actor.
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

    async def acquire(self, site: str, url: str, lead: float = LEAD_S) -> Grant:
        if not self.clustered:
            return await self._local().acquire(site, url, lead)
        index = shard_of(site, self.rules.shards)
        future = asyncio.get_running_loop().create_future()
        batch = self._batch(index)
        batch.requests.append((site, url, lead))
        batch.futures.append(future)
        try:
            return await future
        except Exception:  # the batched call failed (its actor died): asked again directly, waited out
            return await self._call(index, "acquire", site, url, lead)

    async def release(self, site: str, lease: int, status: int | None = None, retry_after: float | None = None,
                      started: float | None = None) -> None:  # fmt: skip
        if not self.clustered:
            await self._local().release(site, lease, status, retry_after, started)
        else:  # sent with the next batch; a lost release only expires later (lease_s)
            releases = self._batch(shard_of(site, self.rules.shards)).releases
            releases.append((site, lease, status, retry_after, started))

    async def put_robots(self, site: str, lease: int, status: int | None, body: bytes | None,
                         error: str | None, started: float | None = None) -> None:  # fmt: skip
        if not self.clustered:
            await self._local().put_robots(site, lease, status, body, error, started)
        else:
            index = shard_of(site, self.rules.shards)
            await self._call(index, "put_robots", site, lease, status, body, error, started)

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
            self.local = HostBudget(replace(self.rules, shards=1))  # one in-process budget: every site
        return self.local

    def _actor(self, index: int) -> Any:
        actor = self.actors.get(index)
        if actor is None:
            actor = self.actors[index] = budget_actor(self.rules, index)
        return actor


def budget_actor(rules: HostRules, index: int) -> Any:
    """Budget shard `index` of the crawl `rules.scope` (created if no worker made it yet)."""
    import ray

    return (
        ray.remote(HostBudget)
        .options(
            name=f"host-budget-{rules.scope}-{rules.digest()}-{index}",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=1000,  # calls never wait inside (non-blocking answers)
            max_restarts=-1,
            scheduling_strategy=placement(rules, index),
        )
        .remote(rules, index)
    )


def placement(rules: HostRules, index: int) -> Any:
    """Where budget shard `index` goes: a crawl node (one with the workers' custom resources), the shards
    dealt round the crawl nodes there are now (soft: anywhere if none is up yet); else spread. Affinity,
    not a resource request: a sliver of `crawl` would leave a whole worker's unit unusable on that node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not rules.resources:
        return "SPREAD"
    wanted = [name for name, _ in rules.resources]
    nodes = sorted(n["NodeID"] for n in ray.nodes()
                   if n.get("Alive") and all(n.get("Resources", {}).get(r, 0) > 0 for r in wanted))  # fmt: skip
    if not nodes:
        return "SPREAD"
    return NodeAffinitySchedulingStrategy(nodes[index % len(nodes)], soft=True)


def hold_budget_actors(rules: HostRules) -> list[Any]:
    """Every budget shard of `rules`, created (or found) by the caller, which then owns them: the build's
    driver calls this so that a worker's death (which ends the actors that worker created) never takes
    a site's leases, back-off and robots.txt with it. Keep the list for as long as the crawl runs."""
    return [budget_actor(rules, index) for index in range(rules.shards)]


def flush_budgets(actors: list[Any]) -> None:
    """Write the budget actors' pending robots.txt answers (the end of a crawl; best effort)."""
    import ray

    try:
        ray.get([a.flush.remote() for a in actors], timeout=60)
    except (ray.exceptions.RayError, TimeoutError) as e:  # answers not written are only fetched again
        log.warning("host store: pending robots.txt answers not written (%s)", type(e).__name__)
