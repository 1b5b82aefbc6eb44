"""The filter report under `{output}/report/`: the score histogram with the cut, contact sheets of the
lowest and highest scoring pairs (thumbnail, caption, score), example duplicate pairs, the funnel; PNGs and
one self-contained HTML page (like pipelines/evaluation/report.py). Written locally, then copied when the
output is s3://. Thumbnails are read from the few shards that hold the shown keys."""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
import textwrap
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import contextlib

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines import datasets, storage  # noqa: E402


def _shard_uris(cfg) -> dict[str, str]:
    return {datasets.shard_name(u): u for u in datasets.list_shards(cfg.data_uri, cfg.data_format)}


def fetch_pairs(cfg, wanted: list[dict]) -> dict[str, tuple[bytes | None, str]]:
    """{key: (jpg, caption)} for the (key, shard) items of `wanted`, reading each shard once."""
    uris, out = _shard_uris(cfg), {}
    for shard in sorted({w["shard"] for w in wanted}):
        keys = {w["key"] for w in wanted if w["shard"] == shard}
        try:
            rows = datasets.read_rows(uris[shard])
        except (OSError, KeyError, datasets.DatasetError):
            continue
        for k, jpg, txt in zip(rows["key"], rows["jpg"], rows["txt"]):
            if k in keys:
                out[k] = (jpg, txt or "")
    return out


def _thumb(ax, jpg: bytes | None, title: str) -> None:
    ax.axis("off")
    if jpg:
        with contextlib.suppress(OSError):
            ax.imshow(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")))
    ax.set_title(title, fontsize=7)


def contact_sheet(items: list[dict], pairs: dict, path: Path, title: str) -> Path:
    cols = 6
    rows = max(1, (len(items) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, it in zip(axes.ravel(), items):
        jpg, caption = pairs.get(it["key"], (None, ""))
        head = it.get("label") or f"{it['score']:.3f}"
        _thumb(ax, jpg, f"{head}\n" + "\n".join(textwrap.wrap(caption, 28)[:3]))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def score_histogram(hist: np.ndarray, cut_value: float, path: Path) -> Path:
    edges = np.linspace(-1, 1, len(hist) + 1)
    nz = np.nonzero(hist)[0]
    lo, hi = (edges[nz[0]], edges[nz[-1] + 1]) if len(nz) else (-1, 1)
    coarse = 60  # re-binned for display
    centres = (edges[:-1] + edges[1:]) / 2
    counts, bins = np.histogram(centres, bins=coarse, range=(lo, hi), weights=hist)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(bins[:-1], counts, width=np.diff(bins), align="edge", color="#4c72b0")
    if np.isfinite(cut_value):
        ax.axvline(cut_value, color="red", label=f"cut {cut_value:.3f}")
        ax.legend()
    ax.set_xlabel("image-text cosine")
    ax.set_ylabel("pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plots(cfg, summary, cut, dups: list[dict], out: Path) -> dict[str, Path]:
    low, high = summary.extremes[:6], summary.extremes[-6:][::-1]
    dup_items = [{"key": d["key"], "shard": d["shard"]} for d in dups[:6]]
    wanted = low + high + dup_items + [{"key": d["dup_of"], "shard": d["dup_shard"]} for d in dups[:6]]
    pairs = fetch_pairs(cfg, wanted)
    plots = {
        "score histogram": score_histogram(summary.hist, cut.threshold, out / "score_histogram.png"),
        "lowest scores": contact_sheet(low, pairs, out / "lowest.png", "lowest scoring pairs"),
        "highest scores": contact_sheet(high, pairs, out / "highest.png", "highest scoring pairs"),
    }
    if dups:
        shown = []
        for d in dups[:6]:
            shown += [{"key": d["dup_of"], "label": "kept"}, {"key": d["key"], "label": "dropped: duplicate"}]
        plots["duplicates"] = contact_sheet(shown, pairs, out / "duplicates.png", "kept | dropped duplicate")
    return plots


def _html(stats: dict, plots: dict[str, Path], path: Path) -> None:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>CLIP filter</title></head><body>"]
    parts.append(
        "<h1>CLIP filter</h1><h2>funnel</h2><table border=1><tr><th>stage</th><th>in</th><th>out</th><th>dropped</th></tr>"
    )
    for stage, e in stats["stages"].items():
        drops = ", ".join(f"{k}: {v}" for k, v in e["dropped"].items()) or "-"
        parts.append(
            f"<tr><td>{stage}</td><td>{e['in']}</td><td>{e['out']}</td><td>{html.escape(drops)}</td></tr>"
        )
    parts.append("</table>")
    for title, png in plots.items():
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    parts.append(
        f"<h2>stats</h2><pre>{html.escape(json.dumps(stats, indent=1, default=str))}</pre></body></html>"
    )
    path.write_text("\n".join(parts))


def write_report(cfg, summary, cut, dups: list[dict], stats: dict) -> str:
    """Writes the report; returns where report.html is."""
    target = storage.join(cfg.output, "report")
    with tempfile.TemporaryDirectory(prefix="filter_report_") as tmp:
        out = Path(tmp)
        plots = _plots(cfg, summary, cut, dups, out)
        _html(stats, plots, out / "report.html")
        for f in out.iterdir():
            storage.write_bytes_atomic(storage.join(target, f.name), f.read_bytes())
    return storage.join(target, "report.html")
