"""Shared set-up of the Ray benchmarks: the repository on sys.path, a local Ray on 127.0.0.1, and a small
tokenizer trained on rendered captions (its vocabulary is the model's). Import before `ray`."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pipelines.local_cluster import LOOPBACK_ENV  # noqa: E402

os.environ.update(LOOPBACK_ENV)  # the benchmark's Ray stays on 127.0.0.1


def start_ray(num_cpus: int) -> None:
    import ray

    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": ROOT}},
    )


def small_tokenizer(folder: str) -> tuple[str, int]:
    """(merges path, vocabulary size) of a tokenizer trained on 500 rendered captions."""
    from clip_model import Tokenizer
    from pipelines.synthetic import generate

    merges = os.path.join(folder, "merges.txt.gz")
    return merges, Tokenizer.train(
        [s.caption for s in generate(500, seed=1, size=32)], 800, merges
    ).vocab_size
