"""`FilterConfig`: what `jobs/filter_wit.py` reads (YAML + `key=value` overrides, pipelines/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.pools import Pool


@dataclass
class EmbedSection:
    chunk_size: int = 64  # rows per read chunk = images per embedding call
    device: str = "auto"  # auto: cuda when the actor sees a GPU, else cpu
    pool: Pool = field(default_factory=Pool)  # embedding actors, (min, max) growing with the cluster
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    read_cpus: float = 0.5  # CPU per read/decode task (differs from the actors' so Ray Data keeps them apart)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if self.read_cpus <= 0:
            raise ValueError("read_cpus must be > 0")


@dataclass
class ScoreSection:
    threshold: float | None = None  # keep pairs with cosine >= threshold
    top_fraction: float | None = None  # or keep exactly this share of the scored pairs (highest scores)
    bins: int = 65536  # histogram bins over [-1, 1] for the exact top fraction's first pass

    def __post_init__(self) -> None:
        if self.threshold is not None and self.top_fraction is not None:
            raise ValueError("threshold and top_fraction are exclusive: set one")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError("top_fraction must be in (0, 1]")
        if self.bins < 2:
            raise ValueError("bins must be >= 2")


@dataclass
class DedupeSection:
    enabled: bool = True
    clusters: int = 16  # k-means clusters (capped by the number of pairs)
    threshold: float = 0.95  # image-embedding cosine above which two pairs are duplicates
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clusters < 1:
            raise ValueError("clusters must be >= 1")
        if not -1 <= self.threshold <= 1:
            raise ValueError("threshold must be in [-1, 1]")


@dataclass
class RebalanceSection:
    max_per_query: int = 0  # 0: no per-query cap
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_per_query < 0:
            raise ValueError("max_per_query must be >= 0 (0 = off)")


@dataclass
class FilterConfig:
    """Embed a shard set with a CLIP checkpoint, filter it, write a selection (see jobs/filter_wit.py)."""

    data_uri: str = ""  # any shard list the trainer reads (folder, brace list, `::`-joined; local or s3://)
    data_format: str = "webdataset"
    output: str = ""  # {output}/embeddings/, {output}/selection/, {output}/report/, {output}/_stats.json
    checkpoint: str = ""  # run folder, OpenAI state-dict .pt, open_clip training checkpoint
    tokenizer: str = ""  # BPE merges (.txt.gz); "" = the one beside the checkpoint
    embed: EmbedSection = field(default_factory=EmbedSection)
    score: ScoreSection = field(default_factory=ScoreSection)
    dedupe: DedupeSection = field(default_factory=DedupeSection)
    rebalance: RebalanceSection = field(default_factory=RebalanceSection)
    report: bool = True
    embed_only: bool = False  # stop after the embedding store (e.g. to filter later with other settings)

    def __post_init__(self) -> None:
        if self.data_format not in ("webdataset", "parquet"):
            raise ValueError("data_format must be webdataset or parquet")
