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


COLUMNS = ("evaluation", "metric", "value", "chance", "counted over")
MATRIX_MAX_CLASSES = 20  # above this a confusion matrix is unreadable: the top confusions table instead


def retrieval_chance(k: int, num_images: int) -> float:
    """Chance of the right image (or one of an image's captions) within the top K: ~K / images."""
    return min(1.0, k / max(num_images, 1))


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(evaluation, metric, value in %, chance in %, what it is counted over) rows, in table order."""
    rows = []
    zs = results.get("zero_shot")
    if zs:
        c, n = zs.get("num_classes") or len(zs.get("class_names", [])), zs.get("n", 0)
        counted = f"{n} images, {c} classes"
        for key, chance in (("top1", 1 / c), ("top5", min(5, c) / c), ("mean_per_class", 1 / c)):
            rows.append(("zero-shot", key, _pct(zs.get(key)), _pct(chance), counted))
    lp = results.get("linear_probe")
    if lp:
        c = len(lp.get("per_class") or {}) or None
        counted = f"{lp.get('n_test', '?')} test images" + (f", {c} classes" if c else "")
        rows.append(("linear probe", "top1", _pct(lp["accuracy"]), _pct(1 / c) if c else "-", counted))
        rows.append(("linear probe", "C", f"{lp['C']:.4g}", "", f"{lp.get('n_train', '?')} training images"))
    rt = results.get("retrieval")
    if rt:
        counted = f"{rt.get('num_images', '?')} images, {rt.get('num_texts', '?')} captions"
        for key in rt:
            if "_R@" in key:
                chance = retrieval_chance(int(key.rsplit("@", 1)[1]), rt.get("num_images", 0))
                rows.append(("retrieval", key, _pct(rt[key]), "~" + _pct(chance), counted))
    return rows


def format_table(results: dict[str, Any]) -> str:
    rows = summary_rows(results)
    if not rows:
        return "(no evaluation ran)"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def plot_per_class(per_class: dict[str, dict], path: Path, title: str) -> Path:
    """Bars per class (labelled with the class's image count) against the chance level."""
    names = list(per_class)
    values = [100 * (per_class[n]["accuracy"] or 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names) + 2), 4.5))
    ax.bar(range(len(names)), values, color="#4477aa")
    labels = [f"{n} ({per_class[n].get('n', '?')})" for n in names]
    ax.set_xticks(range(len(names)), labels, rotation=75, ha="right", fontsize=8)
    chance = 100 / max(len(names), 1)
    ax.axhline(chance, color="#cc3311", linestyle="--", label=f"chance {chance:.1f}%")
    ax.legend(loc="upper right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title} (class: images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> Path:
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * n + 2), max(4, 0.3 * n + 1.5)))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)  # as tall as the matrix
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_recall_curves(curve: dict[str, list], path: Path, num_images: int = 0, num_texts: int = 0) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve["k"], [100 * v for v in curve["image_to_text"]], label="image → text")
    ax.plot(curve["k"], [100 * v for v in curve["text_to_image"]], label="text → image")
    if num_images:
        chance = [100 * retrieval_chance(k, num_images) for k in curve["k"]]
        ax.plot(curve["k"], chance, color="#888888", linestyle="--", label="chance (~K / images)")
        ax.set_title(f"recall@K over {num_images} images, {num_texts} captions")
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
    if zs and zs.get("confusion") and len(zs["class_names"]) <= MATRIX_MAX_CLASSES:
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
        plots["retrieval recall@K"] = plot_recall_curves(
            rt["curve"], out_dir / "retrieval_recall.png", rt.get("num_images", 0), rt.get("num_texts", 0)
        )
    return plots


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}td,th{padding:2px 10px;text-align:left}"
    "table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}img{max-width:100%}"
    ".sheet{display:flex;flex-wrap:wrap;gap:12px}.sheet figure{margin:0;width:190px;font-size:12px}"
    ".sheet img{width:112px;height:112px;object-fit:contain;background:#eee}.hit{color:#117733}"
    ".miss{color:#cc3311}.query{margin:8px 0}.query img{width:96px;height:96px;border:3px solid #ccc}"
    ".query img.correct{border-color:#117733}"
)


def _table(header: list[str], rows: list[list[Any]], css_class: str) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{css_class}'><tr>{head}</tr>{body}</table>"


def top_confusions(zs: dict[str, Any], limit: int = 15) -> list[list[Any]]:
    """The most frequent (true, predicted) mistakes with their share of the true class's images."""
    names, matrix = zs["class_names"], zs["confusion"]
    pairs = [
        (matrix[t][p], t, p) for t in range(len(names)) for p in range(len(names)) if t != p and matrix[t][p]
    ]
    return [
        [names[t], names[p], count, _pct(count / max(sum(matrix[t]), 1))]
        for count, t, p in sorted(pairs, key=lambda x: (-x[0], x[1], x[2]))[:limit]
    ]


def _image(data: str, alt: str, css: str = "") -> str:
    return f"<img class='{css}' alt='{html.escape(alt)}' src='data:image/jpeg;base64,{data}'>"


def classification_sheet(examples: list[dict]) -> str:
    """Held-out images, each with its true class and its top-5 predictions (hit in green)."""
    figures = []
    for ex in examples:
        preds = "".join(
            f"<li class='{'hit' if name == ex['label'] else 'miss'}'>{html.escape(name)} {100 * p:.0f}%</li>"
            for name, p in ex["top5"]
        )
        figures.append(f"<figure class='example'>{_image(ex['image'], ex['id'])}<figcaption>true: "
                       f"<b>{html.escape(ex['label'])}</b><ol class='top5'>{preds}</ol></figcaption></figure>")  # fmt: skip
    return "<div class='sheet'>" + "".join(figures) + "</div>"


def retrieval_sheet(examples: list[dict]) -> str:
    """Caption queries with their top matching images (the caption's own image framed in green)."""
    rows = []
    for ex in examples:
        images = "".join(
            _image(m["image"], m["id"], "correct" if m["correct"] else "") for m in ex["matches"]
        )
        rows.append(f"<div class='query'><p>&ldquo;{html.escape(ex['caption'])}&rdquo;</p>{images}</div>")
    return "".join(rows)


def data_table(data: dict[str, Any]) -> str:
    """One row per evaluation set: images in, used, dropped by reason."""
    rows = []
    for name, info in data.items():
        dropped = ", ".join(f"{k} {v}" for k, v in (info.get("dropped") or {}).items()) or "none"
        rows.append([name, info.get("source", ""), info.get("n_in", ""), info.get("n_used", ""), dropped])
    return _table(["set", "source", "images in", "used", "dropped (reason count)"], rows, "data")


def write_html(results: dict[str, Any], plots: dict[str, Path], path: Path) -> Path:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>CLIP evaluation</title><style>{STYLE}</style>"
        "</head><body>",
        f"<h1>CLIP evaluation</h1><p>checkpoint: <code>{html.escape(str(results.get('checkpoint', '')))}</code></p>",
        _table(
            [*COLUMNS[:2], "value (%)", "chance (%)", COLUMNS[4]],
            [list(r) for r in summary_rows(results)],
            "metrics",
        ),  # fmt: skip
    ]
    for title, png in plots.items():
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    zs, rt = results.get("zero_shot") or {}, results.get("retrieval") or {}
    if zs and len(zs["class_names"]) > MATRIX_MAX_CLASSES:
        parts.append(f"<h2>zero-shot top confusions</h2><p>{len(zs['class_names'])} classes: the matrix would "
                     "be unreadable; the most frequent mistakes instead.</p>")  # fmt: skip
        parts.append(
            _table(["true", "predicted", "images", "% of true class"], top_confusions(zs), "confusions")
        )
    if zs.get("examples"):
        parts.append("<h2>zero-shot examples: top-5 predictions</h2>" + classification_sheet(zs["examples"]))
    if rt.get("examples"):
        parts.append("<h2>retrieval examples: caption → top images</h2>" + retrieval_sheet(rt["examples"]))
    parts.append("<h2>data</h2>" + data_table(results.get("data", {})))
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
