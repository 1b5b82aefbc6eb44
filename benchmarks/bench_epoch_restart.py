"""Training ingest across epochs: time to the first batch of each epoch and epoch wall time, with the
decode/augment/tokenize stage run as tasks (`prepare_batch`, what the trainer uses) or as an actor pool
(`PrepareBatch`, the reference), on the same synthetic WebDataset shards, 2 CPUs.

    python benchmarks/bench_epoch_restart.py [--samples 1024] [--epochs 4]

Every epoch re-executes the Ray Data graph. An actor pool starts new actor processes (imports, tokenizer)
each time; tasks run in Ray's pooled worker processes, which keep the stage built by the first epoch.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

from _ray_setup import small_tokenizer, start_ray  # first: the repository on sys.path, Ray on 127.0.0.1

# isort: split
import ray
import ray.data

from pipelines.shards import write_dataset
from pipelines.synthetic import synthetic_shard_samples
from pipelines.train import ingest

SIZE = 64


def dataset(mode: str, data: str, merges: str) -> ray.data.Dataset:
    base = ingest.read_shards(data, "webdataset", seed=0, num_cpus=0.5)
    kwargs = {"image_size": SIZE, "merges_path": merges, "context_length": 77}
    common = {"batch_size": 64, "batch_format": "numpy", "num_cpus": 0.5}
    if mode == "tasks":
        return base.map_batches(ingest.prepare_batch, fn_kwargs=kwargs, concurrency=1, **common)
    return base.map_batches(
        ingest.PrepareBatch,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=1),
        **common,
    )


def run(mode: str, data: str, merges: str, epochs: int) -> list[tuple[float, float, int]]:
    ds = dataset(mode, data, merges)
    out = []
    for _ in range(epochs):
        t0, first, rows = time.perf_counter(), None, 0
        for batch in ds.iter_batches(batch_size=32):
            first = time.perf_counter() - t0 if first is None else first
            rows += len(batch["key_hash"])
        out.append((first, time.perf_counter() - t0, rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    start_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as root:
        merges, _ = small_tokenizer(root)
        data = os.path.join(root, "shards")
        write_dataset(
            synthetic_shard_samples(args.samples, seed=0, size=SIZE), data, 128, formats=("webdataset",)
        )
        results = {mode: run(mode, data, merges, args.epochs) for mode in ("actor pool", "tasks")}
    ray.shutdown()

    print(f"\n{args.samples} samples of {SIZE} px per epoch, {args.epochs} epochs, 2 CPUs")
    print(
        f"| {'decode stage':<12} | {'first batch, epoch 1 s':>22} | {'first batch, later epochs s':>27} "
        f"| {'later epochs wall s':>19} | {'samples/s (later)':>17} | {'vs actor pool':>13} |"
    )
    print("|" + "|".join("-" * n for n in (14, 24, 29, 21, 19, 15)) + "|")
    reference = None
    for mode, epochs in results.items():
        later = epochs[1:]
        assert all(rows == args.samples for _, _, rows in epochs), epochs  # every sample, every epoch
        first_later = statistics.mean(f for f, _, _ in later)
        wall_later = statistics.mean(w for _, w, _ in later)
        rate = args.samples / wall_later
        reference = reference or rate
        print(
            f"| {mode:<12} | {epochs[0][0]:>22.1f} | {first_later:>27.1f} | {wall_later:>19.1f} "
            f"| {rate:>17,.0f} | {rate / reference:>12.1f}x |"
        )
    print(f"peak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
