"""The shared pieces: config loading, the funnel, storage (local and loopback S3), shards, synthetic data."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import shards, storage, synthetic
from pipelines.config import ConfigError, config_to_dict, load_config, parse_args
from pipelines.stats import Funnel, drop_counts


@dataclass
class Inner:
    size: int = 3
    ratio: float = 0.5
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Outer:
    name: str = "run"
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner:\n  size: 7\n")
    cfg = load_config(Outer, path, ["inner.ratio=2", "flag=true", "inner.names=[b, c]", "maybe=4"])
    assert cfg == Outer(name="x", flag=True, inner=Inner(size=7, ratio=2.0, names=["b", "c"]), maybe=4)
    assert config_to_dict(cfg)["inner"]["names"] == ["b", "c"]
    assert parse_args(Outer, ["--config", str(path), "--set", "inner.size=9", "name=y"]).inner.size == 9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inner.sise=1"], "'inner.sise'"),
        (["colour=red"], "'colour'"),
        (["inner.size=big"], "inner.size: expected int"),
        (["flag=3"], "flag: expected true/false"),
        (["inner=5"], "expected a mapping"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_config_unknown_key_in_file_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  szie: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, path)
    assert "'inner.szie'" in str(e.value) and "size" in str(e.value)
    with pytest.raises(SystemExit):
        parse_args(Outer, ["--config", str(path)])


def test_funnel_accounts_for_every_record():
    funnel = Funnel()
    funnel.record("filter", 10, 7, drop_counts([None, "lang", "lang", None, "short"]))
    funnel.count("per_query", "dog", 2)
    other = Funnel()
    other.record("filter", 5, 5)
    other.add_counts("per_query", {"dog": 1, "cat": 4})
    funnel.merge(other)
    data = Funnel.from_dict(json.loads(json.dumps(funnel.to_dict()))).to_dict()
    assert data["stages"]["filter"] == {"in": 15, "out": 12, "dropped": {"lang": 2, "short": 1}}
    assert data["counters"]["per_query"] == {"dog": 3, "cat": 4}
    funnel.check()
    funnel.record("crawl", 3, 1, {"404": 1})
    with pytest.raises(AssertionError, match="crawl"):
        funnel.check()


def _samples(n: int, seed: int = 0) -> list[dict]:
    return list(synthetic.synthetic_shard_samples(n, seed=seed, size=32))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_shards_round_trip(where, tmp_path, s3_server):
    out = str(tmp_path / "ds") if where == "local" else storage.join(s3_server.make_bucket("shards"), "ds")
    samples = _samples(7)
    manifests = shards.write_dataset(samples, out, samples_per_shard=3)
    assert [m["count"] for m in manifests] == [3, 3, 1]
    committed = shards.committed_shards(out)
    assert sorted(committed) == ["00000", "00001", "00002"]
    for fmt in shards.FORMATS:
        read = [s for uri in shards.shard_files(out, fmt) for s in shards.read_shard_samples(uri)]
        assert [s["key"] for s in read] == [s["key"] for s in samples]
        assert read[4]["jpg"] == samples[4]["jpg"] and read[4]["txt"] == samples[4]["txt"]
        assert read[4]["json"] == samples[4]["json"]
    # No temporary files are left behind, only data files and manifests.
    names = [u.rsplit("/", 1)[-1] for u in storage.list_files(out)]
    assert not [n for n in names if ".tmp-" in n] and len(names) == 9


def test_tar_layout_is_webdataset_and_deterministic(tmp_path):
    samples = _samples(2)
    data = shards.tar_bytes(samples)
    assert data == shards.tar_bytes(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    k = samples[0]["key"]
    assert names[:3] == [f"{k}.jpg", f"{k}.txt", f"{k}.json"]
    table = pq.read_table(io.BytesIO(shards.parquet_bytes(samples)))
    for column in ("key", "jpg", "txt", *shards.META_COLUMNS):
        assert column in table.column_names


def test_storage_atomic_json_and_listing(tmp_path, s3_server):
    for base in (str(tmp_path), s3_server.make_bucket("store")):
        uri = storage.join(base, "a", "x.json")
        storage.write_json(uri, {"k": 1})
        assert storage.exists(uri) and storage.read_json(uri) == {"k": 1}
        assert storage.list_files(storage.join(base, "a"), ".json") == [uri]
        assert storage.list_files(storage.join(base, "missing")) == []
        storage.delete(uri)
        assert not storage.exists(uri)


def test_storage_bytes_are_as_stored_and_local_file_copies_s3(tmp_path, s3_server):
    gz = gzip.compress(b"#version: 0.2\na b\n")
    for base in (str(tmp_path), s3_server.make_bucket("bytes")):
        uri = storage.join(base, "merges.txt.gz")
        storage.write_bytes_atomic(uri, gz)
        assert storage.read_bytes(uri) == gz  # not gunzipped on the way
        local = storage.local_file(uri)
        assert Path(local).read_bytes() == gz and (local == uri) == (base == str(tmp_path))


def test_synthetic_is_deterministic_and_labelled():
    a, b = list(synthetic.generate(5, seed=3, size=48)), list(synthetic.generate(5, seed=3, size=48))
    assert [s.caption for s in a] == [s.caption for s in b]
    assert a[0].image.tobytes() == b[0].image.tobytes()
    assert all(s.concept.colour in s.caption.lower() for s in a)
    assert all(s.label == f"{s.concept.colour} {s.concept.shape}" for s in a)
    sample = _samples(1)[0]
    assert sample["json"]["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
    assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
    # Colour is what the picture shows: the shape's pixels are near the named colour.
    red = next(s for s in synthetic.generate(50, seed=1, size=64, variety=False) if s.concept.colour == "red")
    pixels = list(red.image.getdata())
    assert sum(1 for r, g, b in pixels if r > 150 and g < 90 and b < 90) > 100


def test_http_server_routes_and_files(http_server):
    import urllib.request

    url = http_server.put_file("img/a.bin", b"abc")
    assert urllib.request.urlopen(url).read() == b"abc"

    def teapot(req):
        req.send_response(418)
        req.send_header("Content-Length", "0")
        req.end_headers()

    route = http_server.route("/teapot", teapot)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(route)
    assert e.value.code == 418 and http_server.hits["/teapot"] == 1
