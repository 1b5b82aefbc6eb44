"""Peak memory of the contrastive loss at the paper's global batch (32,768): local rows vs the full B x B matrix.

Each configuration runs forward + backward of the loss in a fresh process and reports the growth of the
peak resident set over the process's baseline (CPU, float32, small embeddings). "local rows" is what one
rank of W computes with clip_model.clip_loss under a process group: b = B / W rows against all B gathered
columns; it is simulated in one process (the gathered columns are a plain tensor, gradients flow through
the local rows). The full B x B loss is measured at smaller B and, where too large for this machine,
extrapolated quadratically from the largest measured B (marked "est.").

    python benchmarks/bench_loss_memory.py [--dim 64] [--max-full 8192]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(rows: int, cols: int, dim: int, queue) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    all_images = torch.randn(cols, dim, generator=g)
    all_texts = torch.randn(cols, dim, generator=g)
    local_images = all_images[:rows].clone().requires_grad_()
    local_texts = all_texts[:rows].clone().requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    base = _rss_peak_mb()
    t0 = time.perf_counter()
    i, t = F.normalize(local_images, dim=-1), F.normalize(local_texts, dim=-1)
    if rows == cols:  # single process: the whole matrix (what clip_loss does without a process group)
        ci, ct = i, t
    else:  # one rank: gathered columns, with the local slice carrying the gradient
        ci = torch.cat([i, F.normalize(all_images[rows:], dim=-1)])
        ct = torch.cat([t, F.normalize(all_texts[rows:], dim=-1)])
    labels = torch.arange(rows)
    loss = (F.cross_entropy(scale * i @ ct.t(), labels) + F.cross_entropy(scale * t @ ci.t(), labels)) / 2
    loss.backward()
    queue.put((_rss_peak_mb() - base, time.perf_counter() - t0))


def run(rows: int, cols: int, dim: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_measure, args=(rows, cols, dim, queue))
    p.start()
    out = queue.get()
    p.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--max-full", type=int, default=8192, help="largest B measured for the full matrix")
    parser.add_argument("--workers", type=int, nargs="+", default=[256, 64, 16])
    args = parser.parse_args()
    B = args.batch
    rows = []
    full_b = [b for b in (2048, 4096, 8192, 16384, 32768) if b <= args.max_full]
    for b in full_b:
        mem, sec = run(b, b, args.dim)
        rows.append((f"full {b} x {b}", b, mem, sec, False))
    ref_b, ref_mem, ref_sec = rows[-1][1], rows[-1][2], rows[-1][3]
    if ref_b < B:
        k = (B / ref_b) ** 2
        rows.append((f"full {B} x {B}", B, ref_mem * k, ref_sec * k, True))
    full_mem = rows[-1][2]
    for w in args.workers:
        b = B // w
        mem, sec = run(b, B, args.dim)
        rows.append((f"local rows {b} x {B} (W={w})", B, mem, sec, False))
    print(f"\nclip loss forward+backward, CPU fp32, embed dim {args.dim}, global batch {B}")
    print(f"{'configuration':<34} {'peak MB':>10} {'seconds':>9} {'vs full B x B':>14}")
    for name, _, mem, sec, est in rows:
        tag = " est." if est else ""
        print(f"{name:<34} {mem:>10.1f} {sec:>9.3f} {mem / full_mem:>13.4f}x{tag}")


if __name__ == "__main__":
    main()
