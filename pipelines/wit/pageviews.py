"""Wikimedia page-view dumps: article titles and their views (the `title` source of the query list)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import unquote

import pyarrow as pa

from pipelines.stats import Funnel
from pipelines.wit.io import TRUNCATION_ERRORS, open_input
from pipelines.wit.tally import funnel_keys

_NON_ARTICLE = re.compile(
    r"^(special|talk|user|user_talk|wikipedia|file|image|mediawiki|template|help|category|portal|draft|"
    r"module|timedtext|book|education_program|gadget|topic|media)(_talk)?:",
    re.I,
)
_DISAMBIGUATION = re.compile(r"\s*\([^()]*\)\s*$")


def strip_disambiguation(title: str) -> str:
    """A title without its disambiguation suffix: "Mercury (planet)" -> "Mercury"."""
    return _DISAMBIGUATION.sub("", title)


def iter_pageviews(
    uri: str, projects: Iterable[str], errors: Counter | None = None
) -> Iterator[tuple[str, int]]:
    """`(title, views)` of article pages of `projects` from an hourly page-view dump (plain or .gz).

    Lines are `domain_code page_title count_views total_response_size`; malformed lines and undecodable
    bytes are counted in `errors` and skipped, a truncated file ends the stream.
    """
    errors = errors if errors is not None else Counter()
    projects = set(projects)
    try:
        with open_input(uri) as f:
            for raw in f:
                parts = raw.split(b" ")
                if len(parts) < 3:
                    errors["malformed_line"] += 1
                    continue
                try:
                    domain, title, views = parts[0].decode(), parts[1].decode("utf-8"), int(parts[2])
                except (UnicodeDecodeError, ValueError):
                    errors["malformed_line"] += 1
                    continue
                if domain not in projects:
                    continue
                if "%00" in title or "\x00" in title:  # NUL marks tally keys (pipelines/wit/tally.py)
                    errors["malformed_line"] += 1
                    continue
                if _NON_ARTICLE.match(title) or title in ("-", "Main_Page"):
                    errors["not_article"] += 1
                    continue
                yield unquote(title).replace("_", " "), views
    except TRUNCATION_ERRORS:
        errors["truncated_input"] += 1


class PageviewFile:
    """Ray Data UDF: one page-view dump path in, `(title, views)` batches out, its error counts last as
    tally keys (pipelines/wit/tally.py)."""

    def __init__(self, projects: Iterable[str], batch_rows: int = 100_000):
        self.projects = list(projects)
        self.batch_rows = batch_rows

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        for uri in batch["path"]:
            errors: Counter = Counter()
            titles: list[str] = []
            views: list[int] = []
            for title, n in iter_pageviews(str(uri), self.projects, errors):
                titles.append(title)
                views.append(n)
                if len(titles) >= self.batch_rows:
                    yield pa.table({"title": titles, "views": pa.array(views, pa.int64())})
                    titles, views = [], []
            if titles:
                yield pa.table({"title": titles, "views": pa.array(views, pa.int64())})
            funnel = Funnel()
            funnel.add_counts("pageview_input_errors", errors)
            keys = funnel_keys(funnel)  # the file's counts, summed by the same groupby as the views
            yield pa.table({"title": list(keys), "views": pa.array(list(keys.values()), pa.int64())})
