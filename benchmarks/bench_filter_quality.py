"""How well the CLIP filter cleans a noisy corpus with known truth (pipelines/noisy_corpus.py).

A tiny CLIP trained on clean synthetic pairs (pipelines/filter/clean_model.py, or --checkpoint) scores a
corpus where a share of pairs carry another render's caption and some renders have near-duplicate copies
(JPEG re-encodes, 0.8–0.95 resizes, crops of a few percent, exact re-uploads); the filter job runs on local
Ray with the score cut and the semantic dedupe. Prints the score distributions, a table of the four rates
and, last, one JSON line: mismatch_recall, match_loss, dup_recall, distinct_loss.

    .venv/bin/python benchmarks/bench_filter_quality.py --images 300 --out /tmp/filter_quality
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import _ray_setup  # noqa: F401  (repository on sys.path, loopback Ray)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=300, help="distinct renders in the noisy corpus")
    p.add_argument("--mismatch", type=float, default=0.2)
    p.add_argument("--dups", type=float, default=0.15, help="share of clean renders with copies")
    p.add_argument("--threshold", type=float, default=None, help="score cut (default: the model's p02)")
    p.add_argument("--dedupe-threshold", type=float, default=0.9985)
    p.add_argument("--checkpoint", default="", help="default: train one on clean pairs under --out")
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--out", default="/tmp/bench_filter_quality")
    args = p.parse_args()

    import numpy as np
    import pyarrow.parquet as pq

    from pipelines.config import load_config
    from pipelines.filter.clean_model import CALIBRATION, WEIGHTS, calibrate, train_clean_clip
    from pipelines.filter.config import FilterConfig
    from pipelines.filter.job import filter_wit
    from pipelines.noisy_corpus import NoisyParams, filter_quality, write_noisy_corpus

    t0 = time.time()
    ckpt = args.checkpoint or os.path.join(args.out, "clean_model")
    if not args.checkpoint and not os.path.exists(os.path.join(ckpt, WEIGHTS)):
        train_clean_clip(ckpt, steps=args.train_steps)
    t_train = time.time() - t0
    params = NoisyParams(
        n_images=args.images, mismatch_fraction=args.mismatch, dup_fraction=args.dups, seed=7
    )
    corpus = write_noisy_corpus(os.path.join(args.out, "noisy"), params)
    _ray_setup.start_ray(os.cpu_count() or 1)
    # Default cut: the score that keeps 98% of held-out clean pairs (calibrated at training time).
    calibration = Path(ckpt) / CALIBRATION
    if args.threshold is None and not calibration.exists():
        calibrate(ckpt)
    threshold = args.threshold if args.threshold is not None else json.loads(calibration.read_text())["p02"]
    cut = [f"score.threshold={threshold}"]
    output = os.path.join(args.out, f"filtered_{int(time.time())}")
    cfg = load_config(
        FilterConfig,
        None,
        [
            f"data_uri={corpus.uri}",
            f"output={output}",
            f"checkpoint={ckpt}",
            *cut,
            f"dedupe.threshold={args.dedupe_threshold}",
            "dedupe.clusters=8",
            "report=true",
        ],
    )
    t1 = time.time()
    stats = filter_wit(cfg)
    t_filter = time.time() - t1
    q = filter_quality(corpus, output)

    truth = {t["key"]: t for t in corpus.truth().to_pylist()}
    scores = {"matched": [], "mismatched": []}
    for name in corpus.shards:
        for r in pq.read_table(
            os.path.join(output, "embeddings", f"{name}.parquet"), columns=["key", "score"]
        ).to_pylist():
            scores["mismatched" if truth[r["key"]]["mismatched"] else "matched"].append(r["score"])
    for kind, s in scores.items():
        print(
            f"{kind:>10} scores: n={len(s)} p5/p50/p95 = "
            + " / ".join(f"{v:.3f}" for v in np.percentile(s, [5, 50, 95]))
        )
    print(
        f"score cut: {stats['score_cut']}; funnel: {json.dumps({k: v['dropped'] for k, v in stats['stages'].items()})}"
    )
    print(f"{'metric':<16}{'value':>8}  target")
    for key, target in (
        ("mismatch_recall", ">= 0.90"),
        ("match_loss", "<= 0.05"),
        ("dup_recall", ">= 0.90"),
        ("distinct_loss", "<= 0.01"),
    ):
        print(f"{key:<16}{q[key]:>8.3f}  {target}")
    print(
        f"samples {corpus.n_samples}, train {t_train:.0f} s, filter {t_filter:.0f} s, load {os.getloadavg()}, report {stats.get('report')}"
    )
    print(json.dumps({k: round(v, 4) for k, v in q.items()}))


if __name__ == "__main__":
    main()
