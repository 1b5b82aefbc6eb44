"""LAION CLIP_benchmark's WebDataset layout, read as it is distributed (local folder or s3:// prefix):

    {root}/classnames.txt                             one class name per line, in label order
    {root}/zeroshot_classification_templates.txt      one prompt per line, `{c}` where the class name goes
    {root}/{split}/NNNNN.tar                          samples: `{key}.webp` (or .jpg/.jpeg/.png) + `{key}.cls`

`.cls` holds the integer label as text. A sample without an image reaches the embedder with empty bytes (a
counted `empty_image` drop); one without a readable label in range gets label -1 (a counted `unknown_label`
drop), so kept + dropped = samples in the tars.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipelines import shards, storage

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
# Image extensions CLIP_benchmark's converter writes (webp) and the common others, in order of preference.
IMAGE_EXTS = ("webp", "jpg", "jpeg", "png")


class LayoutError(ValueError):
    """A folder that is not in CLIP_benchmark's layout (the message names the missing piece)."""


@dataclass
class BenchmarkLayout:
    root: str
    split: str
    tars: list[str]
    class_names: list[str]
    templates: list[str]  # with our `{}` slot

    @property
    def name(self) -> str:
        """The dataset's name as CLIP_benchmark prints it: the folder name without the `wds_` prefix of its
        Hugging Face repositories (clip-benchmark/wds_imagenet1k -> imagenet1k)."""
        base = self.root.rstrip("/").rsplit("/", 1)[-1]
        return base.removeprefix("wds_").replace("-", "_") or base


def _lines(uri: str) -> list[str]:
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except (OSError, FileNotFoundError) as e:
        raise LayoutError(f"{uri}: cannot be read ({e}); a CLIP_benchmark dataset has it at its root") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def to_our_template(template: str) -> str:
    """CLIP_benchmark's `{c}` slot as our `{}` (its templates are used with `template.format(c=name)`)."""
    return template.replace("{c}", "{}")


def read_layout(root: str, split: str = "test") -> BenchmarkLayout:
    """The tars, class names and templates of one dataset; a LayoutError names what is missing."""
    root = root.rstrip("/")
    tars = storage.list_files(storage.join(root, split), ".tar")
    if not tars:
        raise LayoutError(f"{root}: no {split}/*.tar (CLIP_benchmark layout: {{root}}/{split}/NNNNN.tar)")
    class_names = _lines(storage.join(root, CLASSNAMES))
    templates = [to_our_template(t) for t in _lines(storage.join(root, TEMPLATES))]
    if not class_names or not templates:
        raise LayoutError(f"{root}: {CLASSNAMES} or {TEMPLATES} is empty")
    return BenchmarkLayout(root, split, tars, class_names, templates)


def _label(raw: bytes | None, num_classes: int) -> int:
    try:
        label = int(raw.decode("utf-8").strip()) if raw is not None else -1
    except (UnicodeDecodeError, ValueError):
        return -1
    return label if 0 <= label < num_classes else -1


def tar_records(uri: str, num_classes: int) -> Iterator[dict[str, Any]]:
    """Evaluation records ({"id", "jpg", "label"}, see data.py) of one tar, local or s3://."""
    tar_name = uri.rsplit("/", 1)[-1]
    for sample in shards.read_tar_samples(storage.read_bytes(uri)):
        image = next((sample[e] for e in IMAGE_EXTS if sample.get(e)), b"")
        yield {
            "id": f"{tar_name}/{sample['key']}",
            "jpg": image,
            "label": _label(sample.get("cls"), num_classes),
        }
