"""Gradient caching == one big step; optimizer groups and schedule follow the paper."""

import math

import pytest
import torch

from clip_model import create_model
from pipelines.train.gradcache import FeatureModel, forward_backward
from pipelines.train.optim import build_optimizer, param_groups, warmup_cosine


def _model(name="tiny-vit"):
    torch.manual_seed(0)
    return FeatureModel(create_model(name, vocab_size=300, image_resolution=32))


def _batch(n=12):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 298, (n, 77), generator=g)
    tokens[:, 10] = 299  # end token: the largest id
    tokens[:, 11:] = 0
    return images, tokens


@pytest.mark.parametrize("accum_steps", [3, 4])
def test_gradcache_equals_one_big_step(accum_steps):
    big, cached = _model(), _model()
    images, tokens = _batch()
    loss_big, ok_big = forward_backward(big, images, tokens, accum_steps=1)
    loss_cached, ok_cached = forward_backward(cached, images, tokens, accum_steps=accum_steps)
    assert ok_big and ok_cached
    torch.testing.assert_close(loss_cached, loss_big, rtol=1e-5, atol=1e-6)
    for (name, p_big), p_cached in zip(big.named_parameters(), cached.parameters()):
        assert p_big.grad is not None, name
        torch.testing.assert_close(p_cached.grad, p_big.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The micro-batch split is not the plain accumulation of per-chunk losses (which has fewer negatives).
    plain = _model()
    for i, t in zip(images.chunk(accum_steps), tokens.chunk(accum_steps)):
        forward_backward(plain, i, t)
    assert not torch.allclose(plain.clip.logit_scale.grad, big.clip.logit_scale.grad, rtol=1e-3)


def test_gradient_checkpointing_and_cache_together_match_one_big_step():
    big, cached = _model(), _model()
    cached.clip.set_grad_checkpointing(True)
    images, tokens = _batch()
    forward_backward(big, images, tokens)
    forward_backward(cached, images, tokens, accum_steps=2)
    for (name, p_big), p_cached in zip(big.named_parameters(), cached.parameters()):
        torch.testing.assert_close(p_cached.grad, p_big.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_non_finite_loss_is_not_backpropagated():
    model = _model()
    images, tokens = _batch()
    images[0] = float("nan")
    for accum in (1, 2):
        loss, finite = forward_backward(model, images, tokens, accum_steps=accum)
        assert not finite and not torch.isfinite(loss)
        assert all(p.grad is None for p in model.parameters())


def test_weight_decay_groups_exclude_gains_biases_embeddings_and_scale():
    model = _model("tiny-rn").clip
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert "token_embedding.weight" not in decayed and "positional_embedding" not in decayed
    assert "logit_scale" not in decayed and "visual.attnpool.positional_embedding" not in decayed
    assert not any(n.endswith(".bias") or ".ln_" in n or ".bn" in n for n in decayed)
    assert "text_projection" in decayed and "visual.conv1.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


def test_warmup_then_cosine():
    f = warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


@pytest.mark.parametrize(
    "capability, precision, dtype, scaled",
    [
        ((9, 0), "auto", torch.bfloat16, False),  # H100/H200: bf16, no loss scaling
        ((8, 0), "auto", torch.bfloat16, False),  # A100
        ((7, 0), "auto", torch.float16, True),  # V100: bf16 only emulated -> fp16 + GradScaler
        ((7, 5), "auto", torch.float16, True),  # T4
        ((9, 0), "fp16", torch.float16, True),  # the paper's recipe, when asked
    ],
)
def test_precision_decisions_on_cuda_devices(monkeypatch, capability, precision, dtype, scaled):
    """The CUDA branch of the precision choice, decided on this CPU machine: the device's capability is
    faked, and so is CUDA's presence while the autocast and GradScaler objects are built (they switch
    themselves off without CUDA), but nothing runs on a GPU."""
    from pipelines.train.precision import amp_settings, auto_precision

    assert auto_precision(None) == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # autocast asks too
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    autocast, scaler = amp_settings(precision, torch.device("cuda", 0))
    context = autocast()  # built, not entered
    assert (context.device, context.fast_dtype) == ("cuda", dtype)
    assert scaler.is_enabled() == scaled


def test_precision_settings_on_cpu():
    from pipelines.train.precision import amp_settings

    cpu = torch.device("cpu")
    autocast, scaler = amp_settings("fp16", cpu)  # no GPU: fp32, no loss scaling
    assert not scaler.is_enabled()
    with autocast():
        assert not torch.is_autocast_enabled("cpu")
    autocast, scaler = amp_settings("bf16", cpu)
    model = _model()
    images, tokens = _batch(4)
    loss, finite = forward_backward(
        model, images, tokens, accum_steps=2, autocast=autocast, scale_loss=scaler.scale
    )
    assert finite and all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
