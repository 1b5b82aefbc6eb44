"""Evaluation's image decoding: every undecodable or hostile image is a counted drop with a reason, odd
modes are evaluated, and an evaluation run over a folder of them finishes."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model
from pipelines.evaluation.data import image_folder
from pipelines.evaluation.embed import EmbedOptions, decode_checked, embed_eval_set, prepare_image


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _noise(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge 1-bit canvas, with a few bytes of data: decoding would need
    width * height pixels of memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _palette_with_transparency() -> bytes:
    image = Image.fromarray(_noise((24, 20), 3) % 8, "P")
    image.putpalette(list(_noise(8 * 3, 4)))
    return _encoded(image, "PNG", transparency=2)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(_noise((20, 20, 3), s)).convert("P") for s in (5, 6)]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


RGB_JPEG = _encoded(Image.fromarray(_noise((40, 40, 3), 0)), "JPEG", quality=90)
RGB_PNG = _encoded(Image.fromarray(_noise((40, 40, 3), 1)), "PNG")

# file name -> (bytes, expected drop reason or None when the image is evaluated)
FILES = {
    "good.jpg": (RGB_JPEG, None),
    "cmyk.jpg": (_encoded(Image.fromarray(_noise((20, 30, 4), 7), "CMYK"), "JPEG"), None),
    "gray16.png": (_encoded(Image.fromarray(_noise((20, 30), 8).astype(np.uint16) * 200), "PNG"), None),
    "la.png": (_encoded(Image.fromarray(_noise((20, 30, 2), 9), "LA"), "PNG"), None),
    "palette_alpha.png": (_palette_with_transparency(), None),
    "bilevel.png": (_encoded(Image.fromarray(_noise((20, 30), 10) > 127), "PNG"), None),
    "animated.gif": (_animated_gif(), None),
    "zero.jpg": (b"", "empty_image"),
    "cut.jpg": (RGB_JPEG[: len(RGB_JPEG) // 2], "truncated_image"),
    "cut.png": (RGB_PNG[: len(RGB_PNG) // 2], "truncated_image"),
    "bomb.png": (_png_bomb(100_000, 100_000), "image_too_large"),  # over Pillow's own error limit
    "big.png": (_png_bomb(12_000, 9_000), "image_too_large"),  # 108 MP: Pillow only warns
    "drawing.svg": (
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9"/>',
        "vector_image",
    ),
    "inline.jpg": (
        b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="4" height="4"/></svg>',
        "vector_image",
    ),
    "text.jpg": (b"this is not a jpeg", "unreadable_image"),
    "html.png": (b"<!doctype html><html><body>404</body></html>", "unreadable_image"),
}


@pytest.mark.parametrize("name", list(FILES))
def test_decode_gives_the_image_or_a_reason(name):
    data, reason = FILES[name]
    image, got = decode_checked(data)
    assert got == reason
    assert (image is None) == (reason is not None)
    if image is not None:
        pixels = clip_model.image_transform(16)(image)
        assert pixels.shape == (3, 16, 16) and torch.isfinite(pixels).all()


def test_a_transform_that_fails_is_a_counted_drop():
    def refuses(image):
        raise ValueError(f"no conversion for mode {image.mode}")

    assert prepare_image(RGB_JPEG, refuses) == (None, "unsupported_image_mode")


def test_evaluation_over_a_hostile_folder_finishes_and_counts_each_reason(tmp_path: Path):
    for i, (name, (data, _)) in enumerate(FILES.items()):
        folder = tmp_path / ("cats" if i % 2 else "dogs")
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    eval_set = image_folder(str(tmp_path))
    torch.manual_seed(0)
    model = clip_model.create_model("tiny-vit").eval()
    result = embed_eval_set(eval_set, model, opts=EmbedOptions(use_ray="never", batch_size=5))
    expected: dict[str, int] = {}
    for _, reason in FILES.values():
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert result.dropped == expected
    kept = sum(reason is None for _, reason in FILES.values())
    assert len(result.ids) == kept and result.n_in == len(FILES)
    assert result.image_features.shape[0] == kept and torch.isfinite(result.image_features).all()
