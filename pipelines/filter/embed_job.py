"""The embedding store's Ray Data graph: shard uris -> read_chunks (CPU tasks) -> ChunkEmbedder (actor
pool) -> ShardCommitter (one actor) -> one small record per shard. Committed shards are skipped."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipelines import datasets, storage
from pipelines.evaluation.embed import EmbedOptions, actor_pool, find_merges
from pipelines.filter.config import FilterConfig
from pipelines.filter.store import ChunkEmbedder, ShardCommitter, read_chunks, store_uri


@dataclass
class StoreRun:
    """What one run of the store did (O(shards) on the driver)."""

    shards: list[str]  # every input shard uri, in order
    committed: dict[str, int] = field(default_factory=dict)  # shard name -> rows (this run and before)
    dropped: dict[str, int] = field(default_factory=dict)  # rows dropped now, by reason
    missing: dict[str, str] = field(default_factory=dict)  # shard name -> why it could not be read
    written: int = 0
    skipped: int = 0


def model_facts(cfg: FilterConfig) -> tuple[int, int, int, str]:
    """(image size, context length, embed dim, merges path) of the checkpoint, read once on the driver."""
    from pipelines.evaluation.embed import EvalModelError, load_tokenizer
    from pipelines.filter.model import load_clip

    model = load_clip(cfg.checkpoint)
    merges = cfg.tokenizer or find_merges(cfg.checkpoint)
    load_tokenizer(merges, model)  # vocabulary checked before any task starts
    if not merges:
        raise EvalModelError("no tokenizer")
    c = model.config
    return c.image_resolution, c.context_length, c.embed_dim, merges


def build_store(cfg: FilterConfig, uris: list[str] | None = None) -> StoreRun:
    """Embed every shard of `cfg.data_uri` that has no store file yet; returns the run's counts."""
    import ray

    uris = uris if uris is not None else datasets.list_shards(cfg.data_uri, cfg.data_format)
    run = StoreRun(shards=uris)
    todo = [u for u in uris if not storage.exists(store_uri(cfg.output, datasets.shard_name(u)))]
    run.skipped = len(uris) - len(todo)
    if todo:
        size, context, dim, merges = model_facts(cfg)
        e = cfg.embed
        ds = ray.data.from_items([{"uri": u} for u in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            read_chunks,
            fn_kwargs={"size": size, "context_length": context, "merges": merges, "chunk_size": e.chunk_size},
            batch_size=1,
            num_cpus=e.read_cpus,
        )
        opts = EmbedOptions(device=e.device, pool=e.pool, cpus_per_actor=e.cpus_per_actor)
        opts.gpus_per_actor = e.gpus_per_actor
        ds = ds.map_batches(
            ChunkEmbedder,
            fn_constructor_kwargs={"checkpoint": cfg.checkpoint, "device": e.device},
            batch_size=1,  # one chunk per call: the same rows always share one forward pass
            **actor_pool(opts),
        )
        ds = ds.map_batches(
            ShardCommitter,
            fn_constructor_kwargs={"output": cfg.output, "dim": dim},
            batch_size=1,
            num_cpus=0.25,
            compute=ray.data.ActorPoolStrategy(size=1),  # every chunk of a shard meets here
        )
        for rec in ds.iter_rows():
            _record(run, rec)
    _count_committed(cfg, run)
    return run


def _record(run: StoreRun, rec: dict) -> None:
    if rec["error"]:
        run.missing[str(rec["shard"])] = str(rec["error"])
        return
    run.written += 1
    for reason, n in json.loads(rec["dropped"]).items():
        run.dropped[reason] = run.dropped.get(reason, 0) + int(n)


def _count_committed(cfg: FilterConfig, run: StoreRun) -> None:
    """Rows per committed store file, from the Parquet footers (cheap, O(shards))."""
    import pyarrow.parquet as pq

    for uri in run.shards:
        name = datasets.shard_name(uri)
        path = store_uri(cfg.output, name)
        if name in run.missing or not storage.exists(path):
            continue
        fs, p = storage.resolve(path)
        with fs.open_input_file(p) as f:
            run.committed[name] = pq.ParquetFile(f).metadata.num_rows
