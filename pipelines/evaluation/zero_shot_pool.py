"""Zero-shot classification where the model runs: with Ray, the classifier's prompts and the images are
embedded by actor pools of the same shape (`embed.actor_pool`: one GPU per actor on a GPU cluster), not on
the driver.

At ImageNet's size (1,000 classes x 80 templates, 50,000 images) the driver holds the [D, C] class matrix and
streamed counts, nothing per prompt or per image:
- `ClassEmbedder` turns a batch of class names into their prompt-ensemble vectors inside an actor (the same
  arithmetic as the in-process classifier, clip_model.zero_shot.class_embeddings), so only C x D floats reach
  the driver, not C x T x D;
- `ZeroShotScorer` embeds a batch of images and scores it against the class matrix inside an actor; only the
  top-k class indices, the label and the drop reason of each image leave it, and the driver folds them into a
  `TopKTally` batch by batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from clip_model.zero_shot import class_embeddings, zero_shot_logits

from .data import EvalDataError, EvalSet
from .embed import EmbedOptions, ImageEmbedder, TextEmbedder, _record_rows, actor_pool
from .zero_shot_eval import TopKTally


class ClassEmbedder:
    """Batch {"label" [n] int, "name" [n] str} -> {"label", "features" [n, D] float32}: each class's
    normalised mean over the templates' normalised text features."""

    def __init__(
        self, model_source, tokenizer, templates: Sequence[str], device: str = "auto", batch_size: int = 256
    ):
        self.text = TextEmbedder(
            model_source, tokenizer, device
        )  # loads the model and tokenizer once per actor
        self.templates = list(templates)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        device = self.text.device
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            feats = class_embeddings(
                self.text.model,
                self.text.tokenizer,
                [str(n) for n in batch["name"]],
                self.templates,
                self.batch_size,
                device,
            )
        return {"label": np.asarray(batch["label"]), "features": feats.numpy()}


class ZeroShotScorer:
    """Batch {"id", "jpg", "label"} -> {"label", "ok", "reason", "topk" [n, k] int64}: images embedded and
    scored against the [D, C] classifier in the actor (rows that are not ok carry zeros in `topk`)."""

    def __init__(
        self, model_source, weights: np.ndarray, k: int, image_size: int | None = None, device: str = "auto"
    ):
        self.images = ImageEmbedder(model_source, image_size, device)
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float32)).to(self.images.device)
        self.k = k

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.images(batch)
        feats = torch.from_numpy(out["features"]).to(self.images.device)
        topk = zero_shot_logits(feats, self.weights).topk(self.k, dim=-1).indices.cpu().numpy()
        return {
            "label": out["label"],
            "ok": out["ok"],
            "reason": out["reason"],
            "topk": topk.astype(np.int64),
        }


def pool_classifier(
    model_source: str,
    tokenizer: str,
    class_names: Sequence[str],
    templates: Sequence[str],
    opts: EmbedOptions,
) -> torch.Tensor:
    """The [D, C] classifier, its C x T prompts embedded by the actor pool. `model_source` and `tokenizer` are
    paths (local or s3://) each actor loads itself."""
    import ray

    # A batch holds whole classes (a class's templates are averaged inside one call): about batch_size prompts.
    classes_per_batch = max(1, opts.batch_size // len(templates))
    ds = ray.data.from_items([{"label": i, "name": n} for i, n in enumerate(class_names)])
    ds = ds.map_batches(
        ClassEmbedder,
        fn_constructor_kwargs={
            "model_source": model_source,
            "tokenizer": tokenizer,
            "templates": list(templates),
            "device": opts.device,
            "batch_size": opts.batch_size,
        },
        batch_size=classes_per_batch,
        batch_format="numpy",
        **actor_pool(opts),
    )
    rows: np.ndarray | None = None
    seen = np.zeros(len(class_names), dtype=bool)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        if rows is None:
            rows = np.zeros((len(class_names), batch["features"].shape[1]), dtype=np.float32)
        rows[batch["label"]] = batch["features"]
        seen[batch["label"]] = True
    if rows is None or not seen.all():
        raise RuntimeError(f"the class pool returned {int(seen.sum())} of {len(class_names)} classes")
    return torch.from_numpy(rows).T.contiguous()


@dataclass
class PoolScore:
    """What the driver keeps of a pool-scored set: the metrics and the counts."""

    result: dict
    n_in: int
    dropped: dict[str, int] = field(default_factory=dict)


def _fold(tally: TopKTally, batch: Mapping[str, np.ndarray], dropped: dict[str, int]) -> int:
    """Adds one scored batch to the tally and its drops to `dropped`; returns the batch's row count."""
    ok = np.asarray(batch["ok"], dtype=bool)
    labels = np.asarray(batch["label"], dtype=np.int64)
    for reason in batch["reason"][~ok]:
        reason = str(reason) or "unreadable_image"
        dropped[reason] = dropped.get(reason, 0) + 1
    unknown = int((ok & (labels < 0)).sum())
    if unknown:
        dropped["unknown_label"] = dropped.get("unknown_label", 0) + unknown
    keep = ok & (labels >= 0)
    tally.add(torch.from_numpy(np.asarray(batch["topk"])[keep]), torch.from_numpy(labels[keep]))
    return len(ok)


def score_with_pool(
    eval_set: EvalSet,
    model_source: str,
    weights: torch.Tensor,
    opts: EmbedOptions,
    image_size: int | None = None,
) -> PoolScore:
    """Zero-shot metrics of a labelled set, images embedded and scored by the actor pool; the driver streams
    the per-batch predictions into a TopKTally (memory independent of the number of images)."""
    import ray

    tally = TopKTally(eval_set.class_names)
    ds = ray.data.from_items(eval_set.units).flat_map(_record_rows(eval_set))
    ds = ds.map_batches(
        ZeroShotScorer,
        fn_constructor_kwargs={
            "model_source": model_source,
            "weights": weights.numpy(),
            "k": tally.k,
            "image_size": image_size,
            "device": opts.device,
        },
        batch_size=opts.batch_size,
        batch_format="numpy",
        **actor_pool(opts),
    )
    dropped = dict(eval_set.dropped)
    n_in = sum(eval_set.dropped.values())
    for batch in ds.iter_batches(batch_format="numpy"):
        n_in += _fold(tally, batch, dropped)
    if tally.n == 0:
        raise EvalDataError(f"{eval_set.source}: no readable, labelled image (dropped: {dropped})")
    return PoolScore(tally.result(), n_in, dropped)
