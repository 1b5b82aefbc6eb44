"""The whole system on a multi-node cluster whose nodes share nothing but S3: queries -> build -> train -> eval.

A `ray start --head` with 0 CPUs (drivers only, as in cluster/aws.yaml) and two worker nodes with 1 CPU and one
unit of `crawl` each, every node with its own temp dir (so each node's runtime-env agent unpacks the uploaded
working dir on its own) and no PYTHONPATH: workers import the code the job API shipped, not this checkout.
Every input and output is on the moto S3 server on loopback; the only local files are the web the crawl
fetches over HTTP. The test itself plays the user: it uploads the inputs, trains the BPE on the crawled
captions (read back from S3) and picks the checkpoint from S3 listings.

It asserts that the crawl ran on both worker nodes and that the evaluation read its checkpoint from S3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.submit import run_job
from pipelines import shards, storage
from pipelines.demo_corpus import CorpusParams, serve, write_corpus
from pipelines.local_cluster import LocalRayCluster

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "s3://e2e"
# A tiny web: 40 seen colour-shape pairs x 2 images, 1 held-out image per class.
CORPUS = CorpusParams(images_per_concept=2, heldout_per_concept=1, sites=2)


@pytest.fixture(scope="module")
def s3_cluster(s3_server):
    cluster = LocalRayCluster(num_cpus=0, drop_env=["PYTHONPATH"]).start()
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"crawl": 1})
        yield cluster
    finally:
        cluster.stop()


def upload(local: Path, uri: str) -> str:
    """A file, or a folder's files (same relative names), to `uri`; returns `uri`."""
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        target = uri if local.is_file() else storage.join(uri, str(f.relative_to(local)))
        storage.write_bytes_atomic(target, f.read_bytes())
    return uri


def checkpoints(run: str) -> list[str]:
    """The checkpoint folders the trainer wrote under `run` (an s3:// prefix), oldest first."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(run)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    )
    return [storage.join(run, n) for n in names]


def crawl_nodes(dashboard_url: str) -> set[str]:
    """Nodes on which crawl work ran (tasks of the crawl stage's workers), from the cluster's state API."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=dashboard_url, detail=True, limit=10_000, raise_on_missing_output=False)
    return {t.node_id for t in tasks if "crawl" in (t.name or "").lower() and t.node_id}


def test_queries_build_train_eval_on_s3_only(s3_cluster, s3_server, tmp_path):
    from clip_model import Tokenizer

    s3_server.make_bucket("e2e")
    corpus = write_corpus(tmp_path / "corpus", CORPUS)
    inputs = f"{BUCKET}/inputs"
    wiki = upload(corpus.wiki_dump, f"{inputs}/wiki/{corpus.wiki_dump.name}")
    pageviews = upload(corpus.pageviews, f"{inputs}/wiki/{corpus.pageviews.name}")
    wordnet = upload(corpus.wordnet, f"{inputs}/wordnet")
    heldout = upload(corpus.label_set("seen", "colour"), f"{inputs}/heldout_colour")
    templates = upload(corpus.templates("colour"), f"{inputs}/templates_colour.txt")
    address = s3_cluster.dashboard_url

    def job(*entrypoint: str) -> str:
        # Tiny data: a few blocks per Ray Data shuffle instead of the default 200 tasks (each a worker start).
        env = {"env_vars": {"RAY_DATA_DEFAULT_MIN_PARALLELISM": "4"}}
        logs = run_job(address, list(entrypoint), ROOT, runtime_env_extra=env, timeout=1200, out=None)
        assert "\x1b" not in logs  # plain job logs (pipelines/progress.py)
        return logs

    with serve(corpus.www) as base_url:
        wat = upload(corpus.write_wat(base_url), f"{inputs}/wat")
        job("python", "jobs/build_queries.py", f"output={BUCKET}/queries", f"wikipedia=[{wiki}]",
            f"pageviews=[{pageviews}]", f"wordnet=[{wordnet}]", "min_word_count=5", "min_bigram_count=3",
            "min_page_views=100", "num_partitions=2")  # fmt: skip
        logs = job("python", "jobs/build_wit.py", f"output={BUCKET}/shards", "formats=[webdataset]",
                   f"curation.inputs=[{wat}]", f"curation.queries={BUCKET}/queries",
                   f"curation.output={BUCKET}/curated", "curation.num_buckets=2",
                   "crawl.fetch.allowed_networks=[127.0.0.0/8]", "crawl.worker_resources={crawl: 1}",
                   "crawl.num_workers=2", "crawl.num_cpus_per_worker=0.5", "crawl.samples_per_shard=16",
                   "crawl.image.image_size=64", "crawl.image.min_size=32")  # fmt: skip
    assert "[stage]" in logs  # one line per finished Ray Data stage
    stats = storage.read_json(f"{BUCKET}/shards/_stats.json")
    assert stats["totals"]["kept"] >= 32, stats["totals"]
    assert len(crawl_nodes(address)) >= 2, "the crawl did not spread over the worker nodes"

    # The user's step between the jobs: a BPE on the crawled captions, read back from S3.
    captions = [s["txt"] for uri in storage.list_files(f"{BUCKET}/shards", ".tar")
                for s in shards.read_tar_samples(storage.read_bytes(uri))]  # fmt: skip
    local_merges = tmp_path / "merges.txt.gz"
    vocab = Tokenizer.train(captions, 600, local_merges).vocab_size
    merges = upload(local_merges, f"{BUCKET}/merges.txt.gz")

    job("python", "jobs/train_clip.py", "--config", "configs/train_tiny.yaml", f"data_uri={BUCKET}/shards",
        f"tokenizer_merges={merges}", "model=tiny-rn",
        f"model_overrides={{image_resolution: 32, context_length: 32, vocab_size: {vocab}}}",
        f"storage_path={BUCKET}/runs", "name=e2e", "max_steps=2", "batch_size=4", "num_workers=2",
        "cpus_per_worker=0.25", "decode_cpus=0.25", "checkpoint_every=0", "keep_checkpoints=1",
        "max_failures=0", f"zero_shot_data={heldout}", f"zero_shot_templates={templates}")  # fmt: skip
    (checkpoint,) = checkpoints(f"{BUCKET}/runs/e2e")

    logs = job("python", "jobs/eval_clip.py", f"checkpoint={checkpoint}", f"tokenizer={merges}",
               f"zero_shot.data={heldout}", f"zero_shot.templates={templates}", f"output_dir={BUCKET}/eval",
               "embed.use_ray=always", "embed.cpus_per_actor=0.5", "embed.batch_size=16")  # fmt: skip
    results = storage.read_json(f"{BUCKET}/eval/results.json")
    # The checkpoint exists only on S3; the driver and the embedding actors (on the worker nodes) read it there.
    assert results["weights"].startswith(f"{checkpoint}/"), results["weights"]
    assert results["data"]["zero_shot"]["used_ray"] is True
    assert results["zero_shot"]["num_classes"] == 8 and results["zero_shot"]["n"] >= 8
    assert f"report: {BUCKET}/eval/report.html" in logs
    print(json.dumps({"kept": stats["totals"]["kept"], "zero_shot_top1": results["zero_shot"]["top1"]}))
