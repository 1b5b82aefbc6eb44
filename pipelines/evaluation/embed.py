"""Images and texts -> CLIP features, in-process for small sets or with Ray Data for large ones, cached.

`ImageEmbedder` and `TextEmbedder` are callable classes over a batch (dict of numpy arrays): the in-process
path calls them directly, the Ray path hands them to `map_batches` as an actor pool (one GPU per actor
when the cluster has GPUs), so both paths compute the same thing. Results are sorted by record id, so the
two paths also return the same order. Unreadable images are kept as rows with `ok=False` by the embedder
and a drop reason (`decode_checked`: empty, truncated, bomb, SVG, unreadable, unsupported mode), counted by
reason by `embed_eval_set`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clip_model.safe_pickle import refusal_reason
from pipelines import storage
from pipelines.pools import Pool, pool_bounds

from .data import EvalSet, expand_unit

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin")


class EvalModelError(ValueError):
    """A checkpoint or tokenizer that cannot be evaluated (the message says which file and why)."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _files_under(uri: str) -> list[str]:
    """Paths relative to `uri` of every file below it (a local folder or an s3:// prefix), sorted."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def _kind(uri: str) -> str:
    """What `uri` (a local path or an s3:// URI) names: "file", "dir" or "missing"."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri)
    kind = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(kind, "missing")


def find_weights(checkpoint: str) -> str:
    """The OpenAI-layout weights file of a checkpoint (local or s3://): the path itself, or inside a trainer
    checkpoint folder the one weights file (preferring names with 'openai' or 'fp16' when there are several)."""
    kind = _kind(checkpoint)
    if kind == "file":
        return checkpoint
    if kind == "missing":
        raise EvalModelError(f"checkpoint not found: {checkpoint}")
    files = [f for f in _files_under(checkpoint) if Path(f).suffix in WEIGHT_SUFFIXES]
    preferred = [f for f in files if "openai" in Path(f).name.lower() or "fp16" in Path(f).name.lower()]
    candidates = preferred or files
    if len(candidates) != 1:
        raise EvalModelError(
            f"checkpoint folder {checkpoint}: expected one OpenAI-layout weights file "
            f"({'/'.join(WEIGHT_SUFFIXES)}), found {candidates}"
        )
    return storage.join(checkpoint, candidates[0])


def load_model(checkpoint: str, device: str | torch.device = "cpu"):
    """A fp32 CLIP in eval mode from a weights file, a TorchScript archive or a trainer checkpoint folder,
    local or s3:// (an S3 object is copied to a local temp file once per process)."""
    import clip_model
    from clip_model.checkpoint import CheckpointError

    weights = find_weights(checkpoint)
    try:
        return clip_model.load(storage.local_file(weights), device=device)
    except (CheckpointError, RuntimeError, ValueError, OSError) as e:
        raise EvalModelError(f"checkpoint {weights} cannot be loaded as a CLIP model: {e}") from e


def find_merges(checkpoint: str) -> str | None:
    """A BPE merges file (.txt.gz) stored beside the weights (the trainer writes its tokenizer there)."""
    kind = _kind(checkpoint)
    if kind == "missing":
        return None
    if kind == "dir":
        found = [storage.join(checkpoint, f) for f in _files_under(checkpoint) if f.endswith(".txt.gz")]
    else:
        parent = checkpoint.rsplit("/", 1)[0] if storage.is_s3(checkpoint) else str(Path(checkpoint).parent)
        found = storage.list_files(parent, ".txt.gz")
    return found[0] if len(found) == 1 else None


def load_tokenizer(merges: str | None, model=None):
    """`clip_model.Tokenizer` from a merges file (local or s3://); its vocabulary must match the model's token
    embedding."""
    from clip_model import Tokenizer

    if not merges:
        raise EvalModelError(
            "no tokenizer: set tokenizer= to the BPE merges file the model was trained with (.txt.gz, e.g. "
            "OpenAI's bpe_simple_vocab_16e6.txt.gz); the checkpoint folder holds none"
        )
    if _kind(merges) != "file":
        raise EvalModelError(f"tokenizer merges file not found: {merges}")
    # Token rows as long as the model's positional embedding (77 for OpenAI's models, less for tiny ones).
    context_length = getattr(getattr(model, "config", None), "context_length", 77)
    tok = Tokenizer(storage.local_file(merges), context_length=context_length)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and tok.vocab_size != vocab:
        raise EvalModelError(
            f"tokenizer ({merges}) has {tok.vocab_size} tokens but the model's token "
            f"embedding has {vocab}: give the merges file the model was trained with (tokenizer=...)"
        )
    return tok


def _as_model(model_source, device: torch.device):
    return load_model(model_source, device) if isinstance(model_source, str | os.PathLike) else model_source


# Images over this many pixels are dropped before decoding (a small file can declare a huge canvas).
MAX_IMAGE_PIXELS = 64_000_000

# Drop reasons of `decode_checked`; `unreadable_image` is anything else Pillow cannot decode.
DECODE_REASONS = (
    "empty_image",
    "vector_image",
    "image_too_large",
    "truncated_image",
    "unreadable_image",
    "unsupported_image_mode",
)


def _looks_like_svg(data: bytes) -> bool:
    head = data[:1024].lstrip().lower()
    return head.startswith((b"<?xml", b"<svg", b"<!doctype svg")) and b"<svg" in data[:4096].lower()


def decode_checked(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image | None, str | None]:
    """(image in its own mode, None) or (None, drop reason). Never raises on bad bytes: truncated files,
    decompression bombs, SVG, zero bytes and anything Pillow fails on become a reason from DECODE_REASONS.
    The mode is kept so that the transform converts after resizing, as OpenAI's preprocess does."""
    if not data:
        return None, "empty_image"
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; both are bombs here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                return None, "image_too_large"
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image_too_large"
    except UnidentifiedImageError:
        return None, "vector_image" if _looks_like_svg(data) else "unreadable_image"
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, struct.error, EOFError, ...
        return None, "truncated_image" if "truncated" in str(e).lower() else "unreadable_image"
    return image, None


def decode_image(data: bytes) -> Image.Image | None:
    """The decoded image in its own mode, or None when the bytes are not a usable image."""
    return decode_checked(data)[0]


def prepare_image(data: bytes, transform) -> tuple[torch.Tensor | None, str | None]:
    """(pixels, None) or (None, drop reason): decoding and the transform, neither of which may end a batch."""
    image, reason = decode_checked(data)
    if image is None:
        return None, reason
    try:
        return transform(image), None
    except (ValueError, OSError, TypeError):  # a mode or an image no conversion handles
        return None, "unsupported_image_mode"


class ImageEmbedder:
    """Batch {"id", "jpg", ...} -> {"id", ..., "features" [n, D] float32, "ok" bool, "reason" str (the drop
    reason of a row that is not ok, "" otherwise)}. Other columns pass through."""

    def __init__(self, model_source, image_size: int | None = None, device: str = "auto", transform=None):
        self.device = resolve_device(device)
        self.model = _as_model(model_source, self.device)
        if transform is None:
            from clip_model import image_transform

            size = image_size or self.model.config.image_resolution
            transform = image_transform(size)
        self.transform = transform

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = [prepare_image(bytes(b), self.transform) for b in batch["jpg"]]
        ok = np.array([pixels is not None for pixels, _ in prepared], dtype=bool)
        reasons = np.array([reason or "" for _, reason in prepared], dtype=object)
        if ok.any():
            pixels = torch.stack([p for p, _ in prepared if p is not None]).to(self.device)
            with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                feats = self.model.encode_image(pixels).float().cpu().numpy()
            features = np.zeros((len(prepared), feats.shape[1]), dtype=np.float32)
            features[ok] = feats
        else:
            features = np.zeros((len(prepared), _embed_dim(self.model)), dtype=np.float32)
        out = {k: np.asarray(v) for k, v in batch.items() if k != "jpg"}
        out.update(features=features, ok=ok, reason=reasons)
        return out


def _embed_dim(model) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        return int(config.embed_dim)
    return int(model.encode_text(torch.zeros(1, 77, dtype=torch.long)).shape[1])


class TextEmbedder:
    """Batch {"text", ...} -> {..., "features" [n, D] float32}."""

    def __init__(self, model_source, tokenizer, device: str = "auto"):
        self.device = resolve_device(device)
        self.model = _as_model(model_source, self.device)
        self.tokenizer = load_tokenizer(tokenizer, self.model) if isinstance(tokenizer, str) else tokenizer

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = self.tokenizer([str(t) for t in batch["text"]]).to(self.device)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            feats = self.model.encode_text(tokens).float().cpu().numpy()
        out = {k: np.asarray(v) for k, v in batch.items()}
        out["features"] = feats
        return out


@dataclass
class EmbedOptions:
    batch_size: int = 64
    device: str = "auto"
    use_ray: str = "auto"  # "auto" | "always" | "never"
    ray_min_records: int = 2000  # auto: folders / JSONL with at least this many images go through Ray
    ray_min_shards: int = 4  # auto: shard sets with at least this many shards go through Ray
    # Embedding actors (Ray path): (min, max) that grow with the cluster by default (pipelines/pools.py).
    pool: Pool = field(default_factory=Pool)
    cpus_per_actor: float = 1.0  # CPU actors; a GPU actor asks for no CPU (GPU node types advertise none)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs now, else 0 (CPU actors)
    cache_dir: str = ""  # "" = no cache


@dataclass
class EmbeddedSet:
    """Features of an EvalSet, rows sorted by id. Labelled sets have `labels`; caption sets have
    `text_features` with `text_image_index[t]` = row of the image caption t belongs to."""

    ids: list[str]
    image_features: torch.Tensor
    labels: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)
    text_features: torch.Tensor | None = None
    text_image_index: torch.Tensor | None = None
    n_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    used_ray: bool = False
    from_cache: bool = False


def needs_ray(eval_set: EvalSet, opts: EmbedOptions) -> bool:
    if opts.use_ray == "always":
        return True
    if opts.use_ray == "never":
        return False
    if eval_set.kind == "shards":
        return len(eval_set.units) >= opts.ray_min_shards
    return len(eval_set.units) >= opts.ray_min_records


def _record_rows(eval_set: EvalSet) -> Callable[[dict], list[dict]]:
    def rows(unit: dict) -> list[dict]:
        out = []
        for r in expand_unit(unit):
            row = {"id": r["id"], "jpg": r["jpg"]}
            if "label" in r:
                row["label"] = r["label"]
            else:
                row["captions_json"] = json.dumps(r["captions"])
            out.append(row)
        return out

    return rows


def _batches(rows: list[dict], size: int):
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        yield {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}


def actor_pool(opts: EmbedOptions) -> dict:
    """map_batches arguments of the embedding actors: resources per actor and a (min, max) pool sized from
    the cluster (growing with it when an autoscaler manages it)."""
    import ray

    gpus = opts.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    cpus = 0 if gpus else opts.cpus_per_actor
    low, high = pool_bounds(opts.pool, {"CPU": cpus, "GPU": gpus})
    compute = ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    return {"num_cpus": cpus, "num_gpus": gpus, "compute": compute}


def _run_images(eval_set: EvalSet, model_source, opts: EmbedOptions, image_size, use_ray: bool) -> list[dict]:
    to_rows = _record_rows(eval_set)
    if not use_ray:
        embedder = ImageEmbedder(model_source, image_size, opts.device)
        rows = [r for unit in eval_set.units for r in to_rows(unit)]
        out = []
        for batch in _batches(rows, opts.batch_size):
            result = embedder(batch)
            out.extend({k: result[k][i] for k in result} for i in range(len(result["id"])))
        return out
    import ray

    ds = ray.data.from_items(eval_set.units).flat_map(to_rows)
    ds = ds.map_batches(
        ImageEmbedder,
        fn_constructor_kwargs={"model_source": model_source, "image_size": image_size, "device": opts.device},
        batch_size=opts.batch_size,
        batch_format="numpy",
        **actor_pool(opts),
    )
    return list(ds.iter_rows())


def _run_texts(texts: list[str], model_source, tokenizer, opts: EmbedOptions, use_ray: bool) -> np.ndarray:
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    if not use_ray:
        embedder = TextEmbedder(model_source, tokenizer, opts.device)
        parts = [
            embedder({"text": np.array(texts[s : s + opts.batch_size], dtype=object)})["features"]
            for s in range(0, len(texts), opts.batch_size)
        ]
        return np.concatenate(parts)
    import ray

    ds = ray.data.from_items([{"i": i, "text": t} for i, t in enumerate(texts)]).map_batches(
        TextEmbedder,
        fn_constructor_kwargs={"model_source": model_source, "tokenizer": tokenizer, "device": opts.device},
        batch_size=opts.batch_size,
        batch_format="numpy",
        **actor_pool(opts),
    )
    rows = sorted(ds.iter_rows(), key=lambda r: int(r["i"]))
    return np.stack([np.asarray(r["features"], dtype=np.float32) for r in rows])


def model_fingerprint(model_source) -> str:
    if isinstance(model_source, str | os.PathLike):
        weights = find_weights(str(model_source))
        fs, path = storage.resolve(weights)
        info = fs.get_file_info(path)
        mtime = info.mtime_ns if info.mtime_ns is not None else ""
        return f"{weights if storage.is_s3(weights) else path}:{info.size}:{mtime}"
    h = hashlib.sha256()
    for name, t in sorted(model_source.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def set_fingerprint(eval_set: EvalSet) -> str:
    h = hashlib.sha256(
        json.dumps([eval_set.kind, eval_set.source, eval_set.class_names], sort_keys=True).encode()
    )
    for unit in eval_set.units:
        h.update(json.dumps(unit, sort_keys=True, default=str).encode())
        local = unit.get("path") or unit.get("uri")
        if local and Path(local).exists():
            st = Path(local).stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def embed_eval_set(
    eval_set: EvalSet,
    model_source,
    tokenizer=None,
    opts: EmbedOptions | None = None,
    image_size: int | None = None,
    cache_name: str = "features",
) -> EmbeddedSet:
    """Embed every image of the set (and, for caption sets, every caption of the readable images).

    `model_source` is a model object (in-process, or pickled to the Ray actors) or a checkpoint path that
    each actor loads itself; `tokenizer` is a Tokenizer or a merges path (caption sets only)."""
    opts = opts or EmbedOptions()
    cache_path = None
    if opts.cache_dir:
        tok_id = getattr(
            tokenizer, "merges_path", tokenizer if isinstance(tokenizer, str) else type(tokenizer).__name__
        )
        key = hashlib.sha256(
            f"{model_fingerprint(model_source)}|{set_fingerprint(eval_set)}|{image_size}|{tok_id}".encode()
        ).hexdigest()[:20]
        cache_path = Path(opts.cache_dir) / f"{cache_name}-{key}.pt"
        cached = load_cache(cache_path)
        if cached is not None:
            return cached

    use_ray = needs_ray(eval_set, opts)
    rows = sorted(_run_images(eval_set, model_source, opts, image_size, use_ray), key=lambda r: str(r["id"]))
    dropped = dict(eval_set.dropped)
    n_in = len(rows) + sum(eval_set.dropped.values())
    for r in rows:
        if not bool(r["ok"]):
            reason = str(r.get("reason") or "unreadable_image")
            dropped[reason] = dropped.get(reason, 0) + 1
    unlabelled = [r for r in rows if bool(r["ok"]) and "label" in r and int(r["label"]) < 0]
    if unlabelled:
        dropped["unknown_label"] = len(unlabelled)
    rows = [r for r in rows if bool(r["ok"]) and not ("label" in r and int(r["label"]) < 0)]
    if not rows:
        raise ValueError(f"{eval_set.source}: no readable image (dropped: {dropped})")
    result = EmbeddedSet(
        ids=[str(r["id"]) for r in rows],
        image_features=torch.from_numpy(
            np.stack([np.asarray(r["features"], dtype=np.float32) for r in rows])
        ),
        n_in=n_in,
        dropped=dropped,
        used_ray=use_ray,
    )
    if eval_set.is_captions:
        captions, index = [], []
        for i, r in enumerate(rows):
            for c in json.loads(str(r["captions_json"])):
                captions.append(c)
                index.append(i)
        result.captions = captions
        result.text_image_index = torch.tensor(index, dtype=torch.long)
        result.text_features = torch.from_numpy(_run_texts(captions, model_source, tokenizer, opts, use_ray))
    else:
        result.labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)

    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        torch.save(asdict(result), tmp)  # tensors and plain data: loads with weights_only
        os.replace(tmp, cache_path)
    return result


def load_cache(path: Path) -> EmbeddedSet | None:
    """A cached EmbeddedSet, loaded with weights_only=True: a file planted in the cache runs nothing. One
    that holds anything but tensors and plain data (or is damaged) is ignored and recomputed."""
    if not path.exists():
        return None
    try:
        fields = torch.load(path, map_location="cpu", weights_only=True)
        cached = EmbeddedSet(**fields)
    except Exception as e:
        log.warning("ignoring feature cache %s (recomputing): %s", path, refusal_reason(e))
        return None
    cached.from_cache = True
    return cached
