"""Image checks: decode (JPEG/PNG/WebP/GIF, real photos), filters, resize modes, bombs, hashes."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from pipelines.crawl.images import ImageConfig, ImageDrop, process_image
from pipelines.crawl.testsite import decompression_bomb_png, encode


def photo_jpeg() -> bytes:
    return encode(Image.fromarray(photos.chelsea()), "jpg")  # 451 x 300 cat photo


def decode(jpg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpg))
    assert image.format == "JPEG"
    return image


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp", "gif"])
def test_every_format_becomes_a_resized_rgb_jpeg(fmt):
    data = encode(Image.fromarray(photos.astronaut()), fmt)  # 512 x 512
    out = process_image(data, ImageConfig(image_size=128))
    assert (out.width, out.height) == (128, 128) and (out.original_width, out.original_height) == (512, 512)
    assert out.original_format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}[fmt]
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert decode(out.jpg).mode == "RGB" and decode(out.jpg).size == (128, 128)


def test_resize_modes_and_never_upscale():
    data = photo_jpeg()
    keep = process_image(data, ImageConfig(image_size=150, resize_mode="keep_aspect"))
    assert (keep.width, keep.height) == (226, 150)  # short side 150, aspect kept
    crop = process_image(data, ImageConfig(image_size=150, resize_mode="center_crop"))
    assert (crop.width, crop.height) == (150, 150)
    none = process_image(data, ImageConfig(image_size=150, resize_mode="none"))
    assert (none.width, none.height) == (451, 300)
    big = process_image(data, ImageConfig(image_size=1000, resize_mode="keep_aspect"))
    assert (big.width, big.height) == (451, 300)  # not upscaled
    big_crop = process_image(data, ImageConfig(image_size=1000, resize_mode="center_crop"))
    assert (big_crop.width, big_crop.height) == (300, 300)  # square crop, not upscaled
    with pytest.raises(ValueError):
        ImageConfig(resize_mode="stretch")


def test_draft_decode_matches_full_decode():
    data = photo_jpeg()
    fast = np.asarray(decode(process_image(data, ImageConfig(image_size=64, draft_decode=True)).jpg), float)
    full = np.asarray(decode(process_image(data, ImageConfig(image_size=64, draft_decode=False)).jpg), float)
    assert fast.shape == full.shape == (64, 96, 3)
    assert np.abs(fast - full).mean() < 6  # same picture, a few grey levels apart


def test_jpeg_quality_is_applied():
    data = encode(Image.fromarray(photos.astronaut()), "png")
    low = process_image(data, ImageConfig(image_size=256, jpeg_quality=30))
    high = process_image(data, ImageConfig(image_size=256, jpeg_quality=95))
    assert len(low.jpg) < len(high.jpg) / 2


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xd8\xff\xe0not really a jpeg", "decode_error"),
        (b"", "decode_error"),
        (photo_jpeg()[:2000], "decode_error"),  # truncated file
        (encode(Image.new("RGB", (20, 200)), "png"), "too_small"),
        (encode(Image.new("RGB", (400, 100)), "png"), "aspect_ratio"),
        (decompression_bomb_png(), "decompression_bomb"),
    ],
)
def test_drops_with_reason(data, reason):
    with pytest.raises(ImageDrop) as info:
        process_image(data, ImageConfig(min_size=32, max_aspect_ratio=3.0))
    assert info.value.reason == reason


def test_pixel_limit_is_configurable():
    data = encode(Image.new("RGB", (300, 300)), "png")
    with pytest.raises(ImageDrop, match="decompression_bomb"):
        process_image(data, ImageConfig(max_pixels=300 * 300 - 1))
    assert process_image(data, ImageConfig(max_pixels=300 * 300)).width == 256


def test_transparency_becomes_white():
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    out = process_image(encode(image, "png"), ImageConfig(image_size=64))
    assert np.asarray(decode(out.jpg)).min() > 240  # fully transparent -> white background


def test_exif_orientation_applied():
    image = Image.fromarray(photos.chelsea())  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    out = process_image(buf.getvalue(), ImageConfig(resize_mode="none"))
    assert (out.width, out.height) == (300, 451)


def test_draft_decode_keeps_img2datasets_output_size():
    # 520 x 663 decodes at 1/2 scale as 260 x 332, whose short-side-to-256 size would be 256 x 327;
    # the size must come from the original: round(663 * 256 / 520) = 326, as img2dataset computes it.
    image = Image.fromarray(photos.astronaut()).resize((520, 663))
    out = process_image(encode(image, "jpg"), ImageConfig(image_size=256))
    assert (out.width, out.height) == (256, 326) and decode(out.jpg).size == (256, 326)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 520 x 663, displayed 663 x 520
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    rotated = process_image(buf.getvalue(), ImageConfig(image_size=256))
    assert (rotated.width, rotated.height) == (326, 256)
    assert (rotated.original_width, rotated.original_height) == (520, 663)


def test_greyscale_jpeg_becomes_rgb():
    data = encode(Image.fromarray(photos.camera()), "jpg")  # 512 x 512, mode L
    out = process_image(data, ImageConfig(image_size=200))
    assert decode(out.jpg).mode == "RGB" and decode(out.jpg).size == (200, 200)
