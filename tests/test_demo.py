"""End-to-end smoke of the quick start at reduced size: corpus -> queries -> build -> train -> eval -> plots."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pipelines.demo_corpus import CorpusParams, serve, write_corpus


def test_corpus_has_known_ground_truth_and_is_idempotent(tmp_path):
    params = CorpusParams(images_per_concept=3, heldout_per_concept=1)
    corpus = write_corpus(tmp_path / "c", params)
    truth = corpus.truth()
    fates = Counter(im["fate"] for im in truth["images"])
    assert fates["kept"] > 100 and fates["http_404"] >= 1
    assert {"not_english", "auto_generated", "duplicate_image"} <= set(fates)
    mtime = (tmp_path / "c" / "truth.json").stat().st_mtime_ns
    assert write_corpus(tmp_path / "c", params).pages == corpus.pages
    assert (tmp_path / "c" / "truth.json").stat().st_mtime_ns == mtime
    with serve(corpus.www) as base_url:
        wat = corpus.write_wat(base_url)
        import urllib.request

        page = corpus.pages["site0"][0]
        body = urllib.request.urlopen(f"{base_url}/{page['page']}", timeout=5).read().decode()
        assert page["images"][0]["src"] in body
    assert sorted(p.name for p in wat.iterdir()) == [f"site{i}.warc.wat.gz" for i in range(params.sites)]
    assert len(list(corpus.heldout_images.iterdir())) == len(corpus.class_names) == 48


def test_demo_runs_end_to_end_small(ray_head, tmp_path):
    from jobs.demo import main

    run_dir = tmp_path / "demo"
    assert main(["--small", "--run-dir", str(run_dir), "--address", ray_head.dashboard_url]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["totals"]["kept"] > 0
    for png in ("funnel.png", "per_query.png", "training_curve.png"):
        assert (run_dir / png).stat().st_size > 1000, png
    assert (run_dir / "eval" / "results.json").exists()
    top1 = summary["results"]["zero_shot"]["top1"]
    assert top1 > 1.0 / summary["classes"]  # above chance even after a short training
    assert Path(run_dir / "train" / "metrics.csv").exists()
