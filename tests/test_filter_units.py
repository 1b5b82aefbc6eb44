"""The filter's pieces without Ray: exact top fraction, in-cluster dedupe, per-query cap, checkpoint
layouts (open_clip training checkpoint, OpenAI state dict)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipelines.filter import dedupe, rebalance, score


def test_exact_top_fraction_from_histogram_and_boundary():
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(-0.2, 0.6, 1000), 3).astype(np.float32)  # many ties
    keys = [f"k{i:04d}" for i in range(1000)]
    for fraction in (0.01, 0.3, 0.5, 0.77, 1.0):
        need = score.top_count(1000, fraction)
        hist = sum(score.histogram(scores[i : i + 100], 64) for i in range(0, 1000, 100))  # per "shard"
        bucket, above = score.boundary_bucket(hist, need)
        inside = [(float(s), k) for s, k, b in zip(scores, keys, score.buckets(scores, 64)) if b == bucket]
        cut = score.exact_cut(inside, need - above)
        kept = cut.keep(scores, keys)
        assert kept.sum() == need  # exactly, despite the ties
        best = sorted(range(1000), key=lambda i: (-scores[i], keys[i]))[:need]
        assert set(np.nonzero(kept)[0]) == set(best)


def test_absolute_threshold_keeps_equal_scores():
    cut = score.Cut(0.25)
    assert cut.keep(np.array([0.1, 0.25, 0.3], np.float32), ["a", "b", "c"]).tolist() == [False, True, True]


def test_duplicates_keep_the_best_representative():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5, 16)).astype(np.float32)
    emb = np.concatenate([base, base[:2] + 0.01 * rng.normal(size=(2, 16))]).astype(np.float32)
    keys = ["a", "b", "c", "d", "e", "a2", "b2"]
    scores = np.array([0.1, 0.5, 0.2, 0.2, 0.2, 0.3, 0.4], np.float32)
    dup_of = dedupe.duplicates(keys, scores, emb, 0.98)
    # a2 scores higher than a, so a is the duplicate; b beats b2.
    assert dup_of == ["a2", "", "", "", "", "", "b"]
    centroids = dedupe.fit_centroids([emb[:3], emb[3:]], 3, seed=0)
    assert centroids.shape == (3, 16) and np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    assert (
        dedupe.assign(emb, centroids).tolist()
        == dedupe.assign(emb, dedupe.fit_centroids([emb[:3], emb[3:]], 3, 0)).tolist()
    )


def test_cap_group_marks_the_rows_over_the_cap():
    t = pa.table({"key": [f"k{i}" for i in range(10)], "query": ["cat"] * 10, "reason": [""] * 10})
    out = rebalance.cap_group(t, 3, seed=0)
    assert out["reason"].to_pylist().count("") == 3 and out.num_rows == 10
    assert out["key"].to_pylist() == t["key"].to_pylist()
    assert rebalance.cap_group(t, 3, seed=0).equals(out)


def _tiny_model():
    import clip_model
    from pipelines.filter.clean_model import NARROW

    torch.manual_seed(0)
    return clip_model.create_model("tiny-vit", vocab_size=600, image_resolution=32, **NARROW)


def test_open_clip_and_openai_layouts_load(tmp_path):
    import clip_model
    from pipelines.filter.model import load_clip

    model = _tiny_model().eval()
    openai = tmp_path / "openai.pt"
    clip_model.save_openai_checkpoint(model, openai, dtype=torch.float32)
    open_clip = tmp_path / "epoch_3.pt"  # what open_clip's trainer saves (DDP-wrapped model)
    sd = {f"module.{k}": v for k, v in clip_model.to_openai_state_dict(model, torch.float32).items()}
    torch.save(
        {"epoch": 3, "name": "run", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}},
        open_clip,
    )
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 600, (2, 24))
    with torch.no_grad():
        want = model.encode_image(images), model.encode_text(tokens)
        for path in (openai, open_clip):
            loaded = load_clip(str(path))
            assert torch.allclose(loaded.encode_image(images), want[0], atol=1e-5)
            assert torch.allclose(loaded.encode_text(tokens), want[1], atol=1e-5)
