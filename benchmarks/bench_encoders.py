"""Image and text encoder throughput on CPU (fp32, inference mode, untrained weights: speed does not
depend on the values).

    python benchmarks/bench_encoders.py                       # RN50, ViT-B/32, tiny-vit, tiny-rn at batch 32
    python benchmarks/bench_encoders.py --models tiny-vit --batch-size 8 --iters 5

Prints one row per (model, tower): samples/s, seconds per batch, GFLOPs/s achieved (from
clip_model.summary), the peak resident memory while the row ran (RSS, including the model's weights),
and the throughput relative to the first row, measured in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import threading
import time
from dataclasses import dataclass

import torch

import clip_model
from clip_model.summary import summarize


class PeakRSS:
    """Peak resident set size while the block runs. Resets the kernel's high-water mark (VmHWM) through
    /proc/self/clear_refs where allowed, and also samples VmRSS from a thread, taking the larger."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._status_kib("VmRSS") * 1024)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._hwm_reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm_reset = True
        except OSError:
            pass
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._hwm_reset:
            self.peak_bytes = max(self.peak_bytes, self._status_kib("VmHWM") * 1024)


@dataclass
class Row:
    model: str
    tower: str
    batch_size: int
    seconds_per_batch: float
    gflops_per_sample: float
    peak_rss_bytes: int

    @property
    def samples_per_s(self) -> float:
        return self.batch_size / self.seconds_per_batch


def time_encoder(fn, batch: torch.Tensor, warmup: int, iters: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn(batch)
        start = time.perf_counter()
        for _ in range(iters):
            fn(batch)
        return (time.perf_counter() - start) / iters


def bench_model(name: str, batch_size: int, warmup: int, iters: int) -> list[Row]:
    summary = summarize(name)
    rows = []
    torch.manual_seed(0)
    model = clip_model.create_model(name).eval()
    config = model.config
    images = torch.randn(batch_size, 3, config.image_resolution, config.image_resolution)
    # Full-length captions: the text cost does not depend on where the end token is.
    tokens = torch.randint(1, config.vocab_size - 1, (batch_size, config.context_length))
    tokens[:, -1] = config.vocab_size - 1
    for tower, fn, batch, gflops in (
        ("image", model.encode_image, images, summary.image_gflops),
        ("text", model.encode_text, tokens, summary.text_gflops),
    ):
        with PeakRSS() as peak:
            seconds = time_encoder(fn, batch, warmup, iters)
        rows.append(Row(name, tower, batch_size, seconds, gflops, peak.peak_bytes))
    del model, images, tokens
    release_memory()
    return rows


def release_memory() -> None:
    """Free and hand freed heap back to the OS, so the next row's RSS does not start from this one's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def format_table(rows: list[Row]) -> str:
    reference = rows[0]
    header = (
        f"{'model':<10} {'tower':<6} {'batch':>5} {'samples/s':>10} {'s/batch':>8} {'GFLOP/s':>8} "
        f"{'peak RSS MiB':>12} {'vs ref':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.model:<10} {r.tower:<6} {r.batch_size:>5} {r.samples_per_s:>10.1f} {r.seconds_per_batch:>8.3f} "
            f"{r.samples_per_s * r.gflops_per_sample:>8.1f} {r.peak_rss_bytes / 2**20:>12.0f} "
            f"{r.samples_per_s / reference.samples_per_s:>6.2f}x"
        )
    lines.append(
        f"reference row: {reference.model} {reference.tower}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["RN50", "ViT-B/32", "tiny-vit", "tiny-rn"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline_mib = PeakRSS._status_kib("VmRSS") / 1024
    rows = []
    for name in args.models:
        rows += bench_model(name, args.batch_size, args.warmup, args.iters)
        print(f"done: {name}", flush=True)
    print(format_table(rows))
    print(f"process RSS before the first row (Python, torch, clip_model imported): {baseline_mib:.0f} MiB")


if __name__ == "__main__":
    main()
