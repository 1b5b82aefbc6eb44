"""A fast loopback image server for the build benchmarks (aiohttp, its own process).

`/img/{i}.jpg` is one small JPEG with `i` written into a comment segment, so every URL has its own bytes
(its own sha256) at no rendering cost; `/slow/{i}.jpg` is the same after 0.1-0.9 s (a slow host);
`/hang/{i}.jpg` never answers (the read timeout ends it); any other path is a 404.
Run: `python benchmarks/loopback_images.py PORT`.
"""

from __future__ import annotations

import asyncio
import io
import sys

from aiohttp import web

from pipelines.synthetic import generate


def base_jpeg(size: int = 64) -> bytes:
    image = next(iter(generate(1, seed=3, size=size))).image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def unique_jpeg(base: bytes, i: int) -> bytes:
    """The same picture with a COM segment naming `i` (after SOI): new bytes, same decode."""
    text = f"image {i}".encode()
    return base[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + base[2:]


def app() -> web.Application:
    base = base_jpeg()

    async def image(request: web.Request) -> web.Response:
        i = int(request.match_info["i"])
        return web.Response(body=unique_jpeg(base, i), content_type="image/jpeg")

    async def slow(request: web.Request) -> web.Response:
        i = int(request.match_info["i"])
        await asyncio.sleep(0.1 + (i * 7919 % 9) / 10)
        return web.Response(body=unique_jpeg(base, i), content_type="image/jpeg")

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response(status=500)

    application = web.Application()
    application.add_routes(
        [web.get("/img/{i}.jpg", image), web.get("/slow/{i}.jpg", slow), web.get("/hang/{i}.jpg", hang)]
    )
    return application


if __name__ == "__main__":
    web.run_app(app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
