"""The embedding store: per input shard, `{output}/embeddings/{shard}.parquet` with one row per sample
(row, key, shard, query, reason, score = image–text cosine, image_emb, text_emb as unit-norm fp16).

Three stages over chunks (up to `chunk_size` rows of one shard, always the same rows):
- `read_chunks` (CPU tasks): read a shard, decode + resize + centre-crop each image to uint8, tokenize
  each caption; bad rows (undecodable image, empty caption) get a drop reason, a vanished shard one chunk
  that says so;
- `ChunkEmbedder` (actor pool; GPU with autocast where the cluster has GPUs, CPU fp32 otherwise): one call
  per chunk, so a chunk is always embedded in the same batch and a rerun computes the same bytes;
- `ShardCommitter` (one actor): gathers a shard's chunks and writes its file atomically once all are in,
  returning a small record. A file that exists is a committed shard: a rerun skips it.
The driver holds the shard list and one record per shard, never samples.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from clip_model.transform import OPENAI_MEAN, OPENAI_STD, center_crop_box, convert_rgb, resized_size
from pipelines import datasets, storage
from pipelines.evaluation.embed import decode_checked, resolve_device

STORE_DIR = "embeddings"
MISSING_SHARD = "missing_shard"


def store_uri(output: str, shard: str) -> str:
    return storage.join(output, STORE_DIR, f"{shard}.parquet")


# ---------------------------------------------------------------- reading (CPU tasks)


def _parquet_queries(data: bytes, n: int) -> list[str | None]:
    if "query" not in pq.read_schema(io.BytesIO(data)).names:
        return [None] * n
    queries = pq.read_table(io.BytesIO(data), columns=["query"])["query"].to_pylist()
    return [None if q is None else str(q) for q in queries]


def _tar_queries(data: bytes) -> dict[str, str | None]:
    """{key: query} from a tar's `.json` members; unreadable metadata is no query, not an error."""
    import tarfile

    out: dict[str, str | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
            if member.isfile() and ext == "json":
                try:
                    q = json.loads(tar.extractfile(member).read()).get("query")
                except (ValueError, AttributeError):
                    q = None
                out[key] = None if q is None else str(q)
    return out


def _read_shard(uri: str) -> dict[str, list]:
    """key, jpg, txt, query of every row of one shard, in file order (nothing decoded; the bytes are
    fetched once and parsed by pipelines/datasets.py's readers)."""
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        rows = datasets._read_parquet(data, uri)
        rows["query"] = _parquet_queries(data, len(rows["key"]))
    else:
        rows, damage = datasets._read_tar(data)
        if damage:  # a damaged shard is reported whole, as before (its rows cannot all be counted)
            raise datasets.DatasetError(f"{uri}: {damage.replace('_', ' ')}")
        queries = _tar_queries(data)
        rows["query"] = [queries.get(k) for k in rows["key"]]
    return rows


def prepare_pixels(data: bytes | None, size: int) -> tuple[np.ndarray | None, str | None]:
    """(uint8 [size, size, 3], None) or (None, drop reason): OpenAI's eval resize + centre crop."""
    if data is None:
        return None, "missing_image"
    image, reason = decode_checked(data)
    if image is None:
        return None, reason
    try:
        width, height = resized_size(*image.size, size)
        image = image.resize((width, height), 3) if (width, height) != image.size else image
        image = convert_rgb(image.crop(center_crop_box(width, height, size)))
        return np.asarray(image, dtype=np.uint8), None
    except (ValueError, OSError, TypeError):
        return None, "unsupported_image_mode"


@functools.lru_cache(maxsize=4)
def _tokenizer(merges: str, context_length: int):
    from clip_model import Tokenizer

    return Tokenizer(storage.local_file(merges), context_length=context_length)


def _chunk(shard: str, rows: dict[str, list], lo: int, hi: int, n_chunks: int, size: int, tok) -> dict:
    """One chunk row: rows [lo, hi) of a shard; pixels/tokens of its good rows as raw bytes."""
    pixels, texts, reasons = [], [], []
    for jpg, txt in zip(rows["jpg"][lo:hi], rows["txt"][lo:hi]):
        arr, reason = prepare_pixels(jpg, size)
        if reason is None and not (txt or "").strip():
            reason = "empty_caption"
        reasons.append(reason or "")
        if not reason:
            pixels.append(arr)
            texts.append(txt)
    tokens = tok(texts).numpy().astype(np.int32) if texts else np.zeros((0, tok.context_length), np.int32)
    meta = {"lo": lo, "keys": rows["key"][lo:hi], "queries": rows["query"][lo:hi], "reasons": reasons}
    return {
        "shard": shard,
        "chunk": lo,
        "n_chunks": n_chunks,
        "meta": json.dumps(meta),
        "pixels": np.stack(pixels).tobytes() if pixels else b"",
        "tokens": tokens.tobytes(),
    }


def read_chunks(
    batch: Mapping[str, np.ndarray], size: int, context_length: int, merges: str, chunk_size: int
) -> dict:
    """Shard uris -> chunk rows (see `_chunk`). A shard that cannot be read is one chunk saying why."""
    tok = _tokenizer(merges, context_length)
    out: list[dict] = []
    for uri in batch["uri"]:
        uri, shard = str(uri), datasets.shard_name(str(uri))
        try:
            rows = _read_shard(uri)
        except (OSError, datasets.DatasetError, ValueError) as e:  # vanished, truncated, not a shard
            meta = {"lo": 0, "keys": [], "queries": [], "reasons": [], "error": f"{type(e).__name__}: {e}"}
            out.append(
                {
                    "shard": shard,
                    "chunk": 0,
                    "n_chunks": 1,
                    "meta": json.dumps(meta),
                    "pixels": b"",
                    "tokens": b"",
                }
            )
            continue
        n = len(rows["key"])
        starts = list(range(0, n, chunk_size)) or [0]
        out.extend(_chunk(shard, rows, lo, lo + chunk_size, len(starts), size, tok) for lo in starts)
    return {
        k: np.array([r[k] for r in out], dtype=object)
        for k in ("shard", "chunk", "n_chunks", "meta", "pixels", "tokens")
    }


# ---------------------------------------------------------------- embedding (actor pool)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [n,S,S,3] -> float32 [n,3,S,S] with CLIP's mean/std (on the device)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ChunkEmbedder:
    """Chunk rows -> the same rows with unit-norm fp16 `image_emb`/`text_emb` and float32 `score` of the
    good rows (raw bytes); `pixels`/`tokens` are dropped. GPU: autocast bf16 (fp16 before Ampere)."""

    def __init__(self, checkpoint: str, device: str = "auto", model=None):
        from pipelines.filter.model import load_clip

        self.device = resolve_device(device)
        self.model = model if model is not None else load_clip(checkpoint, self.device)
        self.size = self.model.config.image_resolution
        self.context = self.model.config.context_length
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.dtype = torch.bfloat16 if bf16 else torch.float16

    @torch.no_grad()
    def embed(self, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = normalize(torch.from_numpy(pixels).to(self.device))
        text = torch.from_numpy(tokens).long().to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda"):
            img = self.model.encode_image(images).float()
            txt = self.model.encode_text(text).float()
        img = torch.nn.functional.normalize(img, dim=-1).cpu().numpy()
        txt = torch.nn.functional.normalize(txt, dim=-1).cpu().numpy()
        return img.astype(np.float16), txt.astype(np.float16), (img * txt).sum(1).astype(np.float32)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {
            k: [] for k in ("shard", "chunk", "n_chunks", "meta", "image_emb", "text_emb", "score")
        }
        for i in range(len(batch["shard"])):
            pixels = np.frombuffer(batch["pixels"][i], np.uint8).reshape(-1, self.size, self.size, 3)
            tokens = np.frombuffer(batch["tokens"][i], np.int32).reshape(-1, self.context)
            img, txt, score = (
                self.embed(pixels, tokens)
                if len(pixels)
                else (np.zeros(0, np.float16),) * 2 + (np.zeros(0, np.float32),)
            )
            for k in ("shard", "chunk", "n_chunks", "meta"):
                out[k].append(batch[k][i])
            out["image_emb"].append(img.tobytes())
            out["text_emb"].append(txt.tobytes())
            out["score"].append(score.tobytes())
        return {k: np.array(v, dtype=object) for k, v in out.items()}


# ---------------------------------------------------------------- commit (one actor)


def _fp16_column(raw: list[bytes | None], dim: int) -> pa.Array:
    """fixed_size_list<float16>[dim], null where a row has no embedding (a dropped row)."""
    flat = np.zeros((len(raw), dim), np.float16)
    for i, b in enumerate(raw):
        if b is not None:
            flat[i] = np.frombuffer(b, np.float16)
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), dim)
    mask = np.array([b is None for b in raw], dtype=bool)
    return pa.array(values.to_pylist(), type=values.type, mask=mask) if mask.any() else values


def shard_table(shard: str, chunks: list[Mapping], dim: int) -> pa.Table:
    """The store table of one shard from its embedded chunks (any order)."""
    cols: dict[str, list] = {
        k: [] for k in ("row", "key", "query", "reason", "score", "image_emb", "text_emb")
    }
    for c in sorted(chunks, key=lambda c: int(c["chunk"])):
        meta = json.loads(c["meta"])
        img = np.frombuffer(c["image_emb"], np.float16).reshape(-1, dim)
        txt = np.frombuffer(c["text_emb"], np.float16).reshape(-1, dim)
        score = np.frombuffer(c["score"], np.float32)
        good = 0
        for j, (key, query, reason) in enumerate(zip(meta["keys"], meta["queries"], meta["reasons"])):
            cols["row"].append(meta["lo"] + j)
            cols["key"].append(str(key))
            cols["query"].append(query)
            cols["reason"].append(reason)
            ok = not reason
            cols["score"].append(float(score[good]) if ok else None)
            cols["image_emb"].append(img[good].tobytes() if ok else None)
            cols["text_emb"].append(txt[good].tobytes() if ok else None)
            good += ok
    n = len(cols["key"])
    return pa.table(
        {
            "row": pa.array(cols["row"], pa.int32()),
            "key": pa.array(cols["key"], pa.string()),
            "shard": pa.array([shard] * n, pa.string()),
            "query": pa.array(cols["query"], pa.string()),
            "reason": pa.array(cols["reason"], pa.string()),
            "score": pa.array(cols["score"], pa.float32()),
            "image_emb": _fp16_column(cols["image_emb"], dim),
            "text_emb": _fp16_column(cols["text_emb"], dim),
        }
    )


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class ShardCommitter:
    """Embedded chunks -> one record per shard whose chunks are all in (its store file written first).

    Records: shard, n (rows), dropped (JSON {reason: n}), error (why a shard could not be read, "")."""

    def __init__(self, output: str, dim: int):
        self.output, self.dim = output, dim
        self.pending: dict[str, list] = {}

    def _commit(self, shard: str, chunks: list[dict]) -> dict:
        error = json.loads(chunks[0]["meta"]).get("error", "")
        if error:  # nothing written: a rerun tries the shard again
            return {"shard": shard, "n": 0, "dropped": json.dumps({}), "error": error}
        table = shard_table(shard, chunks, self.dim)
        storage.write_bytes_atomic(store_uri(self.output, shard), table_bytes(table))
        reasons = [r for r in table["reason"].to_pylist() if r]
        dropped = {r: reasons.count(r) for r in sorted(set(reasons))}
        return {"shard": shard, "n": table.num_rows, "dropped": json.dumps(dropped), "error": ""}

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = []
        for i in range(len(batch["shard"])):
            chunk = {k: batch[k][i] for k in batch}
            shard = str(chunk["shard"])
            parts = self.pending.setdefault(shard, [])
            parts.append(chunk)
            if len(parts) == int(chunk["n_chunks"]):
                records.append(self._commit(shard, self.pending.pop(shard)))
        keys = ("shard", "n", "dropped", "error")
        return {k: np.array([r[k] for r in records], dtype=object) for k in keys}
