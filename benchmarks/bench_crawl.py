"""The real crawl job vs img2dataset on the same URL list, the same cores, the same output format.

A loopback HTTP server (its own process, not counted) serves N distinct URLs over a pool of web-sized
JPEG photos (scikit-image's, resized to 500-1500 px; each URL's bytes get a unique trailer after the
JPEG end marker, so content dedupe keeps them all). Then, for a clean server and for one that adds
50-500 ms per response (a long tail, like the web):
- ours: `python jobs/build_wit.py urls=<table> ...` as a user runs it, against a separately started
  `ray start --head --num-cpus=<cores>`: the driver's connect, the read, the crawl actors and the shard
  writing all count. CPU is summed with psutil over every process of the Ray cluster (the head's
  process tree and every process of its session: raylet, GCS, dashboard, workers) plus the driver's
  tree, since the OS's child accounting misses Ray's workers; memory is the peak of their summed RSS;
- img2dataset: its `download()` from .venv-img2dataset (scripts/setup_img2dataset.sh), `processes_count`
  = cores, the same url+caption Parquet, resize_mode keep_ratio to the same short side, WebDataset,
  JPEG quality 95; CPU and memory summed over its process tree the same way.
The physical anchor: our image path alone (Pillow draft decode + resize + JPEG encode) in a tight loop on
one core, in images per CPU-second; each engine's images per CPU-second is printed against it.

    python benchmarks/bench_crawl.py --n 10000            # the issue's size (~10+ min on 2 cores)
    python benchmarks/bench_crawl.py --n 300 --latency-n 300   # a quick check that everything runs
The last line is one JSON object: ratio_wall, ratio_per_cpu_s, ratio_latency_wall (ours / img2dataset).
"""

from __future__ import annotations

import argparse
import http.server
import importlib
import io
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

try:
    import psutil
except ImportError:  # not a dependency of ours: Ray ships one and puts it on sys.path on import
    import ray  # noqa: F401

    psutil = importlib.import_module("psutil")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# `ray start` and the job's driver come from this interpreter's environment.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

from pipelines.local_cluster import LOOPBACK_ENV, LocalRayCluster  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "clock", "brick")


def photo_pool(variants: int = 2, seed: int = 0) -> list[bytes]:
    """Web-sized JPEG photos: scikit-image's photos resized to a long side of 500-1500 px, with a
    little sensor-like noise so that they compress like camera photos (~1.5 bits/pixel at q90)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    out = []
    for name in PHOTOS:
        array = getattr(data, name)()
        if array.dtype == bool:
            array = (array * 255).astype(np.uint8)
        image = Image.fromarray(array).convert("RGB")
        for _ in range(variants):
            scale = int(rng.integers(500, 1501)) / max(image.size)
            size = (round(image.width * scale), round(image.height * scale))
            pixels = np.asarray(image.resize(size, Image.Resampling.LANCZOS), np.float32)
            pixels += rng.normal(0, 3, (size[1], size[0], 1))
            buf = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def response_delay(index: int) -> float:
    """50-500 ms, most near 50-100 ms, a long tail (deterministic per URL)."""
    return 0.05 + 0.45 * random.Random(index).random() ** 4


def serve(port_queue: multiprocessing.Queue, latency: bool) -> None:
    pool = photo_pool()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            name = self.path.rsplit("/", 1)[-1].split(".")[0]
            if not name.isdigit():  # robots.txt and anything else: not found
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            index = int(name)
            if latency:
                time.sleep(response_delay(index))
            body = pool[index % len(pool)] + b"bench-unique-%d" % index  # after EOI: same image
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # 100+ clients connecting at once overflow the default backlog (5)

    server = Server(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    server.serve_forever()


class Server:
    def __init__(self, latency: bool):
        self.queue: multiprocessing.Queue = multiprocessing.Queue()
        self.proc = multiprocessing.Process(target=serve, args=(self.queue, latency), daemon=True)

    def __enter__(self) -> int:
        self.proc.start()
        return self.queue.get(timeout=120)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.join()


class ProcessMeter:
    """Samples a changing set of processes: CPU (user + system, summed over every process seen, from
    its time at the start or its birth), the peak of their summed RSS and, every `pss_every`-th sample
    (it costs ~1 ms a process), of their summed PSS: RSS counts shared pages (Ray's object store, mapped
    by every worker; forked children) once per process, PSS splits them among the processes."""

    def __init__(self, pids: Callable[[], set[int]], interval_s: float = 0.2, pss_every: int = 10):
        self.pids, self.interval_s, self.pss_every = pids, interval_s, pss_every
        self.procs: dict[int, psutil.Process] = {}
        self.start_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.peak_rss = self.peak_pss = self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessMeter:
        self._sample(first=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()

    @property
    def cpu_s(self) -> float:
        return sum(self.last_cpu[p] - self.start_cpu.get(p, 0.0) for p in self.last_cpu)

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self._sample()

    def _sample(self, first: bool = False) -> None:
        rss = pss = 0
        self.samples += 1
        with_pss = self.samples % self.pss_every == 1
        for pid in self.pids():
            try:
                proc = self.procs.get(pid) or self.procs.setdefault(pid, psutil.Process(pid))
                times = proc.cpu_times()
                cpu = times.user + times.system
                rss += proc.memory_info().rss
                pss += proportional_set_size(pid) if with_pss else 0
            except (psutil.Error, OSError):
                continue
            if first:
                self.start_cpu[pid] = cpu
            self.last_cpu[pid] = cpu
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)


def proportional_set_size(pid: int) -> int:
    """Bytes of the process's PSS, from /proc/<pid>/smaps_rollup."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def tree(pid: int) -> set[int]:
    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.Error:
        return set()


def cluster_pids(cluster: LocalRayCluster) -> set[int]:
    """The head's process tree plus every process of its session (workers leave the tree)."""
    pids = tree(cluster.proc.pid)
    for proc in psutil.process_iter(["cmdline"]):
        if cluster.temp_dir in " ".join(proc.info["cmdline"] or ()):
            pids.add(proc.pid)
    return pids


def run_ours(cluster: LocalRayCluster, table: str, out: str, args: argparse.Namespace) -> dict:
    overrides = [
        f"urls={table}", f"output={out}", "formats=[webdataset]",
        "crawl.fetch.allowed_networks=[127.0.0.0/8]",
        # one loopback host stands for the whole web here: no per-host limit (img2dataset has none)
        "crawl.fetch.per_host_rate=0", "crawl.fetch.per_host_concurrency=100000",
        f"crawl.samples_per_shard={args.per_shard}", f"crawl.image.image_size={args.image_size}",
        "crawl.image.resize_mode=keep_aspect", "crawl.image.jpeg_quality=95",
        *args.job_set,
    ]  # fmt: skip
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **LOOPBACK_ENV, "RAY_ADDRESS": cluster.address, "PYTHONPATH": path}
    started = time.time()
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs/build_wit.py"), *overrides],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    with ProcessMeter(lambda: cluster_pids(cluster) | tree(driver.pid)) as meter:
        output, _ = driver.communicate()
    wall = time.time() - started
    if driver.returncode != 0:
        raise RuntimeError(f"build_wit exited with {driver.returncode}:\n{output[-3000:]}")
    stats = json.loads(Path(out, "_stats.json").read_text())
    return {"images": stats["totals"]["kept"], "wall_s": wall, "cpu_s": meter.cpu_s,
            "peak_mem_mb": meter.peak_rss / 2**20, "peak_pss_mb": meter.peak_pss / 2**20}  # fmt: skip


def run_img2dataset(venv: str, table: str, out: str, args: argparse.Namespace) -> dict:
    runner = (
        "from img2dataset import download\n"
        "if __name__ == '__main__':\n"
        f"    download(url_list={table!r}, output_folder={out!r}, output_format='webdataset',"
        " input_format='parquet', url_col='url', caption_col='caption',"
        f" image_size={args.image_size}, resize_mode='keep_ratio', resize_only_if_bigger=True,"
        f" processes_count={args.cores}, thread_count={args.threads},"
        f" number_sample_per_shard={args.per_shard}, encode_quality=95, compute_hash='sha256',"
        " extract_exif=False, enable_wandb=False, timeout=10, retries=0)\n"
    )
    script = Path(out).parent / f"run_img2dataset_{Path(out).name}.py"
    script.write_text(runner)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", WANDB_SILENT="true")
    started = time.time()
    proc = subprocess.Popen([f"{venv}/bin/python", str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    with ProcessMeter(lambda: tree(proc.pid)) as meter:
        output, _ = proc.communicate()
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset exited with {proc.returncode}:\n{output[-3000:]}")
    stats = [json.loads(p.read_text()) for p in Path(out).glob("*_stats.json")]
    return {"images": sum(s["successes"] for s in stats), "wall_s": wall, "cpu_s": meter.cpu_s,
            "peak_mem_mb": meter.peak_rss / 2**20, "peak_pss_mb": meter.peak_pss / 2**20}  # fmt: skip


def anchor_per_cpu_s(image_size: int, seconds: float = 5.0) -> float:
    """Our image path alone (decode with draft + resize + re-encode), one core, tight loop."""
    from pipelines.crawl.images import ImageConfig, process_image

    pool, cfg = photo_pool(), ImageConfig(image_size=image_size, jpeg_quality=95)
    done, started = 0, time.process_time()
    while time.process_time() - started < seconds:
        process_image(pool[done % len(pool)], cfg)
        done += 1
    return done / (time.process_time() - started)


def output_sizes(folder: str) -> dict[str, tuple[int, int]]:
    """url -> (width, height) of the images in a folder of WebDataset shards."""
    sizes = {}
    for path in Path(folder).glob("*.tar"):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    sizes[meta["url"]] = (meta["width"], meta["height"])
    return sizes


def write_table(path: str, port: int, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"a photo, number {i}" for i in range(n)]}), path)


def variant(name: str, n: int, latency: bool, cluster: LocalRayCluster, tmp: str, args) -> dict:
    results = {}
    with Server(latency) as port:
        table = f"{tmp}/{name}.parquet"
        write_table(table, port, n)
        results["ours"] = run_ours(cluster, table, f"{tmp}/{name}-ours", args)
        if not args.skip_img2dataset:
            results["img2dataset"] = run_img2dataset(args.venv, table, f"{tmp}/{name}-i2d", args)
            ours, theirs = output_sizes(f"{tmp}/{name}-ours"), output_sizes(f"{tmp}/{name}-i2d")
            common = ours.keys() & theirs.keys()
            results["same_sizes"] = (sum(ours[u] == theirs[u] for u in common), len(common))
    return results


def report(results: dict, anchor: float, args) -> dict:
    print(f"\ncrawl job benchmark: {args.cores} cores, loopback server, short side {args.image_size}, "
          f"WebDataset shards of {args.per_shard}; anchor (our image path alone, 1 core): {anchor:.0f} img/CPU-s")  # fmt: skip
    print(f"{'variant':<8} {'engine':<12} {'images':>7} {'wall s':>7} {'cpu s':>7} {'img/s':>7} "
          f"{'img/cpu-s':>9} {'of anchor':>9} {'peak RSS MB':>12} {'peak PSS MB':>12}")  # fmt: skip
    ratios = {}
    for name, res in results.items():
        for engine in ("ours", "img2dataset"):
            r = res.get(engine)
            if r is None:
                continue
            r["per_s"], r["per_cpu_s"] = r["images"] / r["wall_s"], r["images"] / max(r["cpu_s"], 1e-9)
            print(f"{name:<8} {engine:<12} {r['images']:>7} {r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} "
                  f"{r['per_s']:>7.1f} {r['per_cpu_s']:>9.1f} {r['per_cpu_s'] / anchor:>8.0%} "
                  f"{r['peak_mem_mb']:>12.0f} {r['peak_pss_mb']:>12.0f}")  # fmt: skip
        if "img2dataset" in res:
            ours, theirs = res["ours"], res["img2dataset"]
            ratios[name] = (ours["per_s"] / theirs["per_s"], ours["per_cpu_s"] / theirs["per_cpu_s"])
            same, common = res["same_sizes"]
            print(f"{name}: ours / img2dataset: {ratios[name][0]:.2f}x wall throughput, "
                  f"{ratios[name][1]:.2f}x images per CPU-second; same width x height on {same} of {common} URLs")  # fmt: skip
    return {
        "ratio_wall": round(ratios["clean"][0], 3) if "clean" in ratios else None,
        "ratio_per_cpu_s": round(ratios["clean"][1], 3) if "clean" in ratios else None,
        "ratio_latency_wall": round(ratios["latency"][0], 3) if "latency" in ratios else None,
        "ratio_latency_per_cpu_s": round(ratios["latency"][1], 3) if "latency" in ratios else None,
        "ours_images_per_cpu_s": round(results["clean"]["ours"]["per_cpu_s"], 1),
        "anchor_images_per_cpu_s": round(anchor, 1),
        **{
            f"{engine}_peak_{kind}_mb": round(results["clean"][engine][f"peak_{key}_mb"])
            for engine in ("ours", "img2dataset")
            if engine in results["clean"]
            for kind, key in (("rss", "mem"), ("pss", "pss"))
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000, help="URLs of the clean variant")
    parser.add_argument("--latency-n", type=int, default=10_000, help="URLs of the latency variant (0: skip)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--threads", type=int, default=64, help="img2dataset thread_count per process")
    parser.add_argument("--venv", default=str(ROOT / ".venv-img2dataset"))
    parser.add_argument("--skip-img2dataset", action="store_true")
    parser.add_argument("--job-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra build_wit override, e.g. crawl.num_workers=2")  # fmt: skip
    args = parser.parse_args()
    if not args.skip_img2dataset and not Path(args.venv, "bin/python").exists():
        subprocess.run(["bash", str(ROOT / "scripts/setup_img2dataset.sh"), args.venv], check=True)

    anchor = anchor_per_cpu_s(args.image_size)
    started = time.time()
    cluster = LocalRayCluster(num_cpus=args.cores).start()
    print(
        f"ray start --head --num-cpus={args.cores}: {time.time() - started:.1f} s (not in the job's figures)"
    )
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_crawl_") as tmp:
            results["clean"] = variant("clean", args.n, False, cluster, tmp, args)
            if args.latency_n:
                results["latency"] = variant("latency", args.latency_n, True, cluster, tmp, args)
    finally:
        cluster.stop()
    print(json.dumps(report(results, anchor, args)))


if __name__ == "__main__":
    main()
