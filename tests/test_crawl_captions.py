"""Captions stay text: binary caption columns are decoded, null/empty/undecodable/over-long captions are
counted drops (never fetched), long ones are truncated when configured, kept + dropped = input."""

from __future__ import annotations

from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import shards
from pipelines.build_wit import BuildWITConfig
from pipelines.config import ConfigError, load_config
from pipelines.crawl.build import build_crawl
from pipelines.crawl.captions import check_caption, normalise_captions
from pipelines.crawl.testsite import rendered_images

LONG = "a red square " * 20  # 260 characters


def test_caption_values_become_text_or_a_reason():
    cases = {
        b"caf\xc3\xa9 au lait": ("café au lait", None, False),
        "plain": ("plain", None, False),
        None: (None, "caption_null", False),
        float("nan"): (None, "caption_null", False),
        b"": (None, "caption_empty", False),
        " \t\n": (None, "caption_empty", False),
        b"\xff\xfe\x00bad": (None, "caption_not_utf8", False),
        12: ("12", None, False),
        LONG: (None, "caption_too_long", False),
    }
    assert {k if k == k else "nan": check_caption(k, 100, "drop") for k in cases} == {
        k if k == k else "nan": v for k, v in cases.items()
    }
    assert check_caption(LONG, 100, "truncate") == (LONG[:100], None, True)
    assert check_caption([1, 2], 100, "drop") == (None, "caption_not_text", False)


def test_a_binary_column_is_normalised_in_place():
    table = pa.table({"url": ["a", "b", "c"], "caption": pa.array([b"ok", None, b"\xff"], pa.binary())})
    out = normalise_captions(table, 10)
    assert out.column_names == ["url", "caption", "status", "caption_truncated"]
    assert out.schema.field("caption").type == pa.string()
    assert out.column("caption").to_pylist() == ["ok", None, None]
    assert out.column("status").to_pylist() == [None, "caption_null", "caption_not_utf8"]


def test_caption_settings_are_usage_errors():
    with pytest.raises(ConfigError, match="crawl.long_captions"):
        load_config(BuildWITConfig, None, ["crawl.long_captions=cut"])
    with pytest.raises(ConfigError, match="crawl.max_caption_chars"):
        load_config(BuildWITConfig, None, ["crawl.max_caption_chars=0"])


def write_input(http_server, path, captions: list, caption_type: pa.DataType) -> list[str]:
    images = rendered_images(len(captions), seed=11, size=48)
    urls = [
        http_server.put_file(f"captions/{path.stem}/{i}.{ext}", data)
        for i, (data, ext, _) in enumerate(images)
    ]
    pq.write_table(pa.table({"url": urls, "caption": pa.array(captions, caption_type)}), path)
    return urls


def test_bad_captions_through_the_build(ray_local, http_server, tmp_path, crawl_config):
    """A `urls=` table whose caption column is binary: good UTF-8 bytes are kept as text; null, empty,
    undecodable and over-long captions are dropped by reason and their URLs never fetched."""
    captions = [b"a blue circle", "une \u00e9toile verte".encode(), None, b"", b"   ", b"\xc3\x28 bad",
                LONG.encode(), b"two red squares"]  # fmt: skip
    urls = write_input(http_server, tmp_path / "binary.parquet", captions, pa.binary())
    out = str(tmp_path / "out")
    stats = build_crawl(str(tmp_path / "binary.parquet"), crawl_config(max_caption_chars=100), out)

    dropped = {"caption_null": 1, "caption_empty": 2, "caption_not_utf8": 1, "caption_too_long": 1}
    assert stats["totals"] == {"input": 8, "kept": 3, "dropped": dropped, "shards": 1}
    assert stats["stages"]["caption"] == {"in": 8, "out": 3, "dropped": dropped}
    assert stats["stages"]["fetch"]["in"] == 3
    fetched = {u for u in urls if http_server.hits[urlsplit(u).path]}
    assert fetched == {urls[0], urls[1], urls[7]}
    for fmt in ("webdataset", "parquet"):
        samples = [s for u in shards.shard_files(out, fmt) for s in shards.read_shard_samples(u)]
        assert [s["txt"] for s in samples] == ["a blue circle", "une \u00e9toile verte", "two red squares"]
        assert all(s["json"]["caption"] == s["txt"] for s in samples)
    assert pq.read_table(f"{out}/00000.parquet").schema.field("txt").type == pa.string()


def test_long_captions_truncated_when_configured(ray_local, http_server, tmp_path, crawl_config):
    write_input(http_server, tmp_path / "text.parquet", ["short one", LONG, None], pa.string())
    out = str(tmp_path / "out")
    cfg = crawl_config(max_caption_chars=40, long_captions="truncate")
    stats = build_crawl(str(tmp_path / "text.parquet"), cfg, out)
    assert stats["totals"] == {"input": 3, "kept": 2, "dropped": {"caption_null": 1}, "shards": 1}
    assert stats["counters"]["captions"] == {"truncated": 1}
    samples = [s for u in shards.shard_files(out) for s in shards.read_shard_samples(u)]
    assert [s["txt"] for s in samples] == ["short one", LONG[:40]]
