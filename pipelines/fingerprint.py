"""Fingerprints that decide whether a finished step (curation, crawl plan) may be reused.

A step writes `{out}/_fingerprint.json` when it finishes: the configuration that shaped its output and the
inputs it read (path, size, modification time). A rerun reuses the output only when both match; otherwise
it names what differs and refuses, unless told to redo the step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow.fs as pafs

from pipelines import storage

FINGERPRINT_FILE = "_fingerprint.json"


class StaleOutput(ValueError):
    """A finished step's output was made from another configuration or other inputs."""


def input_listing(uris: Iterable[str]) -> list[dict[str, Any]]:
    """(uri, size, mtime) of every file under `uris` (files or folders, local or s3://), sorted."""
    listing = []
    for uri in uris:
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
        infos = (
            fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if info.type == pafs.FileType.Directory
            else [info]
        )
        for i in infos:
            if i.type == pafs.FileType.File:
                mtime = i.mtime.timestamp() if i.mtime is not None else None
                listing.append({"uri": i.path, "size": i.size, "mtime": mtime})
    return sorted(listing, key=lambda r: r["uri"])


def fingerprint(config: Mapping[str, Any], inputs: Iterable[str] = ()) -> dict[str, Any]:
    listing = input_listing(inputs)
    digest = hashlib.sha256(json.dumps([config, listing], sort_keys=True, default=str).encode()).hexdigest()
    return {"sha256": digest, "config": dict(config), "inputs": listing}


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable list of what changed between two fingerprints (empty when they match)."""
    out = []
    old_cfg, new_cfg = stored.get("config", {}), current.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            out.append(f"{key}: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
    old_in = {r["uri"]: r for r in stored.get("inputs", [])}
    new_in = {r["uri"]: r for r in current.get("inputs", [])}
    out += [f"input removed: {u}" for u in sorted(set(old_in) - set(new_in))]
    out += [f"input added: {u}" for u in sorted(set(new_in) - set(old_in))]
    out += [f"input changed: {u}" for u in sorted(set(old_in) & set(new_in)) if old_in[u] != new_in[u]]
    if not out and stored.get("sha256") != current.get("sha256"):
        out.append("fingerprint differs")
    return out


def check_reusable(out_uri: str, current: Mapping[str, Any], what: str, redo_key: str) -> bool:
    """True when `out_uri` holds a finished step made from `current`; False when there is none.

    Raises StaleOutput naming the differences (and the `redo_key` that forces a redo) otherwise."""
    uri = storage.join(out_uri, FINGERPRINT_FILE)
    if not storage.exists(uri):
        return False
    diff = differences(storage.read_json(uri), current)
    if diff:
        raise StaleOutput(
            f"{what} in {out_uri} was made from other settings or inputs ({'; '.join(diff[:5])}"
            f"{'; ...' if len(diff) > 5 else ''}); set {redo_key}=true to redo it, or use another output"
        )
    return True


def write_fingerprint(out_uri: str, current: Mapping[str, Any]) -> None:
    storage.write_json(storage.join(out_uri, FINGERPRINT_FILE), dict(current))
