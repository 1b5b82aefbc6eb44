"""Evaluation inputs on S3 (moto on loopback), no Ray: a trainer-style checkpoint folder, its merges file, an
image folder of class sub-prefixes and a captions JSONL are all read from s3:// URIs, and give the same
features and labels as the same files on local disk. The training run's zero-shot check reads an S3 folder too.
(tests/test_cluster_e2e.py runs the same through the job API on a multi-node cluster.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint_folder  # shared builder (tests/ is on sys.path under pytest)

import clip_model
from pipelines import storage, synthetic
from pipelines.evaluation.data import open_eval_set
from pipelines.evaluation.embed import (
    EmbedOptions,
    EvalModelError,
    embed_eval_set,
    find_merges,
    find_weights,
    load_model,
    load_tokenizer,
)
from pipelines.train.zero_shot_check import ZeroShotCheck

CONCEPTS = [synthetic.Concept(c, s) for c, s in [("red", "circle"), ("blue", "square")]]


def upload(local: Path, uri: str) -> str:
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes_atomic(storage.join(uri, str(f.relative_to(local))), f.read_bytes())
    return uri


@pytest.fixture(scope="module")
def local_and_s3(s3_server, tmp_path_factory):
    base = tmp_path_factory.mktemp("evals3")
    ckpt = base / "checkpoint_000001"
    captions = [s.caption for s in synthetic.generate(100, seed=7)] + [c.label for c in CONCEPTS]
    make_checkpoint_folder(ckpt, captions, "tokenizer.txt.gz", step=1)
    lines = []
    for i, s in enumerate(synthetic.generate(4, seed=3, concepts=CONCEPTS)):
        folder = base / "images" / s.label.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(synthetic.to_jpeg(s.image))
        lines.append({"image": f"images/{folder.name}/{i}.jpg", "captions": [s.caption]})
    (base / "images" / "red_circle" / "broken.jpg").write_bytes(b"not a jpeg")
    (base / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    bucket = s3_server.make_bucket("evals3")
    upload(base, bucket)
    return base, bucket


def test_checkpoint_and_merges_are_found_and_loaded_from_s3(local_and_s3):
    base, bucket = local_and_s3
    ckpt = f"{bucket}/checkpoint_000001"
    assert find_weights(ckpt) == f"{ckpt}/openai_fp16.pt"  # the OpenAI-layout file, not state.pt
    assert find_merges(ckpt) == f"{ckpt}/tokenizer.txt.gz"
    model = load_model(ckpt)
    tok = load_tokenizer(find_merges(ckpt), model)
    local = load_model(str(base / "checkpoint_000001"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    assert tok.vocab_size == model.config.vocab_size
    with pytest.raises(EvalModelError, match="checkpoint not found: s3://evals3/nothing"):
        find_weights(f"{bucket}/nothing")
    with pytest.raises(EvalModelError, match="merges file not found"):
        load_tokenizer(f"{bucket}/nothing.txt.gz", model)


def test_image_folder_and_captions_on_s3_equal_the_local_ones(local_and_s3):
    base, bucket = local_and_s3
    model = load_model(str(base / "checkpoint_000001"))
    opts = EmbedOptions(use_ray="never")
    s3_set = open_eval_set(f"{bucket}/images", "classification")
    local_set = open_eval_set(str(base / "images"), "classification")
    assert s3_set.kind == "folder" and s3_set.class_names == local_set.class_names == [
        "blue square",
        "red circle",
    ]
    remote, local = embed_eval_set(s3_set, model, opts=opts), embed_eval_set(local_set, model, opts=opts)
    assert remote.ids == local.ids and torch.equal(remote.labels, local.labels)
    assert torch.equal(remote.image_features, local.image_features)
    assert remote.dropped == local.dropped == {"unreadable_image": 1}

    tok = load_tokenizer(str(base / "checkpoint_000001" / "tokenizer.txt.gz"), model)
    captions = embed_eval_set(open_eval_set(f"{bucket}/captions.jsonl", "retrieval"), model, tok, opts)
    assert len(captions.ids) == 4 and len(captions.captions) == 4


def test_zero_shot_check_reads_an_s3_folder(local_and_s3):
    base, bucket = local_and_s3
    tok = clip_model.Tokenizer(str(base / "checkpoint_000001" / "tokenizer.txt.gz"))
    check = ZeroShotCheck(f"{bucket}/images", tok, 32, "default")
    assert check.skipped == 1 and len(check.labels) == 4
    assert check.class_names == ["blue square", "red circle"]
    model = clip_model.create_model("tiny-vit", vocab_size=tok.vocab_size, image_resolution=32)
    assert 0.0 <= check(model, torch.device("cpu")) <= 1.0
