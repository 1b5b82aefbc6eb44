"""CLIP BPE tokenizer: trained vocabulary, OpenAI file layout, id equality with the pure-Python reference."""

from __future__ import annotations

import gzip
import random
import re
import warnings

import pytest
import torch

from clip_model._bpe_reference import ReferenceTokenizer, bytes_to_unicode
from clip_model.tokenizer import OPENAI_NUM_MERGES, Tokenizer, clean_text, read_merges, write_merges
from pipelines.synthetic import pseudo_captions

VOCAB = 1000
# Text the fast paths could get wrong: non-ASCII scripts, HTML, whitespace, controls, case, contractions.
EDGE_CASES = [
    "",
    " ",
    "\t\n \r\n",
    "A photo of a DOG on the beach.",
    "a   photo\tof\na\r\ndog",
    "  leading and trailing  ",
    "it's they're we've I'm you'll he'd IT'S 'S 's ’s l'été d'accord ''' 'x",
    "don't stop!!! ... ??? ?!?! -- *** ((parens)) [brackets] {braces} @user #tag $5 100% a/b\\c",
    "numbers 0 12 345 6789 3.14159 1,000,000 2019-07-16 20160716_113957.JPG",
    "café naïve straße Ångström façade résumé crème brûlée ŒUVRE",
    "東京の夜景 北京 서울 日本語のテキスト",
    "مرحبا بالعالم שלום עולם",
    "emoji 😀🐶🏳️‍🌈👨‍👩‍👧 ❤️ 👍🏽 🇫🇷",
    "html &amp; &lt;b&gt; &amp;amp; &quot;quoted&quot; &#39;single&#39; &nbsp;nbsp &#x1F600; &bogus;",
    "<b>bold</b> &amp; <i>italic</i> &lt;3",
    "mojibake Ã©tÃ© â€œquotesâ€\x9d",
    "ﬁne ﬂour ＬＯＵＤ　ＮＯＩＳＥＳ ½ Ⅻ ²",
    "control\x00chars\x01\x1b[31mred\x1b[0m\x7f\x1f\x1c end",
    "\x00",
    "a \x00 b",
    "lone surrogate \ud800 here",
    "İstanbul ΣΊΣΥΦΟΣ ſ 'ſ ß ǅ",
    "combining e\u0301 a\u0308 zero\u200bwidth\u200d joiner\ufeff bom",
    "<|startoftext|> inside <|endoftext|> text <|ENDOFTEXT|>",
    "x" * 300,
    "ha" * 400,
    "word " * 2000,  # 10,000 characters
    ("a photo of a cat, 2019! " * 420)[:10000],
]


def random_unicode(n: int, seed: int) -> list[str]:
    """Strings mixing ASCII and code points from every plane, including controls and surrogates."""
    rng = random.Random(seed)
    ascii_chars = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "&", "'"]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 40)):
            r = rng.random()
            if r < 0.6:
                chars.append(rng.choice(ascii_chars))
            elif r < 0.9:
                chars.append(chr(rng.randint(0x80, 0x2FFF)))
            else:
                chars.append(chr(rng.randint(0x3000, 0x10FFFF)))
        out.append("".join(chars))
    return out


def script_mix(n: int, seed: int) -> list[str]:
    """ASCII mixed with the scripts the tokenizer's fast path lets skip ftfy (Hebrew with points, Arabic,
    kana, CJK, Hangul, emoji), plus a sprinkling of characters that must send a text down the slow path."""
    rng = random.Random(seed)
    ranges = [
        (0x591, 0x5F4),
        (0x60C, 0x6FF),
        (0x3041, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0x1F300, 0x1FAFF),
    ]
    spoilers = ["é", "\u3000", "\u200d", "\ufe0f", "&amp;", "\u05b8\u05bc", "ﬁ", "Ã©", "\u061c", "Ｌ"]
    out = []
    for _ in range(n):
        chars = [
            chr(rng.randint(*rng.choice(ranges))) if rng.random() < 0.5 else rng.choice(" abcXYZ019.,!'")
            for _ in range(rng.randint(0, 30))
        ]
        if rng.random() < 0.2:
            chars.insert(rng.randint(0, len(chars)), rng.choice(spoilers))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def merges_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "bpe.txt.gz"
    Tokenizer.train(
        pseudo_captions(3000, seed=0, num_words=3000, max_syllables=3) + EDGE_CASES[:20], VOCAB, path
    )
    return path


@pytest.fixture(scope="module")
def tok(merges_file):
    return Tokenizer(merges_file)


@pytest.fixture(scope="module")
def ref(merges_file):
    return ReferenceTokenizer(str(merges_file))


def test_train_writes_openai_layout(merges_file, tok):
    raw = gzip.decompress(merges_file.read_bytes()).decode("utf-8")
    lines = raw.split("\n")
    assert lines[0].startswith("#version")
    assert not raw.endswith("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    assert len(merges) == VOCAB - 512 - 2
    assert len(set(merges)) == len(merges)
    symbols = set(bytes_to_unicode().values())
    for a, b in merges:
        assert not a.endswith("</w>") and "</w>" not in a
        assert set(a) <= symbols and set(b.removesuffix("</w>")) <= symbols
    # OpenAI's loader slices lines 1..48,894 of the file: it must see exactly these merges.
    assert [tuple(m.split()) for m in raw.split("\n")[1 : OPENAI_NUM_MERGES + 1]] == merges
    assert (tok.vocab_size, tok.sot_token, tok.eot_token) == (VOCAB, VOCAB - 2, VOCAB - 1)


def test_plain_text_round_trip(merges_file, tok, tmp_path):
    merges = read_merges(merges_file)
    write_merges(merges, tmp_path / "bpe.txt")
    assert read_merges(tmp_path / "bpe.txt") == merges
    plain = Tokenizer(tmp_path / "bpe.txt")
    texts = pseudo_captions(50, seed=5, num_words=3000, max_syllables=3) + EDGE_CASES
    assert torch.equal(plain(texts), tok(texts))


def test_openai_sized_file_gives_49408_ids(tmp_path):
    # OpenAI's file has a bare header and more merge lines than CLIP uses; only 48,894 are taken.
    symbols = list(bytes_to_unicode().values())
    merges = [(a, b + "</w>") for a in symbols for b in symbols][:50000]
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    lines = ['"bpe_simple_vocab_16e6.txt#version: 0.2'] + [f"{a} {b}" for a, b in merges]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    tok = Tokenizer(path)
    assert (tok.vocab_size, tok.sot_token, tok.eot_token) == (49408, 49406, 49407)
    ref = ReferenceTokenizer(str(path))
    assert ref.vocab_size == 49408
    texts = ["ab", "a b c", "zz top", "ÿþ", "東京"]
    assert tok.encode_batch(texts) == [ref.encode(t) for t in texts]


def test_ids_equal_reference_on_varied_corpus(tok, ref):
    texts = (
        EDGE_CASES
        + pseudo_captions(300, seed=1, num_words=3000, max_syllables=3)
        + random_unicode(300, seed=2)
        + script_mix(300, seed=3)
    )
    expected = [ref.encode(t) for t in texts]
    assert tok.encode_batch(texts) == expected
    assert [tok.encode(t) for t in texts] == expected
    assert tok(texts).tolist() == ref.tokenize(texts)
    # Batch boundaries and cache state must not matter.
    fresh = Tokenizer(tok.merges_path, cache_size=50)
    rows = torch.cat([fresh(texts[i : i + 7]) for i in range(0, len(texts), 7)])
    assert rows.tolist() == ref.tokenize(texts)


def test_new_words_learnt_once_per_batch_equal_reference(tok, ref):
    """A batch's new chunks and words are BPE-encoded together (each distinct one once): a word new to the
    batch as a chunk of its own, inside punctuated chunks and in non-ASCII chunks, repeated within the batch
    and met again in later batches, with caches that reset in the middle of a batch."""
    texts = [
        "zorblat zorblat, zorblat. (zorblat) zorblat's ZORBLAT",
        "naïve zorblat naïve, zorblat-naïve 東京 東京の zorblat 12,345",
        "",
        "zorblat",
        "qwfp qwfp qwfp! 42 42% ar-st qwfp",
    ]
    expected = ref.tokenize(texts)
    for cache_size in (1_000_000, 3):
        fresh = Tokenizer(tok.merges_path, cache_size=cache_size)
        assert fresh(texts).tolist() == expected  # one cold batch
        assert fresh(texts[::-1]).tolist() == expected[::-1]  # the same words again, now cached (or reset)
        assert [fresh(t).tolist()[0] for t in texts] == expected  # one text per batch
        assert fresh.encode_batch(texts) == [ref.encode(t) for t in texts]
    fresh = Tokenizer(tok.merges_path)
    fresh(texts)
    # Chunks and words share one cache: a chunk's ids are its words' ids.
    assert fresh._ids["zorblat,"] == fresh._ids["zorblat"] + fresh._ids[","]
    assert fresh._ids["(zorblat)"] == fresh._ids["("] + fresh._ids["zorblat"] + fresh._ids[")"]


def test_special_tokens_and_padding(tok):
    out = tok(["", "a dog"])
    assert out.dtype == torch.long and out.shape == (2, 77)
    assert out[0, :2].tolist() == [tok.sot_token, tok.eot_token] and not out[0, 2:].any()
    n = len(tok.encode("a dog"))
    assert out[1, 0] == tok.sot_token and out[1, n + 1] == tok.eot_token and not out[1, n + 2 :].any()
    assert tok("a dog").shape == (1, 77)
    assert tok([]).shape == (0, 77)
    # The text feature is read at argmax(token id): the end token must be the largest id.
    assert out.argmax(dim=-1).tolist() == [1, n + 1]
    assert tok("<|endoftext|>")[0, :3].tolist() == [tok.sot_token, tok.eot_token, tok.eot_token]


def test_truncation_keeps_end_token(tok, ref):
    long_text = "a photo of a dog on the beach " * 40
    row = tok(long_text)[0]
    ids = ref.encode(long_text)
    assert len(ids) > 75
    assert row.tolist() == [tok.sot_token, *ids[:75], tok.eot_token]
    short = Tokenizer(tok.merges_path, context_length=10)(long_text)
    assert short.shape == (1, 10) and short[0].tolist() == [tok.sot_token, *ids[:8], tok.eot_token]


def test_truncate_false_raises_naming_text_and_length(tok):
    strict = Tokenizer(tok.merges_path, truncate=False)
    assert strict("a short caption").shape == (1, 77)
    text = "lorem ipsum " * 100
    n = len(tok.encode(text)) + 2
    with pytest.raises(ValueError, match=rf"text 1 is {n} tokens long.*context_length 77.*lorem ipsum"):
        strict(["fine", text])
    with pytest.raises(ValueError, match="truncate=False"):
        tok(["\x00" * 100 + " x" * 100], truncate=False)  # the per-text path checks length too


@pytest.mark.parametrize("text", ["", "😀🐶🏳️‍🌈", "東京の夜景", "مرحبا بالعالم", "x" * 10000, "東京 " * 2000])
def test_bad_inputs_tokenize(tok, text):
    out = tok([text])
    assert out.shape == (1, 77) and out[0, 0] == tok.sot_token and tok.eot_token in out[0].tolist()


def test_bytes_fallback_round_trips_any_character(tok):
    rng = random.Random(3)
    chars = [chr(c) for c in rng.sample(range(0x80, 0x110000), 3000) if not 0xD800 <= c < 0xE000]
    # Literal special-token text decodes as the special tokens (decode stops at the end token).
    texts = (
        chars
        + ["".join(rng.choices(chars, k=20)) for _ in range(100)]
        + [t for t in EDGE_CASES if "<|" not in t]
    )
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids).replace(" ", "") == clean_text(text).replace(" ", ""), repr(text)
    assert tok.decode(tok("hello world")[0]) == "hello world"


def test_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="bpe_simple_vocab_16e6.txt.gz.*Tokenizer.train"):
        Tokenizer()
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        Tokenizer(tmp_path / "nope.txt.gz")
    bad = tmp_path / "bad.txt"
    bad.write_text("#version: 0.2\na b\nc d e\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: expected a merge"):
        Tokenizer(bad)
    with pytest.raises(TypeError, match="text 1 is int"):
        tok(["ok", 3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size + 5])
    with pytest.raises(ValueError, match="vocab_size must be >= 514"):
        Tokenizer.train(["a"], 100, tmp_path / "x.txt")


def test_train_small_corpus_warns_and_reports_real_size(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = Tokenizer.train(["a cat", "a cat", "the dog"], 5000, tmp_path / "small.txt")
    assert any("corpus only supports" in str(w.message) for w in caught)
    n_merges = len(read_merges(tmp_path / "small.txt"))
    assert 0 < n_merges < 5000 - 514
    assert small.vocab_size == 514 + n_merges and small.eot_token == small.vocab_size - 1
    assert small.encode("a cat") == [small.encoder["a</w>"], small.encoder["cat</w>"]]


def mojibake_corpus(n: int, seed: int) -> list[str]:
    """Real mojibake (UTF-8 text decoded as cp1252 / latin-1 / macroman / cp1251, once or twice) mixed
    with clean text and with characters drawn from ftfy's own mojibake classes, ASCII around them."""
    from ftfy.badness import MOJIBAKE_CATEGORIES

    rng = random.Random(seed)
    clean = [
        "café",
        "naïve",
        "straße",
        "Ångström",
        "“quoted”",
        "€5",
        "½",
        "東京",
        "привет",
        "مرحبا",
        "😀",
        "x²",
    ]
    suspicious = "".join(MOJIBAKE_CATEGORIES.values())
    # Short texts first, where one match decides the answer (a window too small shows up there).
    pool = suspicious + "ÃÂØÙ " * 20 + "aZ(). 1"
    out = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 8))) for _ in range(n)]
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            word = rng.choice(clean)
            if r < 0.3:
                for _ in range(rng.randint(1, 2)):
                    word = word.encode("utf-8").decode(
                        rng.choice(["cp1252", "latin-1", "mac_roman", "cp1251"]), "replace"
                    )
            elif r < 0.6:
                word = "".join(rng.choice(suspicious) for _ in range(rng.randint(1, 4)))
            parts.append(word)
            parts.append(rng.choice([" ", "", "a", "A(", ") ", "\n", " x ", "1", "-"]))
        out.append("".join(parts))
    return out


def test_windowed_mojibake_check_equals_ftfy():
    from ftfy.badness import is_bad

    from clip_model.ftfy_shortcuts import SHORTCUTS, MojibakeTest

    assert isinstance(SHORTCUTS.is_bad, MojibakeTest), (
        "ftfy's regex no longer passes the proof: fast path off"
    )
    assert SHORTCUTS.is_bad._by_anchor, "ftfy's branches no longer write back: whole-regex search"
    texts = mojibake_corpus(4000, seed=0) + random_unicode(2000, seed=3) + EDGE_CASES
    answers = [is_bad(t) for t in texts]
    assert 0.2 < sum(answers) / len(answers) < 0.8  # both answers well represented
    assert [SHORTCUTS.is_bad(t) for t in texts] == answers


@pytest.mark.parametrize(
    "pattern, window, anchors",
    [
        (r"[é][a-z]|x?[à-ÿ]{2}", 3, "é" + "".join(map(chr, range(ord("à"), ord("ÿ") + 1)))),
        (r"[éè]\s[ü]", 3, "ü"),  # the branch's smallest anchor set
        (r"^[é] ", 2, "é"),
        (r"[é]\b", None, ""),  # a word boundary may look past the window
        (r"[é]$", None, ""),
        (r"[a-z][b-c]", None, ""),  # matches all-ASCII text
        (r"[^a][é]", 2, "é"),
        (r"(é)x", None, ""),
        (r"é", 1, "é"),
    ],
)
def test_mojibake_anchors_proof(pattern, window, anchors):
    import re

    from clip_model.ftfy_shortcuts import mojibake_anchors

    found = mojibake_anchors(re.compile(pattern))
    if window is None:
        assert found is None
    else:
        assert found[0] == window
        latin1 = [chr(c) for c in range(0x100)]
        assert [c for c in latin1 if found[1].match(c)] == sorted(set(anchors))
    assert mojibake_anchors(re.compile(pattern, re.IGNORECASE)) is None


def test_mojibake_test_tries_each_branch_at_its_anchors():
    """A branch is tried only at its anchors: where its match would start when the characters before the
    anchor are fixed, else around it. Branches that do not parse back to the same items are not used (the
    whole regex is searched around runs of anchors); the answers are the same either way."""
    from ftfy.badness import BADNESS_RE, is_bad

    from clip_model import ftfy_shortcuts

    pattern = re.compile(r"[éè]\s[ü]|^[ñ] |x?[à-â]\w{1,2}[Œ]|[^a]\x85")
    width, anchors, branches = ftfy_shortcuts.mojibake_anchors(pattern)
    assert [(b.anchors, b.offset) for b in branches] == [
        ([(0xFC, 0xFC)], 2),
        ([(0xF1, 0xF1)], 0),
        ([(0x152, 0x152)], None),
        ([(0x85, 0x85)], 1),
    ]
    texts = ["é ü", "ñ x", "x ñ ", "àb1Œ", "xâŒ", "b\x85", "a\x85", "é\nü", "ü é", "café", "\x85", "ñ"]
    expected = [bool(pattern.search(t)) for t in texts]
    assert expected == [1, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0]
    by_anchor = ftfy_shortcuts.MojibakeTest(pattern, width, anchors, branches)
    whole = ftfy_shortcuts.MojibakeTest(pattern, width, anchors, None)
    assert [by_anchor(t) for t in texts] == [whole(t) for t in texts] == expected
    assert "é" not in by_anchor._by_anchor  # é anchors no branch: nothing is tried at it

    # ftfy's regex: a branch written back wrongly is caught by the parse-back check, and without branches the
    # whole-regex search still answers like ftfy.
    from re import _constants, _parser

    real = ftfy_shortcuts.mojibake_anchors(BADNESS_RE)
    parsed = _parser.parse(BADNESS_RE.pattern, BADNESS_RE.flags).data[0][1][1]
    anchored = [(b.anchors, b.offset) for b in real[2]]
    assert (
        ftfy_shortcuts._written_branches(parsed, anchored, BADNESS_RE.flags, _parser, _constants) == real[2]
    )
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ftfy_shortcuts, "_item_source", lambda op, av, c: ".")
        assert (
            ftfy_shortcuts._written_branches(parsed, anchored, BADNESS_RE.flags, _parser, _constants) is None
        )
        assert ftfy_shortcuts.mojibake_anchors(BADNESS_RE)[2] is None
    corpus = mojibake_corpus(1500, seed=21)
    without = ftfy_shortcuts.MojibakeTest(BADNESS_RE, real[0], real[1], None)
    assert [without(t) for t in corpus] == [is_bad(t) for t in corpus]


def test_ampersand_without_entity_changes_nothing():
    """An '&' not before '#', a letter or a digit is no HTML reference for html.unescape nor ftfy: such
    printable ASCII text is only lowercased (no ftfy), and cleans like OpenAI's."""
    import html

    from ftfy.fixes import unescape_html

    from clip_model.ftfy_shortcuts import fast_clean, has_entity, skips_ftfy

    rng = random.Random(9)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["&"] * 20
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(20000)]
    plain = [t for t in texts if "&" in t and not has_entity(t)]
    assert len(plain) > 2000
    assert all(html.unescape(t) == t and unescape_html(t) == t for t in plain)
    assert all(skips_ftfy(t) for t in plain) and skips_ftfy("Black & White") and not skips_ftfy("R&amp;D")
    assert [fast_clean(t).split() for t in plain] == [clean_text(t).split() for t in plain]


def test_multiline_non_ascii_shortcut_equals_ftfy():
    """ftfy fixes text line by line; the shortcut does too, so mojibake at a line's start or across a break
    is judged as ftfy judges it."""
    import regex

    from clip_model.ftfy_shortcuts import SHORTCUTS, fast_clean
    from clip_model.tokenizer import _PATTERN

    rng = random.Random(13)
    base = mojibake_corpus(300, seed=5) + script_mix(1500, seed=6) + EDGE_CASES
    breaks = ["\n"] * 10 + ["\n\n", " \n", "\n ", "œ\n", "\nÃ ", "Ã\n", "\r\n", "\n’", "<\n"]
    texts = [
        "".join(rng.choice(base) + rng.choice(breaks) for _ in range(rng.randint(1, 4))) for _ in range(3000)
    ]
    texts = [t for t in texts if not t.isascii()]
    assert sum(SHORTCUTS.clean(t) is not None for t in texts) > len(texts) / 5  # the shortcut does apply
    words = regex.compile(_PATTERN, regex.IGNORECASE).findall
    assert [words(fast_clean(t)) for t in texts] == [words(clean_text(t)) for t in texts]


def test_ascii_pretokenizer_equals_clip_pattern():
    import regex

    from clip_model.tokenizer import _ASCII_PATTERN, _PATTERN

    clip = regex.compile(_PATTERN, regex.IGNORECASE)
    rng = random.Random(5)
    alphabet = [chr(c) for c in range(0x01, 0x80)] + [
        "'s",
        "'T",
        "'re",
        "'LL",
        "<|startoftext|>",
        "<|ENDOFTEXT|>",
    ]
    # The ASCII pattern only ever sees lowercased text (it has no case folding).
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))).lower() for _ in range(20000)]
    assert [_ASCII_PATTERN.findall(t) for t in texts] == [clip.findall(t) for t in texts]


def test_printable_ascii_shortcut_equals_ftfy():
    """ASCII captions with '&' skip ftfy's full pipeline; every entity mix must still clean like OpenAI's."""
    import regex

    from clip_model.ftfy_shortcuts import SHORTCUTS, fast_clean
    from clip_model.tokenizer import _PATTERN

    rng = random.Random(11)
    pieces = [
        "cats", "Dogs", " ", "&", "AT&T", "&amp;", "&amp;amp;", "&amp;amp;amp;amp;", "&amp;lt;b&amp;gt;", "&lt;", "<b>",
        "&#39;", "&#x27;", "&quot;", "&EACUTE;", "&eacute;", "&Eacute;", "&nbsp;", "&#10;", "&#233;", "&copy",
        "&copy;", "&not", "this&not that", "&#xC3;&#xA9;", "&Atilde;&copy;", "&#0;", "&#x1F600;", "&#128512;",
        "&bogus;", "&#;", "&#x;", "&amp", "&AMP;", "&LT;", "&zwj;", "&shy;", "&#x2028;", "&#13;", "&#9;",
    ]  # fmt: skip
    ascii_out = pieces[:15]  # mostly entities that decode to ASCII
    texts = [
        "".join(rng.choice(pieces if i % 2 else ascii_out) for _ in range(rng.randint(1, 8)))
        for i in range(4000)
    ]
    assert sum(SHORTCUTS.clean(t) is None for t in texts) < len(texts) / 2  # the shortcut does apply
    words = regex.compile(_PATTERN, regex.IGNORECASE).findall  # the invariant: the same pre-tokenised words
    assert [words(fast_clean(t)) for t in texts] == [words(clean_text(t)) for t in texts]


# --- realistic alt text, and the fallbacks that keep ids exact when ftfy or CPython internals change ---
@pytest.fixture(scope="module")
def alt_text():
    from pipelines.alt_text import alt_text_captions

    texts = alt_text_captions(1500, seed=7)
    assert sum(not t.isascii() for t in texts) > 150 and sum("&" in t for t in texts) > 30
    return texts


def test_ids_equal_reference_on_realistic_alt_text(tok, ref, alt_text):
    expected = ref.tokenize(alt_text)
    assert Tokenizer(tok.merges_path)(alt_text).tolist() == expected  # cold: one batch, empty caches
    fresh = Tokenizer(tok.merges_path, cache_size=500)  # many small batches, caches reset along the way
    assert (
        torch.cat([fresh(alt_text[i : i + 100]) for i in range(0, len(alt_text), 100)]).tolist() == expected
    )
    assert fresh(alt_text).tolist() == expected  # warm
    assert [tok.encode(t) for t in alt_text[:300]] == [ref.encode(t) for t in alt_text[:300]]


def _ids_with_shortcuts(monkeypatch, shortcuts, merges_path, texts):
    from clip_model import ftfy_shortcuts

    monkeypatch.setattr(ftfy_shortcuts, "SHORTCUTS", shortcuts)
    return Tokenizer(merges_path)(texts).tolist()


def test_without_re_parser_mojibake_test_falls_back_to_ftfy(monkeypatch, tok, ref, alt_text):
    import sys

    from ftfy.badness import BADNESS_RE, is_bad

    from clip_model import ftfy_shortcuts

    monkeypatch.setitem(sys.modules, "re._parser", None)  # CPython without the private module
    monkeypatch.delattr(re, "_parser")
    assert ftfy_shortcuts.mojibake_anchors(BADNESS_RE) is None
    shortcuts = ftfy_shortcuts.load_shortcuts()
    assert shortcuts.is_bad is is_bad
    texts = alt_text + mojibake_corpus(300, seed=1) + EDGE_CASES
    assert _ids_with_shortcuts(monkeypatch, shortcuts, tok.merges_path, texts) == ref.tokenize(texts)


def test_without_ftfy_internals_full_ftfy_runs(monkeypatch, tok, ref, alt_text):
    from ftfy import chardata

    from clip_model import ftfy_shortcuts

    monkeypatch.delattr(chardata, "WIDTH_MAP")  # an ftfy release that moved its tables
    with pytest.warns(UserWarning, match="shortcuts off.*WIDTH_MAP"):
        assert ftfy_shortcuts.load_shortcuts() is None
    texts = alt_text + EDGE_CASES
    assert _ids_with_shortcuts(monkeypatch, None, tok.merges_path, texts) == ref.tokenize(texts)
    assert not ftfy_shortcuts.skips_ftfy("café") and ftfy_shortcuts.skips_ftfy("a plain caption")


def test_shortcuts_that_disagree_with_ftfy_are_switched_off(monkeypatch):
    import re

    from clip_model import ftfy_shortcuts

    # A private parser (or an ftfy regex) that changed meaning: anchors that miss most mojibake.
    monkeypatch.setattr(ftfy_shortcuts, "mojibake_anchors", lambda pattern: (2, re.compile("[é]")))
    with pytest.warns(UserWarning, match="disagree with ftfy.fix_text"):
        assert ftfy_shortcuts.load_shortcuts() is None
    assert ftfy_shortcuts.disagreements(ftfy_shortcuts.SHORTCUTS) == []  # the real ones agree


def test_entity_and_quote_shortcuts_equal_ftfy(alt_text):
    import regex

    from clip_model.ftfy_shortcuts import SHORTCUTS, fast_clean
    from clip_model.tokenizer import _PATTERN

    quoted = [t for t in alt_text if re.search("[’“”]", t)] + ["it’s “ok” &amp; ‘fine’", "Ã&amp;’", "’&lt;3"]
    entities = [t for t in alt_text if "&" in t]
    assert sum(SHORTCUTS.clean(t) is not None for t in quoted) > len(quoted) / 2  # the shortcuts apply
    assert sum(SHORTCUTS.clean(t) is not None for t in entities) > len(entities) / 2
    words = regex.compile(_PATTERN, regex.IGNORECASE).findall
    texts = quoted + entities + mojibake_corpus(500, seed=2) + script_mix(500, seed=4)
    assert [words(fast_clean(t)) for t in texts] == [words(clean_text(t)) for t in texts]
