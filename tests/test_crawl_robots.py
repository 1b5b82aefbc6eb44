"""robots.txt per RFC 9309 against loopback sites: rules for our token vs `*`, longest match, `$`,
4xx / 5xx / oversized files, Crawl-delay; a disallowed URL is never requested."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
from conftest import LoopbackHTTPServer

from pipelines.crawl.crawl import CrawlStage, is_transient
from pipelines.crawl.fetch import FetchConfig
from pipelines.crawl.images import ImageConfig
from pipelines.crawl.robots import MAX_ROBOTS_BYTES, policy_from_response, robots_url, site_of
from pipelines.crawl.testsite import rendered_images, send

ROBOTS = b"""# a comment
User-agent: *
Disallow: /
Crawl-delay: 5

User-agent: clip-wit-ray
Disallow: /private/
Allow: /private/ok/
Disallow: /*.gif$
Disallow: /ours-only/
Crawl-delay: 0.3
"""


def fetch_config(**kw) -> FetchConfig:
    base = dict(allowed_networks=["127.0.0.0/8"], read_timeout_s=2, max_retries=0, per_host_rate=1000,
                per_host_concurrency=8, budget="local")  # fmt: skip
    return FetchConfig(**{**base, **kw})


def crawl(urls: list[str], **kw) -> tuple[dict[str, str | None], float]:
    stage = CrawlStage(fetch_config(**kw), ImageConfig(image_size=32, min_size=16))
    started = time.monotonic()
    try:
        out = stage(pa.table({"url": urls}))
    finally:
        stage.close()
    return dict(
        zip(out.column("url").to_pylist(), out.column("status").to_pylist())
    ), time.monotonic() - started


@pytest.fixture
def site(tmp_path):
    servers: list[LoopbackHTTPServer] = []

    def make(robots: bytes | None = None, robots_status: int = 200) -> LoopbackHTTPServer:
        server = LoopbackHTTPServer(tmp_path / f"site{len(servers)}")
        servers.append(server)
        if robots is not None:
            server.route("/robots.txt", lambda req: send(req, robots_status, robots, "text/plain"))
        return server

    yield make
    for s in servers:
        s.close()


def put_images(server: LoopbackHTTPServer, paths: list[str]) -> list[str]:
    images = rendered_images(1, size=48)
    return [server.put_file(p, images[0][0]) for p in paths]


def test_rules_for_our_token_longest_match_and_crawl_delay(site):
    server = site(ROBOTS)
    starts: list[float] = []
    lock = threading.Lock()
    allowed_paths = ["public/a.jpg", "private/ok/b.jpg", "x.gif.jpg", "img.gif?v=1"]
    refused_paths = ["private/c.jpg", "ours-only/d.jpg", "img.gif"]
    urls = put_images(server, [p.split("?")[0] for p in allowed_paths + refused_paths])
    urls = [server.url(p) for p in allowed_paths + refused_paths]
    for path in allowed_paths:  # record when each allowed request arrives
        file = server.root / path.split("?")[0]
        body = file.read_bytes()

        def handler(req, body=body):
            with lock:
                starts.append(time.monotonic())
            send(req, 200, body)

        server.route(path.split("?")[0], handler)
    got, _ = crawl(urls)
    assert [got[u] for u in urls[: len(allowed_paths)]] == [None] * len(allowed_paths)
    assert [got[u] for u in urls[len(allowed_paths) :]] == ["robots_txt_disallow"] * len(refused_paths)
    assert all(server.hits["/" + p.split("?")[0]] == 0 for p in refused_paths[:2])
    assert server.hits["/img.gif"] == 1  # only the allowed "img.gif?v=1"
    assert server.hits["/robots.txt"] == 1  # once for the whole crawl
    # Crawl-delay 0.3 s of our group (not the 5 s of `*`) spaces the requests, robots.txt's included.
    gaps = [b - a for a, b in zip(sorted(starts), sorted(starts)[1:])]
    assert len(starts) == 4 and min(gaps) >= 0.25 and max(gaps) < 2, gaps


def test_star_group_when_no_group_names_us(site):
    server = site(b"User-agent: otherbot\nDisallow: /\n\nUser-agent: *\nDisallow: /no/\nAllow: /no/but/\n")
    urls = put_images(server, ["yes/a.jpg", "no/b.jpg", "no/but/c.jpg"])
    got, _ = crawl(urls)
    assert [got[u] for u in urls] == [None, "robots_txt_disallow", None]
    assert server.hits["/no/b.jpg"] == 0


def test_missing_robots_txt_allows_everything(site):
    server = site()  # no robots.txt: 404
    urls = put_images(server, ["a.jpg", "private/b.jpg"])
    got, _ = crawl(urls)
    assert list(got.values()) == [None, None] and server.hits["/robots.txt"] == 1


def test_server_error_disallows_everything_for_now(site):
    server = site(b"oops", robots_status=500)
    urls = put_images(server, ["a.jpg", "b.jpg"])
    got, _ = crawl(urls)
    assert list(got.values()) == ["robots_txt_unavailable"] * 2
    assert is_transient("robots_txt_unavailable")
    assert server.hits["/a.jpg"] == server.hits["/b.jpg"] == 0


def test_only_the_first_500_kib_are_parsed(site):
    padding = b"# " + b"x" * 1000 + b"\n"
    body = b"User-agent: *\nDisallow: /early/\n" + padding * (MAX_ROBOTS_BYTES // len(padding) + 10)
    body += b"Disallow: /late/\n"
    assert len(body) > MAX_ROBOTS_BYTES
    server = site(body)
    urls = put_images(server, ["early/a.jpg", "late/b.jpg"])
    got, _ = crawl(urls)
    assert [got[u] for u in urls] == ["robots_txt_disallow", None]


def test_robots_off_fetches_nothing_extra(site):
    server = site(b"User-agent: *\nDisallow: /\n")
    urls = put_images(server, ["a.jpg"])
    got, _ = crawl(urls, robots_txt=False)
    assert list(got.values()) == [None] and server.hits["/robots.txt"] == 0


def test_policy_from_status():
    assert policy_from_response(404, b"").refusal("http://h/x", "bot") is None
    assert policy_from_response(403, b"").refusal("http://h/x", "bot") is None  # 4xx: "unavailable"
    for status in (500, 503, 429, None):
        policy = policy_from_response(status, None, None if status else "connection_error")
        assert policy.refusal("http://h/x", "bot") == "robots_txt_unavailable" and policy.transient
    assert policy_from_response(None, None, "too_many_redirects").refusal("http://h/x", "bot") is None
    rules = policy_from_response(200, b"User-agent: *\nDisallow: /*.php$\nAllow: /a\nDisallow: /ab\n")
    assert rules.refusal("http://h/x.php", "bot") == "robots_txt_disallow"
    assert rules.refusal("http://h/x.php?q", "bot") is None
    assert rules.refusal("http://h/abc", "bot") == "robots_txt_disallow"  # the longer rule wins
    assert rules.refusal("http://h/ac", "bot") is None


def test_one_site_per_scheme_host_and_port():
    from yarl import URL

    assert robots_url(site_of(URL("http://[::1]:8080/a/b?c"))) == "http://[::1]:8080/robots.txt"
    assert site_of(URL("https://Example.com/x")) == site_of(URL("https://example.com:443/y"))
    assert site_of(URL("http://example.com/x")) != site_of(URL("http://example.com:8080/x"))
