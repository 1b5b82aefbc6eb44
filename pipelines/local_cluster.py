"""Start and stop a private `ray start --head` cluster on 127.0.0.1 (the demo, the tests).

Every port and the temp dir are chosen fresh, so several clusters can share a machine, and teardown stops
only this cluster (a bare `ray stop` would stop every cluster on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


# A private cluster on this machine: no token auth, no usage stats, and every Ray process on 127.0.0.1
# (without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray swaps 127.0.0.1 for the machine's routable address).
LOOPBACK_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def ray_executable() -> str:
    """The `ray` CLI of this interpreter's environment (also when that environment is not activated)."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def head_command(temp_dir: str, num_cpus: int, *extra_args: str) -> tuple[list[str], str, str]:
    """`ray start --head --block` on 127.0.0.1 with every port fresh: (command, GCS address, dashboard URL)."""
    gcs, dash, agent_http, agent_grpc, rt_env, metrics, node_mgr, obj_mgr, client = free_ports(9)
    worker_lo = 10000 + (gcs % 20) * 1000  # below the ephemeral range the other ports come from
    cmd = [
        ray_executable(), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--ray-client-server-port={client}",
        f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 999}",
        f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        *extra_args,
    ]  # fmt: skip
    return cmd, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"


# One more node of a cluster on this machine, on 127.0.0.1. `ray start --address` cannot do that: with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps Ray on the loopback address) it refuses to start a second
# node, and with it on it swaps 127.0.0.1 for the machine's routable address. This is what
# ray.cluster_utils.Cluster.add_node does, in a process of its own; it stops its node on SIGTERM.
NODE_LAUNCHER = """
import json, signal, sys
from ray._private.node import Node
from ray._private.parameter import RayParams
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
node = Node(RayParams(**json.loads(sys.argv[1])), head=False, shutdown_at_exit=True, spawn_reaper=True)
print("node started", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
"""


def worker_command(address: str, temp_dir: str, num_cpus: float, resources: dict | None = None) -> list[str]:
    """A process that runs one more node joining `address`, on 127.0.0.1, every port fresh, its own temp dir."""
    agent_http, agent_grpc, rt_env, metrics, node_mgr, obj_mgr = free_ports(6)
    worker_lo = 10000 + (node_mgr % 20) * 1000
    params = {
        "gcs_address": address, "node_ip_address": "127.0.0.1", "num_cpus": num_cpus,
        "resources": resources or {}, "temp_dir": temp_dir, "object_store_memory": 300 * 1024 * 1024,
        "dashboard_agent_listen_port": agent_http, "metrics_agent_port": agent_grpc,
        "runtime_env_agent_port": rt_env, "metrics_export_port": metrics, "node_manager_port": node_mgr,
        "object_manager_port": obj_mgr, "min_worker_port": worker_lo, "max_worker_port": worker_lo + 999,
    }  # fmt: skip
    return [sys.executable, "-c", NODE_LAUNCHER, json.dumps(params)]


@dataclass
class LocalRayCluster:
    """A head node in its own process group; `address` for ray.init, `dashboard_url` for job submission.

    `add_node` joins more nodes on 127.0.0.1 (a multi-node cluster on one machine). Each node has its own
    temp dir, hence its own session dir: its runtime-env agent unpacks an uploaded working dir where no other
    node's agent does (with one shared session dir, each new node's agent re-extracted it in place, under the
    feet of the workers of the nodes started before). `drop_env` names variables the cluster's processes must
    not inherit (e.g. PYTHONPATH, to prove that workers import the uploaded working dir)."""

    num_cpus: int = 4
    resources: dict | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    drop_env: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    temp_dir: str = ""
    address: str = ""
    dashboard_url: str = ""
    nodes: list[tuple[subprocess.Popen, str]] = field(default_factory=list)  # (process, temp dir) per node

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **LOOPBACK_ENV, **self.env}
        # Jobs' `python ...` entrypoints and Ray's workers use this interpreter's environment, activated or not.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        for name in self.drop_env:
            env.pop(name, None)
        return env

    def start(self, timeout: float = 90.0) -> LocalRayCluster:
        # Unix socket paths must stay short, so the temp dir lives directly under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
        cmd, self.address, self.dashboard_url = head_command(self.temp_dir, self.num_cpus, *self.extra_args)
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        self.proc = subprocess.Popen(
            cmd, env=self._env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_for_dashboard(timeout)
        return self

    def add_node(self, num_cpus: float, resources: dict | None = None, timeout: float = 90.0) -> None:
        """Start one more node and wait until the cluster counts it alive."""
        from ray.util.state import list_nodes

        temp_dir = tempfile.mkdtemp(prefix="rayn_", dir="/tmp")
        proc = subprocess.Popen(
            worker_command(self.address, temp_dir, num_cpus, resources), env=self._env(),
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.nodes.append((proc, temp_dir))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"ray start (node) exited: {proc.stderr.read().decode(errors='replace')[-3000:]}"
                )
            alive = [n for n in list_nodes(address=self.dashboard_url) if n.state == "ALIVE"]
            if len(alive) == 1 + len(self.nodes):
                return
            time.sleep(0.5)
        raise TimeoutError(f"node with temp dir {temp_dir} did not join after {timeout}s")

    def _wait_for_dashboard(self, timeout: float) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {err}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Ray dashboard at {self.dashboard_url} not up after {timeout}s")

    def stop(self) -> None:
        for proc, temp_dir in self.nodes:
            _stop_group(proc, temp_dir)
        self.nodes = []
        if self.proc is not None:
            _stop_group(self.proc, self.temp_dir)
        self.proc = None


def _stop_group(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop a `ray start --block` started in its own session, and whatever it left running."""
    if proc.poll() is None:
        # SIGTERM asks `ray start --block` and the daemons in its group to exit; give them a moment.
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Ray workers and daemons leave the process group; find them by the node's private temp dir.
    subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)
    shutil.rmtree(temp_dir, ignore_errors=True)
