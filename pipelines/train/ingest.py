"""Training ingest: shards -> Ray Data -> decoded, augmented, tokenized tensors on each training worker.

Driver side (`build_dataset`): read WebDataset tars or Parquet shards (local or s3://) in a file order that
changes every epoch (seeded), then `PrepareBatch` decodes the JPEGs, applies the training transform and
tokenizes on CPU workers, so the batches that reach the trainer hold only numbers. Bad rows are not
dropped here: they travel as a `status` code so that the training worker counts them together with the
rows it trains on; that single ledger is what makes the data position in a checkpoint exact.

Worker side (`EpochStream`): iterates its split with a seeded local shuffle buffer, counts bad rows by
reason, skips the rows a resumed epoch has already trained on, and re-batches to exactly `batch_size` rows.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from clip_model import Tokenizer, image_transform
from pipelines import storage

OK, CORRUPT_IMAGE, MISSING_CAPTION = 0, 1, 2
DROP_REASONS = {CORRUPT_IMAGE: "corrupt_image", MISSING_CAPTION: "missing_caption"}


def key_hash(key: str) -> int:
    """Stable 63-bit id of a sample key (numbers only reach the trainer)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _text(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    return text if text.strip() else None


class PrepareBatch:
    """Ray Data stage: {key, jpg, txt} -> {image float32 [n,3,S,S], tokens int64 [n,L], key_hash, status}.

    A row whose JPEG does not decode or whose caption is missing/empty gets status CORRUPT_IMAGE /
    MISSING_CAPTION and zero tensors; it is counted (not trained on) by the worker that receives it."""

    def __init__(self, image_size: int, merges_path: str, context_length: int = 77, seed: int | None = None):
        self.image_size = image_size
        self.transform = image_transform(image_size, train=True, seed=seed)
        self.tokenizer = Tokenizer(storage.local_file(merges_path), context_length=context_length)
        self.context_length = context_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in batch["key"]]
        n, s = len(keys), self.image_size
        images = np.zeros((n, 3, s, s), dtype=np.float32)
        status = np.zeros(n, dtype=np.int8)
        captions = [_text(t) for t in batch["txt"]] if "txt" in batch else [None] * n
        jpgs = batch["jpg"] if "jpg" in batch else [None] * n
        for i, (jpg, caption) in enumerate(zip(jpgs, captions)):
            if caption is None:
                status[i] = MISSING_CAPTION
                continue
            try:
                with Image.open(io.BytesIO(jpg)) as im:
                    im.load()
                    images[i] = self.transform(im).numpy()
            except Exception:  # truncated/garbage bytes, unsupported mode, None: all the same to us
                status[i] = CORRUPT_IMAGE
        good = [c for c, st in zip(captions, status) if st == OK]
        tokens = np.zeros((n, self.context_length), dtype=np.int64)
        if good:
            tokens[status == OK] = self.tokenizer(good).numpy()
        return {
            "image": images,
            "tokens": tokens,
            "key_hash": np.array([key_hash(k) for k in keys], dtype=np.int64),
            "status": status,
        }


@lru_cache(maxsize=4)
def _cached_stage(image_size: int, merges_path: str, context_length: int) -> PrepareBatch:
    return PrepareBatch(image_size, merges_path, context_length)


def prepare_batch(
    batch: dict[str, np.ndarray], image_size: int, merges_path: str, context_length: int = 77
) -> dict[str, np.ndarray]:
    """`PrepareBatch` as a Ray Data task: the tokenizer and transform are built once per worker process.
    Tasks, unlike an actor pool, reuse Ray's warm worker processes when the next epoch re-executes the
    dataset (measured on the demo shards: first batch of an epoch after 1 s instead of 6-10 s)."""
    return _cached_stage(image_size, merges_path, context_length)(batch)


def read_shards(data_uri: str, data_format: str, seed: int, num_cpus: float = 1.0):
    """A Ray Dataset with columns key, jpg, txt; the file order is reshuffled on every execution (epoch)."""
    import ray.data
    from ray.data import FileShuffleConfig

    from pipelines import storage

    filesystem, path = storage.resolve(data_uri)
    shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True)
    if data_format == "webdataset":
        ds = ray.data.read_webdataset(
            path,
            filesystem=filesystem,
            file_extensions=["tar"],
            decoder=None,
            shuffle=shuffle,
            num_cpus=num_cpus,
        )

        def select(batch):
            n = len(batch["__key__"])
            return {
                "key": batch["__key__"],
                "jpg": batch.get("jpg", [None] * n),
                "txt": batch.get("txt", [None] * n),
            }

        return ds.map_batches(select, batch_format="numpy", num_cpus=num_cpus)  # fuses with the read
    if data_format == "parquet":
        return ray.data.read_parquet(
            path, filesystem=filesystem, columns=["key", "jpg", "txt"], shuffle=shuffle, num_cpus=num_cpus
        )
    raise ValueError(f"unknown data_format {data_format!r}: use 'webdataset' or 'parquet'")


def build_dataset(cfg, image_size: int, context_length: int = 77):
    """The training dataset of a TrainConfig: shards -> prepare_batch (numbers only)."""
    return read_shards(cfg.data_uri, cfg.data_format, cfg.seed, cfg.read_cpus).map_batches(
        prepare_batch,
        fn_kwargs={
            "image_size": image_size,
            "merges_path": cfg.tokenizer_merges,
            "context_length": context_length,
        },
        batch_size=cfg.decode_batch_size,
        batch_format="numpy",
        concurrency=cfg.decode_workers,
        num_cpus=cfg.decode_cpus,
    )


class EpochStream:
    """One worker's batches of one epoch: exactly `batch_size` good, not-yet-trained rows each.

    Counts rows dropped as bad (`bad`, by reason, with their key hashes in `bad_hashes` so that a resumed
    epoch neither re-counts nor re-trains them), and rows skipped because the resumed epoch had already
    consumed them. Rows still in the re-batching buffer when the epoch ends are `leftover`."""

    def __init__(
        self,
        data_iter,
        batch_size: int,
        skip_hashes: np.ndarray,
        shuffle_buffer: int,
        shuffle_seed: int,
        prefetch_batches: int = 2,
        device: torch.device | str = "cpu",
    ):
        self.batch_size = batch_size
        self.skip = set(skip_hashes.tolist())
        self.bad: Counter[str] = Counter()
        self.bad_hashes: list[int] = []
        self.skipped = 0
        self.leftover = 0
        self._batches = iter(
            data_iter.iter_torch_batches(
                batch_size=batch_size,
                prefetch_batches=prefetch_batches,
                local_shuffle_buffer_size=shuffle_buffer or None,
                local_shuffle_seed=shuffle_seed if shuffle_buffer else None,
                dtypes={
                    "image": torch.float32,
                    "tokens": torch.long,
                    "key_hash": torch.long,
                    "status": torch.int8,
                },
                device=device,
            )
        )
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffered = 0
        self._generator = self._generate()

    def _take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, tokens, hashes = (torch.cat(parts) for parts in zip(*self._buffer))
        b = self.batch_size
        rest = (images[b:], tokens[b:], hashes[b:])
        self._buffer = [rest] if len(rest[0]) else []
        self._buffered = len(rest[0])
        return images[:b], tokens[:b], hashes[:b]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self._generator

    def _generate(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in self._batches:
            hashes, status = batch["key_hash"].cpu(), batch["status"].cpu()
            fresh = torch.tensor([h not in self.skip for h in hashes.tolist()], dtype=torch.bool)
            self.skipped += int((~fresh).sum())
            for code, reason in DROP_REASONS.items():
                hit = fresh & (status == code)
                if hit.any():
                    self.bad[reason] += int(hit.sum())
                    self.bad_hashes.extend(hashes[hit].tolist())
            keep = fresh & (status == OK)
            if keep.any():
                keep = keep.to(batch["image"].device)
                self._buffer.append((batch["image"][keep], batch["tokens"][keep], batch["key_hash"][keep]))
                self._buffered += int(keep.sum())
            while self._buffered >= self.batch_size:
                yield self._take()

    def drain(self, unused: int = 0) -> None:
        """Read what remains of the epoch (counting bad rows) so the epoch is fully accounted for;
        `unused` rows were taken from the stream but not trained on."""
        for _ in self._generator:
            self.leftover += self.batch_size
        self.leftover += self._buffered + unused
        self._buffer, self._buffered = [], 0
