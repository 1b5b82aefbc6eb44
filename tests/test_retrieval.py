"""Recall@K on constructed features whose rankings are worked out by hand."""

import pytest
import torch

from pipelines.evaluation.retrieval import retrieval_metrics


def unit(angle_deg):
    a = torch.tensor(angle_deg) * torch.pi / 180
    return torch.stack([torch.cos(a), torch.sin(a)])


def test_recall_at_k_equals_hand_computed():
    # Three images on the unit circle at 0, 120, 240 degrees; five captions, several per image.
    images = torch.stack([unit(0.0), unit(120.0), unit(240.0)]) * torch.tensor([[2.0], [1.0], [3.0]])
    captions = torch.stack([unit(a) for a in (10.0, 100.0, 130.0, 250.0, 60.0)])
    owner = torch.tensor([0, 0, 1, 2, 2])  # caption 4 (60 deg) belongs to image 2 but lies between 0 and 1
    m = retrieval_metrics(images, captions, owner, ks=(1, 2, 3))
    # image -> text: image 0 ranks [10, 60, 100, ...]: caption 0 first -> hit@1.
    # image 1 (120) ranks [130, 100, 60, ...] -> caption 2 (its own) first -> hit@1.
    # image 2 (240) ranks [250 (own), ...] -> hit@1. So all 1.0.
    assert m["image_to_text_R@1"] == 1.0
    # text -> image: caption 0 (10) -> image 0 first: hit@1. caption 1 (100) -> image 1 (20 away) first,
    # its own image 0 (100 away) second: hit@2. caption 2 (130) -> image 1: hit@1. caption 3 (250) ->
    # image 2: hit@1. caption 4 (60): image 0 and 1 are 60 away, image 2 is 180 away: rank 3 -> hit@3.
    assert m["text_to_image_R@1"] == pytest.approx(3 / 5)
    assert m["text_to_image_R@2"] == pytest.approx(4 / 5)
    assert m["text_to_image_R@3"] == 1.0
    assert m["curve"]["k"][:3] == [1, 2, 3]
    assert m["curve"]["text_to_image"][:3] == pytest.approx([0.6, 0.8, 1.0])


def test_random_features_give_recall_near_k_over_n():
    g = torch.Generator().manual_seed(0)
    n = 200
    images = torch.randn(n, 32, generator=g)
    texts = torch.randn(n * 2, 32, generator=g)
    owner = torch.arange(n).repeat_interleave(2)
    m = retrieval_metrics(images, texts, owner, ks=(10,))
    assert abs(m["text_to_image_R@10"] - 10 / n) < 0.04
    # Perfect features: each caption equals its image -> recall@1 = 1 both ways.
    m = retrieval_metrics(images, images[owner], owner, ks=(1,))
    assert m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == 1.0


def test_bad_index_is_a_clear_error():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(x, torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        retrieval_metrics(x, torch.randn(3, 4), torch.tensor([0, 1, 3]))
