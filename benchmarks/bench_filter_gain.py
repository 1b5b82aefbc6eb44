"""What the filter buys: the same training budget on a noisy corpus and on its filtered selection.

    .venv/bin/python benchmarks/bench_filter_gain.py [--images 600] [--steps 150] [--out runs/bench_filter_gain]

1. a noisy corpus from the project's generator (pipelines/noisy_corpus.py): a share of pairs carry another
   render's caption, some renders come back as near-duplicates;
2. a scorer trained on clean pairs (pipelines/filter/clean_model.py), and `jobs/filter_wit.py` with it
   (CLIP-score cut + semantic dedupe) -> a selection;
3. `jobs/train_clip.py` twice with the same budget (steps x global batch = samples seen): on every row, and
   with `selection=` on the kept rows only;
4. `jobs/eval_clip.py` zero-shot on held-out renders (the 48 colour-shape labels, and colour alone).

Every job is submitted to a private Ray head (pipelines/local_cluster.py), as users run them. Prints what the
filter removed (against the corpus's ground truth), a table, the load seen, and last one JSON line with
`top1_unfiltered` and `top1_filtered` (48 labels).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.submit import run_job  # noqa: E402
from pipelines import synthetic  # noqa: E402
from pipelines.local_cluster import LocalRayCluster  # noqa: E402
from pipelines.noisy_corpus import NoisyParams, write_noisy_corpus  # noqa: E402

MODEL = "{image_resolution: 32, context_length: 32, vocab_size: %d}"  # tiny-rn, as the demo trains it
TEMPLATES = [
    "a {}.",
    "a photo of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a {} on a plain background.",
]


def write_heldout(out: Path, n: int, seed: int) -> dict[str, Path]:
    """Held-out renders as image folders: by colour-shape label and by colour; plus the prompt file."""
    sets = {"pairs": out / "pairs", "colour": out / "colour"}
    for i, s in enumerate(synthetic.generate(n, seed=seed, size=32)):
        for name, label in (("pairs", s.label), ("colour", s.concept.colour)):
            folder = sets[name] / label.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:05d}.jpg").write_bytes(synthetic.to_jpeg(s.image))
    (out / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return sets


def selection_quality(corpus, selection: Path) -> dict:
    """What the selection removed, against the corpus's ground truth."""
    import pyarrow.parquet as pq

    kept = {k for f in selection.glob("*.parquet") for k in pq.read_table(f)["key"].to_pylist()}
    truth = corpus.truth().to_pylist()
    mismatched = [r for r in truth if r["mismatched"]]
    copies = [r for r in truth if r["group"] != r["key"]]
    matched = [r for r in truth if not r["mismatched"]]
    return {
        "kept": len(kept),
        "input": len(truth),
        "mismatched_removed": sum(r["key"] not in kept for r in mismatched) / max(1, len(mismatched)),
        "matched_removed": sum(r["key"] not in kept for r in matched) / max(1, len(matched)),
        "copies_removed": sum(r["key"] not in kept for r in copies) / max(1, len(copies)),
        "mismatched_share_before": len(mismatched) / len(truth),
        "mismatched_share_after": sum(r["key"] in kept for r in mismatched) / max(1, len(kept)),
    }


def train(address: str, out: Path, name: str, common: list[str], extra: list[str]) -> Path:
    shutil.rmtree(out / name, ignore_errors=True)
    run_job(address, ["python", "jobs/train_clip.py", "--config", "configs/train_tiny.yaml", *common,
                      f"name={name}", *extra], ROOT, out=None)  # fmt: skip
    return sorted(p for p in (out / name).glob("checkpoint_*") if p.is_dir())[-1]


def zero_shot(address: str, checkpoint: Path, merges: Path, sets: dict[str, Path], out: Path) -> dict:
    """Top-1 per held-out set, from one eval_clip.py job per set (in one process)."""
    runs = [[f"checkpoint={checkpoint}", f"tokenizer={merges}", f"output_dir={out / name}",
             f"zero_shot.data={path}", f"zero_shot.templates={path.parent / 'templates.txt'}", "embed.use_ray=never"]
            for name, path in sets.items()]  # fmt: skip
    code = f"import sys; from jobs.eval_clip import main; sys.exit(any(main(a) for a in {runs!r}))"
    run_job(address, ["python", "-c", code], ROOT, out=None)
    return {name: json.loads((out / name / "results.json").read_text())["zero_shot"]["top1"] for name in sets}


def run(args: argparse.Namespace) -> dict:
    from clip_model import Tokenizer
    from pipelines.filter.clean_model import train_clean_clip

    out = Path(args.out).resolve()
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "filter", ignore_errors=True)
    timings: dict[str, float] = {}
    t = time.time()
    params = NoisyParams(n_images=args.images, mismatch_fraction=args.mismatch, dup_fraction=0.2,
                         copies_per_dup=2, samples_per_shard=args.per_shard, size=32, seed=1)  # fmt: skip
    corpus = write_noisy_corpus(str(out / "noisy"), params)
    sets = write_heldout(out / "heldout", args.heldout, seed=4242)
    captions = [s.caption for s in synthetic.generate(2000, seed=5, size=8)]  # the vocabulary, not the noise
    merges = out / "merges.txt.gz"
    vocab = Tokenizer.train(captions, 800, merges).vocab_size
    scorer = out / "scorer"  # the corpus is deterministic; the scorer is reused unless --fresh
    if not (scorer / "openai_fp16.pt").exists():
        train_clean_clip(scorer, n=1000, steps=args.scorer_steps, seed=0)
    timings["corpus_and_scorer_s"] = time.time() - t

    cluster = LocalRayCluster(num_cpus=args.num_cpus).start()
    try:
        address = cluster.dashboard_url
        t = time.time()
        run_job(address, ["python", "jobs/filter_wit.py", "--config", "configs/filter_demo.yaml",
                          f"data_uri={out / 'noisy'}", f"output={out / 'filter'}", f"checkpoint={scorer}",
                          f"score.top_fraction={args.top_fraction}", f"dedupe.threshold={args.dedupe_threshold}",
                          "report=false"], ROOT, out=None)  # fmt: skip
        timings["filter_s"] = time.time() - t
        common = [f"data_uri={out / 'noisy'}", f"tokenizer_merges={merges}", "model=tiny-rn",
                  f"model_overrides={MODEL % vocab}", f"storage_path={out}", f"max_steps={args.steps}",
                  f"batch_size={args.batch}", "warmup_steps=20", "checkpoint_every=0", "keep_checkpoints=1",
                  "max_failures=0", f"seed={args.seed}"]  # fmt: skip
        results = {}
        for name, extra in (("unfiltered", []), ("filtered", [f"selection={out / 'filter'}"])):
            t = time.time()
            checkpoint = train(address, out, f"train_{name}", common, extra)
            timings[f"train_{name}_s"] = time.time() - t
            results[name] = zero_shot(address, checkpoint, merges, sets, out / "eval" / name)
    finally:
        cluster.stop()
    samples_seen = args.steps * args.batch * 2  # 2 workers (configs/train_tiny.yaml)
    return {"quality": selection_quality(corpus, out / "filter" / "selection"), "results": results,
            "samples_seen": samples_seen, "timings": timings, "corpus": corpus.n_samples}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600, help="distinct renders of the noisy corpus")
    parser.add_argument("--mismatch", type=float, default=0.4, help="share of renders with another's caption")
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--top-fraction", type=float, default=0.55, help="the filter's CLIP-score cut")
    parser.add_argument(
        "--dedupe-threshold", type=float, default=0.99, help="image cosine of a near-duplicate"
    )
    parser.add_argument("--steps", type=int, default=150, help="training budget (both runs)")
    parser.add_argument("--batch", type=int, default=32, help="per worker (2 workers)")
    parser.add_argument("--scorer-steps", type=int, default=150)
    parser.add_argument("--heldout", type=int, default=480, help="held-out renders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the private head")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_filter_gain"))
    parser.add_argument("--fresh", action="store_true", help="delete --out first (else its scorer is reused)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    summary = run(args)
    q, r = summary["quality"], summary["results"]
    print(f"\nnoisy corpus: {summary['corpus']} pairs, {q['mismatched_share_before']:.0%} mismatched; "
          f"filter kept {q['kept']} ({q['mismatched_share_after']:.1%} mismatched): removed "
          f"{q['mismatched_removed']:.1%} of mismatched pairs, {q['matched_removed']:.1%} of matched pairs, "
          f"{q['copies_removed']:.1%} of near-duplicate copies")  # fmt: skip
    print(f"\n{'training data':<14} {'samples seen':>12} {'top-1 48 pairs':>15} {'top-1 colour':>13}")
    for name in ("unfiltered", "filtered"):
        print(
            f"{name:<14} {summary['samples_seen']:>12} {r[name]['pairs']:>15.1%} {r[name]['colour']:>13.1%}"
        )
    print(f"(chance: {1 / 48:.1%} and {1 / 8:.1%}; held-out renders: {args.heldout})")
    timing = ", ".join(f"{k} {v:.0f}" for k, v in summary["timings"].items())
    print(f"timings (s): {timing}; load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")  # fmt: skip
    line = {"top1_unfiltered": round(r["unfiltered"]["pairs"], 4), "top1_filtered": round(r["filtered"]["pairs"], 4),
            "colour_top1_unfiltered": round(r["unfiltered"]["colour"], 4),
            "colour_top1_filtered": round(r["filtered"]["colour"], 4), "samples_seen": summary["samples_seen"],
            "kept": q["kept"], "input": q["input"]}  # fmt: skip
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
