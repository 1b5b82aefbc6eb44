"""Bigram pointwise mutual information over the merged word/bigram counts (the `bigram` source).

PMI = ln(c(ab) N / (c(a) c(b))); MetaCLIP's "PMI >= 30" is the ratio inside the log. Keys are words or
"a b" bigrams; tally keys (pipelines/wit/tally.py) are neither and are skipped.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.wit.tally import is_tally_key


def select_kind(batch: pa.Table, bigrams: bool) -> pa.Table:
    """Ray Data UDF: the bigram rows (`bigrams`) or the word rows of a (key, count) batch."""
    is_bigram = pc.match_substring(batch.column("key"), " ")
    keep = is_bigram if bigrams else pc.invert(is_bigram)
    return batch.filter(pc.and_(keep, pc.invert(is_tally_key(batch.column("key")))))


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


def unigram_total(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: the number of word occurrences in a (key, count) batch, as one `total` row."""
    words = select_kind(batch, bigrams=False)
    return pa.table({"total": [pc.sum(words.column("count")).as_py() or 0]})


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
