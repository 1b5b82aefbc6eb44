"""Resume state at scale: the checkpoint's data-position bytes and the time from loading a position to the
first batch's rows, for epochs of 10k, 100k and 1M samples, at 90% of the epoch.

    python benchmarks/bench_resume_scale.py [--sizes 10000 100000 1000000] [--per-shard 1000] [--workers 4]

Synthetic shard index (every shard `--per-shard` rows; no images): this measures the position logic
(pipelines/train/position.py) that a real resume runs before its first decode. Beside it, the record the
trainer kept before: every consumed sample's 8-byte key hash, turned into a Python set on resume.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pipelines.train.position import Position  # noqa: E402


def measure(samples: int, per_shard: int, workers: int, batch: int, width: int = 4) -> dict:
    names = [f"{i:05d}" for i in range(samples // per_shard)]
    size_of = lambda shard: per_shard  # noqa: E731  (sizes as an index gives them)
    start = Position.start(0, names, workers, seed=0)
    cursors = [start.cursor(rank=r, world=workers, width=width) for r in range(workers)]
    per_worker = int(samples * 0.9) // workers
    t0 = time.perf_counter()
    for c in cursors:
        for _ in range(per_worker):
            c.next(size_of)
    walk_s = time.perf_counter() - t0
    parts = [
        {"rank": c.rank, "finished": c.finished, **c.state(), "trained": per_worker, "bad": {}}
        for c in cursors
    ]
    position = start.merge(parts, workers)
    stored = pickle.dumps(position.to_dict(), protocol=pickle.HIGHEST_PROTOCOL)  # what torch.save writes

    t0 = time.perf_counter()
    restored = Position(**pickle.loads(stored))
    restored.check(names)
    cursor = restored.cursor(rank=0, world=workers, width=width)
    first = [cursor.next(size_of) for _ in range(batch)]
    resume_s = time.perf_counter() - t0
    assert first[0] is not None

    consumed = np.arange(per_worker * workers, dtype=np.int64)  # the old record: one hash per sample
    t0 = time.perf_counter()
    old_bytes = len(pickle.dumps(consumed, protocol=pickle.HIGHEST_PROTOCOL))
    set(pickle.loads(pickle.dumps(consumed)).tolist())
    old_s = time.perf_counter() - t0
    return {"samples": samples, "shards": len(names), "position_bytes": len(stored), "resume_s": resume_s,
            "old_bytes": old_bytes, "old_resume_s": old_s, "walk_s": walk_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    rows = [measure(n, args.per_shard, args.workers, args.batch) for n in args.sizes]
    print(f"\nposition at 90% of an epoch, {args.workers} workers, {args.per_shard} samples per shard")
    print(f"| {'samples':>9} | {'shards':>6} | {'position bytes':>14} | {'resume to 1st batch s':>21} "
          f"| {'old record bytes':>16} | {'old set build s':>15} |")  # fmt: skip
    print("|" + "|".join("-" * n for n in (11, 8, 16, 23, 18, 17)) + "|")
    for r in rows:
        print(f"| {r['samples']:>9,} | {r['shards']:>6} | {r['position_bytes']:>14,} | {r['resume_s']:>21.4f} "
              f"| {r['old_bytes']:>16,} | {r['old_resume_s']:>15.3f} |")  # fmt: skip
    print(json.dumps({
        "samples": [r["samples"] for r in rows],
        "position_bytes": [r["position_bytes"] for r in rows],
        "resume_first_batch_s": [round(r["resume_s"], 5) for r in rows],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
