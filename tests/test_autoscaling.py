"""Autoscaling shown, not only validated: Ray's fake multi-node autoscaler with cluster/aws.yaml's node types.

The head is started with `RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=0 --autoscaling-config=...`, where
the config keeps every node type and its resources from cluster/aws.yaml, only shrunk to fit this machine.
build_wit.py is submitted to it with its crawl workers asking for the `crawl` resource; the cluster's own
state (the state API over the dashboard) must show crawl nodes launched for the crawl, gone once idle, and
never a GPU node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.submit import submit_job, wait_for_job
from pipelines import synthetic
from pipelines.local_cluster import LOOPBACK_ENV, head_command

ROOT = Path(__file__).resolve().parents[1]

IDLE_TIMEOUT_MINUTES = 0.3  # 18 s instead of aws.yaml's minutes (shorter: nodes churn between stages)
NODE_SIZE = 2  # at most 2 units of any resource per fake node
NODE_COUNT_DIVISOR = 8  # 32 crawl nodes -> 4, 8 GPU nodes -> 1
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider tags its head with this type name


def shrink_resources(resources: dict[str, int]) -> dict[str, int]:
    """Keeps every resource of a node type, at most NODE_SIZE units (a fake node is a few processes)."""
    return {name: min(amount, NODE_SIZE) for name, amount in resources.items() if amount > 0}


def fake_cluster_config(aws_yaml: Path, gcs_address: str) -> dict:
    """cluster/aws.yaml turned into a `fake_multinode` autoscaling config (node types and resources kept)."""
    aws = yaml.safe_load(aws_yaml.read_text())
    types = {}
    for name, spec in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            continue
        types[name] = {
            "resources": shrink_resources(spec["resources"]),
            "node_config": {},
            "min_workers": spec.get("min_workers", 0),
            "max_workers": max(1, spec["max_workers"] // NODE_COUNT_DIVISOR),
        }
    types[FAKE_HEAD_TYPE] = {"resources": {}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": f"fake-{aws['cluster_name']}",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": aws["upscaling_speed"],
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": aws["auth"]["ssh_user"]},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster:
    """A `ray start --head --block` with the fake multi-node provider, in its own session.

    Everything it starts (GCS, dashboard, monitor, and the fake worker nodes the monitor launches) stays in
    that session, so teardown kills exactly those processes and never another cluster on the machine."""

    def __init__(self, aws_yaml: Path):
        self.temp_dir = tempfile.mkdtemp(prefix="ray_fake_", dir="/tmp")  # short: Unix socket paths
        self.config_path = Path(self.temp_dir) / "autoscaling.json"
        self.cmd, self.address, self.dashboard_url = head_command(
            self.temp_dir, 0, f"--autoscaling-config={self.config_path}"
        )
        self.config_path.write_text(json.dumps(fake_cluster_config(aws_yaml, self.address)))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> FakeAutoscalingCluster:
        env = {**os.environ, **LOOPBACK_ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        # The jobs' `python ...` entrypoints use this interpreter's environment, activated or not.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        ray_bin = str(Path(sys.executable).parent / "ray")
        log = open(Path(self.temp_dir) / "ray_start.log", "wb")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [ray_bin, *self.cmd[1:]], env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ray start exited: {(Path(self.temp_dir) / 'ray_start.log').read_text()[-3000:]}"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r,
            ):
                if r.status == 200:
                    return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError("fake autoscaling cluster did not come up")

    def nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard_url, detail=True, raise_on_missing_output=False)

    def stop(self) -> None:
        if self.proc is None:
            return
        import psutil

        session = self.proc.pid  # the session id of everything this cluster started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=3)
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if os.getsid(p.pid) == session:
                    p.kill()
        self.proc.wait()
        self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def fake_cluster():
    cluster = FakeAutoscalingCluster(ROOT / "cluster" / "aws.yaml").start()
    try:
        yield cluster
    finally:
        cluster.stop()


def serve_images(http_server, n: int) -> list[dict]:
    rows = []
    for i, sample in enumerate(synthetic.generate(n, seed=7, size=64)):
        url = http_server.put_file(f"autoscale/img{i}.jpg", synthetic.to_jpeg(sample.image))
        rows.append({"url": url, "caption": sample.caption, "query": sample.concept.shape})
    return rows


def test_fake_config_keeps_aws_node_types():
    cfg = fake_cluster_config(ROOT / "cluster" / "aws.yaml", "127.0.0.1:1")
    from ray.autoscaler._private.util import validate_config

    validate_config(cfg)  # complete already: the wheel ships no defaults for fake_multinode
    assert cfg["available_node_types"]["cpu_crawl"]["resources"] == {"CPU": 2, "crawl": 2}
    assert cfg["available_node_types"]["gpu_train"]["resources"] == {"GPU": 2, "ingest_cpu": 2}
    assert cfg["available_node_types"]["cpu_crawl"]["max_workers"] == 4


def test_crawl_scales_crawl_nodes_up_then_down_and_no_gpu_node(fake_cluster, http_server, tmp_path):
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(serve_images(http_server, 12)), urls)
    out = tmp_path / "shards"
    entrypoint = [
        "python", "jobs/build_wit.py", f"urls={urls}", f"output={out}",
        "crawl.worker_resources={crawl: 1}", "crawl.num_workers=2", "crawl.num_cpus_per_worker=1",
        "crawl.samples_per_shard=4", "crawl.batch_size=4", "crawl.fetch.allowed_networks=[127.0.0.0/8]",
        "crawl.image.image_size=64", "crawl.image.min_size=32",
    ]  # fmt: skip
    assert [n for n in fake_cluster.nodes() if not n.is_head_node] == []

    # Fake nodes share this machine's disk, and each node's runtime-env agent re-extracts an uploaded working
    # dir in place (deleting it under the workers of nodes that started earlier: getcwd() then fails). On one
    # shared disk the checkout itself is the working dir on every node, which is what `local://` means.
    client, job_id = submit_job(fake_cluster.dashboard_url, entrypoint, f"local://{ROOT}")
    seen: dict[str, dict] = {}  # node id -> resources while it was alive
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:
        for node in fake_cluster.nodes():
            if not node.is_head_node and node.state == "ALIVE":
                seen[node.node_id] = dict(node.resources_total)
        status = client.get_job_status(job_id).value
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "12 of 12 samples" in logs

    # Launched for the crawl: crawl-type nodes only (the head has no CPU, so nothing else could run it).
    assert seen, "the autoscaler launched no worker node"
    assert all(r.get("crawl") == NODE_SIZE for r in seen.values()), seen
    assert not any(r.get("GPU") for r in seen.values()), seen

    # Removed once idle: every worker node the cluster ever had is DEAD after the idle timeout.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        workers = [n for n in fake_cluster.nodes() if not n.is_head_node]
        if workers and all(n.state == "DEAD" for n in workers):
            break
        time.sleep(1)
    workers = [n for n in fake_cluster.nodes() if not n.is_head_node]
    assert {n.node_id for n in workers} == set(seen)
    assert all(n.state == "DEAD" for n in workers), [(n.node_id[-5:], n.state) for n in workers]
    assert wait_for_job(client, job_id, timeout=5) == "SUCCEEDED"
