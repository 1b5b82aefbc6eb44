"""The query list: the 500,000 entries a caption must contain to enter WIT (CLIP paper, section 2.2).

Sources, as in the paper and MetaCLIP's open rebuild:
- `unigram`: every word occurring at least `min_word_count` times in an English Wikipedia dump (MediaWiki
  XML export, `.xml.bz2`, wiki markup stripped); score = count.
- `bigram`: word pairs with pointwise mutual information `ln(c(ab) N / (c(a) c(b)))` of at least
  `min_bigram_pmi` and a count of at least `min_bigram_count`; score = PMI. MetaCLIP's "PMI >= 30" is the
  ratio inside the log, so the default is ln(30).
- `title`: article titles whose page views (summed over the given Wikimedia page-view dump files) reach
  `min_page_views`; score = views. Disambiguation suffixes "(...)" are removed.
- `wordnet`: every lemma of every WordNet synset (Princeton `data.*` files) not already listed; score 0.

Normalisation: NFKC, lower case, `_` and whitespace runs to one space, trimmed; entries without a letter
or longer than `max_query_chars` are dropped. Priority (documented rule for dedupe and the cap): an entry
belongs to the first source in `source_priority` that lists it (default: unigram, bigram, title, wordnet -
the paper's order, so WordNet only adds synsets "not already listed"); when more than `max_queries` remain,
entries are ranked by (source priority, score descending, query) and the first `max_queries` are kept.

The counting is a Ray Data job: one task per dump file streams it page by page and emits partial counts
every `pages_per_batch` pages; a hash-partitioned `groupby(key).sum()` merges them, so no worker ever holds
a whole dump or the whole vocabulary. Only the thresholded lists (at most a few million rows) reach the
driver for the final ranking. The funnel (pages read, dropped by reason, input errors) travels as tally keys
through the same groupby (pipelines/wit/tally.py), so a retried task changes no count.

The sources live in their own modules: `wikipedia.py` (markup removal, counting), `pmi.py`,
`pageviews.py`, `wordnet.py`; this module assembles the list and wires the Ray Data graph.
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.stats import Funnel, write_stats
from pipelines.wit.io import expand_inputs
from pipelines.wit.pageviews import PageviewFile, strip_disambiguation
from pipelines.wit.pmi import BigramPMI, select_kind, unigram_total
from pipelines.wit.raydata import execution, sum_over_files
from pipelines.wit.wikipedia import CountWikiFile
from pipelines.wit.wordnet import read_wordnet_lemmas

SOURCES = ("unigram", "bigram", "title", "wordnet")


@dataclass
class QueryConfig:
    """Inputs, thresholds and output of the query-list job."""

    wikipedia: list[str] = field(default_factory=list)  # .xml.bz2 dump files or folders
    pageviews: list[str] = field(default_factory=list)  # page-view dump files (.gz or plain) or folders
    wordnet: list[str] = field(default_factory=list)  # folders (or files) with WordNet data.* files
    output: str = "queries"  # folder: queries.parquet + _stats.json
    min_word_count: int = 100
    min_bigram_count: int = 30
    min_bigram_pmi: float = math.log(30.0)
    min_page_views: int = 70
    pageview_projects: list[str] = field(default_factory=lambda: ["en", "en.m"])
    max_queries: int = 500_000
    max_query_chars: int = 100
    source_priority: list[str] = field(default_factory=lambda: list(SOURCES))
    pages_per_batch: int = 2000
    num_partitions: int = 64  # partitions of the count aggregation (Ray's default is 200)
    shuffle_strategy: str = "sort_shuffle_pull_based"  # see CurationConfig.shuffle_strategy


# ---------------------------------------------------------------- assembling the list


def normalize_query(text: str) -> str:
    """NFKC, lower case, `_`/whitespace runs collapsed to one space, trimmed."""
    text = unicodedata.normalize("NFKC", text).lower().replace("_", " ")
    return " ".join(text.split())


def assemble_queries(
    candidates: Iterable[pd.DataFrame],
    max_queries: int,
    max_query_chars: int = 100,
    source_priority: Iterable[str] = SOURCES,
) -> tuple[pd.DataFrame, Funnel]:
    """Normalise, de-duplicate and cap candidate entries (DataFrames with query, source, score).

    See the module docstring for the priority rule. Returns (query, source, score) sorted by that rank.
    """
    funnel = Funnel()
    priority = {s: i for i, s in enumerate(source_priority)}
    frames = [c for c in candidates if len(c)]
    df = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["query", "source", "score"])
    )
    n_in = len(df)
    df["query"] = [normalize_query(q) for q in df["query"].astype(str)]
    bad = df["query"].map(lambda q: not q or len(q) > max_query_chars or not any(ch.isalpha() for ch in q))
    too_long = df["query"].str.len() > max_query_chars
    dropped = {"invalid_query": int((bad & ~too_long).sum()), "too_long": int(too_long.sum())}
    unknown = ~df["source"].isin(list(priority))
    dropped["unknown_source"] = int((unknown & ~bad).sum())
    df = df[~bad & ~unknown].copy()
    df["rank"] = df["source"].map(priority)
    df = df.sort_values(["rank", "score", "query"], ascending=[True, False, True], kind="stable")
    before = len(df)
    df = df.drop_duplicates("query", keep="first")
    dropped["duplicate"] = before - len(df)
    dropped["over_cap"] = max(0, len(df) - max_queries)
    df = df.head(max_queries)
    funnel.record("queries", n_in, len(df), dropped)
    funnel.add_counts("queries_by_source", df["source"].value_counts().to_dict())
    out = df[["query", "source", "score"]].reset_index(drop=True)
    out["score"] = out["score"].astype("float64")
    return out, funnel


def build_query_list(cfg: QueryConfig) -> pd.DataFrame:
    """The Ray Data job: count, threshold, assemble; writes `queries.parquet` and `_stats.json`."""
    with execution(cfg.shuffle_strategy):
        return _build_query_list(cfg)


def _wikipedia_candidates(cfg: QueryConfig, files: list[str], funnel: Funnel) -> list[pd.DataFrame]:
    """Unigram and bigram (PMI) candidates from the dumps; the counting's funnel goes into `funnel`."""
    import ray
    from ray.data.expressions import col

    counter = {"pages_per_batch": cfg.pages_per_batch}
    counts, tallies = sum_over_files(files, CountWikiFile, counter, "key", "count", cfg.num_partitions)
    funnel.merge(tallies)
    # Only thresholded rows reach the driver: unigrams frequent enough to be in a kept bigram
    # (count >= min(min_word_count, min_bigram_count), ~1M words for all of Wikipedia) and the bigrams
    # that pass the PMI test, which is computed in parallel on the workers.
    keep_min = min(cfg.min_word_count, cfg.min_bigram_count)
    unigrams = (
        counts.filter(expr=col("count") >= int(keep_min))
        .map_batches(select_kind, fn_kwargs={"bigrams": False}, batch_format="pyarrow")
        .to_pandas()
    )
    total_words = int(counts.map_batches(unigram_total, batch_format="pyarrow").sum("total") or 0)
    words = unigrams[unigrams["count"] >= cfg.min_word_count]
    pmi = (
        counts.filter(expr=col("count") >= int(cfg.min_bigram_count))
        .map_batches(select_kind, fn_kwargs={"bigrams": True}, batch_format="pyarrow")
        .map_batches(
            BigramPMI,
            fn_constructor_kwargs={
                "unigram_counts": ray.put(dict(zip(unigrams["key"], unigrams["count"]))),
                "total_words": total_words,
                "min_count": cfg.min_bigram_count,
                "min_pmi": cfg.min_bigram_pmi,
            },
            batch_format="pandas",
            concurrency=(1, max(1, cfg.num_partitions)),
        )
        .to_pandas()
    )
    funnel.add_counts(
        "wikipedia", {"total_words": total_words, "unique_unigrams_and_bigrams": counts.count()}
    )
    return [
        pd.DataFrame({"query": words["key"], "source": "unigram", "score": words["count"]}),
        pmi.assign(source="bigram"),
    ]


def _title_candidates(cfg: QueryConfig, files: list[str], funnel: Funnel) -> pd.DataFrame:
    from ray.data.expressions import col

    counter = {"projects": cfg.pageview_projects}
    views, tallies = sum_over_files(files, PageviewFile, counter, "title", "views", cfg.num_partitions)
    funnel.merge(tallies)
    views = views.filter(expr=col("views") >= int(cfg.min_page_views)).to_pandas()
    titles = [strip_disambiguation(t) for t in views["title"]]
    return pd.DataFrame({"query": titles, "source": "title", "score": views["views"]})


def _build_query_list(cfg: QueryConfig) -> pd.DataFrame:
    started = time.time()
    candidates: list[pd.DataFrame] = []
    funnel = Funnel()
    wiki_files = expand_inputs(cfg.wikipedia) if cfg.wikipedia else []
    if wiki_files:
        candidates += _wikipedia_candidates(cfg, wiki_files, funnel)
    view_files = expand_inputs(cfg.pageviews) if cfg.pageviews else []
    if view_files:
        candidates.append(_title_candidates(cfg, view_files, funnel))
    if cfg.wordnet:
        errors: Counter = Counter()
        lemmas = read_wordnet_lemmas(cfg.wordnet, errors)
        funnel.add_counts("wordnet_input_errors", errors)
        candidates.append(pd.DataFrame({"query": lemmas, "source": "wordnet", "score": 0.0}))

    queries, assembled = assemble_queries(
        candidates, cfg.max_queries, cfg.max_query_chars, cfg.source_priority
    )
    funnel.merge(assembled)
    storage.makedirs(cfg.output)
    fs, path = storage.resolve(storage.join(cfg.output, "queries.parquet"))
    pq.write_table(pa.Table.from_pandas(queries, preserve_index=False), path, filesystem=fs)
    stats = funnel.to_dict()
    stats["seconds"] = round(time.time() - started, 3)
    stats["num_queries"] = len(queries)
    write_stats(storage.join(cfg.output, "_stats.json"), stats)
    return queries


def load_queries(uri: str) -> list[str]:
    """The query strings of a `queries.parquet` (a file, or a folder holding one)."""
    fs, path = storage.resolve(uri)
    if not path.endswith(".parquet"):
        path = path.rstrip("/") + "/queries.parquet"
    return pq.read_table(path, columns=["query"], filesystem=fs).column("query").to_pylist()


def main(argv: list[str] | None = None) -> None:
    from pipelines.config import parse_args

    cfg = parse_args(QueryConfig, argv, description="Build the WIT query list (Ray Data).")
    queries = build_query_list(cfg)
    print(f"{len(queries)} queries -> {storage.join(cfg.output, 'queries.parquet')}")


if __name__ == "__main__":
    main()
