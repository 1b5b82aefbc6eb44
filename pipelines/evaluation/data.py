"""Evaluation inputs: labelled images and caption sets, as a list of small work units plus a function that
expands one unit into records. The same expansion runs in-process (small sets) or inside a Ray Data
`flat_map` (large sets), so both paths read exactly the same records.

Inputs:
- an ImageFolder-style directory: one sub-folder per class, images inside (`root/red_circle/001.jpg`);
- WebDataset (`.tar`) or Parquet shards in the shard contract (pipelines/shards.py), with the class in a
  metadata field (`label` by default);
- any of these shard sets restricted to the rows a filter selected (pipelines/selection.py): rows outside
  the selection are dropped as the shard is read, before any image is decoded;
- caption sets: a JSONL file with `{"image": "relative/or/absolute.jpg", "captions": ["...", "..."]}` per
  line, or shards whose metadata has a `captions` list (else the sample's `txt` is its one caption).

A record is a dict: `id` (str), `jpg` (image bytes, decoded later), and `label` (int) or `captions`
(list[str]). Images are not decoded here: embed.py decodes them and counts the unreadable ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import datasets, selection, storage

from . import clip_benchmark

# Files an image folder's classes are made of. SVG is listed so that a vector image is a counted drop
# (`vector_image`, see embed.decode_checked) rather than silently absent from the totals.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".svg")


class EvalDataError(ValueError):
    """Evaluation input that cannot be used as given (the message says why and where)."""


@dataclass
class EvalSet:
    """A labelled image set (`class_names` set) or a caption set (`class_names` empty)."""

    kind: str  # "folder" | "shards" | "jsonl"
    source: str
    units: list[dict[str, Any]]
    class_names: list[str] = field(default_factory=list)
    label_field: str = "label"
    captions_field: str = "captions"
    # Drops found while listing (before any image is read), by reason.
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def is_captions(self) -> bool:
        return not self.class_names

    def records(self) -> Iterator[dict[str, Any]]:
        for unit in self.units:
            yield from expand_unit(unit)


def detect_format(path: str) -> str:
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith((".tar", ".parquet")) or "{" in path or "::" in path:  # a file, a brace list
        return "shards"
    if storage.is_s3(path):
        # Shards directly under the prefix, else an image folder (one sub-prefix per class).
        return (
            "shards" if storage.list_files(path, ".tar") or storage.list_files(path, ".parquet") else "folder"
        )
    p = Path(path)
    if not p.exists():
        raise EvalDataError(f"evaluation data not found: {path}")
    if p.is_dir() and any(f.suffix in (".tar", ".parquet") for f in p.iterdir() if f.is_file()):
        return "shards"
    if p.is_dir():
        return "folder"
    raise EvalDataError(f"cannot tell the format of {path}: expected a directory, .tar, .parquet or .jsonl")


def _readable(folder_name: str) -> str:
    return folder_name.replace("_", " ").strip()


def _rename(names: list[str], mapping: Sequence[str] | Mapping[str, str] | None, source: str) -> list[str]:
    """Readable class names: a list in label order, or a mapping from folder/label name to readable name."""
    if mapping is None:
        return names
    if isinstance(mapping, Mapping):
        return [mapping.get(n, _readable(n)) for n in names]
    if len(mapping) != len(names):
        raise EvalDataError(
            f"{source}: {len(names)} classes but the class-name list has {len(mapping)} entries"
        )
    return list(mapping)


def _s3_image_folder(root: str, limit_per_class: int) -> list[tuple[str, list[str]]]:
    """(class folder name, image URIs) per sub-prefix of an s3:// image folder, sorted."""
    import pyarrow.fs as pafs

    fs, base = storage.resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    by_class: dict[str, list[str]] = {}
    for info in infos:
        rel = info.path[len(base) :].lstrip("/")
        is_image = info.type == pafs.FileType.File and Path(rel).suffix.lower() in IMAGE_SUFFIXES
        if is_image and "/" in rel and not rel.startswith("."):
            by_class.setdefault(rel.split("/", 1)[0], []).append(storage.join(root, rel))
    return [(name, sorted(files)[: limit_per_class or None]) for name, files in sorted(by_class.items())]


def image_folder(
    root: str, class_names: Sequence[str] | Mapping[str, str] | None = None, limit_per_class: int = 0
) -> EvalSet:
    """One class per sub-folder, in sorted folder order. An empty class folder is an error that names it.
    `root` may be an s3:// prefix (a class is a sub-prefix holding images; S3 has no empty folders)."""
    if storage.is_s3(root):
        classes = _s3_image_folder(root, limit_per_class)
        if not classes:
            raise EvalDataError(f"{root}: no class sub-folders with images (expected root/<class>/<image>)")
        units = [
            {"kind": "file", "id": uri[len(root) :].lstrip("/"), "path": uri, "label": label}
            for label, (_, files) in enumerate(classes)
            for uri in files
        ]
        mapping = class_names
        if isinstance(class_names, Mapping):
            mapping = {_readable(n): class_names.get(n, _readable(n)) for n, _ in classes}
        return EvalSet("folder", root, units, _rename([_readable(n) for n, _ in classes], mapping, root))
    root_path = Path(root)
    if not root_path.is_dir():
        raise EvalDataError(f"image folder not found: {root}")
    folders = sorted(p for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EvalDataError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    units, empty = [], []
    for label, folder in enumerate(folders):
        files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if limit_per_class:
            files = files[:limit_per_class]
        if not files:
            empty.append(folder.name)
        units.extend(
            {"kind": "file", "id": str(f.relative_to(root_path)), "path": str(f), "label": label}
            for f in files
        )
    if empty:
        raise EvalDataError(
            f"{root}: {len(empty)} class folder(s) hold no images ({', '.join(IMAGE_SUFFIXES)}): {empty[:10]}; "
            "add images or remove the folder"
        )
    names = _rename([_readable(f.name) for f in folders], _mapping_by_folder(class_names, folders), root)
    return EvalSet("folder", root, units, names)


def _mapping_by_folder(class_names, folders):
    # A mapping may be keyed by the folder name (e.g. a WordNet id); translate to readable-name keys.
    if isinstance(class_names, Mapping):
        return {_readable(f.name): class_names.get(f.name, _readable(f.name)) for f in folders}
    return class_names


def _shard_uris(path: str) -> list[str]:
    """Shard files of `path` through the shared resolver (folders of ours or other tools', brace lists):
    tars when there are any (img2dataset's Parquet beside them holds no images), else Parquet."""
    try:
        return datasets.list_shards(path, "webdataset")
    except datasets.DatasetError:
        try:
            return datasets.list_shards(path, "parquet")
        except datasets.DatasetError:
            raise EvalDataError(f"{path}: no .tar or .parquet shards") from None


def _field(sample: Mapping[str, Any], name: str) -> Any:
    meta = sample.get("json") or {}
    return meta[name] if name in meta else sample.get(name)


def _selected_units(path: str, uris: list[str], selection_uri: str) -> list[dict[str, Any]]:
    """Units of the shards a selection keeps rows of: each names its selection file, and the selection's
    fingerprint (so the feature cache never serves another selection's features)."""
    data_format = "webdataset" if uris[0].endswith(".tar") else "parquet"
    try:
        chosen = selection.open_selection(selection_uri)
        shards = selection.resolve(path, data_format, chosen)
    except datasets.DatasetError as e:
        raise EvalDataError(str(e)) from None
    if not shards:
        raise EvalDataError(f"{path}: the selection {selection_uri} keeps no row")
    tag = selection.fingerprint(chosen, shards)
    return [{"kind": "shard", "uri": s.uri, "selection": chosen.file_of(s.uri), "tag": tag} for s in shards]


def unit_samples(unit: Mapping[str, Any]) -> list[dict]:
    """A shard unit's samples: all of them, or only the selected ones (never decoded here)."""
    samples = datasets.read_samples(unit["uri"])
    if "selection" not in unit:
        return samples
    try:
        keys = selection.read_keys(unit["selection"])
        wanted = set(keys)
        kept = [s for s in samples if s["key"] in wanted]
        selection.check_rows({"key": [s["key"] for s in kept]}, keys, unit["uri"], unit["selection"])
    except datasets.DatasetError as e:
        raise EvalDataError(str(e)) from None
    return kept


def shard_set(
    path: str,
    label_field: str = "label",
    class_names: Sequence[str] | Mapping[str, str] | None = None,
    captions: bool = False,
    captions_field: str = "captions",
    selection_uri: str = "",
) -> EvalSet:
    """Shards with a label field (classification) or captions (retrieval), or only the rows a selection
    keeps of them. Without `class_names` the label values found in the (selected) samples, sorted, are the
    classes (this reads every shard once)."""
    uris = _shard_uris(path)
    units = [{"kind": "shard", "uri": u} for u in uris]
    if selection_uri:
        units = _selected_units(path, uris, selection_uri)
    if captions:
        return EvalSet("shards", path, units, [], label_field, captions_field)
    if class_names is None or isinstance(class_names, Mapping):
        found = sorted(
            {
                str(v)
                for unit in units
                for s in unit_samples(unit)
                if (v := _field(s, label_field)) is not None
            }
        )
        if not found:
            raise EvalDataError(f"{path}: no sample has the label field {label_field!r}")
        labels = found
        names = [class_names.get(v, v) for v in found] if class_names else found
    else:
        labels = names = list(class_names)
    for unit in units:
        unit.update(label_field=label_field, labels=labels)
    return EvalSet("shards", path, units, names, label_field, captions_field)


def jsonl_captions(path: str) -> EvalSet:
    """`{"image": path, "captions": [...]}` per line; relative image paths are relative to the file."""
    base = path.rsplit("/", 1)[0] if storage.is_s3(path) else str(Path(path).parent)
    units, dropped = [], {}
    for n, line in enumerate(storage.read_bytes(path).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, captions = row["image"], row["captions"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EvalDataError(f'{path}:{n}: expected {{"image": ..., "captions": [...]}} ({e})') from e
        if isinstance(captions, str):
            captions = [captions]
        captions = [c for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            dropped["no_caption"] = dropped.get("no_caption", 0) + 1
            continue
        absolute = storage.is_s3(image) or Path(image).is_absolute()
        image_path = image if absolute else storage.join(base, image)
        units.append({"kind": "file", "id": str(image), "path": str(image_path), "captions": captions})
    if not units:
        raise EvalDataError(f"{path}: no image with captions")
    return EvalSet("jsonl", path, units, [], dropped=dropped)


def open_eval_set(
    path: str,
    task: str,
    label_field: str = "label",
    class_names: Sequence[str] | Mapping[str, str] | None = None,
    captions_field: str = "captions",
    fmt: str = "auto",
    selection_uri: str = "",
) -> EvalSet:
    """`task` is "classification" or "retrieval". `selection_uri`: only the rows a filter selected (shards)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if selection_uri and fmt != "shards":
        raise EvalDataError(f"{path}: a selection applies to shards, not to a {fmt}")
    if task == "retrieval":
        if fmt == "jsonl":
            return jsonl_captions(path)
        if fmt == "shards":
            return shard_set(path, captions=True, captions_field=captions_field, selection_uri=selection_uri)
        raise EvalDataError(f"{path}: retrieval needs a captions .jsonl file or shards, not a {fmt}")
    if fmt == "folder":
        return image_folder(path, class_names)
    if fmt == "shards":
        return shard_set(path, label_field, class_names, selection_uri=selection_uri)
    raise EvalDataError(f"{path}: classification needs an image folder or shards, not a {fmt}")


def expand_unit(unit: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Records of one unit. A file that cannot be read gives a record with empty bytes (counted later as
    unreadable); a shard sample without a known label gives one with label -1 (counted as unlabelled)."""
    if unit["kind"] == "clip_benchmark_tar":  # CLIP_benchmark's `.webp`/`.jpg` + `.cls` samples
        yield from clip_benchmark.tar_records(unit["uri"], unit["num_classes"])
        return
    if unit["kind"] == "file":
        try:
            data = storage.read_bytes(unit["path"])  # a local path or an s3:// object: any node reads it
        except OSError:
            data = b""
        record = {"id": unit["id"], "jpg": data}
        if "captions" in unit:
            record["captions"] = list(unit["captions"])
        else:
            record["label"] = int(unit["label"])
        yield record
        return
    index = {name: i for i, name in enumerate(unit.get("labels", []))}
    for sample in unit_samples(unit):
        record = {"id": sample["key"], "jpg": sample.get("jpg") or b""}
        if "labels" in unit:
            value = _field(sample, unit["label_field"])
            record["label"] = index.get(str(value), -1) if value is not None else -1
        else:
            caps = _field(sample, unit.get("captions_field", "captions"))
            if isinstance(caps, str):  # Parquet keeps nested metadata as JSON text
                try:
                    caps = json.loads(caps)
                except json.JSONDecodeError:
                    caps = [caps]
            caps = caps if isinstance(caps, list) and caps else [sample.get("txt", "")]
            record["captions"] = [c for c in caps if isinstance(c, str) and c.strip()]
        yield record
