"""The filter job's embed stage as users run it, against a plain PyTorch loop over the same model and images.

Ours: `python jobs/filter_wit.py ... embed_only=true` against a separately started `ray start --head`
(pipelines/local_cluster.py, told the real CPU count): read + decode tasks, the embedding actor pool, the
per-shard commit. CPU is summed with psutil over every process of the cluster and the driver (bench_crawl's
ProcessMeter), so images per CPU-second include Ray's own overhead. The plain loop: one process decoding,
preprocessing and embedding the same images in the same chunks. Models: the narrow tiny-vit of the filter's
tests and a randomly initialised ViT-B/32. Then the driver's peak RSS (wait4) at three corpus sizes.
Prints a table and, last, one JSON line: ratio_vs_plain_loop (per model), driver_rss_mb (per size).

    .venv/bin/python benchmarks/bench_embed.py --images 128 --rss-sizes 128 256 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _ray_setup  # noqa: F401  (repository on sys.path)
from bench_crawl import ProcessMeter, cluster_pids, tree

from pipelines.local_cluster import LOOPBACK_ENV, LocalRayCluster

ROOT = _ray_setup.ROOT


def make_checkpoint(folder: str, name: str) -> str:
    import torch

    import clip_model
    from pipelines.filter.clean_model import NARROW

    os.makedirs(folder, exist_ok=True)
    merges, vocab = _ray_setup.small_tokenizer(folder)
    torch.manual_seed(0)
    overrides = dict(NARROW, image_resolution=32, context_length=77) if name == "tiny" else {}
    model = clip_model.create_model(
        "tiny-vit" if name == "tiny" else "ViT-B/32", vocab_size=vocab, **overrides
    )
    clip_model.save_openai_checkpoint(model, os.path.join(folder, "openai_fp16.pt"))
    return folder


def make_shards(folder: str, n: int, per_shard: int = 64) -> str:
    from pipelines import shards, synthetic

    samples = list(synthetic.synthetic_shard_samples(n, seed=3, size=64))
    for i in range(0, n, per_shard):
        shards.write_shard(samples[i : i + per_shard], folder, f"{i // per_shard:05d}", ("webdataset",))
    return folder


def run_job(
    cluster: LocalRayCluster, data: str, ckpt: str, out: str, chunk: int
) -> tuple[float, float, float]:
    """(cluster + driver CPU s, driver peak RSS MB, wall s) of one embed-only job; a driver that could not
    connect (seen on a heavily loaded machine: the head's node not registered yet) is started again."""
    for attempt in range(3):
        try:
            return _run_job(cluster, data, ckpt, out, chunk)
        except RuntimeError:
            if attempt == 2:
                raise
            time.sleep(10)
    raise AssertionError("unreachable")


def _run_job(
    cluster: LocalRayCluster, data: str, ckpt: str, out: str, chunk: int
) -> tuple[float, float, float]:
    args = [sys.executable, os.path.join(ROOT, "jobs/filter_wit.py"), f"data_uri={data}", f"output={out}",
            f"checkpoint={ckpt}", "embed_only=true", f"embed.chunk_size={chunk}", "embed.device=cpu"]  # fmt: skip
    env = {**os.environ, **LOOPBACK_ENV, "RAY_ADDRESS": cluster.address, "PYTHONPATH": ROOT}
    started = time.time()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
    with ProcessMeter(lambda: cluster_pids(cluster) | tree(proc.pid)) as meter:
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError("filter_wit.py failed")
    return meter.cpu_s, usage.ru_maxrss / 1024, time.time() - started


def plain_loop(data: str, ckpt: str, chunk: int) -> tuple[int, float]:
    """(images, CPU s) of decode + preprocess + embed in this process, chunk by chunk."""
    from pipelines import datasets
    from pipelines.evaluation.embed import find_merges
    from pipelines.filter.store import ChunkEmbedder, _tokenizer, prepare_pixels

    t0 = time.process_time()
    embedder = ChunkEmbedder(ckpt, device="cpu")
    tok = _tokenizer(find_merges(ckpt), embedder.context)
    n = 0
    for uri in datasets.list_shards(data):
        rows = datasets.read_rows(uri)
        for lo in range(0, len(rows["key"]), chunk):
            import numpy as np

            pixels = np.stack([prepare_pixels(j, embedder.size)[0] for j in rows["jpg"][lo : lo + chunk]])
            tokens = tok(rows["txt"][lo : lo + chunk]).numpy().astype(np.int32)
            embedder.embed(pixels, tokens)
            n += len(pixels)
    return n, time.process_time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--rss-sizes", type=int, nargs=3, default=[128, 256, 512])
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    rows, ratios, rss = [], {}, []
    cluster = LocalRayCluster(num_cpus=args.cpus).start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_embed-") as tmp:
            data = make_shards(os.path.join(tmp, "data"), args.images)
            for name in ("tiny", "ViT-B/32"):
                ckpt = make_checkpoint(os.path.join(tmp, name.replace("/", "")), name)
                cpu, _, wall = run_job(cluster, data, ckpt, os.path.join(tmp, f"out-{name[:4]}"), args.chunk)
                n, plain_cpu = plain_loop(data, ckpt, args.chunk)
                ratios[name] = (args.images / cpu) / (n / plain_cpu)
                rows.append((name, args.images / cpu, n / plain_cpu, ratios[name], wall))
            ckpt = os.path.join(tmp, "tiny")
            for size in args.rss_sizes:
                d = make_shards(os.path.join(tmp, f"rss{size}"), size)
                rss.append(run_job(cluster, d, ckpt, os.path.join(tmp, f"rss-out{size}"), args.chunk)[1])
    finally:
        cluster.stop()
    print(f"{'model':<10}{'ours img/CPU-s':>16}{'plain img/CPU-s':>17}{'ratio':>8}{'job wall s':>12}")
    for name, ours, plain, ratio, wall in rows:
        print(f"{name:<10}{ours:>16.1f}{plain:>17.1f}{ratio:>8.2f}{wall:>12.1f}")
    print("driver peak RSS MB at " + ", ".join(f"{s}: {r:.0f}" for s, r in zip(args.rss_sizes, rss)))
    print(f"load average {os.getloadavg()}, cpus {args.cpus}")
    print(json.dumps({"ratio_vs_plain_loop": {k: round(v, 3) for k, v in ratios.items()},
                      "driver_rss_mb": {str(s): round(r, 1) for s, r in zip(args.rss_sizes, rss)}}))  # fmt: skip


if __name__ == "__main__":
    main()
