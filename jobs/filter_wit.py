"""Filter a shard set with a CLIP checkpoint: `python jobs/filter_wit.py --config configs/filter_demo.yaml
[key=value ...]`.

Embeds every shard (resumable per shard under `{output}/embeddings/`), applies the CLIP-score, semantic
dedupe and per-query filters, and writes the selection the trainer and the evaluation read
(`{output}/selection/`), the funnel (`{output}/_stats.json`) and a report (`{output}/report/report.html`).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import progress  # noqa: E402
from pipelines.config import parse_args  # noqa: E402
from pipelines.datasets import DatasetError  # noqa: E402
from pipelines.evaluation.embed import EvalModelError  # noqa: E402
from pipelines.filter.config import FilterConfig  # noqa: E402
from pipelines.filter.job import filter_wit  # noqa: E402
from pipelines.ray_connect import connect  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    progress.setup()  # plain job logs: no escape sequences, one line per finished stage
    cfg = parse_args(FilterConfig, argv, description=__doc__)
    for key in ("data_uri", "output", "checkpoint"):
        if not getattr(cfg, key):
            print(f"filter_wit.py: error: {key}= is required", file=sys.stderr)
            return 2
    connect()  # fails fast when RAY_ADDRESS names a dead cluster
    try:
        stats = filter_wit(cfg)
    except (DatasetError, EvalModelError) as e:
        print(f"filter_wit.py: error: {e}", file=sys.stderr)
        return 2
    if cfg.embed_only:
        print(f"embedding store: {cfg.output}/embeddings ({stats['shards']})")
        return 0
    sel = stats["selection"]
    print(f"{sel['kept']} of {sel['input']} pairs kept in {sel['shards']} shards; dropped: {sel['dropped']}")
    if stats["shards"]["missing"]:
        print(f"shards that could not be read (a rerun retries them): {stats['shards']['missing']}")
    print(
        f"selection: {cfg.output}/selection  stats: {cfg.output}/_stats.json  report: {stats.get('report', '-')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
