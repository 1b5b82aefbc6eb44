"""The filter job on real local Ray: selection contract, funnel counts, bad input as counted drops, and a
resumed run that equals an uninterrupted one byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipelines import shards, synthetic
from pipelines.config import load_config
from pipelines.filter.config import FilterConfig
from pipelines.noisy_corpus import NoisyParams, write_noisy_corpus


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> str:
    """A narrow tiny-vit (random weights) with merges beside it: enough to exercise the plumbing."""
    import clip_model
    from pipelines.filter.clean_model import CONTEXT, NARROW

    folder = tmp_path_factory.mktemp("ckpt")
    captions = [s.caption for s in synthetic.generate(200, seed=5)]
    tok = clip_model.Tokenizer.train(captions, 600, folder / "merges.txt.gz", context_length=CONTEXT)
    torch.manual_seed(0)
    model = clip_model.create_model("tiny-vit", vocab_size=tok.vocab_size, image_resolution=32, **NARROW)
    clip_model.save_openai_checkpoint(model, folder / "openai_fp16.pt")
    return str(folder)


def _corpus(root: Path) -> tuple[str, int]:
    """Three noisy shards, a shard with an undecodable image and an empty caption, and a brace list that
    names a fifth shard that does not exist (vanished)."""
    corpus = write_noisy_corpus(
        str(root), NoisyParams(n_images=40, dup_fraction=0.2, samples_per_shard=18, seed=2)
    )
    good = next(synthetic.synthetic_shard_samples(2, seed=9))
    bad = [
        dict(good, key="bad_image", jpg=b"not a jpeg"),
        dict(good, key="empty_caption", txt="   "),
        dict(good, key="fine"),
    ]
    shards.write_shard(bad, str(root), "00003")
    assert corpus.shards == ["00000", "00001", "00002"]
    return f"{root}/{{00000..00004}}.tar", corpus.n_samples


def _run(data_uri: str, out: str, ckpt: str) -> dict:
    from pipelines.filter.job import filter_wit

    cfg = load_config(
        FilterConfig,
        None,
        [
            f"data_uri={data_uri}",
            f"output={out}",
            f"checkpoint={ckpt}",
            "score.top_fraction=0.7",
            "dedupe.clusters=4",
            "dedupe.threshold=0.99",
            "embed.chunk_size=8",
            "rebalance.max_per_query=6",
        ],
    )
    return filter_wit(cfg)


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for d in ("embeddings", "selection")
        for p in sorted((out / d).iterdir())
    }


def test_filter_job_counts_resumes_and_writes_the_selection(ray_local, tmp_path, random_checkpoint):
    data_uri, n = _corpus(tmp_path / "data")
    out = tmp_path / "out"
    stats = _run(data_uri, str(out), random_checkpoint)

    sel = json.loads((out / "selection" / "_selection.json").read_text())
    assert sel["shards"] == 5 and sel["input"] == n + 3
    assert sel["kept"] + sum(sel["dropped"].values()) == sel["input"]
    assert sel["dropped"]["unreadable_image"] == 1 and sel["dropped"]["empty_caption"] == 1
    scored = n + 1
    assert sel["dropped"]["low_clip_score"] == scored - int(0.7 * scored + 0.5)  # exact top fraction
    assert set(stats["shards"]["missing"]) == {"00004"}  # the vanished shard: counted, not a failure
    for stage in stats["stages"].values():
        assert stage["in"] == stage["out"] + sum(stage["dropped"].values())
    kept = 0
    for name in ("00000", "00001", "00002", "00003", "00004"):
        table = pq.read_table(out / "selection" / f"{name}.parquet")
        assert table.schema.names == ["key"]
        kept += table.num_rows
        if name != "00004":
            order = [r for r in shards.read_shard_samples(f"{tmp_path}/data/{name}.tar")]
            rank = {s["key"]: i for i, s in enumerate(order)}
            keys = table["key"].to_pylist()
            assert keys == sorted(keys, key=rank.__getitem__)  # the shard's own row order
    assert kept == sel["kept"] and (out / "report" / "report.html").exists()
    store = pq.read_table(out / "embeddings" / "00000.parquet")
    assert store.schema.field("image_emb").type.value_type == "halffloat"
    assert store.num_rows == 18 and store.column_names[:6] == [
        "row",
        "key",
        "shard",
        "query",
        "reason",
        "score",
    ]

    # A run killed after two shards were committed: their files stay, the rest is gone; the rerun
    # embeds only the others and ends with the same bytes.
    first = _files(out)
    killed = tmp_path / "killed"
    (killed / "embeddings").mkdir(parents=True)
    for name in ("00000.parquet", "00002.parquet"):
        shutil.copy(out / "embeddings" / name, killed / "embeddings" / name)
    again = _run(data_uri, str(killed), random_checkpoint)
    assert again["shards"]["resumed"] == 2 and again["shards"]["written_now"] == 2
    assert _files(killed) == first
