"""The noisy corpus: shards the trainer's lister reads, and ground truth that matches them."""

from __future__ import annotations

import io

from PIL import Image

from pipelines import datasets
from pipelines.noisy_corpus import NoisyParams, write_noisy_corpus


def test_noisy_corpus_shards_and_truth(tmp_path):
    params = NoisyParams(n_images=40, mismatch_fraction=0.25, dup_fraction=0.2, samples_per_shard=16, seed=3)
    corpus = write_noisy_corpus(str(tmp_path / "noisy"), params)
    truth = corpus.truth().to_pylist()
    assert corpus.n_groups == 40 and corpus.n_mismatched == 10
    assert corpus.n_copies == round(0.2 * 30) * 2 == corpus.n_samples - 40
    shards = datasets.resolve(corpus.uri, "webdataset")
    assert [s.name for s in shards] == corpus.shards and sum(
        s.num_samples for s in shards
    ) == corpus.n_samples
    rows = {k: (j, t) for s in shards for k, j, t in zip(*datasets.read_rows(s.uri).values())}
    assert set(rows) == {t["key"] for t in truth}
    by_key = {t["key"]: t for t in truth}
    for t in truth:
        jpg, txt = rows[t["key"]]
        colour, shape = t["label"].split()
        if t["mismatched"]:  # another render's caption: neither its colour nor its shape
            assert colour not in txt.lower() and shape not in txt.lower()
        if t["variant"] == "exact":
            assert jpg == rows[t["group"]][0]
        if t["variant"] != "original":
            original = Image.open(io.BytesIO(rows[t["group"]][0]))
            assert by_key[t["group"]]["label"] == t["label"] and not by_key[t["group"]]["mismatched"]
            assert Image.open(io.BytesIO(jpg)).width <= original.width
    # Same seed, same bytes (the shards are the ground truth's keys in the same order).
    again = write_noisy_corpus(str(tmp_path / "again"), params)
    assert again.truth().equals(corpus.truth())
