"""Zero-shot at ImageNet's shape on the tiny model: C classes x T templates (default 1,000 x 80) embedded by
the actor pool, then N images (three sizes) in CLIP_benchmark's WebDataset layout scored by the pool, with the
driver holding only the [D, C] class matrix and streamed counts.

Each size runs `python jobs/eval_clip.py benchmark.datasets=[...] embed.use_ray=always` as a user runs it,
against a separately started `ray start --head --num-cpus=<cores>`. Per size: wall time, the driver's own CPU
and peak RSS (wait4 on the driver: Ray's workers are not its children), and CPU summed with psutil over every
process of the cluster and the driver. Driver memory should not grow with N (nor with C x T: only C x D floats
come back from the prompt pool).

The model is tiny-vit with a 16-token context (`--context 16`; OpenAI's is 77): the prompts fit, and the
80,000 prompts cost minutes instead of tens of minutes on a shared 2-core machine.

    python benchmarks/bench_zeroshot_scale.py                            # 1,000 x 80, N = 1k / 3k / 9k
    python benchmarks/bench_zeroshot_scale.py --classes 100 --templates 8 --sizes 200 400 800   # quick check
The last line is one JSON object: classes, templates, sizes, wall_s, driver_peak_rss_mb, driver_rss_growth_mb,
driver_cpu_s, cluster_cpu_s, images_per_s, load.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench_crawl import ProcessMeter, cluster_pids, tree  # psutil over the cluster's processes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import clip_model  # noqa: E402
from clip_model.zero_shot import DEFAULT_TEMPLATES, TASK_TEMPLATES  # noqa: E402
from pipelines import synthetic  # noqa: E402
from pipelines.local_cluster import LOOPBACK_ENV, LocalRayCluster  # noqa: E402


def templates(n: int) -> list[str]:
    """n distinct prompts in CLIP_benchmark's form (`{c}` slot): ours, then numbered variants."""
    ours = list(dict.fromkeys(DEFAULT_TEMPLATES + [t for ts in TASK_TEMPLATES.values() for t in ts]))
    extra = [f"a photo of a {{}}, view {i}." for i in range(n)]
    return [t.replace("{}", "{c}") for t in (ours + extra)[:n]]


def class_names(n: int) -> list[str]:
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "star", "cross"]
    return [f"{colours[i % 4]} {shapes[i // 4 % 5]} {i}" for i in range(n)]


def write_dataset(root: Path, n: int, num_classes: int, prompts: list[str], per_tar: int = 1000) -> None:
    """CLIP_benchmark's layout: classnames.txt, zeroshot_classification_templates.txt, test/NNNNN.tar."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(class_names(num_classes)) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(prompts) + "\n")
    pool = [synthetic.to_jpeg(s.image) for s in synthetic.generate(64, seed=3)]
    for start in range(0, n, per_tar):
        with tarfile.open(root / "test" / f"{start // per_tar:05d}.tar", "w") as tar:
            for i in range(start, min(n, start + per_tar)):
                for ext, payload in (("jpg", pool[i % len(pool)]), ("cls", f"{i % num_classes}".encode())):
                    info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def write_checkpoint(folder: Path, context: int, num_classes: int) -> None:
    """A tiny-vit with its tokenizer, in the trainer's checkpoint-folder layout."""
    folder.mkdir(parents=True)
    captions = [s.caption for s in synthetic.generate(500, seed=1, size=32)] + class_names(num_classes)
    tok = clip_model.Tokenizer.train(captions, 800, folder / "merges.txt.gz")
    torch.manual_seed(0)
    model = clip_model.create_model("tiny-vit", vocab_size=tok.vocab_size, context_length=context)
    clip_model.save_openai_checkpoint(model, folder / "openai_fp16.pt")


def run_job(cluster: LocalRayCluster, ckpt: Path, data: Path, out: Path, batch: int) -> dict:
    args = [sys.executable, str(ROOT / "jobs/eval_clip.py"), f"checkpoint={ckpt}", f"output_dir={out}",
            f"benchmark.datasets=[{data}]", "embed.use_ray=always", f"embed.batch_size={batch}"]  # fmt: skip
    env = {**os.environ, **LOOPBACK_ENV, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}
    started = time.time()
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with ProcessMeter(lambda: cluster_pids(cluster) | tree(driver.pid), pss_every=10**9) as meter:
        _, status, usage = os.wait4(driver.pid, 0)  # the driver's own CPU and peak RSS
    wall = time.time() - started
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"eval_clip.py failed:\n{driver.stderr.read().decode(errors='replace')[-3000:]}")
    (row,) = json.loads((out / "results.json").read_text())["benchmark"]
    return {"n": row["n"], "wall_s": wall, "driver_cpu_s": usage.ru_utime + usage.ru_stime,
            "driver_rss_mb": usage.ru_maxrss / 1024, "cluster_cpu_s": meter.cpu_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--templates", type=int, default=80)
    parser.add_argument("--sizes", type=int, nargs=3, default=[1000, 3000, 9000])
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    prompts = templates(args.templates)
    rows, loads = [], []
    cluster = LocalRayCluster(num_cpus=args.cpus).start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_zeroshot_scale-") as tmp:
            ckpt = Path(tmp) / "checkpoint"
            write_checkpoint(ckpt, args.context, args.classes)
            for n in args.sizes:
                data = Path(tmp) / f"wds_scale{n}"
                write_dataset(data, n, args.classes, prompts)
                rows.append(run_job(cluster, ckpt, data, Path(tmp) / f"out{n}", args.batch))
                loads.append(round(os.getloadavg()[0], 1))
    finally:
        cluster.stop()
    print(f"{args.classes} classes x {len(prompts)} templates = {args.classes * len(prompts):,} prompts, "
          f"{args.cpus} CPUs, load (1 min) after each size: {loads}")  # fmt: skip
    print(f"{'images':>7} {'wall s':>7} {'images/s':>9} {'driver cpu s':>13} {'driver peak RSS MB':>19} "
          f"{'cluster cpu s':>14}")  # fmt: skip
    for r in rows:
        print(f"{r['n']:>7} {r['wall_s']:>7.1f} {r['n'] / r['wall_s']:>9.1f} {r['driver_cpu_s']:>13.1f} "
              f"{r['driver_rss_mb']:>19.0f} {r['cluster_cpu_s']:>14.1f}")  # fmt: skip
    rss = [round(r["driver_rss_mb"], 1) for r in rows]
    print(json.dumps({
        "classes": args.classes, "templates": len(prompts), "sizes": [r["n"] for r in rows],
        "wall_s": [round(r["wall_s"], 1) for r in rows], "driver_peak_rss_mb": rss,
        "driver_rss_growth_mb": round(rss[-1] - rss[0], 1),
        "driver_cpu_s": [round(r["driver_cpu_s"], 1) for r in rows],
        "cluster_cpu_s": [round(r["cluster_cpu_s"], 1) for r in rows],
        "images_per_s": [round(r["n"] / r["wall_s"], 1) for r in rows], "load": loads,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
