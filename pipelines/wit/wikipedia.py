"""Wikipedia dumps: MediaWiki XML streamed page by page, wiki markup removed, words and bigrams counted.

`CountWikiFile` is the Ray Data stage of the query-list job (pipelines/wit/queries.py): one dump file in,
partial (key, count) tables out, merged later by a groupby; its page funnel travels as tally keys.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipelines.stats import Funnel
from pipelines.wit.io import TRUNCATION_ERRORS, open_input
from pipelines.wit.tally import funnel_keys

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
    """Ray Data UDF: one dump file path in, partial `(key, count)` batches out (key = word or "a b"); the
    file's page counts come last as tally keys (pipelines/wit/tally.py)."""

    def __init__(self, pages_per_batch: int = 2000):
        self.pages_per_batch = pages_per_batch

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
                yield counts_table(counts)
                counts, pending = Counter(), 0
        if counts:
            yield counts_table(counts)
        funnel = Funnel()
        funnel.record("wiki_pages", n_pages, n_kept, dropped)
        funnel.add_counts("wiki_input_errors", errors)
        yield counts_table(funnel_keys(funnel))  # the file's counts, summed by the same groupby


def counts_table(counts: dict[str, int]) -> pa.Table:
    return pa.table({"key": list(counts.keys()), "count": pa.array(list(counts.values()), pa.int64())})
