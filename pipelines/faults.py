"""Test-only fault injection: make a named task fail on its first attempt, so Ray retries it.

Off unless `CLIP_TEST_FAULTS` is set. It lists `point:key` pairs (comma-separated; `key` may be `*`) and
`CLIP_TEST_FAULTS_DIR` names a folder every node can write (the tests' tmp dir). The first call of
`maybe_fail(point, key)` for a listed pair leaves a marker file there and raises `InjectedFault`; later
calls (Ray's retry of the same task) find the marker and pass. Workers inherit both variables from the
job's environment.
"""

from __future__ import annotations

import hashlib
import os

ENV_FAULTS = "CLIP_TEST_FAULTS"
ENV_DIR = "CLIP_TEST_FAULTS_DIR"


class InjectedFault(RuntimeError):
    """Raised by `maybe_fail` on a task's first attempt (tests only)."""


def _listed(point: str, key: str) -> bool:
    for item in os.environ.get(ENV_FAULTS, "").split(","):
        p, _, k = item.strip().partition(":")
        if p == point and k in ("*", key):
            return True
    return False


def maybe_fail(point: str, key: object = "") -> None:
    """Raise once for (`point`, `key`) when the test switch lists it; a no-op otherwise."""
    if not os.environ.get(ENV_FAULTS) or not _listed(point, str(key)):
        return
    folder = os.environ.get(ENV_DIR)
    if not folder:
        raise RuntimeError(f"{ENV_FAULTS} is set but {ENV_DIR} is not")
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, hashlib.sha256(f"{point}\0{key}".encode()).hexdigest()[:32])
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # a retry: the fault already happened once
    os.close(fd)
    raise InjectedFault(f"injected fault at {point}:{key} (first attempt)")
