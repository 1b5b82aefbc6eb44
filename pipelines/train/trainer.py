"""Build the TorchTrainer of a TrainConfig: the shard list and its counts (pipelines/datasets.py), the step
plan, and train_loop_per_worker on N workers (each reads its own shards, see pipelines/train/ingest.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator

import pyarrow.fs as pafs
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from clip_model import Tokenizer
from pipelines import datasets, selection, storage
from pipelines.config import config_to_dict
from pipelines.train.config import TrainConfig
from pipelines.train.loop import (
    MODEL_CONFIG_FILE,
    STATE_FILE,
    check_resumable,
    load_state,
    train_loop_per_worker,
)


class SetupError(ValueError):
    """A problem of the run's set-up (data, merges, vocabulary, resume source), found before any worker
    starts: the job prints it as one line and exits 2."""


def resolve_shards(cfg: TrainConfig) -> list[datasets.Shard]:
    """The run's shards with their sample counts (index, img2dataset stats, manifests, or counted); with a
    selection, the selected shards with their selected row counts."""
    if cfg.selection:
        found = selection.resolve(cfg.data_uri, cfg.data_format, selection.open_selection(cfg.selection))
        where = f"{cfg.data_uri!r} selected by {cfg.selection!r}"
    else:
        found, where = datasets.resolve(cfg.data_uri, cfg.data_format), repr(cfg.data_uri)
    if cfg.selection and not found:
        raise ValueError(f"the selection {cfg.selection!r} keeps no row of {cfg.data_uri!r}")
    if len(found) < cfg.num_workers:
        raise ValueError(
            f"{len(found)} shard(s) in {where} for {cfg.num_workers} workers: each worker reads whole "
            "shards, so there must be at least one per worker (write more, smaller shards)"
        )
    if sum(s.num_samples for s in found) == 0:
        raise ValueError(f"the {len(found)} {cfg.data_format} shard(s) of {where} hold no samples")
    return found


def selection_tag(cfg: TrainConfig, found: list[datasets.Shard]) -> str:
    """The selection's fingerprint, part of the data position's shard-list check ("" without one)."""
    return selection.fingerprint(selection.open_selection(cfg.selection), found) if cfg.selection else ""


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


def _single_node() -> bool:
    import ray

    return not ray.is_initialized() or sum(1 for n in ray.nodes() if n["Alive"]) <= 1


def storage_root(cfg: TrainConfig, single_node: bool) -> str:
    """Where checkpoints go: storage_path, else `s3://<data bucket>/runs`, else `runs/` on one node."""
    if cfg.storage_path:
        return cfg.storage_path
    if storage.is_s3(cfg.data_uri):
        return "s3://" + cfg.data_uri[len("s3://") :].split("/", 1)[0] + "/runs"
    if single_node:
        return "runs"
    raise ValueError(
        "storage_path is required on a multi-node cluster (an s3:// URI, or a folder every node shares): "
        "checkpoints written to one node's disk are lost to the others"
    )


def _storage(cfg: TrainConfig) -> tuple[str, object | None]:
    if storage.is_s3(cfg.storage_path):
        fs, path = storage.resolve(cfg.storage_path)
        return path, fs
    return os.path.abspath(cfg.storage_path), None


def check_resume_source(cfg: TrainConfig) -> None:
    """Refuse early (before any worker starts) to resume from a checkpoint of another model config, or
    from a local `state.pt` holding anything but tensors and plain data (the workers check any source)."""
    if cfg.resume_from:
        found = json.loads(storage.read_bytes(storage.join(cfg.resume_from, MODEL_CONFIG_FILE)))
        check_resumable(found, dataclasses.asdict(cfg.model_config()), cfg.resume_from)
        if not storage.is_s3(cfg.resume_from):
            load_state(os.path.join(cfg.resume_from, STATE_FILE))  # mmap: the tensors are not read


def merges_vocab_size(cfg: TrainConfig) -> int:
    if not cfg.tokenizer_merges:
        raise ValueError(
            "tokenizer_merges is required: the OpenAI-layout merges file the model's vocab comes from"
        )
    if not storage.exists(cfg.tokenizer_merges):
        raise ValueError(f"tokenizer_merges {cfg.tokenizer_merges}: no such file")
    return Tokenizer(storage.local_file(cfg.tokenizer_merges)).vocab_size


def with_vocab_size(cfg: TrainConfig) -> TrainConfig:
    """The model's vocab_size from the merges file when the configuration does not set it."""
    if "vocab_size" in cfg.model_overrides:
        return cfg
    overrides = {**cfg.model_overrides, "vocab_size": merges_vocab_size(cfg)}
    return dataclasses.replace(cfg, model_overrides=overrides)


def check_tokenizer(cfg: TrainConfig, vocab_size: int) -> None:
    """Refuse early a merges file whose vocabulary is not the model's token embedding size: ids past the
    embedding would crash the workers, a smaller vocabulary would leave rows never trained."""
    tokenizer_vocab = merges_vocab_size(cfg)
    if tokenizer_vocab != vocab_size:
        raise ValueError(
            f"tokenizer {cfg.tokenizer_merges} has {tokenizer_vocab} tokens but model {cfg.model!r} has "
            f"vocab_size={vocab_size}: set model_overrides.vocab_size={tokenizer_vocab} (or leave it out: "
            "it is then the merges file's) or use the merges file the model was built for"
        )


def worker_paths(cfg: TrainConfig, single_node: bool) -> TrainConfig:
    """Paths as the workers must see them. s3:// URIs as they are. On a single node, local paths are made
    absolute (Ray Train workers run in another working directory). On a multi-node cluster no driver path
    is rewritten: a relative path resolves inside the job's working directory, which `ray job submit
    --working-dir` ships to every node, and an absolute one must be on a file system every node mounts."""
    fields = (
        "tokenizer_merges",
        "data_uri",
        "selection",
        "zero_shot_data",
        "zero_shot_templates",
        "resume_from",
        "storage_path",
    )
    if not single_node:
        return cfg
    local = {
        f: os.path.abspath(v)
        for f in fields
        if (v := getattr(cfg, f))
        and not storage.is_s3(v)
        and (f != "zero_shot_templates" or os.path.exists(v))
    }  # a template set name ("default") stays a name
    return dataclasses.replace(cfg, **local)


@contextlib.contextmanager
def setup_errors() -> Iterator[None]:
    """The checks' errors as one-line `SetupError`s."""
    try:
        yield
    except FileNotFoundError as e:  # e.g. resume_from without model_config.json
        raise SetupError(f"{e.filename or e}: no such file") from None
    except ValueError as e:  # DatasetError, ResumeMismatchError, UnsafeCheckpointError, the checks below
        raise SetupError(str(e)) from None


def preflight(cfg: TrainConfig) -> None:
    """The set-up checks that need no cluster, for the job to run before it connects to Ray: merges and
    vocabulary, shards listed, resume source."""
    with setup_errors():
        cfg = with_vocab_size(cfg)
        check_tokenizer(cfg, cfg.model_config().vocab_size)
        datasets.list_shards(cfg.data_uri, cfg.data_format)
        check_resume_source(cfg)


def check_setup(cfg: TrainConfig, single_node: bool) -> tuple[TrainConfig, list[datasets.Shard]]:
    """The run's configuration as the workers get it and its shards, or a one-line `SetupError`: data
    missing or empty, merges missing, vocabulary mismatch, a resume source that does not fit or is unsafe."""
    with setup_errors():
        cfg = dataclasses.replace(cfg, storage_path=storage_root(cfg, single_node))
        cfg = with_vocab_size(worker_paths(cfg, single_node))
        if cfg.selection:  # the workers read the selection folder itself (not the filter output holding it)
            cfg = dataclasses.replace(cfg, selection=selection.open_selection(cfg.selection).folder)
        check_resume_source(cfg)
        check_tokenizer(cfg, cfg.model_config().vocab_size)
        return cfg, resolve_shards(cfg)


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's registered checkpoints


def clear_unregistered_checkpoints(cfg: TrainConfig) -> list[str]:
    """Remove the run's checkpoint folders that Ray Train never registered: a kill during an upload (before
    the first registered checkpoint, or after the last one) leaves one behind. A rerun resumes from the
    registered ones only (or starts fresh), so such a folder could only be mistaken for a result."""
    run_dir = storage.join(cfg.storage_path, cfg.name)
    fs, path = storage.resolve(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    snapshot = storage.join(run_dir, SNAPSHOT_FILE)
    registered = set()
    if storage.exists(snapshot):
        registered = set(re.findall(r"checkpoint_[\w.-]+", storage.read_bytes(snapshot).decode()))
    stale = [i for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
             and i.base_name not in registered]  # fmt: skip
    for info in stale:
        fs.delete_dir(info.path)
    return sorted(i.base_name for i in stale)


def build_trainer(cfg: TrainConfig) -> TorchTrainer:
    single_node = _single_node()
    if single_node:  # nothing to watch for drains on one node (and its watcher logs an error line)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    cfg, found = check_setup(cfg, single_node)
    if stale := clear_unregistered_checkpoints(cfg):
        print(
            f"removed {len(stale)} checkpoint folder(s) an interrupted run left unregistered: {', '.join(stale)}"
        )
    num_rows = sum(s.num_samples for s in found)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    storage_path, storage_filesystem = _storage(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config_to_dict(cfg),
            "shard_uris": [s.uri for s in found],
            "shard_rows": [s.num_samples for s in found],
            "num_rows": num_rows,
            "total_steps": plan_steps(cfg, num_rows),
            "selection_tag": selection_tag(cfg, found),
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
    )


def train(cfg: TrainConfig) -> ray.train.Result:
    return build_trainer(cfg).fit()
