"""OpenAI-layout checkpoints: configuration inferred from weights, fp32/fp16 round trips through files,
TorchScript archives, and errors that name the offending keys."""

import io
import os

import pytest
import torch
import torch.nn.functional as F

import clip_model
from clip_model.checkpoint import CheckpointError, infer_config, save_openai_checkpoint, to_openai_state_dict

VOCAB = 1000  # a small trained vocabulary keeps these tests fast; the loader infers it from the weights
SOT, EOT = VOCAB - 2, VOCAB - 1


pytestmark = pytest.mark.usefixtures("single_thread")


def trained_like(name: str, seed: int = 0) -> clip_model.CLIP:
    """A tiny model whose every weight and BatchNorm statistic differs from its initial value, so that a
    round trip that dropped or mixed up any tensor would show in the embeddings."""
    torch.manual_seed(seed)
    model = clip_model.create_model(name, vocab_size=VOCAB)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif key.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif tensor.is_floating_point() and key != "logit_scale":
                tensor.add_(torch.randn_like(tensor) * 0.05)
    return model.eval()


def inputs(config, n: int = 3):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, config.image_resolution, config.image_resolution, generator=generator)
    tokens = torch.zeros(n, config.context_length, dtype=torch.long)
    for i in range(n):
        tokens[i, : 3 + i] = torch.randint(1, SOT, (3 + i,), generator=generator)
        tokens[i, 0], tokens[i, 3 + i] = SOT, EOT
    return images, tokens


def embeddings(model, config):
    images, tokens = inputs(config)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.parametrize("name", clip_model.available_models())
def test_config_is_inferred_from_weights_alone(name):
    model = clip_model.create_model(name, device="meta")
    assert infer_config(model.state_dict()) == clip_model.get_config(name)


@pytest.mark.parametrize("name", ["tiny-rn", "tiny-vit"])
def test_fp32_round_trip_through_a_file_is_exact(tmp_path, name):
    model = trained_like(name)
    path = tmp_path / "model.pt"
    save_openai_checkpoint(model, path, dtype=torch.float32)
    assert os.listdir(tmp_path) == ["model.pt"]
    loaded = clip_model.load(path)
    assert loaded.config == model.config
    assert not loaded.training
    for a, b in zip(embeddings(model, model.config), embeddings(loaded, loaded.config)):
        assert torch.equal(a, b)
    assert torch.equal(loaded.logit_scale, model.logit_scale)


@pytest.mark.parametrize("name", ["tiny-rn", "tiny-vit"])
def test_fp16_round_trip_is_close(tmp_path, name):
    model = trained_like(name)
    state_dict = to_openai_state_dict(model)  # fp16 is the default, as OpenAI's release
    floats = [v for v in state_dict.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert all(v.dtype == torch.int64 for v in state_dict.values() if not v.is_floating_point())
    torch.save(state_dict, tmp_path / "fp16.pt")
    loaded = clip_model.load(tmp_path / "fp16.pt")
    assert loaded.config == model.config and loaded.dtype == torch.float32
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert not any(t.is_meta for t in tensors)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.attn_mask, model.attn_mask)
    for a, b in zip(embeddings(model, model.config), embeddings(loaded, loaded.config)):
        assert F.cosine_similarity(a, b).min() > 0.999
        assert not torch.equal(a, b)  # it did go through fp16


def test_torchscript_archive_with_openai_attributes_loads(tmp_path):
    model = trained_like("tiny-vit")
    config = model.config
    # OpenAI's archives carry these scalars in their state dict; build_model deletes them.
    del model.context_length, model.vocab_size  # plain attributes here, buffers in OpenAI's archives
    model.register_buffer("input_resolution", torch.tensor(config.image_resolution))
    model.register_buffer("context_length", torch.tensor(config.context_length))
    model.register_buffer("vocab_size", torch.tensor(config.vocab_size))
    images, tokens = inputs(config)
    traced = torch.jit.trace(model, (images, tokens), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, path)
    assert "input_resolution" in torch.jit.load(path).state_dict()

    loaded = clip_model.load(path)
    assert loaded.config == config
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
        torch.testing.assert_close(loaded(images, tokens)[0], traced(images, tokens)[0])


def test_torchscript_resnet_archive_loads_from_a_file_object(tmp_path):
    model = trained_like("tiny-rn")
    images, tokens = inputs(model.config)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, (images, tokens), check_trace=False), buffer)
    buffer.seek(0)
    loaded = clip_model.load(buffer)
    assert loaded.config == model.config
    for a, b in zip(embeddings(model, model.config), embeddings(loaded, loaded.config)):
        torch.testing.assert_close(a, b)


def test_in_memory_and_wrapped_state_dicts_load():
    model = trained_like("tiny-rn")
    state_dict = to_openai_state_dict(model, torch.float32)
    wrapped = {
        "epoch": 3,
        "state_dict": {f"module.{k}": v for k, v in state_dict.items()},
    }  # open_clip training
    without_counters = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    expected = embeddings(model, model.config)
    for source in (state_dict, wrapped, without_counters):
        loaded = clip_model.load(source)
        for a, b in zip(expected, embeddings(loaded, loaded.config)):
            assert torch.equal(a, b)


def test_wrong_shapes_missing_and_unexpected_keys_are_named():
    state_dict = to_openai_state_dict(clip_model.create_model("tiny-vit", vocab_size=VOCAB), torch.float32)
    state_dict["transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(128, 512)  # transposed
    del state_dict["visual.ln_post.bias"]
    state_dict["visual.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as info:
        clip_model.load(state_dict)
    message = str(info.value)
    assert "transformer.resblocks.1.mlp.c_fc.weight: expected (512, 128), got (128, 512)" in message
    assert "missing keys ['visual.ln_post.bias']" in message
    assert "unexpected keys ['visual.extra_head.weight']" in message


def test_keys_needed_to_infer_the_config_are_named():
    state_dict = to_openai_state_dict(clip_model.create_model("tiny-rn", vocab_size=VOCAB), torch.float32)
    del state_dict["text_projection"]
    with pytest.raises(CheckpointError, match="text_projection"):
        clip_model.load(state_dict)
    with pytest.raises(CheckpointError, match="visual.layer1.0.conv1.weight"):
        clip_model.load(
            {"text_projection": torch.zeros(2, 2), "positional_embedding": torch.zeros(2, 2)}
            | {"token_embedding.weight": torch.zeros(2, 2), "ln_final.weight": torch.zeros(2)}
        )


def test_a_file_that_is_not_a_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="neither a state-dict file nor a TorchScript archive"):
        clip_model.load(path)


def test_heads_that_the_layout_cannot_carry_are_refused():
    model = clip_model.create_model(
        "tiny-vit", device="meta", transformer_heads=4
    )  # width 128 -> loaders infer 2 heads
    with pytest.raises(ValueError, match="transformer_heads=4"):
        to_openai_state_dict(model)
