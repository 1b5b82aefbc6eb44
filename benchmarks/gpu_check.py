"""The GPU check: train ViT-B/32 on synthetic data on every GPU present (NCCL, DDP, the project's
FeatureModel + all-gathered loss + gradient step), in fp16 + GradScaler and in bf16, and check it works.

    python benchmarks/gpu_check.py            # CUDA: ViT-B/32, world size = GPUs present, < 8 min
    python benchmarks/gpu_check.py --cpu      # the CPU fallback the test suite runs: gloo, tiny-vit, 2 ranks

For each precision it asserts a finite loss that falls (the model fits a fixed synthetic batch), and a
clean resume: the state saved after step k, loaded into fresh objects, repeats steps k+1.. with the same
losses as the run that went on. It prints samples/s, MFU (FLOPs per sample from clip_model.summary x 3 for
forward + backward, over the GPU's peak dense bf16/fp16 rate) and peak memory, then one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# Dense fp16/bf16 tensor-core peaks (FLOP/s) by device-name fragment; unknown GPUs print MFU as n/a.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
              "A10": 125e12, "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12, "RTX 3090": 71e12}  # fmt: skip


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _batch(config, batch: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(
        0, 256, (batch, config.image_resolution, config.image_resolution, 3), generator=g, dtype=torch.uint8
    )
    tokens = torch.randint(1, config.vocab_size - 2, (batch, config.context_length), generator=g)
    tokens[:, 0], tokens[:, 20], tokens[:, 21:] = (
        config.vocab_size - 2,
        config.vocab_size - 1,
        0,
    )  # SOT .. EOT
    from pipelines.train.ingest import normalize

    return normalize(images.to(device)), tokens.to(device)


# The CPU fallback's model: tiny-vit at 32 px with a small vocabulary (seconds per step on one core).
CPU_OVERRIDES = {"image_resolution": 32, "vocab_size": 1000}


def _overrides(model_name: str) -> dict:
    return CPU_OVERRIDES if model_name == "tiny-vit" else {}


def _build(model_name: str, device, precision: str):
    from torch.nn.parallel import DistributedDataParallel

    from clip_model import create_model
    from pipelines.train.gradcache import FeatureModel
    from pipelines.train.loop import amp_settings
    from pipelines.train.optim import build_optimizer

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
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss))
    return losses


def check(rank: int, world: int, model_name: str, precision: str, batch: int, steps: int) -> dict:
    """One precision on this rank: (losses, resume check, throughput)."""
    cuda = torch.cuda.is_available() and model_name != "tiny-vit"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    from clip_model import get_config

    config = get_config(model_name, **_overrides(model_name))
    images, tokens = _batch(config, batch, device, seed=rank)
    parts = _build(model_name, device, precision)
    clip, model, optimizer, _, scaler = parts
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses = _steps(parts, images, tokens, steps)
    saved = io.BytesIO()
    torch.save(
        {"model": clip.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()},
        saved,
    )
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    went_on = _steps(parts, images, tokens, steps)
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    fresh = _build(model_name, device, precision)
    saved.seek(0)
    state = torch.load(saved, map_location=device, weights_only=False)
    fresh[0].load_state_dict(state["model"])
    fresh[2].load_state_dict(state["optimizer"])
    fresh[4].load_state_dict(state["scaler"])
    resumed = _steps(fresh, images, tokens, steps)
    return {
        "losses": losses + went_on,
        "resumed": resumed,
        "samples_per_s": steps * batch * world / elapsed,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
    }


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        out = {p: check(rank, world, args.model, p, args.batch, args.steps) for p in args.precisions}
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="gloo + tiny-vit on 2 CPU processes")
    parser.add_argument("--steps", type=int, default=None, help="steps per phase (3 phases per precision)")
    parser.add_argument("--batch", type=int, default=None, help="per GPU")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    args.model = "ViT-B/32" if cuda else "tiny-vit"
    args.batch = args.batch or (128 if cuda else 8)
    args.steps = args.steps or (12 if cuda else 4)
    args.precisions = ["fp16", "bf16"]  # fp16 = autocast + GradScaler on CUDA (fp32 on CPU)
    world = torch.cuda.device_count() if cuda else 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    started = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = queue.get(timeout=470)
    for p in procs:
        p.join(timeout=60)
    verify(results, tolerance=2e-2 if cuda else 1e-4)  # cuBLAS picks kernels per run: near, not bitwise

    from clip_model.summary import summarize

    flops = summarize(args.model, **_overrides(args.model)).gflops * 1e9 * 3  # forward + backward per sample
    peak = peak_flops(results["bf16"]["device"]) if cuda else None
    print(
        f"\n{args.model} on {world} x {results['bf16']['device']}, batch {args.batch}/rank, {time.perf_counter() - started:.0f} s"
    )
    print(
        f"| {'precision':<9} | {'loss first -> last':>20} | {'samples/s':>10} | {'MFU':>6} | {'peak GiB':>8} |"
    )
    summary = {"model": args.model, "world": world, "device": results["bf16"]["device"]}
    for precision, r in results.items():
        mfu = r["samples_per_s"] * flops / (peak * world) if peak else None
        print(f"| {precision:<9} | {r['losses'][0]:>9.3f} -> {r['losses'][-1]:<7.3f} | {r['samples_per_s']:>10.1f} | "
              f"{f'{mfu:.1%}' if mfu is not None else 'n/a':>6} | {r['peak_mem_gb']:>8.2f} |")  # fmt: skip
        summary[precision] = {"samples_per_s": r["samples_per_s"], "mfu": mfu, "peak_mem_gb": r["peak_mem_gb"],
                              "loss_first": r["losses"][0], "loss_last": r["losses"][-1]}  # fmt: skip
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
