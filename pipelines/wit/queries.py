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
driver for the final ranking.
"""

from __future__ import annotations

import html
import math
import re
import time
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.stats import Funnel, get_or_create_stats_actor, write_stats
from pipelines.wit.io import TRUNCATION_ERRORS, expand_inputs, open_input

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
    stats_actor: str = "wit_queries_stats"


# ---------------------------------------------------------------- Wikipedia dump


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_NOWIKI = re.compile(r"<(math|gallery|timeline|syntaxhighlight|source|pre|score)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)
_NAMESPACED_LINK = re.compile(r"\[\[[A-Za-z][\w\- ]{1,20}:[^\[\]]*\]\]")
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_URL = re.compile(r"https?://\S+")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)
_BEHAVIOR = re.compile(r"__[A-Z]+__")
_SEGMENT_SPLIT = re.compile(r"[.!?;:,()\[\]{}\"|\n\r\t]+")
_WORD = re.compile(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*")


def _remove_nested(pattern: re.Pattern, text: str) -> str:
    while True:
        text, n = pattern.subn(" ", text)
        if not n:
            return text


def strip_wiki_markup(text: str) -> str:
    """Plain prose from wikitext: templates, tables, refs, tags, files and categories removed; links
    replaced by their label; emphasis and heading marks dropped."""
    text = _COMMENT.sub(" ", text)
    text = _NOWIKI.sub(" ", text)
    text = _REF.sub(" ", text)
    text = _remove_nested(_TEMPLATE, text)
    text = _remove_nested(_TABLE, text)
    # Links nested in file captions ([[File:x.jpg|a [[cat]] here]]): resolve inner links first.
    for _ in range(3):
        text = _LINK.sub(
            lambda m: m.group(1) if ":" not in m.group(0)[:-2].split("|")[0] else m.group(0), text
        )
        text = _NAMESPACED_LINK.sub(" ", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _URL.sub(" ", text)
    text = _TAG.sub(" ", text)
    text = _BEHAVIOR.sub(" ", text)
    text = _HEADING.sub(r"\2", text)
    text = _LIST_MARK.sub("", text)
    text = _EMPHASIS.sub("", text)
    return html.unescape(text)


def words_and_bigrams(text: str) -> tuple[list[str], list[str]]:
    """Lower-cased words (letters, inner apostrophes/hyphens) and the bigrams inside each clause."""
    words: list[str] = []
    bigrams: list[str] = []
    for segment in _SEGMENT_SPLIT.split(text.lower()):
        seg_words = _WORD.findall(segment)
        words += seg_words
        bigrams += [f"{a} {b}" for a, b in zip(seg_words, seg_words[1:])]
    return words, bigrams


def iter_wiki_pages(uri: str, errors: Counter | None = None) -> Iterator[tuple[str, int, str]]:
    """Stream `(title, namespace, wikitext)` from a MediaWiki XML export (plain, .bz2 or .gz).

    A truncated or corrupt file ends the stream with `errors["truncated_input"] += 1`; the pages read
    before the damage are kept.
    """
    errors = errors if errors is not None else Counter()
    with open_input(uri) as f:
        context = ET.iterparse(f, events=("start", "end"))
        root = None
        try:
            for event, elem in context:
                if root is None and event == "start":
                    root = elem
                if event != "end" or not elem.tag.endswith("}page") and elem.tag != "page":
                    continue
                title, ns, text = "", 0, ""
                for child in elem.iter():
                    tag = child.tag.rsplit("}", 1)[-1]
                    if tag == "title":
                        title = child.text or ""
                    elif tag == "ns":
                        ns = int(child.text or 0)
                    elif tag == "text":
                        text = child.text or ""
                yield title, ns, text
                root.clear()  # drop finished pages: memory stays at one page
        except ET.ParseError:
            errors["truncated_input"] += 1
        except TRUNCATION_ERRORS:
            errors["truncated_input"] += 1


class CountWikiFile:
    """Ray Data UDF: one dump file path in, partial `(key, count)` batches out (key = word or "a b")."""

    def __init__(self, pages_per_batch: int = 2000, stats_actor: str | None = None):
        self.pages_per_batch = pages_per_batch
        self.stats_actor = stats_actor

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        for uri in batch["path"]:
            yield from self.count_file(str(uri))

    def count_file(self, uri: str) -> Iterator[pa.Table]:
        errors: Counter = Counter()
        dropped: Counter = Counter()
        counts: Counter = Counter()
        n_pages = n_kept = pending = 0
        for _title, ns, text in iter_wiki_pages(uri, errors):
            n_pages += 1
            if ns != 0:
                dropped["not_article"] += 1
                continue
            if text.lstrip()[:9].upper() == "#REDIRECT":
                dropped["redirect"] += 1
                continue
            n_kept += 1
            pending += 1
            words, bigrams = words_and_bigrams(strip_wiki_markup(text))
            counts.update(words)
            counts.update(bigrams)
            if pending >= self.pages_per_batch:
                yield _counts_table(counts)
                counts, pending = Counter(), 0
        if counts:
            yield _counts_table(counts)
        funnel = Funnel()
        funnel.record("wiki_pages", n_pages, n_kept, dropped)
        funnel.add_counts("wiki_input_errors", errors)
        _report(self.stats_actor, funnel)


def _counts_table(counts: Counter) -> pa.Table:
    return pa.table({"key": list(counts.keys()), "count": pa.array(list(counts.values()), pa.int64())})


def _select_kind(batch: pa.Table, bigrams: bool) -> pa.Table:
    is_bigram = pc.match_substring(batch.column("key"), " ")
    return batch.filter(is_bigram if bigrams else pc.invert(is_bigram))


class BigramPMI:
    """Ray Data UDF over aggregated bigram counts: keeps (query, score=PMI) rows above the thresholds."""

    def __init__(self, unigram_counts: Any, total_words: int, min_count: int, min_pmi: float):
        import ray

        self.unigrams = (
            ray.get(unigram_counts) if isinstance(unigram_counts, ray.ObjectRef) else unigram_counts
        )
        self.total_words, self.min_count, self.min_pmi = total_words, min_count, min_pmi

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return bigram_pmi(batch, self.unigrams, self.total_words, self.min_count, self.min_pmi)


def _unigram_total(batch: pa.Table) -> pa.Table:
    is_word = pc.invert(pc.match_substring(batch.column("key"), " "))
    return pa.table({"total": [pc.sum(pc.filter(batch.column("count"), is_word)).as_py() or 0]})


def _report(stats_actor: str | None, funnel: Funnel) -> None:
    if stats_actor:
        import ray

        ray.get(get_or_create_stats_actor(stats_actor).merge.remote(funnel.to_dict()))


def bigram_pmi(
    bigrams: pd.DataFrame, unigram_counts: dict[str, int], total_words: int, min_count: int, min_pmi: float
) -> pd.DataFrame:
    """Bigrams (`key`, `count`) with count >= min_count and PMI >= min_pmi, as (query, score)."""
    bigrams = bigrams[bigrams["count"] >= min_count]
    rows = []
    for key, c in zip(bigrams["key"], bigrams["count"]):
        a, b = key.split(" ", 1)
        ca, cb = unigram_counts.get(a), unigram_counts.get(b)
        if not ca or not cb:
            continue
        pmi = math.log(c * total_words / (ca * cb))
        if pmi >= min_pmi:
            rows.append((key, pmi))
    return pd.DataFrame(rows, columns=["query", "score"])


# ---------------------------------------------------------------- page views and WordNet


_NON_ARTICLE = re.compile(
    r"^(special|talk|user|user_talk|wikipedia|file|image|mediawiki|template|help|category|portal|draft|"
    r"module|timedtext|book|education_program|gadget|topic|media)(_talk)?:",
    re.I,
)
_DISAMBIGUATION = re.compile(r"\s*\([^()]*\)\s*$")


def iter_pageviews(
    uri: str, projects: Iterable[str], errors: Counter | None = None
) -> Iterator[tuple[str, int]]:
    """`(title, views)` of article pages of `projects` from an hourly page-view dump (plain or .gz).

    Lines are `domain_code page_title count_views total_response_size`; malformed lines and undecodable
    bytes are counted in `errors` and skipped, a truncated file ends the stream.
    """
    errors = errors if errors is not None else Counter()
    projects = set(projects)
    try:
        with open_input(uri) as f:
            for raw in f:
                parts = raw.split(b" ")
                if len(parts) < 3:
                    errors["malformed_line"] += 1
                    continue
                try:
                    domain, title, views = parts[0].decode(), parts[1].decode("utf-8"), int(parts[2])
                except (UnicodeDecodeError, ValueError):
                    errors["malformed_line"] += 1
                    continue
                if domain not in projects:
                    continue
                if _NON_ARTICLE.match(title) or title in ("-", "Main_Page"):
                    errors["not_article"] += 1
                    continue
                yield unquote(title).replace("_", " "), views
    except TRUNCATION_ERRORS:
        errors["truncated_input"] += 1


class PageviewFile:
    """Ray Data UDF: one page-view dump path in, `(title, views)` batches out."""

    def __init__(self, projects: Iterable[str], stats_actor: str | None = None, batch_rows: int = 100_000):
        self.projects = list(projects)
        self.stats_actor = stats_actor
        self.batch_rows = batch_rows

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        for uri in batch["path"]:
            errors: Counter = Counter()
            titles: list[str] = []
            views: list[int] = []
            for title, n in iter_pageviews(str(uri), self.projects, errors):
                titles.append(title)
                views.append(n)
                if len(titles) >= self.batch_rows:
                    yield pa.table({"title": titles, "views": pa.array(views, pa.int64())})
                    titles, views = [], []
            if titles:
                yield pa.table({"title": titles, "views": pa.array(views, pa.int64())})
            funnel = Funnel()
            funnel.add_counts("pageview_input_errors", errors)
            _report(self.stats_actor, funnel)


def read_wordnet_lemmas(uris: Iterable[str], errors: Counter | None = None) -> list[str]:
    """Every lemma of every synset in Princeton WordNet `data.*` files (folders are searched for them).

    A data line is `offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] p_cnt ...`;
    license lines start with two spaces. Adjective markers like `(a)` are removed, `_` becomes a space.
    Without `data.*` files, the lemmas of the `index.*` files (first field of each line) are used - the
    same set of words, since every lemma of every synset has an index entry.
    """
    errors = errors if errors is not None else Counter()
    files = expand_inputs(list(uris))
    names = [f.rsplit("/", 1)[-1] for f in files]
    data = [f for f, n in zip(files, names) if n.startswith("data.") and n.split(".")[1] in _WORDNET_POS]
    index = [f for f, n in zip(files, names) if n.startswith("index.") and n.split(".")[1] in _WORDNET_POS]
    lemmas: list[str] = []
    for uri in data or index:
        with open_input(uri) as fh:
            for raw in fh:
                if raw.startswith(b"  ") or not raw.strip():
                    continue
                try:
                    parts = raw.decode("utf-8").split(" ")
                    if data:
                        words = parts[4 : 4 + 2 * int(parts[3], 16) : 2]
                    else:
                        words = [parts[0]]
                        int(parts[2])  # synset_cnt: checks the line has the index layout
                except (UnicodeDecodeError, ValueError, IndexError):
                    errors["malformed_line"] += 1
                    continue
                lemmas += [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words]
    return lemmas


_WORDNET_POS = ("noun", "verb", "adj", "adv")


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
    from pipelines.wit.curate import shuffle_strategy

    with shuffle_strategy(cfg.shuffle_strategy):
        return _build_query_list(cfg)


def _build_query_list(cfg: QueryConfig) -> pd.DataFrame:
    import ray
    from ray.data.expressions import col

    started = time.time()
    actor = get_or_create_stats_actor(cfg.stats_actor)
    ray.get(actor.reset.remote())
    candidates: list[pd.DataFrame] = []
    funnel = Funnel()

    wiki_files = expand_inputs(cfg.wikipedia) if cfg.wikipedia else []
    if wiki_files:
        counts = (
            ray.data.from_items([{"path": p} for p in wiki_files], override_num_blocks=len(wiki_files))
            .map_batches(
                CountWikiFile,
                fn_constructor_kwargs={
                    "pages_per_batch": cfg.pages_per_batch,
                    "stats_actor": cfg.stats_actor,
                },
                batch_size=1,
                batch_format="numpy",
                concurrency=(1, max(1, len(wiki_files))),
            )
            .groupby("key", num_partitions=cfg.num_partitions)
            .sum("count")
            .rename_columns({"sum(count)": "count"})
            .materialize()
        )
        # Only thresholded rows reach the driver: unigrams frequent enough to be in a kept bigram
        # (count >= min(min_word_count, min_bigram_count), ~1M words for all of Wikipedia) and the bigrams
        # that pass the PMI test, which is computed in parallel on the workers.
        keep_min = min(cfg.min_word_count, cfg.min_bigram_count)
        unigrams = (
            counts.filter(expr=col("count") >= int(keep_min))
            .map_batches(_select_kind, fn_kwargs={"bigrams": False}, batch_format="pyarrow")
            .to_pandas()
        )
        total_words = int(counts.map_batches(_unigram_total, batch_format="pyarrow").sum("total") or 0)
        words = unigrams[unigrams["count"] >= cfg.min_word_count]
        candidates.append(pd.DataFrame({"query": words["key"], "source": "unigram", "score": words["count"]}))
        pmi = (
            counts.filter(expr=col("count") >= int(cfg.min_bigram_count))
            .map_batches(_select_kind, fn_kwargs={"bigrams": True}, batch_format="pyarrow")
            .map_batches(
                BigramPMI,
                fn_constructor_kwargs={
                    "unigram_counts": ray.put(dict(zip(unigrams["key"], unigrams["count"]))),
                    "total_words": total_words,
                    "min_count": cfg.min_bigram_count,
                    "min_pmi": cfg.min_bigram_pmi,
                },
                batch_format="pandas",
                concurrency=1,
            )
            .to_pandas()
        )
        candidates.append(pmi.assign(source="bigram"))
        funnel.add_counts(
            "wikipedia", {"total_words": total_words, "unique_unigrams_and_bigrams": counts.count()}
        )

    view_files = expand_inputs(cfg.pageviews) if cfg.pageviews else []
    if view_files:
        views = (
            ray.data.from_items([{"path": p} for p in view_files], override_num_blocks=len(view_files))
            .map_batches(
                PageviewFile,
                fn_constructor_kwargs={"projects": cfg.pageview_projects, "stats_actor": cfg.stats_actor},
                batch_size=1,
                batch_format="numpy",
                concurrency=(1, max(1, len(view_files))),
            )
            .groupby("title", num_partitions=cfg.num_partitions)
            .sum("views")
            .rename_columns({"sum(views)": "views"})
            .filter(expr=col("views") >= int(cfg.min_page_views))
            .to_pandas()
        )
        titles = [_DISAMBIGUATION.sub("", t) for t in views["title"]]
        candidates.append(pd.DataFrame({"query": titles, "source": "title", "score": views["views"]}))

    if cfg.wordnet:
        errors: Counter = Counter()
        lemmas = read_wordnet_lemmas(cfg.wordnet, errors)
        funnel.add_counts("wordnet_input_errors", errors)
        candidates.append(pd.DataFrame({"query": lemmas, "source": "wordnet", "score": 0.0}))

    queries, assembled = assemble_queries(
        candidates, cfg.max_queries, cfg.max_query_chars, cfg.source_priority
    )
    funnel.merge(ray.get(actor.snapshot.remote())).merge(assembled)
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
