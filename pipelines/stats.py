"""The funnel: how many records each stage received, kept and dropped (by reason), plus counters.

Stages compute counts for the batch they process (pure functions, testable without Ray) and return or write
them as data (a shard's manifest, a per-task record) that the job reduces into `_stats.json`, so a retried
task changes nothing. The invariant `n_in == n_out + sum(dropped)` holds per stage, so every input record
is accounted for.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any


def drop_counts(reasons: Iterable[str | None]) -> dict[str, int]:
    """Count drop reasons; `None` (or "") means the record was kept."""
    return dict(Counter(r for r in reasons if r))


class Funnel:
    """Per-stage in/out/dropped counts and free-form counter groups (per query, per domain, bytes...)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}
        self.counters: dict[str, Counter] = {}
        self.started = time.time()

    def record(self, stage: str, n_in: int, n_out: int, dropped: Mapping[str, int] | None = None) -> None:
        entry = self.stages.setdefault(stage, {"in": 0, "out": 0, "dropped": {}})
        entry["in"] += int(n_in)
        entry["out"] += int(n_out)
        for reason, n in (dropped or {}).items():
            if n:
                entry["dropped"][reason] = entry["dropped"].get(reason, 0) + int(n)

    def count(self, group: str, key: str, n: int = 1) -> None:
        self.counters.setdefault(group, Counter())[key] += n

    def add_counts(self, group: str, counts: Mapping[str, int]) -> None:
        self.counters.setdefault(group, Counter()).update({k: int(v) for k, v in counts.items()})

    def merge(self, other: Funnel | Mapping[str, Any]) -> Funnel:
        data = other.to_dict() if isinstance(other, Funnel) else other
        for stage, entry in data.get("stages", {}).items():
            self.record(stage, entry["in"], entry["out"], entry.get("dropped"))
        for group, counts in data.get("counters", {}).items():
            self.add_counts(group, counts)
        return self

    def check(self) -> None:
        """Raise if any stage lost records: in must equal out plus every drop."""
        for stage, e in self.stages.items():
            if e["in"] != e["out"] + sum(e["dropped"].values()):
                raise AssertionError(
                    f"stage {stage!r}: {e['in']} in != {e['out']} out + {sum(e['dropped'].values())} dropped"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": {
                k: {"in": v["in"], "out": v["out"], "dropped": dict(v["dropped"])}
                for k, v in self.stages.items()
            },
            "counters": {g: dict(c) for g, c in self.counters.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Funnel:
        return cls().merge(data)


def write_stats(uri: str, stats: Mapping[str, Any]) -> None:
    """Write `stats` as pretty JSON to `uri` (local path or s3://), atomically."""
    from pipelines import storage

    storage.write_bytes_atomic(uri, json.dumps(stats, indent=2, sort_keys=True, default=str).encode())
