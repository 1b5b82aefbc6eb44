"""Training throughput on Ray: samples/s, the fraction of step time spent waiting for data, and the bytes per
sample between the decode stage and the trainer (float32 as before vs the uint8 ingest), for the tiny model
and ViT-B/32, CPU, 2 gloo workers reading synthetic WebDataset shards (decode as Ray tasks). Ray is told
the machine's real CPU count.

    python benchmarks/bench_train.py [--models tiny-vit ViT-B/32] [--steps 6]

Builds shards + a small tokenizer in a temp folder (model vocab = tokenizer vocab; otherwise the
architectures are the released ones), runs TorchTrainer for a few steps per model and reports the mean over
the logged steps after the first (which includes the start of the data pipeline).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time

from _ray_setup import small_tokenizer, start_ray  # first: the repository on sys.path, Ray on 127.0.0.1

# isort: split
import ray

from clip_model import get_config
from pipelines.shards import write_dataset
from pipelines.synthetic import synthetic_shard_samples
from pipelines.train.config import TrainConfig
from pipelines.train.trainer import train

DEFAULTS = {"tiny-vit": {"batch": 32, "overrides": {}}, "ViT-B/32": {"batch": 4, "overrides": {}}}


def bench(name: str, root: str, merges: str, vocab: int, steps: int, batch: int) -> dict:
    size = get_config(name).image_resolution
    data = os.path.join(root, f"shards_{size}")
    if not os.path.exists(data):
        write_dataset(
            synthetic_shard_samples(batch * 2 * (steps + 2), seed=0, size=size),
            data,
            batch * 2,
            ("webdataset",),
        )
    cfg = TrainConfig(
        model=name,
        model_overrides={"vocab_size": vocab},
        tokenizer_merges=merges,
        data_uri=data,
        batch_size=batch,
        max_steps=steps,
        warmup_steps=1,
        storage_path=os.path.join(root, "runs"),
        name=name.replace("/", "_"),
        log_every=1,
        checkpoint_every=0,
    )
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d, open(os.path.join(d, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))[1:]
    return {
        "model": name,
        **ingest_bytes(data, merges, size),
        "global batch": batch * cfg.num_workers,
        "steps": steps,
        "samples/s": statistics.mean(float(r["samples_per_s"]) for r in rows),
        "data wait": statistics.mean(float(r["data_wait_frac"]) for r in rows),
        "wall s": wall,
    }


def ingest_bytes(data: str, merges: str, size: int) -> dict:
    """Bytes per sample that travel from the decode stage to the trainer: measured on one decoded batch
    of ours, and what the float32 stage sent (image float32, tokens and key hash int64, status int8)."""
    from pipelines import datasets
    from pipelines.train.ingest import DecodeBatch

    rows = datasets.read_rows(datasets.list_shards(data)[0])
    out = DecodeBatch(size, merges)(rows, epoch=0)
    n = len(rows["key"])
    return {
        "bytes/sample uint8": sum(a.nbytes for a in out.values()) / n,
        "bytes/sample float32": 3 * size * size * 4 + 77 * 8 + 8 + 1,
        "jpeg bytes/sample": sum(len(j) for j in rows["jpg"]) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(DEFAULTS))
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    start_ray(num_cpus=os.cpu_count())
    with tempfile.TemporaryDirectory() as root:
        merges, vocab = small_tokenizer(root)
        results = [
            bench(m, root, merges, vocab, args.steps, DEFAULTS.get(m, {"batch": 8})["batch"])
            for m in args.models
        ]
    ray.shutdown()
    print(
        f"\n{'model':<10} {'global batch':>12} {'steps':>6} {'samples/s':>10} {'data wait':>10} {'wall s':>8} "
        f"{'B/sample f32':>12} {'B/sample u8':>11} {'JPEG B':>7}"
    )
    ref = results[0]["samples/s"]
    for r in results:
        print(
            f"{r['model']:<10} {r['global batch']:>12} {r['steps']:>6} {r['samples/s']:>10.2f} "
            f"{r['data wait']:>10.1%} {r['wall s']:>8.1f} {r['bytes/sample float32']:>12,.0f} "
            f"{r['bytes/sample uint8']:>11,.0f} {r['jpeg bytes/sample']:>7,.0f}"
            f"   ({r['samples/s'] / ref:.3f}x {results[0]['model']})"
        )
    print(
        json.dumps(
            {
                r["model"]: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                for r in results
            }
        )
    )


if __name__ == "__main__":
    main()
