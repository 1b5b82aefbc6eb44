"""Where a training run is in its data: a deterministic read order, and a record of the place reached in
it that is the size of the shard list (never a per-sample record).

The read order of epoch `e` (all seeded by the run's `seed`):
- the shards in a seeded permutation; shard `order[j]` belongs to worker `j % world`;
- each worker keeps up to `width` of its shards open ("in flight") and draws each next row from one of
  them, chosen by a counter-based generator keyed by (seed, epoch, rank, draw number);
- inside a shard, rows come in a seeded permutation of the shard (so the offset reached in a shard is a
  prefix of that permutation, and a shuffle happens before any image is decoded).

A `Cursor` walks one worker's part of that order using nothing but shard sizes, so the place reached can
be replayed without reading data. The checkpoint's `Position` holds the finished shards (a bitset), each
in-flight shard's owner and offset, and each worker's draw count: O(shards + workers) bytes.

Restarts:
- same number of workers: every worker gets back its own shards, slots and draw count, so the rest of the
  epoch is row for row and batch for batch what the uninterrupted run would have read;
- another number of workers: the in-flight shards (with their offsets) are dealt round-robin to the new
  workers, the unstarted shards are dealt by epoch order; every row of the epoch not yet trained is still
  read exactly once (none skipped, none repeated) and no step is repeated, but the batches differ from an
  uninterrupted run's (and so does the loss trajectory from there on).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

_BLOCK = 1024  # draws per generated block of slot choices


def epoch_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard order (indices into the shard list)."""
    return np.random.default_rng([seed, epoch, 0]).permutation(num_shards)


def row_order(size: int, seed: int, epoch: int, shard: int) -> np.ndarray:
    """The order in which the rows of one shard are read in an epoch."""
    return np.random.default_rng([seed, epoch, 1, shard]).permutation(size)


def shards_digest(names: Sequence[str]) -> str:
    """Identifies the shard list a position refers to (a position is meaningless on another list)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


@dataclass
class Slot:
    shard: int
    offset: int = 0  # rows of the shard's permutation already read
    size: int | None = None  # known once the shard has been opened


@dataclass
class Cursor:
    """One worker's walk through its part of an epoch. `next(size_of)` returns (shard, position in the
    shard's row permutation) of the next row, or None at the end; `size_of(shard)` gives a shard's rows."""

    seed: int
    epoch: int
    rank: int
    queue: list[int]
    slots: list[Slot] = field(default_factory=list)
    width: int = 4
    draws: int = 0
    finished: list[int] = field(default_factory=list)  # shards this cursor finished
    _block: tuple[int, np.ndarray] | None = field(default=None, repr=False)

    def _uniform(self) -> float:
        block, index = divmod(self.draws, _BLOCK)
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, self.epoch, 2, self.rank, block])
            self._block = (block, rng.random(_BLOCK))
        return float(self._block[1][index])

    def _fill(self, size_of: Callable[[int], int]) -> None:
        """Open shards from the queue until `width` are in flight (empty shards finish at once)."""
        while True:
            for slot in self.slots:
                if slot.size is None:
                    slot.size = size_of(slot.shard)
            for slot in [s for s in self.slots if s.offset >= s.size]:
                self.finished.append(slot.shard)
                self.slots.remove(slot)
            if len(self.slots) >= self.width or not self.queue:
                return
            self.slots.append(Slot(self.queue.pop(0)))

    def next(self, size_of: Callable[[int], int]) -> tuple[int, int] | None:
        self._fill(size_of)
        if not self.slots:
            return None
        slot = self.slots[int(self._uniform() * len(self.slots))]
        row = slot.offset
        slot.offset += 1
        self.draws += 1
        if slot.offset >= slot.size:  # finished now, not at the next draw: the position says so at once
            self.finished.append(slot.shard)
            self.slots.remove(slot)
        return slot.shard, row

    def upcoming(self, n: int) -> list[int]:
        """The next shards this cursor will open (for read-ahead)."""
        return self.queue[:n]

    def state(self) -> dict:
        return {"slots": [(s.shard, s.offset) for s in self.slots], "draws": self.draws}


@dataclass
class Position:
    """The place reached in the data, as stored in a checkpoint.

    `finished` is a bitset over the shard list in the epoch's shard order, zlib-compressed (shards finish
    roughly in that order, so it is mostly a run of ones: tens of bytes for thousands of shards);
    `in_flight` lists (owner rank, shard, offset) in slot order; `draws` is each worker's draw count.
    `trained`/`bad` count the epoch's rows so far; `bad_shards` names the damaged shards met so far."""

    epoch: int = 0
    seed: int = 0
    num_shards: int = 0
    digest: str = ""
    world: int = 0
    finished: bytes = b""
    in_flight: list[tuple[int, int, int]] = field(default_factory=list)
    draws: list[int] = field(default_factory=list)
    trained: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    bad_shards: dict[str, list] = field(default_factory=dict)  # name -> [reason, rows read]

    @classmethod
    def start(cls, epoch: int, names: Sequence[str], world: int, seed: int) -> Position:
        position = cls(epoch, seed, len(names), shards_digest(names), world, b"", [], [0] * world)
        position.finished = position._encode(np.zeros(len(names), bool))
        return position

    def _encode(self, mask: np.ndarray) -> bytes:
        order = epoch_order(self.num_shards, self.seed, self.epoch)
        return zlib.compress(np.packbits(mask[order]).tobytes(), 9)

    def finished_mask(self) -> np.ndarray:
        """Finished shards as a boolean mask over the shard list (index order)."""
        bits = np.unpackbits(np.frombuffer(zlib.decompress(self.finished), np.uint8), count=self.num_shards)
        mask = np.zeros(self.num_shards, bool)
        mask[epoch_order(self.num_shards, self.seed, self.epoch)] = bits.astype(bool)
        return mask

    def check(self, names: Sequence[str]) -> None:
        if (self.num_shards, self.digest) != (len(names), shards_digest(names)):
            raise ValueError(
                f"the checkpoint's data position refers to another shard list ({self.num_shards} shards, "
                f"digest {self.digest}) than this run's ({len(names)} shards, digest {shards_digest(names)}): "
                "resume on the same data, or start a new run"
            )

    def cursor(self, rank: int, world: int, width: int) -> Cursor:
        """Worker `rank`'s cursor for the rest of this epoch (see the module docstring for restarts)."""
        seed, order = self.seed, epoch_order(self.num_shards, self.seed, self.epoch)
        finished = self.finished_mask()
        flying = {shard for _, shard, _ in self.in_flight}
        if world == self.world:
            slots = [Slot(s, off) for r, s, off in self.in_flight if r == rank]
            queue = [int(s) for s in order[rank::world] if not finished[s] and s not in flying]
            return Cursor(seed, self.epoch, rank, queue, slots, width, self.draws[rank])
        rank_in_order = {int(s): j for j, s in enumerate(order)}
        dealt = sorted(self.in_flight, key=lambda t: rank_in_order[t[1]])[rank::world]
        rest = [int(s) for s in order if not finished[s] and s not in flying]
        return Cursor(seed, self.epoch, rank, rest[rank::world], [Slot(s, off) for _, s, off in dealt], width)

    def merge(self, parts: Sequence[dict], world: int) -> Position:
        """This (the epoch segment's starting) position advanced by every worker's part: {rank, finished,
        slots, draws, trained, bad}, each counted since the segment started."""
        finished = self.finished_mask().copy()
        bad = dict(self.bad)
        for p in parts:
            finished[list(p["finished"])] = True
            for reason, n in p["bad"].items():
                bad[reason] = bad.get(reason, 0) + n
        in_flight = [
            (p["rank"], s, off) for p in sorted(parts, key=lambda p: p["rank"]) for s, off in p["slots"]
        ]
        draws = [p["draws"] for p in sorted(parts, key=lambda p: p["rank"])]
        trained = self.trained + sum(p["trained"] for p in parts)
        bad_shards = {**self.bad_shards, **{k: v for p in parts for k, v in p.get("bad_shards", {}).items()}}
        return Position(self.epoch, self.seed, self.num_shards, self.digest, world, self._encode(finished),
                        in_flight, draws, trained, bad, bad_shards)  # fmt: skip

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
