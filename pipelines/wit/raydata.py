"""Ray Data helpers shared by the WIT jobs (query list, curation): execution settings, file fan-out, and
per-file counts summed by key."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.pools import Pool, pool_bounds
from pipelines.stats import Funnel
from pipelines.wit.tally import is_tally_key, keyed_funnel

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


def sum_over_files(
    files: Sequence[str], counter: type, counter_kwargs: dict, key: str, value: str, num_partitions: int
) -> tuple[Any, Funnel]:
    """Run the callable class `counter` (built with `counter_kwargs`) on each file, one call per file and up
    to one actor per file, and sum the (`key`, `value`) rows it emits over all files with a hash-partitioned
    groupby (no worker holds every key). Returns (the sums without the tally keys, lazily; the funnel those
    keys carried, pipelines/wit/tally.py)."""
    counted = files_dataset(files).map_batches(
        counter,
        fn_constructor_kwargs=counter_kwargs,
        batch_size=1,
        batch_format="numpy",
        concurrency=(1, max(1, len(files))),
    )
    return _sum_by_key(counted, key, value, num_partitions)


def _sum_by_key(ds: Any, key: str, value: str, num_partitions: int) -> tuple[Any, Funnel]:
    """(`ds` summed by `key` without the tally keys, lazily; the funnel the tally keys carried)."""
    summed = (
        ds.groupby(key, num_partitions=num_partitions).sum(value).rename_columns({f"sum({value})": value})
    )
    summed = summed.materialize()
    tallies = summed.map_batches(_tally_rows, fn_kwargs={"key": key}, batch_format="pyarrow").to_pandas()
    funnel = keyed_funnel(list(tallies[key]), list(tallies[value])) if len(tallies) else Funnel()
    return summed.map_batches(
        _tally_rows, fn_kwargs={"key": key, "keep": False}, batch_format="pyarrow"
    ), funnel


def _tally_rows(batch: pa.Table, key: str, keep: bool = True) -> pa.Table:
    mask = is_tally_key(batch.column(key))
    return batch.filter(mask if keep else pc.invert(mask))


def concurrency(pool: Pool, per_worker: dict[str, float] | None = None, cap: int = 0) -> tuple[int, int]:
    """(min, max) actors for a stage's `pool` (see pipelines/pools.py), at most `cap` when `cap` > 0."""
    low, high = pool_bounds(pool, per_worker or {"CPU": 1.0})
    if cap > 0:
        high = max(1, min(high, cap))
        low = min(low, high)
    return low, high
