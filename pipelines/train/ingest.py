"""Training ingest, per training worker: its shards -> compressed rows in the seeded read order ->
decoded uint8 crops + tokens -> batches of exactly `batch_size` good rows, normalised on the device.

Why not a Ray Data `streaming_split`: its blocks reach workers in an order no checkpoint can name, so a
resume had to record every sample key and re-read (and re-decode) the whole epoch to skip them. Here each
worker reads its own shards (pipelines/train/position.py: seeded shard order, rows shuffled inside each
shard and across the shards in flight — a shuffle of compressed rows, before decoding), and the place
reached is a few integers per shard in flight. On resume, finished shards are never opened and rows before
a shard's offset are never decoded.

Decoding (JPEG -> seeded random square crop -> uint8 HWC, captions -> token ids) runs where
`decode_on` says:
- "tasks": Ray tasks asking for `decode_resource` (default "CPU": CPU nodes; "ingest_cpu": the GPU nodes'
  own cores, a custom resource only GPU node types advertise and CPU-only work never asks for; those tasks
  prefer the worker's own node).
- "worker": threads of the training worker itself (JPEG bytes are all that travels).
Either way uint8 images (150 kB per 224 px sample, a quarter of float32) reach the trainer.

How much is decoded ahead is measured in seconds, not batches: enough decode work stays in flight to cover
`decode_ahead_s` seconds at the trainer's measured pace (`ReadAhead`, at least `decode_ahead` batches, at most
`decode_ahead_max_mb`), so a slow batch (a busy node, a cold read, a huge JPEG) is hidden behind the rest.
Batches may finish in any order inside that window (`DecodeWindow`); the trainer always takes the oldest,
so batches and the checkpointed position are the same whatever the completion order. A batch still running
well past the usual batch time gets a second copy; the first result wins.

Bad rows (undecodable image, missing caption) are not trained on: they are counted by reason as the
batcher passes them, so trained + bad + rows not reached = rows of the epoch.
"""

from __future__ import annotations

import hashlib
import io
import random
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from clip_model import Tokenizer
from clip_model.transform import OPENAI_MEAN, OPENAI_STD, to_rgb
from pipelines import storage
from pipelines.selection import read_shard
from pipelines.train.position import Cursor, row_order

OK, CORRUPT_IMAGE, MISSING_CAPTION = 0, 1, 2
DROP_REASONS = {CORRUPT_IMAGE: "corrupt_image", MISSING_CAPTION: "missing_caption"}
_BICUBIC = Image.Resampling.BICUBIC


def crop_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The augmentation's generator for one sample in one epoch: a resumed run draws the same crops."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def random_square_crop(image: Image.Image, size: int, rng: random.Random, scale=(0.9, 1.0)) -> np.ndarray:
    """The paper's augmentation: a square of side sqrt(U(scale)) x the short side at a uniform position,
    resized bicubically to `size`; returned as uint8 [size, size, 3]."""
    image = to_rgb(image)
    width, height = image.size
    side = max(1, round(min(width, height) * rng.uniform(*scale) ** 0.5))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    out = image.resize((size, size), _BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(out, dtype=np.uint8)


class DecodeBatch:
    """Decode stage: compressed rows -> {image uint8 [n,S,S,3], tokens int32 [n,L], status int8 [n]}.
    A plain callable (tests call it directly; Ray tasks and worker threads run it)."""

    def __init__(self, image_size: int, merges_path: str, context_length: int = 77, seed: int = 0):
        self.image_size, self.context_length, self.seed = image_size, context_length, seed
        self.tokenizer = Tokenizer(storage.local_file(merges_path), context_length=context_length)

    def __call__(self, rows: dict[str, list], epoch: int) -> dict[str, np.ndarray]:
        n, s = len(rows["key"]), self.image_size
        images = np.zeros((n, s, s, 3), dtype=np.uint8)
        status = np.zeros(n, dtype=np.int8)
        for i, (key, jpg, txt) in enumerate(zip(rows["key"], rows["jpg"], rows["txt"])):
            if txt is None or not txt.strip():
                status[i] = MISSING_CAPTION
                continue
            try:
                with Image.open(io.BytesIO(jpg)) as im:
                    im.load()
                    images[i] = random_square_crop(im, s, crop_rng(self.seed, epoch, key))
            except Exception:  # truncated/garbage bytes, unsupported mode, None: all the same to us
                status[i] = CORRUPT_IMAGE
        tokens = np.zeros((n, self.context_length), dtype=np.int32)
        good = [t for t, st in zip(rows["txt"], status) if st == OK]
        if good:
            tokens[status == OK] = self.tokenizer(good).numpy()
        return {"image": images, "tokens": tokens, "status": status}


@lru_cache(maxsize=4)
def _cached_stage(image_size: int, merges_path: str, context_length: int, seed: int) -> DecodeBatch:
    return DecodeBatch(image_size, merges_path, context_length, seed)


def decode_batch(rows: dict[str, list], epoch: int, stage_args: tuple) -> dict[str, np.ndarray]:
    """`DecodeBatch` as a Ray task: the tokenizer is built once per worker process and reused."""
    return _cached_stage(*stage_args)(rows, epoch)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [n,S,S,3] (on the device) -> float32 [n,3,S,S] scaled to [0,1] and normalised with CLIP's
    mean/std: the 4x larger float tensor only ever exists on the device."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ShardLoader:
    """Compressed rows of this worker's shards, read in background threads ahead of use, served in each
    shard's seeded row order. Keeps the sizes of every shard it opened (for the committed cursor) and the
    damage of each bad one (`damaged`: shard -> (reason, rows read); a bad shard serves what could be read).
    With a `selection` folder (pipelines/selection.py) a shard is its selected rows only: its size is their
    number and positions map to them, so no other row ever reaches the decoder."""

    def __init__(self, uris: Sequence[str], seed: int, epoch: int, threads: int = 2, selection: str = ""):
        self.uris, self.seed, self.epoch, self.selection = uris, seed, epoch, selection
        self.sizes: dict[int, int] = {}
        self.damaged: dict[int, tuple[str, int]] = {}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-read")
        self._pending: dict[int, object] = {}
        self._open: dict[int, tuple[dict[str, list], np.ndarray]] = {}

    def prefetch(self, shards: Sequence[int]) -> None:
        for s in shards:
            if s not in self._pending and s not in self._open:
                self._pending[s] = self._pool.submit(read_shard, self.uris[s], self.selection)

    def size(self, shard: int) -> int:
        if shard not in self._open:
            self.prefetch([shard])
            rows, damage = self._pending.pop(shard).result()
            if damage:
                self.damaged[shard] = (damage, len(rows["key"]))
            self._open[shard] = (rows, row_order(len(rows["key"]), self.seed, self.epoch, shard))
            self.sizes[shard] = len(rows["key"])
        return self.sizes[shard]

    def row(self, shard: int, pos: int) -> tuple[str, bytes | None, str | None]:
        rows, order = self._open[shard]
        i = order[pos]
        if pos == len(order) - 1:  # the shard's last row: its bytes are no longer needed
            del self._open[shard]
        return rows["key"][i], rows["jpg"][i], rows["txt"][i]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class DecodeSettings:
    image_size: int
    merges_path: str
    context_length: int = 77
    seed: int = 0
    decode_on: str = "tasks"  # "tasks" | "worker"
    decode_resource: str = "CPU"
    decode_cpus: float = 0.5
    decode_ahead: int = 4  # at least this many decode batches in flight (0 seconds below: exactly this many)
    decode_batch_size: int = 64
    decode_ahead_s: float = 2.0  # rows decoded or in flight: this many seconds at the trainer's rate...
    decode_ahead_max_mb: float = 512.0  # ...bounded by this much decoded uint8 data
    straggler_factor: float = 3.0  # a decode batch running k x the median batch time gets a copy (0: never)
    straggler_min_s: float = 1.0  # ...but never before this many seconds

    def args(self) -> tuple:
        return (self.image_size, self.merges_path, self.context_length, self.seed)

    def row_bytes(self) -> int:
        """Decoded bytes of one row: uint8 image, int32 tokens, int8 status."""
        return self.image_size * self.image_size * 3 + 4 * self.context_length + 1


def task_options(settings: DecodeSettings, node_id: str) -> dict:
    """Ray options of a decode task. "CPU": any node's CPUs. Any other resource (e.g. `ingest_cpu`, the GPU
    nodes' own cores): no plain CPU asked, and a soft preference for the training worker's node `node_id`
    (its batches then never cross the network; another node with the resource takes over if needed)."""
    options: dict = {"max_retries": 3}
    if settings.decode_resource == "CPU":
        options["num_cpus"] = settings.decode_cpus
        return options
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options.update(num_cpus=0, resources={settings.decode_resource: settings.decode_cpus})
    options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
    return options


class Decoder:
    """Submits decode batches (Ray tasks or local threads); `wait` says which have finished, in any order.

    `decode` is the function that runs (`decode_batch`); a test or benchmark may pass a wrapper of it (e.g.
    one that delays chosen batches, pipelines/train/stragglers.py) without the product knowing of it."""

    def __init__(self, settings: DecodeSettings, decode: Callable = decode_batch):
        self.settings, self._decode = settings, decode
        if settings.decode_on == "tasks":
            import ray

            options = task_options(settings, ray.get_runtime_context().get_node_id())
            self._ray = ray
            self._task = ray.remote(decode).options(**options)
        elif settings.decode_on == "worker":
            self._pool = ThreadPoolExecutor(max(1, settings.decode_ahead), thread_name_prefix="decode")
        else:
            raise ValueError(f"decode_on must be 'tasks' or 'worker', not {settings.decode_on!r}")

    def submit(self, rows: dict[str, list], epoch: int):
        if self.settings.decode_on == "tasks":
            return self._task.remote(rows, epoch, self.settings.args())
        return self._pool.submit(self._decode, rows, epoch, self.settings.args())

    def wait(self, handles: list, timeout: float | None) -> list:
        """The handles that have finished: blocks until at least one has or `timeout` seconds pass."""
        if not handles:
            return []
        if self.settings.decode_on == "worker":
            return list(futures.wait(handles, timeout, futures.FIRST_COMPLETED).done)
        ready, rest = self._ray.wait(handles, num_returns=1, timeout=timeout)
        if ready and rest:  # and every other one already done, without waiting
            ready += self._ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return ready

    def result(self, handle) -> dict[str, np.ndarray]:
        return self._ray.get(handle) if self.settings.decode_on == "tasks" else handle.result()

    def cancel(self, handle) -> None:
        """Drop a copy whose result is no longer wanted (a finished task is left alone)."""
        if self.settings.decode_on == "tasks":
            self._ray.cancel(handle)
        else:
            handle.cancel()


@dataclass
class _Batch:
    """One decode batch in the window: its rows until a result arrives (a straggler's copy needs them)."""

    rows: dict[str, list] | None
    epoch: int
    size: int
    submitted: dict  # handle -> submit time (the first copy, then maybe one more)
    result: dict[str, np.ndarray] | None = None


class DecodeWindow:
    """Decode batches in flight, in submission order. Results may complete in any order inside the window;
    `take()` returns the oldest batch's, so what the trainer sees does not depend on completion order.

    A batch still running `straggler_factor` x the median batch time (at least `straggler_min_s`) after it
    was submitted gets a second copy; the first result wins and the other copy is cancelled. Rows are
    counted once per batch, never per copy."""

    def __init__(self, decoder: Decoder, clock: Callable[[], float] = time.monotonic):
        self.decoder, self.clock = decoder, clock
        self.rows, self.duplicated = 0, 0  # rows in the window; copies made
        self._batches: deque[_Batch] = deque()
        self._owner: dict = {}  # handle -> its batch, for every copy still running
        self._times: deque[float] = deque(maxlen=64)  # recent batch times (submit -> result seen)

    def __len__(self) -> int:
        return len(self._batches)

    def submit(self, rows: dict[str, list], epoch: int) -> None:
        batch = _Batch(rows, epoch, len(rows["key"]), {})
        self._batches.append(batch)
        self.rows += batch.size
        self._start_copy(batch)

    def take(self) -> dict[str, np.ndarray]:
        """The oldest batch's result, waiting for it (and copying stragglers meanwhile) if need be."""
        head = self._batches[0]
        self._collect(0)
        while head.result is None:
            self._copy_stragglers()
            self._collect(self._until_next_deadline())
        self._batches.popleft()
        self.rows -= head.size
        return head.result

    def close(self) -> None:
        for handle in self._owner:
            self.decoder.cancel(handle)
        self._owner.clear()

    def _start_copy(self, batch: _Batch) -> None:
        handle = self.decoder.submit(batch.rows, batch.epoch)
        batch.submitted[handle] = self.clock()
        self._owner[handle] = batch

    def _collect(self, timeout: float | None) -> None:
        for handle in self.decoder.wait(list(self._owner), timeout):
            batch = self._owner.pop(handle, None)
            if batch is None or batch.result is not None:
                continue
            batch.result = self.decoder.result(handle)
            self._times.append(self.clock() - batch.submitted[handle])
            for other in batch.submitted:
                if self._owner.pop(other, None) is not None:  # the slower copy: no longer wanted
                    self.decoder.cancel(other)
            batch.rows = None

    def _deadline(self) -> float | None:
        """Seconds after submission at which a batch counts as a straggler (None: no copies)."""
        settings = self.decoder.settings
        if settings.straggler_factor <= 0 or len(self._times) < 3:
            return None
        return max(settings.straggler_min_s, settings.straggler_factor * statistics.median(self._times))

    def _candidates(self) -> list[_Batch]:
        """Batches still waiting on their only copy."""
        return [b for b in self._batches if b.result is None and len(b.submitted) == 1]

    def _copy_stragglers(self) -> None:
        deadline, now = self._deadline(), self.clock()
        if deadline is None:
            return
        for batch in self._candidates():
            if now - next(iter(batch.submitted.values())) >= deadline:
                self.duplicated += 1
                self._start_copy(batch)

    def _until_next_deadline(self) -> float | None:
        deadline, now = self._deadline(), self.clock()
        starts = [next(iter(b.submitted.values())) for b in self._candidates()]
        if deadline is None or not starts:
            return None  # nothing will be copied: wait for a result
        return max(0.01, min(starts) + deadline - now)


class ReadAhead:
    """How many rows to keep decoded or in flight: `decode_ahead_s` seconds at the rate the trainer takes
    rows while it is not waiting for them (its own pace, not the decoder's), at least `decode_ahead`
    batches, at most `decode_ahead_max_mb` of decoded data. With 0 seconds: exactly `decode_ahead` batches
    (the fixed window ingest had before)."""

    def __init__(self, settings: DecodeSettings, clock: Callable[[], float] = time.monotonic):
        self.settings, self.clock = settings, clock
        self.min_rows = settings.decode_ahead * settings.decode_batch_size
        self.max_rows = max(self.min_rows, int(settings.decode_ahead_max_mb * 2**20) // settings.row_bytes())
        self._recent: deque[tuple[int, float]] = deque(maxlen=32)  # (rows taken, trainer's own seconds)
        self._last: float | None = None

    def taken(self, rows: int, waited: float) -> None:
        """The trainer took `rows` after waiting `waited` seconds for them."""
        now = self.clock()
        if self._last is not None:
            self._recent.append((rows, max(0.0, now - self._last - waited)))
        self._last = now

    def target_rows(self) -> int:
        if self.settings.decode_ahead_s <= 0 or not self._recent:
            return self.min_rows
        rows, busy = (sum(x) for x in zip(*self._recent))
        if busy <= 1e-6:
            return self.max_rows
        return int(min(self.max_rows, max(self.min_rows, rows / busy * self.settings.decode_ahead_s)))


class WorkerStream:
    """One worker's batches of one epoch (or of the rest of it, after a resume).

    `ahead` walks the read order to feed the decoder; `committed` walks the same order only as far as the
    rows handed to the trainer (good ones trained, bad ones counted), so `committed.state()` is the
    position to checkpoint. Rows decoded but not yet handed out are simply read again after a restart."""

    def __init__(self, cursor: Cursor, loader: ShardLoader, decoder: Decoder, batch_size: int):
        self.ahead = cursor
        self.committed = Cursor(cursor.seed, cursor.epoch, cursor.rank, list(cursor.queue),
                                [type(s)(s.shard, s.offset, s.size) for s in cursor.slots], cursor.width,
                                cursor.draws)  # fmt: skip
        self.loader, self.decoder, self.batch_size = loader, decoder, batch_size
        self.trained, self.decoded = 0, 0
        self.bad: Counter[str] = Counter()
        self._window = DecodeWindow(decoder)
        self._read_ahead = ReadAhead(decoder.settings)
        self._fifo: deque[list] = deque()  # [decoded chunk, first row not yet handed out]
        self._ended = False
        self._uncommitted: tuple[int, Counter] = (0, Counter())

    def _submit(self) -> bool:
        rows: dict[str, list] = {"key": [], "jpg": [], "txt": []}
        while len(rows["key"]) < self.decoder.settings.decode_batch_size:
            self.loader.prefetch(self.ahead.upcoming(2))
            nxt = self.ahead.next(self.loader.size)
            if nxt is None:
                break
            for column, value in zip(("key", "jpg", "txt"), self.loader.row(*nxt)):
                rows[column].append(value)
        if not rows["key"]:
            return False
        self.decoded += len(rows["key"])  # once per batch, however many copies a straggler gets
        self._window.submit(rows, self.ahead.epoch)
        return True

    def _fill(self) -> None:
        """Submit decode batches until the window holds what `ReadAhead` asks for (or the epoch ends)."""
        min_batches, target = self.decoder.settings.decode_ahead, self._read_ahead.target_rows()
        while not self._ended and (len(self._window) < min_batches or self._window.rows < target):
            self._ended = not self._submit()

    def _next_chunk(self) -> dict | None:
        self._fill()
        if not len(self._window):
            return None
        t0 = time.monotonic()
        chunk = self._window.take()  # always the oldest batch: the read order is untouched
        self._read_ahead.taken(len(chunk["status"]), time.monotonic() - t0)
        self._fill()  # keep the decoder busy while this chunk is trained on
        return chunk

    def next_batch(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The next `batch_size` good rows (uint8 images, int32 tokens), or None when the epoch's rows of
        this worker cannot fill one more batch (those rows are left unread by the position). Call
        `commit()` once the batch is trained on."""
        images, tokens, passed, bad, need = [], [], 0, Counter(), self.batch_size
        fifo = list(self._fifo)
        while need:
            if not fifo:
                chunk = self._next_chunk()
                if chunk is None:
                    self._fifo = deque(fifo)
                    return None
                fifo.append([chunk, 0])
            chunk, start = fifo[0]
            status = chunk["status"]
            good = np.flatnonzero(status[start:] == OK)
            end = start + int(good[need - 1]) + 1 if len(good) >= need else len(status)
            ok = status[start:end] == OK
            images.append(chunk["image"][start:end][ok])
            tokens.append(chunk["tokens"][start:end][ok])
            for code, reason in DROP_REASONS.items():
                bad[reason] += int((status[start:end] == code).sum())
            need -= int(ok.sum())
            passed += end - start
            if end == len(status):
                fifo.pop(0)
            else:
                fifo[0][1] = end
        self._fifo = deque(fifo)
        self._uncommitted = (passed, bad)
        return np.concatenate(images), np.concatenate(tokens)

    def commit(self) -> None:
        """The last batch is being trained on (every rank had one): advance the committed position over
        its rows and the bad rows before them. A batch never committed (another rank ran out) is not."""
        passed, bad = self._uncommitted
        self._uncommitted = (0, Counter())
        for _ in range(passed):
            self.committed.next(self.loader.sizes.__getitem__)
        self.trained += self.batch_size
        self.bad.update({k: v for k, v in bad.items() if v})

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while (batch := self.next_batch()) is not None:
            self.commit()
            yield batch

    def part(self) -> dict:
        """This worker's contribution to the checkpoint's position (counted since the stream started)."""
        return {
            "rank": self.committed.rank,
            "finished": list(self.committed.finished),
            **self.committed.state(),
            "trained": self.trained,
            "bad": dict(self.bad),
        }

    @property
    def duplicated(self) -> int:
        """Straggling decode batches that were given a second copy."""
        return self._window.duplicated

    def close(self) -> None:
        self._window.close()
        self.loader.close()
