"""Multi-pattern matching of captions against the whole query list (Aho-Corasick, pyahocorasick).

Word boundaries without per-match checks: queries and captions are both reduced to a key - lower case,
every run of non-word characters replaced by one space, padded with a space on each side - and the
automaton holds " query ". A hit of " york " in " new york city " can then only start and end on word
boundaries, so the C matcher does all the work and Python only collects values. Overlapping entries are
all reported (" new york ", " york ", " new york city "), as MetaCLIP's substring matching does.

A batch is matched in one pass (`match_batch`): the captions are joined with a separator letter, lower-cased
and normalised by one regex call and scanned by one automaton call, and each hit is mapped back to its
caption by the separators' positions. Per caption this leaves only the collection of its hits in Python,
so word-boundary matching costs less than a plain per-caption substring scan (benchmarks/bench_curation.py).
A separator never takes part in a match (keys hold only word characters and single spaces), so the result
is exactly the per-caption one (`match`); a batch whose captions hold the separator falls back to it.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence

import ahocorasick
import numpy as np
import pyarrow as pa

_NON_WORD = re.compile(r"[\W_]+")
# The batch separator: a letter (so the one-class regex above keeps it) without case, that no query holds.
_SEP = "\ua66e"  # CYRILLIC LETTER MULTIOCULAR O


def match_key(text: str) -> str:
    """Lower-cased text with non-word runs as single spaces, padded: the form both sides are matched in."""
    return " " + _NON_WORD.sub(" ", text.lower()).strip() + " "


def build_automaton(queries: Iterable[str]) -> ahocorasick.Automaton:
    """An automaton whose values are the query strings; queries with the same key keep the first one."""
    automaton = ahocorasick.Automaton()
    for query in queries:
        key = match_key(query)
        if key.strip() and key not in automaton:
            automaton.add_word(key, query)
    automaton.make_automaton()
    return automaton


class QueryMatcher:
    """Callable stage: batch with `caption` -> (rows matching >= 1 query, with `matched_queries`, drops).

    Construct once per worker (an actor in `map_batches`): building the automaton for 500k queries takes
    seconds and ~100 MB; matching is then a C loop per caption.
    """

    def __init__(self, queries: Iterable[str]):
        queries = list(queries)
        self.automaton = build_automaton(queries)
        self.sep_in_queries = any(_SEP in q.lower() for q in queries)

    def match(self, caption: str) -> list[str]:
        # dict.fromkeys: unique, in order of first occurrence.
        return list(dict.fromkeys(value for _, value in self.automaton.iter(match_key(caption))))

    def match_batch(self, captions: Sequence[str]) -> list[list[str]]:
        """`[self.match(c) for c in captions]`, in one regex call and one automaton scan."""
        text = f" {_SEP} ".join(captions)
        if self.sep_in_queries or text.count(_SEP) != len(captions) - 1:  # a caption holds the separator
            return [self.match(c) for c in captions]
        text = _NON_WORD.sub(" ", f" {text.lower()} ")
        # Separator positions; a hit ending before the k-th separator belongs to caption k. Hits are consumed
        # as they come: holding them all would make the garbage collector walk them over and over.
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        seps = np.flatnonzero(codes == ord(_SEP)).tolist()
        out: list[list[str]] = [[] for _ in captions]
        for end, value in self.automaton.iter(text):
            out[bisect_right(seps, end)].append(value)
        # Unique, in order of first occurrence (a caption may hit a query twice).
        return [list(dict.fromkeys(m)) if len(m) > 1 else m for m in out]

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, dict[str, int]]:
        matches = self.match_batch([c or "" for c in batch.column("caption").to_pylist()])
        keep = [bool(m) for m in matches]
        out = batch.append_column("matched_queries", pa.array(matches, pa.list_(pa.string()))).filter(
            pa.array(keep, pa.bool_())
        )
        n_dropped = len(keep) - out.num_rows
        return out, ({"no_match": n_dropped} if n_dropped else {})
