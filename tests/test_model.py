"""The CLIP architectures: sizes of the released models, OpenAI's key names, initialisation, masking,
fp32 LayerNorm under autocast, gradient checkpointing. Large models only ever live on the meta device."""

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clip_model
from clip_model.model import (
    CLIP,
    AttentionPool2d,
    Bottleneck,
    LayerNorm,
    ModifiedResNet,
    QuickGELU,
    VisionTransformer,
)
from clip_model.summary import main as summary_main
from clip_model.summary import summarize

RELEASED = [
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
    "ViT-B/32",
    "ViT-B/16",
    "ViT-L/14",
    "ViT-L/14@336px",
]


pytestmark = pytest.mark.usefixtures("single_thread")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def meta_models() -> dict[str, CLIP]:
    return {name: clip_model.create_model(name, device="meta") for name in RELEASED}


def test_available_models_uses_openai_spelling():
    assert clip_model.available_models() == RELEASED + ["tiny-vit", "tiny-rn"]


@pytest.mark.parametrize(
    "name, expected",
    [("RN50", 102_007_137), ("RN101", 119_688_033), ("ViT-B/32", 151_277_313), ("ViT-B/16", 149_620_737)],
)
def test_parameter_counts_match_released_models_exactly(meta_models, name, expected):
    model = meta_models[name]
    assert all(p.is_meta for p in model.parameters())
    assert n_params(model) == expected


@pytest.mark.parametrize(
    "name, millions",
    [
        ("RN50x4", 178.30),
        ("RN50x16", 290.98),
        ("RN50x64", 623.26),
        ("ViT-L/14", 427.62),
        ("ViT-L/14@336px", 427.94),
    ],
)
def test_parameter_counts_of_larger_models(meta_models, name, millions):
    assert n_params(meta_models[name]) / 1e6 == pytest.approx(millions, abs=0.01)


def test_text_encoder_is_about_63m_at_width_512(meta_models):
    model = meta_models["ViT-B/32"]
    text = n_params(model) - n_params(model.visual) - 1  # minus logit_scale
    assert text == 63_428_096
    assert n_params(model.transformer) == 37_828_608  # 12 blocks of 12 * 512**2 + 13 * 512 parameters
    assert model.token_embedding.weight.shape == (49408, 512)
    assert model.positional_embedding.shape == (77, 512)


def _text_keys(layers: int) -> set[str]:
    keys = {"positional_embedding", "text_projection", "logit_scale", "token_embedding.weight"}
    keys |= {"ln_final.weight", "ln_final.bias"}
    for i in range(layers):
        keys |= _block_keys(f"transformer.resblocks.{i}.")
    return keys


def _block_keys(prefix: str) -> set[str]:
    names = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]
    names += ["ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight"]
    names += ["mlp.c_proj.bias", "ln_2.weight", "ln_2.bias"]
    return {prefix + n for n in names}


def _bn(prefix: str) -> set[str]:
    return {f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def test_rn50_state_dict_keys_are_openai_keys(meta_models):
    expected = _text_keys(12)
    for i in (1, 2, 3):
        expected |= {f"visual.conv{i}.weight"} | _bn(f"visual.bn{i}")
    for stage, blocks in zip((1, 2, 3, 4), (3, 4, 6, 3)):
        for b in range(blocks):
            p = f"visual.layer{stage}.{b}"
            for i in (1, 2, 3):
                expected |= {f"{p}.conv{i}.weight"} | _bn(f"{p}.bn{i}")
        expected |= {f"visual.layer{stage}.0.downsample.0.weight"} | _bn(
            f"visual.layer{stage}.0.downsample.1"
        )
    expected.add("visual.attnpool.positional_embedding")
    expected |= {f"visual.attnpool.{p}_proj.{s}" for p in "qkvc" for s in ("weight", "bias")}

    state_dict = meta_models["RN50"].state_dict()
    assert set(state_dict) == expected
    assert state_dict["visual.conv1.weight"].shape == (32, 3, 3, 3)
    assert state_dict["visual.attnpool.positional_embedding"].shape == (50, 2048)
    assert state_dict["visual.attnpool.c_proj.weight"].shape == (1024, 2048)
    assert state_dict["text_projection"].shape == (512, 1024)


def test_vit_b32_state_dict_keys_are_openai_keys(meta_models):
    expected = _text_keys(12)
    expected |= {
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.proj",
        "visual.conv1.weight",
    }
    expected |= {"visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias"}
    for i in range(12):
        expected |= _block_keys(f"visual.transformer.resblocks.{i}.")

    state_dict = meta_models["ViT-B/32"].state_dict()
    assert set(state_dict) == expected
    assert len(state_dict) == 302  # OpenAI's file has 305: + input_resolution, context_length, vocab_size
    shapes = {
        "visual.conv1.weight": (768, 3, 32, 32),
        "visual.class_embedding": (768,),
        "visual.positional_embedding": (50, 768),
        "visual.proj": (768, 512),
        "transformer.resblocks.0.attn.in_proj_weight": (1536, 512),
        "token_embedding.weight": (49408, 512),
        "text_projection": (512, 512),
        "logit_scale": (),
    }
    for key, shape in shapes.items():
        assert tuple(state_dict[key].shape) == shape, key


def test_resnet_uses_three_conv_stem_antialiased_strides_and_attention_pool(meta_models):
    visual = meta_models["RN50"].visual
    assert isinstance(visual, ModifiedResNet)
    assert [visual.conv1.stride, visual.conv2.stride, visual.conv3.stride] == [(2, 2), (1, 1), (1, 1)]
    assert isinstance(visual.avgpool, torch.nn.AvgPool2d)
    blocks = [m for m in visual.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    # Every conv inside the stages has stride 1; downsampling is done by average pooling.
    for block in blocks:
        for conv in (block.conv1, block.conv2, block.conv3):
            assert conv.stride == (1, 1)
    strided = [b for b in blocks if isinstance(b.avgpool, torch.nn.AvgPool2d)]
    assert len(strided) == 3
    for block in strided:
        assert isinstance(block.downsample[0], torch.nn.AvgPool2d)  # the pool named "-1" comes first
        assert block.downsample[1].stride == (1, 1)
    assert isinstance(visual.attnpool, AttentionPool2d)
    assert visual.attnpool.num_heads == 32  # width * 32 // 64


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        clip_model.create_model("ViT-H/14")
    for name in clip_model.available_models():
        assert name in str(info.value)


def test_overrides_and_unknown_override_field():
    model = clip_model.create_model("tiny-vit", vocab_size=1000, embed_dim=64)
    assert model.token_embedding.num_embeddings == 1000
    assert model.encode_text(torch.zeros(1, 77, dtype=torch.long)).shape == (1, 64)
    with pytest.raises(ValueError, match="vocab_sise"):
        clip_model.get_config("tiny-vit", vocab_sise=1000)
    assert clip_model.get_config("tiny-vit").vocab_size == 49408  # overrides do not leak into the registry


def test_invalid_configurations_are_rejected():
    with pytest.raises(ValueError, match="multiple of 64"):
        clip_model.get_config("tiny-vit", vision_width=96)
    with pytest.raises(ValueError, match="patch"):
        clip_model.get_config("tiny-vit", image_resolution=60)
    with pytest.raises(ValueError, match="divisible"):
        clip_model.get_config("tiny-rn", transformer_heads=3)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_tiny_models_encode_and_train(name):
    torch.manual_seed(0)
    model = clip_model.create_model(name)
    config = model.config
    assert config.image_resolution == 64 and n_params(model) < 10_000_000
    images = torch.randn(3, 3, 64, 64)
    tokens = torch.randint(1, 1000, (3, config.context_length))
    assert model.encode_image(images).shape == (3, config.embed_dim)
    assert model.encode_text(tokens).shape == (3, config.embed_dim)
    logits_per_image, logits_per_text = model(images, tokens)
    assert logits_per_image.shape == (3, 3)
    assert torch.equal(logits_per_text, logits_per_image.t())
    expected = (
        100.0
        / 7
        * F.normalize(model.encode_image(images), dim=-1)
        @ F.normalize(model.encode_text(tokens), dim=-1).t()
    )
    torch.testing.assert_close(logits_per_image, expected, rtol=1e-4, atol=1e-4)
    F.cross_entropy(logits_per_image, torch.arange(3)).backward()
    assert model.logit_scale.grad is not None and model.token_embedding.weight.grad is not None


def test_initialisation_follows_openai(meta_models):
    torch.manual_seed(0)
    model = clip_model.create_model("tiny-rn")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.1)
    # Residual branches start at zero: the last BatchNorm of every bottleneck has zero scale.
    for block in (m for m in model.visual.modules() if isinstance(m, Bottleneck)):
        assert torch.count_nonzero(block.bn3.weight) == 0
    std = model.visual.attnpool.c_proj.in_features**-0.5
    assert model.visual.attnpool.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    width, layers = model.transformer.width, model.transformer.layers
    block = model.transformer.resblocks[0]
    assert block.attn.in_proj_weight.std().item() == pytest.approx(width**-0.5, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(width**-0.5 * (2 * layers) ** -0.5, rel=0.05)
    assert model.text_projection.std().item() == pytest.approx(width**-0.5, rel=0.1)


def test_layernorm_computes_in_fp32_under_autocast(monkeypatch):
    torch.manual_seed(0)
    ln = LayerNorm(64)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = (torch.randn(4, 64) * 3 + 100).to(torch.bfloat16)
    seen = []
    real_layer_norm = F.layer_norm

    def spy(input, *args, **kwargs):
        seen.append((input.dtype, args[1].dtype, torch.is_autocast_enabled("cpu")))
        return real_layer_norm(input, *args, **kwargs)

    monkeypatch.setattr(F, "layer_norm", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ln(x)
        out_fp32_input = ln(x.float())
    assert seen == [(torch.float32, torch.float32, False)] * 2
    assert out.dtype == torch.bfloat16 and out_fp32_input.dtype == torch.float32
    reference = real_layer_norm(x.float(), (64,), ln.weight, ln.bias, ln.eps)
    assert torch.equal(out, reference.to(torch.bfloat16))
    assert torch.equal(out_fp32_input, reference)


def test_model_runs_under_bf16_autocast():
    torch.manual_seed(0)
    model = clip_model.create_model("tiny-vit").eval()
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, 1000, (2, 77))
    with torch.no_grad():
        reference = model.encode_image(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.encode_image(images)
            text = model.encode_text(tokens)
    assert features.dtype == torch.bfloat16 and text.dtype == torch.bfloat16
    assert F.cosine_similarity(features.float(), reference).min() > 0.99


def test_text_transformer_is_causal():
    torch.manual_seed(0)
    model = clip_model.create_model("tiny-vit").eval()
    mask = model.attn_mask
    assert mask.shape == (77, 77)
    assert torch.equal(mask.isinf(), torch.ones(77, 77, dtype=torch.bool).triu(1))
    assert (mask[~mask.isinf()] == 0).all()
    x = torch.randn(77, 2, model.transformer.width)
    y = x.clone()
    y[40:] = torch.randn(37, 2, model.transformer.width)  # change only the later positions
    with torch.no_grad():
        out_x = model.transformer(x, attn_mask=model.attn_mask)
        out_y = model.transformer(y, attn_mask=model.attn_mask)
        unmasked = model.transformer(y)
    torch.testing.assert_close(out_x[:40], out_y[:40], rtol=0, atol=1e-5)
    assert not torch.allclose(out_x[40:], out_y[40:])
    assert not torch.allclose(unmasked[:40], out_y[:40])  # the mask is what makes it causal


def test_text_feature_is_taken_at_the_argmax_token():
    torch.manual_seed(0)
    model = clip_model.create_model("tiny-vit").eval()
    sot, eot = 49406, 49407
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[0, :4] = torch.tensor([sot, 5, 6, eot])
    tokens[1, :6] = torch.tensor([sot, 7, 8, 9, 10, eot])
    with torch.no_grad():
        features = model.encode_text(tokens)
        x = model.token_embedding(tokens) + model.positional_embedding
        x = model.ln_final(model.transformer(x.permute(1, 0, 2), attn_mask=model.attn_mask).permute(1, 0, 2))
        expected = torch.stack([x[0, 3], x[1, 5]]) @ model.text_projection
        padded = tokens.clone()
        padded[:, 10:] = 123  # whatever follows the end token cannot change the feature
        after_padding = model.encode_text(padded)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(after_padding, features)


def test_grad_checkpointing_gives_the_same_gradients(monkeypatch):
    import clip_model.model as model_module

    calls = []
    real_checkpoint = model_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", counting_checkpoint)
    torch.manual_seed(0)
    model = clip_model.create_model("tiny-vit")
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, 1000, (2, 77))

    def grads():
        model.zero_grad()
        logits, _ = model(images, tokens)
        F.cross_entropy(logits, torch.arange(2)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert calls == []
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert len(calls) == 8  # 4 text + 4 vision blocks
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)
    model.set_grad_checkpointing(False)
    assert not model.transformer.grad_checkpointing and not model.visual.transformer.grad_checkpointing


def test_vit_structure(meta_models):
    visual = meta_models["ViT-L/14@336px"].visual
    assert isinstance(visual, VisionTransformer)
    assert visual.conv1.bias is None and visual.conv1.stride == (14, 14)
    assert visual.positional_embedding.shape == (577, 1024)  # (336 / 14) ** 2 + 1
    assert visual.transformer.resblocks[0].attn.num_heads == 16


def test_summary_counts_and_flops(capsys):
    row = summarize("ViT-B/32")
    assert row.params == 151_277_313
    assert row.image_params + row.text_params == row.params
    # 4.41 GMACs per image and 2.98 per caption (open_clip's profile counts MACs); we count 2 FLOPs per MAC.
    assert row.image_gflops == pytest.approx(8.82, abs=0.02)
    assert row.text_gflops == pytest.approx(5.96, abs=0.02)
    assert summarize("RN50").params == 102_007_137
    summary_main(["tiny-vit", "tiny-rn"])
    out = capsys.readouterr().out
    assert "tiny-vit" in out and "tiny-rn" in out and "7,986,817" in out
    with pytest.raises(SystemExit):
        summary_main(["RN51"])


def test_attention_pool_attends_from_the_mean_token():
    torch.manual_seed(0)
    pool = AttentionPool2d(spacial_dim=2, embed_dim=16, num_heads=2, output_dim=8).eval()
    x = torch.randn(3, 16, 2, 2)
    tokens = x.flatten(2).permute(0, 2, 1)  # [N, 4, C]
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + pool.positional_embedding
    q = pool.q_proj(tokens[:, :1]).view(3, 1, 2, 8).transpose(1, 2)
    k = pool.k_proj(tokens).view(3, 5, 2, 8).transpose(1, 2)
    v = pool.v_proj(tokens).view(3, 5, 2, 8).transpose(1, 2)
    attended = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v  # [N, heads, 1, 8]
    expected = pool.c_proj(attended.transpose(1, 2).reshape(3, 16))
    with torch.no_grad():
        torch.testing.assert_close(pool(x), expected)


def test_quick_gelu_is_the_sigmoid_approximation():
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    assert not torch.allclose(QuickGELU()(x), F.gelu(x))  # the released models use this, not exact GELU
    mlp = clip_model.create_model("tiny-vit", device="meta").transformer.resblocks[0].mlp
    assert [type(m) for m in mlp] == [torch.nn.Linear, QuickGELU, torch.nn.Linear]


def _package_imports(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (any import statement, at any depth, relative or not)."""
    names = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1 or module.startswith(f"{package.name}."):
                    deps.add(module.removeprefix(f"{package.name}."))
                    deps.update(a.name for a in node.names)  # "from . import model"
        graph[name] = deps & names
    return graph


def test_clip_model_has_no_import_circle():
    graph = _package_imports(Path(clip_model.__file__).parent)
    assert "model" not in graph["configs"] and "configs" in graph["model"]  # the circle that was there

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(d == target or (d not in seen and reaches(d, target, seen | {d})) for d in graph[start])

    circles = [name for name in graph if reaches(name, name, {name})]
    assert circles == []
    assert clip_model.create_model is clip_model.factory.create_model
