"""Image checks for crawled bytes: decode safely, filter, resize, re-encode.

`process_image(data, config)` returns a `ProcessedImage` or raises `ImageDrop` with the drop reason
(decode_error, decompression_bomb, too_small, aspect_ratio, image_error). The pixel limit is checked
from the header before any pixel is decoded, so a decompression bomb costs nothing. Nothing else
escapes: an error while resizing or re-encoding a decoded image is the drop `image_error`.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image

RESIZE_MODES = ("keep_aspect", "center_crop", "none")
# Every drop reason of the image checks (every other reason belongs to the fetch).
IMAGE_REASONS = frozenset({"decode_error", "decompression_bomb", "too_small", "aspect_ratio", "image_error"})
# Antialiased bicubic: img2dataset uses OpenCV's area filter; bicubic after a draft decode keeps
# the output closer to a full-resolution downscale (area costs ~15% less CPU, blurrier, more aliasing).
RESAMPLE = Image.Resampling.BICUBIC


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


# EXIF orientation -> the transpose that displays the image upright (5-8 swap width and height).
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
EXIF_ORIENTATION = 0x0112


def process_image(data: bytes, config: ImageConfig) -> ProcessedImage:
    if not isinstance(data, bytes | bytearray | memoryview) or not data:
        raise ImageDrop("decode_error")
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
            transpose = ORIENTATION_TRANSPOSE.get(image.getexif().get(EXIF_ORIENTATION, 1))
            # The output size comes from the original size (as img2dataset computes it), in the
            # stored orientation; the small result is turned upright at the end.
            rotated = transpose in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE,
                                    Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)  # fmt: skip
            target = resized_size((height, width) if rotated else (width, height), config)
            if rotated:
                target = (target[1], target[0])
            if config.draft_decode and target != (width, height) and image.format == "JPEG":
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below `target`.
                image.draft("RGB", target)
            image.load()
            if image.mode not in ("RGB", "L"):
                image = to_rgb(image)
        except ImageDrop:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDrop("decompression_bomb") from e
        except Exception as e:  # Pillow raises many types for broken files
            raise ImageDrop("decode_error") from e
    try:
        return finish(image, target, transpose, config, (width, height, original_format, sha256))
    except Exception as e:  # resize/encode of a decoded image: rare, but never an escaped exception
        raise ImageDrop("image_error") from e


def finish(
    image: Image.Image,
    target: tuple[int, int],
    transpose: Image.Transpose | None,
    config: ImageConfig,
    original: tuple[int, int, str, str],
) -> ProcessedImage:
    """Resize to `target`, turn upright, crop, re-encode as JPEG."""
    width, height, original_format, sha256 = original
    if image.size != target:
        image = image.resize(target, RESAMPLE, reducing_gap=3.0)
    if image.mode != "RGB":  # greyscale: resized as one channel, converted once small
        image = image.convert("RGB")
    if transpose is not None:
        image = image.transpose(transpose)
    if config.resize_mode == "center_crop":
        image = center_crop(image)
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
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def resized_size(size: tuple[int, int], config: ImageConfig) -> tuple[int, int]:
    """(width, height) before any crop: short side to image_size (same rounding as img2dataset),
    never upscaled; unchanged for resize_mode none."""
    width, height = size
    short = min(width, height)
    if config.resize_mode == "none" or short <= config.image_size:
        return size
    scale = config.image_size / short
    return max(config.image_size, round(width * scale)), max(config.image_size, round(height * scale))


def center_crop(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))
