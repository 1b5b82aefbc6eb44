"""train_loop_per_worker: what every Ray Train worker runs.

DDP over the `FeatureModel` wrapper, the all-gathered contrastive loss, mixed precision, logit-scale clamp,
non-finite losses skipped and counted, metrics to Ray, and checkpoints that resume at the exact step and
data position: the checkpoint stores which samples of the current epoch were already trained on (their key
hashes, gathered from every worker) and a resumed epoch skips exactly those.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import io
import json
import logging
import math
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from clip_model import Tokenizer, create_model, to_openai_state_dict
from pipelines import storage
from pipelines.config import config_to_dict, from_dict
from pipelines.train.config import TrainConfig
from pipelines.train.gradcache import FeatureModel, forward_backward
from pipelines.train.ingest import EpochStream
from pipelines.train.optim import build_optimizer, build_scheduler
from pipelines.train.zero_shot_check import ZeroShotCheck

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
OPENAI_FP16_FILE = "openai_fp16.pt"
METRICS_FILE = "metrics.csv"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.txt.gz"  # the BPE merges the run tokenized with: a checkpoint is usable on its own


class ResumeMismatchError(ValueError):
    """A checkpoint written by a different model configuration than the one this run builds."""


def check_resumable(checkpoint_model_config: dict, model_config: dict, where: str = "") -> None:
    # Compared as JSON values: model_config.json holds lists where the dataclass holds tuples.
    checkpoint_model_config, model_config = json.loads(json.dumps([checkpoint_model_config, model_config]))
    if checkpoint_model_config != model_config:
        diff = {
            k: (checkpoint_model_config.get(k), model_config.get(k))
            for k in sorted(set(checkpoint_model_config) | set(model_config))
            if checkpoint_model_config.get(k) != model_config.get(k)
        }
        raise ResumeMismatchError(
            f"Refusing to resume from checkpoint {where}: it was trained with another model configuration "
            f"(field: (checkpoint, this run)) {diff}. Start a new run (another name or storage_path) or "
            "configure the same model."
        )


def amp_settings(precision: str, device: torch.device):
    """(autocast factory, GradScaler). fp16 autocast + loss scaling on CUDA; bf16 anywhere; fp16 requested
    on CPU falls back to fp32 (CPU fp16 matmuls are slow and unscaled gradients underflow)."""
    if precision == "bf16":
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), torch.amp.GradScaler(
            enabled=False
        )
    if precision == "fp16" and device.type == "cuda":
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    if precision == "fp16":
        log.warning("precision fp16 needs a GPU; training in fp32 on %s", device)
    return contextlib.nullcontext, torch.amp.GradScaler(enabled=False)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_ranks(flag: bool) -> bool:
    """True when `flag` holds on every rank (a collective: every rank must call it)."""
    if not _distributed():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=_collective_device())
    dist.all_reduce(t)
    return t.item() == 0


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(obj):
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().reshape(1).clone()
    if _distributed():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


@dataclasses.dataclass
class DataPosition:
    """Where the run is in the data: the epoch and the samples of it already accounted for by all workers
    (key hashes of the rows trained on and of the bad rows dropped, with the drop reasons)."""

    epoch: int = 0
    trained_hashes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    bad_hashes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    bad: dict = dataclasses.field(default_factory=dict)

    def consumed(self) -> np.ndarray:
        return np.concatenate([self.trained_hashes, self.bad_hashes])


def merges_for_checkpoint(path: str) -> bytes:
    """The merges file as the checkpoint's tokenizer.txt.gz: a gzipped file as it is, a plain one gzipped."""
    data = Path(path).read_bytes()
    return data if data[:2] == b"\x1f\x8b" else gzip.compress(data, mtime=0)


def _checkpoint(uri: str) -> ray.train.Checkpoint:
    if storage.is_s3(uri):
        fs, path = storage.resolve(uri)
        return ray.train.Checkpoint(path, filesystem=fs)
    return ray.train.Checkpoint(uri)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = from_dict(TrainConfig, loop_config["config"])
    total_steps, num_rows = loop_config["total_steps"], loop_config["num_rows"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    model_config = cfg.model_config()
    clip = create_model(cfg.model, **cfg.model_overrides)
    clip.set_grad_checkpointing(cfg.grad_checkpointing)
    step, position, epochs_done, metrics_rows, nonfinite = 0, DataPosition(), [], [], 0
    state = None
    # After a failure Ray Train hands back this run's latest checkpoint; a new run may start from resume_from.
    checkpoint = ray.train.get_checkpoint() or (_checkpoint(cfg.resume_from) if cfg.resume_from else None)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        check_resumable(state["model_config"], dataclasses.asdict(model_config), checkpoint.path)
        clip.load_state_dict(state["model"])
        step, nonfinite = state["step"], state["nonfinite_skipped"]
        position, epochs_done, metrics_rows = DataPosition(**state["data"]), state["epochs"], state["metrics"]
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])

    model = ray.train.torch.prepare_model(FeatureModel(clip))
    betas, eps = cfg.adam_betas_eps()
    optimizer = build_optimizer(clip, cfg.lr, cfg.weight_decay, betas, eps)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total_steps)
    autocast, scaler = amp_settings(cfg.precision, device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    max_log_scale = math.log(cfg.max_logit_scale)
    shard = ray.train.get_dataset_shard("train")
    merges_path = storage.local_file(cfg.tokenizer_merges) if rank == 0 else None
    merges = merges_for_checkpoint(merges_path) if merges_path else b""  # copied into every checkpoint
    zero_shot = None
    if cfg.zero_shot_data and rank == 0:
        tokenizer = Tokenizer(merges_path, context_length=model_config.context_length)
        zero_shot = ZeroShotCheck(cfg.zero_shot_data, tokenizer, model_config.image_resolution,
                                  cfg.zero_shot_templates, cfg.zero_shot_limit_per_class)  # fmt: skip
        if zero_shot.skipped:
            log.warning("zero-shot check: %d unreadable image(s) in %s skipped", zero_shot.skipped, cfg.zero_shot_data)

    def save(metrics: dict, epoch_summary: Callable[[DataPosition], dict] | None = None) -> DataPosition:
        """Gather the data position from every worker and report a checkpoint (written by rank 0).
        Returns the position to continue from (the next epoch's start after an epoch summary)."""
        parts = _gather(
            (
                np.concatenate(new_trained or [np.zeros(0, np.int64)]),
                np.asarray(stream.bad_hashes, np.int64),
                dict(stream.bad),
            )
        )
        bad = Counter(position.bad)
        for p in parts:
            bad.update(p[2])
        data = DataPosition(
            position.epoch,
            np.concatenate([position.trained_hashes] + [p[0] for p in parts]),
            np.concatenate([position.bad_hashes] + [p[1] for p in parts]),
            dict(bad),
        )
        trained_in_epoch = len(data.trained_hashes)
        if epoch_summary is not None:
            epochs_done.append(epoch_summary(data))
            data = DataPosition(position.epoch + 1)
        checkpoint_dir = tempfile.mkdtemp(prefix="clip_ckpt_") if rank == 0 else None
        if rank == 0:
            torch.save(
                {
                    "model": {k: v.detach().cpu() for k, v in clip.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "nonfinite_skipped": nonfinite,
                    "data": dataclasses.asdict(data),
                    "epochs": epochs_done,
                    "metrics": metrics_rows,
                    "rng": {
                        "python": random.getstate(),
                        "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state(),
                    },
                    "config": config_to_dict(cfg),
                    "model_config": dataclasses.asdict(model_config),
                },
                os.path.join(checkpoint_dir, STATE_FILE),
            )
            torch.save(
                to_openai_state_dict(clip, torch.float16), os.path.join(checkpoint_dir, OPENAI_FP16_FILE)
            )
            with open(os.path.join(checkpoint_dir, MODEL_CONFIG_FILE), "w") as f:
                json.dump(dataclasses.asdict(model_config), f)
            with open(os.path.join(checkpoint_dir, METRICS_FILE), "w") as f:
                f.write(_csv(metrics_rows))
            with open(os.path.join(checkpoint_dir, TOKENIZER_FILE), "wb") as f:
                f.write(merges)
        report = {**metrics, "epochs_done": len(epochs_done), "epoch_trained": trained_in_epoch}
        if rank == 0:
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                delete_local_checkpoint_after_upload=True,  # SYNC upload: storage holds it when this returns
            )
        else:
            ray.train.report(report, checkpoint=None)
        return data

    new_trained: list[np.ndarray] = []
    stream = None
    metrics: dict = {}
    while step < total_steps and (cfg.max_steps > 0 or position.epoch < cfg.epochs):
        epoch = position.epoch
        new_trained = []
        stream = EpochStream(
            shard,
            cfg.batch_size,
            skip_hashes=position.consumed(),
            shuffle_buffer=cfg.shuffle_buffer,
            shuffle_seed=(cfg.seed * 1_000_003 + epoch * 1009 + rank) % 2**31,
            prefetch_batches=cfg.prefetch_batches,
            device=device,
        )
        batches = iter(stream)
        epoch_steps, window = 0, {"time": 0.0, "wait": 0.0, "steps": 0}
        exhausted = False
        while step < total_steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            wait = time.perf_counter() - t0
            if not _all_ranks(batch is not None):
                exhausted = True
                break
            images, tokens, hashes = batch
            optimizer.zero_grad(set_to_none=True)
            loss, finite = forward_backward(model, images, tokens, cfg.accum_steps, autocast, scaler.scale)
            if finite:
                scaler.step(optimizer)
                scaler.update()
                with torch.no_grad():
                    clip.logit_scale.clamp_(0, max_log_scale)
            else:
                nonfinite += 1
            scheduler.step()
            new_trained.append(hashes.cpu().numpy())
            step += 1
            epoch_steps += 1
            window["time"] += time.perf_counter() - t0
            window["wait"] += wait
            window["steps"] += 1

            # In epochs mode the run ends with the epoch-end checkpoint below, not a step checkpoint.
            last = step == total_steps and cfg.max_steps > 0
            checkpoint_now = last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)
            if step % cfg.log_every == 0 or checkpoint_now:
                metrics = {
                    "step": step,
                    "epoch": epoch,
                    "loss": _mean_over_ranks(loss) if finite else float("nan"),
                    "logit_scale": float(clip.logit_scale.exp()),
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": window["steps"] * cfg.batch_size * world / max(window["time"], 1e-9),
                    "data_wait_frac": window["wait"] / max(window["time"], 1e-9),
                    "nonfinite_skipped": nonfinite,
                }
                if device.type == "cuda":
                    metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if zero_shot and cfg.zero_shot_every > 0 and step % cfg.zero_shot_every == 0:
                    metrics["zero_shot_top1"] = zero_shot(clip, device)
                metrics_rows.append(metrics)
                window = {"time": 0.0, "wait": 0.0, "steps": 0}
                if checkpoint_now:
                    position = save(metrics)
                    new_trained, stream.bad, stream.bad_hashes = [], Counter(), []
                else:
                    ray.train.report(metrics, checkpoint=None)
            if cfg.crash_at_step and step == cfg.crash_at_step and rank == world - 1:
                _crash_once(cfg)

        if not exhausted and cfg.max_steps > 0:
            break  # step budget reached mid-epoch; the last checkpoint holds the position
        if epoch_steps == 0 and len(position.trained_hashes) == 0:
            raise RuntimeError(
                f"epoch {epoch} produced no full global batch of {cfg.batch_size} x {world} rows: "
                "the dataset is smaller than one batch (or every row was bad)"
            )
        # On exhaustion this rank may hold a batch that other ranks could not match: it was not trained.
        stream.drain(unused=len(batch[0]) if exhausted and batch is not None else 0)
        leftover = sum(_gather(stream.leftover))

        def summary(data: DataPosition, epoch=epoch, leftover=leftover, step=step) -> dict:
            return {
                "epoch": epoch,
                "rows": num_rows,
                "trained": len(data.trained_hashes),
                "unique_trained": len(np.unique(data.trained_hashes)),
                "bad": data.bad,
                "leftover": leftover,
                "steps": step,
            }

        metrics = {**metrics, "step": step, "epoch": epoch}
        if zero_shot and cfg.zero_shot_every == 0:
            metrics["zero_shot_top1"] = zero_shot(clip, device)
            metrics_rows.append({"step": step, "epoch": epoch, "zero_shot_top1": metrics["zero_shot_top1"]})
        position = save(metrics, epoch_summary=summary)
        new_trained = []

    if rank == 0:
        storage.makedirs(storage.join(cfg.storage_path, cfg.name))
        storage.write_bytes_atomic(
            storage.join(cfg.storage_path, cfg.name, METRICS_FILE), _csv(metrics_rows).encode()
        )


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _crash_once(cfg: TrainConfig) -> None:
    """Failure drill: kill this worker process the first time the run reaches `crash_at_step`."""
    marker = storage.join(cfg.storage_path, cfg.name, "crash_drill.done")
    if storage.exists(marker):
        return
    storage.makedirs(storage.join(cfg.storage_path, cfg.name))
    storage.write_bytes_atomic(marker, b"crashed\n")
    log.warning("crash drill: killing worker process %d at step %d", os.getpid(), cfg.crash_at_step)
    os._exit(1)
