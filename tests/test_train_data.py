"""The training data position and ingest without a Ray cluster: the seeded read order, a position the size
of the shard list that resumes exactly (same or another number of workers), the per-worker stream that
decodes only what it reads, uint8 ingest normalised on the device, and shard lists from other tools
(img2dataset's exact layout, brace lists, our index) resolved by pipelines/datasets.py for training and
evaluation alike."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import clip_model
from clip_model import Tokenizer
from clip_model.transform import OPENAI_MEAN, OPENAI_STD
from pipelines import datasets
from pipelines.evaluation.data import open_eval_set
from pipelines.shards import write_dataset
from pipelines.synthetic import generate, synthetic_shard_samples
from pipelines.train import ingest
from pipelines.train.config import TrainConfig
from pipelines.train.ingest import CORRUPT_IMAGE, MISSING_CAPTION, OK, DecodeBatch, normalize
from pipelines.train.position import Cursor, Position
from pipelines.train.trainer import build_trainer, train

SIZE = 32


@pytest.fixture(scope="module")
def merges(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "merges.txt.gz"
    Tokenizer.train([s.caption for s in generate(300, seed=3, size=SIZE)], vocab_size=600, out_path=path)
    return str(path)


# ---------------------------------------------------------------- the position, no data


def _walk(cursors: list[Cursor], sizes: dict[int, int], steps: int | None = None) -> list[list[tuple]]:
    """Each cursor's draws (all of them, or `steps` each)."""
    out = []
    for c in cursors:
        rows = []
        while steps is None or len(rows) < steps:
            nxt = c.next(sizes.__getitem__)
            if nxt is None:
                break
            rows.append(nxt)
        out.append(rows)
    return out


def _part(c: Cursor, n: int) -> dict:
    return {"rank": c.rank, "finished": c.finished, **c.state(), "trained": n, "bad": {}}


@pytest.mark.parametrize("new_world", [3, 2, 1])
def test_position_resumes_the_rest_of_the_epoch_exactly(new_world):
    names = [f"{i:05d}" for i in range(13)]
    sizes = {i: 5 + (i * 7) % 11 for i in range(13)}  # uneven shards, one per size 5..15
    start = Position.start(2, names, world=2, seed=1)
    full = _walk([start.cursor(rank=r, world=2, width=3) for r in range(2)], sizes)
    assert sorted(x for rows in full for x in rows) == sorted(
        (s, i) for s, n in sizes.items() for i in range(n)
    )

    cursors = [start.cursor(rank=r, world=2, width=3) for r in range(2)]
    before = _walk(cursors, sizes, steps=20)
    position = start.merge([_part(c, 20) for c in cursors], world=2)
    assert position.trained == 40 and len(position.in_flight) <= 6
    # O(shards + workers): no per-sample record however many rows were read
    assert len(json.dumps({**position.to_dict(), "finished": position.finished.hex()})) < 400

    resumed = [position.cursor(rank=r, world=new_world, width=3) for r in range(new_world)]
    after = _walk(resumed, sizes)
    if new_world == 2:  # the same workers: row for row what the uninterrupted run reads
        assert [b + a for b, a in zip(before, after)] == full
    read = [x for rows in before + after for x in rows]
    assert len(read) == len(set(read)) == sum(sizes.values())  # none skipped, none repeated


def test_epoch_orders_differ_and_are_seeded():
    names = [f"{i:05d}" for i in range(8)]
    sizes = dict.fromkeys(range(8), 4)
    walk = lambda seed, epoch: _walk([Position.start(epoch, names, 1, seed).cursor(0, 1, 2)], sizes)[0]  # noqa: E731
    assert walk(0, 0) == walk(0, 0) and walk(0, 0) != walk(0, 1) and walk(0, 0) != walk(1, 0)
    with pytest.raises(ValueError, match="another shard list"):
        Position.start(0, names, 1, 0).check(names[:-1])


# ---------------------------------------------------------------- the decode stage and the stream


def test_decode_stage_gives_uint8_and_flags_bad_rows(merges):
    samples = list(synthetic_shard_samples(4, seed=1, size=48))
    rows = {
        "key": [s["key"] for s in samples],
        "jpg": [samples[0]["jpg"], b"\xff\xd8 not a jpeg", samples[2]["jpg"], samples[3]["jpg"]],
        "txt": [samples[0]["txt"], "a red circle", None, "  "],
    }
    stage = DecodeBatch(SIZE, merges, seed=5)
    out = stage(rows, epoch=0)
    assert out["status"].tolist() == [OK, CORRUPT_IMAGE, MISSING_CAPTION, MISSING_CAPTION]
    assert out["image"].dtype == np.uint8 and out["image"].shape == (4, SIZE, SIZE, 3)
    assert out["tokens"].dtype == np.int32 and out["tokens"][0].any() and not out["tokens"][1:].any()
    # seeded per (seed, epoch, key): the same crop again, another one next epoch
    assert np.array_equal(stage(rows, epoch=0)["image"], out["image"])
    assert not np.array_equal(stage(rows, epoch=1)["image"][0], out["image"][0])
    # normalised on the device: exactly CLIP's mean/std on [0, 1]
    x = normalize(torch.from_numpy(out["image"][:1]))
    ref = (torch.from_numpy(out["image"][0]).permute(2, 0, 1).float() / 255 - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)  # fmt: skip
    assert x.shape == (1, 3, SIZE, SIZE) and torch.allclose(x[0], ref)


NODE = "ab" * 28  # a node id's form (hex)


def test_decode_tasks_ask_for_cpu_or_the_gpu_nodes_ingest_resource(merges):
    cpu = ingest.task_options(ingest.DecodeSettings(SIZE, merges, decode_cpus=0.5), NODE)
    assert cpu == {"max_retries": 3, "num_cpus": 0.5}
    gpu_nodes = ingest.task_options(ingest.DecodeSettings(SIZE, merges, decode_resource="ingest_cpu", decode_cpus=1), NODE)  # fmt: skip
    assert gpu_nodes["num_cpus"] == 0 and gpu_nodes["resources"] == {"ingest_cpu": 1}
    strategy = gpu_nodes["scheduling_strategy"]
    assert (strategy.node_id, strategy.soft) == (NODE, True)  # next to the worker, spills if it must


def _stream(uris, position, rank, world, merges, batch=4):
    cfg = ingest.DecodeSettings(SIZE, merges, decode_on="worker", decode_batch_size=6, decode_ahead=2)
    cursor = position.cursor(rank, world, width=2)
    return ingest.WorkerStream(
        cursor, ingest.ShardLoader(uris, 0, position.epoch), ingest.Decoder(cfg), batch
    )


def test_stream_resumes_without_decoding_what_was_read(merges, tmp_path):
    samples = list(synthetic_shard_samples(40, seed=2, size=SIZE))
    samples[7]["jpg"] = samples[7]["jpg"][:30]  # one undecodable image
    write_dataset(samples, str(tmp_path), 10, formats=("webdataset",))
    uris = datasets.list_shards(str(tmp_path))
    names = [u.rsplit("/", 1)[1] for u in uris]
    start = Position.start(0, names, world=1, seed=0)

    full = _stream(uris, start, 0, 1, merges)
    batches = [b for b in full]
    assert len(batches) == 9 and full.trained == 36 and dict(full.bad) == {"corrupt_image": 1}
    assert full.decoded == 40  # the last 3 good rows cannot fill a batch

    first = _stream(uris, start, 0, 1, merges)
    head = []
    for _ in range(7):
        head.append(first.next_batch())
        first.commit()
    assert first.next_batch() is not None  # read but never committed (say another rank ran out)
    position = start.merge([first.part()], world=1)
    rest = _stream(uris, position, 0, 1, merges)
    tail = list(rest)
    for a, b in zip(head + tail, batches, strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    read_before = position.trained + sum(position.bad.values())
    assert rest.decoded == 40 - read_before  # rows before the offsets were never decoded
    assert position.trained + rest.trained == 36


# ---------------------------------------------------------------- shard lists from other tools


def img2dataset_layout(folder, samples, per_shard: int) -> list[str]:
    """Shards as img2dataset 1.47 writes them (output_format=webdataset): `{shard:05d}.tar` with
    `{key}.jpg/.txt/.json` (key = shard digits + 4-digit index), a metadata-only `{shard:05d}.parquet` with
    one row per input (failures included) and `{shard:05d}_stats.json`. No manifest, no index of ours."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for shard in range((len(samples) + per_shard - 1) // per_shard):
        part = samples[shard * per_shard : (shard + 1) * per_shard]
        meta, buf = [], io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, s in enumerate(part):
                key = f"{shard:05d}{i:04d}"
                row = {"url": f"http://127.0.0.1/{key}.jpg", "caption": s["txt"], "key": key, "status": "success",
                       "error_message": None, "width": SIZE, "height": SIZE, "original_width": SIZE,
                       "original_height": SIZE, "exif": "{}", "sha256": "0" * 64, "label": s["json"].get("label")}  # fmt: skip
                meta.append(row)
                for ext, data in (
                    ("jpg", s["jpg"]),
                    ("txt", s["txt"].encode()),
                    ("json", json.dumps(row).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.uname, info.gname = (
                        len(data),
                        time.time(),
                        "bigdata",
                        "bigdata",
                    )
                    tar.addfile(info, io.BytesIO(data))
        failed = {
            **meta[0],
            "key": f"{shard:05d}9999",
            "status": "failed_to_download",
            "error_message": "HTTP Error 404",
        }
        (folder / f"{shard:05d}.tar").write_bytes(buf.getvalue())
        pq.write_table(pa.Table.from_pylist(meta + [failed]), folder / f"{shard:05d}.parquet")
        stats = {"count": len(part) + 1, "successes": len(part), "failed_to_download": 1, "failed_to_resize": 0,
                 "duration": 1.0, "start_time": 0.0, "end_time": 1.0, "status_dict": {"success": len(part)}}  # fmt: skip
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
        names.append(f"{shard:05d}")
    return names


def test_img2dataset_layout_brace_lists_and_index_resolve_for_training_and_evaluation(tmp_path):
    samples = list(synthetic_shard_samples(10, seed=4, size=SIZE))
    for i, s in enumerate(samples):
        s["json"]["label"] = ["red", "blue"][i % 2]
    img2 = tmp_path / "img2dataset"
    img2dataset_layout(img2, samples, per_shard=4)
    found = datasets.resolve(str(img2))
    assert [(s.name, s.num_samples) for s in found] == [("00000", 4), ("00001", 4), ("00002", 2)]
    # counts come from the stats files: a wrong one is believed (proves no tar was counted)
    (img2 / "00002_stats.json").write_text(json.dumps({"successes": 3}))
    assert datasets.resolve(str(img2))[2].num_samples == 3
    (img2 / "00002_stats.json").unlink()
    assert datasets.resolve(str(img2))[2].num_samples == 2  # counted from the tar
    with pytest.raises(datasets.DatasetError, match="metadata-only Parquet"):
        datasets.read_rows(str(img2 / "00000.parquet"))

    brace = str(img2) + "/{00000..00001}.tar"
    assert [s.name for s in datasets.resolve(brace)] == ["00000", "00001"]
    assert datasets.expand_braces("s3://b/{00008..00010}.tar") == [
        f"s3://b/000{i:02d}.tar" for i in (8, 9, 10)
    ]
    assert datasets.expand_braces("a/{x,y}-{0..1}.tar") == [
        "a/x-0.tar",
        "a/x-1.tar",
        "a/y-0.tar",
        "a/y-1.tar",
    ]
    rows = datasets.read_rows(str(img2 / "00001.tar"))
    assert rows["key"] == [f"00001{i:04d}" for i in range(4)] and rows["txt"][0] == samples[4]["txt"]

    # evaluation reads the same lists through the same module
    for source in (str(img2), brace):
        eval_set = open_eval_set(source, "classification", label_field="label")
        records = list(eval_set.records())
        assert eval_set.class_names == ["blue", "red"] and len(records) == (10 if source == str(img2) else 8)
        assert all(r["jpg"] for r in records)

    ours = tmp_path / "ours"
    write_dataset(samples, str(ours), 5, formats=("webdataset", "parquet"))
    index = {"shard": ["00000", "00001"], "num_samples": [5, 7], "tar_bytes": [1, 1], "parquet_bytes": [1, 0]}
    pq.write_table(pa.table(index), ours / datasets.INDEX_FILE)
    assert [s.num_samples for s in datasets.resolve(str(ours))] == [5, 7]  # the index wins
    assert [s.num_samples for s in datasets.resolve(str(ours), "parquet")] == [
        5,
        5,
    ]  # 00001 not in index as parquet


def test_trains_with_fsdp_on_img2dataset_shards_given_as_a_brace_list(ray_local, merges, tmp_path):
    """img2dataset's output, named by a brace list, trained with FSDP2 (blocks compiled): each rank writes its
    shard of the checkpoint, rank 0 the full FP16 export, and a new run resumes from it."""
    img2dataset_layout(tmp_path / "img2", list(synthetic_shard_samples(48, seed=6, size=SIZE)), per_shard=12)
    cfg = TrainConfig(
        model="tiny-vit", model_overrides={"vocab_size": 600, "image_resolution": SIZE}, tokenizer_merges=merges,
        data_uri=str(tmp_path / "img2") + "/{00000..00003}.tar", batch_size=4, max_steps=2, checkpoint_every=2,
        warmup_steps=1, storage_path=str(tmp_path / "runs"), name="fsdp", log_every=1, fsdp=True,
        compile=True, compile_backend="aot_eager",  # blocks compiled one by one (aot_eager: see test_train_loop)
    )  # fmt: skip
    result = train(cfg)
    assert result.error is None, result.error
    assert result.metrics["compiled_graphs"] >= 1 and result.metrics["graph_breaks"] == 0, result.metrics
    checkpoint = Path(result.checkpoint.path)
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(checkpoint / "sharded_state"))
    fp16 = torch.load(checkpoint / "openai_fp16.pt")  # the full model, gathered on rank 0
    assert fp16["visual.conv1.weight"].dtype == torch.float16 and "logit_scale" in fp16
    assert clip_model.load(fp16).config == cfg.model_config()
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert state["position"]["trained"] == 2 * 4 * 2 and state["position"]["num_shards"] == 4
    resumed = train(dataclasses.replace(cfg, name="fsdp_resumed", resume_from=str(checkpoint), max_steps=3))
    assert resumed.error is None, resumed.error
    assert resumed.metrics["step"] == 3 and math.isfinite(resumed.metrics["loss"])


def test_fewer_shards_than_workers_is_refused_before_training(merges, tmp_path):
    write_dataset(
        list(synthetic_shard_samples(6, seed=1, size=SIZE)), str(tmp_path), 6, formats=("webdataset",)
    )
    cfg = TrainConfig(model="tiny-vit", model_overrides={"vocab_size": 600, "image_resolution": SIZE},
                      tokenizer_merges=merges, data_uri=str(tmp_path), storage_path=str(tmp_path / "runs"))  # fmt: skip
    with pytest.raises(ValueError, match="1 shard.* for 2 workers: each worker reads whole shards"):
        build_trainer(cfg)
