"""A node dies in the middle of the crawl: the job completes and the dataset equals an uninterrupted one.

Runs in its own process (a multi-node `ray.cluster_utils.Cluster` cannot share the test session's Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import dataset_state  # shared builder (tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parents[1]


def test_a_node_killed_mid_crawl_changes_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, str(ROOT / "tests/multinode_build.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("KILLED_AFTER")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    _, committed, _, interrupted, clean = lines[0].split()
    assert int(committed) < 12  # the node went away while shards were still being crawled
    assert dataset_state(interrupted) == dataset_state(clean)
    assert len(dataset_state(clean)) > 12
