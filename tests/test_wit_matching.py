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
