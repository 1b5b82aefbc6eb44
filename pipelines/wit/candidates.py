"""Candidate (image URL, caption) pairs from tables and Common Crawl WAT files, in one schema.

Schema of every batch: `url`, `caption`, `page_url` (may be empty), `source` (the input file's name).

- Tables: Parquet, CSV, TSV, JSONL (each optionally .gz), with configurable column names.
- WAT (`.warc.wat.gz`): read with warcio; for each HTML response record, every `IMG@/src` link with its
  `alt` text, the `src` resolved against the page's `<base href>` or, failing that, the page URL.

Bad input is counted, never fatal: a truncated compressed file ends that file (`truncated_input`), a
malformed WAT record or table row is skipped (`malformed_record`; warcio hands over the last
record of a cut WAT file as a partial record, which lands here too), bytes that are not UTF-8 are skipped
(`invalid_utf8`), images without alt text are `no_alt`.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.stats import Funnel
from pipelines.wit.io import TRUNCATION_ERRORS, open_input
from pipelines.wit.tally import conform, tally_schema, tally_table

SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("page_url", pa.string()), ("source", pa.string())]
)
TABLE_SUFFIXES = (
    ".parquet",
    ".csv",
    ".tsv",
    ".jsonl",
    ".json",
    ".csv.gz",
    ".tsv.gz",
    ".jsonl.gz",
    ".json.gz",
)
WAT_SUFFIXES = (".wat.gz", ".wat")


@dataclass
class ColumnNames:
    """Which input columns hold the URL, the caption and (optionally) the page URL."""

    url: str = "url"
    caption: str = "caption"
    page_url: str = "page_url"


def input_kind(uri: str) -> str:
    name = uri.lower()
    if name.endswith(WAT_SUFFIXES):
        return "wat"
    for kind in ("parquet", "csv", "tsv", "jsonl", "json"):
        if name.endswith((f".{kind}", f".{kind}.gz")):
            return "jsonl" if kind == "json" else kind
    raise ValueError(
        f"unknown candidate input format: {uri} (expected one of {TABLE_SUFFIXES + WAT_SUFFIXES})"
    )


def _valid_text(value: Any) -> str | None:
    """`value` as a str, or None when it is not valid Unicode text (bytes that are not UTF-8, surrogates)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


class _Rows:
    """Accumulates rows of the common schema and counts drops for one input file."""

    def __init__(self, source: str, batch_rows: int):
        self.source, self.batch_rows = source, batch_rows
        self.cols: dict[str, list[str]] = {"url": [], "caption": [], "page_url": []}
        self.n_in = self.n_out = 0
        self.dropped: Counter = Counter()

    def add(self, url: Any, caption: Any, page_url: Any = "") -> None:
        self.n_in += 1
        values = [_valid_text(url), _valid_text(caption), _valid_text(page_url)]
        if any(v is None for v in values):
            self.dropped["invalid_utf8"] += 1
            return
        self.n_out += 1
        for name, v in zip(("url", "caption", "page_url"), values):
            self.cols[name].append(v)

    def drop(self, reason: str) -> None:
        self.n_in += 1
        self.dropped[reason] += 1

    def full(self) -> bool:
        return len(self.cols["url"]) >= self.batch_rows

    def take(self) -> pa.Table:
        n = len(self.cols["url"])
        table = pa.table({**self.cols, "source": [self.source] * n}, schema=SCHEMA)
        self.cols = {"url": [], "caption": [], "page_url": []}
        return table


def read_candidates(
    uri: str, columns: ColumnNames | None = None, batch_rows: int = 8192, funnel: Funnel | None = None
) -> Iterator[pa.Table]:
    """Stream common-schema batches from one input file; counts land in `funnel` (stage `read`)."""
    columns = columns or ColumnNames()
    rows = _Rows(uri.rsplit("/", 1)[-1], batch_rows)
    kind = input_kind(uri)
    reader = {
        "wat": _read_wat,
        "parquet": _read_parquet,
        "csv": _read_delimited,
        "tsv": _read_delimited,
        "jsonl": _read_jsonl,
    }[kind]
    try:
        for _ in reader(uri, columns, rows, kind):
            if rows.full():
                yield rows.take()
    except TRUNCATION_ERRORS:
        rows.dropped["truncated_input"] += 1
        rows.n_in += 1
    except Exception as e:  # warcio's ArchiveLoadFailed and friends: a broken file, not a broken job
        if type(e).__name__ != "ArchiveLoadFailed":
            raise
        rows.dropped["truncated_input"] += 1
        rows.n_in += 1
    if rows.cols["url"]:
        yield rows.take()
    if funnel is not None:
        funnel.record("read", rows.n_in, rows.n_out, rows.dropped)


def _read_parquet(uri: str, columns: ColumnNames, rows: _Rows, kind: str) -> Iterator[None]:
    fs, path = storage.resolve(uri)
    pf = pq.ParquetFile(path, filesystem=fs)
    names = set(pf.schema_arrow.names)
    _check_columns(uri, names, columns)
    wanted = [c for c in (columns.url, columns.caption, columns.page_url) if c in names]
    for batch in pf.iter_batches(batch_size=rows.batch_rows, columns=wanted):
        d = batch.to_pydict()
        page = d.get(columns.page_url) or [""] * batch.num_rows
        for url, cap, pg in zip(d[columns.url], d[columns.caption], page):
            rows.add(url, cap, pg)
        yield None


def _check_columns(uri: str, names: set[str], columns: ColumnNames) -> None:
    missing = [c for c in (columns.url, columns.caption) if c not in names]
    if missing:
        raise ValueError(f"{uri}: missing column(s) {missing}; columns present: {sorted(names)}")


def _read_delimited(uri: str, columns: ColumnNames, rows: _Rows, kind: str) -> Iterator[None]:
    csv.field_size_limit(1 << 24)
    with open_input(uri) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter="\t" if kind == "tsv" else ",")
        header = next(reader, None)
        if header is None:
            return
        _check_columns(uri, set(header), columns)
        iu, ic = header.index(columns.url), header.index(columns.caption)
        ip = header.index(columns.page_url) if columns.page_url in header else None
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error:
                rows.drop("malformed_record")
                continue
            if len(rec) != len(header):
                rows.drop("malformed_record")
            else:
                rows.add(rec[iu], rec[ic], rec[ip] if ip is not None else "")
            yield None


def _read_jsonl(uri: str, columns: ColumnNames, rows: _Rows, kind: str) -> Iterator[None]:
    with open_input(uri) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                rows.drop("invalid_utf8")
                continue
            except ValueError:
                rows.drop("malformed_record")
                continue
            if not isinstance(rec, dict) or columns.url not in rec or columns.caption not in rec:
                rows.drop("malformed_record")
                continue
            rows.add(rec[columns.url], rec[columns.caption], rec.get(columns.page_url) or "")
            yield None


def wat_images(payload: dict) -> tuple[str, list[tuple[str, str | None]]]:
    """(page URL, [(absolute image URL, alt or None)]) of one WAT JSON document."""
    envelope = payload["Envelope"]
    page_url = envelope["WARC-Header-Metadata"].get("WARC-Target-URI", "")
    html_meta = envelope.get("Payload-Metadata", {}).get("HTTP-Response-Metadata", {}).get("HTML-Metadata")
    if not html_meta:
        return page_url, []
    base = urljoin(page_url, (html_meta.get("Head") or {}).get("Base") or "") or page_url
    images = []
    for link in html_meta.get("Links") or []:
        if link.get("path") == "IMG@/src" and link.get("url"):
            images.append((urljoin(base, link["url"].strip()), link.get("alt")))
    return page_url, images


def _read_wat(uri: str, columns: ColumnNames, rows: _Rows, kind: str) -> Iterator[None]:
    from warcio.archiveiterator import ArchiveIterator

    with open_input(uri, decompress=False) as f:
        for record in ArchiveIterator(f):
            if record.rec_type != "metadata" or "json" not in (record.content_type or ""):
                continue
            body = record.content_stream().read()
            try:
                page_url, images = wat_images(json.loads(body))
            except (ValueError, KeyError, TypeError, AttributeError):
                rows.drop("malformed_record")
                continue
            for url, alt in images:
                if alt is None or not str(alt).strip():
                    rows.drop("no_alt")
                else:
                    rows.add(url, alt, page_url)
            yield None


class ReadCandidates:
    """Ray Data UDF: a batch of input paths in, common-schema batches out, each file's `read` counts last
    as tally rows (pipelines/wit/tally.py)."""

    def __init__(self, columns: ColumnNames | None = None, batch_rows: int = 8192):
        self.columns, self.batch_rows = columns, batch_rows

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        schema = tally_schema(SCHEMA)
        for uri in batch["path"]:
            funnel = Funnel()
            for rows in read_candidates(str(uri), self.columns, self.batch_rows, funnel):
                yield conform(rows, schema)
            e = funnel.stages["read"]
            yield tally_table(SCHEMA, "read", e["in"], e["out"], e["dropped"])
