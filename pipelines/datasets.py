"""Shard lists: which files a training or evaluation run reads, and how many samples each holds.

One module for both readers (the trainer and the evaluation), so they accept the same inputs:
- a folder (local or s3://) of `.tar` (WebDataset) or `.parquet` shards: ours, img2dataset's output
  (`NNNNN.tar` + `NNNNN_stats.json` + a metadata-only `NNNNN.parquet`), or any other tool's;
- a brace-expanded list as open_clip takes it: `s3://bucket/{00000..01023}.tar`, `a/{x,y}.tar`, several
  patterns joined by `::`;
- a single shard file.

Sample counts (for planning steps and epochs) come from what is there, cheapest first: our dataset index
`_index.parquet` (one row per shard: shard, num_samples, tar_bytes, parquet_bytes; read once by the driver),
else per shard img2dataset's `NNNNN_stats.json` (`successes`) or our older `NNNNN.manifest.json` (`count`),
else the rows are counted. Per-shard look-ups and counts run as Ray tasks over chunks of the list when Ray
is up (a 100k-shard list is not walked by the driver), in-process otherwise.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

INDEX_FILE = "_index.parquet"
EXTENSIONS = {"webdataset": ".tar", "parquet": ".parquet"}
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
COUNT_CHUNK = 256  # shards per counting task


class DatasetError(ValueError):
    """A shard list that cannot be used as given (the message says why and where)."""


@dataclass(frozen=True)
class Shard:
    uri: str
    num_samples: int

    @property
    def name(self) -> str:
        return shard_name(self.uri)


def shard_name(uri: str) -> str:
    """`s3://b/x/00012.tar` -> `00012`."""
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0]


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


# ---------------------------------------------------------------- listing


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as bash and open_clip do it: `{00000..00003}` keeps the zero padding of the first
    bound, `{a,b}` lists alternatives; several groups multiply, in order."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = pattern.find("}", start)
    if end < 0:
        raise DatasetError(f"unbalanced brace in shard pattern {pattern!r}")
    body, head, tail = pattern[start + 1 : end], pattern[:start], pattern[end + 1 :]
    if m := _RANGE.match(body):
        lo, hi = int(m.group(1)), int(m.group(2))
        width = len(m.group(1)) if m.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [head + item + rest for item in items for rest in expand_braces(tail)]


def list_shards(data_uri: str, data_format: str = "webdataset") -> list[str]:
    """Shard URIs of `data_uri` (folder, single file, brace pattern, `::`-joined patterns), in the order
    given (folders: sorted by name). Files of the other format and temporary files are ignored."""
    if data_format not in EXTENSIONS:
        raise DatasetError(f"unknown data_format {data_format!r}: use one of {sorted(EXTENSIONS)}")
    ext = EXTENSIONS[data_format]
    uris: list[str] = []
    for part in (p.strip() for p in str(data_uri).split("::")):
        if not part:
            continue
        if "{" in part:
            uris.extend(expand_braces(part))
        elif part.endswith(tuple(EXTENSIONS.values())):
            uris.append(part)
        elif (indexed := indexed_shards(part, data_format)) is not None:
            uris.extend(indexed)  # our index lists the shards: no listing of a folder of millions of keys
        else:
            names = ((u, u.rsplit("/", 1)[-1]) for u in storage.list_files(part, ext))
            uris.extend(u for u, n in names if ".tmp-" not in n and not n.startswith(("_", ".")))  # _index
    if not uris:
        raise DatasetError(f"no {ext} shards under {data_uri!r} (data_format={data_format})")
    wrong = [u for u in uris if not u.endswith(ext)]
    if wrong:
        raise DatasetError(f"{len(wrong)} shard(s) of another format than {data_format}: {wrong[:3]}")
    return uris


# ---------------------------------------------------------------- counting


def read_index(folder: str) -> dict[str, dict] | None:
    """`{folder}/_index.parquet` as {shard name: row}, or None when the folder has no index."""
    uri = storage.join(folder, INDEX_FILE)
    if not storage.exists(uri):
        return None
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    return {row["shard"]: row for row in table.to_pylist()}


def indexed_shards(folder: str, data_format: str) -> list[str] | None:
    """The shard files of `data_format` that `{folder}/_index.parquet` locates (its `tar_path` /
    `parquet_path` columns, relative to the folder), in shard order; None when there is no such index."""
    index = read_index(folder)
    column = "tar_path" if data_format == "webdataset" else "parquet_path"
    if not index or column not in next(iter(index.values())):
        return None
    return [storage.join(folder, row[column]) for _, row in sorted(index.items()) if row[column]]


def _from_index(uris: Sequence[str], data_format: str) -> dict[str, int]:
    """Counts of the shards an index knows (one index read per folder)."""
    bytes_column = "tar_bytes" if data_format == "webdataset" else "parquet_bytes"
    counts: dict[str, int] = {}
    indexes: dict[str, dict | None] = {}
    for uri in uris:
        row = _index_row(uri, indexes)
        if row is not None and row.get(bytes_column, 1) != 0:
            counts[uri] = int(row["num_samples"])
    return counts


def _index_row(uri: str, indexes: dict[str, dict | None]) -> dict | None:
    """A shard's row in the index beside it or, for a shard in a prefix folder (shards.shard_dir), in
    the dataset folder above, where the row's path must name it. `indexes` caches reads per folder."""
    parent = _parent(uri)
    for folder in (parent, _parent(parent)):
        if folder not in indexes:
            indexes[folder] = read_index(folder)
        row = (indexes[folder] or {}).get(shard_name(uri))
        if folder == parent and (row is not None or indexes[folder] is not None):
            return row
        relative = uri[len(folder) + 1 :]
        if row is not None and relative in (row.get("tar_path"), row.get("parquet_path")):
            return row
    return None


def count_rows(uri: str) -> int:
    """Samples in one shard file, counted: Parquet from its footer, a tar by its distinct keys. A damaged
    shard counts what can be read of it (0 when nothing can): training names it when it reads it."""
    if uri.endswith(".parquet"):
        fs, path = storage.resolve(uri)
        try:
            with fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowException, OSError):
            return 0
    return len(read_rows_tolerant(uri)[0]["key"])


def shard_count(uri: str) -> int:
    """One shard's sample count from the files beside it: img2dataset's stats, our manifest, or counted."""
    stem = uri.rsplit(".", 1)[0]
    stats = stem + "_stats.json"
    if storage.exists(stats):
        return int(storage.read_json(stats)["successes"])
    manifest = stem + ".manifest.json"
    if storage.exists(manifest):
        return int(storage.read_json(manifest)["count"])
    return count_rows(uri)


def _count_chunk(uris: Sequence[str]) -> list[int]:
    return [shard_count(u) for u in uris]


def _map_chunks(fn: Callable[[Sequence[str]], list[int]], uris: Sequence[str]) -> list[int]:
    """fn over chunks of `uris`: Ray tasks when Ray is up, in-process otherwise."""
    chunks = [list(uris[i : i + COUNT_CHUNK]) for i in range(0, len(uris), COUNT_CHUNK)]
    import ray

    if not ray.is_initialized() or len(chunks) <= 1:
        return [n for chunk in chunks for n in fn(chunk)]
    task = ray.remote(num_cpus=0.25, max_retries=3)(fn)
    return [n for part in ray.get([task.remote(c) for c in chunks]) for n in part]


def resolve(data_uri: str, data_format: str = "webdataset") -> list[Shard]:
    """The shards of `data_uri` with their sample counts (see the module docstring for the sources)."""
    uris = list_shards(data_uri, data_format)
    known = _from_index(uris, data_format)
    unknown = [u for u in uris if u not in known]
    if unknown:
        known.update(zip(unknown, _map_chunks(_count_chunk, unknown)))
    return [Shard(u, known[u]) for u in uris]


# ---------------------------------------------------------------- reading


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _empty_rows() -> dict[str, list]:
    return {"key": [], "jpg": [], "txt": []}


def _read_tar(data: bytes, only: Set[str] | None = None) -> tuple[dict[str, list], str | None]:
    """key, jpg, txt columns of a WebDataset tar, one row per key (members grouped in file order), and the
    tar's damage: None, "unreadable_tar" (nothing could be read) or "truncated_tar" (rows up to the damage
    are returned). A key without a `.jpg` (or other image) member or without `.txt` keeps None there (a bad
    row, counted). With `only`, only those keys' members are extracted."""
    import tarfile

    rows, current = _empty_rows(), None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                if only is not None and key not in only:
                    continue
                if key != current:
                    current = key
                    rows["key"].append(key)
                    rows["jpg"].append(None)
                    rows["txt"].append(None)
                ext = ext.lower()
                if ext in ("jpg", "jpeg", "png", "webp"):
                    rows["jpg"][-1] = tar.extractfile(member).read()
                elif ext == "txt":
                    rows["txt"][-1] = tar.extractfile(member).read().decode("utf-8", errors="replace")
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError, ValueError):  # what tarfile raises on damaged archives
        return rows, "truncated_tar" if rows["key"] else "unreadable_tar"
    # tarfile ends quietly where the data ends; a whole archive ends with a zero block (the end marker)
    if data[end : end + tarfile.BLOCKSIZE] != bytes(tarfile.BLOCKSIZE):
        return rows, "truncated_tar"
    return rows, None


def _read_parquet(data: bytes, uri: str, only: Set[str] | None = None) -> dict[str, list]:
    names = pq.read_schema(io.BytesIO(data)).names
    if "jpg" not in names:
        raise DatasetError(
            f"{uri} has no `jpg` column (img2dataset writes metadata-only Parquet beside its tars: "
            "read the .tar shards with data_format=webdataset)"
        )
    columns = [c for c in ("key", "jpg", "txt", "caption") if c in names]
    table: pa.Table = pq.read_table(io.BytesIO(data), columns=columns)
    n = table.num_rows
    keys = (
        table.column("key").to_pylist()
        if "key" in columns
        else [f"{shard_name(uri)}_{i:06d}" for i in range(n)]
    )
    if only is not None:  # only the wanted rows' bytes become Python objects
        take = [i for i, k in enumerate(keys) if str(k) in only]
        table, keys, n = table.take(take), [keys[i] for i in take], len(take)
    text = "txt" if "txt" in columns else "caption" if "caption" in columns else None
    texts = table.column(text).to_pylist() if text else [None] * n
    return {
        "key": [str(k) for k in keys],
        "jpg": table.column("jpg").to_pylist(),
        "txt": [_text(t) for t in texts],
    }


def read_rows(uri: str, only: Set[str] | None = None) -> dict[str, list]:
    """All rows of one shard (or only those whose key is in `only`) as columns key (str), jpg (bytes |
    None), txt (str | None), in file order.    Nothing is decoded: the bytes stay compressed. A damaged shard is a `DatasetError` naming it."""
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        return _read_parquet(data, uri, only)
    rows, damage = _read_tar(data, only)
    if damage:
        raise DatasetError(f"{uri}: {damage.replace('_', ' ')}")
    return rows


def read_rows_tolerant(uri: str, only: Set[str] | None = None) -> tuple[dict[str, list], str | None]:
    """`read_rows` for training, where a bad shard is a data problem: (the rows that could be read, the
    damage as a drop reason or None). Reasons: missing_shard, unreadable_tar, truncated_tar,
    unreadable_parquet, parquet_without_jpg."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return _empty_rows(), "missing_shard"
    if not uri.endswith(".parquet"):
        return _read_tar(data, only)
    try:
        return _read_parquet(data, uri, only), None
    except DatasetError:
        return _empty_rows(), "parquet_without_jpg"
    except (pa.ArrowException, OSError):
        return _empty_rows(), "unreadable_parquet"


def read_samples(uri: str) -> list[dict]:
    """One shard's samples with their metadata (`json`) for readers that need fields beyond key/jpg/txt
    (the evaluation's labels and caption lists)."""
    from pipelines import shards

    if uri.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        out = []
        for row in table.to_pylist():
            meta = row.get("json")
            meta = (
                json.loads(meta)
                if isinstance(meta, str | bytes)
                else {k: v for k, v in row.items() if k != "jpg"}
            )
            out.append(
                {
                    "key": str(row.get("key")),
                    "jpg": row.get("jpg"),
                    "txt": _text(row.get("txt")),
                    "json": meta,
                }
            )
        return out
    return list(shards.read_tar_samples(storage.read_bytes(uri)))
