"""The crawl reads its input from S3 and writes its shards, manifests and _stats.json there (moto_server on
loopback), and resumes there."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import shards, storage
from pipelines.crawl.build import build_crawl
from pipelines.crawl.testsite import rendered_images


def test_crawl_to_s3_and_resume(ray_local, s3_server, http_server, tmp_path, crawl_config):
    bucket = s3_server.make_bucket("crawl-test")
    images = rendered_images(10, seed=3, size=64)
    rows = [{"url": http_server.put_file(f"s3site/{i}.{ext}", data), "caption": caption, "query": ext}
            for i, (data, ext, caption) in enumerate(images)]  # fmt: skip
    rows.append({"url": http_server.url("s3site/missing.jpg"), "caption": "gone", "query": "jpg"})
    urls = f"{bucket}/in"  # a folder of two Parquet files: the plan reads their footers on S3
    for i, part in enumerate((rows[:4], rows[4:])):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part), buf)
        storage.write_bytes_atomic(f"{urls}/part-{i}.parquet", buf.getvalue())
    out = f"{bucket}/wit/v1"

    first = build_crawl(urls, crawl_config(), out, formats=["webdataset"])
    assert first["totals"] == {"input": 11, "kept": 10, "dropped": {"http_404": 1}, "shards": 2}
    listed = {u.rsplit("/", 1)[1] for u in storage.list_files(out)}
    assert {"00000.tar", "00001.tar", "00000.manifest.json", "00001.manifest.json", "_stats.json"} <= listed
    samples = [s for u in shards.shard_files(out) for s in shards.read_shard_samples(u)]
    assert sorted(s["json"]["url"] for s in samples) == sorted(r["url"] for r in rows[:10])
    assert storage.read_json(f"{out}/_stats.json")["totals"] == first["totals"]
    assert [p[0] for p in storage.read_json(f"{out}/_plan/_plan.json")["parts"]] == [
        f"{urls}/part-0.parquet", f"{urls}/part-1.parquet"
    ]  # fmt: skip

    # as if the job died before committing shard 1 (so before the index, the build's last write)
    storage.delete(f"{out}/00001.manifest.json")
    storage.delete(f"{out}/_index.parquet")
    again = build_crawl(urls, crawl_config(), out, formats=["webdataset"])
    assert again["run"]["shards_written"] == 1 and again["run"]["shards_skipped"] == 1
    assert again["totals"] == first["totals"]
