"""Run by test_crawl_multinode.py in its own process: a 0-CPU head and 3 one-CPU worker nodes
(ray.cluster_utils.Cluster): the input is built once, then again while one worker node is removed in the
middle of the crawl. Prints the two output folders."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

from pipelines import shards
from pipelines.crawl.build import build_crawl
from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.fetch import FetchConfig
from pipelines.crawl.images import ImageConfig
from pipelines.crawl.testsite import rendered_images, slow

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import LoopbackHTTPServer  # noqa: E402


def config() -> CrawlConfig:
    fetch = FetchConfig(
        allowed_networks=["127.0.0.0/8"], max_retries=0, per_host_rate=1000, per_host_concurrency=16
    )
    return CrawlConfig(fetch=fetch, image=ImageConfig(image_size=32, min_size=16), samples_per_shard=2,
                       num_workers=3, shards_per_worker=1, num_cpus_per_worker=1)  # fmt: skip


def kill_a_node_mid_crawl(cluster: Cluster, out: str, killed: list) -> None:
    deadline = time.time() + 300
    while len(shards.committed_names(out)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    killed.append(len(shards.committed_names(out)))
    node = next(iter(cluster.worker_nodes))  # each node holds one shard worker
    try:
        cluster.remove_node(node, allow_graceful=False)
    except Exception as e:  # noqa: BLE001  (reported; the build's outcome is what the test checks)
        print(f"remove_node raised {e!r}", file=sys.stderr, flush=True)


def main(tmp: Path) -> None:
    server = LoopbackHTTPServer(tmp / "www")
    images = rendered_images(10, seed=2, size=40)
    rows = [{"url": server.route(f"mn/{i}.jpg", slow(0.4, images[i % 10][0])), "caption": f"c{i}", "query": "q"}
            for i in range(24)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp / "urls.parquet")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    interrupted, clean, killed = str(tmp / "interrupted"), str(tmp / "clean"), []
    build_crawl(str(tmp / "urls.parquet"), config(), clean)  # uninterrupted, on all three nodes
    killer = threading.Thread(target=kill_a_node_mid_crawl, args=(cluster, interrupted, killed))
    killer.start()
    build_crawl(str(tmp / "urls.parquet"), config(), interrupted)
    killer.join()
    print(f"KILLED_AFTER {killed[0]} OUT {interrupted} {clean}", flush=True)
    ray.shutdown()
    cluster.shutdown()
    server.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
