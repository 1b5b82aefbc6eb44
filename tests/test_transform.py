"""Preprocessing: output sizes, OpenAI's resize/crop geometry and normalisation, seeded random crops, and
RGB conversion of every PIL mode."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model
from clip_model.transform import (
    OPENAI_MEAN,
    OPENAI_STD,
    center_crop_box,
    resized_size,
    to_rgb,
)

MEAN = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_STD).view(3, 1, 1)


def unnormalise(tensor: torch.Tensor) -> np.ndarray:
    """Back to 0..255 pixel values, [H, W, 3]."""
    return ((tensor * STD + MEAN) * 255).permute(1, 2, 0).numpy()


def column_gradient(width: int, height: int) -> Image.Image:
    """Every pixel's red value is its column index, so the output reveals where a crop was taken."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    return Image.fromarray(array)


def test_clip_mean_and_std_are_openais():
    assert OPENAI_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_STD == (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("size_in", [(100, 50), (50, 100), (64, 64), (20, 30), (1, 300)])
@pytest.mark.parametrize("train", [False, True])
def test_output_is_a_float_tensor_of_the_requested_size(size_in, train):
    image = Image.new("RGB", size_in, (200, 100, 50))
    out = clip_model.image_transform(32, train=train, seed=0)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_resize_and_crop_geometry_follow_torchvision():
    # Short side to the target size, long side truncated; crop offsets rounded.
    assert resized_size(101, 50, 32) == (64, 32)
    assert resized_size(50, 75, 224) == (224, 336)
    assert resized_size(640, 480, 224) == (298, 224)
    assert center_crop_box(298, 224, 224) == (37, 0, 261, 224)
    assert center_crop_box(224, 336, 224) == (0, 56, 224, 280)


def test_eval_takes_the_centre_crop():
    out = unnormalise(clip_model.image_transform(32)(column_gradient(96, 32)))
    np.testing.assert_allclose(out[0, :, 0], np.arange(32, 64), atol=1e-3)  # columns 32..63 of 96
    np.testing.assert_allclose(out[..., 1], 0, atol=1e-3)


def test_eval_resizes_bicubically():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    expected = image.resize((48, 32), Image.Resampling.BICUBIC).crop((8, 0, 40, 32))
    out = unnormalise(clip_model.image_transform(32)(image))
    np.testing.assert_allclose(out, np.asarray(expected, dtype=np.float32), atol=1e-3)


def test_normalisation_values():
    out = clip_model.image_transform(8)(Image.new("RGB", (8, 8), (10, 128, 250)))
    for channel, value in enumerate((10, 128, 250)):
        expected = (value / 255 - OPENAI_MEAN[channel]) / OPENAI_STD[channel]
        torch.testing.assert_close(out[channel], torch.full((8, 8), expected), rtol=0, atol=1e-6)


def test_train_crops_are_deterministic_under_a_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    first = clip_model.image_transform(32, train=True, seed=7)
    second = clip_model.image_transform(32, train=True, seed=7)
    other = clip_model.image_transform(32, train=True, seed=8)
    a = [first(image) for _ in range(5)]
    b = [second(image) for _ in range(5)]
    c = [other(image) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert len({x.sum().item() for x in a}) > 1  # successive calls draw new crops
    # Ray Data ships transforms to workers by pickling: a copy continues the same sequence.
    copy = pickle.loads(pickle.dumps(first))
    assert torch.equal(copy(image), first(image))


def test_train_crop_is_a_random_square_window_of_the_image():
    transform = clip_model.image_transform(32, train=True, seed=0, scale=(1.0, 1.0))
    offsets = set()
    for _ in range(20):
        out = unnormalise(transform(column_gradient(96, 32)))
        left = out[0, 0, 0]
        # A full-height square: 32 consecutive columns starting anywhere in 0..64.
        np.testing.assert_allclose(out[0, :, 0], left + np.arange(32), atol=1e-3)
        assert 0 <= round(left) <= 64
        offsets.add(round(left))
    assert len(offsets) > 5


def test_train_crop_scale_and_square_image():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    whole = clip_model.image_transform(32, train=True, seed=0, scale=(1.0, 1.0))(image)
    assert torch.equal(whole, clip_model.image_transform(32)(image))  # the whole square, resized
    smaller = clip_model.image_transform(32, train=True, seed=0, scale=(0.25, 0.25))
    out = unnormalise(smaller(column_gradient(64, 64)))
    span = out[0, -1, 0] - out[0, 0, 0]  # red at the last minus the first column of row 0
    assert 30 <= span <= 33  # a 32-pixel window (half the side), resized to 32


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        clip_model.image_transform(0)
    with pytest.raises(ValueError, match="scale"):
        clip_model.image_transform(32, train=True, scale=(0.5, 1.5))


def _palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    if transparent:
        image.info["transparency"] = 1
    return image


def _array_image(values, dtype, mode=None) -> Image.Image:
    image = Image.fromarray(np.full((4, 4), values, dtype=dtype))
    return image if mode is None else image.convert(mode)


MODE_CASES = [
    ("1", lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
    ("L", lambda: Image.new("L", (4, 4), 128), (128, 128, 128)),
    ("LA opaque", lambda: Image.new("LA", (4, 4), (128, 255)), (128, 128, 128)),
    ("LA transparent", lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
    ("La", lambda: Image.new("La", (4, 4), (64, 128)), (191, 191, 191)),
    ("P", lambda: _palette_image(False), (10, 20, 30)),
    ("P transparency", lambda: _palette_image(True), (255, 255, 255)),
    ("PA", lambda: Image.new("PA", (4, 4), (0, 0)), (255, 255, 255)),
    ("RGB", lambda: Image.new("RGB", (4, 4), (1, 2, 3)), (1, 2, 3)),
    ("RGBA opaque", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (255, 0, 0)),
    ("RGBA half", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 128)), (255, 127, 127)),
    ("RGBA transparent", lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
    ("RGBa", lambda: Image.new("RGBa", (4, 4), (0, 0, 255, 255)), (0, 0, 255)),
    ("RGBX", lambda: Image.new("RGBX", (4, 4), (9, 8, 7, 0)), (9, 8, 7)),
    ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    ("YCbCr", lambda: Image.new("YCbCr", (4, 4), (255, 128, 128)), (255, 255, 255)),
    ("HSV", lambda: Image.new("HSV", (4, 4), (0, 255, 255)), (255, 0, 0)),
    ("LAB", lambda: Image.new("LAB", (4, 4), (255, 128, 128)), (255, 255, 255)),
    ("I;16 max", lambda: Image.new("I;16", (4, 4), 65535), (255, 255, 255)),
    ("I;16 mid", lambda: _array_image(32896, np.uint16), (128, 128, 128)),
    ("I;16B", lambda: Image.new("I;16B", (4, 4), 65535), (255, 255, 255)),
    ("I 16-bit range", lambda: _array_image(65535, np.int32), (255, 255, 255)),
    ("I 8-bit range", lambda: _array_image(100, np.int32), (100, 100, 100)),
    ("F unit range", lambda: _array_image(0.5, np.float32), (128, 128, 128)),
    ("F pixel range", lambda: _array_image(200.0, np.float32), (200, 200, 200)),
]


@pytest.mark.parametrize("label, make, rgb", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_pil_mode_converts_to_rgb(label, make, rgb):
    image = make()
    assert image.mode == label.split()[0]
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == image.size
    np.testing.assert_allclose(np.asarray(converted)[0, 0], rgb, atol=2)
    out = clip_model.image_transform(8, background=(255, 255, 255))(image)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    np.testing.assert_allclose(unnormalise(out)[0, 0], rgb, atol=2.01)
    for train in (False, True):  # OpenAI's order (convert after resizing): every mode still gives RGB pixels
        default = clip_model.image_transform(8, train=train, seed=0)(image)
        assert default.shape == (3, 8, 8) and torch.isfinite(default).all()


def test_transparency_composites_on_the_chosen_background():
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb(image, background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)


def openai_preprocess(image: Image.Image, n_px: int) -> torch.Tensor:
    """A transcription of OpenAI's `clip._transform(n_px)` with torchvision's PIL code paths inlined:
    Compose([Resize(n_px, BICUBIC), CenterCrop(n_px), _convert_image_to_rgb, ToTensor(), Normalize(...)])."""
    # Resize: torchvision.transforms.functional.resize -> _compute_resized_output_size -> F_pil.resize.
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = n_px, int(n_px * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if [h, w] != [new_h, new_w]:  # torchvision returns the input itself when the size is unchanged
        image = image.resize((new_w, new_h), Image.BICUBIC)
    # CenterCrop: functional.center_crop (no padding is needed after Resize) -> F_pil.crop.
    w, h = image.size
    crop_top = int(round((h - n_px) / 2.0))
    crop_left = int(round((w - n_px) / 2.0))
    image = image.crop((crop_left, crop_top, crop_left + n_px, crop_top + n_px))
    # _convert_image_to_rgb.
    image = image.convert("RGB")
    # ToTensor: uint8 HWC -> CHW, to the default float dtype, / 255.
    tensor = torch.from_numpy(np.array(image, np.uint8, copy=True)).view(n_px, n_px, 3)
    tensor = tensor.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)
    # Normalize: in place sub_/div_ with float32 mean/std of shape [3, 1, 1].
    mean = torch.as_tensor(OPENAI_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(OPENAI_STD, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def _noise(shape, high=256, dtype=np.uint8, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def _reopened(image: Image.Image, fmt: str) -> Image.Image:
    """Saved and opened again, as a file of that format arrives from disk."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt)
    reopened = Image.open(io.BytesIO(buffer.getvalue()))
    reopened.load()
    return reopened


def _palette(transparent: bool) -> Image.Image:
    image = Image.fromarray(_noise((30, 45), high=16, seed=3), "P")
    image.putpalette(list(_noise(16 * 3, seed=4)))
    if transparent:
        image.info["transparency"] = 5
    return _reopened(image, "PNG")


def _rgba_with_holes() -> Image.Image:
    array = _noise((30, 45, 4), seed=5)
    array[::3, :, 3] = 0  # fully transparent rows whose hidden colour differs from any background
    return _reopened(Image.fromarray(array, "RGBA"), "PNG")


OPENAI_CASES = {
    "RGB": lambda: Image.fromarray(_noise((30, 45, 3))),
    "L": lambda: Image.fromarray(_noise((45, 30), seed=1)),
    "LA": lambda: _reopened(Image.fromarray(_noise((30, 45, 2), seed=2), "LA"), "PNG"),
    "RGBA": _rgba_with_holes,
    "P": lambda: _palette(False),
    "P transparency": lambda: _palette(True),
    "CMYK": lambda: _reopened(Image.fromarray(_noise((30, 45, 4), seed=6), "CMYK"), "TIFF"),
    "I;16": lambda: _reopened(Image.fromarray(_noise((30, 45), 700, np.uint16, seed=7)), "TIFF"),
    "RGB square, no resize": lambda: Image.fromarray(_noise((16, 16, 3), seed=8)),
    "RGB upscaled": lambda: Image.fromarray(_noise((9, 12, 3), seed=9)),
}


@pytest.mark.parametrize("label", list(OPENAI_CASES))
def test_eval_transform_equals_openai_preprocess_for_every_mode(label):
    image = OPENAI_CASES[label]()
    assert image.mode == label.split()[0]
    expected = openai_preprocess(image.copy(), 16)
    torch.testing.assert_close(clip_model.image_transform(16)(image), expected, rtol=0, atol=1e-6)


def test_compositing_before_resizing_is_an_explicit_option():
    image = _rgba_with_holes()
    openai = clip_model.image_transform(16)(image)
    white = clip_model.image_transform(16, background=(255, 255, 255))(image)
    assert (openai - white).abs().max() > 1.0  # the two orders differ where pixels are transparent
    expected = openai_preprocess(to_rgb(image, (255, 255, 255)), 16)
    torch.testing.assert_close(white, expected, rtol=0, atol=1e-6)
    assert "background" in repr(clip_model.image_transform(16, background=(0, 0, 0)))
