"""The crawl graph on Ray Data: every input record accounted for, shards in the contract's layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import shards
from pipelines.build_wit import BuildWITConfig
from pipelines.config import load_config
from pipelines.crawl import key_stats
from pipelines.crawl.build import build_crawl
from pipelines.crawl.plan import Layout
from pipelines.crawl.testsite import build_site


def write_url_table(site, path) -> str:
    pq.write_table(
        pa.Table.from_pylist([{k: r[k] for k in ("url", "caption", "query")} for r in site.rows]), path
    )
    return str(path)


@pytest.fixture(scope="module")
def built(ray_local, http_server, tmp_path_factory, crawl_config):
    tmp = tmp_path_factory.mktemp("crawl_build")
    site = build_site(http_server, "buildsite", slow_s=2.0)
    urls = write_url_table(site, tmp / "urls.parquet")
    stats = build_crawl(urls, crawl_config(), str(tmp / "out"))
    return site, stats, str(tmp / "out")


def test_every_record_is_accounted_for(built):
    site, stats, out = built
    totals = stats["totals"]
    assert totals["input"] == len(site.rows)
    assert totals["kept"] + sum(totals["dropped"].values()) == totals["input"]
    want: dict[str, int] = {}
    for reason in site.expected.values():
        if reason:
            want[reason] = want.get(reason, 0) + 1
    assert totals["dropped"] == want
    assert totals["kept"] == sum(1 for r in site.expected.values() if r is None)
    on_disk = json.loads(Path(f"{out}/_stats.json").read_text())
    assert on_disk["totals"] == totals
    stages = on_disk["stages"]
    assert stages["fetch"]["in"] == len(site.rows) and stages["dedupe"]["out"] == totals["kept"]
    assert stages["dedupe"]["dropped"] == {"duplicate": 1}
    assert on_disk["counters"]["bytes"]["downloaded"] > 0 and on_disk["run"]["samples_per_s"] > 0
    # Counts per domain and per query are Parquet tables beside _stats.json, which keeps their top rows.
    domains = {r["domain"]: r for r in key_stats.read_table(out, "domains").to_pylist()}
    assert domains["127.0.0.1"]["input"] == len(site.rows) - 3
    assert sum(r["kept"] for r in domains.values()) == totals["kept"]
    assert all(r["kept"] + r["dropped"] == r["input"] for r in domains.values())
    assert sum(r["duplicate"] for r in domains.values()) == 1
    queries = {r["query"]: r for r in key_stats.read_table(out, "queries").to_pylist()}
    assert queries["png"]["kept"] == 2 and sum(r["input"] for r in queries.values()) == totals["input"]
    assert on_disk["domains"]["keys"] == len(domains) and on_disk["queries"]["keys"] == len(queries)
    assert on_disk["domains"]["top_input"][0] == domains["127.0.0.1"]
    assert on_disk["queries"]["top_kept"][0]["kept"] == max(r["kept"] for r in queries.values())
    for manifest in shards.committed_shards(out).values():  # stage totals only, nothing per key
        assert set(manifest["stats"]["funnel"]["counters"]) == {"bytes", "captions"}


def test_shards_follow_the_contract(built, crawl_config):
    site, stats, out = built
    layout = Layout(len(site.rows), crawl_config().samples_per_shard)
    manifests = shards.committed_shards(out)
    assert sorted(manifests) == [layout.shard_name(g) for g in range(layout.num_shards)]
    kept_urls = {u for u, r in site.expected.items() if r is None}
    seen_urls = set()
    for name in sorted(manifests):
        tar = list(shards.read_shard_samples(f"{out}/{name}.tar"))
        par = list(shards.read_shard_samples(f"{out}/{name}.parquet"))
        assert [s["key"] for s in tar] == [s["key"] for s in par] and len(tar) == manifests[name]["count"]
        for s in tar:
            meta = s["json"]
            assert s["key"] == layout.key(meta["ordinal"]) and s["key"].startswith(name)
            assert s["txt"] == meta["caption"] and meta["url"] in kept_urls
            for k in (
                "url",
                "caption",
                "query",
                "width",
                "height",
                "original_width",
                "original_height",
                "sha256",
            ):
                assert k in meta
            assert Image.open(io.BytesIO(s["jpg"])).size == (meta["width"], meta["height"])
            seen_urls.add(meta["url"])
        columns = pq.read_table(f"{out}/{name}.parquet").column_names
        assert {"key", "jpg", "txt", "url", "sha256"} <= set(columns)
    assert seen_urls == kept_urls


def test_wit_config_and_custom_resources_are_declared(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("output: s3://bucket/wit\nurls: x.parquet\ncrawl:\n  worker_resources: {crawl: 1}\n")
    cfg = load_config(BuildWITConfig, str(path), ["crawl.fetch.per_host_rate=2", "formats=[parquet]"])
    assert cfg.crawl.worker_resources == {"crawl": 1} and cfg.crawl.fetch.per_host_rate == 2.0
    assert cfg.formats == ["parquet"]
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="per_host_rat"):
        load_config(BuildWITConfig, None, ["crawl.fetch.per_host_rat=2"])


def test_demo_config_loads():
    cfg = load_config(BuildWITConfig, str(Path(__file__).resolve().parents[1] / "configs/wit_demo.yaml"))
    assert cfg.crawl.crawler == "ray" and cfg.output and cfg.curation.output


def test_shard_workers_declare_resources(ray_local, crawl_config):
    from pipelines.crawl.dispatch import ShardPool, worker_count

    cfg = crawl_config(worker_resources={"crawl": 1}, num_cpus_per_worker=0.25, shards_per_worker=3)
    pool = ShardPool(cfg, (), num_workers=1)
    assert pool.options["num_cpus"] == 0.25 and pool.options["resources"] == {"crawl": 1}
    assert pool.options["max_concurrency"] == 3 + 2
    assert worker_count(crawl_config(num_workers=4, shards_per_worker=1), num_shards=5) == 4
    assert worker_count(crawl_config(num_workers=4, shards_per_worker=4), num_shards=5) == 2  # no idle ones


def test_a_ray_data_step_runs_again_when_a_node_is_lost():
    import ray

    from pipelines.crawl.build import caused_by_node_loss, rerun_on_node_loss

    calls = []

    def step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("dataset failed") from ray.exceptions.ActorDiedError()
        return "done"

    assert rerun_on_node_loss(step, "dedupe") == "done" and len(calls) == 2
    assert not caused_by_node_loss(ValueError("a bug is not a lost node"))
    with pytest.raises(ValueError):
        rerun_on_node_loss(lambda: (_ for _ in ()).throw(ValueError("bug")), "plan")
