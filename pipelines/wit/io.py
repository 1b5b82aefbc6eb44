"""Opening and listing input files (local or s3://), with transparent .gz/.bz2 decompression."""

from __future__ import annotations

import bz2
import gzip
import io
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import pyarrow.fs as pafs

from pipelines import storage

# What a truncated or corrupt compressed stream raises part-way through.
TRUNCATION_ERRORS = (EOFError, OSError, zlib.error, gzip.BadGzipFile)


@contextmanager
def open_input(uri: str, decompress: bool = True) -> Iterator[BinaryIO]:
    """A streaming binary reader for `uri`; `.gz` / `.bz2` names are decompressed on the fly."""
    fs, path = storage.resolve(uri)
    # compression=None: pyarrow would otherwise guess from the suffix; Python's codecs report truncation.
    raw = io.BufferedReader(fs.open_input_stream(path, compression=None), buffer_size=1 << 20)
    try:
        if decompress and path.endswith(".bz2"):
            with bz2.open(raw, "rb") as f:
                yield f
        elif decompress and path.endswith(".gz"):
            with gzip.open(raw, "rb") as f:
                yield f
        else:
            yield raw
    finally:
        raw.close()


def expand_inputs(uris: str | list[str] | tuple[str, ...], suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files named by `uris`: files as given, folders listed recursively (filtered by `suffixes`)."""
    if isinstance(uris, str):
        uris = [uris]
    out: list[str] = []
    for uri in uris:
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input not found: {uri}")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            names = sorted(
                i.path
                for i in infos
                if i.type == pafs.FileType.File
                and not os.path.basename(i.path).startswith(("_", "."))
                and (not suffixes or i.path.endswith(suffixes))
            )
            prefix = "s3://" if storage.is_s3(uri) else ""
            out += [prefix + n for n in names]
        else:
            out.append(str(uri))
    return out
