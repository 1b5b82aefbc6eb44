"""A filter's selection honoured by training and evaluation (pipelines/selection.py): counts, the step plan
and the data position over the selected rows only, exact resume, and no row outside the selection ever
decoded. Every row the selections here leave out is undecodable or captionless, so one row read by mistake
would show up as a counted bad row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (  # shared builders (tests/ is on sys.path under pytest)
    make_checkpoint_folder,
    train_and_read,
)

from clip_model import Tokenizer
from pipelines import datasets, selection
from pipelines.evaluation.data import EvalDataError, open_eval_set
from pipelines.evaluation.embed import EmbedOptions, embed_eval_set
from pipelines.shards import write_dataset
from pipelines.synthetic import generate, synthetic_shard_samples
from pipelines.train import ingest
from pipelines.train.config import TrainConfig
from pipelines.train.position import Position
from pipelines.train.trainer import build_trainer

SIZE = 32
# 8 shards of 16 rows; the selection keeps 12 of each (96 rows), drops shard 00007 whole (no file) and
# keeps none of 00006 (a file with zero rows): 6 shards x 12 = 72 selected rows, 3 shards per worker.
SHARDS, PER_SHARD, KEPT_PER_SHARD = 8, 16, 12
SELECTED = 6 * KEPT_PER_SHARD
BATCH = 6  # 2 workers x 6: 36 rows per worker = 6 steps


def write_selection(out: Path, keep: dict[str, list[str]], data_uri: str, total: int) -> str:
    """A selection in the filter job's layout (issue 20): `{out}/selection/{shard}.parquet` + summary."""
    folder = out / "selection"
    folder.mkdir(parents=True)
    for name, keys in keep.items():
        pq.write_table(pa.table({"key": pa.array(keys, pa.string())}), folder / f"{name}.parquet")
    kept = sum(len(k) for k in keep.values())
    summary = {"data_uri": data_uri, "shards": len(keep), "input": total, "kept": kept,
               "dropped": {"clip_score": total - kept}}  # fmt: skip
    (folder / selection.SELECTION_FILE).write_text(json.dumps(summary))
    return str(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    samples = list(synthetic_shard_samples(SHARDS * PER_SHARD, seed=11, size=SIZE))
    keep: dict[str, list[str]] = {}
    for i, s in enumerate(samples):
        shard, row = divmod(i, PER_SHARD)
        if row % 4 == 3:  # left out of the selection: broken, so reading it by mistake is counted
            s["jpg"], s["txt"] = s["jpg"][:40], (s["txt"] if row % 8 == 3 else "")
        elif shard < 6:
            keep.setdefault(f"{shard:05d}", []).append(s["key"])
    keep["00006"] = []
    write_dataset(samples, str(root / "shards"), PER_SHARD, formats=("webdataset", "parquet"))
    sel = write_selection(root / "filtered", keep, str(root / "shards"), len(samples))
    merges = root / "merges.txt.gz"
    tok = Tokenizer.train(
        [s.caption for s in generate(300, seed=3, size=SIZE)], vocab_size=600, out_path=merges
    )
    labels = {s["key"]: s["json"]["label"] for s in samples}
    return {"root": root, "shards": str(root / "shards"), "selection": sel, "keep": keep, "merges": str(merges),
            "vocab": tok.vocab_size, "labels": labels}  # fmt: skip


# ---------------------------------------------------------------- without Ray


@pytest.mark.parametrize("data_format", ["webdataset", "parquet"])
def test_counts_and_rows_are_the_selected_ones(data, data_format):
    chosen = selection.open_selection(data["selection"])  # the filter output; its selection/ is found
    assert chosen.folder.endswith("/selection") and chosen.summary["kept"] == SELECTED
    found = selection.resolve(data["shards"], data_format, chosen)
    assert [(s.name, s.num_samples) for s in found] == [(f"{i:05d}", KEPT_PER_SHARD) for i in range(6)]
    for shard in found:
        rows = selection.read_selected_rows(shard.uri, chosen.folder)
        assert rows["key"] == data["keep"][shard.name]  # the shard's own order
        assert all(rows["jpg"]) and all(t.strip() for t in rows["txt"])


def _stream(uris, position, rank, world, merges, sel, batch=4):
    cfg = ingest.DecodeSettings(SIZE, merges, decode_on="worker", decode_batch_size=5, decode_ahead=2)
    loader = ingest.ShardLoader(uris, 0, position.epoch, selection=sel)
    return ingest.WorkerStream(position.cursor(rank, world, width=2), loader, ingest.Decoder(cfg), batch)


def test_stream_reads_only_the_selection_and_resumes_exactly(data):
    folder = selection.open_selection(data["selection"]).folder
    uris = [s.uri for s in selection.resolve(data["shards"], "webdataset", selection.open_selection(folder))]
    start = Position.start(0, [u.rsplit("/", 1)[1] for u in uris], world=1, seed=0)

    # The cursor over the loader visits every selected key once, and nothing else.
    loader, cursor, seen = ingest.ShardLoader(uris, 0, 0, selection=folder), start.cursor(0, 1, 2), []
    while (nxt := cursor.next(loader.size)) is not None:
        seen.append(loader.row(*nxt)[0])
    loader.close()
    assert sorted(seen) == sorted(k for keys in data["keep"].values() for k in keys)
    assert len(seen) == SELECTED

    full = _stream(uris, start, 0, 1, data["merges"], folder)
    batches = list(full)
    assert full.decoded == SELECTED and full.trained == SELECTED and not full.bad  # nothing broken decoded
    first = _stream(uris, start, 0, 1, data["merges"], folder)
    head = []
    for _ in range(7):
        head.append(first.next_batch())
        first.commit()
    position = start.merge([first.part()], world=1)
    rest = _stream(uris, position, 0, 1, data["merges"], folder)
    for a, b in zip(head + list(rest), batches, strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert rest.decoded == SELECTED - 7 * 4  # rows before the offsets were never decoded


def test_selection_from_other_data_is_refused(data, tmp_path):
    chosen = selection.open_selection(data["selection"])
    with pytest.raises(datasets.DatasetError, match=r"names 2 shard\(s\) that .* does not hold"):
        selection.resolve(data["shards"] + "/{00000..00004}.tar", "webdataset", chosen)
    stranger = write_selection(tmp_path / "other", {"00000": ["nope", data["keep"]["00000"][0]]}, "x", 2)
    folder = selection.open_selection(stranger).folder
    with pytest.raises(datasets.DatasetError, match="1 key.*does not hold.*'nope'"):
        selection.read_selected_rows(data["shards"] + "/00000.tar", folder)
    with pytest.raises(datasets.DatasetError, match="is not a selection"):
        selection.open_selection(data["shards"])
    # Another selection of the same shards is another position: a checkpoint cannot resume on it.
    found = selection.resolve(data["shards"], "webdataset", chosen)
    other = selection.Selection(chosen.folder, {**chosen.summary, "kept": SELECTED - 1})
    assert selection.fingerprint(chosen, found) != selection.fingerprint(other, found)


def test_evaluation_reads_only_the_selection(data, tmp_path):
    ckpt = tmp_path / "checkpoint"
    captions = [s.caption for s in generate(200, seed=7, size=SIZE)]
    _, model = make_checkpoint_folder(ckpt, captions, "merges.txt.gz", step=0)
    everything = open_eval_set(data["shards"] + "/00000.tar", "classification")
    emb = embed_eval_set(everything, model, opts=EmbedOptions(use_ray="never"))
    assert emb.n_in == PER_SHARD and emb.dropped == {"truncated_image": 4}  # the rows left out are broken

    chosen = open_eval_set(data["shards"], "classification", selection_uri=data["selection"])
    emb = embed_eval_set(chosen, model, opts=EmbedOptions(use_ray="never", cache_dir=str(tmp_path / "c")))
    selected = sorted(k for keys in data["keep"].values() for k in keys)
    assert emb.n_in == SELECTED and not emb.dropped and emb.ids == selected
    assert [chosen.class_names[i] for i in emb.labels] == [data["labels"][k] for k in selected]
    # The feature cache tells selections apart.
    assert embed_eval_set(
        chosen, model, opts=EmbedOptions(use_ray="never", cache_dir=str(tmp_path / "c"))
    ).from_cache
    fewer = dict(data["keep"], **{"00000": data["keep"]["00000"][:3]})
    sel2 = write_selection(tmp_path / "fewer", fewer, data["shards"], SHARDS * PER_SHARD)
    other = open_eval_set(data["shards"], "classification", selection_uri=sel2)
    again = embed_eval_set(other, model, opts=EmbedOptions(use_ray="never", cache_dir=str(tmp_path / "c")))
    assert not again.from_cache and again.n_in == SELECTED - 9

    captions_set = open_eval_set(data["shards"], "retrieval", selection_uri=data["selection"])
    assert sum(1 for _ in captions_set.records()) == SELECTED
    with pytest.raises(EvalDataError, match="a selection applies to shards"):
        open_eval_set(str(tmp_path / "checkpoint"), "classification", selection_uri=data["selection"])


# ---------------------------------------------------------------- training on Ray


def test_training_sees_the_selection_and_resumes_exactly(ray_local, data):
    """One crash drill over a selection (the batch-for-batch identity of a resume is the stream test's)."""
    cfg = TrainConfig(
        model="tiny-vit", model_overrides={"vocab_size": data["vocab"], "image_resolution": SIZE},
        tokenizer_merges=data["merges"], data_uri=data["shards"], selection=data["selection"],
        batch_size=BATCH, epochs=1, warmup_steps=2, shards_in_flight=2, checkpoint_every=2, keep_checkpoints=3,
        checkpoint_upload="sync", max_failures=1, storage_path=str(data["root"] / "runs"), name="crash",
        log_every=1, decode_batch_size=8, crash_at_step=5,
    )  # fmt: skip
    trainer = build_trainer(cfg)  # counts and the step plan are the selection's
    assert trainer.train_loop_config["num_rows"] == SELECTED and trainer.train_loop_config["total_steps"] == 6
    crashed = train_and_read(cfg)
    state = crashed["state"]
    assert (data["root"] / "runs" / "crash" / "crash_drill.done").exists()  # killed after step 5
    (epoch,) = state["epochs"]
    # Restarted from step 4's checkpoint (or step 2's): only the selected rows after it were decoded again.
    assert epoch["resumed_at_rows"] in (2 * BATCH * 2, 4 * BATCH * 2), epoch
    assert epoch["decoded_this_attempt"] == SELECTED - epoch["resumed_at_rows"]
    # Every selected row trained once; none of the broken rows outside the selection was ever read.
    assert epoch["rows"] == epoch["trained"] == SELECTED and epoch["not_reached"] == 0 and epoch["bad"] == {}
    assert state["step"] == 6 and state["scheduler"]["last_epoch"] == 6
    assert [int(r["step"]) for r in crashed["metrics"] if r["loss"]] == list(range(1, 7))
