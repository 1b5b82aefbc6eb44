"""Resume: kill jobs/build_wit.py mid-way, rerun, and get exactly the dataset of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipelines import shards, storage
from pipelines.build_wit import BuildWITConfig, build_wit
from pipelines.config import load_config
from pipelines.crawl.testsite import rendered_images, send

ROOT = Path(__file__).resolve().parents[1]
N_ROWS, PER_SHARD = 48, 4


def gated(gate: threading.Event, body: bytes):
    def handler(request):
        gate.wait(timeout=120)
        send(request, 200, body)

    return handler


def make_site(server, gate: threading.Event) -> list[dict]:
    """48 URLs over 30 distinct images (so duplicates span shards), a few 404s; from row 16 on the
    server holds its answers until `gate` is set, so the first job is stuck after committing 3 shards."""
    images = rendered_images(30, seed=7, size=64)
    rows = []
    for i in range(N_ROWS):
        if i % 11 == 5:
            url = server.url(f"resume/missing{i}.jpg")
        elif i < 4 * PER_SHARD:
            url = server.put_file(f"resume/img{i}.jpg", images[i % 30][0])
        else:
            url = server.route(f"resume/img{i}.jpg", gated(gate, images[i % 30][0]))
        rows.append({"url": url, "caption": f"caption {i}", "query": f"q{i % 3}"})
    return rows


def write_config(tmp: Path, rows, output: str) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), tmp / "urls.parquet")
    cfg = {
        "output": output,
        "urls": str(tmp / "urls.parquet"),
        "crawl": {
            "samples_per_shard": PER_SHARD, "batch_size": PER_SHARD, "num_workers": 1,
            "num_cpus_per_worker": 0.5,
            "fetch": {"allowed_networks": ["127.0.0.0/8"], "max_retries": 0, "per_host_rate": 1000},
            "image": {"image_size": 32, "min_size": 16},
        },
    }  # fmt: skip
    path = tmp / f"{Path(output).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def dataset_fingerprint(out: str) -> dict:
    manifests = shards.committed_shards(out)
    return {
        name: (m["count"], m["keys_sha256"], storage.read_bytes(f"{out}/{name}.tar"), m["stats"])
        for name, m in manifests.items()
    }


def test_killed_build_resumes_to_the_same_dataset(ray_local, ray_head, http_server, tmp_path):
    gate = threading.Event()
    rows = make_site(http_server, gate)
    killed_out = str(tmp_path / "killed")
    config = write_config(tmp_path, rows, killed_out)
    env = dict(os.environ, RAY_ADDRESS=ray_head.address, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs/build_wit.py"), "--config", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 120
    try:
        while len(shards.committed_shards(killed_out)) < 4:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no shard committed in time"
            time.sleep(0.1)
        time.sleep(0.5)  # the job is now waiting on the gated URLs
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        gate.set()
    committed_before = set(shards.committed_shards(killed_out))
    assert committed_before == {"00000", "00001", "00002", "00003"}
    assert not Path(killed_out, "_stats.json").exists()

    resumed = build_wit(load_config(BuildWITConfig, str(config)))
    assert resumed["run"]["shards_skipped"] >= len(committed_before)
    assert resumed["run"]["shards_written"] == N_ROWS // PER_SHARD - resumed["run"]["shards_skipped"]

    clean_out = str(tmp_path / "clean")
    clean = build_wit(load_config(BuildWITConfig, str(write_config(tmp_path, rows, clean_out))))
    assert dataset_fingerprint(killed_out) == dataset_fingerprint(clean_out)
    assert resumed["totals"] == clean["totals"] and resumed["stages"] == clean["stages"]
    assert clean["totals"]["dropped"] == {"http_404": 4, "duplicate": 15}
    keys = [s["key"] for name in sorted(shards.committed_shards(killed_out))
            for s in shards.read_shard_samples(f"{killed_out}/{name}.tar")]  # fmt: skip
    assert len(keys) == len(set(keys)) == N_ROWS - 19
