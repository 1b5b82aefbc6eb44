"""Ingest that absorbs stragglers (pipelines/train/ingest.py): decode batches finish in any order inside the
window and slow ones get a second copy, yet the batches, the bad-row counts and the checkpointed position
are exactly those of the old in-order, fixed-window ingest. Slow batches are injected with the test hook
pipelines/train/stragglers.py (a decode function passed to the Decoder; the product does not know it)."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from clip_model import Tokenizer
from pipelines import datasets
from pipelines.shards import write_dataset
from pipelines.synthetic import generate, synthetic_shard_samples
from pipelines.train import ingest
from pipelines.train.position import Position
from pipelines.train.stragglers import delayed_decode

SIZE, BATCH, CHUNK = 32, 4, 6
OLD = dict(decode_ahead=2, decode_ahead_s=0.0, straggler_factor=0.0)  # the fixed, in-order window of before


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stragglers")
    merges = root / "merges.txt.gz"
    Tokenizer.train([s.caption for s in generate(200, seed=3, size=SIZE)], vocab_size=600, out_path=merges)
    samples = list(synthetic_shard_samples(90, seed=5, size=SIZE))
    samples[11]["jpg"] = samples[11]["jpg"][:25]  # one undecodable image: counted the same either way
    write_dataset(samples, str(root / "shards"), 15, formats=("webdataset",))
    uris = datasets.list_shards(str(root / "shards"))
    return uris, Position.start(0, [u.rsplit("/", 1)[1] for u in uris], world=1, seed=0), str(merges)


def _stream(data, decode=ingest.decode_batch, position=None, **settings):
    uris, start, merges = data
    position = position or start
    cfg = ingest.DecodeSettings(SIZE, merges, decode_batch_size=CHUNK, **{"decode_on": "worker", **settings})
    cursor = position.cursor(0, 1, width=2)
    loader = ingest.ShardLoader(uris, 0, position.epoch)
    return ingest.WorkerStream(cursor, loader, ingest.Decoder(cfg, decode=decode), BATCH)


def _run(stream) -> tuple[list, dict]:
    batches = list(stream)
    stream.close()
    return batches, {"trained": stream.trained, "bad": dict(stream.bad), "decoded": stream.decoded,
                     "position": stream.part()}  # fmt: skip


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b)
    )


def _first_keys(data) -> list[str]:
    """The first key of each decode batch, in submission order (the read order cut every CHUNK rows)."""
    stream = _stream(data, **OLD)
    keys = []
    while (nxt := stream.ahead.next(stream.loader.size)) is not None:
        keys.append(stream.loader.row(*nxt)[0])
    stream.close()
    return keys[::CHUNK]


def test_out_of_order_completion_leaves_batches_and_position_unchanged(data, tmp_path):
    reference, counts = _run(_stream(data, **OLD))
    assert counts["bad"] == {"corrupt_image": 1} and counts["trained"] == 88 and counts["decoded"] == 90

    slow = set(_first_keys(data)[1:8:3])  # batches 2, 5 and 8 finish long after the ones behind them
    finished: list[str] = []
    lock = threading.Lock()
    delayed = delayed_decode(str(tmp_path), delay_s=0.4, keys=slow)

    def recording(rows, epoch, args):
        out = delayed(rows, epoch, args)
        with lock:
            finished.append(rows["key"][0])
        return out

    batches, got = _run(_stream(data, recording, decode_ahead=4, straggler_factor=0.0))
    submitted = _first_keys(data)
    assert sorted(finished) == sorted(submitted) and finished != submitted  # really out of order
    assert _same(batches, reference) and got == counts


def test_a_straggler_gets_a_copy_first_result_wins_rows_counted_once(ray_local, data, tmp_path):
    reference, counts = _run(_stream(data, **OLD))
    slow = {_first_keys(data)[6]}  # after a few batch times are known
    delay = 120.0  # the slow copy is cancelled once the fast one wins: the test never waits for it
    stream = _stream(data, delayed_decode(str(tmp_path), delay_s=delay, keys=slow), decode_on="tasks",
                     decode_ahead=2, decode_ahead_s=0.0, straggler_factor=2.0, straggler_min_s=0.2)  # fmt: skip
    t0 = time.monotonic()
    batches, got = _run(stream)
    elapsed = time.monotonic() - t0
    # the copy's result was taken, not the slow one's (the margin is for Ray starting workers on a busy machine)
    assert stream.duplicated >= 1 and elapsed < delay / 2
    assert _same(batches, reference) and got == counts  # decoded == 90: the copy's rows are not counted again


def test_resume_mid_epoch_with_stragglers_is_the_uninterrupted_run(data, tmp_path):
    reference, _ = _run(_stream(data, **OLD))
    keys = _first_keys(data)
    first = _stream(data, delayed_decode(str(tmp_path / "a"), 0.3, keys=set(keys[2:4])), decode_ahead=3)
    head = []
    for _ in range(9):
        head.append(first.next_batch())
        first.commit()
    assert first.next_batch() is not None  # decoded, handed out, never committed
    uris, start, _ = data
    position = start.merge([first.part()], world=1)
    first.close()
    rest = _stream(data, delayed_decode(str(tmp_path / "b"), 0.3, one_in=3), position=position)
    assert _same(head + list(rest), reference)
    assert position.trained + rest.trained == 88


def test_read_ahead_covers_seconds_at_the_trainers_own_pace(data):
    _, _, merges = data
    now = [0.0]
    settings = ingest.DecodeSettings(224, merges, decode_ahead=2, decode_batch_size=64, decode_ahead_s=2.0,
                                     decode_ahead_max_mb=128)  # fmt: skip
    ahead = ingest.ReadAhead(settings, clock=lambda: now[0])
    assert ahead.target_rows() == 128  # no pace known yet: decode_ahead batches
    for waited in (0.0, 0.3, 0.0, 0.0):  # 64 rows per 0.2 s of the trainer's own time; waits not counted
        now[0] += 0.2 + waited
        ahead.taken(64, waited)
    assert ahead.target_rows() == 640  # 320 rows/s x 2 s
    assert ahead.max_rows == 128 * 2**20 // (224 * 224 * 3 + 4 * 77 + 1) == 889  # 128 MB of uint8 rows
    ahead.settings = dataclasses.replace(settings, decode_ahead_s=5.0)
    assert ahead.target_rows() == 889  # 1,600 rows wanted, the bound holds
    assert ingest.ReadAhead(dataclasses.replace(settings, decode_ahead_s=0.0)).target_rows() == 128
