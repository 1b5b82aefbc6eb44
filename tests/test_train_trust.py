"""A run says what it did and bad data is a data problem: training over shards with a truncated tar, a
random-bytes tar and a Parquet shard without `jpg` finishes and names each with its reason; too many bad
shards stop it in one line; set-up problems are one line with exit 2 before Ray Train starts; the README's
"Training and evaluating your own run" commands run as written against demo-like outputs, and a resumed
run says that it resumed."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import clip_model
from clip_model import Tokenizer
from pipelines.demo_corpus import CorpusParams, write_corpus
from pipelines.shards import write_dataset
from pipelines.synthetic import generate, synthetic_shard_samples
from pipelines.train.config import TrainConfig
from pipelines.train.loop import BadShardsError, Run, check_bad_shards, epoch_line
from pipelines.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SIZE, PER_SHARD = 32, 16


@pytest.fixture(scope="module")
def merges(tmp_path_factory) -> tuple[str, int]:
    path = tmp_path_factory.mktemp("tok") / "merges.txt.gz"
    tok = Tokenizer.train([s.caption for s in generate(300, seed=3, size=SIZE)], 600, path)
    return str(path), tok.vocab_size


def _cfg(merges: tuple[str, int], data: Path, fmt: str, root: Path, name: str) -> TrainConfig:
    return TrainConfig(
        model="tiny-vit", model_overrides={"image_resolution": SIZE}, tokenizer_merges=merges[0],
        data_uri=str(data), data_format=fmt, batch_size=8, epochs=1, warmup_steps=1, num_workers=1,
        shards_in_flight=2, decode_on="worker", storage_path=str(root / "runs"), name=name,
        checkpoint_upload="sync", max_bad_shard_fraction=0.5,
    )  # fmt: skip


def _epoch(result) -> dict:
    assert result.error is None, result.error
    with result.checkpoint.as_directory() as d:
        (epoch,) = torch.load(f"{d}/state.pt", weights_only=True)["epochs"]
    return epoch


def test_bad_tars_and_parquet_without_jpg_are_named_and_counted(ray_local, merges, tmp_path):
    tars = tmp_path / "tars"
    write_dataset(synthetic_shard_samples(4 * PER_SHARD, seed=1, size=SIZE), str(tars), PER_SHARD,
                  formats=("webdataset",))  # fmt: skip
    whole = (tars / "00001.tar").read_bytes()
    (tars / "00001.tar").write_bytes(whole[: len(whole) // 2])  # truncated halfway (its manifest says 16)
    (tars / "00002.tar").write_bytes(os.urandom(len(whole)))  # random bytes
    epoch = _epoch(train(_cfg(merges, tars, "webdataset", tmp_path, "tars")))
    assert epoch["bad_shards"] == {"00001.tar": "truncated_tar", "00002.tar": "unreadable_tar"}
    assert epoch["bad"]["truncated_tar"] > 0  # the rows past the damage, counted by the shard's reason
    assert epoch["trained"] + sum(epoch["bad"].values()) + epoch["not_reached"] == epoch["rows"]
    assert epoch["trained"] >= 2 * PER_SHARD - 8  # the good shards were trained (last partial batch aside)
    # Above the tolerance the run stops, and the job's error is the one line that says why.
    strict = dataclasses.replace(
        _cfg(merges, tars, "webdataset", tmp_path, "strict"), max_bad_shard_fraction=0.25
    )
    try:
        error = train(strict).error
    except Exception as e:  # Ray Train raises the workers' error from fit()
        error = e
    line = load_job("train_clip").failure_line(error)
    assert line.startswith("epoch 0: 2 of 4 shards are bad (00001.tar (truncated_tar), 00002.tar"), line
    assert "max_bad_shard_fraction=0.25" in line

    parquet = tmp_path / "parquet"
    write_dataset(synthetic_shard_samples(3 * PER_SHARD, seed=2, size=SIZE), str(parquet), PER_SHARD,
                  formats=("parquet",))  # fmt: skip
    table = pq.read_table(parquet / "00001.parquet")
    pq.write_table(table.drop_columns(["jpg"]), parquet / "00001.parquet")  # metadata only
    epoch = _epoch(train(_cfg(merges, parquet, "parquet", tmp_path, "parquet")))
    assert epoch["bad_shards"] == {"00001.parquet": "parquet_without_jpg"}
    assert epoch["bad"]["parquet_without_jpg"] == PER_SHARD
    assert epoch["trained"] + sum(epoch["bad"].values()) + epoch["not_reached"] == epoch["rows"]
    line = epoch_line(epoch)
    assert "bad shards 1: 00001.parquet (parquet_without_jpg)" in line and "\n" not in line


def test_too_many_bad_shards_stop_in_one_line():
    summary = {"epoch": 0, "bad_shards": {"00001.tar": "truncated_tar", "00002.tar": "unreadable_tar"}}
    cfg = TrainConfig(max_bad_shard_fraction=0.25)
    run = Run(cfg, 0, 1, torch.device("cpu"), 1, [f"{i:05d}.tar" for i in range(4)], 64, None, b"", None)
    with pytest.raises(BadShardsError, match=r"2 of 4 shards are bad \(00001.tar \(truncated_tar\)") as e:
        check_bad_shards(summary, run)
    assert "\n" not in str(e.value)
    check_bad_shards(summary, dataclasses.replace(run, cfg=TrainConfig(max_bad_shard_fraction=0.5)))


def _job(args: list[str], cwd: Path, env: dict, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("data_uri=nowhere/shards", "nowhere/shards"),
        ("tokenizer_merges=missing.txt.gz", "missing.txt.gz: no such file"),
        ("model_overrides.vocab_size=707", "set model_overrides.vocab_size=600"),
        ("model=tiny-rnn", "model: Unknown model 'tiny-rnn'"),
        ("model_overrides.vocab_sise=3", "model_overrides: Unknown CLIPConfig field(s) ['vocab_sise']"),
    ],
)
def test_setup_problems_are_one_line_and_exit_2(merges, tmp_path, monkeypatch, capsys, override, message):
    data = tmp_path / "shards"
    write_dataset(
        synthetic_shard_samples(32, seed=1, size=SIZE), str(data), PER_SHARD, formats=("webdataset",)
    )
    args = ["--config", str(ROOT / "configs/train_tiny.yaml"), f"data_uri={data}",
            f"tokenizer_merges={merges[0]}", f"storage_path={tmp_path}", override]  # fmt: skip
    # Found before the job joins or starts Ray: an address where nothing listens is never reached.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.chdir(tmp_path)
    try:
        code = load_job("train_clip").main(args)
    except SystemExit as e:  # argparse's usage error (parse-time checks)
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


# ---------------------------------------------------------------- the README, as written


def readme_commands(section: str = "## Training and evaluating your own run") -> list[list[str]]:
    """The commands of the section's first ```bash block, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(section) :].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(cmd, comments=True) for cmd in block.replace("\\\n", " ").splitlines() if cmd.strip()]


def demo_like_outputs(repo: Path) -> None:
    """What `scripts/demo.sh` leaves in runs/demo/data, small: shards, their merges, the held-out corpus."""
    data = repo / "runs" / "demo" / "data"
    captions = [s.caption for s in generate(300, seed=3, size=SIZE)]
    Tokenizer.train(captions, 600, data / "merges.txt.gz")
    write_dataset(synthetic_shard_samples(128, seed=5, size=SIZE), str(data / "shards"), 32,
                  formats=("webdataset",))  # fmt: skip
    write_corpus(data / "corpus", CorpusParams(images_per_concept=1, heldout_per_concept=1, sites=2))


def test_readme_train_and_eval_commands_run_as_written(ray_head, tmp_path):
    # The README's working directory: a checkout (code, configs) with the demo's outputs under runs/demo.
    repo = tmp_path / "checkout"
    repo.mkdir()
    for name in ("jobs", "pipelines", "clip_model", "configs"):
        (repo / name).symlink_to(ROOT / name)
    demo_like_outputs(repo)
    env = {**os.environ, "RAY_ADDRESS": ray_head.address, "PYTHONPATH": str(ROOT)}
    commands = readme_commands()
    assert commands[0] == ["source", ".venv/bin/activate"] and [c[:2] for c in commands[1:]] == [
        ["python", "jobs/train_clip.py"], ["python", "jobs/eval_clip.py"]]  # fmt: skip

    trained = _job(commands[1][1:], repo, env)
    log = trained.stdout + trained.stderr
    assert trained.returncode == 0, log[-3000:]
    checkpoint = re.search(r"^checkpoint: (\S+)$", trained.stdout, re.M).group(1)
    assert "starting fresh: step 0 of" in log and re.search(
        r"step \d+/\d+ epoch \d+ loss [\d.]+ samples/s [\d.]+ data wait \d+% ETA", log
    )
    assert re.search(r"epoch 3 done at step \d+: 128 rows, trained \d+, dropped 0 \(none\), not reached", log)
    assert "Reporting training result" not in log and "PreemptionWatcher" not in log
    assert "UserWarning" not in log, log[-3000:]
    weights = clip_model.load(Path(checkpoint) / "model.safetensors")  # the code-free export
    assert weights.config.vocab_size == Tokenizer(str(repo / "runs/demo/data/merges.txt.gz")).vocab_size

    evaluate = [a.replace("checkpoint_<time>", Path(checkpoint).name) for a in commands[2][1:]]
    evaluated = _job(evaluate, repo, env)
    assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-3000:]
    assert (repo / "runs" / "eval" / "report.html").exists()

    # The same training resumed from its checkpoint says so (checkpoint, step, position) and trains on.
    resumed = _job([*commands[1][1:], f"resume_from={checkpoint}", "epochs=5", "name=resumed"], repo, env)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert re.search(
        rf"resuming from {re.escape(checkpoint)}: step \d+ of \d+, epoch 4, 0 shards finished", log
    )
    assert "epoch 4 done at step" in log and "starting fresh" not in log


def test_a_kill_before_the_first_checkpoint_leaves_nothing_to_mistake(merges, tmp_path):
    from pipelines.train.trainer import SNAPSHOT_FILE, build_trainer

    data = tmp_path / "shards"
    write_dataset(
        synthetic_shard_samples(32, seed=1, size=SIZE), str(data), PER_SHARD, formats=("webdataset",)
    )
    cfg = _cfg(merges, data, "webdataset", tmp_path, "killed")
    run_dir = tmp_path / "runs" / "killed"
    (run_dir / "checkpoint_2026-12-07_10-00-00.000001").mkdir(parents=True)  # an upload cut short
    (run_dir / "checkpoint_2026-12-07_10-00-00.000001" / "state.pt").write_bytes(b"half")
    build_trainer(cfg)
    assert not list(run_dir.glob("checkpoint_*"))
    # Registered checkpoints (named in Ray Train's snapshot) stay: a rerun resumes from them.
    (run_dir / "checkpoint_a").mkdir()
    (run_dir / "checkpoint_b").mkdir()
    (run_dir / SNAPSHOT_FILE).write_text(
        '{"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_a"}}'
    )
    build_trainer(cfg)
    assert [p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()] == ["checkpoint_a"]
