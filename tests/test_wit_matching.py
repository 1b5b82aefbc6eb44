"""Aho-Corasick matching on word boundaries, case-insensitive, every matched query listed."""

from __future__ import annotations

import pyarrow as pa

from pipelines.wit.matching import QueryMatcher, match_key


def test_word_boundaries_case_and_overlaps():
    m = QueryMatcher(["dog", "New York", "york", "new york city", "cat", "AT&T", "hot dog", "art"])
    assert m.match("A hot-dog stand in NEW YORK CITY, near AT&T.") == [
        "hot dog",
        "dog",
        "New York",
        "york",
        "new york city",
        "AT&T",
    ]
    assert m.match("Dogs, concatenate, cathedral, earth, party") == []  # no partial words
    assert m.match("cat") == ["cat"] and m.match("") == []
    assert match_key("Ça  va—bien!") == " ça va bien "


def test_batch_keeps_matched_rows_with_lists():
    m = QueryMatcher(["red", "car", "red car"])
    batch = pa.table({"url": ["a", "b", "c"], "caption": ["A red car", "A blue bus", "Red, red wine"]})
    out, dropped = m(batch)
    assert out.column("url").to_pylist() == ["a", "c"]
    assert out.column("matched_queries").to_pylist() == [["red", "red car", "car"], ["red"]]
    assert dropped == {"no_match": 1}


def _per_caption(m: QueryMatcher, caption: str) -> list[str]:
    """The word-boundary semantics as first written: one key and one automaton scan per caption."""
    return [m.queries[i] for i in dict.fromkeys(v for _, v in m.automaton.iter(match_key(caption)))]


def test_batched_matching_equals_per_caption_matching():
    import random

    rng = random.Random(7)
    words = [
        "dog",
        "Hot",
        "new",
        "York",
        "café",
        "ΣΟΦΌΣ",
        "σοφός",
        "İstanbul",
        "straße",
        "東京",
        "a_b",
        "x2",
        "2024",
        "NEW-YORK",
        "don't",
    ]
    words += [
        "e-mail",
        "東京タワー",
        "naïve",
        "ﬁsh",
        "fish",
        "ǅemal",
        "ß",
        "ꙮ",
    ]  # ꙮ: the batch separator, in a caption
    seps = [" ", "  ", ", ", "-", "_", ".", "!", "\t", "\n", "—", "", "’", "/", " (", ") ", "\x00"]
    queries = [
        "dog",
        "hot dog",
        "new york",
        "york",
        "café",
        "σοφός",
        "istanbul",
        "straße",
        "東京",
        "a b",
        "x2",
        "2024",
        "don t",
        "e mail",
    ]
    queries += ["fish", "ǆemal", "ss", "naïve", "new", "ΣΟΦΟΣ"]
    m = QueryMatcher(queries)
    captions = ["", " ", "!!!", "\x00", "dog"]
    for _ in range(3000):
        n = rng.randint(0, 8)
        captions.append("".join(rng.choice(words) + rng.choice(seps) for _ in range(n)))
    captions = [c for c in captions if "ꙮ" not in c] + [c for c in captions if "ꙮ" in c]
    for start in range(0, len(captions), 97):  # several batch sizes and boundaries; the last ones fall back
        batch = captions[start : start + rng.randint(1, 200)]
        assert m.match_batch(batch) == [_per_caption(m, c) for c in batch]
    assert sum(bool(x) for x in m.match_batch(captions)) > 1000  # the set exercises real matches
    assert m.match_batch(["Hot dog\x00", "NEW YORK"]) == [["hot dog", "dog"], ["new", "new york", "york"]]
