"""clip_loss: 2 gloo processes (local rows, gathered columns) == one process on the concatenated batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from clip_model.loss import clip_loss

WORLD, LOCAL_BATCH, DIM = 2, 6, 16


class TwoTower(nn.Module):
    """Stand-in for CLIP's two encoders: enough parameters to check every gradient path."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, DIM))
        self.token_embedding = nn.Embedding(50, 24)
        self.text = nn.Linear(24, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def forward(self, images, tokens):
        return self.image(images), self.text(self.token_embedding(tokens).mean(1)), self.logit_scale.exp()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * LOCAL_BATCH, 12, generator=g), torch.randint(
        0, 50, (WORLD * LOCAL_BATCH, 7), generator=g
    )


def _model():
    torch.manual_seed(0)
    return TwoTower()


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        images, tokens = _batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        loss = clip_loss(*model(images[rows], tokens[rows]))
        loss.backward()
        for p in model.parameters():  # what DDP does: average gradients over ranks
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        total = loss.detach().clone()
        dist.all_reduce(total)
        torch.save(
            {"loss": total / WORLD, "grads": {n: p.grad for n, p in model.named_parameters()}},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_loss_and_grads_match_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    model = _model()
    loss = clip_loss(*model(*_batch()))
    loss.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-7)
        for name, p in model.named_parameters():
            assert p.grad.abs().sum() > 0, name
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_single_process_matches_reference_formula():
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = torch.tensor(10.0)
    i, t = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    logits = scale * i @ t.t()
    labels = torch.arange(5)
    expected = (
        nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.t(), labels)
    ) / 2
    torch.testing.assert_close(clip_loss(img, txt, scale), expected)
    # Scale-invariant inputs: features are normalised inside.
    torch.testing.assert_close(clip_loss(3 * img, 0.5 * txt, scale), expected)
    # Perfectly aligned, well-separated pairs give a near-zero loss.
    eye = torch.eye(5, 8)
    assert clip_loss(eye, eye, 100.0) < 1e-6


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        clip_loss(torch.randn(4, 8), torch.randn(3, 8), 1.0)


def _reference_loss_float64(img, txt, scale):
    """The paper's pseudo-code in numpy float64 (no torch): an oracle independent of clip_loss."""
    import numpy as np

    i = img / np.linalg.norm(img, axis=1, keepdims=True)
    t = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = scale * i @ t.T

    def ce(rows):
        rows = rows - rows.max(axis=1, keepdims=True)
        log_softmax = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return -np.diag(log_softmax).mean()

    return (ce(logits) + ce(logits.T)) / 2


def test_float64_features_keep_float64_precision():
    g = torch.Generator().manual_seed(5)
    img = torch.randn(7, 33, generator=g, dtype=torch.float64)
    txt = torch.randn(7, 33, generator=g, dtype=torch.float64)
    scale = torch.tensor(100.0 / 3, dtype=torch.float64)
    loss = clip_loss(img, txt, scale)
    assert loss.dtype == torch.float64
    expected = _reference_loss_float64(img.numpy(), txt.numpy(), scale.item())
    # float32 arithmetic is ~1e-7 away from the float64 reference; float64 agrees to ~1e-15.
    assert abs(loss.item() - expected) < 1e-12
    assert abs(clip_loss(img, txt, scale.item()).item() - expected) < 1e-12


def test_half_precision_is_computed_in_float32():
    g = torch.Generator().manual_seed(6)
    img, txt = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        loss = clip_loss(img.to(dtype), txt.to(dtype), torch.tensor(20.0, dtype=dtype))
        assert loss.dtype == torch.float32
        expected = clip_loss(
            img.to(dtype).float(), txt.to(dtype).float(), torch.tensor(20.0, dtype=dtype).float()
        )
        torch.testing.assert_close(loss, expected)
