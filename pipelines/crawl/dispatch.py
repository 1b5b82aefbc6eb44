"""Hands shards to a pool of shard workers and collects their small records.

The driver keeps, per worker, the number of its shards in flight (at most `shards_per_worker`), and a
queue of shard ids: O(shards) integers, never rows. A shard whose worker raised, or died with its node,
goes back to the queue (at most `max_shard_attempts` times); a dead worker is replaced. Records come
back in whatever order shards finish: what a shard holds depends only on its plan slice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

from pipelines import faults
from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.worker import ShardWorker
from pipelines.pools import pool_bounds

log = logging.getLogger(__name__)
WAIT_S = 1.0


@dataclass
class PoolState:
    """Explicit state of one dispatch run (what the driver holds)."""

    queue: deque[int]
    attempts: dict[int, int] = field(default_factory=dict)
    starting: dict[ray.ObjectRef, Any] = field(default_factory=dict)  # ready() ref -> worker
    load: dict[Any, int] = field(default_factory=dict)  # ready worker -> shards in flight
    running: dict[ray.ObjectRef, tuple[int, Any]] = field(default_factory=dict)  # ref -> (shard, worker)
    replaced: int = 0


def worker_count(cfg: CrawlConfig, num_shards: int) -> int:
    """Pool size: within the configured (min, max), no more than the shards can keep busy."""
    low, high = pool_bounds(cfg.pool, cfg.worker_resources_request())
    wanted = math.ceil(num_shards / cfg.shards_per_worker)
    return max(1, min(high, max(low, wanted), wanted))


class ShardPool:
    """Shard workers (async actors) for one build; `run` maps a worker method over shard ids."""

    def __init__(self, cfg: CrawlConfig, make_args: tuple, num_workers: int):
        self.cfg = cfg
        self.make_args = make_args
        options: dict[str, Any] = {
            "num_cpus": cfg.num_cpus_per_worker,
            "max_concurrency": cfg.shards_per_worker + 2,  # + ready() and close()
            "max_restarts": 0,  # a dead worker is replaced by a fresh one (see _failed)
        }
        if cfg.worker_resources:
            options["resources"] = dict(cfg.worker_resources)
        if os.environ.get(faults.ENV_FAULTS):  # tests: the fault switch reaches workers of a running Ray
            names = (faults.ENV_FAULTS, faults.ENV_DIR)
            options["runtime_env"] = {"env_vars": {k: os.environ[k] for k in names if k in os.environ}}
        self.options = options
        self.actor_class = ray.remote(ShardWorker).options(**options)
        self.num_workers = num_workers
        self.workers: list[Any] = []
        self.ready: set[Any] = set()

    def _start_worker(self, state: PoolState) -> None:
        worker = self.actor_class.remote(*self.make_args)
        self.workers.append(worker)
        state.starting[worker.ready.remote()] = worker

    def run(
        self, method: str, shards: Iterable[int], args: Callable[[int], tuple]
    ) -> Iterator[dict[str, Any]]:
        """Yields one record per shard, as shards finish."""
        state = PoolState(deque(shards))
        if not state.queue:
            return
        for worker in self.workers:  # workers kept from an earlier run
            if worker in self.ready:
                state.load[worker] = 0
            else:
                state.starting[worker.ready.remote()] = worker
        while len(self.workers) < self.num_workers:
            self._start_worker(state)
        while state.queue or state.running:
            self._dispatch(state, method, args)
            ready, _ = ray.wait([*state.running, *state.starting], num_returns=1, timeout=WAIT_S)
            for ref in ready:
                if ref in state.starting:
                    self._started(state, ref)
                else:
                    record = self._finished(state, ref)
                    if record is not None:
                        yield record

    def _dispatch(self, state: PoolState, method: str, args: Callable[[int], tuple]) -> None:
        for worker in sorted(state.load, key=state.load.get):
            while state.queue and state.load[worker] < self.cfg.shards_per_worker:
                shard = state.queue.popleft()
                ref = getattr(worker, method).remote(shard, *args(shard))
                state.running[ref] = (shard, worker)
                state.load[worker] += 1

    def _started(self, state: PoolState, ref: ray.ObjectRef) -> None:
        worker = state.starting.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            log.warning("a shard worker failed to start (%s); starting another", type(e).__name__)
            self._replace(state, worker)
            return
        self.ready.add(worker)
        state.load[worker] = 0

    def _finished(self, state: PoolState, ref: ray.ObjectRef) -> dict[str, Any] | None:
        shard, worker = state.running.pop(ref)
        if worker in state.load:
            state.load[worker] -= 1
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:
            attempts = state.attempts[shard] = state.attempts.get(shard, 0) + 1
            if attempts >= self.cfg.max_shard_attempts:
                raise RuntimeError(f"shard {shard} failed {attempts} times; last error: {e}") from e
            log.warning("shard %d failed (attempt %d: %s); queued again", shard, attempts, type(e).__name__)
            state.queue.appendleft(shard)
            if isinstance(e, ray.exceptions.RayActorError) and worker in state.load:
                self._replace(state, worker)
            return None

    def _replace(self, state: PoolState, worker: Any) -> None:
        state.load.pop(worker, None)
        self.ready.discard(worker)
        if worker in self.workers:
            self.workers.remove(worker)
        state.replaced += 1
        if state.replaced > 4 * self.num_workers + 4:
            raise RuntimeError(f"{state.replaced} shard workers died or failed to start; giving up")
        self._start_worker(state)

    def close(self) -> None:
        """Close the workers' crawlers (sessions, pools), then end them."""
        # A worker already gone has nothing left to close.
        with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
            ray.get([w.close.remote() for w in self.workers if w in self.ready], timeout=30)
        for worker in self.workers:
            ray.kill(worker)
        self.workers, self.ready = [], set()
