"""train_loop_per_worker: what every Ray Train worker runs, as a few plain functions over explicit state.

    build_run(config)            -> Run         what does not change during the run (config, device, plan)
    build_state(run)             -> TrainState  model, optimizer, scaler, scheduler, step, data position
    restore(state, run, ckpt)                   the state a checkpoint holds (exact step and data position)
    train_one_epoch(state, run)  -> bool        steps over this worker's stream until the epoch ends
    save_checkpoint(state, run, ...)            one checkpoint, uploaded asynchronously by Ray Train

DDP (or FSDP2) over the `FeatureModel` wrapper, the all-gathered contrastive loss, bf16 autocast (or fp16 +
GradScaler), logit-scale clamp, non-finite losses skipped and counted, metrics reduced with one collective
per logged step. The data position is the size of the shard list (pipelines/train/position.py).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import logging
import math
import os
import pickle
import tempfile
import time
import zipfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import save_file as save_safetensors

from clip_model import Tokenizer, create_model, to_openai_state_dict
from clip_model.safe_pickle import refusal_reason
from pipelines import storage
from pipelines.config import config_to_dict, from_dict
from pipelines.train import parallel
from pipelines.train.config import TrainConfig
from pipelines.train.gradcache import FeatureModel, forward_backward
from pipelines.train.ingest import Decoder, DecodeSettings, ShardLoader, WorkerStream, normalize
from pipelines.train.optim import build_optimizer, build_scheduler
from pipelines.train.position import Position
from pipelines.train.precision import amp_settings, resolve_precision
from pipelines.train.zero_shot_check import ZeroShotCheck

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
SHARDED_STATE_DIR = "sharded_state"  # torch.distributed.checkpoint files (FSDP): one per rank + .metadata
OPENAI_FP16_FILE = "openai_fp16.pt"
SAFETENSORS_FILE = "model.safetensors"  # OpenAI-layout FP16 weights, the format other tools load without code
METRICS_FILE = "metrics.csv"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = (
    "tokenizer.txt.gz"  # the BPE merges the run tokenized with: a checkpoint is usable on its own
)


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


def merges_for_checkpoint(path: str) -> bytes:
    """The merges file as the checkpoint's tokenizer.txt.gz: a gzipped file as it is, a plain one gzipped."""
    data = Path(path).read_bytes()
    return data if data[:2] == b"\x1f\x8b" else gzip.compress(data, mtime=0)


def _checkpoint(uri: str) -> ray.train.Checkpoint:
    if storage.is_s3(uri):
        fs, path = storage.resolve(uri)
        return ray.train.Checkpoint(path, filesystem=fs)
    return ray.train.Checkpoint(uri)


@dataclasses.dataclass
class Run:
    """What does not change while the run trains."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    total_steps: int
    shard_uris: list[str]
    num_rows: int
    autocast: object
    merges: bytes
    decode: DecodeSettings
    zero_shot: ZeroShotCheck | None = None
    shard_rows: list[int] = dataclasses.field(default_factory=list)  # the driver's count of each shard
    selection_tag: str = ""  # the selection's fingerprint: a position is meaningless on another selection

    @property
    def shard_names(self) -> list[str]:
        names = [u.rsplit("/", 1)[-1] for u in self.shard_uris]
        return [f"{n}@{self.selection_tag}" for n in names] if self.selection_tag else names


@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint restores. `segment_start` is the data position this attempt's current
    epoch stream started from (the epoch's start, or the resume point)."""

    clip: torch.nn.Module  # the bare CLIP (state dicts, logit-scale clamp, exports)
    model: torch.nn.Module  # what steps run: FeatureModel under DDP / FSDP2, maybe compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    position: Position
    step: int = 0
    nonfinite: int = 0
    epochs: list[dict] = dataclasses.field(default_factory=list)
    metrics: list[dict] = dataclasses.field(default_factory=list)
    segment_start: Position | None = None


def build_run(loop_config: dict) -> Run:
    cfg = from_dict(TrainConfig, loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    model_config = cfg.model_config()
    merges_path = storage.local_file(cfg.tokenizer_merges)
    decode = DecodeSettings(
        model_config.image_resolution, cfg.tokenizer_merges, model_config.context_length, cfg.seed,
        cfg.decode_on, cfg.decode_resource, cfg.decode_cpus, cfg.decode_ahead, cfg.decode_batch_size,
        cfg.decode_ahead_s, cfg.decode_ahead_max_mb, cfg.straggler_factor, cfg.straggler_min_s,
    )  # fmt: skip
    zero_shot = None
    if cfg.zero_shot_data and rank == 0:
        tokenizer = Tokenizer(merges_path, context_length=model_config.context_length)
        zero_shot = ZeroShotCheck(cfg.zero_shot_data, tokenizer, model_config.image_resolution,
                                  cfg.zero_shot_templates, cfg.zero_shot_limit_per_class)  # fmt: skip
        if zero_shot.skipped:
            log.warning("zero-shot check: %d unreadable image(s) skipped", zero_shot.skipped)
    autocast, _ = amp_settings(cfg.precision, device)
    if not cfg.verbose:
        quiet_ray_train()
    if rank == 0:
        log.info("training on %d x %s, precision %s (configured: %s), compile %s", world, device,
                 resolve_precision(cfg.precision, device), cfg.precision, cfg.compile and cfg.compile_backend)  # fmt: skip
    return Run(cfg, rank, world, device, loop_config["total_steps"], loop_config["shard_uris"],
               loop_config["num_rows"], autocast, merges_for_checkpoint(merges_path) if rank == 0 else b"",
               decode, zero_shot, loop_config.get("shard_rows", []), loop_config.get("selection_tag", ""))  # fmt: skip


def quiet_ray_train() -> None:
    """Ray Train logs every `ray.train.report` of every rank ("Reporting training result ..."): our own
    step lines say what matters once per logged step (`verbose=true` brings Ray's back)."""
    from ray.train.v2._internal.execution import context
    from ray.train.v2._internal.execution import storage as train_storage

    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # named by its file path, not its module
    logging.getLogger(train_storage.__name__).setLevel(logging.WARNING)  # "Checkpoint successfully created"


def say(run: Run, message: str) -> None:
    """One line of the job's log, from rank 0 only (every rank knows the same). Logged, not printed: Ray
    Train's print patch would send a print to the job's log twice."""
    if run.rank == 0:
        log.info(message)


def build_state(run: Run) -> TrainState:
    cfg = run.cfg
    torch.manual_seed(cfg.seed)  # every rank starts from the same weights
    clip = create_model(cfg.model, **cfg.model_overrides)
    clip.set_grad_checkpointing(cfg.grad_checkpointing)
    model = _parallel(FeatureModel(clip), run)
    betas, eps = cfg.adam_betas_eps()
    optimizer = build_optimizer(clip, cfg.lr, cfg.weight_decay, betas, eps)
    _, scaler = amp_settings(cfg.precision, run.device)
    return TrainState(
        clip, model, optimizer, build_scheduler(optimizer, cfg.warmup_steps, run.total_steps), scaler,
        Position.start(0, run.shard_names, run.world, run.cfg.seed),
    )  # fmt: skip


def _parallel(model: FeatureModel, run: Run) -> torch.nn.Module:
    """FSDP2 (each block then compiled on its own) or DDP around a compiled model: compiled before the DDP
    wrapper, whose own bookkeeping dynamo cannot trace (3 graph breaks per step when compiled outside).
    Dynamo still sees the DDP module active and splits the graph at its gradient buckets."""
    compile = run.cfg.compile
    if run.cfg.fsdp:
        model = parallel.fully_shard_clip(model, run.device)
        if compile:
            parallel.compile_units(model.clip, run.cfg.compile_backend)
        return model
    if compile:
        model = torch.compile(model, backend=run.cfg.compile_backend)
    return ray.train.torch.prepare_model(model)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than tensors and plain data: loading it could run code."""


def load_state(path: str) -> dict:
    """`state.pt` as written by `_write_rank0_files`: tensors and plain data only (weights_only=True), so a
    planted file runs nothing; anything else is a one-line `UnsafeCheckpointError`."""
    try:  # mmap: the driver's check reads no tensor data (a legacy, non-zip file cannot be mapped)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain data ({refusal_reason(e)}), "
            "so loading it could run code; resume only from checkpoints this trainer wrote"
        ) from None
    except (RuntimeError, EOFError) as e:  # cut short, or not a torch.save file at all
        raise ValueError(f"cannot read {path}: {refusal_reason(e)}") from None


def restore(state: TrainState, run: Run, checkpoint: ray.train.Checkpoint) -> None:
    with checkpoint.as_directory() as d:
        saved = load_state(os.path.join(d, STATE_FILE))
        check_resumable(saved["model_config"], dataclasses.asdict(run.cfg.model_config()), checkpoint.path)
        if run.cfg.fsdp:
            parallel.load_sharded(state.model, state.optimizer, os.path.join(d, SHARDED_STATE_DIR))
        else:
            state.clip.load_state_dict(saved["model"])
            state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    state.step, state.nonfinite = saved["step"], saved["nonfinite_skipped"]
    state.epochs, state.metrics = saved["epochs"], saved["metrics"]
    state.position = Position(**saved["position"])
    state.position.check(run.shard_names)


def open_stream(state: TrainState, run: Run) -> WorkerStream:
    cfg = run.cfg
    state.segment_start = state.position
    cursor = state.position.cursor(run.rank, run.world, cfg.shards_in_flight)
    loader = ShardLoader(run.shard_uris, cfg.seed, state.position.epoch, selection=cfg.selection)
    return WorkerStream(cursor, loader, Decoder(run.decode), cfg.batch_size)


# ---------------------------------------------------------------- collectives


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_ranks(flag: bool) -> bool:
    """True when `flag` holds on every rank (a collective: every rank must call it)."""
    if not _distributed():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=_collective_device())
    dist.all_reduce(t)
    return t.item() == 0


def _sum_over_ranks(values: list[float | torch.Tensor]) -> list[float]:
    """Element-wise sums over ranks in one all-reduce (the logged metrics' single collective)."""
    device = _collective_device() if _distributed() else torch.device("cpu")
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in values])
    if _distributed():
        dist.all_reduce(t)
    return t.tolist()


def _gather(obj):
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- steps and epochs


@dataclasses.dataclass
class Window:
    """Per-rank sums over the steps since the last log line (reduced when logged, not at each step)."""

    loss: torch.Tensor | float = 0.0
    finite_steps: int = 0
    steps: int = 0
    wait: float = 0.0
    time: float = 0.0

    def metrics(self, state: TrainState, run: Run, epoch: int) -> dict:
        loss, finite, steps, wait, elapsed = _sum_over_ranks(
            [self.loss, self.finite_steps, self.steps, self.wait, self.time]
        )
        metrics = {
            "step": state.step,
            "epoch": epoch,
            "loss": loss / finite if finite else float("nan"),
            "logit_scale": float(state.clip.logit_scale.detach().exp()),
            "lr": state.scheduler.get_last_lr()[0],
            # time and wait are summed over ranks: per-rank means below
            "samples_per_s": steps * run.cfg.batch_size * run.world / max(elapsed, 1e-9),
            "data_wait_frac": wait / max(elapsed, 1e-9),
            "nonfinite_skipped": state.nonfinite,
        }
        if run.cfg.compile:
            metrics.update(compile_stats())
        if run.device.type == "cuda":
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        return metrics


def compile_stats() -> dict:
    """What torch.compile did in this process so far: graphs compiled (more than a few means recompiles)
    and graph breaks (each one splits the model and runs the gap eagerly)."""
    from torch._dynamo.utils import counters

    return {
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def train_step(
    state: TrainState, run: Run, images: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """One optimizer step on this rank's batch (and, through the loss, the global batch)."""
    state.optimizer.zero_grad(set_to_none=True)
    loss, finite = forward_backward(
        state.model, images, tokens, run.cfg.accum_steps, run.autocast, state.scaler.scale
    )
    if finite:
        if run.cfg.fsdp:
            parallel.reduce_replicated_grads(state.clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        with torch.no_grad():
            state.clip.logit_scale.clamp_(0, math.log(run.cfg.max_logit_scale))
    else:
        state.nonfinite += 1
    state.scheduler.step()
    state.step += 1
    return loss, finite


def _to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, tokens = (torch.from_numpy(a) for a in batch)
    non_blocking = device.type == "cuda"
    if non_blocking:
        images, tokens = images.pin_memory(), tokens.pin_memory()
    images = normalize(images.to(device, non_blocking=non_blocking))
    return images, tokens.to(device, non_blocking=non_blocking).long()


def train_one_epoch(state: TrainState, run: Run, stream: WorkerStream) -> bool:
    """Train on this epoch's stream. True when the epoch's data ran out on some rank; False when the run's
    step budget (`max_steps`) ended first (the last checkpoint holds the position). In epochs mode only the
    data ends an epoch."""
    cfg, epoch, window = run.cfg, state.position.epoch, Window()
    while cfg.max_steps == 0 or state.step < run.total_steps:
        t0 = time.perf_counter()
        batch = stream.next_batch()
        wait = time.perf_counter() - t0
        if not _all_ranks(batch is not None):
            return True
        stream.commit()
        images, tokens = _to_device(batch, run.device)
        loss, finite = train_step(state, run, images, tokens)
        window.loss = window.loss + (loss.detach().float() if finite else 0.0)
        window.finite_steps += int(finite)
        window.steps += 1
        window.wait += wait
        window.time += time.perf_counter() - t0

        last = state.step == run.total_steps and cfg.max_steps > 0  # epochs mode: the epoch end saves
        checkpoint_now = last or (cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0)
        if state.step % cfg.log_every == 0 or checkpoint_now:
            metrics = window.metrics(state, run, epoch)
            window = Window()
            if run.zero_shot and cfg.zero_shot_every > 0 and state.step % cfg.zero_shot_every == 0:
                metrics["zero_shot_top1"] = run.zero_shot(state.clip, run.device)
            state.metrics.append(metrics)
            say(run, step_line(metrics, run))
            if checkpoint_now:
                save_checkpoint(state, run, metrics, worker_part(stream, run))
            else:
                ray.train.report(metrics, checkpoint=None)
        if cfg.crash_at_step and state.step == cfg.crash_at_step and run.rank == run.world - 1:
            _crash_once(cfg)
    return False


def step_line(metrics: dict, run: Run) -> str:
    """The job log's line for a logged step: step, epoch, loss, speed, data wait and time to the end."""
    left = (run.total_steps - metrics["step"]) * run.cfg.batch_size * run.world
    eta = left / metrics["samples_per_s"] if metrics["samples_per_s"] > 0 else float("nan")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    return (
        f"step {metrics['step']}/{run.total_steps} epoch {metrics['epoch']} loss {metrics['loss']:.4f} "
        f"samples/s {metrics['samples_per_s']:.1f} data wait {metrics['data_wait_frac']:.0%} ETA {eta_text}"
    )


def worker_part(stream: WorkerStream, run: Run) -> dict:
    """This rank's part of the position: the stream's, plus the bad shards its loader met (by name)."""
    damaged = {run.shard_names[i]: [reason, read] for i, (reason, read) in stream.loader.damaged.items()}
    return {**stream.part(), "bad_shards": damaged}


def epoch_summary(state: TrainState, run: Run, done: Position, parts: list[dict]) -> dict:
    """The epoch's accounting: trained + bad (rows by reason, rows lost in bad shards) + not reached = rows."""
    bad = dict(done.bad)
    rows_of = dict(zip(run.shard_names, run.shard_rows))
    for name, (reason, read) in done.bad_shards.items():
        lost = max(0, rows_of.get(name, read) - read)  # rows the count promised that could not be read
        if lost:
            bad[reason] = bad.get(reason, 0) + lost
    start = state.segment_start
    return {
        "epoch": done.epoch,
        "rows": run.num_rows,
        "trained": done.trained,
        "bad": bad,
        "bad_shards": {name: reason for name, (reason, _) in sorted(done.bad_shards.items())},
        "not_reached": max(0, run.num_rows - done.trained - sum(bad.values())),
        "steps": state.step,
        "resumed_at_rows": start.trained + sum(start.bad.values()),
        "decoded_this_attempt": sum(p["decoded"] for p in parts),
    }


def epoch_line(summary: dict) -> str:
    """One line at each epoch's end: what was trained, dropped (by reason), not reached, bad shards."""
    bad = summary["bad"]
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(bad.items())) or "none"
    shards = ", ".join(f"{name} ({reason})" for name, reason in summary["bad_shards"].items())
    return (
        f"epoch {summary['epoch']} done at step {summary['steps']}: {summary['rows']} rows, trained "
        f"{summary['trained']}, dropped {sum(bad.values())} ({dropped}), not reached {summary['not_reached']}"
        + (f"; bad shards {len(summary['bad_shards'])}: {shards}" if shards else "")
    )


class BadShardsError(RuntimeError):
    """More of an epoch's shards were unreadable than `max_bad_shard_fraction` allows."""


def check_bad_shards(summary: dict, run: Run) -> None:
    bad, total = len(summary["bad_shards"]), len(run.shard_uris)
    if bad > run.cfg.max_bad_shard_fraction * total:
        names = ", ".join(f"{n} ({r})" for n, r in list(summary["bad_shards"].items())[:5])
        raise BadShardsError(
            f"epoch {summary['epoch']}: {bad} of {total} shards are bad ({names}), more than "
            f"max_bad_shard_fraction={run.cfg.max_bad_shard_fraction}: fix or remove them, or raise the limit"
        )


def finish_epoch(state: TrainState, run: Run, stream: WorkerStream) -> None:
    """Account for the epoch (trained + bad + not reached = rows), check zero-shot, save, next epoch."""
    parts = _gather({**worker_part(stream, run), "decoded": stream.decoded})
    done = state.segment_start.merge(parts, run.world)
    summary = epoch_summary(state, run, done, parts)
    say(run, epoch_line(summary))
    check_bad_shards(summary, run)
    if done.trained == 0:
        raise RuntimeError(
            f"epoch {done.epoch} produced no full global batch of {run.cfg.batch_size} x {run.world} rows: "
            "the dataset is smaller than one batch (or every row was bad)"
        )
    state.epochs.append(summary)
    metrics = {**(state.metrics[-1] if state.metrics else {}), "step": state.step, "epoch": done.epoch}
    if run.zero_shot and run.cfg.zero_shot_every == 0:
        metrics["zero_shot_top1"] = run.zero_shot(state.clip, run.device)
        state.metrics.append(
            {"step": state.step, "epoch": done.epoch, "zero_shot_top1": metrics["zero_shot_top1"]}
        )
    state.position = Position.start(done.epoch + 1, run.shard_names, run.world, run.cfg.seed)
    save_checkpoint(state, run, metrics, part=None)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(state: TrainState, run: Run, metrics: dict, part: dict | None) -> None:
    """Write this rank's part of a checkpoint to a local folder and hand it to Ray Train, which uploads it
    in the background (`checkpoint_upload=async`) while training goes on. Without FSDP rank 0 writes all of
    it; with FSDP every rank writes its shard of the weights and optimizer (torch.distributed.checkpoint).
    `part` is this rank's data position (mid-epoch); None after `finish_epoch` set the next epoch's start."""
    if part is not None:
        state.position = state.segment_start.merge(_gather(part), run.world)
    folder = tempfile.mkdtemp(prefix="clip_ckpt_")
    if run.cfg.fsdp:
        parallel.save_sharded(state.model, state.optimizer, os.path.join(folder, SHARDED_STATE_DIR))
        full = parallel.full_state_dict(state.model)  # a collective; only rank 0 gets the tensors
    else:
        full = None
    if run.rank == 0:
        _write_rank0_files(state, run, folder, full)
    report = {**metrics, "epochs_done": len(state.epochs), "epoch_trained": state.position.trained}
    wrote = run.rank == 0 or run.cfg.fsdp
    mode = (
        ray.train.CheckpointUploadMode.ASYNC
        if run.cfg.checkpoint_upload == "async"
        else ray.train.CheckpointUploadMode.SYNC
    )
    ray.train.report(
        report,
        checkpoint=ray.train.Checkpoint.from_directory(folder) if wrote else None,
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
    )


def _write_rank0_files(state: TrainState, run: Run, folder: str, full: dict | None) -> None:
    model_config = run.cfg.model_config()
    saved = {
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "step": state.step,
        "nonfinite_skipped": state.nonfinite,
        "position": state.position.to_dict(),
        "epochs": state.epochs,
        "metrics": state.metrics,
        "config": config_to_dict(run.cfg),
        "model_config": dataclasses.asdict(model_config),
    }
    if full is None:
        saved["model"] = {k: v.detach().cpu() for k, v in state.clip.state_dict().items()}
        saved["optimizer"] = state.optimizer.state_dict()
    torch.save(saved, os.path.join(folder, STATE_FILE))
    export = state.clip
    if full is not None:  # the sharded model's full weights, gathered on rank 0 into a CPU model
        export = create_model(run.cfg.model, **run.cfg.model_overrides)
        export.load_state_dict(full)
    fp16 = to_openai_state_dict(export, torch.float16)
    torch.save(fp16, os.path.join(folder, OPENAI_FP16_FILE))
    save_safetensors(fp16, os.path.join(folder, SAFETENSORS_FILE))  # the same weights, in a code-free format
    Path(folder, MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model_config)))
    Path(folder, METRICS_FILE).write_text(_csv(state.metrics))
    Path(folder, TOKENIZER_FILE).write_bytes(run.merges)


# ---------------------------------------------------------------- the worker function


def train_loop_per_worker(loop_config: dict) -> None:
    run = build_run(loop_config)
    state = build_state(run)
    # After a failure Ray Train hands back this run's latest checkpoint; a new run may start from resume_from.
    checkpoint = ray.train.get_checkpoint() or (
        _checkpoint(run.cfg.resume_from) if run.cfg.resume_from else None
    )
    if checkpoint is not None:
        restore(state, run, checkpoint)
    say(run, start_line(state, run, checkpoint))
    cfg = run.cfg
    while state.position.epoch < cfg.epochs if cfg.max_steps == 0 else state.step < run.total_steps:
        stream = open_stream(state, run)
        try:
            if not train_one_epoch(state, run, stream):
                break  # step budget reached mid-epoch
            finish_epoch(state, run, stream)
        finally:
            stream.close()
    if run.rank == 0:
        storage.makedirs(storage.join(cfg.storage_path, cfg.name))
        storage.write_bytes_atomic(
            storage.join(cfg.storage_path, cfg.name, METRICS_FILE), _csv(state.metrics).encode()
        )


def start_line(state: TrainState, run: Run, checkpoint: ray.train.Checkpoint | None) -> str:
    """Whether this attempt resumes (from which checkpoint, step and data position) or starts fresh."""
    if checkpoint is None:
        return f"starting fresh: step 0 of {run.total_steps}, epoch 0, {len(run.shard_uris)} shards, {run.num_rows} rows"
    position = state.position
    return (
        f"resuming from {checkpoint.path}: step {state.step} of {run.total_steps}, epoch {position.epoch}, "
        f"{int(position.finished_mask().sum())} shards finished, {len(position.in_flight)} in flight, "
        f"{position.trained + sum(position.bad.values())} rows of the epoch done"
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
