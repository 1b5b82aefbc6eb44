"""pipelines/ray_connect.connect: a dead cluster address fails in seconds, naming the address, in the jobs too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.local_cluster import LOOPBACK_ENV, free_ports
from pipelines.ray_connect import ClusterUnreachable, connect, host_port

ROOT = Path(__file__).resolve().parents[1]


def test_host_port_parses_the_address_forms():
    assert host_port("127.0.0.1:6380") == ("127.0.0.1", 6380)
    assert host_port("ray://head:10001") == ("head", 10001)
    assert host_port("headnode") == ("headnode", 6379)
    with pytest.raises(ValueError, match="not a cluster address"):
        host_port(":123")


def test_dead_address_fails_fast(monkeypatch):
    (port,) = free_ports(1)
    start = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=f"No Ray cluster at 127.0.0.1:{port}: nothing listens"):
        connect(f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ClusterUnreachable, match=rf"127.0.0.1:{port} \(from RAY_ADDRESS\)"):
        connect()
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "job",
    [
        ["jobs/build_wit.py", "output=/nonexistent"],
        ["jobs/train_clip.py", "data_uri={tmp}/shards", "tokenizer_merges={tmp}/merges.txt.gz"],
    ],
)
def test_job_entry_points_fail_fast_on_a_dead_ray_address(job, tmp_path):
    # train_clip checks its data and merges before it joins Ray: give it inputs that pass those checks
    from clip_model import Tokenizer

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")
    Tokenizer.train(["a red circle", "a blue square"] * 3, 520, tmp_path / "merges.txt.gz")
    job = [arg.format(tmp=tmp_path) for arg in job]
    (port,) = free_ports(1)
    env = {**os.environ, **LOOPBACK_ENV, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *job], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert f"No Ray cluster at 127.0.0.1:{port} (from RAY_ADDRESS)" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - start < 60  # interpreter + imports; a bare ray.init would retry for minutes


def test_live_address_connects(ray_head):
    code = (
        "import ray; from pipelines.ray_connect import connect; "
        f"connect({ray_head.address!r}); print('cpus', int(ray.cluster_resources()['CPU']))"
    )
    env = {**os.environ, **LOOPBACK_ENV}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cpus 4" in proc.stdout
