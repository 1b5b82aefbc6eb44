"""A noisy web-like corpus with ground truth, from the one generator (pipelines/synthetic.py).

Three kinds of pair, as a crawl has them:
- clean pairs: a render and a caption of its own concept;
- mismatched pairs: a render with the caption of another render whose colour and shape both differ (on
  the web, a swapped or unrelated alt text describes other content);
- near-duplicates: copies of a clean render under other keys: re-encoded at another JPEG quality, resized
  by 0.8–0.95, cropped by a few percent, or re-uploaded byte for byte; each copy has a caption of its own
  (a matched pair).

Rows are shuffled (seeded) across shards, written with pipelines/shards.py (WebDataset + Parquet +
manifest), and the ground truth goes to `{out}/_truth.parquet` (one row per sample: key, shard, label,
mismatched, group, variant). `group` names the original key a near-duplicate was made from (the original
has its own key as group); `variant` is "original", "jpeg", "resize", "crop" or "exact".

    corpus = write_noisy_corpus("data/noisy", NoisyParams(n_images=400, mismatch_fraction=0.2))
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipelines import shards, storage, synthetic

TRUTH_FILE = "_truth.parquet"
VARIANTS = ("jpeg", "resize", "crop", "exact")


@dataclass(frozen=True)
class NoisyParams:
    n_images: int = 400  # distinct renders (before copies)
    mismatch_fraction: float = 0.2  # share of the distinct renders given another render's caption
    dup_fraction: float = 0.1  # share of the clean renders that get near-duplicate copies
    copies_per_dup: int = 2  # copies per duplicated render (variants drawn from VARIANTS)
    samples_per_shard: int = 100
    size: int = 64
    seed: int = 0
    formats: tuple[str, ...] = ("webdataset", "parquet")

    def __post_init__(self) -> None:
        if not 0 <= self.mismatch_fraction < 1 or not 0 <= self.dup_fraction <= 1:
            raise ValueError("mismatch_fraction must be in [0, 1) and dup_fraction in [0, 1]")
        if self.n_images < 2 or self.samples_per_shard < 1 or self.copies_per_dup < 1:
            raise ValueError("n_images must be >= 2, samples_per_shard and copies_per_dup >= 1")


@dataclass
class NoisyCorpus:
    """Where the corpus is and what it holds (counts only; per-sample truth is in `truth_uri`)."""

    uri: str
    truth_uri: str
    shards: list[str]
    n_samples: int
    n_mismatched: int
    n_copies: int  # near-duplicate copies (samples beyond the first of each duplicate group)
    n_groups: int  # distinct renders

    def truth(self) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(self.truth_uri)))


def _jpeg(image: Image.Image, quality: int) -> bytes:
    return synthetic.to_jpeg(image, quality=quality)


def near_duplicate(image: Image.Image, original: bytes, variant: str, rng: random.Random) -> bytes:
    """JPEG bytes of one near-duplicate of `image` (whose own JPEG is `original`)."""
    if variant == "exact":
        return original
    if variant == "jpeg":
        return _jpeg(image, rng.choice((55, 65, 75, 95)))
    w, h = image.size
    if variant == "resize":
        f = rng.uniform(0.8, 0.95)
        return _jpeg(image.resize((max(8, round(w * f)), max(8, round(h * f))), Image.BICUBIC), 90)
    if variant == "crop":
        dx, dy = round(w * rng.uniform(0.02, 0.05)), round(h * rng.uniform(0.02, 0.05))
        return _jpeg(image.crop((dx, dy, w - dx, h - dy)), 90)
    raise ValueError(f"unknown near-duplicate variant {variant!r}; use one of {VARIANTS}")


def _other_caption(i: int, samples: list, rng: random.Random) -> str:
    """The caption of another render whose colour and shape both differ from render i's."""
    mine = samples[i].concept
    while True:
        other = samples[rng.randrange(len(samples))]
        if other.concept.colour != mine.colour and other.concept.shape != mine.shape:
            return other.caption


def _rows(params: NoisyParams) -> list[dict]:
    """Every sample (before shuffling) with its truth fields."""
    rng = random.Random(params.seed * 7919 + 1)
    samples = list(synthetic.generate(params.n_images, seed=params.seed, size=params.size))
    order = list(range(len(samples)))
    rng.shuffle(order)
    n_mis = round(params.mismatch_fraction * len(samples))
    mismatched = set(order[:n_mis])
    clean = order[n_mis:]
    duplicated = set(clean[: round(params.dup_fraction * len(clean))])
    rows = []
    for i, s in enumerate(samples):
        jpg = _jpeg(s.image, 90)
        key = f"n{params.seed:03d}{i:06d}"
        caption = _other_caption(i, samples, rng) if i in mismatched else s.caption
        rows.append(_row(key, jpg, caption, s.label, i in mismatched, key, "original", s.concept.shape))
        if i in duplicated:
            for c in range(params.copies_per_dup):
                variant = rng.choice(VARIANTS)
                copy = near_duplicate(s.image, jpg, variant, rng)
                text = synthetic.caption_for(s.concept, rng)
                rows.append(_row(f"{key}d{c}", copy, text, s.label, False, key, variant, s.concept.shape))
    rng.shuffle(rows)
    return rows


def _row(
    key: str, jpg: bytes, caption: str, label: str, mismatched: bool, group: str, variant: str, query: str
):
    w, h = Image.open(io.BytesIO(jpg)).size
    meta = {
        "url": f"http://127.0.0.1/noisy/{key}.jpg",
        "caption": caption,
        "query": query,
        "label": label,
        "width": w,
        "height": h,
        "original_width": w,
        "original_height": h,
        "sha256": hashlib.sha256(jpg).hexdigest(),
    }
    sample = {"key": key, "jpg": jpg, "txt": caption, "json": meta}
    return {"sample": sample, "label": label, "mismatched": mismatched, "group": group, "variant": variant}


def write_noisy_corpus(out: str, params: NoisyParams | None = None) -> NoisyCorpus:
    """Write the corpus as shards `00000`, `00001`, ... under `out` (local or s3://), plus the truth."""
    params = params or NoisyParams()
    rows = _rows(params)
    names, truth = [], {"key": [], "shard": [], "label": [], "mismatched": [], "group": [], "variant": []}
    for start in range(0, len(rows), params.samples_per_shard):
        name = f"{start // params.samples_per_shard:05d}"
        chunk = rows[start : start + params.samples_per_shard]
        shards.write_shard([r["sample"] for r in chunk], out, name, params.formats)
        names.append(name)
        for r in chunk:
            truth["key"].append(r["sample"]["key"])
            truth["shard"].append(name)
            for k in ("label", "mismatched", "group", "variant"):
                truth[k].append(r[k])
    buf = io.BytesIO()
    pq.write_table(pa.table(truth), buf)
    truth_uri = storage.join(out, TRUTH_FILE)
    storage.write_bytes_atomic(truth_uri, buf.getvalue())
    n_groups = len(set(truth["group"]))
    return NoisyCorpus(
        uri=out,
        truth_uri=truth_uri,
        shards=names,
        n_samples=len(rows),
        n_mismatched=sum(truth["mismatched"]),
        n_copies=len(rows) - n_groups,
        n_groups=n_groups,
    )


def filter_quality(corpus: NoisyCorpus, output: str) -> dict[str, float]:
    """How well a filter run (jobs/filter_wit.py output at `output`, no per-query cap) did on the truth:
    mismatch_recall (mismatched pairs the score cut removed), match_loss (matched pairs it removed),
    dup_recall (near-duplicate copies the dedupe removed, of those that reached it) and distinct_loss
    (distinct renders the dedupe removed entirely)."""
    from pipelines.filter.score import Cut

    stats = storage.read_json(storage.join(output, "_stats.json"))
    cut = Cut(stats["score_cut"]["threshold"], stats["score_cut"]["tie_key"])
    kept: set[str] = set()
    low: set[str] = set()
    for name in corpus.shards:
        sel = pq.read_table(
            io.BytesIO(storage.read_bytes(storage.join(output, "selection", f"{name}.parquet")))
        )
        kept.update(sel["key"].to_pylist())
        store = pq.read_table(
            io.BytesIO(storage.read_bytes(storage.join(output, "embeddings", f"{name}.parquet"))),
            columns=["key", "reason", "score"],
        ).filter(pc.equal(pc.field("reason"), ""))
        keys = store["key"].to_pylist()
        passed = cut.keep(store["score"].to_numpy(zero_copy_only=False), keys)
        low.update(k for k, p in zip(keys, passed) if not p)
    truth = corpus.truth().to_pylist()
    mismatched = [t["key"] for t in truth if t["mismatched"]]
    matched = [t["key"] for t in truth if not t["mismatched"]]
    groups: dict[str, list[str]] = {}
    for t in truth:
        if not t["mismatched"] and t["key"] not in low:  # what reached the dedupe
            groups.setdefault(t["group"], []).append(t["key"])
    removable = sum(len(g) - 1 for g in groups.values())
    removed = sum(min(len(g) - 1, sum(k not in kept for k in g)) for g in groups.values())
    return {
        "mismatch_recall": sum(k in low for k in mismatched) / max(1, len(mismatched)),
        "match_loss": sum(k in low for k in matched) / max(1, len(matched)),
        "dup_recall": removed / max(1, removable),
        "distinct_loss": sum(all(k not in kept for k in g) for g in groups.values()) / max(1, len(groups)),
    }
