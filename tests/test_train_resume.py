"""A worker killed at 90% of an epoch: Ray Train restarts from the latest checkpoint and the run ends at the
same step, with the same loss trajectory and data accounting as an uninterrupted run, having decoded only
the rows after the checkpoint's data position. A restart with another number of workers reads the rest of
the epoch exactly once. Bad configs fail clearly."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import train_and_read  # shared builder (tests/ is on sys.path under pytest)

from clip_model import Tokenizer
from pipelines.config import ConfigError, load_config
from pipelines.shards import write_dataset
from pipelines.synthetic import generate, synthetic_shard_samples
from pipelines.train.config import TrainConfig
from pipelines.train.trainer import SetupError, build_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 10 shards of 16 rows, 2 workers x 8: 5 shards and 10 batches per worker, 10 steps in the epoch.
ROWS, PER_SHARD, BATCH, STEPS = 160, 16, 8, 10


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    merges = root / "merges.txt.gz"
    tok = Tokenizer.train(
        [s.caption for s in generate(300, seed=3, size=32)], vocab_size=600, out_path=merges
    )
    write_dataset(
        synthetic_shard_samples(ROWS, seed=1, size=32), str(root / "shards"), PER_SHARD, formats=("parquet",)
    )
    clean = TrainConfig(
        model="tiny-vit", model_overrides={"vocab_size": tok.vocab_size, "image_resolution": 32},
        tokenizer_merges=str(merges), data_uri=str(root / "shards"), data_format="parquet", batch_size=BATCH,
        epochs=1, warmup_steps=2, shards_in_flight=2, checkpoint_every=3, keep_checkpoints=3,
        checkpoint_upload="sync", max_failures=1, storage_path=str(root / "runs"), name="clean", log_every=1,
    )  # fmt: skip
    # Checkpoints at steps 3, 6, 9 (90% of the epoch); the last worker kills its process after step 10, a
    # step later, so that Ray Train has registered step 9's checkpoint (it may still be step 6's).
    crashed = dataclasses.replace(clean, name="crash", crash_at_step=10)
    return clean, train_and_read(clean), crashed, train_and_read(crashed)


def test_killed_at_90_percent_resumes_like_an_uninterrupted_run(runs):
    clean_cfg, clean, cfg, crashed = runs
    assert os.path.exists(os.path.join(cfg.storage_path, cfg.name, "crash_drill.done"))  # the crash happened
    state, reference = crashed["state"], clean["state"]
    assert state["step"] == reference["step"] == STEPS
    assert state["scheduler"]["last_epoch"] == STEPS  # no step taken twice, none lost
    assert state["optimizer"]["state"][0]["step"].item() == STEPS
    steps = [int(r["step"]) for r in crashed["metrics"] if r["loss"]]
    assert steps == list(
        range(1, STEPS + 1)
    )  # each step logged once: the killed attempt's last steps are gone
    losses = [float(r["loss"]) for r in crashed["metrics"] if r["loss"]]
    reference_losses = [float(r["loss"]) for r in clean["metrics"] if r["loss"]]
    assert losses == pytest.approx(reference_losses, rel=1e-5, abs=1e-6)
    for key, value in reference["model"].items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-5, atol=1e-6)

    (epoch,), (reference_epoch,) = state["epochs"], reference["epochs"]
    for key in ("rows", "trained", "bad", "not_reached", "steps"):
        assert epoch[key] == reference_epoch[key], key
    assert epoch["trained"] == ROWS and epoch["not_reached"] == 0
    # Resumed from step 9's position (or 6's): only the rows after it were decoded by the second attempt.
    resumed_at = epoch["resumed_at_rows"]
    assert resumed_at in (6 * BATCH * 2, 9 * BATCH * 2), resumed_at
    assert epoch["decoded_this_attempt"] == ROWS - resumed_at
    assert reference_epoch["decoded_this_attempt"] == ROWS


def test_restart_with_another_number_of_workers_reads_the_rest_once(runs):
    clean_cfg, clean, _, _ = runs
    step9 = next(c for c, m in clean["result"].best_checkpoints if m["step"] == 9 and m["epochs_done"] == 0)
    one = dataclasses.replace(
        clean_cfg, name="one_worker", num_workers=1, resume_from=step9.path, max_failures=0
    )
    state = train_and_read(one)["state"]
    (epoch,) = state["epochs"]
    # 16 rows were left in the epoch: one worker of batch 8 trains them in 2 steps, none twice, none lost
    assert epoch["resumed_at_rows"] == 144 and epoch["decoded_this_attempt"] == 16
    assert epoch["trained"] == ROWS and epoch["not_reached"] == 0 and state["step"] == 11


def test_resume_from_another_model_config_is_refused(runs):
    cfg, clean = runs[0], runs[1]
    result = clean["result"]
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
    with pytest.raises(SetupError, match="another model configuration.*vision_layers"):
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
