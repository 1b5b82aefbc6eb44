"""A loopback web of many hosts in ONE asyncio process, for bench_crawl_hosts.py.

Every host is its own address in 127.0.0.0/8 (all of it is loopback on Linux): host i listens on
`host_address(i)`, port PORT, and is told apart by the address the client connected to. Nothing is ever
sent to any other address. A host's robots.txt is one of the kinds of `ROBOTS` (given per host in the
spec file); `/img/{n}.jpg` and `/private/{n}.jpg` are small distinct JPEGs. The server records, per
host: the time each request arrived (wall clock, when its header was complete), the peak of TCP
connections open at once, robots.txt fetches, and hits on paths robots.txt disallows or on hosts whose
robots.txt answered 5xx. `GET /stats` on 127.0.0.1:CONTROL_PORT returns them as JSON; `GET /reset`
clears them.

    python benchmarks/loopback_web.py PORT CONTROL_PORT SPEC_JSON   # SPEC_JSON: {"kinds": [...]}
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections import defaultdict

ROBOTS = {
    "404": (404, b"not found"),
    "allow": (200, b"User-agent: *\nAllow: /\n"),
    "disallow": (200, b"User-agent: *\nDisallow: /private/\n"),
    "5xx": (503, b"unavailable"),
    "crawl_delay": (200, b"User-agent: *\nCrawl-delay: 1\n"),
}


def host_address(i: int) -> str:
    return f"127.10.{i // 250}.{1 + i % 250}"


def response(status: int, body: bytes, content_type: str = "text/plain") -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class Web:
    """What every host answers and what the server saw."""

    def __init__(self, kinds: list[str]):
        from loopback_images import base_jpeg

        self.kinds = {host_address(i): k for i, k in enumerate(kinds)}
        self.jpeg = base_jpeg()
        self.reset()

    def reset(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.open: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.robots: dict[str, int] = defaultdict(int)
        self.forbidden: dict[str, int] = defaultdict(int)  # disallowed paths, or any path of a 5xx host

    def answer(self, host: str, path: str) -> bytes:
        self.times[host].append(time.time())
        kind = self.kinds.get(host, "404")
        if path == "/robots.txt":
            self.robots[host] += 1
            return response(*ROBOTS[kind])
        if kind == "5xx" or (kind == "disallow" and path.startswith("/private/")):
            self.forbidden[host] += 1
        name = path.rsplit("/", 1)[-1].split(".")[0]
        if not name.isdigit():
            return response(404, b"not found")
        text = f"{host}{path}".encode()
        body = self.jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + self.jpeg[2:]
        return response(200, body, "image/jpeg")

    def stats(self) -> dict:
        return {"times": self.times, "peak": self.peak, "robots": self.robots, "forbidden": self.forbidden}


class HTTP(asyncio.Protocol):
    """Just enough HTTP/1.1 for GETs without bodies (keep-alive unless the client says close)."""

    def __init__(self, web: Web, control: bool = False):
        self.web, self.control, self.buf = web, control, b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.host = transport.get_extra_info("sockname")[0]
        if not self.control:
            self.web.open[self.host] += 1
            self.web.peak[self.host] = max(self.web.peak[self.host], self.web.open[self.host])

    def connection_lost(self, exc) -> None:
        if not self.control:
            self.web.open[self.host] -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            path = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[1]
            if self.control:
                if path == "/reset":
                    self.web.reset()
                body = json.dumps(self.web.stats()).encode()
                self.transport.write(response(200, body, "application/json"))
            else:
                self.transport.write(self.web.answer(self.host, path))
            if b"connection: close" in head.lower():
                self.transport.close()
                return


async def main(port: int, control_port: int, spec: str) -> None:
    with open(spec) as f:
        kinds = json.load(f)["kinds"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    web = Web(kinds)
    loop = asyncio.get_running_loop()
    for i in range(len(kinds)):
        await loop.create_server(lambda: HTTP(web), host_address(i), port, backlog=64, reuse_address=True)
    await loop.create_server(lambda: HTTP(web, control=True), "127.0.0.1", control_port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
