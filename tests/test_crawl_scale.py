"""The shard is the unit of work: same dataset whatever the workers, their finish order, or a host that
pushed back until a retry pass; empty input and missing input are not crashes. (A retried shard task:
tests/test_build_faults.py, end to end with a retried curation task.)"""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import _crawl_config as crawl_config  # shared builders (tests/ is on sys.path under pytest)
from conftest import dataset_state

from pipelines import shards, storage
from pipelines.crawl.build import build_crawl
from pipelines.crawl.shard import read_rows
from pipelines.crawl.testsite import rendered_images, send, slow

PER_SHARD = 4


def write_urls(rows: list[dict], path: Path) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture(scope="module")
def ordered_site(http_server, tmp_path_factory) -> str:
    """40 URLs (10 shards) over 22 distinct images, so duplicates fall inside and across shards, a few
    404s; shard 0's images answer slowly, so with several workers it finishes last."""
    images = rendered_images(22, seed=11, size=48)
    rows = []
    for i in range(40):
        data = images[(i * 7) % 22][0]
        if i % 13 == 6:
            url = http_server.url(f"order/missing{i}.jpg")
        elif i < PER_SHARD:
            url = http_server.route(f"order/slow{i}.jpg", slow(1.5, data))
        else:
            url = http_server.put_file(f"order/img{i}.jpg", data)
        rows.append({"url": url, "caption": f"caption {i}", "query": f"q{i % 5}"})
    return write_urls(rows, tmp_path_factory.mktemp("order") / "urls.parquet")


@pytest.fixture(scope="module")
def one_worker(ray_local, ordered_site, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("one") / "out")
    cfg = crawl_config(samples_per_shard=PER_SHARD, num_workers=1, shards_per_worker=1)
    return out, build_crawl(ordered_site, cfg, out)


def test_worker_count_and_finish_order_do_not_change_the_dataset(one_worker, ordered_site, tmp_path):
    out1, stats1 = one_worker
    out4 = str(tmp_path / "four")
    cfg = crawl_config(
        samples_per_shard=PER_SHARD, num_workers=4, shards_per_worker=1, num_cpus_per_worker=0.5
    )
    stats4 = build_crawl(ordered_site, cfg, out4)
    assert stats1["totals"]["dropped"]["duplicate"] >= 10  # duplicates inside and across shards
    assert stats4["totals"] == stats1["totals"] and stats4["counters"] == stats1["counters"]
    assert dataset_state(out4) == dataset_state(out1)
    keys = [s["key"] for u in shards.shard_files(out4) for s in shards.read_shard_samples(u)]
    hashes = [s["json"]["sha256"] for u in shards.shard_files(out4) for s in shards.read_shard_samples(u)]
    assert len(keys) == len(set(keys)) == len(set(hashes)) == stats1["totals"]["kept"]
    index = pq.read_table(f"{out4}/_index.parquet")
    assert index.schema.names == [
        "shard",
        "num_samples",
        "tar_bytes",
        "parquet_bytes",
        "tar_path",
        "parquet_path",
    ]
    assert index.column("tar_path").to_pylist() == [
        f"{name}.tar" for name in index.column("shard").to_pylist()
    ]
    assert sum(index.column("num_samples").to_pylist()) == len(keys) and index.num_rows == 10


class PushBack:
    """A host that answers `429 Retry-After: 3600` until it recovers."""

    def __init__(self, body: bytes):
        self.body, self.down, self.hits = body, True, 0
        self.lock = threading.Lock()

    def __call__(self, request) -> None:
        with self.lock:
            self.hits += 1
        if self.down:
            send(request, 429, b"slow down", "text/plain", {"Retry-After": "3600"})
        else:
            send(request, 200, self.body)


def test_retry_pass_fetches_a_host_that_pushed_back(ray_local, http_server, tmp_path):
    from conftest import LoopbackHTTPServer

    other = LoopbackHTTPServer(tmp_path / "www2")
    try:
        images = rendered_images(10, seed=5, size=48)
        rows, handlers = [], []
        for i in range(16):
            data = images[i % 10][0]  # 6 images repeat: the copy behind the 429 comes first
            if i in (1, 5, 9):
                handlers.append(PushBack(data))
                url = other.route(f"pushback/{i}.jpg", handlers[-1])
            else:
                url = http_server.put_file(f"pushback/{i}.jpg", data)
            rows.append({"url": url, "caption": f"c{i}", "query": "q"})
        urls = write_urls(rows, tmp_path / "urls.parquet")
        cfg = crawl_config(samples_per_shard=PER_SHARD, num_workers=1, shards_per_worker=2)
        cfg.fetch.max_retries, cfg.fetch.max_retry_after_s = 0, 0.1
        out = str(tmp_path / "out")

        first = build_crawl(urls, cfg, out)
        # images 1 and 5 come back later (rows 11, 15) from the other host; image 9 only behind the 429
        # The first 429 (Retry-After far above max_retry_after_s) defers that host: its other URLs are
        # not requested at all in this pass (host_deferred), the first one is recorded as http_429.
        dropped = first["totals"]["dropped"]
        assert dropped.get("http_429", 0) + dropped.get("host_deferred", 0) == 3 and dropped["duplicate"] == 4
        assert first["totals"]["kept"] == 9
        failed = [r for name in ("00000", "00001", "00002") for r in read_rows(out, name).to_pylist()
                  if r["status"] in ("http_429", "host_deferred")]  # fmt: skip
        assert sorted(r["ordinal"] for r in failed) == [1, 5, 9]
        first_hits = [h.hits for h in handlers]
        assert 1 <= sum(first_hits) <= 2 and all(n <= 1 for n in first_hits)

        for h in handlers:
            h.down = False
        cfg.retry_failed = True
        retried = build_crawl(urls, cfg, out)
        assert retried["run"]["shards_written"] == 0 and retried["run"]["shards_retried"] == 3
        assert [h.hits for h in handlers] == [n + 1 for n in first_hits]  # each fetched once more
        clean_out = str(tmp_path / "clean")
        clean = build_crawl(urls, crawl_config(samples_per_shard=PER_SHARD, num_workers=1), clean_out)
        assert clean["totals"]["dropped"] == {"duplicate": 6} and clean["totals"]["kept"] == 10
        assert retried["totals"] == clean["totals"] and retried["run"]["shards_compacted"] >= 1
        assert dataset_state(out) == dataset_state(clean_out)
    finally:
        other.close()


def test_empty_input_is_an_empty_dataset_with_stats(ray_local, tmp_path):
    urls = str(tmp_path / "urls.parquet")
    pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), urls)
    out = str(tmp_path / "out")
    stats = build_crawl(urls, crawl_config(), out)
    assert stats["totals"] == {"input": 0, "kept": 0, "dropped": {}, "shards": 0}
    assert storage.read_json(f"{out}/_stats.json")["totals"] == stats["totals"]
    assert pq.read_table(f"{out}/_index.parquet").num_rows == 0
    from pipelines.fingerprint import StaleOutput

    with pytest.raises(StaleOutput, match="samples_per_shard.*redo=true"):  # the plan is not reused blindly
        build_crawl(urls, crawl_config(samples_per_shard=5), out)


def test_empty_curation_result_is_an_empty_dataset(ray_local, tmp_path, monkeypatch):
    import pipelines.build_wit as build_wit_module
    from pipelines.build_wit import BuildWITConfig, build_wit

    def curate_nothing(cfg):
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        return {"stages": {"match": {"in": 3, "out": 0, "dropped": {"no_query": 3}}}}

    monkeypatch.setattr(build_wit_module, "curate_or_reuse", curate_nothing)
    cfg = BuildWITConfig(output=str(tmp_path / "out"), crawl=crawl_config())
    cfg.curation.output = str(tmp_path / "curated")
    stats = build_wit(cfg)
    assert stats["totals"]["input"] == 0 and stats["curation"]["stages"]["match"]["out"] == 0
    assert storage.exists(f"{cfg.output}/_index.parquet")


def test_missing_input_is_named_in_one_line(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from build_wit import main

    with pytest.raises(SystemExit) as exit_info:
        main([f"urls={tmp_path}/nope.parquet", f"output={tmp_path}/out"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{tmp_path}/nope.parquet" in err


def test_an_input_without_url_or_caption_is_refused_before_any_plan(ray_local, tmp_path):
    """Checked from a Parquet file's footer (planned in place) and from a CSV's schema (rewritten)."""
    from pipelines.crawl.build import InputError, ensure_plan

    write_urls([{"url": "http://127.0.0.1/a.jpg", "text": "no caption column"}], tmp_path / "in.parquet")
    (tmp_path / "in.csv").write_text("link,caption\nhttp://127.0.0.1/a.jpg,a cat\n")
    for name, missing in (("in.parquet", "['caption']"), ("in.csv", "['url']")):
        with pytest.raises(InputError, match=re.escape(f"missing {missing}")):
            ensure_plan(str(tmp_path / name), crawl_config(), str(tmp_path / name) + ".out", dict)
        assert not (tmp_path / (name + ".out") / "_plan" / "_plan.json").exists()


def test_a_shard_reads_only_its_rows_from_the_plan(tmp_path):
    from pipelines.crawl.plan import Plan, _part_bytes, read_pieces

    sizes, first, parts = [5, 1, 9, 3], 0, []
    for i, n in enumerate(sizes):
        table = pa.table({"url": [f"u{first + j}" for j in range(n)], "caption": ["c"] * n})
        (tmp_path / f"p{i}.parquet").write_bytes(_part_bytes(table, first, 3))
        parts.append((f"p{i}.parquet", first, n))
        first += n
    plan = Plan(str(tmp_path), 3, first, parts)
    assert plan.layout.num_shards == 6 and plan.pieces(1) == [(str(tmp_path / "p0.parquet"), 3, 2),
                                                              (str(tmp_path / "p1.parquet"), 0, 1)]  # fmt: skip
    for shard in range(plan.layout.num_shards):
        rows = read_pieces(plan.pieces(shard), 3 * shard, 3)
        expected = list(range(3 * shard, min(3 * shard + 3, first)))
        assert rows.column("url").to_pylist() == [f"u{o}" for o in expected]
        assert rows.column("ordinal").to_pylist() == expected and set(rows.column("shard").to_pylist()) == {
            shard
        }


def test_a_parquet_input_is_its_own_plan(tmp_path, monkeypatch):
    """Input files with uneven row groups (and an empty one, and a _SUCCESS marker) are planned from their
    footers alone: no copy of the input; each shard reads its rows in input order, numbered."""
    from pipelines.crawl import plan as plan_mod

    folder, first = tmp_path / "in", 0
    folder.mkdir()
    for i, (n, group) in enumerate([(7, 2), (0, 1), (11, 5), (4, 4)]):
        urls = [f"u{first + j}" for j in range(n)]
        table = pa.table(
            {
                "url": pa.array(urls, pa.string()),
                "caption": pa.array(["c"] * n, pa.string()),
                "ordinal": pa.array([-1] * n, pa.int64()),
            }
        )  # fmt: skip  (a stale column: replaced)
        pq.write_table(table, folder / f"part{i}.parquet", row_group_size=group)
        first += n
    (folder / "_SUCCESS").write_bytes(b"")
    files = plan_mod.parquet_inputs(str(folder))
    assert files == [str(folder / f"part{i}.parquet") for i in range(4)]
    plan = plan_mod.direct_plan(files, str(tmp_path / "out"), 3, {"sha256": "x"})
    assert plan.num_input == 22 and not list((tmp_path / "out" / "_plan").glob("part-*"))
    assert plan_mod.Plan.load(plan.uri).parts == plan.parts  # committed, reloadable
    for shard in range(plan.layout.num_shards):
        rows = plan_mod.read_pieces(plan.pieces(shard), 3 * shard, 3)
        expected = list(range(3 * shard, min(3 * shard + 3, 22)))
        assert rows.column("url").to_pylist() == [f"u{o}" for o in expected]
        assert rows.column("ordinal").to_pylist() == expected
    # Row groups too large for a shard to read cheaply, or a non-Parquet file: the input is rewritten.
    monkeypatch.setattr(plan_mod, "DIRECT_MAX_GROUP_ROWS", 4)
    assert plan_mod.direct_plan(files, str(tmp_path / "out2"), 3, {"sha256": "x"}) is None
    (folder / "more.csv").write_text("url,caption\n")
    assert plan_mod.parquet_inputs(str(folder)) is None


def test_dedupe_in_one_task_equals_the_shuffled_dedupe(ray_local, ordered_site, one_worker, tmp_path):
    """Dedupe of a small build (one task) and of a large one (Ray Data hash shuffle, forced here with
    two rows per partition) compact the same shards into the same bytes as deduping while committing."""
    from pipelines.crawl.dedupe import dedupe_and_compact
    from pipelines.crawl.plan import Layout

    out1, _ = one_worker
    cfg = crawl_config(samples_per_shard=PER_SHARD, num_workers=1, shards_per_worker=1, dedupe=False)
    raw = str(tmp_path / "raw")
    build_crawl(ordered_site, cfg, raw)
    layout = Layout(40, PER_SHARD)
    rewritten = {}
    for name, rows_per_partition in (("one_task", 10**9), ("shuffled", 2)):
        out = tmp_path / name
        shutil.copytree(raw, out)
        rewritten[name] = dedupe_and_compact(str(out), layout, ["webdataset", "parquet"], rows_per_partition)
        state = dataset_state(str(out))
        expected = dataset_state(out1)
        assert {k: v for k, v in state.items() if k.endswith((".tar", ".parquet")) and "_" not in k} == {
            k: v for k, v in expected.items() if k.endswith((".tar", ".parquet")) and "_" not in k
        }
    assert rewritten["one_task"] == rewritten["shuffled"] > 0
