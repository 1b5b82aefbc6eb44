"""Test and benchmark hook: stragglers on demand. The product never calls this module; a test or benchmark
passes `delayed_decode(...)` to `ingest.Decoder(settings, decode=...)` in place of `ingest.decode_batch`.

A decode batch is chosen by its first row's key (a stable hash, so a given batch is chosen whatever process
or thread runs it) and delayed on its first attempt only: the first copy to run leaves a marker file in
`marker_dir` (every process of a one-machine cluster sees it), so a straggler's second copy runs at full
speed, like a copy on a healthy node.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

from pipelines.train.ingest import decode_batch


def chosen(key: str, one_in: int) -> bool:
    """Whether the batch that starts with row `key` is one of the 1-in-`one_in` delayed batches."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % one_in == 0


def delayed_decode(
    marker_dir: str, delay_s: float, one_in: int = 100, keys: set[str] | None = None
) -> Callable:
    """`decode_batch` with the first attempt of chosen batches delayed by `delay_s` seconds: the batches
    whose first key is in `keys`, or else 1 in `one_in` of them. A closure, so Ray ships it by value."""

    def decode(rows: dict[str, list], epoch: int, stage_args: tuple):
        first = rows["key"][0]
        if (first in keys) if keys is not None else chosen(first, one_in):
            marker = os.path.join(marker_dir, hashlib.sha256(f"{epoch}/{first}".encode()).hexdigest()[:32])
            os.makedirs(marker_dir, exist_ok=True)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                time.sleep(delay_s)  # the first attempt: a straggler
            except FileExistsError:
                pass  # a second copy (or a retry): full speed
        return decode_batch(rows, epoch, stage_args)

    return decode
