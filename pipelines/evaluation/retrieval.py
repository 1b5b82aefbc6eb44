"""Image->text and text->image recall@K with several captions per image (as on COCO/Flickr30k)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _first_hit_ranks(similarity: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """For each row, the 0-based rank of the best-ranked relevant column ([R, M] bool mask)."""
    order = similarity.argsort(dim=1, descending=True)
    hits = relevant.gather(1, order)
    # Rows always have a relevant column here, so argmax finds the first True.
    return hits.float().argmax(dim=1)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image_index: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    curve_max_k: int = 50,
) -> dict:
    """Recall@K both ways. text_image_index[t] is the image that caption t belongs to.

    image->text: an image counts as found at K when any of its captions is among the K texts most similar to
    it. text->image: a caption counts when its image is among the K most similar images.
    """
    n_img, n_txt = len(image_features), len(text_features)
    text_image_index = text_image_index.long().cpu()
    if len(text_image_index) != n_txt:
        raise ValueError(f"{n_txt} captions but {len(text_image_index)} caption->image indices")
    if n_txt and (text_image_index.min() < 0 or text_image_index.max() >= n_img):
        raise ValueError("caption->image index out of range")
    without = torch.ones(n_img, dtype=torch.bool)
    without[text_image_index] = False
    if without.any():
        raise ValueError(f"{int(without.sum())} image(s) have no caption")
    img = F.normalize(image_features.float().cpu(), dim=-1)
    txt = F.normalize(text_features.float().cpu(), dim=-1)
    sim = img @ txt.T  # [n_img, n_txt]
    relevant = text_image_index[None, :] == torch.arange(n_img)[:, None]
    i2t_rank = _first_hit_ranks(sim, relevant)
    t2i_rank = _first_hit_ranks(sim.T, relevant.T)
    result: dict = {"num_images": n_img, "num_texts": n_txt}
    for k in ks:
        result[f"image_to_text_R@{k}"] = float((i2t_rank < k).float().mean())
        result[f"text_to_image_R@{k}"] = float((t2i_rank < k).float().mean())
    max_k = min(curve_max_k, max(n_img, n_txt))
    result["curve"] = {
        "k": list(range(1, max_k + 1)),
        "image_to_text": [float((i2t_rank < k).float().mean()) for k in range(1, max_k + 1)],
        "text_to_image": [float((t2i_rank < k).float().mean()) for k in range(1, max_k + 1)],
    }
    return result
