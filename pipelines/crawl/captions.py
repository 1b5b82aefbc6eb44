"""Captions stay text: the crawl input's caption column checked before any URL is fetched.

Applied to every shard's rows as they are read from the plan (curated or a plain `urls=` table), so a
binary column is decoded as UTF-8 rather than written as `b'...'`, and a row whose caption cannot be a
caption is a counted drop with a reason (its URL is never fetched):
- `caption_null`: null (or a NaN from a CSV reader);
- `caption_empty`: empty or only whitespace;
- `caption_not_utf8`: bytes that are not UTF-8;
- `caption_not_text`: a value that is neither text nor bytes (a list, a struct);
- `caption_too_long`: more than `max_caption_chars` characters when `long_captions: drop`; with
  `long_captions: truncate` the caption is cut to that length, kept, and counted (`caption_truncated`).
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

CAPTION_REASONS = frozenset(
    {"caption_null", "caption_empty", "caption_not_utf8", "caption_not_text", "caption_too_long"}
)
LONG_CAPTIONS = ("drop", "truncate")


def check_caption(value: Any, max_chars: int, long_captions: str) -> tuple[str | None, str | None, bool]:
    """(caption text or None, drop reason or None, truncated) of one input value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "caption_null", False
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption_not_utf8", False
    elif isinstance(value, int | float):
        value = str(value)  # a CSV column of numbers: still text a user wrote
    elif not isinstance(value, str):
        return None, "caption_not_text", False
    if not value.strip():
        return None, "caption_empty", False
    if len(value) > max_chars:
        if long_captions == "drop":
            return None, "caption_too_long", False
        return value[:max_chars], None, True
    return value, None, False


def normalise_captions(table: pa.Table, max_chars: int, long_captions: str = "drop") -> pa.Table:
    """`table` with `caption` as a string column (null where dropped), a `status` column (the caption's
    drop reason, null otherwise) and `caption_truncated` (bool)."""
    values = table.column("caption").to_pylist() if "caption" in table.column_names else [None] * len(table)
    checked = [check_caption(v, max_chars, long_captions) for v in values]
    columns = {
        "caption": pa.array([c for c, _, _ in checked], pa.string()),
        "status": pa.array([r for _, r, _ in checked], pa.string()),
        "caption_truncated": pa.array([t for _, _, t in checked], pa.bool_()),
    }
    for name, column in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table
