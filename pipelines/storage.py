"""Local paths and `s3://` URIs behind one small API (pyarrow filesystems).

S3 uses pyarrow's normal AWS credential chain (env vars, profile, instance profile). For S3-compatible
servers (MinIO, moto on loopback in the tests) set `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`.
A reader never sees half a file: S3 objects are written with one PUT, local files under a temporary
name that is then renamed.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # Delayed open: an output stream starts no multipart upload before its first full part, so a small
    # object is one PutObject on close (an eager open costs create + upload part + complete).
    return pafs.S3FileSystem(allow_delayed_open=True, **kwargs)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    """The bytes as stored (pyarrow would otherwise gunzip a `.gz` name on the fly)."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


@functools.lru_cache(maxsize=64)
def local_file(uri: str) -> str:
    """A local path holding the file at `uri`: the path itself, or a temp copy of an s3:// object, made
    once per process (for readers that only take paths, e.g. the tokenizer's merges file on every worker)."""
    if not is_s3(uri):
        return os.fspath(uri)
    suffix = "".join(Path(uri).suffixes[-2:])
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
        f.write(read_bytes(uri))
    return f.name


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write `uri` so that no reader ever sees half of it. On S3 that is one PUT (an object appears whole
    or not at all; no copy, no delete); locally, `<name>.tmp-<random>` then a rename."""
    fs, path = resolve(uri)
    if is_s3(uri):
        # A body that fits in one part is a single PutObject (s3_filesystem: delayed open); a larger one a
        # multipart upload, just as atomic: the object appears when the upload completes.
        with fs.open_output_stream(path, compression=None) as f:  # the bytes as given, even for `.gz`
            f.write(data)
        return
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files directly under `uri` whose names end with `suffix`, sorted; [] if it is missing."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    names = sorted(
        i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
    )
    return [join(uri, n) for n in names]


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
