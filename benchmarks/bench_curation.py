"""Captions per second per core: word-boundary query matching against a plain substring matcher, plus filters.

Realistic text: the vocabulary is real (wordfreq's English top 60,000 words with their frequencies, and
words of French, German, Spanish, Russian, Japanese, Chinese and Arabic for ~15% non-ASCII captions; without
wordfreq, words counted in the Python standard library's text). Captions draw words by frequency and add
capitals, punctuation, numbers (years, sizes, model numbers) and accents. The 500,000 queries are real
words, frequent bigrams and title-like phrases, as in the paper's list.

Timed on one process (= one core, CPU seconds, so other load on a shared machine does not count):
- `substring (plain)`: MetaCLIP's approach - pyahocorasick over the lower-cased queries, each caption
  lower-cased and scanned, every hit kept (no word boundaries);
- `word boundary (per caption)`: the matcher before this change, one key and one scan per caption;
- `word boundary (batched)`: `QueryMatcher` as the curation runs it (`match_arrow`: one regex call, one
  automaton scan and numpy grouping per batch, Arrow lists out);
- `filters`, `filters + matching`: the text filter (TextFilter) before the matcher, end to end.
The batched results are checked equal to the per-caption ones.

    pip install --target /tmp/benchdeps wordfreq   # optional, for the real vocabulary
    PYTHONPATH=/tmp/benchdeps:. python benchmarks/bench_curation.py [--captions 100000] [--queries 500000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import sysconfig
import time
from collections import Counter

import ahocorasick
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.wit.filters import FilterConfig, TextFilter
from pipelines.wit.matching import QueryMatcher, match_key

OTHER_LANGUAGES = ("fr", "de", "es", "ru", "ja", "zh", "ar")
LISTS = pa.list_(pa.string())
PUNCTUATION = [",", ".", " -", ":", ";", "!", "?", " |", " /", " &", "'s"]


def vocabulary(n: int = 60_000) -> tuple[str, list[str], list[float], dict[str, list[str]]]:
    """(source, English words, their weights, {language: words})."""
    try:
        import wordfreq

        words = [w for w in wordfreq.top_n_list("en", n) if any(ch.isalpha() for ch in w)]
        weights = [wordfreq.word_frequency(w, "en") for w in words]
        other = {lang: wordfreq.top_n_list(lang, 5000) for lang in OTHER_LANGUAGES}
        return (
            f"wordfreq {wordfreq.__version__ if hasattr(wordfreq, '__version__') else ''}".strip(),
            words,
            weights,
            other,
        )
    except ImportError:
        counts: Counter = Counter()
        root = sysconfig.get_paths()["stdlib"]
        for folder, _, files in os.walk(root):
            for name in files:
                if name.endswith((".py", ".txt", ".rst")):
                    with open(os.path.join(folder, name), encoding="utf-8", errors="ignore") as f:
                        counts.update(re.findall(r"(?<![\w'])[a-z]{2,}(?![\w'])", f.read()))
        common = counts.most_common(n)
        other = {"fr": ["été", "château", "forêt", "café", "garçon"], "ru": ["собака", "кошка", "дом"]}
        return (
            "python stdlib text (wordfreq not installed)",
            [w for w, _ in common],
            [c for _, c in common],
            other,
        )


def make_queries(n: int, words: list[str], weights: list[float], rng: random.Random) -> list[str]:
    queries = dict.fromkeys(words)
    while len(queries) < n:
        k = rng.choices((2, 3), weights=(3, 1))[0]
        phrase = " ".join(rng.choices(words[:20_000], weights=weights[:20_000], k=k))
        queries[phrase if rng.random() < 0.7 else phrase.title()] = None
    return list(queries)[:n]


def make_caption(
    words: list[str], weights: list[float], other: dict[str, list[str]], rng: random.Random
) -> str:
    if rng.random() < 0.15:  # non-ASCII caption in another language, maybe code-mixed
        lang = rng.choice(list(other))
        sep = "" if lang in ("ja", "zh") else " "
        parts = rng.choices(other[lang], k=rng.randint(3, 12))
        if rng.random() < 0.3:
            parts += rng.choices(words[:2000], k=2)
        return sep.join(parts)
    tokens = rng.choices(words, weights=weights, k=rng.randint(3, 18))
    out = []
    for i, tok in enumerate(tokens):
        r = rng.random()
        if i == 0 or r < 0.08:
            tok = tok.capitalize()
        elif r < 0.1:
            tok = tok.upper()
        out.append(tok)
        r = rng.random()
        if r < 0.08:
            out[-1] += rng.choice(PUNCTUATION)
        elif r < 0.11:
            out.append(
                rng.choice(
                    [
                        str(rng.randint(1900, 2025)),
                        f"{rng.randint(2, 99)}mm",
                        f"{rng.randint(640, 4000)}x{rng.randint(480, 3000)}",
                        f"SM-G{rng.randint(900, 999)}F",
                        f"#{rng.randint(1, 50)}",
                    ]
                )
            )
        elif r < 0.12:
            out.append(
                rng.choice(["café", "naïve", "Zürich", "São Paulo", "crème brûlée", "—", "“quoted”", "😀"])
            )
    return " ".join(out)


def substring_matcher(queries: list[str]) -> ahocorasick.Automaton:
    automaton = ahocorasick.Automaton()
    for q in queries:
        key = q.lower()
        if key not in automaton:
            automaton.add_word(key, q)
    automaton.make_automaton()
    return automaton


def per_caption_matcher(queries: list[str]) -> ahocorasick.Automaton:
    """The word-boundary matcher before this change: string values, one key and one scan per caption."""
    automaton = ahocorasick.Automaton()
    for query in queries:
        key = match_key(query)
        if key.strip() and key not in automaton:
            automaton.add_word(key, query)
    automaton.make_automaton()
    return automaton


def timed(fn, batches) -> tuple[float, float, object]:
    """(CPU seconds of this process, wall seconds, results)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = [fn(b) for b in batches]
    return time.process_time() - cpu, time.perf_counter() - wall, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings per matcher")
    ap.add_argument("--no-filters", action="store_true", help="time the matchers only")
    args = ap.parse_args()
    rng = random.Random(0)
    source, words, weights, other = vocabulary()
    queries = make_queries(args.queries, words, weights, rng)
    captions = [make_caption(words, weights, other, rng) for _ in range(args.captions)]
    batches = [captions[i : i + args.batch] for i in range(0, len(captions), args.batch)]
    non_ascii = sum(not c.isascii() for c in captions) / len(captions)
    distinct = len({w for c in captions for w in c.lower().split()})

    t = time.perf_counter()
    matcher = QueryMatcher(queries)
    build_s = time.perf_counter() - t
    plain = substring_matcher(queries)
    before = per_caption_matcher(queries)

    # Every matcher hands the stage an Arrow list column, as the curation needs it.
    def substring(batch):
        return pa.array([list(dict.fromkeys(v for _, v in plain.iter(c.lower()))) for c in batch], LISTS)

    def old(batch):
        return pa.array([list(dict.fromkeys(v for _, v in before.iter(match_key(c)))) for c in batch], LISTS)

    rows, results = {}, {}
    for name, fn in [
        ("substring (plain)", substring),
        ("word boundary (per caption)", old),
        ("word boundary (batched)", matcher.match_arrow),
    ]:
        best = min((timed(fn, batches) for _ in range(args.repeats)), key=lambda r: r[0])
        lists = [m for b in best[2] for m in b.to_pylist()]
        rows[name] = (len(captions) / best[0], len(captions) / best[1], sum(bool(m) for m in lists))
        results[name] = lists
    assert results["word boundary (batched)"] == results["word boundary (per caption)"], (
        "batched != per caption"
    )

    if not args.no_filters:
        tables = [
            pa.table({"url": [f"https://img.example.com/{i}/photo.jpg" for i in range(len(b))], "caption": b})
            for b in batches
        ]
        text_filter = TextFilter(FilterConfig())
        cpu, wall, out = timed(text_filter, tables)
        rows["filters"] = (len(captions) / cpu, len(captions) / wall, sum(t.num_rows for t, _ in out))
        cpu, wall, out = timed(lambda b: matcher(text_filter(b)[0]), tables)
        rows["filters + matching"] = (
            len(captions) / cpu,
            len(captions) / wall,
            sum(t.num_rows for t, _ in out),
        )

    print(
        f"vocabulary: {source}; {len(words):,} English words; captions: {len(captions):,} ({distinct:,} distinct "
        f"tokens, {non_ascii:.0%} non-ASCII); queries: {len(queries):,}; batch {args.batch}; one process = one core"
    )
    print(f"automaton build: {build_s:.1f} s")
    print(f"{'stage':<30}{'captions/s/core':>17}{'(wall clock)':>14}{'matched/kept':>14}")
    for name, (rate, wall_rate, kept) in rows.items():
        print(f"{name:<30}{rate:>17,.0f}{wall_rate:>14,.0f}{kept:>14,}")
    base = rows["substring (plain)"][0]
    before, after = rows["word boundary (per caption)"][0], rows["word boundary (batched)"][0]
    print(f"word boundary vs plain substring: before {before / base:.2f}x, now {after / base:.2f}x")
    print(json.dumps({
        "captions": len(captions), "queries": len(queries), "vocabulary": source,
        "substring_captions_per_s_core": round(base), "word_boundary_before_captions_per_s_core": round(before),
        "word_boundary_captions_per_s_core": round(after), "ratio_before": round(before / base, 3),
        "ratio": round(after / base, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
