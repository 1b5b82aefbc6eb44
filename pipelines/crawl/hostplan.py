"""The crawl order by host: each host's URLs spread over the whole crawl as its budget allows.

Like Nutch's generate step (a quota of URLs per host per fetch list): before the crawl is cut into
shards, every row gets a place in the crawl order from its host (scheme://host:port) alone:
- a host's floor is `URLs / per_host_rate`: the least time its URLs take, however many workers crawl;
- the crawl's horizon is its expected duration, `rows / urls_per_s` (`urls_per_s`: configured, or
  `urls_per_s_per_worker` times the shard workers);
- a host whose floor fits the horizon has its URLs spread evenly over the whole crawl: its i-th URL of n
  sits at `(i + offset) / n` of the order (a seeded offset per host), so each shard holds about
  `n / shards` of them, the host's quota per shard, and the shards in flight never ask a host for more
  than its rate gives;
- a host whose floor exceeds the horizon goes to the slow lane (`over_horizon: slow_lane`): its URLs
  come first in the plan, so their shards start first and are crawled at the host's rate while all
  the other shards finish at full speed (the last slow-lane shard may also hold the first normal rows);
  or (`over_horizon: cap`) it keeps the URLs its rate fetches within the horizon and the others are
  planned with the drop reason `host_over_budget` (counted like any drop: kept + dropped = input), at
  the end of the plan.
Ties are broken by a seeded 64-bit hash of (url, caption): the same input and seed give the same order,
so the same shards, whatever the number of blocks or workers. Done by Ray Data (a groupby by host, then a
sort), so the driver holds no row and no per-host count.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

HOST_OVER_BUDGET = "host_over_budget"
PLAN_DROP = "plan_drop"  # the column of rows the plan itself drops (the crawl stage counts them)
LANE, KEY, TIE, HOST = "_lane", "_key", "_tie", "_host"
SLOW, NORMAL, CAPPED = 0, 1, 2
ROWS_PER_PARTITION = 100_000


@dataclass
class HostPlanConfig:
    # Order the plan by host (module doc). Off by default for now: a plan then keeps the input's order (and
    # a Parquet input stays its own plan, read from its footers only), which existing outputs and tests
    # assume; turn it on for a web-shaped URL list.
    spread: bool = False
    urls_per_s: float = 0.0  # the whole crawl's expected pace; 0: urls_per_s_per_worker x shard workers
    urls_per_s_per_worker: float = 100.0
    over_horizon: str = "slow_lane"  # or "cap"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.over_horizon not in ("slow_lane", "cap"):
            raise ValueError(
                f"crawl.host_plan.over_horizon must be slow_lane or cap, got {self.over_horizon!r}"
            )
        if self.urls_per_s < 0 or self.urls_per_s_per_worker <= 0:
            raise ValueError("crawl.host_plan.urls_per_s must be >= 0 and urls_per_s_per_worker > 0")


def site_of_url(url: Any) -> str:
    """scheme://host:port of a URL, cheaply (no validation: an unparsable URL is its own 'site')."""
    text = str(url or "")
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    host = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].rsplit("@", 1)[-1].lower()
    if ":" not in host.rsplit("]", 1)[-1]:
        host += ":443" if scheme.lower() == "https" else ":80"
    return f"{scheme.lower()}://{host}"


def _hash64(seed: int, *parts: Any) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8, key=str(seed).encode())
    return int.from_bytes(digest.digest(), "big") >> 1  # fits int64


def tag_hosts(batch: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Adds the host and the tie-breaking hash of each row."""
    captions = batch["caption"] if "caption" in batch else [""] * len(batch)
    batch[HOST] = [site_of_url(u) for u in batch["url"]]
    batch[TIE] = np.array([_hash64(seed, u, c) for u, c in zip(batch["url"], captions)], dtype=np.int64)
    return batch


def spread_host(
    group: pd.DataFrame, rate: float, horizon_s: float, over_horizon: str, seed: int
) -> pd.DataFrame:
    """One host's rows (a Ray Data group) -> the same rows with their lane and place in the crawl order."""
    group = group.sort_values(TIE, kind="stable").reset_index(drop=True)
    n = len(group)
    offset = _hash64(seed, "offset", group[HOST].iloc[0]) / 2**63
    floor_s = n / rate if rate > 0 else 0.0
    group[KEY] = (np.arange(n) + offset) / n
    group[LANE] = NORMAL
    group[PLAN_DROP] = pd.Series([None] * n, dtype=object)
    if floor_s > horizon_s:
        if over_horizon == "slow_lane":
            group[LANE] = SLOW
        else:  # keep what the host's rate fetches within the horizon, spread like any host
            keep = max(1, math.floor(rate * horizon_s))
            group.loc[keep:, LANE] = CAPPED
            group.loc[keep:, PLAN_DROP] = HOST_OVER_BUDGET
            group.loc[: keep - 1, KEY] = (np.arange(keep) + offset) / keep
    return group


def horizon_s(rows: int, cfg: HostPlanConfig, workers: int) -> float:
    pace = cfg.urls_per_s or cfg.urls_per_s_per_worker * max(1, workers)
    return rows / pace


def host_ordered(ds: Any, cfg: HostPlanConfig, rate: float, workers: int) -> Any:
    """`ds` (url, caption, ...) in the crawl order of the module doc, with a `plan_drop` column."""
    tagged = ds.map_batches(tag_hosts, fn_kwargs={"seed": cfg.seed}, batch_format="pandas").materialize()
    rows = tagged.count()
    kwargs = {"rate": rate, "horizon_s": horizon_s(rows, cfg, workers), "over_horizon": cfg.over_horizon,
              "seed": cfg.seed}  # fmt: skip
    # Partitions (hence plan parts) of ROWS_PER_PARTITION rows, not Ray Data's default 200 of any size.
    partitions = max(1, min(200, rows // ROWS_PER_PARTITION))
    grouped = tagged.groupby(HOST, num_partitions=partitions).map_groups(
        spread_host, fn_kwargs=kwargs, batch_format="pandas"
    )
    ordered = grouped.sort([LANE, KEY, TIE])
    return ordered.drop_columns([LANE, KEY, TIE, HOST])
