"""The trainer's ingest as the training job runs it, beside open_clip's loader, on the same 256 px
WebDataset shards and the same cores; then the step-time cost of straggling decode tasks.

- ours: a Ray Train TorchTrainer (1 worker, `cpus_per_worker` of the config) on a separately started
  `ray start --head --num-cpus=<cores>`, whose loop is train_clip's ingest (pipelines/train/loop.py
  `build_run` + the stream `open_stream` builds: shard reads in threads, decode + seeded crop + tokenize
  in Ray tasks, re-batching, commit, `_to_device` + `normalize`) with the model step replaced by a no-op;
- open_clip: `open_clip_train.data.get_wds_dataset` (webdataset pipeline + WebLoader/DataLoader with
  `workers` = cores) with `open_clip.image_transform(224, is_train=True)` (RandomResizedCrop scale 0.9-1,
  bicubic, normalise) and its tokenizer, in .venv-openclip (scripts/setup_open_clip.sh), the trainer a
  no-op; batches of the same size, both tokenizers with OpenAI's merges (open_clip's bundled file).
Samples per CPU-second: CPU (user + system) summed with psutil over every process of each (the Ray
cluster's processes; the loader's process tree) between the first and the last batch (start-up excluded
for both), samples = the batches after the first.

Stragglers: the same job with the trainer stepping every `--step-ms` ms and 1 decode task in `--one-in`
delayed by `--delay-s` s on its first attempt (pipelines/train/stragglers.py, passed to the Decoder by
this script), once with today's defaults (seconds ahead + straggler copies) and once with the old fixed
window (`decode_ahead=4`, `decode_ahead_s=0`, no copies). A step is delayed when its data wait exceeds
half a step.

    python benchmarks/bench_ingest.py                    # ~5 min on 2 shared cores
    python benchmarks/bench_ingest.py --samples 1024 --straggler-steps 150   # a quick check
The last line is one JSON object with `ratio_vs_open_clip` and `straggler_delayed_steps`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
from pipelines.local_cluster import LOOPBACK_ENV, LocalRayCluster  # noqa: E402

os.environ.update(
    LOOPBACK_ENV
)  # before Ray is imported (bench_crawl imports it for psutil): Ray stays on 127.0.0.1
from bench_crawl import ProcessMeter, cluster_pids, tree  # noqa: E402

OPEN_CLIP_LOADER = Path(__file__).with_name("open_clip_loader.py")
BPE = "lib/python3.11/site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz"
OLD_WINDOW = {"decode_ahead": 4, "decode_ahead_s": 0.0, "straggler_factor": 0.0}


class Timeline(ProcessMeter):
    """ProcessMeter plus the summed CPU seconds at each sample, to cut out a time window."""

    def __init__(self, pids, interval_s: float = 0.2):
        super().__init__(pids, interval_s, pss_every=10**9)
        self.points: list[tuple[float, float]] = []

    def _sample(self, first: bool = False) -> None:
        super()._sample(first)
        self.points.append((time.time(), self.cpu_s))

    def cpu_between(self, t0: float, t1: float) -> float:
        return _at(self.points, t1) - _at(self.points, t0)


def _at(points: list[tuple[float, float]], t: float) -> float:
    """CPU seconds at time `t`, interpolated between samples."""
    before = max((p for p in points if p[0] <= t), default=points[0])
    after = min((p for p in points if p[0] >= t), default=points[-1])
    if after[0] == before[0]:
        return before[1]
    return before[1] + (after[1] - before[1]) * (t - before[0]) / (after[0] - before[0])


def write_shards(folder: str, samples: int, per_shard: int) -> str:
    from pipelines.shards import write_dataset
    from pipelines.synthetic import synthetic_shard_samples

    write_dataset(synthetic_shard_samples(samples, seed=0, size=256), folder, per_shard, ("webdataset",))
    return folder


def ingest_loop(loop_config: dict) -> None:
    """A training worker's loop with train_clip's ingest and a no-op (or fixed-time) model step."""
    import ray.train

    from pipelines.train import loop
    from pipelines.train.ingest import Decoder, ShardLoader, WorkerStream
    from pipelines.train.position import Position
    from pipelines.train.stragglers import delayed_decode

    bench = loop_config["bench"]
    run = loop.build_run(loop_config)
    decode = delayed_decode(bench["markers"], bench["delay_s"], bench["one_in"]) if bench["delay_s"] else None
    waits, times, epoch, copies = [], [], 0, 0
    while len(waits) < bench["steps"]:
        position = Position.start(epoch, run.shard_names, run.world, run.cfg.seed)
        cursor = position.cursor(run.rank, run.world, run.cfg.shards_in_flight)
        loader = ShardLoader(run.shard_uris, run.cfg.seed, epoch)
        decoder = Decoder(run.decode, decode=decode) if decode else Decoder(run.decode)
        stream = WorkerStream(cursor, loader, decoder, run.cfg.batch_size)
        while len(waits) < bench["steps"]:
            t0 = time.perf_counter()
            batch = stream.next_batch()
            if batch is None:
                break
            waits.append(time.perf_counter() - t0)
            stream.commit()
            loop._to_device(batch, run.device)  # uint8 -> normalised float32, as the loop does
            if bench["step_s"]:
                time.sleep(max(0.0, bench["step_s"] - (time.perf_counter() - t0 - waits[-1])))
            times.append(time.time())
        stream.close()
        copies += stream.duplicated
        epoch += 1
    Path(bench["out"]).write_text(json.dumps({"waits": waits, "times": times, "copies": copies}))
    ray.train.report({"steps": len(waits)}, checkpoint=None)


def run_ours(cluster: LocalRayCluster, data: str, merges: str, tmp: str, args, **bench) -> dict:
    import dataclasses

    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.config import config_to_dict
    from pipelines.train.config import TrainConfig
    from pipelines.train.trainer import resolve_shards

    settings = bench.pop("settings", {})
    cfg = TrainConfig(model="ViT-B/32", tokenizer_merges=merges, data_uri=data, batch_size=args.batch,
                      decode_batch_size=args.decode_batch, num_workers=1, **settings)  # fmt: skip
    shards = resolve_shards(cfg)
    out = os.path.join(tmp, f"ours_{time.time_ns()}.json")
    bench = {"steps": bench.get("steps", args.samples // args.batch), "step_s": 0.0, "delay_s": 0.0,
             "one_in": args.one_in, "markers": tempfile.mkdtemp(dir=tmp), "out": out, **bench}  # fmt: skip
    loop_config = {"config": config_to_dict(dataclasses.replace(cfg, storage_path=tmp)), "bench": bench,
                   "shard_uris": [s.uri for s in shards], "num_rows": sum(s.num_samples for s in shards),
                   "total_steps": bench["steps"]}  # fmt: skip
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        trainer = TorchTrainer(
            ingest_loop, train_loop_config=loop_config, torch_config=TorchConfig(backend="gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=ray.train.RunConfig(name=f"bench_ingest_{time.time_ns()}", storage_path=tmp),
        )  # fmt: skip
        with Timeline(lambda: cluster_pids(cluster)) as meter:
            trainer.fit()
    finally:
        ray.shutdown()
    result = json.loads(Path(out).read_text())
    times = result["times"]
    result["cpu_s"] = meter.cpu_between(times[0], times[-1])
    result["wall_s"] = times[-1] - times[0]
    result["samples"] = (len(times) - 1) * args.batch
    return result


def run_open_clip(data: str, args) -> dict:
    venv = Path(args.venv)
    shards = sorted(str(p) for p in Path(data).glob("*.tar"))
    cmd = [str(venv / "bin/python"), str(OPEN_CLIP_LOADER), "--shards", "::".join(shards),
           "--samples", str(args.samples), "--batch", str(args.batch), "--workers", str(args.cores)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with Timeline(lambda: tree(proc.pid)) as meter:
        output, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip loader exited with {proc.returncode}")
    times = json.loads(output.strip().splitlines()[-1])["times"]
    return {"cpu_s": meter.cpu_between(times[0], times[-1]), "wall_s": times[-1] - times[0],
            "samples": (len(times) - 1) * args.batch}  # fmt: skip


def delayed_share(result: dict, step_s: float) -> tuple[float, float]:
    """(fraction of steps whose data wait exceeded half a step, fraction of time spent waiting)."""
    waits = result["waits"][1:]  # the first step waits for the pipeline to start
    return sum(w > step_s / 2 for w in waits) / len(waits), sum(waits) / (sum(waits) + step_s * len(waits))


def report(results: dict, args) -> dict:
    load = os.getloadavg()
    print(f"\ningest benchmark: {args.cores} cores, {args.samples} samples of 256 px in shards of "
          f"{args.per_shard}, batch {args.batch}, 224 px crops; load average {load[0]:.1f} {load[1]:.1f}")  # fmt: skip
    print(f"{'loader':<34} {'samples':>8} {'wall s':>7} {'cpu s':>7} {'samples/s':>10} {'samples/cpu-s':>14}")
    for name in ("ours", "open_clip"):
        r = results[name]
        r["per_cpu_s"] = r["samples"] / max(r["cpu_s"], 1e-9)
        print(f"{name:<34} {r['samples']:>8} {r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} "
              f"{r['samples'] / r['wall_s']:>10.1f} {r['per_cpu_s']:>14.1f}")  # fmt: skip
    ratio = results["ours"]["per_cpu_s"] / results["open_clip"]["per_cpu_s"]
    print(f"ours / open_clip: {ratio:.2f}x samples per CPU-second")
    print(f"\nstragglers: 1 decode task in {args.one_in} delayed {args.delay_s} s, a step every {args.step_ms} ms, "
          f"{args.straggler_steps} steps, decode batches of {args.straggler_batch}")  # fmt: skip
    print(f"{'ingest':<34} {'delayed steps':>14} {'time waiting':>13} {'copies':>7} {'at 512 ranks':>13}")
    shares = {}
    for name in ("old fixed window (decode_ahead=4)", "seconds ahead + copies (default)"):
        r = results[name]
        shares[name] = delayed_share(r, args.step_ms / 1000)
        delayed, waiting = shares[name]
        at_scale = 1 - (1 - delayed) ** 512  # a synchronous step waits for the slowest of 512 ranks
        print(f"{name:<34} {delayed:>14.1%} {waiting:>13.1%} {r['copies']:>7} {at_scale:>13.1%}")
    old, new = shares.values()
    return {"ratio_vs_open_clip": round(ratio, 3), "straggler_delayed_steps": round(new[0], 4),
            "straggler_delayed_steps_old": round(old[0], 4), "ours_samples_per_cpu_s":
            round(results["ours"]["per_cpu_s"], 1), "open_clip_samples_per_cpu_s":
            round(results["open_clip"]["per_cpu_s"], 1), "load_avg_1m": round(load[0], 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--straggler-steps", type=int, default=400)
    parser.add_argument("--straggler-batch", type=int, default=16)
    parser.add_argument("--step-ms", type=int, default=100)
    parser.add_argument("--delay-s", type=float, default=2.0)
    parser.add_argument("--one-in", type=int, default=100)
    parser.add_argument("--venv", default=str(ROOT / ".venv-openclip"))
    args = parser.parse_args()
    if not Path(args.venv, "bin/python").exists():
        subprocess.run(["bash", str(ROOT / "scripts/setup_open_clip.sh"), args.venv], check=True)
    merges = str(Path(args.venv, BPE))  # OpenAI's merges, as open_clip ships them: the same tokenizer
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        data = write_shards(os.path.join(tmp, "shards"), args.samples, args.per_shard)
        results["open_clip"] = run_open_clip(data, args)
        cluster = LocalRayCluster(num_cpus=args.cores).start()
        try:
            results["ours"] = run_ours(cluster, data, merges, tmp, args)
            straggle = argparse.Namespace(**{**vars(args), "batch": args.straggler_batch,
                                             "decode_batch": args.straggler_batch})  # fmt: skip
            for name, settings in (("old fixed window (decode_ahead=4)", OLD_WINDOW),
                                   ("seconds ahead + copies (default)", {})):  # fmt: skip
                results[name] = run_ours(cluster, data, merges, tmp, straggle, settings=settings,
                                         steps=args.straggler_steps, step_s=args.step_ms / 1000,
                                         delay_s=args.delay_s)  # fmt: skip
        finally:
            cluster.stop()
    print(json.dumps(report(results, args)))


if __name__ == "__main__":
    main()
