"""Files a user is handed run no code: a planted `state.pt`, feature-cache file, TorchScript archive and
sharded-checkpoint metadata each leave the marker file uncreated and end in a one-line error or a safe load;
what the trainer writes still loads (weights_only, safetensors, OpenAI's TorchScript layout)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import clip_model
from clip_model.checkpoint import CheckpointError
from pipelines.evaluation.data import open_eval_set
from pipelines.evaluation.embed import EmbedOptions, embed_eval_set
from pipelines.train.config import TrainConfig
from pipelines.train.loop import STATE_FILE, UnsafeCheckpointError, load_state
from pipelines.train.parallel import check_sharded_metadata
from pipelines.train.trainer import SetupError, check_setup


class Payload:
    """A pickle that creates `marker` when unpickled by a loader that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    """A `torch.save` file whose pickle runs `Path.touch(marker)` (as `torch.load(weights_only=False)`
    would)."""
    torch.save({"step": 3, "position": Payload(marker)}, path)


def test_planted_payload_runs_under_the_old_loader(tmp_path):
    # The marker proves something: the payload does run when a loader executes pickles.
    marker = tmp_path / "ran"
    plant(tmp_path / "state.pt", marker)
    torch.load(tmp_path / "state.pt", weights_only=False)
    assert marker.exists()


def test_planted_state_is_refused_before_training_starts(tmp_path):
    ckpt, marker = tmp_path / "checkpoint_x", tmp_path / "ran"
    ckpt.mkdir()
    cfg = TrainConfig(model="tiny-vit", model_overrides={"vocab_size": 600}, resume_from=str(ckpt))
    (ckpt / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg.model_config())))
    plant(ckpt / STATE_FILE, marker)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_state(str(ckpt / STATE_FILE))  # what the workers' restore calls
    message = str(refused.value)
    assert "\n" not in message and "could run code" in message and "callable getattr" in message
    with pytest.raises(SetupError, match="could run code"):  # the driver's check, before Ray Train
        check_setup(cfg, single_node=True)
    assert not marker.exists()


def _eval_setup(tmp_path: Path):
    from pipelines import synthetic

    folder = tmp_path / "zs"
    for i, s in enumerate(synthetic.generate(6, seed=1, size=32)):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 2}" / f"{i}.jpg").write_bytes(synthetic.to_jpeg(s.image))
    torch.manual_seed(0)
    model = clip_model.create_model("tiny-vit", vocab_size=600, image_resolution=32).eval()
    return open_eval_set(str(folder), "classification"), model


def test_planted_feature_cache_runs_nothing_and_is_recomputed(tmp_path):
    eval_set, model = _eval_setup(tmp_path)
    opts = EmbedOptions(use_ray="never", cache_dir=str(tmp_path / "cache"))
    first = embed_eval_set(eval_set, model, opts=opts)
    again = embed_eval_set(eval_set, model, opts=opts)
    assert again.from_cache and torch.equal(again.image_features, first.image_features)
    (cache_file,) = (tmp_path / "cache").iterdir()
    marker = tmp_path / "ran"
    plant(cache_file, marker)
    recomputed = embed_eval_set(eval_set, model, opts=opts)
    assert not marker.exists()
    assert not recomputed.from_cache and torch.equal(recomputed.image_features, first.image_features)
    assert embed_eval_set(eval_set, model, opts=opts).from_cache  # rewritten as plain data


EVIL_SCRIPT = """
import sys
from typing import Tuple
import torch

class Evil(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.w = state[0]
        self.training = state[1]
        t = torch.from_file(MARKER, shared=True, size=2)  # creates the marker file
        t.fill_(1.0)
        print(t.sum())

    def forward(self, x):
        return x * self.w

torch.jit.script(Evil()).save(sys.argv[1])
"""


def test_torchscript_archive_runs_nothing(tmp_path):
    marker, archive = tmp_path / "ran", tmp_path / "openai_fp16.pt"
    script = tmp_path / "make_evil.py"
    script.write_text(EVIL_SCRIPT.replace("MARKER", repr(str(marker))))  # torch.jit needs a source file
    assert os.system(f"'{os.sys.executable}' '{script}' '{archive}'") == 0 and not marker.exists()
    with pytest.raises(CheckpointError) as refused:
        clip_model.load(archive)
    assert not marker.exists() and "\n" not in str(refused.value)

    # An archive whose pickle names a Python callable is refused by name, before anything is called.
    planted = tmp_path / "planted.pt"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(planted, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(Payload(marker), protocol=2)
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match="refers to __builtin__.getattr"):
        clip_model.load(planted)
    assert not marker.exists()
    # torch.jit.load would have run it: the test's archive is a real attack.
    torch.jit.load(archive)
    assert marker.exists()


def test_torchscript_release_tensors_read_without_running_it(tmp_path):
    torch.manual_seed(0)
    model = clip_model.create_model("tiny-vit", vocab_size=600, image_resolution=32).eval()
    images, tokens = torch.randn(1, 3, 32, 32), torch.randint(0, 600, (1, 77))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.trace(model, (images, tokens), check_trace=False), path)
    loaded = clip_model.load(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_planted_sharded_metadata_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    good, bad, marker = tmp_path / "good", tmp_path / "bad", tmp_path / "ran"
    layer = torch.nn.Linear(3, 2)
    dcp.save({"model": layer.state_dict()}, checkpoint_id=str(good))
    check_sharded_metadata(str(good))  # what torch writes passes
    bad.mkdir()
    (bad / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="could run code") as refused:
        check_sharded_metadata(str(bad))
    assert not marker.exists() and "\n" not in str(refused.value)
