"""Crawl throughput: fetch + decode + resize + JPEG encode + shard write, ours vs img2dataset.

A loopback HTTP server (its own process) serves N distinct URLs over a pool of 18 web-sized JPEG
photos (scikit-image's, resized to 500-1500 px). Each engine runs in its own process on the same URL list:
- ours: the crawl stage (`CrawlStage`: aiohttp fetcher + Pillow image checks) and `shards.write_shard`,
  exactly the code the Ray Data graph runs, without Ray around it;
- img2dataset: its downloader (1 process, N threads) from .venv-img2dataset, writing WebDataset.
images/s/core = images written / CPU seconds of the engine's processes (user + sys, children included),
so the server's CPU does not count. Peak RSS and RSS along the run show whether memory stays flat.

    python benchmarks/bench_crawl.py --n 5000          # ~1 min on 2 cores
    python benchmarks/bench_crawl.py --n 100000 --skip-img2dataset   # memory over 100k images
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def small_photo_pool() -> list[bytes]:
    """scikit-image's photos at their own size (300-640 px): the benchmark's first pool."""
    import numpy as np
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "clock", "brick"):
        array = getattr(data, name)()
        if array.dtype == bool:
            array = (array * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(array).convert("RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def photo_pool(variants: int = 2, seed: int = 0) -> list[bytes]:
    """Web-sized JPEG photos: scikit-image's photos resized to a long side of 500-1500 px, with a
    little sensor-like noise so that they compress like camera photos (~1.5 bits/pixel at q90)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "clock", "brick"):
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


def serve(port_queue: multiprocessing.Queue, pool_name: str) -> None:
    pool = small_photo_pool() if pool_name == "small" else photo_pool()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            index = int(self.path.rsplit("/", 1)[-1].split(".")[0])
            body = pool[index % len(pool)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        # The listen backlog is set when binding: with the default (5), 64 clients connecting at
        # once overflow it and some requests stall until the client's read timeout.
        request_queue_size = 1024

    server = Server(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    server.serve_forever()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_ours(urls_file: str, out_dir: str, image_size: int, per_shard: int, batch: int) -> dict:
    """Runs in its own process: the crawl stage + shard writer over the URL list."""
    import pyarrow as pa

    from pipelines import shards
    from pipelines.crawl.crawl import CrawlStage
    from pipelines.crawl.fetch import FetchConfig
    from pipelines.crawl.images import ImageConfig

    urls = Path(urls_file).read_text().split()
    stage = CrawlStage(
        FetchConfig(
            allowed_networks=["127.0.0.0/8"], per_host_rate=0, per_host_concurrency=64, max_in_flight=64
        ),
        ImageConfig(image_size=image_size, resize_mode="keep_aspect", jpeg_quality=95),
        decode_threads=2,
    )
    started, kept, retries, rss = time.time(), 0, 0, []
    for shard_index, start in enumerate(range(0, len(urls), per_shard)):
        samples = []
        for b in range(start, min(start + per_shard, len(urls)), batch):
            chunk = urls[b : min(b + batch, start + per_shard, len(urls))]
            table = stage(pa.table({"url": chunk, "caption": [f"photo {i}" for i in range(len(chunk))]}))
            for i, row in enumerate(table.to_pylist()):
                retries += max(0, (row["attempts"] or 1) - 1)
                if row["status"] is None:
                    key = f"{shard_index:05d}{b - start + i:04d}"
                    meta = {k: row[k] for k in ("url", "caption", "width", "height", "sha256")}
                    samples.append({"key": key, "jpg": row["jpg"], "txt": row["caption"], "json": meta})
        shards.write_shard(samples, out_dir, f"{shard_index:05d}", ["webdataset"])
        kept += len(samples)
        rss.append(round(rss_mb(), 1))
    stage.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "images": kept,
        "retries": retries,
        "wall_s": time.time() - started,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "rss_mb_per_shard": rss,
    }


def run_img2dataset(
    venv: str, urls_file: str, out_dir: str, image_size: int, per_shard: int, threads: int
) -> dict:
    runner = (
        "import sys\nfrom img2dataset import download\n"
        "if __name__ == '__main__':\n"
        f"    download(url_list={urls_file!r}, output_folder={out_dir!r}, output_format='webdataset',"
        f" input_format='txt', image_size={image_size}, resize_mode='keep_ratio', resize_only_if_bigger=True,"
        f" processes_count=1, thread_count={threads}, number_sample_per_shard={per_shard},"
        " encode_quality=95, compute_hash='sha256', extract_exif=False, enable_wandb=False, timeout=10)\n"
    )
    script = Path(out_dir).parent / "run_img2dataset.py"
    script.write_text(runner)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", WANDB_SILENT="true")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    subprocess.run([f"{venv}/bin/python", str(script)], env=env, check=True, capture_output=True)
    wall = time.time() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats = [json.loads(p.read_text()) for p in Path(out_dir).glob("*_stats.json")]
    return {
        "images": sum(s["successes"] for s in stats),
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        # ru_maxrss of children = the largest child so far (ours ran first): an upper bound only
        "peak_rss_mb": after.ru_maxrss / 1024,
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5000, help="URLs to crawl")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=64, help="img2dataset thread_count")
    parser.add_argument("--venv", default=str(ROOT / ".venv-img2dataset"))
    parser.add_argument("--skip-img2dataset", action="store_true")
    parser.add_argument(
        "--pool",
        choices=["web", "small"],
        default="web",
        help="web: 500-1500 px photos; small: scikit-image's photos as shipped (300-640 px)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run ours in this process
    args = parser.parse_args()

    if args.worker:
        urls_file, out_dir = args.worker.split(",")
        print(json.dumps(run_ours(urls_file, out_dir, args.image_size, args.per_shard, args.batch)))
        return

    queue: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(queue, args.pool), daemon=True)
    server.start()
    port = queue.get(timeout=60)
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_crawl_") as tmp:
            urls_file = f"{tmp}/urls.txt"
            Path(urls_file).write_text(
                "\n".join(f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(args.n))
            )
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            out = subprocess.run(
                [sys.executable, __file__, "--worker", f"{urls_file},{tmp}/ours", "--image-size",
                 str(args.image_size), "--per-shard", str(args.per_shard), "--batch", str(args.batch)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            results["ours"] = json.loads(out.stdout.strip().splitlines()[-1])
            # CPU of the whole process (imports included), as for img2dataset
            results["ours"]["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            if not args.skip_img2dataset:
                if not Path(args.venv, "bin/python").exists():
                    subprocess.run(
                        ["bash", str(ROOT / "scripts/setup_img2dataset.sh"), args.venv], check=True
                    )
                results["img2dataset"] = run_img2dataset(
                    args.venv, urls_file, f"{tmp}/i2d", args.image_size, args.per_shard, args.threads
                )
                ours_sizes, their_sizes = output_sizes(f"{tmp}/ours"), output_sizes(f"{tmp}/i2d")
                common = ours_sizes.keys() & their_sizes.keys()
                same_sizes = sum(ours_sizes[u] == their_sizes[u] for u in common)
    finally:
        server.terminate()
        server.join()

    print(f"\ncrawl benchmark: {args.n} URLs ({args.pool} photos), loopback server, {len(os.sched_getaffinity(0))} cores, "
          f"resize short side to {args.image_size}, WebDataset shards of {args.per_shard}")  # fmt: skip
    print(
        f"{'engine':<12} {'images':>7} {'wall s':>7} {'cpu s':>7} {'img/s':>7} {'img/s/core':>11} {'peak RSS MB':>12}"
    )
    for name, r in results.items():
        per_core = r["images"] / r["cpu_s"] if r["cpu_s"] else 0.0
        r["per_core"] = per_core
        print(
            f"{name:<12} {r['images']:>7} {r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} "
            f"{r['images'] / r['wall_s']:>7.1f} {per_core:>11.1f} {r['peak_rss_mb']:>12.0f}"
        )
    if "img2dataset" in results and results["img2dataset"]["per_core"]:
        print(
            f"ratio ours / img2dataset (images/s/core): {results['ours']['per_core'] / results['img2dataset']['per_core']:.2f}x"
        )
        print(f"same output width x height as img2dataset: {same_sizes} of {len(common)} URLs both kept")
    print(f"ours: {results['ours']['retries']} retried requests")
    rss = results["ours"]["rss_mb_per_shard"]
    step = max(1, len(rss) // 10)
    points = ", ".join(
        f"{(i + 1) * args.per_shard}: {rss[i]}" for i in [*range(0, len(rss) - 1, step), len(rss) - 1]
    )
    print(f"ours RSS (MB) after N images: {points}")


if __name__ == "__main__":
    main()
