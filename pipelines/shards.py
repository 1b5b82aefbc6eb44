"""The shard contract (see docs/architecture.md): WebDataset tars and Parquet files of image-text samples.

A sample is a dict with `key` (str, unique and stable), `jpg` (JPEG bytes), `txt` (the caption) and `json`
(metadata: url, caption, query, width, height, original_width, original_height, sha256, ...). The tar holds
`{key}.jpg`, `{key}.txt`, `{key}.json` — the layout img2dataset writes and open_clip/webdataset read. The
Parquet shard has the same fields as columns, the JPEG bytes in a binary column `jpg`.

A shard is committed when its `{name}.manifest.json` exists: data files are written atomically first, the
manifest last, so a rerun trusts exactly the shards that have a manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

FORMATS = ("webdataset", "parquet")
MANIFEST_SUFFIX = ".manifest.json"
INDEX_FILE = "_index.parquet"  # shard -> samples, bytes, file paths (pipelines/crawl/aggregate.py)
# Columns every Parquet shard has, in this order; further metadata fields follow.
META_COLUMNS = ("url", "caption", "query", "width", "height", "original_width", "original_height", "sha256")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: the same samples give the same tar
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(samples: Sequence[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            key = s["key"]
            _tar_member(tar, f"{key}.jpg", s["jpg"])
            _tar_member(tar, f"{key}.txt", s["txt"].encode("utf-8"))
            _tar_member(
                tar, f"{key}.json", json.dumps(s["json"], sort_keys=True, ensure_ascii=False).encode()
            )
    return buf.getvalue()


def parquet_bytes(samples: Sequence[dict[str, Any]]) -> bytes:
    meta_keys = list(META_COLUMNS) + sorted({k for s in samples for k in s["json"]} - set(META_COLUMNS))
    columns: dict[str, list[Any]] = {
        "key": [s["key"] for s in samples],
        "jpg": [s["jpg"] for s in samples],
        "txt": [s["txt"] for s in samples],
    }
    for k in meta_keys:
        values = [s["json"].get(k) for s in samples]
        # Nested values (lists, dicts) are kept as JSON text so every shard has a flat, stable schema.
        if any(isinstance(v, list | dict) for v in values):
            values = [None if v is None else json.dumps(v, sort_keys=True) for v in values]
        columns[k] = values
    columns["json"] = [json.dumps(s["json"], sort_keys=True, ensure_ascii=False) for s in samples]
    table = pa.table({k: pa.array(v, type=pa.binary()) if k == "jpg" else v for k, v in columns.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def keys_digest(keys: Iterable[str]) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode() + b"\n")
    return h.hexdigest()


def shard_dir(shard_name: str, prefix_chars: int = 0) -> str:
    """The folder of a shard's data files, relative to the dataset: "" (flat, img2dataset's layout), or
    the first `prefix_chars` hex digits of the name's sha1, which spreads the keys of a big dataset over
    16**prefix_chars S3 prefixes (each prefix has its own request rate; listings stay short)."""
    return hashlib.sha1(shard_name.encode()).hexdigest()[:prefix_chars] if prefix_chars else ""


def write_shard_files(
    samples: Sequence[dict[str, Any]],
    out_uri: str,
    shard_name: str,
    formats: Sequence[str] = FORMATS,
    subdir: str = "",
) -> dict[str, int]:
    """Write one shard's data files (each atomically) under `subdir` (`shard_dir`). Returns {path relative
    to `out_uri`: bytes}, what the manifest and the index record."""
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ValueError(f"unknown shard format(s) {sorted(unknown)}; choose from {list(FORMATS)}")
    files = {}
    for fmt, ext, encode in (("webdataset", ".tar", tar_bytes), ("parquet", ".parquet", parquet_bytes)):
        if fmt in formats:
            data = encode(samples)
            relative = f"{subdir}/{shard_name}{ext}" if subdir else f"{shard_name}{ext}"
            storage.write_bytes_atomic(storage.join(out_uri, relative), data)
            files[relative] = len(data)
    return files


def write_manifest(
    samples: Sequence[dict[str, Any]],
    out_uri: str,
    shard_name: str,
    files: dict[str, int],
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The commit of a shard whose files are written: counts and sizes, never per-sample lists."""
    manifest = {
        "shard": shard_name,
        "count": len(samples),
        "keys_sha256": keys_digest(s["key"] for s in samples),
        "files": files,
        "image_bytes": sum(len(s["jpg"]) for s in samples),
        "stats": stats or {},
    }
    storage.write_json(storage.join(out_uri, shard_name + MANIFEST_SUFFIX), manifest)
    return manifest


def write_shard(
    samples: Sequence[dict[str, Any]],
    out_uri: str,
    shard_name: str,
    formats: Sequence[str] = FORMATS,
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one shard in each format, then its manifest (the commit). Returns the manifest."""
    files = write_shard_files(samples, out_uri, shard_name, formats)
    return write_manifest(samples, out_uri, shard_name, files, stats)


def committed_names(out_uri: str) -> set[str]:
    """Names of the committed shards (no manifest is read): the shards of `_index.parquet`, which a build
    writes last, once every shard is committed; else (a build not yet finished) by listing the manifests."""
    index = storage.join(out_uri, INDEX_FILE)
    if storage.exists(index):
        return set(
            pq.read_table(io.BytesIO(storage.read_bytes(index)), columns=["shard"])["shard"].to_pylist()
        )
    return {
        u.rsplit("/", 1)[-1][: -len(MANIFEST_SUFFIX)] for u in storage.list_files(out_uri, MANIFEST_SUFFIX)
    }


def committed_shards(out_uri: str) -> dict[str, dict[str, Any]]:
    """Manifests of the committed shards under `out_uri`, by shard name."""
    return {
        m["shard"]: m for m in (storage.read_json(u) for u in storage.list_files(out_uri, MANIFEST_SUFFIX))
    }


def read_tar_samples(data: bytes) -> Iterator[dict[str, Any]]:
    """Samples of a WebDataset tar (bytes), grouped by key in file order."""
    current: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            payload = tar.extractfile(member).read()
            if current and current["key"] != key:
                yield current
                current = {}
            current["key"] = key
            if ext == "txt":
                current["txt"] = payload.decode("utf-8")
            elif ext == "json":
                current["json"] = json.loads(payload)
            else:
                current[ext] = payload
    if current:
        yield current


def read_parquet_samples(data: bytes) -> Iterator[dict[str, Any]]:
    table = pq.read_table(io.BytesIO(data))
    for row in table.to_pylist():
        yield {"key": row["key"], "jpg": row["jpg"], "txt": row["txt"], "json": json.loads(row["json"])}


def read_shard_samples(uri: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard file (`.tar` or `.parquet`), local or s3://."""
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        return read_parquet_samples(data)
    return read_tar_samples(data)


def shard_files(out_uri: str, fmt: str = "webdataset") -> list[str]:
    """URIs of the committed shard files of one format, in name order."""
    ext = ".tar" if fmt == "webdataset" else ".parquet"
    return [
        storage.join(out_uri, name)
        for m in committed_shards(out_uri).values()
        for name in m["files"]
        if name.endswith(ext)
    ]


def write_dataset(
    samples: Iterable[dict[str, Any]],
    out_uri: str,
    samples_per_shard: int,
    formats: Sequence[str] = FORMATS,
    prefix: str = "",
) -> list[dict[str, Any]]:
    """Cut `samples` into shards named `{prefix}{index:05d}` and write them all (tests, demo)."""
    manifests, batch = [], []
    for sample in samples:
        batch.append(sample)
        if len(batch) == samples_per_shard:
            manifests.append(write_shard(batch, out_uri, f"{prefix}{len(manifests):05d}", formats))
            batch = []
    if batch:
        manifests.append(write_shard(batch, out_uri, f"{prefix}{len(manifests):05d}", formats))
    return manifests
