"""A worker killed mid-run: FailureConfig restarts from the latest checkpoint and the run ends at the same
step, no optimizer step applied twice, no sample of an epoch trained twice. Bad configs fail clearly."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

from clip_model import Tokenizer
from pipelines.config import ConfigError, load_config
from pipelines.shards import write_dataset
from pipelines.synthetic import generate, synthetic_shard_samples
from pipelines.train.config import TrainConfig
from pipelines.train.loop import ResumeMismatchError
from pipelines.train.trainer import build_trainer, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, BATCH, STEPS = 128, 8, 12  # 2 workers: global batch 16, 8 steps per epoch -> the run crosses an epoch


@pytest.fixture(scope="module")
def crashed_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    merges = root / "merges.txt.gz"
    tok = Tokenizer.train(
        [s.caption for s in generate(300, seed=3, size=32)], vocab_size=600, out_path=merges
    )
    write_dataset(
        synthetic_shard_samples(ROWS, seed=1, size=32), str(root / "shards"), 32, formats=("parquet",)
    )
    cfg = TrainConfig(
        model="tiny-vit",
        model_overrides={"vocab_size": tok.vocab_size, "image_resolution": 32},
        tokenizer_merges=str(merges),
        data_uri=str(root / "shards"),
        data_format="parquet",
        batch_size=BATCH,
        max_steps=STEPS,
        warmup_steps=2,
        shuffle_buffer=16,
        checkpoint_every=3,
        crash_at_step=5,  # the last worker kills its process after step 5; the step-3 checkpoint resumes
        max_failures=1,
        storage_path=str(root / "runs"),
        name="crash",
        log_every=3,
    )
    result = train(cfg)
    return cfg, result


def test_killed_worker_resumes_at_exact_step_and_data_position(crashed_run):
    cfg, result = crashed_run
    assert result.error is None, result.error
    assert os.path.exists(os.path.join(cfg.storage_path, cfg.name, "crash_drill.done"))  # the crash happened
    with result.checkpoint.as_directory() as d:
        state = torch.load(f"{d}/state.pt", weights_only=False)
        with open(f"{d}/metrics.csv") as f:
            logged_steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert result.metrics["step"] == state["step"] == STEPS
    assert state["scheduler"]["last_epoch"] == STEPS  # no step taken twice, none lost
    assert state["optimizer"]["state"][0]["step"].item() == STEPS
    # Steps 4-5 of the killed attempt were never checkpointed: each logged step appears exactly once.
    assert logged_steps == list(range(3, STEPS + 1, 3))

    global_batch = BATCH * cfg.num_workers
    (first,) = state["epochs"]  # epoch 0 complete, epoch 1 in progress
    assert first["trained"] == first["unique_trained"] and first["trained"] % global_batch == 0
    assert first["trained"] + first["leftover"] == ROWS and first["bad"] == {}
    current = state["data"]
    assert current["epoch"] == 1
    trained_now = current["trained_hashes"]
    assert len(trained_now) == len(np.unique(trained_now))
    # Same data accounting as an uninterrupted run: every step trained exactly one global batch.
    assert first["trained"] + len(trained_now) == STEPS * global_batch


def test_resume_from_another_model_config_is_refused(crashed_run):
    cfg, result = crashed_run
    other = load_config(
        TrainConfig,
        overrides=[
            f"data_uri={cfg.data_uri}",
            "data_format=parquet",
            f"tokenizer_merges={cfg.tokenizer_merges}",
            f"resume_from={result.checkpoint.path}",
            "model=tiny-rn",
            f"model_overrides={{vocab_size: {cfg.model_overrides['vocab_size']}, image_resolution: 32}}",
        ],
    )
    with pytest.raises(ResumeMismatchError, match="another model configuration.*vision_layers"):
        build_trainer(other)


def test_unknown_config_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(TrainConfig, overrides=["learning_rate=0.1"])
    cfg = load_config(TrainConfig, os.path.join(ROOT, "configs", "train_tiny.yaml"))
    assert cfg.model == "tiny-vit" and cfg.adam_betas_eps() == ((0.9, 0.98), 1e-6)
    assert load_config(TrainConfig, overrides=["model=RN50"]).adam_betas_eps() == ((0.9, 0.999), 1e-8)
    with pytest.raises(ValueError, match="accum_steps"):
        TrainConfig(batch_size=10, accum_steps=3)


def test_job_entry_rejects_unknown_key(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_clip", os.path.join(ROOT, "jobs", "train_clip.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--config", os.path.join(ROOT, "configs", "train_tiny.yaml"), "lr_max=3"])
    assert exit_info.value.code != 0 and "lr_max" in capsys.readouterr().err
