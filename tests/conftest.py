"""Session-wide real parts, started once: a loopback S3 server, an in-process Ray, a `ray start --head`
cluster for job submission, and a loopback HTTP server. Everything listens on 127.0.0.1 only."""

from __future__ import annotations

import http.server
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipelines import storage
from pipelines.local_cluster import LOOPBACK_ENV, LocalRayCluster, free_ports

ROOT = Path(__file__).resolve().parents[1]
os.environ.update(LOOPBACK_ENV)
os.environ.setdefault("PYTHONPATH", str(ROOT))
if str(ROOT) not in os.environ["PYTHONPATH"].split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ["PYTHONPATH"]])


# ---------------------------------------------------------------- S3 (moto_server on loopback)
class S3Server:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (if needed) and return `s3://name`."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    (port,) = free_ports(1)
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    yield S3Server(endpoint)
    proc.terminate()
    proc.wait(timeout=10)


# ---------------------------------------------------------------- Ray
@pytest.fixture(scope="session")
def ray_local(s3_server):
    """In-process Ray shared by the whole session (4 logical CPUs so trainers and data tasks both fit).

    Depends on s3_server so that the S3 endpoint variables are in the environment Ray workers inherit."""
    import ray

    if not ray.is_initialized():
        # address="local": always a new in-process cluster, never one a `ray start` left registered.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head(s3_server) -> Iterator[LocalRayCluster]:
    """A `ray start --head` cluster on 127.0.0.1 (auth disabled) for `ray job submit` tests.

    Use `ray_head.dashboard_url` with JobSubmissionClient; do not ray.init() into it from the test process
    (the process may already hold `ray_local`)."""
    cluster = LocalRayCluster(num_cpus=4).start()
    yield cluster
    cluster.stop()


# ---------------------------------------------------------------- HTTP
Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


class LoopbackHTTPServer:
    """Static files from `root` plus custom routes; counts hits per path (for retry tests)."""

    def __init__(self, root: Path):
        self.root = root
        self.routes: dict[str, Handler] = {}
        self.hits: Counter = Counter()
        server = self

        class RequestHandler(http.server.SimpleHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.root), **kwargs)

            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                server.hits[path] += 1
                route = server.routes.get(path)
                if route is not None:
                    route(self)
                else:
                    super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def route(self, path: str, handler: Handler) -> str:
        """Serve `path` with `handler(request)`; returns its URL."""
        self.routes["/" + path.lstrip("/")] = handler
        return self.url(path)

    def put_file(self, relpath: str, data: bytes) -> str:
        target = self.root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return self.url(relpath)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def http_server(tmp_path_factory) -> Iterator[LoopbackHTTPServer]:
    server = LoopbackHTTPServer(tmp_path_factory.mktemp("www"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine idle OpenMP threads
    spin and slow everything down. Use: `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- shared builders
def _crawl_config(**overrides):
    """The crawl tests' CrawlConfig: loopback-only fetching with short timeouts, 64 px images, 8 samples a
    shard, one small worker; keyword arguments override CrawlConfig fields."""
    from pipelines.crawl.config import CrawlConfig
    from pipelines.crawl.fetch import FetchConfig
    from pipelines.crawl.images import ImageConfig

    fetch = FetchConfig(
        allowed_networks=["127.0.0.0/8"], read_timeout_s=0.5, total_timeout_s=5, max_retries=1,
        backoff_base_s=0.05, max_body_bytes=200_000, per_host_rate=1000, per_host_concurrency=16,
    )  # fmt: skip
    image = ImageConfig(image_size=64, min_size=32, max_aspect_ratio=4)
    args = dict(samples_per_shard=8, batch_size=8, num_workers=1, num_cpus_per_worker=0.5)
    return CrawlConfig(fetch=fetch, image=image, **{**args, **overrides})


@pytest.fixture(scope="session")
def crawl_config():
    """Builder of the crawl tests' CrawlConfig: `crawl_config(**overrides)` (see `_crawl_config`)."""
    return _crawl_config


def dataset_state(out: str) -> dict:
    """Every byte the build published, with `_stats.json` minus its timing section, and the per-key
    count tables as rows."""
    state = {}
    for uri in storage.list_files(out):
        name = uri.rsplit("/", 1)[1]
        if name == "_stats.json":
            stats = storage.read_json(uri)
            stats.pop("run")
            state[name] = stats
        elif name == "_index.parquet":
            state[name] = pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
        else:
            state[name] = storage.read_bytes(uri)
    for uri in storage.list_files(f"{out}/_rows"):
        state["_rows/" + uri.rsplit("/", 1)[1]] = storage.read_bytes(uri)
    from pipelines.crawl import key_stats

    for name in key_stats.TABLES:  # per-domain and per-query counts (Parquet parts beside _stats.json)
        if storage.exists(key_stats.folder(out, name)):
            state[key_stats.FOLDER.format(name)] = key_stats.read_table(out, name).to_pylist()
    return state


def make_checkpoint_folder(ckpt: Path, captions: list[str], merges_name: str, step: int) -> tuple:
    """A trainer-layout checkpoint folder of a fresh tiny-vit: its merges trained on `captions`,
    `openai_fp16.pt` beside a `state.pt`. Returns (tokenizer, model)."""
    import clip_model

    ckpt.mkdir(parents=True)
    tok = clip_model.Tokenizer.train(captions, 600, ckpt / merges_name)
    torch.manual_seed(0)
    model = clip_model.create_model("tiny-vit", vocab_size=tok.vocab_size)
    clip_model.save_openai_checkpoint(model, ckpt / "openai_fp16.pt")
    torch.save({"step": step}, ckpt / "state.pt")
    return tok, model


def train_and_read(cfg) -> dict:
    """Train `cfg` on the session's Ray and read its last checkpoint: the result, `state.pt` (weights only) and
    the metrics rows."""
    import csv

    from pipelines.train.trainer import train

    result = train(cfg)
    assert result.error is None, result.error
    with result.checkpoint.as_directory() as d:
        state = torch.load(f"{d}/state.pt", weights_only=True)
        with open(f"{d}/metrics.csv") as f:
            metrics = list(csv.DictReader(f))
    return {"result": result, "state": state, "metrics": metrics}
