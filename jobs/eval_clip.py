"""Evaluate a CLIP checkpoint: zero-shot classification (prompt ensembles), linear probe, image-text retrieval.

    python jobs/eval_clip.py checkpoint=s3://bucket/runs/train/checkpoint_x tokenizer=merges.txt.gz \
        zero_shot.data=data/eval_folder zero_shot.templates=textures \
        linear_probe.train=data/train linear_probe.test=data/test retrieval.data=data/captions.jsonl
    python jobs/eval_clip.py checkpoint=... 'benchmark.datasets=[s3://bucket/wds_imagenet1k, s3://bucket/wds_cars]'

Writes results.json, results.txt, PNG plots and report.html to `output_dir` and prints the table; with
`benchmark.datasets` (LAION CLIP_benchmark's WebDataset layout, read unchanged) also benchmark.txt (ours beside
OpenAI's published top-1) and clip_benchmark.jsonl (CLIP_benchmark's own result records). Every path
(checkpoint, tokenizer, data, output_dir) may be a local path or an s3:// URI; on a cluster use s3:// (the
embedding actors run on other nodes and read the checkpoint and the images themselves).
Large sets are embedded with Ray Data (joins a running cluster, else starts a local one): the zero-shot prompts
and images by the same actor pool (GPU actors on a GPU cluster); small sets in-process. The work is
pipelines/evaluation/evaluator.py. Shard sets take the rows a filter selected: `zero_shot.selection=`,
`retrieval.selection=`, `linear_probe.{train,test,val}_selection=` (pipelines/selection.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/eval_clip.py` from anywhere

from clip_model.zero_shot import ZeroShotError  # noqa: E402
from pipelines import progress  # noqa: E402
from pipelines.config import ConfigError, parse_args  # noqa: E402
from pipelines.evaluation.clip_benchmark import LayoutError  # noqa: E402
from pipelines.evaluation.config import EvalConfig  # noqa: E402
from pipelines.evaluation.data import EvalDataError  # noqa: E402
from pipelines.evaluation.embed import EvalModelError  # noqa: E402
from pipelines.evaluation.evaluator import run, write_report_to  # noqa: E402
from pipelines.evaluation.published import format_benchmark_table  # noqa: E402
from pipelines.evaluation.report import format_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    progress.setup()  # plain job logs: no escape sequences, one line per finished stage
    cfg = parse_args(EvalConfig, argv, description=__doc__)
    try:
        results = run(cfg)
    except (ConfigError, EvalDataError, EvalModelError, ZeroShotError, LayoutError) as e:
        print(f"eval_clip: error: {e}", file=sys.stderr)
        return 2
    files = write_report_to(results, cfg.output_dir)
    print(format_table(results))
    if results.get("benchmark"):
        print(format_benchmark_table(results["benchmark"]))
    for name, info in results["data"].items():
        drops = ", ".join(f"{k}={v}" for k, v in info["dropped"].items()) or "none"
        print(f"{name}: {info['n_used']}/{info['n_in']} images used (dropped: {drops})")
    print(f"report: {files['report.html']}  results: {files['results.json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
