"""The GPU check: train ViT-B/32 on synthetic data on every GPU present (NCCL, DDP, the project's
FeatureModel + all-gathered loss + gradient step), in fp16 + GradScaler and in bf16, and check it works.

    python benchmarks/gpu_check.py            # CUDA: ViT-B/32, world size = GPUs present, < 8 min
    python benchmarks/gpu_check.py --cpu      # the CPU fallback the test suite runs: gloo, tiny-vit, 2 ranks

For each precision it asserts, on every rank, a finite loss that falls (the model fits a fixed synthetic
batch), and a clean resume: the state saved after step k, loaded into fresh objects, repeats steps k+1..
with the same losses as the run that went on. bf16 runs where the GPU has bf16 tensor cores (compute
capability >= 8.0; V100 and T4 would only emulate it: skipped, and said so). It prints samples/s, MFU
(FLOPs per sample from clip_model.summary x 3 for forward + backward, over the GPU's peak dense bf16/fp16
rate) and peak memory, then one JSON line. A rank that fails ends the check at once (exit 1), as does
running past the time budget; without CUDA (a CPU build of torch, no visible GPU) it stops (exit 2) unless
--cpu is given, rather than pass as a GPU check.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import queue as queue_module
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# Dense (no sparsity) fp16/bf16 tensor-core peaks in FLOP/s from the vendors' datasheets, by fragment of
# torch.cuda.get_device_name(); the longest fragment in the name wins ("H100 PCIe" over "H100", "L40S" over
# "L40" over "L4", "A10G" over "A10", "GH200" over "H200" over "H20"). fp16 and bf16 peaks are equal on all
# of these but V100 and T4, which have no bf16 tensor cores. Unknown GPUs print MFU as n/a.
PEAK_FLOPS = {
    "B200": 2250e12, "B100": 1750e12,
    "GH200": 989e12, "H200": 989e12, "H200 NVL": 835e12, "H100": 989e12, "H100 PCIe": 756e12,
    "H100 NVL": 835e12, "H800": 989e12, "H20": 148e12,
    "A100": 312e12, "A800": 312e12, "A40": 150e12, "A6000": 155e12, "A10G": 70e12, "A10": 125e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
}  # fmt: skip

# The workers' share of the 8-minute budget (imports, NCCL set-up, 2 precisions x 3 phases).
WORKER_BUDGET_S = 420


def peak_flops(name: str) -> float | None:
    found = [k for k in PEAK_FLOPS if k in name]
    return PEAK_FLOPS[max(found, key=len)] if found else None


def precisions(cuda_capability: tuple[int, int] | None) -> list[str]:
    """fp16 (+ GradScaler on CUDA; fp32 on CPU) always; bf16 where it runs natively (and on CPU)."""
    from pipelines.train.precision import auto_precision

    if cuda_capability is None or auto_precision(cuda_capability) == "bf16":
        return ["fp16", "bf16"]
    return ["fp16"]


def _batch(config, batch: int, device, seed: int):
    from pipelines.train.ingest import normalize

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(
        0, 256, (batch, config.image_resolution, config.image_resolution, 3), generator=g, dtype=torch.uint8
    )
    tokens = torch.randint(1, config.vocab_size - 2, (batch, config.context_length), generator=g)
    sot, eot = config.vocab_size - 2, config.vocab_size - 1
    tokens[:, 0], tokens[:, 20], tokens[:, 21:] = sot, eot, 0
    return normalize(images.to(device)), tokens.to(device)


# The CPU fallback's model: tiny-vit at 32 px with a small vocabulary (seconds per step on one core).
CPU_OVERRIDES = {"image_resolution": 32, "vocab_size": 1000}


def _overrides(model_name: str) -> dict:
    return CPU_OVERRIDES if model_name == "tiny-vit" else {}


def _build(model_name: str, device: torch.device, precision: str):
    from torch.nn.parallel import DistributedDataParallel

    from clip_model import create_model
    from pipelines.train.gradcache import FeatureModel
    from pipelines.train.optim import build_optimizer
    from pipelines.train.precision import amp_settings

    torch.manual_seed(0)
    clip = create_model(model_name, **_overrides(model_name)).to(device)
    model = DistributedDataParallel(
        FeatureModel(clip), device_ids=[device.index] if device.type == "cuda" else None
    )
    optimizer = build_optimizer(clip, 1e-4, 0.2, (0.9, 0.98), 1e-6)
    autocast, scaler = amp_settings(precision, device)
    return clip, model, optimizer, autocast, scaler


def _steps(parts, images, tokens, n: int) -> list[float]:
    from pipelines.train.gradcache import forward_backward

    clip, model, optimizer, autocast, scaler = parts
    losses = []
    for _ in range(n):
        optimizer.zero_grad(set_to_none=True)
        loss, finite = forward_backward(model, images, tokens, 1, autocast, scaler.scale)
        assert finite, "non-finite loss"
        scaler.step(optimizer)  # fp16: skipped while the scaled gradients overflow, as in training
        scaler.update()
        losses.append(float(loss))
    return losses


def check(device: torch.device, rank: int, world: int, args, precision: str) -> dict:
    """One precision on this rank: losses, resumed losses, throughput, peak memory."""
    from clip_model import get_config

    cuda = device.type == "cuda"
    config = get_config(args.model, **_overrides(args.model))
    images, tokens = _batch(config, args.batch, device, seed=rank)
    parts = _build(args.model, device, precision)
    clip, model, optimizer, _, scaler = parts
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses = _steps(parts, images, tokens, args.steps)
    saved = io.BytesIO()
    torch.save(
        {"model": clip.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()},
        saved,
    )
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    went_on = _steps(parts, images, tokens, args.steps)
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    del parts, clip, model, optimizer, scaler  # the fresh copy below must not double the peak
    fresh = _build(args.model, device, precision)
    saved.seek(0)
    state = torch.load(saved, map_location=device, weights_only=False)
    fresh[0].load_state_dict(state["model"])
    fresh[2].load_state_dict(state["optimizer"])
    fresh[4].load_state_dict(state["scaler"])
    resumed = _steps(fresh, images, tokens, args.steps)
    return {
        "losses": losses + went_on,
        "resumed": resumed,
        "samples_per_s": args.steps * args.batch * world / elapsed,
        "peak_mem_gb": peak_mem,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
    }


def _worker(rank: int, world: int, port: int, args, results) -> None:
    from pipelines.faults import maybe_fail

    cuda = not args.cpu
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before NCCL: each rank's communicator lives on its own GPU
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if cuda else 1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5),
        device_id=device if cuda else None,
    )  # fmt: skip
    try:
        maybe_fail("gpu_check", rank)  # tests: a rank that dies must end the check, not hang it
        results.put((rank, {p: check(device, rank, world, args, p) for p in args.precisions}))
    finally:
        dist.destroy_process_group()


def run_ranks(args, world: int, budget_s: float) -> list[dict]:
    """Start one process per rank; every rank's results, in rank order. Fails as soon as a rank exits with
    an error (the others would wait in a collective until NCCL's timeout) or the budget runs out; never
    leaves a rank behind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = _collect(procs, results, world, time.monotonic() + budget_s)
        for p in procs:
            p.join(timeout=60)
        return [got[r] for r in range(world)]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)


def _collect(procs, results, world: int, deadline: float) -> dict[int, dict]:
    got: dict[int, dict] = {}
    while len(got) < world:
        try:
            rank, out = results.get(timeout=1.0)
            got[rank] = out
            continue
        except queue_module.Empty:
            pass
        failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            rank, code = failed[0]
            raise SystemExit(f"gpu_check FAILED: rank {rank} exited with code {code} (see above)")
        if time.monotonic() > deadline:
            late = sorted(set(range(world)) - set(got))
            raise SystemExit(f"gpu_check FAILED: ranks {late} not done within {WORKER_BUDGET_S} s")
        if all(p.exitcode == 0 for p in procs) and results.empty():
            raise SystemExit("gpu_check FAILED: every rank exited, some without results")
    return got


def verify(results: dict, tolerance: float) -> None:
    for precision, r in results.items():
        losses = r["losses"]
        assert all(map(lambda v: v == v and abs(v) != float("inf"), losses)), (
            f"{precision}: non-finite {losses}"
        )
        assert losses[-1] < losses[0] - 0.1, f"{precision}: loss did not fall: {losses}"
        half = len(losses) // 2
        for a, b in zip(r["resumed"], losses[half:]):
            assert abs(a - b) <= tolerance * max(1.0, abs(b)), (
                f"{precision}: resume differs {r['resumed']} vs {losses[half:]}"
            )


def report(args, world: int, ranks: list[dict], seconds: float, skipped: list[str]) -> dict:
    """The table and the summary (rank 0's throughput; peak memory: the largest rank's)."""
    from clip_model.summary import summarize

    flops = summarize(args.model, **_overrides(args.model)).gflops * 1e9 * 3  # forward + backward per sample
    device = next(iter(ranks[0].values()))["device"]
    peak = peak_flops(device) if not args.cpu else None
    print(f"\n{args.model} on {world} x {device}, batch {args.batch}/rank, {seconds:.0f} s")
    for precision in skipped:
        print(f"{precision}: skipped (no {precision} tensor cores on this GPU)")
    print(f"| {'precision':<9} | {'loss first -> last':>20} | {'samples/s':>10} | {'MFU':>6} | {'peak GiB':>8} |")  # fmt: skip
    summary = {"model": args.model, "world": world, "device": device, "seconds": seconds, "skipped": skipped}
    for precision, r in ranks[0].items():
        mfu = r["samples_per_s"] * flops / (peak * world) if peak else None
        mem = max(rank[precision]["peak_mem_gb"] for rank in ranks)
        print(f"| {precision:<9} | {r['losses'][0]:>9.3f} -> {r['losses'][-1]:<7.3f} | {r['samples_per_s']:>10.1f} | "
              f"{f'{mfu:.1%}' if mfu is not None else 'n/a':>6} | {mem:>8.2f} |")  # fmt: skip
        summary[precision] = {"samples_per_s": r["samples_per_s"], "mfu": mfu, "peak_mem_gb": mem,
                              "loss_first": r["losses"][0], "loss_last": r["losses"][-1]}  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="gloo + tiny-vit on 2 CPU processes")
    parser.add_argument("--steps", type=int, default=None, help="steps per phase (3 phases per precision)")
    parser.add_argument("--batch", type=int, default=None, help="per GPU")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.exit(2, f"gpu_check: no CUDA device visible to torch {torch.__version__} (CUDA build: "
                       f"{torch.version.cuda}); run with --cpu for the CPU fallback\n")  # fmt: skip
    args.model = "tiny-vit" if args.cpu else "ViT-B/32"
    args.batch = args.batch or (8 if args.cpu else 128)
    args.steps = args.steps or (4 if args.cpu else 12)
    capability = None if args.cpu else torch.cuda.get_device_capability(0)
    args.precisions = precisions(capability)
    skipped = [p for p in ("fp16", "bf16") if p not in args.precisions]
    world = 2 if args.cpu else torch.cuda.device_count()
    started = time.perf_counter()
    ranks = run_ranks(args, world, WORKER_BUDGET_S)
    for rank in ranks:  # cuBLAS picks kernels per run: near, not bitwise, on GPUs
        verify(rank, tolerance=1e-4 if args.cpu else 2e-2)
    summary = report(args, world, ranks, time.perf_counter() - started, skipped)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
