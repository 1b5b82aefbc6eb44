"""Build the WIT-style dataset: `python jobs/build_wit.py --config configs/wit_demo.yaml [key=value ...]`.

Runs on a local Ray, or on a cluster through
`ray job submit --working-dir . -- python jobs/build_wit.py --config configs/wit_demo.yaml`.
Rerunning the same command after a kill resumes from the committed shards; `crawl.retry_failed=true`
re-fetches the URLs that failed for a transient reason.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import progress, storage  # noqa: E402
from pipelines.build_wit import BuildWITConfig, build_wit  # noqa: E402
from pipelines.config import parse_args  # noqa: E402
from pipelines.crawl.build import InputError  # noqa: E402
from pipelines.fingerprint import StaleOutput  # noqa: E402
from pipelines.ray_connect import connect  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    progress.setup()  # plain job logs: no escape sequences, one line per finished stage
    cfg = parse_args(BuildWITConfig, argv, description="Build WIT: curate, crawl, write shards (Ray Data).")
    if cfg.urls and not storage.exists(cfg.urls):
        print(f"build_wit.py: error: input not found: urls={cfg.urls}", file=sys.stderr)
        sys.exit(2)
    connect()  # fails fast when RAY_ADDRESS names a dead cluster
    try:
        stats = build_wit(cfg)
    except (InputError, StaleOutput) as e:
        print(f"build_wit.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    totals, run = stats["totals"], stats["run"]
    print(
        f"{totals['kept']} of {totals['input']} samples in {totals['shards']} shards "
        f"({run['shards_written']} written now, {run['shards_skipped']} resumed); dropped: {totals['dropped']}"
    )
    print(f"shards: {cfg.output}  stats: {storage.join(cfg.output, '_stats.json')}")


if __name__ == "__main__":
    main()
