"""Candidate readers: tables in every format, WAT files via warcio, and bad input counted, not fatal."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.stats import Funnel
from pipelines.wit.candidates import ColumnNames, read_candidates
from pipelines.wit.formats import WatPage, write_wat

ROWS = [
    ("https://a.org/1.jpg", "A red bicycle", "https://a.org/p"),
    ("https://a.org/2.jpg", "Two cats, sleeping", ""),
]


def _read(path, columns=None):
    funnel = Funnel()
    tables = list(read_candidates(str(path), columns, batch_rows=2, funnel=funnel))
    table = pa.concat_tables(tables) if tables else None
    funnel.check()
    return table, funnel.to_dict()["stages"]["read"]


@pytest.mark.parametrize(
    "name", ["t.parquet", "t.csv", "t.csv.gz", "t.tsv", "t.tsv.gz", "t.jsonl", "t.jsonl.gz"]
)
def test_table_formats_with_custom_columns(tmp_path, name):
    df = pa.table({"IMAGE": [r[0] for r in ROWS], "TEXT": [r[1] for r in ROWS], "other": [1, 2]}).to_pandas()
    path = tmp_path / name
    if name.endswith(".parquet"):
        df.to_parquet(path)
    elif ".jsonl" in name:
        df.to_json(path, orient="records", lines=True, compression="infer")
    else:
        df.to_csv(path, sep="\t" if ".tsv" in name else ",", index=False, compression="infer")
    table, stage = _read(path, ColumnNames(url="IMAGE", caption="TEXT"))
    assert table.column_names == ["url", "caption", "page_url", "source"]
    assert table.column("caption").to_pylist() == [r[1] for r in ROWS]
    assert table.column("source").to_pylist() == [name] * 2
    assert stage == {"in": 2, "out": 2, "dropped": {}}


def test_missing_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"url": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="missing column"):
        _read(tmp_path / "t.parquet")


def test_bad_rows_are_counted(tmp_path):
    lines = [
        json.dumps({"url": ROWS[0][0], "caption": ROWS[0][1]}).encode(),
        b'{"url": "https://a.org/3.jpg", "caption": "caf\xe9 au lait"}',  # latin-1 byte: not UTF-8
        b"{truncated",
        json.dumps(
            {"url": "https://a.org/4.jpg", "caption": "x" * 100_000}
        ).encode(),  # kept here, filtered later
    ]
    (tmp_path / "t.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    table, stage = _read(tmp_path / "t.jsonl")
    assert table.num_rows == 2
    assert stage["dropped"] == {"invalid_utf8": 1, "malformed_record": 1}

    csv_bytes = (
        b"url,caption\nhttps://a.org/1.jpg,ok caption\nhttps://a.org/2.jpg,bad \xff byte\nonly-one-field\n"
    )
    (tmp_path / "t.csv").write_bytes(csv_bytes)
    table, stage = _read(tmp_path / "t.csv")
    assert table.num_rows == 1 and stage["dropped"] == {"invalid_utf8": 1, "malformed_record": 1}

    data = gzip.compress(
        b"url,caption\n" + b"".join(b"https://a.org/%d.jpg,cap %d\n" % (i, i) for i in range(5000))
    )
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) // 2])
    table, stage = _read(tmp_path / "cut.csv.gz")
    assert stage["dropped"] == {"truncated_input": 1} and table.num_rows > 0


def test_wat_images_with_alt_resolved(tmp_path):
    pages = [
        WatPage(
            "https://news.example.com/2024/story.html",
            [
                {"url": "/media/fox.jpg", "alt": "A fox in the snow"},
                {"url": "thumbs/owl.png", "alt": "An owl at night"},
                {"url": "//cdn.example.net/bear.webp", "alt": "A bear fishing"},
                {"url": "https://other.org/x.gif", "alt": ""},
                {"url": "spacer.gif"},
            ],
        ),
        WatPage(
            "https://b.example.com/dir/page",
            [{"url": "img/a.jpg", "alt": "Base href used"}],
            base="https://static.b.com/s/",
        ),
    ]
    bad = [b"{not json", {"Envelope": {"no": "header"}}]
    path = write_wat(tmp_path / "CC-MAIN-test.warc.wat.gz", pages, extra_records=bad)
    table, stage = _read(path)
    got = list(
        zip(
            table.column("url").to_pylist(),
            table.column("caption").to_pylist(),
            table.column("page_url").to_pylist(),
        )
    )
    assert got == [
        ("https://news.example.com/media/fox.jpg", "A fox in the snow", pages[0].url),
        ("https://news.example.com/2024/thumbs/owl.png", "An owl at night", pages[0].url),
        ("https://cdn.example.net/bear.webp", "A bear fishing", pages[0].url),
        ("https://static.b.com/s/img/a.jpg", "Base href used", pages[1].url),
    ]
    assert stage == {"in": 8, "out": 4, "dropped": {"no_alt": 2, "malformed_record": 2}}

    # A WAT file cut inside a record: warcio yields the partial record, whose JSON is then malformed.
    many = write_wat(
        tmp_path / "many.warc.wat.gz",
        [WatPage(f"https://a.com/p{i}", [{"url": "i.jpg", "alt": f"alt {i}"}]) for i in range(50)],
    )
    data = many.read_bytes()
    (tmp_path / "cut.warc.wat.gz").write_bytes(data[: len(data) // 2])
    table, stage = _read(tmp_path / "cut.warc.wat.gz")
    assert 0 < table.num_rows < 50 and stage["dropped"] == {"malformed_record": 1}
