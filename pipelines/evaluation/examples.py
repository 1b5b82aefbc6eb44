"""Example sheets for the report: a few held-out images with their top-5 zero-shot predictions, and a few
retrieval queries with their top matching images, as small JPEG thumbnails (base64) beside the labels."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Sequence

import torch
from PIL import Image

from .data import EvalSet, expand_unit
from .embed import EmbeddedSet


def thumbnail(jpg: bytes, size: int = 112) -> str:
    """A base64 JPEG of at most `size` px a side ("" for bytes Pillow cannot read)."""
    try:
        with Image.open(io.BytesIO(jpg)) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except Exception:  # the example sheet shows an empty frame rather than failing the report
        return ""
    return base64.b64encode(buf.getvalue()).decode()


def images_by_id(eval_set: EvalSet, ids: Iterable[str]) -> dict[str, bytes]:
    """The bytes of the given image ids: file units directly, shard units scanned until all are found."""
    wanted, found = set(ids), {}
    for unit in eval_set.units:
        if unit.get("kind") == "file" and unit.get("id") not in wanted:
            continue
        for record in expand_unit(unit):
            if str(record["id"]) in wanted:
                found[str(record["id"])] = record["jpg"]
        if len(found) == len(wanted):
            break
    return found


def spread(labels: Sequence[int], n: int) -> list[int]:
    """Up to `n` row indices, one class after another (first rows of each class), so the sheet shows many."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    picked, depth = [], 0
    while len(picked) < n and any(depth < len(rows) for rows in by_class.values()):
        picked += [rows[depth] for _, rows in sorted(by_class.items()) if depth < len(rows)]
        depth += 1
    return picked[:n]


def classification_examples(
    eval_set: EvalSet, embedded: EmbeddedSet, logits: torch.Tensor, class_names: Sequence[str], n: int = 12
) -> list[dict]:
    """`n` held-out images (spread over classes) with their true class and top-5 predictions (probabilities)."""
    rows = spread(embedded.labels.tolist(), n)
    probs = logits.float().softmax(dim=-1)
    top = probs.topk(min(5, probs.shape[1]), dim=-1)
    images = images_by_id(eval_set, [embedded.ids[i] for i in rows])
    return [
        {
            "id": embedded.ids[i],
            "image": thumbnail(images.get(embedded.ids[i], b"")),
            "label": class_names[int(embedded.labels[i])],
            "top5": [
                [class_names[int(c)], round(float(p), 4)] for p, c in zip(top.values[i], top.indices[i])
            ],
        }
        for i in rows
    ]


def retrieval_examples(eval_set: EvalSet, embedded: EmbeddedSet, n: int = 6, k: int = 4) -> list[dict]:
    """`n` caption queries (of different images) with their top-`k` images; `correct` marks the caption's own."""
    first_caption: dict[int, int] = {}
    for t, image in enumerate(embedded.text_image_index.tolist()):
        first_caption.setdefault(image, t)
    queries = [first_caption[i] for i in sorted(first_caption)[:n]]
    image_f = torch.nn.functional.normalize(embedded.image_features.float(), dim=-1)
    text_f = torch.nn.functional.normalize(embedded.text_features[queries].float(), dim=-1)
    top = (text_f @ image_f.T).topk(min(k, len(embedded.ids)), dim=-1).indices
    images = images_by_id(eval_set, {embedded.ids[int(i)] for row in top for i in row})
    return [
        {
            "caption": embedded.captions[t],
            "matches": [
                {
                    "id": embedded.ids[int(i)],
                    "image": thumbnail(images.get(embedded.ids[int(i)], b"")),
                    "correct": int(i) == int(embedded.text_image_index[t]),
                }  # fmt: skip
                for i in row
            ],
        }
        for t, row in zip(queries, top)
    ]
