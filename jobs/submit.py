"""Submit one of the jobs to a Ray cluster and wait for it: `ray job submit --working-dir .` plus two checks.

    python jobs/submit.py --address http://127.0.0.1:8265 -- python jobs/build_wit.py --config configs/wit_demo.yaml

- An address where nothing listens fails in seconds with a message naming it (a bare `ray.init` to a dead
  address retries for minutes).
- The repository is shipped as the working dir without virtualenvs, git data and run folders, which would
  otherwise blow Ray's upload limit.

Where every node already has the project on disk (a container image, a shared filesystem), pass
`--working-dir local:///path/to/project`: Ray then uses that directory in place and uploads nothing.

The address is the cluster's dashboard (job API): `--address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS
when it is an http URL, else http://127.0.0.1:8265 (what `ray dashboard cluster/aws.yaml` forwards).
Exits with 0 when the job succeeds, 1 when it fails or is stopped, 2 when the cluster cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python jobs/submit.py` from anywhere

from pipelines.progress import job_env  # noqa: E402
from pipelines.ray_connect import ClusterUnreachable, check_port  # noqa: E402

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# gitignore-style patterns, relative to the working dir.
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", ".venv-*", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info",
]  # fmt: skip


class JobFailed(RuntimeError):
    def __init__(self, job_id: str, status: str, logs: str):
        tail = "\n".join(logs.rstrip().splitlines()[-40:])
        super().__init__(f"job {job_id} ended {status}; last log lines:\n{tail}")
        self.job_id, self.status, self.logs = job_id, status, logs


def job_api_url(address: str | None = None) -> str:
    """Normalises `host:port` or `http(s)://host:port` to an http URL; falls back to the environment."""
    if not address:
        env_addr = os.environ.get("RAY_ADDRESS", "")
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or (
            env_addr if env_addr.startswith(("http://", "https://")) else DEFAULT_ADDRESS
        )
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def check_reachable(address: str, timeout: float = 5.0) -> str:
    """Raises ClusterUnreachable within `timeout` s when nothing accepts connections at `address`."""
    url = job_api_url(address)
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    reason = check_port(host, port, timeout)
    if reason is not None:
        raise ClusterUnreachable(
            f"No Ray cluster at {url}: nothing listens on {host}:{port} ({reason}). Start one with "
            "`ray start --head` (job API on port 8265), or for cluster/aws.yaml open the tunnel with "
            "`ray dashboard cluster/aws.yaml`, or pass the right --address."
        ) from None
    return url


def runtime_env(working_dir: str | Path = ROOT, extra: dict | None = None) -> dict:
    # A job's output is a log: no colours or progress bars (pipelines/progress.py), in every job process.
    env = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": job_env()}
    for key, value in (extra or {}).items():
        if key == "excludes":
            env["excludes"] += list(value)
        elif key == "env_vars":
            env["env_vars"] = {**env.get("env_vars", {}), **value}
        else:
            env[key] = value
    return env


def submit_job(
    address: str | None,
    entrypoint: str | list[str],
    working_dir: str | Path = ROOT,
    runtime_env_extra: dict | None = None,
    submission_id: str | None = None,
):
    """Submits `entrypoint` (run in the uploaded working dir); returns (client, job_id)."""
    import shlex

    from ray.job_submission import JobSubmissionClient

    url = check_reachable(address)
    client = JobSubmissionClient(url)
    if not isinstance(entrypoint, str):
        entrypoint = shlex.join(entrypoint)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env(working_dir, runtime_env_extra),
        submission_id=submission_id,
    )
    return client, job_id


def wait_for_job(client, job_id: str, timeout: float = 3600.0, out: TextIO | None = None) -> str:
    """Polls until the job ends, copying its new log lines to `out`; returns the final status name."""
    from ray.job_submission import JobStatus

    printed = 0
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id)
        if out is not None:
            logs = client.get_job_logs(job_id)
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} still {status.value} after {timeout:.0f}s; stopped it")
        time.sleep(1.0)


def run_job(
    address: str | None,
    entrypoint: str | list[str],
    working_dir: str | Path = ROOT,
    runtime_env_extra: dict | None = None,
    timeout: float = 3600.0,
    out: TextIO | None = sys.stdout,
) -> str:
    """Submit, wait, and raise JobFailed (with the log tail) unless the job succeeded; returns its logs."""
    client, job_id = submit_job(address, entrypoint, working_dir, runtime_env_extra)
    status = wait_for_job(client, job_id, timeout, out)
    logs = client.get_job_logs(job_id)
    if status != "SUCCEEDED":
        raise JobFailed(job_id, status, logs)
    return logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=None, help=f"job API URL (default {DEFAULT_ADDRESS})")
    parser.add_argument(
        "--working-dir", default=str(ROOT), help="folder to upload, or local:///path on every node"
    )
    parser.add_argument("--runtime-env-json", default=None, help="extra runtime_env fields as JSON")
    parser.add_argument("--timeout", type=float, default=24 * 3600.0)
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- python jobs/<job>.py ...")
    args = parser.parse_args(argv)
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entrypoint:
        parser.error("give the command to run after --, e.g. -- python jobs/build_wit.py --config ...")
    extra = json.loads(args.runtime_env_json) if args.runtime_env_json else None
    try:
        run_job(args.address, entrypoint, args.working_dir, extra, args.timeout)
    except ClusterUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"error: job {e.job_id} ended {e.status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
