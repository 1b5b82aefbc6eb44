"""The quick start: the whole system on one machine, through the same job submission a cluster uses.

    python jobs/demo.py [--run-dir runs/demo] [--address http://HOST:8265] [--small]

1. writes the demo web corpus (pipelines/demo_corpus.py) and serves it on 127.0.0.1;
2. starts a private Ray head on 127.0.0.1 (or uses `--address`), and submits, each with jobs/submit.py:
   the query list (Wikipedia + page views + WordNet) -> build_wit.py (WAT -> filters -> match -> balance ->
   crawl -> shards) -> train_clip.py (2 CPU workers, tiny ResNet) -> eval_clip.py (held-out images and captions);
3. closes the loop: filter_wit.py scores and deduplicates the shards with the model just trained (the corpus
   has mismatched captions and near-duplicates a text-only build keeps), train_clip.py trains again on the
   selection with the same step budget, eval_clip.py evaluates that run too;
4. prints the dataset funnel, training time and throughput, zero-shot accuracy against chance, what the
   filter removed (by the corpus's ground truth) and both runs' zero-shot side by side, and writes plots
   (training curves, funnel, per-query histogram) and the evaluation reports into the run folder.

Zero-shot is measured on held-out renders per label set: colour (8 classes), shape (6), and the 48 colour-shape
pairs for information; colour and shape each on pairs the web shows ("seen") and on pairs no training caption
names together ("novel", the corpus keeps them off the web), so the model must compose what it learned.

Idempotent: a rerun reuses the corpus, the query list and the committed shards, and trains afresh.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.submit import run_job  # noqa: E402
from pipelines import progress  # noqa: E402
from pipelines.crawl import key_stats  # noqa: E402
from pipelines.demo_corpus import CorpusParams, serve, write_corpus  # noqa: E402
from pipelines.local_cluster import LocalRayCluster  # noqa: E402

# Corpus size and training schedule. Colour is learned within a few dozen steps of 64 pairs, shape needs
# hundreds; FULL (~380 steps) fits the quick start's 15 minutes on 2 busy cores, SMALL is the test smoke.
# The loop (filter with the trained model, train again on the selection) gets the same number of steps in
# FULL (`loop_steps` 0), so the two runs compare at one budget; SMALL only checks that the loop works (and
# skips the filter's HTML report).
FULL = {"images_per_concept": 32, "heldout_per_concept": 10, "epochs": 24, "batch_size": 32, "lr": 1e-3,
        "warmup_steps": 20, "loop_steps": 0, "filter_report": True}  # fmt: skip
SMALL = {"images_per_concept": 6, "heldout_per_concept": 3, "epochs": 10, "batch_size": 8, "lr": 2e-3,
         "warmup_steps": 10, "loop_steps": 20, "filter_report": False}  # fmt: skip
# The tiny ResNet picks up shape sooner than the tiny ViT at 32 px; captions are short, so 32 tokens.
MODEL = {"model": "tiny-rn", "image_resolution": 32, "context_length": 32}
# Zero-shot sets: (name, split, label set); "combo" is the image folder of all 48 pairs.
EVAL_SETS = [("colour_seen", "seen", "colour"), ("colour_novel", "novel", "colour"),
             ("shape_seen", "seen", "shape"), ("shape_novel", "novel", "shape"), ("combo_all", None, "combo")]  # fmt: skip
# Pipeline order of the funnel's stages (stats files keep them sorted by name).
STAGE_ORDER = ["read", "text_filter", "match", "dedupe", "balance", "input", "caption", "fetch", "image"]


def train_tokenizer(captions: list[str], out: Path, vocab_size: int) -> int:
    """BPE on the dataset's captions; returns the vocabulary size reached (a small corpus stops early)."""
    from clip_model import Tokenizer

    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        Tokenizer.train(captions, vocab_size, out)
    return Tokenizer(str(out)).vocab_size


def shard_captions(shard_dir: Path) -> list[str]:
    from pipelines import shards

    captions = []
    for tar in sorted(shard_dir.glob("*.tar")):
        captions += [s["txt"] for s in shards.read_tar_samples(tar.read_bytes())]
    return captions


def plot_training(metrics_csv: Path, out: Path) -> dict:
    """Loss, logit scale, throughput and the trainer's zero-shot check against step; returns the last values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(metrics_csv.open()))
    keys = ("loss", "logit_scale", "samples_per_s", "zero_shot_top1")
    fig, axes = plt.subplots(1, len(keys), figsize=(17, 3.5))
    last: dict[str, float] = {}
    for ax, key in zip(axes, keys):
        points = [(int(float(r["step"])), float(r[key])) for r in rows if r.get(key)]  # a row holds some keys
        if points:
            ax.plot(*zip(*points), marker="." if key == "zero_shot_top1" else None)
            last[key] = points[-1][1]
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    steps = max((int(float(r["step"])) for r in rows), default=0)
    return {"steps": steps, "last": last}


def ordered_stages(stages: dict) -> list[tuple[str, int, int]]:
    """(name, in, out) in pipeline order: a funnel's counts only shrink, known names break ties."""

    def key(item):
        name, stage = item
        rank = STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER)
        return (-int(stage["in"]), -int(stage["out"]), rank)

    return [(name, int(st["in"]), int(st["out"])) for name, st in sorted(stages.items(), key=key)]


def funnel_stages(stats: dict) -> list[tuple[str, int, int, dict[str, int]]]:
    """(part/stage, in, out, dropped by reason) for curation then crawl, in pipeline order."""
    rows = []  # both parts have a "dedupe" stage: names carry their part
    for part, stages in (
        ("curate", stats.get("curation", {}).get("stages", {})),
        ("crawl", stats.get("stages", {})),
    ):
        for name, n_in, n_out in ordered_stages(stages):
            dropped = {k: int(v) for k, v in stages[name].get("dropped", {}).items() if int(v)}
            rows.append((f"{part}/{name}", n_in, n_out, dropped))
    return rows


def plot_drops(rows: list[tuple[str, int, int, dict[str, int]]], out: Path) -> None:
    """One bar per stage: kept (green) then each drop reason stacked after it, so the bar's length is the
    stage's input; every reason has its colour and the bar is labelled with its largest reasons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reasons = sorted(
        {r for *_, dropped in rows for r in dropped}, key=lambda r: -sum(d.get(r, 0) for *_, d in rows)
    )
    palette = [plt.get_cmap("tab20")(i) for i in range(20) if i not in (4, 5)]  # no green: green is "kept"
    colours = {r: palette[i % len(palette)] for i, r in enumerate(reasons)}
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) + 1.5))
    names = [name for name, *_ in rows][::-1]
    kept = [n_out for _, _, n_out, _ in rows][::-1]
    ax.barh(names, kept, color="#3a7", label="kept")
    left = list(kept)
    for reason in reasons:
        widths = [d.get(reason, 0) for *_, d in rows][::-1]
        ax.barh(names, widths, left=left, color=colours[reason], label=reason)
        left = [a + b for a, b in zip(left, widths)]
    for y, (_, n_in, n_out, dropped) in enumerate(rows[::-1]):
        top = ", ".join(f"{r} {n}" for r, n in sorted(dropped.items(), key=lambda kv: -kv[1])[:3])
        ax.text(n_in, y, f"  {n_out}/{n_in}" + (f"  dropped: {top}" if top else ""), va="center", fontsize=8)
    ax.set_xlim(0, max((r[1] for r in rows), default=1) * 1.6)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.set_title("dataset funnel: kept and dropped by reason, per stage")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_funnel(
    stats: dict, per_query: list[int], out_funnel: Path, out_queries: Path
) -> list[tuple[str, int, int]]:
    """The funnel and the histogram of pairs kept per query (`per_query`: the build's `_stats_queries`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = funnel_stages(stats)
    plot_drops(rows, out_funnel)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.hist(per_query or [0], bins=20)
    ax.set_title(f"pairs per query ({len(per_query)} queries)")
    ax.set_xlabel("pairs kept")
    fig.tight_layout()
    fig.savefig(out_queries, dpi=100)
    plt.close(fig)
    return [(name, n_in, n_out) for name, n_in, n_out, _ in rows]


def eval_entrypoint(corpus, checkpoint: Path, merges: Path, eval_dir: Path) -> list[str]:
    """One job that runs jobs/eval_clip.py per zero-shot set (retrieval with the 48-pair set)."""
    runs = []
    for name, split, attribute in EVAL_SETS:
        data = corpus.heldout_images if split is None else corpus.label_set(split, attribute)
        argv = [f"checkpoint={checkpoint}", f"tokenizer={merges}", f"output_dir={eval_dir / name}",
                f"zero_shot.data={data}", f"zero_shot.templates={corpus.templates(attribute)}"]  # fmt: skip
        if split is None:
            argv.append(f"retrieval.data={corpus.heldout_captions}")
        runs.append(argv)
    # jobs/eval_clip.py's main once per set, in one process: torch and the job start-up are paid once.
    code = f"import sys; from jobs.eval_clip import main; sys.exit(any(main(a) for a in {runs!r}))"
    return ["python", "-c", code]


def train_argv(
    size: dict, data: Path, merges: Path, vocab: int, run_dir: Path, name: str, corpus
) -> list[str]:
    """jobs/train_clip.py on the demo's shards (the trainer's colour check at each epoch end)."""
    overrides = f"{{image_resolution: {MODEL['image_resolution']}, context_length: {MODEL['context_length']}, vocab_size: {vocab}}}"  # noqa: E501
    return ["python", "jobs/train_clip.py", "--config", "configs/train_tiny.yaml",
            f"data_uri={data / 'shards'}", f"tokenizer_merges={merges}", f"model={MODEL['model']}",
            f"model_overrides={overrides}", f"storage_path={run_dir}", f"name={name}", f"epochs={size['epochs']}",
            f"batch_size={size['batch_size']}", f"lr={size['lr']}", f"warmup_steps={size['warmup_steps']}",
            "checkpoint_every=0", "keep_checkpoints=1", "max_failures=0",
            f"zero_shot_data={corpus.label_set('seen', 'colour')}",
            f"zero_shot_templates={corpus.templates('colour')}"]  # fmt: skip


def latest_checkpoint(train_dir: Path) -> Path:
    return sorted(p for p in train_dir.glob("checkpoint_*") if p.is_dir())[-1]


def noise_of_samples(shard_dir: Path, truth: dict) -> dict[str, str]:
    """{sample key: "mismatched_caption" | "near_duplicate" | "clean"} of the built shards, from the corpus's
    ground truth (a sample's URL path is the image's path on the demo web)."""
    from pipelines import shards

    by_path = {im["path"]: im.get("noise", "clean") for im in truth["images"]}
    noise = {}
    for tar in sorted(shard_dir.glob("*.tar")):
        for sample in shards.read_tar_samples(tar.read_bytes()):
            path = sample["json"]["url"].split("/", 3)[3]
            noise[sample["key"]] = by_path.get(path, "clean")
    return noise


def filter_summary(filter_dir: Path, noise: dict[str, str]) -> dict:
    """The filter's counts and, per kind of noise, the share of the built samples it removed."""
    import pyarrow.parquet as pq

    selection = json.loads((filter_dir / "selection" / "_selection.json").read_text())
    kept = {
        k for f in (filter_dir / "selection").glob("*.parquet") for k in pq.read_table(f)["key"].to_pylist()
    }
    removed = {}
    for kind in ("mismatched_caption", "near_duplicate", "clean"):
        keys = [k for k, v in noise.items() if v == kind]
        removed[kind] = {"n": len(keys), "removed": sum(k not in kept for k in keys)}
    return {"input": selection["input"], "kept": selection["kept"], "dropped": selection["dropped"],
            "removed": removed}  # fmt: skip


def close_the_loop(address: str, ctx: dict, timings: dict) -> dict:
    """Filter the shards with the model just trained (jobs/filter_wit.py), train again on the selection with
    the same step budget (FULL), and evaluate that run like the first."""
    run_dir, size, steps = ctx["run_dir"], ctx["size"], ctx["steps"]
    filter_dir = run_dir / "filter"
    shutil.rmtree(filter_dir, ignore_errors=True)
    t = time.time()
    # 15% of the corpus's captions are mismatched: keep the top 80% by CLIP score. Renders of one concept
    # embed close together in a tiny model, so only near-identical images (cosine >= 0.99) count as copies.
    run_job(address, ["python", "jobs/filter_wit.py", "--config", "configs/filter_demo.yaml",
                      f"data_uri={ctx['data'] / 'shards'}", f"output={filter_dir}",
                      f"checkpoint={ctx['checkpoint']}", "score.top_fraction=0.8",
                      "dedupe.threshold=0.99", f"report={str(size['filter_report']).lower()}"], ROOT)  # fmt: skip
    timings["filter_s"] = time.time() - t
    train_dir = run_dir / "train_filtered"
    shutil.rmtree(train_dir, ignore_errors=True)
    t = time.time()
    argv = train_argv(
        size, ctx["data"], ctx["merges"], ctx["vocab"], run_dir, "train_filtered", ctx["corpus"]
    )
    run_job(address, [*argv, f"selection={filter_dir}", f"max_steps={size['loop_steps'] or steps}"], ROOT)
    timings["train_filtered_s"] = time.time() - t
    eval_dir = run_dir / "eval_filtered"
    shutil.rmtree(eval_dir, ignore_errors=True)
    t = time.time()
    run_job(
        address, eval_entrypoint(ctx["corpus"], latest_checkpoint(train_dir), ctx["merges"], eval_dir), ROOT
    )
    timings["eval_filtered_s"] = time.time() - t
    return {"filter_dir": filter_dir, "train_dir": train_dir, "eval_dir": eval_dir}


def zero_shot_results(eval_dir: Path) -> dict:
    zero_shot = {}
    for name, _, _ in EVAL_SETS:
        zs = json.loads((eval_dir / name / "results.json").read_text())["zero_shot"]
        zero_shot[name] = {"top1": zs["top1"], "n": zs["n"], "classes": zs["num_classes"],
                           "chance": 1.0 / zs["num_classes"]}  # fmt: skip
    return zero_shot


def run(args: argparse.Namespace) -> dict:
    size = SMALL if args.small else FULL
    start = time.time()
    run_dir = Path(args.run_dir).resolve()
    data = run_dir / "data"
    corpus = write_corpus(
        data / "corpus",
        CorpusParams(
            images_per_concept=size["images_per_concept"],
            heldout_per_concept=size["heldout_per_concept"],
        ),
    )
    cluster = None
    timings: dict[str, float] = {}
    with serve(corpus.www) as base_url:
        corpus.write_wat(base_url)  # the port changes from run to run
        if args.address:
            address = args.address
        else:
            cluster = LocalRayCluster(num_cpus=args.num_cpus).start()
            address = cluster.dashboard_url
        print(f"demo: corpus served at {base_url}; Ray job API at {address}", flush=True)
        try:
            t = time.time()
            run_job(address, ["python", "jobs/build_queries.py", f"output={data / 'queries'}",
                              f"wikipedia=[{corpus.wiki_dump}]", f"pageviews=[{corpus.pageviews}]",
                              f"wordnet=[{corpus.wordnet}]", "min_word_count=5", "min_bigram_count=3",
                              "min_page_views=100", "num_partitions=4"], ROOT)  # fmt: skip
            # The WAT files name this run's port: curate again, then the crawl resumes from its shards.
            shutil.rmtree(data / "curated", ignore_errors=True)
            run_job(address, ["python", "jobs/build_wit.py", f"output={data / 'shards'}", "formats=[webdataset]",
                              f"curation.inputs=[{corpus.wat_dir}]", f"curation.queries={data / 'queries'}",
                              f"curation.output={data / 'curated'}", "curation.max_per_query=200",
                              "curation.num_buckets=2", "crawl.fetch.allowed_networks=[127.0.0.0/8]",
                              "crawl.num_workers=1", "crawl.num_cpus_per_worker=0.5", "crawl.samples_per_shard=64",
                              "crawl.image.image_size=64", "crawl.image.min_size=32"], ROOT)  # fmt: skip
            timings["build_s"] = time.time() - t
            stats = json.loads((data / "shards" / "_stats.json").read_text())

            merges = data / "merges.txt.gz"
            vocab = train_tokenizer(shard_captions(data / "shards"), merges, vocab_size=800)
            train_dir = run_dir / "train"
            shutil.rmtree(train_dir, ignore_errors=True)
            t = time.time()
            run_job(address, train_argv(size, data, merges, vocab, run_dir, "train", corpus), ROOT)
            timings["train_s"] = time.time() - t
            checkpoint = latest_checkpoint(train_dir)

            eval_dir = run_dir / "eval"
            shutil.rmtree(eval_dir, ignore_errors=True)
            t = time.time()
            run_job(address, eval_entrypoint(corpus, checkpoint, merges, eval_dir), ROOT)
            timings["eval_s"] = time.time() - t
            training = plot_training(train_dir / "metrics.csv", run_dir / "training_curve.png")
            ctx = {"run_dir": run_dir, "size": size, "steps": training["steps"], "data": data, "checkpoint": checkpoint,
                   "merges": merges, "vocab": vocab, "corpus": corpus}  # fmt: skip
            loop = close_the_loop(address, ctx, timings)
        finally:
            if cluster is not None:
                cluster.stop()

    summary = summarise(run_dir, corpus, stats, training, eval_dir, loop)
    summary["timings"] = {**timings, "total_s": time.time() - start}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def summarise(run_dir: Path, corpus, stats: dict, training: dict, eval_dir: Path, loop: dict) -> dict:
    """The demo's summary (without timings) and its plots: the funnel, zero-shot per label set, retrieval, and
    the model in the loop (what the filter removed by ground truth, the filtered run's zero-shot)."""
    shards = run_dir / "data" / "shards"
    per_query = key_stats.read_table(str(shards), "queries").column("kept").to_pylist()
    funnel = plot_funnel(stats, per_query, run_dir / "funnel.png", run_dir / "per_query.png")
    combo = json.loads((eval_dir / "combo_all" / "results.json").read_text())
    noise = noise_of_samples(shards, corpus.truth())
    filtered = {"filter": filter_summary(loop["filter_dir"], noise), "zero_shot": zero_shot_results(loop["eval_dir"]),
                "training": plot_training(loop["train_dir"] / "metrics.csv", run_dir / "training_curve_filtered.png")}  # fmt: skip
    return {"funnel": funnel, "totals": stats.get("totals", {}), "training": training,
            "zero_shot": zero_shot_results(eval_dir), "retrieval": combo.get("retrieval", {}),
            "novel_pairs": [c.label for c in corpus.novel], "filtered": filtered}  # fmt: skip


def print_loop(summary: dict) -> None:
    """The model in the loop: what the filter removed, and zero-shot before and after."""
    loop = summary["filtered"]
    f = loop["filter"]
    print("\n=== the model in the loop: filter the shards with the trained model, train again ===")
    dropped = ", ".join(f"{k} {v}" for k, v in f["dropped"].items() if v) or "none"
    print(f"  kept {f['kept']} of {f['input']} pairs (dropped: {dropped})")
    for kind, label in (("mismatched_caption", "mismatched captions"), ("near_duplicate", "near-duplicates"),
                        ("clean", "clean pairs")):  # fmt: skip
        r = f["removed"][kind]
        print(f"  {label:<20} removed {r['removed']:>4} of {r['n']:<4} ({r['removed'] / max(1, r['n']):.0%})")
    steps = (summary["training"]["steps"], loop["training"]["steps"])
    print(f"  zero-shot top-1      unfiltered ({steps[0]} steps)   filtered ({steps[1]} steps)")
    for name, zs in summary["zero_shot"].items():
        print(f"  {name:<20} {zs['top1']:>10.1%} {loop['zero_shot'][name]['top1']:>24.1%}")


def print_summary(summary: dict, run_dir: str) -> None:
    print("\n=== dataset funnel ===")
    for name, n_in, n_out in summary["funnel"]:
        print(f"  {name:<24} {n_in:>6} -> {n_out:>6}")
    last = summary["training"]["last"]
    print("\n=== training ===")
    print(f"  {summary['training']['steps']} steps in {summary['timings']['train_s']:.0f} s (job), "
          f"{last.get('samples_per_s', 0):.1f} samples/s, final loss {last.get('loss', 0):.3f}, "
          f"colour zero-shot during training {last.get('zero_shot_top1', 0):.1%} (each epoch end)")  # fmt: skip
    print("\n=== zero-shot on held-out images (top-1 vs chance) ===")
    for name, zs in summary["zero_shot"].items():
        print(f"  {name:<14} {zs['top1']:>6.1%}   chance {zs['chance']:>5.1%}   {zs['classes']:>2} classes, "
              f"{zs['n']} images")  # fmt: skip
    print(
        f"  (novel = colour-shape pairs absent from the training captions: {', '.join(summary['novel_pairs'])})"
    )
    retrieval = summary.get("retrieval", {})
    if "image_to_text_R@1" in retrieval:
        print(f"  retrieval over {retrieval['num_images']} held-out images: image->text R@1 "
              f"{retrieval['image_to_text_R@1']:.1%}, text->image R@10 {retrieval['text_to_image_R@10']:.1%} "
              f"(chance {1 / retrieval['num_images']:.1%} and {10 / retrieval['num_images']:.1%})")  # fmt: skip
    print_loop(summary)
    timings = summary["timings"]
    print(f"\nbuild {timings['build_s']:.0f} s, train {timings['train_s']:.0f} s, eval {timings['eval_s']:.0f} s, "
          f"filter {timings['filter_s']:.0f} s, train on the selection {timings['train_filtered_s']:.0f} s, "
          f"total {timings['total_s']:.0f} s")  # fmt: skip
    print(f"\nplots and report: {run_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--address", default=None, help="job API of a running cluster (default: start one)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the private head")
    parser.add_argument("--small", action="store_true", help="a reduced corpus and training (smoke test)")
    args = parser.parse_args(argv)
    progress.setup()  # plain output when it goes to a file or a pipe (the jobs' logs are plain anyway)
    summary = run(args)
    print_summary(summary, args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
