"""Image checks for crawled bytes: decode safely, filter, resize, re-encode.

`process_image(data, config)` returns a `ProcessedImage` or raises `ImageDrop` with the drop reason
(decode_error, decompression_bomb, too_small, aspect_ratio). The pixel limit is checked from the
header before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

RESIZE_MODES = ("keep_aspect", "center_crop", "none")


@dataclass
class ImageConfig:
    image_size: int = 256
    # keep_aspect: short side to image_size; center_crop: image_size x image_size; none: as is.
    # Images are never upscaled.
    resize_mode: str = "keep_aspect"
    min_size: int = 32  # smallest accepted short side of the original
    max_aspect_ratio: float = 3.0  # long side / short side of the original
    max_pixels: int = 64_000_000  # width * height of the original, else a decompression bomb
    jpeg_quality: int = 90
    # Let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while decoding when the target is that
    # small: several times faster on large photos, same output size.
    draft_decode: bool = True

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")


@dataclass
class ProcessedImage:
    jpg: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    original_format: str
    sha256: str


class ImageDrop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def process_image(data: bytes, config: ImageConfig) -> ProcessedImage:
    sha256 = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > config.max_pixels:
                raise ImageDrop("decompression_bomb")
            original_format = image.format or "unknown"
            if min(width, height) < config.min_size:
                raise ImageDrop("too_small")
            if max(width, height) / min(width, height) > config.max_aspect_ratio:
                raise ImageDrop("aspect_ratio")
            if config.draft_decode and config.resize_mode != "none" and image.format == "JPEG":
                image.draft("RGB", (config.image_size, config.image_size))
            image = ImageOps.exif_transpose(to_rgb(image))
        except ImageDrop:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDrop("decompression_bomb") from e
        except Exception as e:  # Pillow raises many types for broken files
            raise ImageDrop("decode_error") from e
    image = resize(image, config.image_size, config.resize_mode)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=config.jpeg_quality)
    return ProcessedImage(
        jpg=out.getvalue(),
        width=image.width,
        height=image.height,
        original_width=width,
        original_height=height,
        original_format=original_format,
        sha256=sha256,
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (first frame of animations)."""
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    if mode == "none":
        return image
    width, height = image.size
    short = min(width, height)
    if short > size:
        scale = size / short
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if mode == "center_crop":
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image
