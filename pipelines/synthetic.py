"""The one generator of synthetic captioned images: rendered scenes with known content.

Scenes combine a shape, a colour, a count, a texture and optionally a digit, drawn at random positions and
sizes on a random light background, and come with English captions (or French/German/Spanish ones) in the
varied, noisy style of web alt text. Tests, benchmarks and the demo web corpus all draw from here, so the
ground truth (the `label`) is known everywhere without downloading anything.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 10),
    "black": (20, 20, 20),
    "pink": (250, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
TEXTURES = ("plain", "striped", "dotted", "checkered")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRANSLATIONS: dict[str, dict[str, str]] = {
    "fr": {
        "red": "rouge",
        "green": "vert",
        "blue": "bleu",
        "yellow": "jaune",
        "purple": "violet",
        "orange": "orange",
        "black": "noir",
        "pink": "rose",
        "circle": "cercle",
        "square": "carré",
        "triangle": "triangle",
        "star": "étoile",
        "cross": "croix",
        "diamond": "losange",
        "_template": "une photo d'un {shape} {colour} sur un fond clair",
    },
    "de": {
        "red": "roter",
        "green": "grüner",
        "blue": "blauer",
        "yellow": "gelber",
        "purple": "violetter",
        "orange": "oranger",
        "black": "schwarzer",
        "pink": "rosa",
        "circle": "Kreis",
        "square": "Quadrat",
        "triangle": "Dreieck",
        "star": "Stern",
        "cross": "Kreuz",
        "diamond": "Raute",
        "_template": "ein Foto von einem {colour} {shape} auf hellem Hintergrund",
    },
    "es": {
        "red": "rojo",
        "green": "verde",
        "blue": "azul",
        "yellow": "amarillo",
        "purple": "morado",
        "orange": "naranja",
        "black": "negro",
        "pink": "rosado",
        "circle": "círculo",
        "square": "cuadrado",
        "triangle": "triángulo",
        "star": "estrella",
        "cross": "cruz",
        "diamond": "rombo",
        "_template": "una foto de un {shape} {colour} sobre un fondo claro",
    },
}

_EN_TEMPLATES = (
    "a photo of {article} {desc}.",
    "{desc_cap} on a light background",
    "an illustration showing {article} {desc}",
    "{article} {desc} drawn on paper",
    "close-up of {article} {desc}",
    "simple picture: {desc}",
    "{desc_cap}, clip art",
    "a small {desc} in the corner of the frame",
)
_WEB_NOISE = ("free download", "stock image", "hd wallpaper", "high quality", "vector graphic", "| my blog")


@dataclass(frozen=True)
class Concept:
    colour: str
    shape: str
    count: int = 1
    texture: str = "plain"
    digit: int | None = None

    @property
    def label(self) -> str:
        """The class name used for zero-shot evaluation, e.g. "red circle"."""
        return f"{self.colour} {self.shape}"

    def describe(self) -> str:
        """English noun phrase: "two striped red circles with the digit 7"."""
        texture = "" if self.texture == "plain" else f"{self.texture} "
        noun = self.shape + (
            "es" if self.shape in ("cross",) and self.count > 1 else "s" if self.count > 1 else ""
        )
        head = f"{NUMBER_WORDS[self.count]} " if self.count > 1 else ""
        text = f"{head}{texture}{self.colour} {noun}"
        if self.digit is not None:
            text += f" with the digit {self.digit}"
        return text


CONCEPTS: tuple[Concept, ...] = tuple(Concept(c, s) for c in COLOURS for s in SHAPES)


@dataclass
class SyntheticSample:
    image: Image.Image
    caption: str
    concept: Concept
    language: str = "en"
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.concept.label


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        pts = [
            (math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)
        ]
    elif shape == "square":
        pts = [
            (math.cos(angle + math.pi / 4 + k * math.pi / 2), math.sin(angle + math.pi / 4 + k * math.pi / 2))
            for k in range(4)
        ]
    elif shape == "diamond":
        pts = [(0.65 * math.cos(k * math.pi / 2), math.sin(k * math.pi / 2)) for k in range(4)]
    elif shape == "star":
        pts = [
            (
                (1.0 if k % 2 == 0 else 0.45) * math.cos(angle + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(angle + k * math.pi / 5),
            )
            for k in range(10)
        ]
    elif shape == "cross":
        w = 0.35
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _texture_fill(size: int, colour: tuple[int, int, int], texture: str, rng: random.Random) -> Image.Image:
    """A full-size layer in `colour` with the texture pattern; pasted through the shape mask."""
    layer = Image.new("RGB", (size, size), colour)
    if texture == "plain":
        return layer
    draw = ImageDraw.Draw(layer)
    light = tuple(min(255, c + 150) for c in colour)
    step = max(3, size // 12)
    if texture == "striped":
        for x in range(-size, size * 2, step * 2):
            draw.polygon([(x, 0), (x + step, 0), (x + step + size, size), (x + size, size)], fill=light)
    elif texture == "dotted":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse([x - step / 4, y - step / 4, x + step / 4, y + step / 4], fill=light)
    elif texture == "checkered":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=light)
    return layer


def render(concept: Concept, rng: random.Random, size: int = 64) -> Image.Image:
    """Draw `concept` on a random light background with random placement, scale and rotation."""
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    r_max = size * (0.38 if concept.count == 1 else 0.22)
    for _ in range(concept.count):
        r = rng.uniform(0.6, 1.0) * r_max
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        if concept.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon(_polygon(concept.shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=255)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[concept.colour])
    image.paste(_texture_fill(size, jitter, concept.texture, rng), (0, 0), mask)
    if concept.digit is not None:
        font = ImageFont.load_default(size=max(8, size // 3))
        ImageDraw.Draw(image).text(
            (size * 0.05, size * 0.02), str(concept.digit), fill=(10, 10, 10), font=font
        )
    # Sensor-like noise so no two images are identical even for the same concept and layout.
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, rng.uniform(3, 8), (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def caption_for(concept: Concept, rng: random.Random, language: str = "en", noise: float = 0.2) -> str:
    """A web-style caption. `noise` is the chance of SEO junk, odd casing or trailing site text."""
    if language != "en":
        words = TRANSLATIONS[language]
        return words["_template"].format(colour=words[concept.colour], shape=words[concept.shape])
    desc = concept.describe()
    article = ("an" if desc[0] in "aeiou" else "a") if concept.count == 1 else ""
    template = rng.choice(_EN_TEMPLATES).replace("{article} ", "{article}" if not article else "{article} ")
    text = template.format(article=article, desc=desc, desc_cap=desc[0].upper() + desc[1:])
    if rng.random() < noise:
        text = f"{text} - {rng.choice(_WEB_NOISE)}"
    if rng.random() < noise / 2:
        text = text.upper() if rng.random() < 0.5 else text.title()
    return text


def random_concept(
    rng: random.Random, concepts: Sequence[Concept] = CONCEPTS, variety: bool = True
) -> Concept:
    """A concept from `concepts`, optionally varied in count, texture and digit (the label stays the same)."""
    base = rng.choice(list(concepts))
    if not variety:
        return base
    return Concept(
        base.colour,
        base.shape,
        count=rng.choice((1, 1, 1, 2, 3)),
        texture=rng.choice(("plain", "plain", *TEXTURES[1:])),
        digit=rng.randint(0, 9) if rng.random() < 0.15 else None,
    )


def generate(
    n: int,
    seed: int = 0,
    size: int = 64,
    concepts: Sequence[Concept] = CONCEPTS,
    variety: bool = True,
    noise: float = 0.2,
) -> Iterator[SyntheticSample]:
    """`n` samples, deterministic for a given seed."""
    rng = random.Random(seed)
    for _ in range(n):
        concept = random_concept(rng, concepts, variety)
        yield SyntheticSample(render(concept, rng, size), caption_for(concept, rng, noise=noise), concept)


def to_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def synthetic_shard_samples(n: int, seed: int = 0, size: int = 64, **kwargs) -> Iterator[dict]:
    """Samples in the shard layout of pipelines/shards.py, with the class label in the metadata."""
    import hashlib

    for i, s in enumerate(generate(n, seed=seed, size=size, **kwargs)):
        jpg = to_jpeg(s.image)
        yield {
            "key": f"{seed:04d}{i:07d}",
            "jpg": jpg,
            "txt": s.caption,
            "json": {
                "url": f"http://127.0.0.1/synthetic/{seed}/{i}.jpg",
                "caption": s.caption,
                "query": s.concept.shape,
                "label": s.label,
                "width": size,
                "height": size,
                "original_width": size,
                "original_height": size,
                "sha256": hashlib.sha256(jpg).hexdigest(),
            },
        }


# ---------- captions without images (tokenizer tests and benchmarks) ----------

_SYLLABLES = ["ka", "ri", "to", "mo", "na", "el", "an", "ber", "sto", "lin", "gra", "vel", "qu", "ish", "ment", "ing", "ed", "un", "re", "pho", "to", "sun", "dog", "cat"]  # fmt: skip
_COMMON = ["a", "the", "of", "on", "in", "with", "and", "at", "by", "for", "photo", "picture", "image", "view", "close", "up"]  # fmt: skip
_EXTRA = ["café", "naïve", "straße", "東京", "夜景", "مرحبا", "😀", "🐶", "&amp;", "d'été", "it's", "we're"]


def pseudo_captions(n: int, seed: int = 0, num_words: int = 30000, max_syllables: int = 4) -> list[str]:
    """Caption-like text over a Zipf-distributed pseudo-word vocabulary (~20k words), with numbers,
    punctuation, some capitals and a few non-ASCII words and HTML entities."""
    rng = random.Random(seed)
    words = sorted(
        {"".join(rng.choices(_SYLLABLES, k=rng.randint(1, max_syllables))) for _ in range(num_words)}
    )
    rng.shuffle(words)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    captions = []
    for _ in range(n):
        k = rng.randint(3, 18)
        toks = rng.choices(words, weights=weights, k=k)
        toks[rng.randrange(k)] = rng.choice(_COMMON)
        if rng.random() < 0.3:
            toks.append(str(rng.randint(0, 3000)))
        if rng.random() < 0.1:
            toks.insert(rng.randrange(len(toks)), rng.choice(_EXTRA))
        text = " ".join(toks)
        if rng.random() < 0.3:
            text = text.capitalize()
        captions.append(text + rng.choice(["", ".", "!", " ...", " (2019)", ", 4k"]))
    return captions
