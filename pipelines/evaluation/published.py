"""Our zero-shot numbers beside the published ones: OpenAI's paper table, and CLIP_benchmark's result records.

- `OPENAI_ZERO_SHOT_TOP1`: zero-shot top-1 (%) that Radford et al. 2021 (arXiv 2103.00020) report, by
  (dataset, model). Only numbers taken from the paper are listed (ImageNet); a dataset or model without one
  gets an empty reference column rather than a guess.
- `clip_benchmark_record`: one result in the JSON form CLIP_benchmark's `clip_benchmark eval` writes
  (`dataset`, `model`, `pretrained`, `task`, `metrics.acc1/acc5/mean_per_class_recall`, `language`), so our
  lines can be concatenated with its published result files and compared row for row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from clip_model.configs import available_models, get_config

OPENAI_PAPER = "Radford et al. 2021, zero-shot ImageNet top-1"
OPENAI_ZERO_SHOT_TOP1: dict[tuple[str, str], float] = {
    ("imagenet1k", "RN50"): 59.6,
    ("imagenet1k", "ViT-B/32"): 63.2,
    ("imagenet1k", "ViT-B/16"): 68.6,
    ("imagenet1k", "ViT-L/14"): 75.3,
    ("imagenet1k", "ViT-L/14@336px"): 76.2,
}
# Other spellings of the datasets above (CLIP_benchmark calls ImageNet's validation set `imagenet1k`).
DATASET_ALIASES = {"imagenet": "imagenet1k", "imagenet_1k": "imagenet1k", "imagenet1k_val": "imagenet1k"}


def model_name(config) -> str:
    """The named configuration (clip_model.configs) the model's architecture equals, else "" (the vocabulary
    size is not compared: a model trained with its own tokenizer is still that architecture)."""
    ours = {**dataclasses.asdict(config), "vocab_size": None}
    for name in available_models():
        if {**dataclasses.asdict(get_config(name)), "vocab_size": None} == ours:
            return name
    return ""


def reference_top1(dataset: str, model: str) -> float | None:
    dataset = DATASET_ALIASES.get(dataset.lower(), dataset.lower())
    return OPENAI_ZERO_SHOT_TOP1.get((dataset, model))


def benchmark_row(dataset: str, split: str, model: str, result: dict[str, Any]) -> dict[str, Any]:
    """One row of the comparison table (percentages, as the papers print them)."""
    ref = reference_top1(dataset, model)
    top1 = 100 * result["top1"]
    return {
        "dataset": dataset,
        "split": split,
        "model": model or "-",
        "n": result["n"],
        "num_classes": result["num_classes"],
        "num_templates": result.get("num_templates"),
        "top1": round(top1, 2),
        "top5": round(100 * result["top5"], 2) if "top5" in result else None,
        "mean_per_class": round(100 * result["mean_per_class"], 2),
        "openai_paper_top1": ref,
        "delta_vs_paper": None if ref is None else round(top1 - ref, 2),
        "reference": OPENAI_PAPER if ref is not None else "",
    }


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_benchmark_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table: ours beside OpenAI's published top-1 where there is one."""
    cols = ["dataset", "model", "n", "top1", "top5", "mean_per_class", "openai_paper_top1", "delta_vs_paper"]
    cells = [cols] + [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def clip_benchmark_record(row: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """The row as CLIP_benchmark writes a zero-shot classification result (fractions, not percentages)."""
    return {
        "dataset": row["dataset"],
        "model": row["model"],
        "pretrained": checkpoint,
        "task": "zeroshot_classification",
        "metrics": {
            "acc1": row["top1"] / 100,
            "acc5": None if row["top5"] is None else row["top5"] / 100,
            "mean_per_class_recall": row["mean_per_class"] / 100,
        },
        "language": "en",
    }
