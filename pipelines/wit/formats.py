"""Writers for the real input formats of WIT curation, used by tests, benchmarks and the demo corpus.

Each writer produces the format the readers in this package consume in production, byte for byte the
layout the upstream tools publish:

- `write_mediawiki_dump`: a MediaWiki XML export (`export-0.10` schema), bz2-compressed, as in
  `enwiki-*-pages-articles*.xml.bz2`.
- `write_pageviews`: a Wikimedia hourly page-view dump (`pageviews-YYYYMMDD-HHMMSS[.gz]`), lines
  `domain_code page_title count_views total_response_size`.
- `write_wordnet`: Princeton WordNet 3.0 database files `data.<pos>` / `index.<pos>` (the layout of
  Debian's `wordnet-base`), with correct byte offsets.
- `write_wat`: a Common Crawl WAT file (`.warc.wat.gz`): per-record gzipped WARC `metadata` records whose
  JSON payload holds `Envelope.Payload-Metadata.HTTP-Response-Metadata.HTML-Metadata.Links`.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

MEDIAWIKI_NS = "http://www.mediawiki.org/xml/export-0.10/"

_WORDNET_LICENSE = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  (Test fixture written by pipelines.wit.formats)\n"
)
_POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}


def write_mediawiki_dump(
    path: str | os.PathLike, pages: Iterable[tuple[str, str] | tuple[str, str, int]]
) -> Path:
    """Write `(title, wikitext[, namespace])` pages as a MediaWiki XML export; `.bz2` in the name compresses it."""
    path = Path(path)
    out = io.StringIO()
    out.write(
        f'<mediawiki xmlns="{MEDIAWIKI_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'version="0.10" xml:lang="en">\n'
        "  <siteinfo>\n    <sitename>Wikipedia</sitename>\n    <dbname>enwiki</dbname>\n"
        "    <base>https://en.wikipedia.org/wiki/Main_Page</base>\n"
        '    <namespaces>\n      <namespace key="0" case="first-letter" />\n    </namespaces>\n'
        "  </siteinfo>\n"
    )
    for page_id, (title, text, *ns) in enumerate(pages, start=1):
        namespace = ns[0] if ns else 0
        out.write(
            f"  <page>\n    <title>{escape(title)}</title>\n    <ns>{namespace}</ns>\n    <id>{page_id}</id>\n"
            f"    <revision>\n      <id>{1000 + page_id}</id>\n      <timestamp>2024-01-01T00:00:00Z</timestamp>\n"
            f"      <model>wikitext</model>\n      <format>text/x-wiki</format>\n"
            f'      <text bytes="{len(text.encode())}" xml:space="preserve">{escape(text)}</text>\n'
            f"    </revision>\n  </page>\n"
        )
    out.write("</mediawiki>\n")
    data = out.getvalue().encode("utf-8")
    path.write_bytes(bz2.compress(data) if path.name.endswith(".bz2") else data)
    return path


def write_pageviews(path: str | os.PathLike, rows: Iterable[tuple[str, str, int]]) -> Path:
    """Write `(domain_code, title, views)` rows in the hourly page-view dump format (`.gz` compresses)."""
    path = Path(path)
    lines = "".join(f"{domain} {title.replace(' ', '_')} {int(views)} 0\n" for domain, title, views in rows)
    data = lines.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@dataclass
class Synset:
    """One WordNet synset: its part of speech (n, v, a, s, r), lemmas (spaces allowed) and gloss."""

    pos: str
    lemmas: Sequence[str]
    gloss: str = ""
    lex_filenum: int = 3


def write_wordnet(directory: str | os.PathLike, synsets: Iterable[Synset]) -> Path:
    """Write Princeton WordNet `data.<pos>` and `index.<pos>` files for `synsets` into `directory`.

    Synset offsets are the byte offsets of their lines in `data.<pos>`, as in the real database, and each
    `index.<pos>` line lists a lemma's synset offsets.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_file: dict[str, list[Synset]] = {}
    for s in synsets:
        by_file.setdefault(_POS_FILES[s.pos], []).append(s)
    for name, items in by_file.items():
        data = bytearray(_WORDNET_LICENSE.encode())
        index: dict[str, list[int]] = {}
        for s in items:
            offset = len(data)
            words = " ".join(f"{lemma.replace(' ', '_')} 0" for lemma in s.lemmas)
            line = f"{offset:08d} {s.lex_filenum:02d} {s.pos} {len(s.lemmas):02x} {words} 000 | {s.gloss}  \n"
            data += line.encode("utf-8")
            for lemma in s.lemmas:
                index.setdefault(lemma.lower().replace(" ", "_"), []).append(offset)
        (directory / f"data.{name}").write_bytes(bytes(data))
        index_lines = [_WORDNET_LICENSE]
        pos = "a" if name == "adj" else items[0].pos
        for lemma in sorted(index):
            offs = index[lemma]
            index_lines.append(
                f"{lemma} {pos} {len(offs)} 0 {len(offs)} 0 {' '.join(f'{o:08d}' for o in offs)}  \n"
            )
        (directory / f"index.{name}").write_text("".join(index_lines), encoding="utf-8")
    return directory


@dataclass
class WatPage:
    """One crawled HTML page for a WAT file: its URL and the `<img>` links found on it."""

    url: str
    images: Sequence[Mapping[str, str]] = field(default_factory=list)  # {"url": src, "alt": text}
    base: str | None = None  # <base href>, when the page has one
    title: str = ""


def wat_payload(page: WatPage) -> dict:
    """The JSON document Common Crawl stores for one HTML response record."""
    links = [{"path": "A@/href", "url": "/about", "text": "About"}]
    for img in page.images:
        link = {"path": "IMG@/src", "url": img["url"]}
        if img.get("alt") is not None:
            link["alt"] = img["alt"]
        links.append(link)
    head: dict = {"Title": page.title, "Metas": []}
    if page.base:
        head["Base"] = page.base
    return {
        "Container": {"Filename": "CC-MAIN-test.warc.gz", "Compressed": True, "Offset": "0"},
        "Envelope": {
            "Format": "WARC",
            "WARC-Header-Length": "500",
            "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": page.url},
            "Payload-Metadata": {
                "Actual-Content-Type": "application/http; msgtype=response",
                "HTTP-Response-Metadata": {
                    "Response-Message": {"Status": "200", "Version": "HTTP/1.1", "Reason": "OK"},
                    "Headers": {"Content-Type": "text/html; charset=UTF-8"},
                    "HTML-Metadata": {"Head": head, "Links": links},
                },
            },
        },
    }


def write_wat(
    path: str | os.PathLike, pages: Iterable[WatPage], extra_records: Iterable[bytes | dict] = ()
) -> Path:
    """Write a `.warc.wat.gz` file: a `warcinfo` record, then one `metadata` record per page.

    `extra_records` appends further metadata records with a raw payload (bytes, e.g. malformed JSON) or a
    JSON document (dict) - how tests build WAT files with bad records in them.
    """
    from warcio.warcwriter import WARCWriter

    path = Path(path)
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        info = writer.create_warcinfo_record(
            path.name, {"software": "pipelines.wit.formats", "format": "WAT"}
        )
        writer.write_record(info)
        payloads: list[tuple[str, bytes]] = [
            (p.url, json.dumps(wat_payload(p)).encode("utf-8")) for p in pages
        ]
        payloads += [
            ("http://example.invalid/", r if isinstance(r, bytes) else json.dumps(r).encode("utf-8"))
            for r in extra_records
        ]
        for url, payload in payloads:
            record = writer.create_warc_record(
                url,
                "metadata",
                payload=io.BytesIO(payload),
                warc_content_type="application/json",
                length=len(payload),
            )
            writer.write_record(record)
    return path
