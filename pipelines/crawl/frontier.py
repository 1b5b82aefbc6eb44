"""A worker's host-aware frontier: in-flight slots go only to requests whose host may be fetched now.

Like Nutch's fetch queues and Mercator's politeness queues: every request waits in its site's queue
(`slot(site, url)`), and a heap orders the sites by the time they may next be asked. A pump hands the
worker's free in-flight slots to the sites at the top of the heap that are due: it asks the site's budget
(hosts.py) for the head request, which answers at once:
- "go": the head request gets the slot (it starts at the grant's `start_at`, at most the budget's round
  trip ahead); the site is due again one round trip before its next start, so that a busy host is
  served at its full rate however long the budget takes to answer;
- "wait": the slot goes back at once and the site is due again after the answer's delay;
- "robots": the slot fetches the site's robots.txt (the given callback), then the site is due again;
- "drop": the head request fails with the reason (robots.txt disallows it, the site is deferred).
So a request that waits for its host holds no slot and no coroutine of the worker sleeps on a host: a
hot host behind schedule costs one heap entry, and the worker's slots stay full with the hosts that are
ready. A request gives its slot and lease back with `done`; the site of a freed lease is asked again at
once (its concurrency limit may have been what held it).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pipelines.crawl.hosts import LEAD_S, MAX_LEAD_S, BudgetClient, Grant

log = logging.getLogger(__name__)


class Dropped(Exception):
    """The budget refused the request: `reason` is the drop reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class SiteQueue:
    waiters: deque[tuple[str, asyncio.Future]] = field(default_factory=deque)
    version: int = 0  # heap entries of an older version are stale
    asking: bool = False  # a budget call for its head request is in flight
    queued: bool = False  # has a live heap entry


class Frontier:
    """Per-site queues + a heap of sites by next allowed time (module doc). One per worker, on its loop."""

    def __init__(self, budget: BudgetClient, max_in_flight: int,
                 fetch_robots: Callable[[str, Grant], Awaitable[None]]):  # fmt: skip
        self.budget = budget
        self.limit = max_in_flight
        self.fetch_robots = fetch_robots
        self.in_flight = 0  # slots given out (requests running, budget calls, robots.txt fetches)
        self.round_trip = LEAD_S  # a moving average of the budget's answer time (s)
        self.sites: dict[str, SiteQueue] = {}
        self.heap: list[tuple[float, int, int, str]] = []  # (due, tie-breaker, version, site)
        self.counter = itertools.count()
        self.wake = asyncio.Event()
        self.pump: asyncio.Task | None = None
        self.tasks: set[asyncio.Task] = set()

    async def slot(self, site: str, url: str) -> Grant:
        """Waits until a request for `url` may start; then an in-flight slot and the site's lease are held
        (give both back with `done`). Raises `Dropped` when the budget refuses it."""
        future = asyncio.get_running_loop().create_future()
        queue = self.sites.get(site)
        if queue is None:
            queue = self.sites[site] = SiteQueue()
        queue.waiters.append((url, future))
        if not queue.asking and not queue.queued:
            self._due(site, queue, time.time())
        self._ensure_pump()
        return await future

    async def done(self, site: str, grant: Grant, status: int | None = None, retry_after: float | None = None,
                   started: float | None = None) -> None:  # fmt: skip
        """The request of `grant` (sent at `started`; None: never sent) is over: its slot and lease go back."""
        self.in_flight -= 1
        await self.budget.release(site, grant.lease, status, retry_after, started)
        queue = self.sites.get(site)
        if queue is not None and queue.queued:  # the freed lease may be what this site waited for
            self._due(site, queue, time.time())
        self.wake.set()

    @property
    def lead(self) -> float:
        """How long before a site's next start to ask for it: the budget's round trip, with a margin."""
        return min(MAX_LEAD_S, max(LEAD_S, 1.5 * self.round_trip))

    # ------------------------------------------------------------ internals

    def _due(self, site: str, queue: SiteQueue, when: float) -> None:
        queue.version += 1
        queue.queued = True
        heapq.heappush(self.heap, (when, next(self.counter), queue.version, site))
        self.wake.set()

    def _ensure_pump(self) -> None:
        if self.pump is None or self.pump.done():
            self.pump = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        while self.sites:
            now = time.time()
            while self.in_flight < self.limit and self.heap and self.heap[0][0] <= now:
                _, _, version, site = heapq.heappop(self.heap)
                queue = self.sites.get(site)
                if queue is None or version != queue.version:
                    continue  # stale entry
                queue.queued, queue.asking = False, True
                self.in_flight += 1
                task = asyncio.ensure_future(self._ask(site, queue))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            timeout = None
            if self.heap and self.in_flight < self.limit:
                timeout = max(0.0, self.heap[0][0] - time.time())
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def _ask(self, site: str, queue: SiteQueue) -> None:
        """One budget answer for the site's head request, acted on (module doc)."""
        url, future = queue.waiters[0]
        keeps_slot = False
        lead = self.lead
        asked = time.time()
        try:
            grant = await self.budget.acquire(site, url, lead)
            self.round_trip = 0.8 * self.round_trip + 0.2 * (time.time() - asked)
        except Exception as e:  # the budget service is gone for good: this request fails, counted
            log.warning("host budget call for %s failed (%s)", site, type(e).__name__)
            grant = Grant("drop", reason="fetch_error")
        now = time.time()
        due = now
        try:
            if grant.action == "go":
                queue.waiters.popleft()
                if future.done():  # its caller went away: nothing starts
                    await self.budget.release(site, grant.lease)
                else:
                    future.set_result(grant)
                    keeps_slot = True
                due = now + max(0.0, grant.next_s - self.lead)  # asked again as its next start comes near
            elif grant.action == "robots":
                await self.fetch_robots(site, grant)
            elif grant.action == "wait":
                due = now + grant.delay_s
            else:
                queue.waiters.popleft()
                if not future.done():
                    future.set_exception(Dropped(grant.reason or "fetch_error"))
        finally:
            if not keeps_slot:
                self.in_flight -= 1
            queue.asking = False
            if queue.waiters:
                self._due(site, queue, due)
            else:
                del self.sites[site]
            self.wake.set()
