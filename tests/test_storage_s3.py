"""Storage at scale, counted on the wire: every S3 request of a shard write and of a reader goes through a
counting proxy on loopback in front of moto_server. A shard is one PUT per object (no copy, no delete,
no multipart), its manifest last; readers of a finished dataset take the shard list from `_index.parquet`
and list nothing."""

from __future__ import annotations

import http.client
import http.server
import io
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import datasets, shards, storage
from pipelines.crawl import aggregate
from pipelines.crawl import shard as shard_files
from pipelines.crawl.plan import Layout
from pipelines.synthetic import synthetic_shard_samples

HOP_HEADERS = ("expect", "transfer-encoding", "connection", "content-length")


class CountingProxy:
    """Forwards every request to `upstream` and records (method, path, query, copy source)."""

    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.requests: list[tuple[str, str, str, str | None]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self._body()
                path, _, query = self.path.partition("?")
                proxy.requests.append((self.command, path, query, self.headers.get("x-amz-copy-source")))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                length = reply.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()  # the empty trailer
                return b"".join(chunks)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def take(self) -> list[tuple[str, str, str, str | None]]:
        out, self.requests = self.requests, []
        return out


@pytest.fixture
def proxy(s3_server, monkeypatch) -> Iterator[CountingProxy]:
    proxy = CountingProxy(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)  # storage reads it at each call
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.httpd.shutdown()
    proxy.httpd.server_close()


def test_a_shard_is_one_put_per_object_and_readers_list_nothing(ray_local, s3_server, proxy):
    bucket = s3_server.make_bucket("one-put")
    out = f"{bucket}/wit"
    layout = Layout(num_input=6, samples_per_shard=3)
    samples = list(synthetic_shard_samples(6, seed=2, size=32))
    proxy.take()
    for g in range(layout.num_shards):
        part = [dict(s, key=layout.key(g * 3 + i)) for i, s in enumerate(samples[g * 3 : g * 3 + 3])]
        for i, s in enumerate(part):
            s["json"] = dict(s["json"], ordinal=g * 3 + i)
        rows = pa.table(
            {
                "ordinal": [g * 3 + i for i in range(3)],
                "status": pa.array([None] * 3, pa.string()),
                "sha256": [s["json"].get("sha256", str(i)) for i, s in enumerate(part)],
                "query": ["q"] * 3,
                "domain": ["example.org"] * 3,
                "download_bytes": [len(s["jpg"]) for s in part],
                "jpg_bytes": [len(s["jpg"]) for s in part],
                "caption_truncated": [False] * 3,
            },
            schema=shard_files.ROWS_SCHEMA,
        )
        shard_files.commit(out, layout.shard_name(g), part, rows, set(), ["webdataset", "parquet"])

        writes = proxy.take()
        name = layout.shard_name(g)
        key = f"/one-put/wit/{name}"
        assert writes == [
            ("PUT", f"{key}.tar", "", None),
            ("PUT", f"{key}.parquet", "", None),
            ("PUT", f"/one-put/wit/_rows/{name}.parquet", "", None),
            ("PUT", f"{key}.manifest.json", "", None),  # the commit, last
        ], writes

    _, index, _ = aggregate.summarise(out)  # Ray tasks (they talk to moto directly)
    aggregate.write_index(out, index)
    assert index.column("tar_path").to_pylist() == ["00000.tar", "00001.tar"]
    proxy.take()
    found = datasets.resolve(out)
    assert [(s.name, s.num_samples) for s in found] == [("00000", 3), ("00001", 3)]
    assert shards.committed_names(out) == {"00000", "00001"}
    reads = proxy.take()
    listings = [r for r in reads if (r[0] == "GET" and "list-type" in r[2]) or r[1].count("/") < 2]
    assert not listings, reads
    assert all(r[1].endswith(aggregate.INDEX_FILE) for r in reads), reads
    assert [s["key"] for s in shards.read_shard_samples(found[1].uri)] == ["000010", "000011", "000012"]
    assert storage.read_json(f"{out}/00001.manifest.json")["count"] == 3


def test_an_object_above_one_part_is_one_multipart_upload_never_copied(s3_server, proxy):
    bucket = s3_server.make_bucket("big-put")
    data = bytes(range(256)) * (12 * 4096)  # 12 MiB: more than one of pyarrow's upload parts
    proxy.take()
    storage.write_bytes_atomic(f"{bucket}/wit/00000.tar", data)
    writes = proxy.take()
    # create, two parts (uploaded in the background, in either order), complete: the object appears whole
    assert (writes[0][0], writes[0][2]) == ("POST", "uploads") and writes[-1][0] == "POST", writes
    assert writes[-1][2].startswith("uploadId=") and len(writes) == 4, writes
    assert all(m == "PUT" and q.startswith("partNumber=") for m, _, q, _ in writes[1:3]), writes
    assert {p for _, p, _, _ in writes} == {"/big-put/wit/00000.tar"}  # no temporary key, no copy
    assert all(copy is None for *_, copy in writes) and not any(m == "DELETE" for m, *_ in writes)
    assert storage.read_bytes(f"{bucket}/wit/00000.tar") == data


def test_a_build_with_prefix_folders_is_read_through_its_index(
    ray_local, s3_server, http_server, crawl_config
):
    """`crawl.shard_prefix_chars=2`: shard files under hash-prefix folders, deduped across shards (the
    compaction finds them through the manifests), located by `_index.parquet` for every reader."""
    from pipelines.crawl.build import build_crawl
    from pipelines.crawl.testsite import rendered_images

    bucket = s3_server.make_bucket("prefixed")
    images = rendered_images(9, seed=5, size=64)
    rows = [{"url": http_server.put_file(f"prefixed/{i}.{ext}", data), "caption": caption}
            for i, (data, ext, caption) in enumerate(images)]  # fmt: skip
    rows.append({"url": http_server.put_file("prefixed/copy.jpg", images[0][0]), "caption": "a copy"})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes_atomic(f"{bucket}/urls.parquet", buf.getvalue())
    out = f"{bucket}/wit"
    stats = build_crawl(
        f"{bucket}/urls.parquet", crawl_config(samples_per_shard=4, shard_prefix_chars=2), out
    )
    assert stats["totals"] == {"input": 10, "kept": 9, "dropped": {"duplicate": 1}, "shards": 3}

    top = {u.rsplit("/", 1)[1] for u in storage.list_files(out)}
    assert not any(n.endswith((".tar", ".parquet")) and n != "_index.parquet" for n in top), top
    index = datasets.read_index(out)
    for name, row in index.items():
        assert (
            row["tar_path"] == f"{shards.shard_dir(name, 2)}/{name}.tar"
            and len(shards.shard_dir(name, 2)) == 2
        )
    found = datasets.resolve(out)
    assert [s.num_samples for s in found] == [4, 4, 1]  # the copy (last row, shard 2) left out
    assert all(s.uri == f"{out}/{index[s.name]['tar_path']}" for s in found)
    samples = [s for u in shards.shard_files(out) for s in shards.read_shard_samples(u)]
    assert sorted(s["json"]["url"] for s in samples) == sorted(r["url"] for r in rows[:9])
