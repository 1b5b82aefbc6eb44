"""Jobs through the job-submission API against a `ray start --head` cluster, and a dead address failing fast."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.submit import ClusterUnreachable, check_reachable, run_job
from pipelines import shards
from pipelines.local_cluster import free_ports

ROOT = Path(__file__).resolve().parents[1]


def test_dead_address_fails_fast_with_a_clear_message():
    (port,) = free_ports(1)  # nothing listens there
    start = time.monotonic()
    with pytest.raises(
        ClusterUnreachable, match=f"No Ray cluster at http://127.0.0.1:{port}: nothing listens"
    ):
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 5


def test_submit_cli_exits_2_and_names_the_address():
    (port,) = free_ports(1)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "jobs/submit.py", "--address", f"http://127.0.0.1:{port}", "--", "python", "-c", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"No Ray cluster at http://127.0.0.1:{port}" in proc.stderr
    assert time.monotonic() - start < 20  # interpreter + ray import; the probe itself takes milliseconds


def test_build_and_train_jobs_run_through_job_submission(ray_head, http_server, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import synthetic

    rows = []
    for i, sample in enumerate(synthetic.generate(16, seed=3, size=64)):
        url = http_server.put_file(f"jobsub/img{i}.jpg", synthetic.to_jpeg(sample.image))
        rows.append({"url": url, "caption": sample.caption, "query": sample.concept.shape})
    rows.append({"url": http_server.url("jobsub/missing.jpg"), "caption": "a red circle", "query": "circle"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    out = tmp_path / "shards"
    logs = run_job(
        ray_head.dashboard_url,
        ["python", "jobs/build_wit.py", f"urls={tmp_path / 'urls.parquet'}", f"output={out}",
         "formats=[webdataset]", "crawl.fetch.allowed_networks=[127.0.0.0/8]", "crawl.num_workers=1",
         "crawl.num_cpus_per_worker=0.5", "crawl.samples_per_shard=8", "crawl.image.image_size=64",
         "crawl.image.min_size=32"],
        ROOT, timeout=300, out=None,
    )  # fmt: skip
    assert "16 of 17 samples" in logs
    # Plain job logs: no escape sequence or redraw, one line per finished Ray Data stage (pipelines/progress.py).
    assert "\x1b" not in logs and "\r" not in logs and "[stage] " in logs
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["totals"]["kept"] == 16 and stats["totals"]["dropped"] == {"http_404": 1}
    assert sum(1 for s in shards.committed_shards(str(out))) == 3

    # The model's vocabulary is a BPE trained on the crawled captions (as the demo does).
    from clip_model import Tokenizer

    captions = [
        s["txt"] for tar in sorted(out.glob("*.tar")) for s in shards.read_tar_samples(tar.read_bytes())
    ]
    merges = tmp_path / "merges.txt.gz"
    vocab = Tokenizer.train(captions, 600, merges).vocab_size
    logs = run_job(
        ray_head.dashboard_url,
        ["python", "jobs/train_clip.py", "--config", "configs/train_tiny.yaml", f"data_uri={out}",
         f"tokenizer_merges={merges}", f"model_overrides={{image_resolution: 32, vocab_size: {vocab}}}",
         f"storage_path={tmp_path}",
         "name=jobsub", "epochs=1", "batch_size=4", "checkpoint_every=0", "max_failures=0", "log_every=1"],
        ROOT, timeout=300, out=None,
    )  # fmt: skip
    assert "checkpoint:" in logs
    assert "\x1b" not in logs and "\r" not in logs
    assert list((tmp_path / "jobsub").glob("checkpoint_*")), logs[-3000:]
    assert (tmp_path / "jobsub" / "metrics.csv").exists()
