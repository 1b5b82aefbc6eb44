"""Query list pieces without Ray: markup stripping, dump/page-view/WordNet readers, assembly rules."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from pipelines.wit.formats import Synset, write_mediawiki_dump, write_pageviews, write_wordnet
from pipelines.wit.pageviews import iter_pageviews
from pipelines.wit.pmi import bigram_pmi
from pipelines.wit.queries import assemble_queries
from pipelines.wit.tally import keyed_funnel
from pipelines.wit.wikipedia import CountWikiFile, iter_wiki_pages, strip_wiki_markup, words_and_bigrams
from pipelines.wit.wordnet import read_wordnet_lemmas

WIKITEXT = """{{Infobox animal|name=Dog|image=Dog.jpg}}
The '''dog''' (''Canis familiaris'') is a [[domesticated]] descendant of the [[wolf|wolves]].<ref>Smith 2000</ref>
[[File:Dog.jpg|thumb|A [[puppy]] on the beach]]
== History ==
* Dogs were [https://example.com tamed] long ago &amp; loved. <!-- hidden note -->
{| class=wikitable
| tablecell || b
|}
[[Category:Animals]] [[fr:Chien]]"""


def test_strip_markup_keeps_prose_only():
    text = strip_wiki_markup(WIKITEXT)
    words, bigrams = words_and_bigrams(text)
    assert "wolves" in words and "wolf" not in words  # link label, not target
    assert "tamed" in words and "&" in text
    for junk in (
        "infobox",
        "ref",
        "smith",
        "category",
        "animals",
        "chien",
        "tablecell",
        "hidden",
        "thumb",
        "puppy",
    ):
        assert junk not in words, junk
    assert "the dog" in bigrams and "wolves dogs" not in bigrams  # bigrams stay inside a clause


def test_dump_reader_streams_and_survives_truncation(tmp_path):
    pages = [(f"Page {i}", f"Text number {i} about dogs.") for i in range(300)] + [("Talk:X", "chat", 1)]
    good = write_mediawiki_dump(tmp_path / "a.xml.bz2", pages)
    errors: Counter = Counter()
    read = list(iter_wiki_pages(str(good), errors))
    assert len(read) == 301 and read[-1][:2] == ("Talk:X", 1) and not errors
    data = good.read_bytes()
    (tmp_path / "b.xml.bz2").write_bytes(data[: len(data) * 2 // 3])
    errors = Counter()
    partial = list(iter_wiki_pages(str(tmp_path / "b.xml.bz2"), errors))
    assert errors == {"truncated_input": 1} and len(partial) < 301

    tables = list(CountWikiFile(pages_per_batch=100).count_file(str(good)))
    counts = Counter()
    for t in tables:
        counts.update(dict(zip(t.column("key").to_pylist(), t.column("count").to_pylist())))
    assert len(tables) == 4 and counts["dogs"] == 300 and counts["about dogs"] == 300 and "chat" not in counts
    # The last table is the file's funnel as tally keys, summed by the same groupby as the words.
    funnel = keyed_funnel(list(counts), list(counts.values())).to_dict()
    assert funnel["stages"]["wiki_pages"] == {"in": 301, "out": 300, "dropped": {"not_article": 1}}


def test_pageviews_reader(tmp_path):
    path = write_pageviews(
        tmp_path / "pageviews-20240101-000000.gz",
        [
            ("en", "Eiffel Tower", 10),
            ("en.m", "Special:Search", 99),
            ("de", "Hund", 50),
            ("en", "Caf%C3%A9", 3),
        ],
    )
    with open(path, "ab") as f:  # a second gzip member with a bad line and non-UTF-8 bytes
        import gzip

        f.write(gzip.compress(b"en broken\nen \xff\xfe 4 0\n"))
    errors: Counter = Counter()
    rows = list(iter_pageviews(str(path), ["en", "en.m"], errors))
    assert rows == [("Eiffel Tower", 10), ("Café", 3)]
    assert errors == {"not_article": 1, "malformed_line": 2}


def test_wordnet_reader(tmp_path):
    write_wordnet(
        tmp_path,
        [
            Synset("n", ["dog", "domestic dog", "Canis familiaris"], "a canine"),
            Synset("a", ["red(a)"], "a colour"),
        ],
    )
    assert (tmp_path / "index.noun").read_text().count("domestic_dog n 1") == 1
    data = (tmp_path / "data.noun").read_bytes()
    offset = int((tmp_path / "index.noun").read_text().split("dog n 1 0 1 0 ")[1][:8])
    assert data[offset:].startswith(f"{offset:08d} 03 n 03 dog".encode())  # real byte offsets
    assert sorted(read_wordnet_lemmas([str(tmp_path)])) == ["Canis familiaris", "dog", "domestic dog", "red"]
    for data_file in tmp_path.glob("data.*"):
        data_file.unlink()
    with open(tmp_path / "index.noun", "a") as f:
        f.write("broken line\n")
    errors = Counter()
    assert sorted(read_wordnet_lemmas([str(tmp_path)], errors)) == [
        "canis familiaris",
        "dog",
        "domestic dog",
        "red",
    ]
    assert errors == {"malformed_line": 1}


def test_pmi_and_assembly_priority():
    bigrams = pd.DataFrame({"key": ["new york", "of the", "rare pair"], "count": [50, 80, 2]})
    unigrams = {"new": 60, "york": 55, "of": 5000, "the": 9000, "rare": 2, "pair": 2}
    pmi = bigram_pmi(bigrams, unigrams, total_words=100_000, min_count=5, min_pmi=3.4)
    assert list(pmi["query"]) == ["new york"]

    frames = [
        pd.DataFrame({"query": ["Dog", "cat", "tree"], "source": "unigram", "score": [300, 200, 100]}),
        pd.DataFrame({"query": ["new york"], "source": "bigram", "score": [7.0]}),
        pd.DataFrame({"query": ["Eiffel_Tower", "dog"], "source": "title", "score": [900, 5]}),
        pd.DataFrame(
            {"query": ["domestic  dog", "DOG", "", "1999", "x" * 101], "source": "wordnet", "score": 0.0}
        ),
    ]
    out, funnel = assemble_queries(frames, max_queries=5)
    assert list(out["query"]) == ["dog", "cat", "tree", "new york", "eiffel tower"]
    assert out.loc[0, "source"] == "unigram"  # first source in priority wins the duplicate
    stage = funnel.to_dict()["stages"]["queries"]
    assert stage == {
        "in": 11,
        "out": 5,
        "dropped": {"invalid_query": 2, "too_long": 1, "duplicate": 2, "over_cap": 1},
    }
    funnel.check()
    wordnet_first, _ = assemble_queries(
        frames, max_queries=2, source_priority=["wordnet", "unigram", "bigram", "title"]
    )
    assert list(wordnet_first["query"]) == ["dog", "domestic dog"] and set(wordnet_first["source"]) == {
        "wordnet"
    }
