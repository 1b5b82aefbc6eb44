"""A retried task changes nothing, end to end: `build_wit` (curation inputs -> curated pairs -> crawl ->
shards) with a curation filter task, a curation match task and two crawl shard tasks each failing once gives
the `_stats.json`, the per-query counts, the curated pairs and every published byte of a build without
faults."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import _crawl_config as crawl_config  # shared builders (tests/ is on sys.path under pytest)
from conftest import dataset_state

from pipelines import faults
from pipelines.build_wit import BuildWITConfig, build_wit
from pipelines.crawl.testsite import rendered_images
from pipelines.wit.curate import CurationConfig


def write_inputs(http_server, folder) -> tuple[str, str]:
    """One candidate file (so each curation stage gets one batch) of loopback image URLs: dog and cat
    captions, repeated pairs, a URL that 404s, a caption in French and one that matches no query; 10
    images behind 30 URLs, so the crawl drops content duplicates inside and across shards."""
    folder.mkdir()
    queries = folder / "queries.parquet"
    pq.write_table(
        pa.table({"query": ["dog", "cat"], "source": ["unigram"] * 2, "score": [1.0] * 2}), queries
    )
    images = rendered_images(10, seed=3, size=48)
    rows = [
        (
            http_server.put_file(f"faults/{i}.jpg", images[i % 10][0]),
            f"A happy {'cat' if i % 3 == 0 else 'dog'} playing in the green park",
        )
        for i in range(30)
    ]
    rows += rows[:4] + [
        (http_server.url("faults/missing.jpg"), "A sleepy dog lying on the warm sofa"),
        (http_server.url("faults/fr.jpg"), "Un chien heureux qui joue dans le parc vert"),
        (http_server.url("faults/table.jpg"), "A wooden table with four chairs in the kitchen"),
    ]
    (folder / "inputs").mkdir()
    pq.write_table(
        pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}),
        folder / "inputs" / "part-0.parquet",
    )
    return str(folder / "inputs"), str(queries)


def build_config(inputs: str, queries: str, folder) -> BuildWITConfig:
    curation = CurationConfig(
        inputs=[inputs], queries=queries, output=str(folder / "curated"), max_per_query=8, batch_rows=1000
    )
    # 4 shards on 2 workers, 2 shards each at once: the retried shard runs beside others.
    crawl = crawl_config(samples_per_shard=4, num_workers=2, shards_per_worker=2)
    return BuildWITConfig(output=str(folder / "out"), curation=curation, crawl=crawl)


def comparable(out: str) -> dict:
    """Every published byte and `_stats.json` without its timing (the crawl's `run`, the curation's)."""
    state = dataset_state(out)
    for key in ("seconds", "candidates_per_second"):
        state["_stats.json"]["curation"].pop(key)
    return state


def test_faults_in_curation_and_crawl_change_nothing(ray_local, http_server, tmp_path):
    inputs, queries = write_inputs(http_server, tmp_path / "inputs")
    clean_cfg = build_config(inputs, queries, tmp_path / "clean")
    clean = build_wit(clean_cfg)
    counts = clean["curation"]["counters"]["query_counts_after"]
    assert counts == {"dog": 8, "cat": 8}  # the cap bites (dog 20, cat 10 before it)
    assert clean["curation"]["stages"]["dedupe"]["dropped"] == {"duplicate_pair": 4}
    assert clean["totals"]["input"] == 16 and clean["totals"]["shards"] == 4
    assert clean["totals"]["dropped"]["duplicate"] >= 3  # content duplicates: the crawl's dedupe has work

    marks = tmp_path / "faults"
    env = {
        faults.ENV_FAULTS: "curate_filter:*,curate_match:*,crawl_shard:00001,crawl_shard:00002",
        faults.ENV_DIR: str(marks),
    }
    # Ray workers take the switch from the job's environment: run the job in a task that sets it (its
    # Ray Data tasks and shard workers inherit it).
    faulty_cfg = build_config(inputs, queries, tmp_path / "faulty")
    job = ray_local.remote(num_cpus=0, runtime_env={"env_vars": env})(build_wit)
    faulty = ray_local.get(job.remote(faulty_cfg))
    assert len(list(marks.iterdir())) == 4  # each fault fired once (then the retry passed)

    assert faulty["curation"]["stages"] == clean["curation"]["stages"]
    assert faulty["curation"]["counters"] == clean["curation"]["counters"]
    assert pq.read_table(faulty_cfg.curation.output).sort_by("url") == pq.read_table(
        clean_cfg.curation.output
    ).sort_by("url")
    assert comparable(faulty_cfg.output) == comparable(clean_cfg.output)
