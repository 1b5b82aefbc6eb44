"""The evaluation report: results.json, a plain-text table, PNG plots and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(evaluation, metric, value in %) rows, in the order the table prints them."""
    rows = []
    zs = results.get("zero_shot")
    if zs:
        for key in ("top1", "top5", "mean_per_class"):
            rows.append(("zero-shot", key, _pct(zs.get(key))))
    lp = results.get("linear_probe")
    if lp:
        rows.append(("linear probe", "top1", _pct(lp["accuracy"])))
        rows.append(("linear probe", "C", f"{lp['C']:.4g}"))
    rt = results.get("retrieval")
    if rt:
        for key in rt:
            if "_R@" in key:
                rows.append(("retrieval", key, _pct(rt[key])))
    return rows


def format_table(results: dict[str, Any]) -> str:
    rows = summary_rows(results)
    if not rows:
        return "(no evaluation ran)"
    w0 = max(len("evaluation"), *(len(r[0]) for r in rows))
    w1 = max(len("metric"), *(len(r[1]) for r in rows))
    lines = [f"{'evaluation':<{w0}}  {'metric':<{w1}}  value", f"{'-' * w0}  {'-' * w1}  -----"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def plot_per_class(per_class: dict[str, dict], path: Path, title: str) -> Path:
    names = list(per_class)
    values = [100 * (per_class[n]["accuracy"] or 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
    ax.bar(range(len(names)), values, color="#4477aa")
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> Path:
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * n + 2), max(4, 0.3 * n + 1.5)))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=6)
    ax.set_yticks(range(n), class_names, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_recall_curves(curve: dict[str, list], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve["k"], [100 * v for v in curve["image_to_text"]], label="image → text")
    ax.plot(curve["k"], [100 * v for v in curve["text_to_image"]], label="text → image")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    plots = {}
    zs = results.get("zero_shot")
    if zs and len(zs["per_class"]) <= 100:  # ImageNet's 1,000 bars or a 1,000 x 1,000 matrix: numbers only
        plots["zero-shot per-class accuracy"] = plot_per_class(
            zs["per_class"], out_dir / "zero_shot_per_class.png", "zero-shot per-class accuracy"
        )
    if zs and zs.get("confusion"):
        plots["zero-shot confusion matrix"] = plot_confusion(
            zs["confusion"], zs["class_names"], out_dir / "zero_shot_confusion.png", "zero-shot confusion"
        )
    lp = results.get("linear_probe")
    if lp and lp.get("per_class"):
        plots["linear-probe per-class accuracy"] = plot_per_class(
            lp["per_class"], out_dir / "linear_probe_per_class.png", "linear-probe per-class accuracy"
        )
    rt = results.get("retrieval")
    if rt:
        plots["retrieval recall@K"] = plot_recall_curves(rt["curve"], out_dir / "retrieval_recall.png")
    return plots


def write_html(results: dict[str, Any], plots: dict[str, Path], path: Path) -> Path:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>CLIP evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 10px;text-align:left}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>CLIP evaluation</h1><p>checkpoint: <code>{html.escape(str(results.get('checkpoint', '')))}</code></p>",
        "<table><tr><th>evaluation</th><th>metric</th><th>value (%)</th></tr>",
    ]
    parts += [
        f"<tr><td>{a}</td><td>{html.escape(b)}</td><td>{c}</td></tr>" for a, b, c in summary_rows(results)
    ]
    parts.append("</table>")
    for title, png in plots.items():
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    parts.append(f"<h2>data</h2><pre>{html.escape(json.dumps(results.get('data', {}), indent=1))}</pre>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """results.json, results.txt (the table), PNGs and report.html under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True), encoding="utf-8")
    (out / "results.txt").write_text(format_table(results) + "\n", encoding="utf-8")
    plots = write_plots(results, out)
    write_html(results, plots, out / "report.html")
    files = {
        "results.json": out / "results.json",
        "results.txt": out / "results.txt",
        "report.html": out / "report.html",
    }
    files.update({p.name: p for p in plots.values()})
    return {k: str(v) for k, v in files.items()}
