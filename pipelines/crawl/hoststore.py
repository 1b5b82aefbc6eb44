"""The robots.txt answers of a crawl, kept for the whole crawl and persisted beside its output.

A budget actor (hosts.py) owns the sites with `shard_of(site, shards) == index`. Its `RobotsStore` keeps
each answer it saw as a compact record (status, body, error, when) in a plain dict, never evicted, and
appends new ones as Parquet files under `{output}/_hosts/` as the crawl goes (every `FLUSH_ROWS` answers or
`FLUSH_S` seconds). A new actor (a restart, the retry pass of a later run, a resumed build) reads back the
answers of its sites, so robots.txt is fetched once per site for the whole crawl, however many sites there
are and whenever a site's URLs come. Parsed policies (Protego objects, larger than the raw answer) are kept
only for the `max_parsed` most recently used sites.

File names say the layout that wrote them (`robots-{shards}-{index}-{seq}-{nonce}.parquet`): an actor reads
its own files whole and, when the budget was sized differently before, the other files filtered by site.
Records hold only data (strings, bytes, numbers): reading them runs no code.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.crawl.robots import RobotsPolicy, policy_from_response

FLUSH_ROWS = 10_000
FLUSH_S = 2.0
SCHEMA = pa.schema(
    [("site", pa.string()), ("crc", pa.uint32()), ("status", pa.int32()), ("body", pa.binary()),
     ("error", pa.string()), ("fetched_at", pa.float64())]
)  # fmt: skip


def site_crc(site: str) -> int:
    return zlib.crc32(site.encode())


@dataclass
class RobotsStore:
    """The robots.txt answers of one budget shard (module doc). `uri` empty: in memory only."""

    uri: str
    shards: int
    index: int
    max_parsed: int = 100_000
    answers: dict[str, tuple[int | None, bytes, str | None, float]] = field(default_factory=dict)
    parsed: OrderedDict[str, RobotsPolicy] = field(default_factory=OrderedDict)
    pending: list[tuple[str, int | None, bytes, str | None, float]] = field(default_factory=list)
    first_pending: float = 0.0
    files_written: int = 0
    nonce: str = field(default_factory=lambda: f"{os.getpid()}{time.time_ns() % 10**9}")

    def get(self, site: str) -> tuple[RobotsPolicy, float] | None:
        """(policy, fetched_at wall time) of the site's last answer; None when it was never asked."""
        answer = self.answers.get(site)
        if answer is None:
            return None
        policy = self.parsed.get(site)
        if policy is None:
            policy = self.parsed[site] = policy_from_response(answer[0], answer[1], answer[2])
            if len(self.parsed) > self.max_parsed:
                self.parsed.popitem(last=False)
        else:
            self.parsed.move_to_end(site)
        return policy, answer[3]

    def put(self, site: str, status: int | None, body: bytes | None, error: str | None) -> RobotsPolicy:
        now = time.time()
        body = body or b""
        self.answers[site] = (status, body, error, now)
        self.parsed.pop(site, None)
        if self.uri:
            if not self.pending:
                self.first_pending = now
            self.pending.append((site, status, body, error, now))
        return self.get(site)[0]  # type: ignore[index]

    def due(self) -> bool:
        """Whether the pending answers should be written now."""
        return bool(self.pending) and (
            len(self.pending) >= FLUSH_ROWS or time.time() - self.first_pending >= FLUSH_S
        )

    def take_pending(self) -> tuple[str, pa.Table] | None:
        """(file uri, table) of the pending answers, which are then no longer pending; None if none."""
        if not self.pending:
            return None
        rows, self.pending = self.pending, []
        table = pa.table(
            {"site": [r[0] for r in rows], "crc": [site_crc(r[0]) for r in rows], "status": [r[1] for r in rows],
             "body": [r[2] for r in rows], "error": [r[3] for r in rows], "fetched_at": [r[4] for r in rows]},
            schema=SCHEMA,
        )  # fmt: skip
        name = f"robots-{self.shards}-{self.index}-{self.files_written:06d}-{self.nonce}.parquet"
        self.files_written += 1
        return storage.join(self.uri, name), table

    def load(self) -> int:
        """Read back the answers of this shard's sites from earlier actors and runs; returns how many."""
        if not self.uri:
            return 0
        mine = f"robots-{self.shards}-{self.index}-"
        loaded = 0
        for uri in storage.list_files(self.uri, ".parquet"):
            name = uri.rsplit("/", 1)[-1]
            if not name.startswith("robots-"):
                continue
            table = read_table(uri)
            if not name.startswith(mine):  # written by a budget of another size: keep our sites only
                crc = pc.cast(table.column("crc"), pa.int64())
                table = table.filter(pc.equal(pc.subtract(crc, pc.multiply(pc.divide(crc, self.shards),
                                                                           self.shards)), self.index))  # fmt: skip
            columns = [table.column(c).to_pylist() for c in ("site", "status", "body", "error", "fetched_at")]
            for site, status, body, error, at in zip(*columns):
                if site not in self.answers or self.answers[site][3] < at:
                    self.answers[site] = (status, body, error, at)
                    loaded += 1
        return loaded


def read_table(uri: str) -> pa.Table:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.read_table(f, schema=SCHEMA)


def write_table(uri: str, table: pa.Table) -> None:
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())
