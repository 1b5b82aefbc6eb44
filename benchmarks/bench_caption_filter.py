"""The caption filter on the labelled set `tests/data/captions_labelled.jsonl`: precision and recall of
"keep" per English-score threshold (the sweep that chose `FilterConfig.min_english_score`), the errors at
the configured threshold, drop-reason agreement, and captions/s.

Every caption gets the same neutral URL shape (no file name to help). Usage:
    python benchmarks/bench_caption_filter.py [--set tests/data/captions_labelled.jsonl] [--show-errors]
Last line: JSON with precision, recall, threshold, n, reason_agreement, captions_per_s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.wit.filters import FilterConfig, TextFilter  # noqa: E402

THRESHOLDS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7]


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def neutral_url(i: int) -> str:
    return f"https://img.example.net/a/{i:04d}"


def precision_recall(rows: list[dict], reasons: list[str | None]) -> tuple[float, float]:
    kept = [r["label"] == "keep" for r in rows]
    predicted = [reason is None for reason in reasons]
    tp = sum(k and p for k, p in zip(kept, predicted))
    return tp / max(1, sum(predicted)), tp / max(1, sum(kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default=str(ROOT / "tests" / "data" / "captions_labelled.jsonl"))
    parser.add_argument("--show-errors", action="store_true")
    args = parser.parse_args()
    rows = load(Path(args.set))
    config = FilterConfig()
    text_filter = TextFilter(config)
    urls = [neutral_url(i) for i in range(len(rows))]
    captions = [" ".join(r["caption"].split()) for r in rows]

    start = time.perf_counter()
    reasons = text_filter.reasons(urls, captions)
    per_s = len(rows) / (time.perf_counter() - start)
    # The sweep: the checks before the language stay; the language verdict moves with the threshold.
    before = [text_filter.reason(u, c) for u, c in zip(urls, captions)]
    scores = {i: s for i, s in enumerate(text_filter.language.english_scores(captions)) if before[i] is None}

    print(f"{len(rows)} captions ({sum(r['label'] == 'keep' for r in rows)} keep), neutral URLs")
    print(f"{'threshold':>9}  {'precision':>9}  {'recall':>7}  {'false keep':>10}  {'false drop':>10}")
    for t in THRESHOLDS:
        swept = [before[i] or ("not_english" if scores[i] < t else None) for i in range(len(rows))]
        p, r = precision_recall(rows, swept)
        false_keep = sum(x is None and row["label"] == "drop" for x, row in zip(swept, rows))
        false_drop = sum(x is not None and row["label"] == "keep" for x, row in zip(swept, rows))
        mark = "  <- configured" if abs(t - config.min_english_score) < 1e-9 else ""
        print(f"{t:>9.2f}  {p:>9.3f}  {r:>7.3f}  {false_keep:>10}  {false_drop:>10}{mark}")

    precision, recall = precision_recall(rows, reasons)
    drops = [(row, x) for row, x in zip(rows, reasons) if row["label"] == "drop" and x is not None]
    agreement = sum(row["reason"] == x for row, x in drops) / max(1, len(drops))
    print(
        f"\nat min_english_score={config.min_english_score}: precision {precision:.3f}, recall {recall:.3f}; "
        f"drop reason as labelled for {agreement:.1%} of the dropped; {per_s:,.0f} captions/s"
    )
    if args.show_errors:
        for row, x in zip(rows, reasons):
            want = None if row["label"] == "keep" else row["reason"]
            if x != want:
                print(f"  {row['label']:4}  labelled {want}, got {x}: {row['caption']}")
    print(
        json.dumps(
            {
                "precision": round(precision, 4),
                "recall": round(recall, 4),
                "threshold": config.min_english_score,
                "n": len(rows),
                "reason_agreement": round(agreement, 4),
                "captions_per_s": round(per_s),
            }
        )
    )


if __name__ == "__main__":
    main()
