"""The crawl stage against a real loopback HTTP server: every image format and every failure."""

from __future__ import annotations

import asyncio
import time

import pyarrow as pa
import pytest

from pipelines.crawl.crawl import CrawlStage
from pipelines.crawl.fetch import (
    AddressGuard,
    FetchConfig,
    Fetcher,
    FetchResult,
    parse_retry_after,
    robots_opt_out,
)
from pipelines.crawl.images import ImageConfig
from pipelines.crawl.testsite import build_site, send

FETCH = dict(
    allowed_networks=["127.0.0.0/8"], read_timeout_s=0.5, total_timeout_s=5, max_retries=1, timeout_retries=1,
    backoff_base_s=0.05, max_body_bytes=200_000, per_host_rate=1000, per_host_concurrency=16, budget="local",
)  # fmt: skip


def fetch_all(config: FetchConfig, urls: list[str]) -> list[FetchResult]:
    """One Fetcher on a fresh event loop, closed afterwards."""

    async def run() -> list[FetchResult]:
        fetcher = Fetcher(config)
        try:
            return await fetcher.fetch_many(urls)
        finally:
            await fetcher.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def crawled(http_server):
    site = build_site(http_server, "fetchsite", slow_s=2.0)
    stage = CrawlStage(FetchConfig(**FETCH), ImageConfig(image_size=64, min_size=32, max_aspect_ratio=4))
    table = pa.table({"url": [r["url"] for r in site.rows], "caption": [r["caption"] for r in site.rows]})
    started = time.monotonic()
    out = stage(table)
    elapsed = time.monotonic() - started
    stage.close()
    return site, out, elapsed


def test_every_url_gets_its_expected_outcome(crawled):
    site, out, _ = crawled
    got = dict(zip(out.column("url").to_pylist(), out.column("status").to_pylist()))
    # de-duplication happens later, in the build: here the copy is simply fetched
    want = {url: (None if reason == "duplicate" else reason) for url, reason in site.expected.items()}
    assert got == want
    assert out.num_rows == len(site.rows)


def test_kept_rows_hold_resized_jpegs_of_every_format(crawled):
    _, out, _ = crawled
    kept = [r for r in out.to_pylist() if r["status"] is None]
    assert {r["original_format"] for r in kept} >= {"JPEG", "PNG", "WEBP", "GIF"}
    for r in kept:
        assert r["jpg"][:3] == b"\xff\xd8\xff"
        assert min(r["width"], r["height"]) == 64 and r["original_width"] == 128
        assert len(r["sha256"]) == 64 and r["download_bytes"] > 0


def test_retries_and_retry_after(crawled, http_server):
    _, out, elapsed = crawled
    attempts = dict(zip(out.column("url").to_pylist(), out.column("attempts").to_pylist()))
    by_name = {u.rsplit("/", 1)[-1]: n for u, n in attempts.items() if u}
    assert by_name["flaky500.jpg"] == 2 and http_server.hits["/fetchsite/flaky500.jpg"] == 2
    assert by_name["ratelimited.jpg"] == 2 and by_name["always503.jpg"] == 2
    assert by_name["slow.jpg"] == 2  # timed out twice, then gave up
    assert by_name["missing.jpg"] == 1  # a 404 is not retried
    assert elapsed >= 1.0  # waited the 1 s Retry-After


def test_a_timeout_is_not_retried_in_the_pass_by_default(http_server):
    """A hanging URL holds its slot for one read timeout, not one per try (5xx retries: above)."""
    from pipelines.crawl.testsite import slow

    hang = http_server.route("timeouts/hang.jpg", slow(2.0, b"late"))
    cfg = FetchConfig(**{**FETCH, "max_retries": 2, "timeout_retries": 0, "read_timeout_s": 0.3})
    started = time.monotonic()
    (result,) = fetch_all(cfg, [hang])
    assert (result.error, result.attempts) == ("timeout", 1) and time.monotonic() - started < 1.5
    assert http_server.hits["/timeouts/hang.jpg"] == 1
    (retried,) = fetch_all(FetchConfig(**{**FETCH, "timeout_retries": 2, "read_timeout_s": 0.3}), [hang])
    assert (retried.error, retried.attempts) == ("timeout", 2)  # max_retries=1 bounds it


def test_loopback_refused_unless_allowed(http_server):
    url = http_server.put_file("guard/a.png", b"x")
    for host_url in (url, url.replace("127.0.0.1", "localhost")):
        (result,) = fetch_all(FetchConfig(max_retries=0, budget="local"), [host_url])
        assert result.error == "blocked_address"
    assert http_server.hits["/guard/a.png"] == 0


def test_address_guard():
    guard = AddressGuard(["127.0.0.0/8"])
    assert guard.is_allowed("127.0.0.1") and guard.is_allowed("8.8.8.8")
    for address in ("10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254", "::1", "fe80::1", "0.0.0.0",
                    "::ffff:10.0.0.1", "100.64.0.1", "fd00:ec2::254"):  # fmt: skip
        assert not guard.is_allowed(address), address
    assert not AddressGuard(["169.254.0.0/16"]).is_allowed("169.254.169.254")  # metadata: never


def test_robots_tag_parsing():
    d = ["noai", "noimageai", "noindex", "noimageindex"]
    assert robots_opt_out(["noai"], "mybot", d)
    assert robots_opt_out(["nofollow, NoImageIndex"], "mybot", d)
    assert robots_opt_out(["mybot: noai"], "mybot", d)
    assert not robots_opt_out(["otherbot: noai"], "mybot", d)
    assert not robots_opt_out(["nofollow", "unavailable_after: 25 Jun 2010 15:00:00 PST"], "mybot", d)


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 1


def test_per_host_rate_and_concurrency(http_server):
    active = {"now": 0, "max": 0}

    def handler(request):
        active["now"] += 1
        active["max"] = max(active["max"], active["now"])
        time.sleep(0.05)
        active["now"] -= 1
        send(request, 200, b"x")

    url = http_server.route("polite/x.jpg", handler)
    cfg = FetchConfig(
        allowed_networks=["127.0.0.0/8"], per_host_rate=20, per_host_concurrency=2, budget="local"
    )
    started = time.monotonic()
    results = fetch_all(cfg, [f"{url}?n={i}" for i in range(9)])
    assert all(r.ok for r in results)
    assert time.monotonic() - started >= 8 / 20  # 9 requests spaced 1/20 s apart
    assert active["max"] <= 2


def test_user_agent_is_sent(http_server):
    seen = []

    def handler(request):
        seen.append(request.headers.get("User-Agent"))
        send(request, 200, b"x")

    url = http_server.route("ua/x.jpg", handler)
    fetch_all(
        FetchConfig(allowed_networks=["127.0.0.0/8"], user_agent="test-agent/1.0", budget="local"), [url]
    )
    assert seen == ["test-agent/1.0"]
