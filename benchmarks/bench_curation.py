"""Captions per second per core through the text filters + query matching, with a 500,000-entry query list.

Generates a query list shaped like the real one (English words, bigrams, titles) and web-like captions
(English and other languages, camera names, duplicates of common phrasing), then times, on one process
(= one core): TextFilter alone, QueryMatcher alone, and both in sequence, in batches as Ray Data would pass
them. Also reports the automaton build time and the memory it takes (RSS growth and pyahocorasick's own
size estimate). Target: >= 20,000 captions/s/core end to end with the full query list.

    python benchmarks/bench_curation.py [--captions 100000] [--queries 500000]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import string
import sys
import time

import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.wit.filters import FilterConfig, TextFilter
from pipelines.wit.matching import QueryMatcher

WORDS = [
    "dog",
    "cat",
    "horse",
    "bird",
    "tree",
    "river",
    "mountain",
    "city",
    "street",
    "car",
    "bus",
    "train",
    "house",
    "garden",
    "flower",
    "beach",
    "ocean",
    "sky",
    "sunset",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "old",
    "new",
    "small",
    "large",
    "happy",
    "young",
    "woman",
    "man",
    "child",
    "family",
    "friends",
    "wedding",
    "portrait",
    "photo",
    "view",
    "night",
    "morning",
    "winter",
    "summer",
    "snow",
    "rain",
    "lake",
    "forest",
    "park",
    "bridge",
    "tower",
    "church",
    "castle",
    "food",
    "cake",
    "coffee",
    "table",
    "chair",
    "kitchen",
    "room",
    "window",
    "door",
    "book",
    "music",
    "concert",
    "game",
    "team",
    "player",
    "football",
    "stadium",
]
OTHER = [
    "Un chien brun qui court sur la plage avec son maître",
    "Ein brauner Hund läuft am Strand entlang und spielt",
    "Un perro marrón corriendo en la playa al atardecer",
    "一只 棕色的狗 在海滩上 奔跑 和 玩耍",
    "كلب بني يركض على الشاطئ مع صاحبه",
]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_queries(n: int, rng: random.Random) -> list[str]:
    queries = set(WORDS)
    letters = string.ascii_lowercase
    while len(queries) < n:
        kind = rng.random()
        word = "".join(rng.choices(letters, k=rng.randint(3, 10)))
        if kind < 0.5:
            queries.add(word)
        elif kind < 0.8:
            queries.add(f"{rng.choice(WORDS)} {word}")
        else:
            queries.add(f"{word} {rng.choice(WORDS)} {rng.choice(WORDS)}")
    return list(queries)[:n]


def make_captions(n: int, rng: random.Random) -> list[str]:
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.7:
            out.append(" ".join(rng.choices(WORDS, k=rng.randint(4, 14))).capitalize())
        elif r < 0.85:
            out.append(rng.choice(OTHER))
        elif r < 0.95:
            out.append(f"IMG_{rng.randint(1000, 99999)}")
        else:
            out.append(f"A {rng.choice(WORDS)} photographed in {1990 + i % 30} near the {rng.choice(WORDS)}")
    return out


def timed(fn, batches) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, rows kept). Per-core rates use CPU seconds, which stay
    honest on a shared machine where other processes steal the core (wall time is printed beside)."""
    wall, cpu = time.perf_counter(), time.process_time()
    kept = sum(fn(b)[0].num_rows for b in batches)
    return time.perf_counter() - wall, time.process_time() - cpu, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--captions", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=8192)
    args = ap.parse_args()
    rng = random.Random(0)
    captions = make_captions(args.captions, rng)
    urls = [f"https://img.example.com/{i}/{rng.choice(WORDS)}.jpg" for i in range(args.captions)]
    batches = [
        pa.table({"url": urls[i : i + args.batch], "caption": captions[i : i + args.batch]})
        for i in range(0, args.captions, args.batch)
    ]
    queries = make_queries(args.queries, rng)

    rss0 = rss_mb()
    t = time.perf_counter()
    matcher = QueryMatcher(queries)
    build_s = time.perf_counter() - t
    rss1 = rss_mb()
    ac_mb = matcher.automaton.get_stats()["total_size"] / 2**20
    text_filter = TextFilter(FilterConfig())

    def both(b):
        kept, _ = text_filter(b)
        return matcher(kept)

    rows = []
    for name, fn in [("filters", text_filter), ("matching", matcher), ("filters + matching", both)]:
        timed(fn, batches[:1])  # warm-up
        wall, cpu, kept = timed(fn, batches)
        rows.append((name, args.captions / cpu, args.captions / wall, kept))

    print(
        f"queries: {len(queries):,}  captions: {args.captions:,}  batch: {args.batch}  (one process = one core)"
    )
    print(
        f"automaton build: {build_s:.1f} s   matcher memory: {rss1 - rss0:.0f} MB RSS growth, "
        f"{ac_mb:.0f} MB pyahocorasick estimate"
    )
    print(f"{'stage':<22}{'captions/s/core':>18}{'(wall clock)':>14}{'kept':>10}{'vs target 20k':>16}")
    for name, rate, wall_rate, kept in rows:
        print(f"{name:<22}{rate:>18,.0f}{wall_rate:>14,.0f}{kept:>10,}{rate / 20_000:>15.2f}x")


if __name__ == "__main__":
    main()
