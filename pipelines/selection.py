"""Selections: which rows of a shard set a run reads, as the filter job writes them (issue 20).

A selection folder holds one Parquet file per selected input shard, `{shard_name}.parquet` (the name
pipelines/datasets.shard_name gives), with one string column `key`: the kept keys in the shard's own row
order. A shard without a file is not selected; a file with zero rows selects none of its rows. Beside them,
`_selection.json` = {"data_uri", "shards", "input", "kept", "dropped": {reason: n}}.

Readers (the trainer, the evaluation) honour it exactly and copy nothing:
- counts come from the selection files' Parquet footers: the driver never reads a key, and shards with no
  selected row are left out of the list;
- a shard is read as before (its tar bytes fetched whole) and only its selected rows are kept, in the
  shard's order, before anything is decoded. To the trainer a shard *is* its selected rows, so the data
  position (pipelines/train/position.py) walks positions 0..selected-1 and resumes unchanged;
- a selected key that the shard does not hold is an error naming both: the selection was made from other
  data, and silently training on less would hide it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow.parquet as pq

from pipelines import datasets, storage
from pipelines.datasets import DatasetError, Shard, shard_name

SELECTION_FILE = "_selection.json"


@dataclass(frozen=True)
class Selection:
    folder: str  # the folder holding `_selection.json` and the per-shard files
    summary: dict  # `_selection.json`

    def file_of(self, shard_uri: str) -> str:
        """The selection file of one shard of the data (it may not exist: the shard is then not selected)."""
        return storage.join(self.folder, shard_name(shard_uri) + ".parquet")

    def files(self) -> dict[str, str]:
        """{shard name: selection file} for every shard the selection names (one listing)."""
        names = ((u, u.rsplit("/", 1)[-1]) for u in storage.list_files(self.folder, ".parquet"))
        return {
            n[: -len(".parquet")]: u for u, n in names if not n.startswith(("_", ".")) and ".tmp-" not in n
        }


def open_selection(uri: str) -> Selection:
    """`uri` is a selection folder, or the filter job's output folder that holds one as `selection/`."""
    for folder in (uri.rstrip("/"), storage.join(uri, "selection")):
        summary_uri = storage.join(folder, SELECTION_FILE)
        if storage.exists(summary_uri):
            return Selection(folder, storage.read_json(summary_uri))
    raise DatasetError(f"{uri} is not a selection: no {SELECTION_FILE} in it or in {uri}/selection")


def read_keys(uri: str) -> list[str]:
    """The selected keys of one shard, in the file's order."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    if "key" not in table.column_names:
        raise DatasetError(f"selection file {uri} has no `key` column (columns: {table.column_names})")
    keys = [str(k) for k in table.column("key").to_pylist()]
    if len(set(keys)) != len(keys):
        raise DatasetError(f"selection file {uri} names a key more than once")
    return keys


def _count_chunk(uris: Sequence[str]) -> list[int]:
    out = []
    for uri in uris:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            out.append(pq.ParquetFile(f).metadata.num_rows)
    return out


def resolve(data_uri: str, data_format: str, selection: Selection) -> list[Shard]:
    """The shards of `data_uri` that `selection` selects rows of, each with its number of selected rows."""
    uris = datasets.list_shards(data_uri, data_format)
    files = selection.files()
    unknown = sorted(set(files) - {shard_name(u) for u in uris})
    if unknown:
        raise DatasetError(
            f"selection {selection.folder} names {len(unknown)} shard(s) that {data_uri!r} does not hold "
            f"({unknown[:5]}): it was made from other data (its data_uri: {selection.summary.get('data_uri')!r})"
        )
    chosen = [u for u in uris if shard_name(u) in files]
    names = [shard_name(u) for u in chosen]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DatasetError(
            f"shards of {data_uri!r} share names {twice[:5]}: a selection cannot tell them apart"
        )
    # Counted where the files are (Ray tasks over chunks when Ray is up), like the shard counts.
    counts = datasets._map_chunks(_count_chunk, [files[n] for n in names])
    return [Shard(u, n) for u, n in zip(chosen, counts) if n > 0]


def fingerprint(selection: Selection, shards: Sequence[Shard]) -> str:
    """Identifies a selection (its summary and per-shard counts) for the training position's check."""
    text = json.dumps(selection.summary, sort_keys=True) + "".join(
        f"\n{s.name}:{s.num_samples}" for s in shards
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def check_rows(rows: dict[str, list], keys: Sequence[str], shard_uri: str, selection_uri: str) -> None:
    """The rows read for `keys` are exactly those keys (none missing, none twice)."""
    if len(rows["key"]) == len(keys) and set(rows["key"]) == set(keys):
        return
    missing = sorted(set(keys) - set(rows["key"]))
    what = (
        f"{len(missing)} key(s) that the shard does not hold (e.g. {missing[:3]})"
        if missing
        else ("keys the shard holds more than once")
    )
    raise DatasetError(
        f"selection file {selection_uri} names {what} in {shard_uri}: the selection was made from other data"
    )


def read_selected_rows(shard_uri: str, selection_folder: str) -> dict[str, list]:
    """key, jpg, txt columns of the selected rows of one shard, in the shard's order; nothing decoded."""
    selection_uri = storage.join(selection_folder, shard_name(shard_uri) + ".parquet")
    keys = read_keys(selection_uri)
    rows = datasets.read_rows(shard_uri, only=set(keys))
    check_rows(rows, keys, shard_uri, selection_uri)
    return rows


def read_shard(shard_uri: str, selection_folder: str = "") -> tuple[dict[str, list], str | None]:
    """Training's reader: a shard's rows (only the selected ones with a selection) and its damage as a drop
    reason, or None (datasets.read_rows_tolerant: a bad shard is a data problem, not a crash)."""
    if not selection_folder:
        return datasets.read_rows_tolerant(shard_uri)
    selection_uri = storage.join(selection_folder, shard_name(shard_uri) + ".parquet")
    keys = read_keys(selection_uri)
    rows, damage = datasets.read_rows_tolerant(shard_uri, only=set(keys))
    if damage is None:
        check_rows(rows, keys, shard_uri, selection_uri)
    return rows, damage
