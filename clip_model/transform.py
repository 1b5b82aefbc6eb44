"""Image preprocessing without torchvision: PIL image -> normalised float tensor [3, H, W].

Evaluation: by default exactly OpenAI's `clip.load` preprocess (and open_clip's): bicubic resize of the
short side to `image_size` and centre crop *in the image's own mode*, then `convert("RGB")`, ToTensor,
Normalize. Sizes and crop offsets follow torchvision's Resize/CenterCrop on PIL images; Pillow's own resize
rules apply per mode (nearest for P, premultiplied alpha for LA/RGBA), and `convert("RGB")` drops alpha and
clips 16-bit values, as OpenAI's does. Training: a random square crop (the paper's only augmentation),
resized bicubically to `image_size`, in the same order.

`background=(r, g, b)` is the explicit alternative: `to_rgb` first (alpha composited onto that colour,
16-bit scaled to 8 bits), then resize and crop. The project composites where an image is *stored*: the
crawl flattens transparent images onto white before writing its JPEGs (a JPEG has no alpha, and white is
what a browser shows behind a transparent web image), so the training data and the stored shards are RGB
already and both orders give the same result on them. Evaluation keeps OpenAI's order so that scores with
OpenAI's weights match theirs; pass `background` to evaluate a model on transparent images the way it was
trained on them.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_BICUBIC = Image.Resampling.BICUBIC
_WHITE = (255, 255, 255)


def _gray16_to_8bit(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image, background: tuple[int, int, int] = _WHITE) -> Image.Image:
    """An 8-bit RGB version of any PIL image.

    - Transparency (LA, La, PA, RGBA, RGBa, P or L/RGB with a `transparency` entry) is composited onto
      `background` (white by default, as a browser shows a transparent web image on a white page).
    - I;16* are 16-bit grayscale: scaled by 255/65535. I (32-bit int) is treated the same way when its
      values exceed 255 (16-bit PNGs open as I in older Pillow), otherwise taken as 8-bit values.
    - F (float): values in [0, 1] are scaled by 255, anything else is clipped to [0, 255].
    - CMYK, YCbCr, 1, L, P, HSV and LAB go through Pillow's own conversion (CMYK without an ICC profile,
      i.e. the naive formula that browsers also use for untagged CMYK).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        return _gray16_to_8bit(np.asarray(image, dtype=np.float64)).convert("RGB")
    if mode == "I":
        array = np.asarray(image, dtype=np.float64)
        if array.size and array.max() > 255:
            return _gray16_to_8bit(array).convert("RGB")
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if array.size and array.min() >= 0.0 and array.max() <= 1.0:
            array = array * 255.0
        return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8)).convert("RGB")
    has_alpha = mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info
    if has_alpha:
        # Premultiplied La converts only to LA; everything else converts straight to RGBA.
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(image, transform)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {e}") from e


def convert_rgb(image: Image.Image) -> Image.Image:
    """OpenAI's `_convert_image_to_rgb` (`image.convert("RGB")`); modes Pillow cannot convert directly
    (La, which no file opens as) go through `to_rgb`."""
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:
        return to_rgb(image)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to `size` (long side truncated, as torchvision)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def to_tensor(image: Image.Image, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """uint8 RGB PIL image -> float32 [3, H, W], scaled to [0, 1] then normalised per channel."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class ImageTransform:
    """Callable PIL image -> tensor [3, image_size, image_size]. With `train=True` each call draws a random
    square crop: side sqrt(U(scale)) of the short side, uniform position. The draws come from a
    generator seeded by `seed`, so a transform built with the same seed yields the same sequence.
    `background=None` converts to RGB after resizing (OpenAI's order); a colour composites first."""

    def __init__(
        self,
        image_size: int,
        train: bool = False,
        seed: int | None = None,
        scale: tuple[float, float] = (0.9, 1.0),
        mean: tuple[float, float, float] = OPENAI_MEAN,
        std: tuple[float, float, float] = OPENAI_STD,
        background: tuple[int, int, int] | None = None,
    ):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.image_size = image_size
        self.train = train
        self.scale = scale
        self.mean = mean
        self.std = std
        self.background = background
        self.rng = random.Random(seed)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.background is not None:
            image = to_rgb(image, self.background)
        if self.train:
            image = self._random_square_crop(image)
        else:
            width, height = resized_size(*image.size, self.image_size)
            if (width, height) != image.size:
                image = image.resize((width, height), _BICUBIC)
            image = image.crop(center_crop_box(width, height, self.image_size))
        return to_tensor(convert_rgb(image), self.mean, self.std)

    def _random_square_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short = min(width, height)
        side = max(1, round(short * self.rng.uniform(*self.scale) ** 0.5))
        left = self.rng.randint(0, width - side)
        top = self.rng.randint(0, height - side)
        # Cropping the original and resizing once equals cropping the resized image, without resampling twice.
        return image.resize(
            (self.image_size, self.image_size), _BICUBIC, box=(left, top, left + side, top + side)
        )

    def __repr__(self) -> str:
        kind = f"train, scale={self.scale}" if self.train else "eval"
        alpha = "" if self.background is None else f", background={self.background}"
        return f"ImageTransform(image_size={self.image_size}, {kind}{alpha})"


def image_transform(
    image_size: int, train: bool = False, seed: int | None = None, **kwargs
) -> ImageTransform:
    """The preprocessing for `image_size`-pixel models: eval (resize + centre crop) or train (random
    square crop), both normalised with CLIP's mean/std. See `ImageTransform` for `scale`, `mean`, `std`
    and `background` (alpha compositing before resizing instead of OpenAI's convert after cropping)."""
    return ImageTransform(image_size, train=train, seed=seed, **kwargs)
