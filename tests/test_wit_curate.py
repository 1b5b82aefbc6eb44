"""End to end on Ray: query list job from a dump + page views + WordNet, then curation to Parquet."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.fingerprint import StaleOutput
from pipelines.wit.candidates import ColumnNames
from pipelines.wit.curate import CurationConfig, buckets_for, curate, curate_or_reuse
from pipelines.wit.filters import FilterConfig
from pipelines.wit.formats import (
    Synset,
    WatPage,
    write_mediawiki_dump,
    write_pageviews,
    write_wat,
    write_wordnet,
)
from pipelines.wit.queries import QueryConfig, build_query_list

ANIMALS = ["dog", "cat", "horse", "zebra"]


def test_configs_load_from_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("inputs: [a.wat.gz]\ncolumns: {url: image}\nfilters: {min_words: 3}\n")
    cfg = load_config(CurationConfig, tmp_path / "c.yaml", ["max_per_query=7"])
    assert (cfg.columns.url, cfg.filters.min_words, cfg.max_per_query) == ("image", 3, 7)
    with pytest.raises(ConfigError, match="min_word"):
        load_config(QueryConfig, overrides=["min_word=5"])


def test_query_job_on_ray(ray_local, tmp_path):
    prose = "The dog chased the cat across the garden. A horse stood near the old barn. Red wine."
    pages = [(f"Page {i}", prose * 3) for i in range(20)] + [
        ("Talk:Page", prose, 1),
        ("Dog2", "#REDIRECT [[Dog]]"),
    ]
    dumps = [write_mediawiki_dump(tmp_path / f"enwiki-{i}.xml.bz2", pages[i::2]) for i in range(2)]
    views = write_pageviews(
        tmp_path / "pageviews-20240101-000000.gz", [("en", "Eiffel_Tower", 900), ("de", "Hund", 900)]
    )
    write_wordnet(
        tmp_path / "wn", [Synset("n", ["dog", "domestic dog"], "a canine"), Synset("n", ["zebra"], "")]
    )
    cfg = QueryConfig(
        wikipedia=[str(p) for p in dumps],
        pageviews=[str(views)],
        wordnet=[str(tmp_path / "wn")],
        output=str(tmp_path / "q"),
        min_word_count=50,
        min_bigram_count=50,
        min_bigram_pmi=0.0,
        min_page_views=100,
        pages_per_batch=4,
        num_partitions=2,
    )
    queries = build_query_list(cfg)
    by_source = dict(zip(queries["query"], queries["source"]))
    assert by_source["dog"] == "unigram" and by_source["horse"] == "unigram"  # 60 occurrences each
    assert "the dog" in by_source and by_source["the dog"] == "bigram"
    assert by_source["eiffel tower"] == "title" and "hund" not in by_source
    assert by_source["domestic dog"] == "wordnet" and by_source["zebra"] == "wordnet"
    stats = json.loads((tmp_path / "q" / "_stats.json").read_text())
    assert stats["stages"]["wiki_pages"] == {
        "in": 22,
        "out": 20,
        "dropped": {"not_article": 1, "redirect": 1},
    }
    assert pq.read_table(tmp_path / "q" / "queries.parquet").num_rows == len(queries)


def test_curation_end_to_end(ray_local, tmp_path):
    queries = tmp_path / "queries.parquet"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(pa.table({"query": ANIMALS, "source": ["unigram"] * 4, "score": [1.0] * 4}), queries)
    rng = random.Random(0)
    rows = []
    for i in range(300):
        animal = ANIMALS[0] if i < 200 else rng.choice(ANIMALS[1:])
        rows.append((f"https://img.example.com/{i}.jpg", f"A happy {animal} playing in the green park"))
    rows += rows[:10]  # exact duplicates
    rows += [
        (f"https://img.example.com/{i}.jpg", "Another photo of a dog sleeping on the sofa") for i in range(5)
    ]
    rows += [
        ("https://img.example.com/fr.jpg", "Un chien heureux qui joue dans le parc vert"),
        ("https://img.example.com/none.jpg", "A wooden table with four chairs in the kitchen"),
        ("https://img.example.com/cam.jpg", "IMG_20160716_113957"),
    ]
    table = pa.table({"image": [u for u, _ in rows], "alt": [c for _, c in rows]})
    pq.write_table(table.slice(0, 150), inputs / "part-0.parquet")
    table.slice(150).to_pandas().to_csv(inputs / "part-1.csv.gz", index=False)
    write_wat(
        inputs / "crawl.warc.wat.gz",
        [
            WatPage(
                "https://blog.example.org/post/1",
                [{"url": "../img/cat.png", "alt": "My black cat on the warm windowsill"}],
            )
        ],
        extra_records=[b"{not json"],
    )
    cfg = CurationConfig(
        inputs=[str(inputs)],
        queries=str(queries),
        output=str(tmp_path / "out"),
        columns=ColumnNames(url="image", caption="alt"),
        filters=FilterConfig(),
        max_per_query=50,
        num_buckets=4,
    )
    stats = curate(cfg)
    out = pq.read_table(tmp_path / "out").to_pandas()
    assert list(out.columns) == ["url", "caption", "page_url", "source", "matched_queries", "query"]
    assert out["url"].is_unique
    counts = out["query"].value_counts()
    assert counts["dog"] == 50  # 200 dog captions capped exactly
    assert all(q in row for q, row in zip(out["query"], out["matched_queries"]))
    assert "https://blog.example.org/img/cat.png" in set(out["url"])
    st = stats["stages"]
    assert st["read"]["dropped"] == {"malformed_record": 1}
    assert st["text_filter"]["dropped"]["not_english"] == 1
    assert st["text_filter"]["dropped"]["auto_generated_caption"] == 1
    assert st["match"]["dropped"] == {"no_match": 1}
    assert st["dedupe"]["dropped"] == {"duplicate_pair": 10, "duplicate_url": 5}
    assert st["balance"]["out"] == len(out)
    assert stats["counters"]["query_counts_before"]["dog"] == 200
    assert stats["counters"]["query_counts_after"]["dog"] == 50
    assert json.loads((tmp_path / "out" / "_stats.json").read_text())["num_curated"] == len(out)

    # Nothing survives: an empty table with the output schema, and a consistent funnel.
    (tmp_path / "other").mkdir()
    pq.write_table(
        pa.table({"image": ["https://x.org/a.jpg"], "alt": ["Le chat noir dort sur le canapé"]}),
        tmp_path / "other" / "t.parquet",
    )
    empty = curate(
        CurationConfig(
            **{**cfg.__dict__, "inputs": [str(tmp_path / "other")], "output": str(tmp_path / "empty")}
        )
    )
    assert empty["num_curated"] == 0 and empty["stages"]["text_filter"]["dropped"] == {"not_english": 1}
    assert pq.read_table(tmp_path / "empty").schema.names == list(out.columns)
    assert empty["stages"]["balance"] == {"in": 0, "out": 0, "dropped": {}}

    # No input at all (an empty folder): the same empty table and a zero funnel, no exception.
    (tmp_path / "none").mkdir()
    none = curate(
        CurationConfig(**{**cfg.__dict__, "inputs": [str(tmp_path / "none")], "output": str(tmp_path / "o0")})
    )
    assert none["num_curated"] == 0 and none["stages"]["read"] == {"in": 0, "out": 0, "dropped": {}}
    assert pq.read_table(tmp_path / "o0").schema.names == list(out.columns)


def _small_curation(tmp_path, name: str, **overrides) -> CurationConfig:
    """Two input files, two queries, duplicates and a cap that bites: every stage has counts."""
    inputs = tmp_path / "small_inputs"
    if not inputs.exists():
        inputs.mkdir()
        pq.write_table(
            pa.table({"query": ["dog", "cat"], "source": ["unigram"] * 2, "score": [1.0] * 2}),
            tmp_path / "small_q.parquet",
        )
        rows = [
            (
                f"https://img.example.com/{i}.jpg",
                f"A happy {'dog' if i % 3 else 'cat'} playing in the green park",
            )
            for i in range(90)
        ]
        rows += rows[:6] + [("https://img.example.com/x.jpg", "Une table en bois dans la cuisine")]
        table = pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]})
        pq.write_table(table.slice(0, 50), inputs / "a.parquet")
        pq.write_table(table.slice(50), inputs / "b.parquet")
    base = dict(inputs=[str(inputs)], queries=str(tmp_path / "small_q.parquet"), output=str(tmp_path / name),
                max_per_query=20, batch_rows=16, rows_per_bucket=40)  # fmt: skip
    return CurationConfig(**{**base, **overrides})


def _curated(out) -> list[dict]:
    return sorted(pq.read_table(out).to_pylist(), key=lambda r: r["url"])


def test_reuse_only_when_settings_and_inputs_match(ray_local, tmp_path):
    cfg = _small_curation(tmp_path, "reuse")
    first = curate_or_reuse(cfg)
    assert (tmp_path / "reuse" / "_fingerprint.json").exists()
    assert curate_or_reuse(cfg) == first  # same settings and inputs: reused, not rerun
    with pytest.raises(StaleOutput, match=r"max_per_query: 20 -> 10.*curation.redo"):
        curate_or_reuse(_small_curation(tmp_path, "reuse", max_per_query=10))
    (tmp_path / "small_inputs" / "c.parquet").write_bytes(
        (tmp_path / "small_inputs" / "a.parquet").read_bytes()
    )
    with pytest.raises(StaleOutput, match="input added: .*c.parquet"):
        curate_or_reuse(cfg)
    redone = curate_or_reuse(_small_curation(tmp_path, "reuse", max_per_query=10, redo=True))
    assert redone["counters"]["query_counts_after"] == {"dog": 10, "cat": 10}
    assert len(_curated(tmp_path / "reuse")) == 20  # the old parts were replaced, not added to


def test_bucket_count_follows_input_size():
    cfg = CurationConfig(rows_per_bucket=1000)
    assert [buckets_for(cfg, n) for n in (0, 1, 1000, 1001, 10**9)] == [1, 1, 1, 2, 10**6]
    assert buckets_for(CurationConfig(num_buckets=3), 10**9) == 3
    with pytest.raises(ValueError, match="rows_per_bucket"):
        CurationConfig(rows_per_bucket=0)
