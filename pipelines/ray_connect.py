"""`connect()`: ray.init for the jobs' entry points, failing in seconds when the named cluster is not there.

A bare `ray.init(address="host:port")` (or RAY_ADDRESS pointing at a dead head) retries for minutes before it
gives up. `connect` first checks that something accepts connections at the address's port (the GCS of a
`ray start --head`, or a Ray Client server for `ray://`) and raises `ClusterUnreachable` naming the address
if not. Without an address (argument or RAY_ADDRESS), and for "auto"/"local", it is plain `ray.init`: join
the running cluster if there is one, else start a local one.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 5.0


class ClusterUnreachable(ConnectionError):
    """Nothing answers at a Ray cluster address."""


def host_port(address: str, default_port: int = 6379) -> tuple[str, int]:
    """`host:port`, `ray://host:port` or `http://host:port` -> (host, port)."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname:
        raise ValueError(f"not a cluster address: {address!r} (expected host:port)")
    return parts.hostname, parts.port or default_port


def check_port(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to host:port succeeds within `timeout` s, else why it did not."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
    return None


def check_cluster(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raises ClusterUnreachable when nothing listens at a Ray cluster `address`."""
    host, port = host_port(address)
    reason = check_port(host, port, timeout)
    if reason is not None:
        source = " (from RAY_ADDRESS)" if os.environ.get("RAY_ADDRESS") == address else ""
        raise ClusterUnreachable(
            f"No Ray cluster at {address}{source}: nothing listens on {host}:{port} ({reason}). Start one "
            "with `ray start --head`, fix the address, or unset RAY_ADDRESS to run on a local Ray."
        )


def connect(address: str | None = None, **init_kwargs):
    """ray.init(address, **init_kwargs) after checking that a given address (or RAY_ADDRESS) is reachable."""
    import ray

    target = address or os.environ.get("RAY_ADDRESS") or None
    if target and target not in ("auto", "local"):
        check_cluster(target)
    return ray.init(address=address, **init_kwargs)
