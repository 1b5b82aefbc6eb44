"""Build the TorchTrainer of a TrainConfig: Ray Data ingest + train_loop_per_worker on N workers."""

from __future__ import annotations

import dataclasses
import json
import os

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from clip_model import Tokenizer
from pipelines import shards, storage
from pipelines.config import config_to_dict
from pipelines.train.config import TrainConfig
from pipelines.train.ingest import build_dataset
from pipelines.train.loop import MODEL_CONFIG_FILE, check_resumable, train_loop_per_worker


def count_rows(cfg: TrainConfig) -> int:
    """Samples in the committed shards of the configured format (from the manifests, no data read)."""
    ext = ".tar" if cfg.data_format == "webdataset" else ".parquet"
    manifests = shards.committed_shards(cfg.data_uri).values()
    rows = sum(m["count"] for m in manifests if any(f.endswith(ext) for f in m["files"]))
    if rows == 0:
        raise ValueError(f"no committed {cfg.data_format} shards under {cfg.data_uri!r}")
    return rows


def plan_steps(cfg: TrainConfig, num_rows: int) -> int:
    """Optimizer steps of the run: max_steps, or epochs x full global batches per epoch."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = num_rows // (cfg.batch_size * cfg.num_workers)
    if per_epoch == 0:
        raise ValueError(
            f"{num_rows} samples do not fill one global batch of {cfg.batch_size} x {cfg.num_workers} workers"
        )
    return cfg.epochs * per_epoch


def _storage(cfg: TrainConfig) -> tuple[str, object | None]:
    if storage.is_s3(cfg.storage_path):
        fs, path = storage.resolve(cfg.storage_path)
        return path, fs
    return os.path.abspath(cfg.storage_path), None


def check_resume_source(cfg: TrainConfig) -> None:
    """Refuse early (before any worker starts) to resume from a checkpoint of another model config."""
    if cfg.resume_from:
        found = json.loads(storage.read_bytes(storage.join(cfg.resume_from, MODEL_CONFIG_FILE)))
        check_resumable(found, dataclasses.asdict(cfg.model_config()), cfg.resume_from)


def check_tokenizer(cfg: TrainConfig, vocab_size: int) -> None:
    """Refuse early a merges file whose vocabulary is not the model's token embedding size: ids past the
    embedding would crash the workers, a smaller vocabulary would leave rows never trained."""
    if not cfg.tokenizer_merges:
        raise ValueError("tokenizer_merges is required: the OpenAI-layout merges file the model's vocab comes from")
    tokenizer = Tokenizer(storage.local_file(cfg.tokenizer_merges))
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer {cfg.tokenizer_merges} has {tokenizer.vocab_size} tokens but model {cfg.model!r} has "
            f"vocab_size={vocab_size}: set model_overrides.vocab_size={tokenizer.vocab_size} or use the "
            "merges file the model was built for"
        )


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute on the driver: Ray Train workers run in another working directory."""
    fields = ("tokenizer_merges", "data_uri", "zero_shot_data", "zero_shot_templates", "resume_from")
    local = {
        f: os.path.abspath(v)
        for f in fields
        if (v := getattr(cfg, f)) and not storage.is_s3(v) and (f != "zero_shot_templates" or os.path.exists(v))
    }  # a template set name ("default") stays a name
    return dataclasses.replace(cfg, **local)


def build_trainer(cfg: TrainConfig) -> TorchTrainer:
    cfg = absolute_paths(cfg)
    check_resume_source(cfg)
    model_config = cfg.model_config()
    check_tokenizer(cfg, model_config.vocab_size)
    num_rows = count_rows(cfg)
    dataset = build_dataset(cfg, model_config.image_resolution, model_config.context_length)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    storage_path, storage_filesystem = _storage(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config_to_dict(cfg),
            "num_rows": num_rows,
            "total_steps": plan_steps(cfg, num_rows),
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets={"train": dataset},
    )


def train(cfg: TrainConfig) -> ray.train.Result:
    return build_trainer(cfg).fit()
