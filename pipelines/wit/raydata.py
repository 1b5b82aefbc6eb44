"""Ray Data helpers shared by the WIT jobs (query list, curation): execution settings and file fan-out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pipelines.pools import Pool, pool_bounds

# User errors a map task is retried on (Ray Data replays the task's input and skips the outputs it already
# produced). Node loss and actor death are system errors, which Ray retries anyway; the injected fault is
# the tests' stand-in for them (pipelines/faults.py: InjectedFault, raised only when the test switch is on).
RETRIED_MAP_ERRORS = ["injected fault at"]
MAX_MAP_RETRIES = 3


@contextmanager
def execution(shuffle: str) -> Iterator[None]:
    """Run the block with Ray Data shuffle strategy `shuffle` and map-task retries on RETRIED_MAP_ERRORS.

    Both are DataContext settings, captured by each Dataset when it is created; they are restored after
    the block (tests run several jobs in one process)."""
    from ray.data.context import DataContext, ShuffleStrategy

    ctx = DataContext.get_current()
    before = ctx.shuffle_strategy, ctx.retried_map_errors, ctx.max_map_retries
    ctx.shuffle_strategy = ShuffleStrategy(shuffle)
    ctx.retried_map_errors = list(RETRIED_MAP_ERRORS)
    ctx.max_map_retries = max(ctx.max_map_retries, MAX_MAP_RETRIES)
    try:
        yield
    finally:
        ctx.shuffle_strategy, ctx.retried_map_errors, ctx.max_map_retries = before


def files_dataset(files: Sequence[str]) -> Any:
    """A Dataset of `{"path": file}` rows, one block per file (one read task per file)."""
    import ray

    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files)))


def concurrency(pool: Pool, per_worker: dict[str, float] | None = None, cap: int = 0) -> tuple[int, int]:
    """(min, max) actors for a stage's `pool` (see pipelines/pools.py), at most `cap` when `cap` > 0."""
    low, high = pool_bounds(pool, per_worker or {"CPU": 1.0})
    if cap > 0:
        high = max(1, min(high, cap))
        low = min(low, high)
    return low, high
