"""Train CLIP on shards with Ray Train (DDP workers fed by Ray Data).

    python jobs/train_clip.py --config configs/train_tiny.yaml data_uri=/data/shards num_workers=4
    python jobs/train_clip.py --config configs/train_vit_b32.yaml 'data_uri=s3://bucket/{00000..01023}.tar'
    ray job submit --working-dir . -- python jobs/train_clip.py --config configs/train_tiny.yaml

`data_uri` takes our shards, img2dataset's output folder, a brace list or a single shard (see
pipelines/datasets.py); `selection=` trains on only the rows a filter selected (pipelines/selection.py).
Without `storage_path`, checkpoints go to `s3://<data bucket>/runs` (data on S3) or `runs/` (a single-node
cluster); a multi-node cluster with local data needs it set.

Joins a running Ray cluster when there is one (`ray.init()`), else starts a local one. Prints the latest
checkpoint (full training state + FP16 OpenAI-layout weights) and the final metrics.
"""

from __future__ import annotations

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python jobs/train_clip.py` from anywhere

from pipelines import progress  # noqa: E402
from pipelines.config import parse_args  # noqa: E402
from pipelines.ray_connect import connect  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402
from pipelines.train.trainer import SetupError, build_trainer, preflight  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    progress.setup()  # plain job logs: no escape sequences, one line per finished stage
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:  # Ray Train's own per-report lines too
        argv = [a for a in argv if a != "--verbose"] + ["verbose=true"]
    cfg = parse_args(TrainConfig, argv, description=__doc__)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        preflight(cfg)  # set-up problems that need no cluster: before Ray is even joined or started
    except SetupError as e:
        print(f"train_clip: {e}", file=sys.stderr)
        return 2
    # Workers import clip_model/pipelines from this checkout (ray job submit ships it as the working dir).
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    connect(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        trainer = build_trainer(cfg)  # set-up problems surface here, before any training worker starts
    except SetupError as e:
        print(f"train_clip: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.fit()
        error = result.error
    except Exception as e:  # Ray Train raises the workers' error from fit()
        error = e
    if error is not None:
        print(f"training failed: {failure_line(error)}", file=sys.stderr)
        return 1
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    print(f"metrics: {json.dumps(result.metrics, default=str)}")
    return 0


def failure_line(error: BaseException) -> str:
    """The workers' own error (e.g. too many bad shards) in one line, not Ray Train's wrapping of it."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    if not lines:
        return type(cause).__name__
    return re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])  # the traceback's last line, unqualified


if __name__ == "__main__":
    sys.exit(main())
