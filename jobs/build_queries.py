"""Build the WIT query list: `python jobs/build_queries.py output=s3://bucket/queries 'wikipedia=[...]' ...`.

The job entry point of pipelines/wit/queries.py (Wikipedia words and bigrams, page-view titles, WordNet
lemmas -> queries.parquet + _stats.json), with the same plain job output as the other jobs.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import progress  # noqa: E402
from pipelines.ray_connect import connect  # noqa: E402
from pipelines.wit import queries  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    progress.setup()  # plain job logs: no escape sequences, one line per finished stage
    connect()  # fails fast when RAY_ADDRESS names a dead cluster
    queries.main(argv)


if __name__ == "__main__":
    main()
