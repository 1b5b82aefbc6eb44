"""A small web site of images and failures, served by any loopback HTTP server with routes.

Tests, the benchmark and the demo point the crawler at it: real JPEG/PNG/WebP/GIF files (rendered by
`pipelines.synthetic`) and every failure the crawler must survive, each with the drop reason it must
produce. `server` needs `route(path, handler) -> url` and `put_file(relpath, bytes) -> url` (see
tests/conftest.py's `http_server`); handlers get the `BaseHTTPRequestHandler` of the request.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipelines.synthetic import generate

IMAGE_FORMATS = {"jpg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"),
                 "webp": ("WEBP", "image/webp"), "gif": ("GIF", "image/gif")}  # fmt: skip


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    pil_format = IMAGE_FORMATS[fmt][0]
    image = image.convert("P") if pil_format == "GIF" else image
    image.save(out, format=pil_format, **({"quality": 90} if pil_format in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def rendered_images(n: int, seed: int = 0, size: int = 128) -> list[tuple[bytes, str, str]]:
    """n distinct images cycling through the formats: (bytes, extension, caption)."""
    formats = list(IMAGE_FORMATS)
    return [
        (encode(s.image, formats[i % len(formats)]), formats[i % len(formats)], s.caption)
        for i, s in enumerate(generate(n, seed=seed, size=size))
    ]


@functools.lru_cache(maxsize=1)
def decompression_bomb_png(side: int = 20_000) -> bytes:
    """A real 1-bit PNG of side x side pixels (400 megapixels) that compresses to ~50 kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + side // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def send(request: Any, status: int, body: bytes = b"", content_type: str = "image/jpeg",
         headers: dict[str, str] | None = None) -> None:  # fmt: skip
    request.send_response(status)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        request.send_header(k, v)
    request.end_headers()
    request.wfile.write(body)


def fail_first(times: int, status: int, body: bytes, headers: dict[str, str] | None = None) -> Callable:
    """Answers `status` (with `headers`) to the first `times` requests, then the image."""
    hits = {"n": 0}
    lock = threading.Lock()

    def handler(request: Any) -> None:
        with lock:
            hits["n"] += 1
            n = hits["n"]
        if n <= times:
            send(request, status, b"try again", "text/plain", headers)
        else:
            send(request, 200, body)

    return handler


def slow(delay_s: float, body: bytes) -> Callable:
    def handler(request: Any) -> None:
        time.sleep(delay_s)
        send(request, 200, body)

    return handler


def truncated(body: bytes) -> Callable:
    """Announces the full length, sends a third, then closes the connection."""

    def handler(request: Any) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "image/jpeg")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body[: len(body) // 3])
        request.wfile.flush()
        request.close_connection = True

    return handler


def unsized(body: bytes) -> Callable:
    """No Content-Length: the body ends when the connection closes (so only streaming can limit it)."""

    def handler(request: Any) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "image/jpeg")
        request.send_header("Connection", "close")
        request.end_headers()
        request.wfile.write(body)
        request.close_connection = True

    return handler


def redirect(location: str) -> Callable:
    def handler(request: Any) -> None:
        send(request, 302, b"", "text/plain", {"Location": location})

    return handler


@dataclass
class Site:
    """Rows to crawl and what must become of each (None = kept)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, url: str | None, caption: str, expected: str | None, query: str = "") -> None:
        self.rows.append({"url": url, "caption": caption, "query": query, "expected": expected})

    @property
    def expected(self) -> dict[str, str | None]:
        return {r["url"]: r["expected"] for r in self.rows}


def build_site(server: Any, prefix: str, n_images: int = 8, seed: int = 0, slow_s: float = 2.0,
               max_body_bytes: int = 200_000) -> Site:  # fmt: skip
    """Images in every format plus one URL per failure, under /{prefix}/ on `server`.

    Expects the crawler to run with loopback allowed, read timeout < `slow_s`, max body
    `max_body_bytes`, at least 1 retry, min_size > 16 and max_aspect_ratio < 5.
    """
    site = Site()
    images = rendered_images(n_images + 4, seed=seed)
    extra = [data for data, _, _ in images[n_images:]]  # served only by the routes that recover
    for i, (data, ext, caption) in enumerate(images[:n_images]):
        site.add(server.put_file(f"{prefix}/img{i}.{ext}", data), caption, None, query=ext)
    jpg = images[0][0]
    big = random.Random(seed).randbytes(max_body_bytes + 10)
    small = encode(Image.new("RGB", (12, 12), (200, 10, 10)), "png")
    wide = encode(Image.new("RGB", (500, 60), (10, 200, 10)), "png")
    html = b"<html><body><img src='x.jpg'></body></html>"
    r = server.route
    p = f"/{prefix}"
    site.add(server.url(f"{p}/missing.jpg"), "gone", "http_404")
    site.add(r(f"{p}/flaky500.jpg", fail_first(1, 500, extra[0])), "flaky", None)
    site.add(r(f"{p}/ratelimited.jpg", fail_first(1, 429, extra[1], {"Retry-After": "1"})), "busy", None)
    site.add(r(f"{p}/always503.jpg", fail_first(99, 503, jpg)), "down", "http_503")
    site.add(r(f"{p}/slow.jpg", slow(slow_s, jpg)), "slow", "timeout")
    site.add(r(f"{p}/truncated.jpg", truncated(jpg * 4)), "cut", "truncated")
    site.add(r(f"{p}/huge.jpg", lambda req: send(req, 200, big)), "huge", "too_large")
    site.add(r(f"{p}/huge-unsized.jpg", unsized(big)), "huge stream", "too_large")
    site.add(r(f"{p}/text.jpg", lambda req: send(req, 200, jpg, "text/plain")), "text", "bad_content_type")
    site.add(
        r(f"{p}/page.html", lambda req: send(req, 200, html, "text/html; charset=utf-8")), "page", "html_page"
    )
    site.add(r(f"{p}/loop.jpg", redirect(f"{p}/loop.jpg")), "loop", "too_many_redirects")
    server.put_file(f"{prefix}/target.jpg", extra[2])
    site.add(r(f"{p}/moved.jpg", redirect(f"{p}/target.jpg")), "moved", None)
    site.add(server.put_file(f"{prefix}/copy.jpg", jpg), "the same bytes again", "duplicate")
    site.add(
        r(f"{p}/corrupt.jpg", lambda req: send(req, 200, b"\xff\xd8\xff\xe0" + b"garbage" * 100)),
        "bad",
        "decode_error",
    )
    bomb = decompression_bomb_png()  # made now: building it inside the handler can outlast a read timeout
    site.add(
        r(f"{p}/bomb.png", lambda req: send(req, 200, bomb, "image/png")),
        "bomb",
        "decompression_bomb",
    )
    site.add(r(f"{p}/small.png", lambda req: send(req, 200, small, "image/png")), "tiny", "too_small")
    site.add(r(f"{p}/wide.png", lambda req: send(req, 200, wide, "image/png")), "banner", "aspect_ratio")
    site.add(
        r(f"{p}/noai.jpg", lambda req: send(req, 200, jpg, headers={"X-Robots-Tag": "noai"})),
        "noai",
        "robots_opt_out",
    )
    site.add(r(f"{p}/otherbot.jpg", lambda req: send(req, 200, extra[3], headers={"X-Robots-Tag": "otherbot: noai"})),
             "other bot only", None)  # fmt: skip
    site.add("http://10.0.0.1/private.jpg", "private", "blocked_address")
    site.add("http://169.254.169.254/latest/meta-data/", "metadata", "blocked_address")
    site.add("not a url", "junk", "invalid_url")
    return site
