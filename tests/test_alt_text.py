"""The realistic alt-text generator: deterministic, a large vocabulary, and the mix the tokenizer benchmark needs."""

from __future__ import annotations

import re

from pipelines.alt_text import alt_text_captions, alt_text_vocabulary


def test_deterministic_per_seed_and_vocabulary_fixed_by_its_own_seed():
    a = alt_text_captions(300, seed=3)
    assert a == alt_text_captions(300, seed=3)
    assert a != alt_text_captions(300, seed=4)
    assert alt_text_vocabulary(0) == alt_text_vocabulary(0)
    assert alt_text_vocabulary(0) != alt_text_vocabulary(1)


def test_vocabulary_and_mix_look_like_web_alt_text():
    assert len(alt_text_vocabulary()) >= 50_000
    captions = alt_text_captions(5000, seed=0)
    words = {w for c in captions for w in c.split()}
    assert len(words) > 10_000  # a long tail: most words are rare, not a small vocabulary repeated
    share = sum(not c.isascii() for c in captions) / len(captions)
    assert 0.10 <= share <= 0.20, share

    def count(pattern: str) -> int:
        return sum(bool(re.search(pattern, c)) for c in captions)

    assert count(r"&[#a-z0-9]+;") > 50  # HTML entities
    assert count(r"\d") > 1000  # numbers, prices, sizes, dates
    assert count(r"[’“”]") > 20  # curly quotes (ftfy changes them)
    assert count(r"[\u4e00-\u9fff]") > 20 and count(r"[\u0400-\u04ff]") > 20  # CJK, Cyrillic
    assert count(r"[\uac00-\ud7a3]") > 10 and count(r"[\U0001F300-\U0001FAFF]") > 10  # Hangul, emoji
    assert count(r"[àâäéèêëïîôöùûüçñßøå]") > 50  # accented Latin
    assert count(r"(IMG|DSC|PXL)_\d+") > 10  # camera file names
    assert count("Ã") > 3  # a little mojibake
    lengths = sorted(len(c.split()) for c in captions)
    assert lengths[len(lengths) // 2] in range(5, 12) and lengths[-1] >= 25
