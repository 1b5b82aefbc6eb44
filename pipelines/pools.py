"""Pool sizes for Ray Data stages: (min, max) that grow with the cluster by default.

Every stage config carries a `Pool` (min_workers, max_workers). `max_workers=0` means "as many as the
cluster can hold": the stage's actor pool may grow to what the cluster's resources allow for one worker's
request (now, or after the autoscaler adds nodes: Ray Data asks for more actors while work is queued and the
autoscaler starts nodes for them), and shrinks back to `min_workers` when idle. A fixed size is
`min_workers == max_workers`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# Upper bound used when the cluster may autoscale beyond what it has now (no resource is visible yet):
# Ray Data only starts actors it has work and resources for, so a generous bound costs nothing.
AUTOSCALE_MAX = 1024


@dataclass
class Pool:
    min_workers: int = 1
    max_workers: int = 0  # 0: sized from the cluster (see module doc)

    def __post_init__(self) -> None:
        if self.min_workers < 1:
            raise ValueError("min_workers must be >= 1")
        if self.max_workers < 0:
            raise ValueError("max_workers must be >= 0 (0 = sized from the cluster)")
        if self.max_workers and self.max_workers < self.min_workers:
            raise ValueError("max_workers must be >= min_workers (or 0 = sized from the cluster)")


def fits(resources: Mapping[str, float], per_worker: Mapping[str, float]) -> int:
    """How many workers asking `per_worker` fit into `resources` (0 if one does not)."""
    counts = [int(resources.get(k, 0.0) // v) for k, v in per_worker.items() if v > 0]
    return min(counts) if counts else AUTOSCALE_MAX


def autoscaling_enabled() -> bool:
    """True when an autoscaler manages this cluster, so it may add nodes that are not visible yet.

    The cluster definitions in `cluster/` set CLIP_RAY_AUTOSCALING=1 on every node (and jobs inherit it);
    elsewhere the visible resources are all there is."""
    return os.environ.get("CLIP_RAY_AUTOSCALING", "").lower() in ("1", "true", "yes")


def pool_bounds(pool: Pool, per_worker: Mapping[str, float]) -> tuple[int, int]:
    """(min, max) actors for a stage whose workers each ask `per_worker` resources."""
    if pool.max_workers:
        return pool.min_workers, pool.max_workers
    import ray

    visible = fits(ray.cluster_resources(), per_worker) if ray.is_initialized() else 0
    upper = AUTOSCALE_MAX if autoscaling_enabled() else max(visible, 1)
    return min(pool.min_workers, upper), max(upper, pool.min_workers)
