"""Ray Data helpers shared by the WIT jobs (query list, curation): execution settings and file fan-out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pipelines.faults import InjectedFault
from pipelines.pools import Pool, pool_bounds

# Application errors an actor task is retried on. Node loss and actor death are system errors, which Ray
# Data retries anyway; InjectedFault is the tests' stand-in for them (pipelines/faults.py) and is never
# raised unless the test switch is on.
RETRY_ON: list[type[BaseException]] = [InjectedFault]


@contextmanager
def execution(shuffle: str) -> Iterator[None]:
    """Run the block with Ray Data shuffle strategy `shuffle` and actor-task retries on `RETRY_ON`.

    Both are DataContext settings, captured by each Dataset when it is created; they are restored after
    the block (tests run several jobs in one process)."""
    from ray.data.context import DataContext, ShuffleStrategy

    ctx = DataContext.get_current()
    before = ctx.shuffle_strategy, ctx.actor_task_retry_on_errors
    ctx.shuffle_strategy = ShuffleStrategy(shuffle)
    ctx.actor_task_retry_on_errors = list(RETRY_ON)
    try:
        yield
    finally:
        ctx.shuffle_strategy, ctx.actor_task_retry_on_errors = before


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
