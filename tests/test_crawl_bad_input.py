"""No input fails the crawl: every hostile header, URL, body or image is a counted drop with a reason
(never an exception), and `http_status` is kept for HTTP errors."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from pipelines.crawl import images
from pipelines.crawl.crawl import CrawlStage
from pipelines.crawl.fetch import FetchConfig
from pipelines.crawl.images import ImageConfig, ImageDrop, process_image
from pipelines.crawl.testsite import encode, rendered_images, send

CFG = FetchConfig(allowed_networks=["127.0.0.0/8"], read_timeout_s=2, max_retries=1, backoff_base_s=0.01,
                  per_host_rate=0, per_host_concurrency=16, budget="local")  # fmt: skip


def raw(head: bytes, body: bytes = b"") -> callable:
    """A handler that writes a hand-made (malformed) response and closes the connection."""

    def handler(request) -> None:
        request.wfile.write(head + b"\r\n\r\n" + body)
        request.wfile.flush()
        request.close_connection = True

    return handler


def location(value: str) -> callable:
    return lambda req: send(req, 302, b"", "text/plain", {"Location": value})


def truncated_jpeg() -> bytes:
    data = encode(Image.new("RGB", (300, 200), (10, 120, 200)), "jpg")
    return data[: len(data) // 2]


@pytest.fixture(scope="module")
def crawled(http_server):
    jpg = rendered_images(1, size=48)[0][0]
    r = http_server.route
    cases = {
        r("bad/badport.jpg", location("http://a:badport/x")): ("bad_redirect", 302),
        r("bad/bracket.jpg", location("http://[::1")): ("bad_redirect", 302),
        r("bad/ftp.jpg", location("ftp://127.0.0.1/x.jpg")): ("bad_redirect", 302),
        r("bad/empty-location.jpg", location("")): ("too_many_redirects", 302),
        r("bad/retry-after.jpg", lambda req: send(req, 503, b"", "text/plain", {"Retry-After": "99999999999999999999 garbage"})): ("http_503", 503),
        r("bad/retry-date.jpg", lambda req: send(req, 429, b"", "text/plain", {"Retry-After": "Mon, 99 Foo 99999 25:61:61 GMT"})): ("http_429", 429),
        r("bad/content-length.jpg", raw(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: abc", jpg)): ("bad_response", None),
        r("bad/status-line.jpg", raw(b"HTTP/1.1 2000000 WHAT\r\nContent-Type: image/jpeg", jpg)): ("bad_response", None),
        r("bad/header-bytes.jpg", raw(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Robots-Tag: \xff\xfe\x00noai", jpg)): ("bad_response", None),
        r("bad/content-type.jpg", lambda req: send(req, 200, jpg, "\x01;;;===")): ("bad_content_type", 200),
        r("bad/empty.jpg", lambda req: send(req, 200, b"")): ("decode_error", 200),
        r("bad/truncated.jpg", lambda req: send(req, 200, truncated_jpeg())): ("decode_error", 200),
        r("bad/svg.jpg", lambda req: send(req, 200, b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")): ("decode_error", 200),
        r("bad/forbidden.jpg", lambda req: send(req, 403, b"no", "text/plain")): ("http_403", 403),
        "http://127.0.0.1:99999/x.jpg": ("invalid_url", None),
        "http://[::1": ("invalid_url", None),
        "http://": ("invalid_url", None),
        "javascript:alert(1)": ("invalid_url", None),
        "http://a b.example/x.jpg": ("invalid_url", None),
        None: ("invalid_url", None),
    }  # fmt: skip
    urls = list(cases)
    stage = CrawlStage(CFG, ImageConfig(image_size=32, min_size=16))
    try:
        out = stage(pa.table({"url": pa.array(urls, pa.string()), "n": list(range(len(urls)))}))
    finally:
        stage.close()
    return cases, out


def test_every_bad_input_is_a_counted_drop_with_its_reason(crawled):
    cases, out = crawled
    assert out.num_rows == len(cases) and out.column("n").to_pylist() == list(range(len(cases)))
    got = dict(zip(cases, zip(out.column("status").to_pylist(), out.column("http_status").to_pylist())))
    assert got == cases


def test_session_is_closed(crawled, http_server):
    stage = CrawlStage(CFG, ImageConfig())
    stage(pa.table({"url": [http_server.url("bad/forbidden.jpg")]}))
    session = stage.fetcher.session
    stage.close()
    assert session.closed and stage.fetcher.session is None
    stage.close()  # idempotent


def test_non_string_urls_in_a_pandas_batch():
    import pandas as pd

    stage = CrawlStage(CFG, ImageConfig())
    out = stage(pd.DataFrame({"url": [12, None, float("nan")]}))
    stage.close()
    assert out.column("status").to_pylist() == ["invalid_url"] * 3


def test_an_error_after_decoding_is_an_image_drop(monkeypatch):
    data = encode(Image.new("RGB", (300, 200), (10, 120, 200)), "png")

    def broken_resize(*args, **kwargs):
        raise OSError("broken data stream when reading image file")

    monkeypatch.setattr(Image.Image, "resize", broken_resize)
    with pytest.raises(ImageDrop) as e:
        process_image(data, ImageConfig(image_size=64))
    assert e.value.reason == "image_error" and "image_error" in images.IMAGE_REASONS


def test_image_checks_never_raise_anything_else():
    for data in (
        b"",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"GIF89a" + b"\xff" * 20,
        io.BytesIO(b"x").getvalue(),
    ):
        with pytest.raises(ImageDrop):
            process_image(data, ImageConfig())
