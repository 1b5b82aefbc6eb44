"""Realistic alt-text-like captions, generated offline and deterministically from a seed.

Web alt text is not a small vocabulary: it has a long Zipfian tail of words (product names, places, typos),
numbers, prices, sizes, model numbers, camera file names, hashtags, HTML entities, curly quotes, a little
mojibake, and a sizeable share of non-English scripts and emoji. Tokenizer benchmarks and tests need that
mix, because caches that fill at once on a 40-word vocabulary make "cold" figures warm.

The vocabulary (>= 50k distinct words by default) is a few hundred real English alt-text words at the head
of a Zipf ranking, then pronounceable English-like words built from English onsets, vowels, codas and
suffixes; other languages get their own Zipf-ranked words: accented Latin, Cyrillic, Greek, Arabic, Hebrew,
Devanagari, Thai (no spaces), Chinese, Japanese (kana + kanji), Korean (composed Hangul), plus real
multilingual place and food names and real emoji sequences. The vocabulary depends only on
``vocabulary_seed``; captions are sampled with ``seed``, so two seeds give different captions from the same
language (e.g. one to train BPE merges on, one to benchmark).

    captions = alt_text_captions(20_000, seed=0)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate

# The head of the English ranking: words that really dominate alt text (stock photos, shops, news, blogs).
COMMON_WORDS = """
the a of and in with for on to at by from is are photo image picture stock vector illustration view close up
background white black red blue green yellow pink orange purple grey gray brown gold silver dark light new
old vintage modern small large big little beautiful happy young man woman men women girl boy child children
kids baby family people person couple friends group portrait face hand hands eyes hair smiling dress shirt
jacket shoes boots bag hat jeans leather cotton wool size sale free shipping buy online shop store home house
garden kitchen room bedroom living bathroom table chair sofa bed lamp wall floor door window wood wooden
metal glass plastic paper book cover poster print art painting drawing design logo icon pattern texture
abstract set collection isolated top side front back left right over under near inside outside city street
road building bridge tower church castle park beach sea ocean lake river mountain mountains forest tree trees
flower flowers grass sky sun sunset sunrise night day morning winter summer spring autumn fall snow rain
water fire food dish cake bread coffee tea wine beer fruit apple banana chocolate cheese chicken salad pizza
dog dog cat cats horse bird birds fish animal animals car cars truck bike bicycle train plane boat ship
travel holiday vacation wedding party birthday christmas easter halloween day event concert festival game
team player football soccer basketball baseball tennis golf sport sports music guitar piano band show movie
film tv series episode season star official video live news report best top premium quality original
limited edition collection handmade custom personalized gift gifts ideas diy how make made using easy simple
quick recipe healthy natural organic fresh hot cold warm soft hard black-and-white 3d hd 4k mini pro max plus
ultra one two three four five first second last next great good nice amazing awesome cute funny cool style
fashion beauty makeup skin care health fitness yoga business office work working computer laptop phone
smartphone iphone android app website screen screenshot map plan model kit parts part tool tools system
water-color watercolor hand-drawn floral wedding invitation card cards template banner frame border
""".split()  # noqa: SIM905 (a word list reads best as text)

# Real words and names from other languages, as they appear in captions.
REAL_FRAGMENTS = """
café crème brûlée naïve façade résumé déjà vu jalapeño piñata señor niño mañana São Paulo Kraków Zürich
München Köln Düsseldorf Göteborg Malmö Århus Ærø Reykjavík Montréal Québec Curaçao Besançon Ελλάδα Αθήνα
Москва Санкт-Петербург Київ Беларусь фото картинка 東京 京都 大阪 北京 上海 香港 台北 夜景 写真 美しい
桜 富士山 서울 부산 한국 사진 مرحبا القاهرة دبي שלום ירושלים תל־אביב नमस्ते दिल्ली मुंबई กรุงเทพ ภาพ
İstanbul Ankara Łódź Gdańsk Poznań Brno Plzeň Bratislava Košice Tiếng Việt Hà Nội phở bánh mì straße
größe schöne grüße fußball Übersicht für über schön groß años niños corazón canción fiesta pequeño
""".split()  # noqa: SIM905

EMOJI = ["😀", "😂", "😍", "❤️", "👍", "👍🏽", "🔥", "✨", "🎉", "🌸", "🌈", "☀️", "🐶", "🐱", "🍕", "☕", "📷",
         "🇫🇷", "🇯🇵", "🇧🇷", "👨‍👩‍👧", "🏳️‍🌈", "👩🏾‍💻", "💯", "⭐", "✔", "→", "★", "♥"]  # fmt: skip

ENTITIES = ["&amp;", "&amp;", "&amp;", "&quot;", "&#39;", "&#039;", "&nbsp;", "&eacute;", "&rsquo;", "&ndash;",
            "&#8217;", "&amp;amp;", "&lt;3", "&copy;", "&reg;", "&hellip;", "&trade;"]  # fmt: skip

_ONSETS = ["", "", "b", "bl", "br", "c", "ch", "cl", "cr", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "h", "j",
           "k", "l", "m", "n", "p", "ph", "pl", "pr", "qu", "r", "s", "sc", "sh", "sk", "sl", "sm", "sn", "sp",
           "st", "str", "sw", "t", "th", "tr", "tw", "v", "w", "wh", "y", "z"]  # fmt: skip
_NUCLEI = ["a", "a", "e", "e", "i", "i", "o", "o", "u", "ai", "ea", "ee", "oo", "ou", "ie", "oa", "y", "au"]
_CODAS = ["", "", "", "b", "ck", "d", "ft", "g", "k", "l", "ld", "ll", "lt", "m", "mp", "n", "nd", "ng", "nk",
          "nt", "p", "r", "rd", "rk", "rn", "rt", "s", "sh", "sk", "ss", "st", "t", "th", "x"]  # fmt: skip
_SUFFIXES = ["s", "s", "ed", "ing", "er", "ers", "ly", "tion", "ness", "able", "ies", "ment",
             "ville", "ton", "ism", "ist"]  # fmt: skip
_SIMPLE = "bcdfghklmnprstvwz"
_ACCENTED = "éèêëàâäáãåçíìîïñóòôöõøúùûüýÿßłśźżćńąęčřšžğışőæœ"


@dataclass(frozen=True)
class Language:
    """One language of the mix: its share of captions, vocabulary size and word generator."""

    name: str
    share: float  # of captions
    num_words: int
    make_word: Callable[[random.Random], str]
    spaces: bool = True  # False: words are written without spaces (Thai, Chinese, Japanese)


def _english_word(rng: random.Random) -> str:
    # Clusters only at the word's edges, as in English; inner syllables are plain consonant + vowel.
    syllables = rng.choices([1, 2, 3, 4], weights=[35, 45, 17, 3])[0]
    inner = "".join(rng.choice(_SIMPLE) + rng.choice(_NUCLEI[:9]) for _ in range(syllables - 1))
    word = rng.choice(_ONSETS) + rng.choice(_NUCLEI) + inner + rng.choice(_CODAS)
    return word + (rng.choice(_SUFFIXES) if rng.random() < 0.3 else "")


def _accented_word(rng: random.Random) -> str:
    chars = list(_english_word(rng))
    for _ in range(rng.choice([1, 1, 2])):
        chars[rng.randrange(len(chars))] = rng.choice(_ACCENTED)
    return "".join(chars)


def _syllabic(consonants: str, vowels: str, lo: int, hi: int) -> Callable[[random.Random], str]:
    def make(rng: random.Random) -> str:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(lo, hi)))
        return word + (rng.choice(consonants) if rng.random() < 0.4 else "")

    return make


def _chars(first: int, last: int, lo: int, hi: int, pool_size: int = 0) -> Callable[[random.Random], str]:
    """Words of lo..hi characters from a code-point range (from a fixed pool of its characters if given)."""
    pool = [chr(c) for c in range(first, last + 1)]
    if pool_size:
        pool = random.Random(first).sample(pool, pool_size)  # the "common characters" of a large script

    def make(rng: random.Random) -> str:
        return "".join(rng.choices(pool, k=rng.randint(lo, hi)))

    return make


def _hangul_word(rng: random.Random) -> str:
    # A Hangul syllable is 0xAC00 + (initial * 21 + vowel) * 28 + final; common shapes only.
    return "".join(
        chr(0xAC00 + (rng.randrange(19) * 21 + rng.randrange(21)) * 28 + rng.choice([0, 0, 0, 4, 8, 16, 21]))
        for _ in range(rng.randint(1, 4))
    )


def _japanese_word(rng: random.Random) -> str:
    kana = 0x3042 if rng.random() < 0.6 else 0x30A2  # hiragana or katakana
    word = "".join(chr(kana + rng.randrange(82)) for _ in range(rng.randint(1, 4)))
    return _KANJI(rng) + word if rng.random() < 0.5 else word


_KANJI = _chars(0x4E00, 0x9FA5, 1, 3, pool_size=3000)

LANGUAGES = (
    Language("english", 0.9, 60_000, _english_word),
    Language("latin-accented", 0.03, 8_000, _accented_word),
    Language("cyrillic", 0.015, 4_000, _syllabic("бвгдзклмнпрстфхцчшщж", "аеиоуыяюэё", 1, 4)),
    Language("greek", 0.004, 1_500, _syllabic("βγδζθκλμνξπρστφχψ", "αεηιουωάέήίόύώ", 1, 4)),
    Language("chinese", 0.012, 5_000, _KANJI, spaces=False),
    Language("japanese", 0.008, 4_000, _japanese_word, spaces=False),
    Language("korean", 0.008, 3_000, _hangul_word),
    Language("arabic", 0.006, 2_000, _chars(0x0627, 0x064A, 2, 7)),
    Language("hebrew", 0.003, 1_500, _chars(0x05D0, 0x05EA, 2, 6)),
    Language("hindi", 0.005, 1_500, _syllabic("कखगघचछजझटठडढतथदधनपफबभमयरलवशसह", "ािीुूेैोौ", 1, 3)),
    Language(
        "thai", 0.005, 1_500, _syllabic("กขคงจฉชซญดตถทธนบปผพฟภมยรลวศสหอฮ", "ะาิีึืุูเแโใไ่้", 1, 3), spaces=False
    ),
)


@dataclass(frozen=True)
class _Ranked:
    """A Zipf-ranked word list with cumulative weights, for fast sampling."""

    words: list[str]
    cum_weights: list[float]

    def sample(self, rng: random.Random, k: int) -> list[str]:
        return rng.choices(self.words, cum_weights=self.cum_weights, k=k)


def _ranked(words: list[str], exponent: float = 1.0) -> _Ranked:
    return _Ranked(words, list(accumulate(1.0 / (rank + 1) ** exponent for rank in range(len(words)))))


@lru_cache(maxsize=4)
def _vocabularies(vocabulary_seed: int) -> dict[str, _Ranked]:
    rng = random.Random(vocabulary_seed)
    out = {}
    for lang in LANGUAGES:
        head = COMMON_WORDS if lang.name == "english" else []
        seen = set(head)
        words = list(dict.fromkeys(head))
        while len(words) < lang.num_words:
            word = lang.make_word(rng)
            if word not in seen:
                seen.add(word)
                words.append(word)
        if lang.name == "english":  # keep the real head on top, shuffle the invented tail into a ranking
            tail = words[len(set(head)) :]
            rng.shuffle(tail)
            words = words[: len(set(head))] + tail
        else:
            rng.shuffle(words)
        out[lang.name] = _ranked(words)
    return out


def alt_text_vocabulary(vocabulary_seed: int = 0) -> set[str]:
    """Every distinct word the caption generator draws from (over 50k), besides numbers and names."""
    words = set(REAL_FRAGMENTS) | set(EMOJI)
    for ranked in _vocabularies(vocabulary_seed).values():
        words.update(ranked.words)
    return words


def alt_text_captions(n: int, seed: int = 0, vocabulary_seed: int = 0) -> list[str]:
    """``n`` alt-text-like captions sampled with ``seed`` from the language fixed by ``vocabulary_seed``."""
    vocab = _vocabularies(vocabulary_seed)
    rng = random.Random(seed)
    cum_shares = list(accumulate(lang.share for lang in LANGUAGES))
    return [_caption(rng, vocab, rng.choices(LANGUAGES, cum_weights=cum_shares)[0]) for _ in range(n)]


def _caption(rng: random.Random, vocab: dict[str, _Ranked], lang: Language) -> str:
    k = max(1, min(40, round(rng.lognormvariate(1.9, 0.6))))  # median ~7 words, a long tail of long ones
    words = vocab[lang.name].sample(rng, k)
    if lang.name == "latin-accented":  # European text: accented words among plain ones
        words = [w if rng.random() < 0.5 else v for w, v in zip(words, vocab["english"].sample(rng, k))]
    if not lang.spaces:  # scripts written without spaces: a few space-separated phrases
        cuts = sorted(rng.sample(range(1, k), min(k - 1, rng.randint(0, 2)))) if k > 1 else []
        words = ["".join(words[a:b]) for a, b in zip([0, *cuts], [*cuts, k])]
    if lang.name != "english" and rng.random() < 0.3:  # code-mixing: a brand, place or number in ASCII
        words.insert(
            rng.randrange(len(words) + 1), rng.choice([_model_number(rng), *vocab["english"].sample(rng, 1)])
        )
    if lang.name in ("english", "latin-accented", "cyrillic", "greek"):
        words = _cased(rng, words)
    for p, make in _INSERTIONS:
        if rng.random() < p:
            words.insert(rng.randrange(len(words) + 1), make(rng))
    text = _punctuated(rng, words)
    for p, decorate in _DECORATIONS:
        if rng.random() < p:
            text = decorate(rng, text)
    return text


def _cased(rng: random.Random, words: list[str]) -> list[str]:
    style = rng.random()
    if style < 0.4:  # Product Title Case
        return [w.capitalize() for w in words]
    if style < 0.65:  # Sentence case
        return [words[0].capitalize(), *words[1:]]
    if style < 0.7:  # SHOUTING
        return [w.upper() for w in words]
    return words


def _punctuated(rng: random.Random, words: list[str]) -> str:
    seps = rng.choices(
        [" ", ", ", " - ", " | ", ": ", " / ", " – ", " & ", "; "],
        weights=[400, 40, 20, 10, 10, 5, 1, 2, 5],
        k=len(words) - 1,
    )
    text = words[0] + "".join(sep + w for sep, w in zip(seps, words[1:]))
    if rng.random() < 0.05:
        text = f"{text} ({rng.choice(words)})"
    return text + rng.choices(["", ".", "!", "...", "?", " :)"], weights=[60, 25, 5, 5, 3, 2])[0]


def _model_number(rng: random.Random) -> str:
    letters = "".join(rng.choices("ABCDEFGHJKLMNPRSTVWXZ", k=rng.randint(1, 3)))
    digits = str(rng.randint(1, 9999))
    return rng.choice(
        [
            f"{letters}{digits}",
            f"{letters}-{digits}",
            f"{letters}-{digits}{rng.choice('ABCX')}",
            f"{digits}{letters}",
        ]
    )


_UNITS = ["", "cm", "mm", '"', " in"]


def _number(rng: random.Random) -> str:
    return rng.choice(
        [
            str(rng.randint(1900, 2025)),  # a year
            str(rng.randint(1, 100)),
            f"${rng.randint(1, 500)}.{rng.randint(0, 99):02d}",
            f"{rng.randint(1, 300)},{rng.randint(0, 99):02d} €",
            f"{rng.randint(1, 60)}x{rng.randint(1, 60)}{rng.choice(_UNITS)}",
            f"{rng.choice([720, 1080, 1920, 2560, 3840])}x{rng.choice([480, 720, 1080, 1440, 2160])}",
            f"{rng.randint(1, 99)}%",
            f"{rng.randint(1, 31):02d}.{rng.randint(1, 12):02d}.{rng.randint(1990, 2025)}",
            f"{rng.randint(1990, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 31):02d}",
            f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} {rng.choice(['AM', 'PM', 'am', 'pm'])}",
            f"No. {rng.randint(1, 999)}",
            f"{rng.randint(2, 12)}pcs",
        ]
    )


def _file_name(rng: random.Random) -> str:
    date = f"{rng.randint(2005, 2025)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    time = f"{rng.randint(0, 23):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"
    return rng.choice(
        [
            f"IMG_{date}_{time}.jpg",
            f"DSC_{rng.randint(1, 9999):04d}.JPG",
            f"_MG_{rng.randint(1, 9999):04d}",
            f"PXL_{date}_{time}{rng.randint(100, 999)}.jpg",
            f"Screenshot {date[:4]}-{date[4:6]}-{date[6:]} at {rng.randint(1, 12)}.{time[2:4]}.{time[4:]}",
            f"photo-{rng.getrandbits(40)}-{rng.getrandbits(32):08x}",
            f"WhatsApp Image {date[:4]}-{date[4:6]}-{date[6:]} at {time[:2]}.{time[2:4]}.{time[4:]}",
        ]
    )


def _tag(rng: random.Random) -> str:
    word = _vocabularies(0)["english"].sample(rng, 1)[0]
    return rng.choice(["#", "#", "@", "www."]) + word + (".com" if rng.random() < 0.2 else "")


_INSERTIONS: list[tuple[float, Callable[[random.Random], str]]] = [
    (0.25, _number),
    (0.06, _model_number),
    (0.02, _file_name),
    (0.04, _tag),
    (0.015, lambda rng: rng.choice(EMOJI)),
    (0.01, lambda rng: rng.choice(REAL_FRAGMENTS)),
    (0.008, lambda rng: rng.choice(["©", "°C", "×", "—", "€", "£", "½", "™", "®", "·", "…", "«", "»", "¿"])),
]


def _entity(rng: random.Random, text: str) -> str:
    cut = text.rfind(" ", 0, rng.randrange(len(text) + 1)) + 1
    return text[:cut] + rng.choice(ENTITIES) + " " + text[cut:]


def _curly(rng: random.Random, text: str) -> str:
    if "'" in text or rng.random() < 0.5:
        return text.replace("'", "’") if "'" in text else text.replace(" ", "’s ", 1)
    return f"“{text}”"


def _mojibake(rng: random.Random, text: str) -> str:
    word = rng.choice(["café", "résumé", "naïve", "“quoted”", "it’s", "€5", "Zürich"])
    return f"{text} {word.encode('utf-8').decode('cp1252', errors='replace')}"


def _odd_space(rng: random.Random, text: str) -> str:
    space = rng.choice(["  ", "\t", "\n", "\u00a0", "   "])
    return rng.choice([f" {text} ", text.replace(" ", space, 1), f"{text}\n"])


_DECORATIONS: list[tuple[float, Callable[[random.Random, str], str]]] = [
    (0.03, _entity),
    (0.015, _curly),
    (0.003, _mojibake),
    (0.02, _odd_space),
]
