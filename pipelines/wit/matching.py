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
from collections.abc import Iterable, Sequence

import ahocorasick
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_NON_WORD = re.compile(r"[\W_]+")
# The batch separator: a letter (so the one-class regex above keeps it) without case, that no query holds.
_SEP = "\ua66e"  # CYRILLIC LETTER MULTIOCULAR O


def match_key(text: str) -> str:
    """Lower-cased text with non-word runs as single spaces, padded: the form both sides are matched in."""
    return " " + _NON_WORD.sub(" ", text.lower()).strip() + " "


def build_automaton(queries: Iterable[str]) -> tuple[ahocorasick.Automaton, list[str]]:
    """(automaton whose values are indices into the returned query list, that list); queries with the same
    key keep the first one."""
    automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
    kept: list[str] = []
    for query in queries:
        key = match_key(query)
        if key.strip() and key not in automaton:
            automaton.add_word(key, len(kept))
            kept.append(query)
    automaton.make_automaton()
    return automaton, kept


_HIT = np.dtype([("end", np.int64), ("query", np.int64)])


class QueryMatcher:
    """Callable stage: batch with `caption` -> (rows matching >= 1 query, with `matched_queries`, drops).

    Construct once per worker (an actor in `map_batches`): building the automaton for 500k queries takes
    seconds and ~100 MB; matching is then C loops (regex, automaton, numpy) per batch.
    """

    def __init__(self, queries: Iterable[str]):
        self.automaton, self.queries = build_automaton(queries)
        self.values = pa.array(self.queries, pa.string())
        self.sep_in_queries = any(_SEP in q.lower() for q in self.queries)

    def match(self, caption: str) -> list[str]:
        """The queries `caption` contains, each once, in order of first occurrence (one caption alone)."""
        found = dict.fromkeys(value for _, value in self.automaton.iter(match_key(caption)))
        return [self.queries[i] for i in found]

    def match_arrow(self, captions: Sequence[str]) -> pa.ListArray:
        """`[self.match(c) for c in captions]` as an Arrow list array, in one regex call and one scan."""
        text = f" {_SEP} ".join(captions)
        if self.sep_in_queries or text.count(_SEP) != len(captions) - 1:  # a caption holds the separator
            return pa.array([self.match(c) for c in captions], pa.list_(pa.string()))
        text = _NON_WORD.sub(" ", f" {text.lower()} ")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        seps = np.flatnonzero(codes == ord(_SEP))
        # Hits go straight into numpy (no Python object per hit survives); a hit ending before the k-th
        # separator belongs to caption k, and hits come in text order, so captions come out sorted.
        hits = np.fromiter(self.automaton.iter(text), dtype=_HIT)
        caption = np.searchsorted(seps, hits["end"])
        # Each (caption, query) once, at its first hit, in hit order.
        _, first = np.unique(caption * len(self.queries) + hits["query"], return_index=True)
        first.sort()
        caption, query = caption[first], hits["query"][first]
        offsets = np.searchsorted(caption, np.arange(len(captions) + 1)).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), self.values.take(pa.array(query, pa.int64())))

    def match_batch(self, captions: Sequence[str]) -> list[list[str]]:
        """`[self.match(c) for c in captions]`, computed batch-wise (`match_arrow`)."""
        return self.match_arrow(captions).to_pylist()

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, dict[str, int]]:
        matches = self.match_arrow([c or "" for c in batch.column("caption").to_pylist()])
        keep = pc.greater(pc.list_value_length(matches), 0)
        out = batch.append_column("matched_queries", matches).filter(keep)
        n_dropped = batch.num_rows - out.num_rows
        return out, ({"no_match": n_dropped} if n_dropped else {})
