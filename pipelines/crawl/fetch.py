"""Polite asynchronous HTTP fetching of image URLs.

One `Fetcher` per crawl worker keeps many requests in flight (aiohttp), with:
connect/read timeouts, bounded retries with exponential backoff on timeouts, connection errors,
429 and 5xx (honouring `Retry-After`), a per-host concurrency limit and request rate, a redirect
limit (redirects are followed by hand so every hop is checked), a body size limit, a content-type
check, `X-Robots-Tag` opt-outs (noai, noimageai, noindex, noimageindex), a DNS cache, and an SSRF
guard that refuses private, loopback, link-local, reserved and cloud-metadata addresses unless a
network is explicitly allowed.

Every URL gets a `FetchResult`; a failed one carries a short drop reason (`http_404`, `timeout`,
`blocked_address`, ...) that the crawl stage counts in the funnel.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# Cloud metadata endpoints; most are already link-local or private, listed so that no
# allowed network can let them through by accident.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)


@dataclass
class FetchConfig:
    user_agent: str = "clip-wit-ray/0.1 (+https://github.com/clip-wit-ray; image-text research crawler)"
    # The token matched against user-agent-specific X-Robots-Tag lines ("mybot: noai").
    user_agent_token: str = "clip-wit-ray"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_retries: int = 2
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    # A Retry-After longer than this is not waited for: the URL is dropped (reason http_429/http_503).
    max_retry_after_s: float = 30.0
    max_in_flight: int = 64
    per_host_concurrency: int = 4
    # Requests per second per host, for the whole crawl; each worker gets its share (see Fetcher).
    per_host_rate: float = 10.0
    max_redirects: int = 5
    max_body_bytes: int = 20 * 1024 * 1024
    # Accepted Content-Type prefixes; a response without Content-Type is accepted (the decoder decides).
    content_types: list[str] = field(default_factory=lambda: ["image/"])
    honour_robots_tag: bool = True
    disallowed_robots_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    dns_cache_ttl_s: int = 300
    # SSRF guard: networks (CIDR) that may be fetched even though they are not public, e.g.
    # ["127.0.0.0/8"] for tests against a loopback server. Metadata addresses are never allowed.
    allowed_networks: list[str] = field(default_factory=list)


@dataclass
class FetchResult:
    url: str
    body: bytes | None = None
    error: str | None = None  # drop reason; None when body holds the image bytes
    status: int | None = None
    content_type: str | None = None
    final_url: str | None = None
    attempts: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class FetchError(Exception):
    """A failed fetch with its drop reason; `retryable` errors are tried again."""

    def __init__(self, reason: str, retryable: bool = False, retry_after_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class BlockedAddressError(OSError):
    pass


class AddressGuard:
    """Decides whether an IP address may be contacted (the SSRF guard)."""

    def __init__(self, allowed_networks: Sequence[str] = ()):
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def is_allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip in METADATA_ADDRESSES:
            return False
        if any(ip in net for net in self.allowed):
            return True
        return ip.is_global and not ip.is_multicast


class GuardedResolver(AbstractResolver):
    """Resolves with the system resolver and refuses hosts whose addresses are not allowed."""

    def __init__(self, guard: AddressGuard):
        self.guard = guard
        self.inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        if not all(self.guard.is_allowed(r["host"]) for r in results):
            raise BlockedAddressError(f"{host} resolves to a refused address")
        return results

    async def close(self) -> None:
        await self.inner.close()


class HostLimiter:
    """Per-host concurrency (a semaphore) and request rate (evenly spaced start times)."""

    def __init__(self, concurrency: int, rate: float):
        self.semaphore = asyncio.Semaphore(max(1, concurrency))
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_start = 0.0

    async def __aenter__(self) -> HostLimiter:
        await self.semaphore.acquire()
        now = time.monotonic()
        start = max(now, self.next_start)
        self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.semaphore.release()

    def pause(self, seconds: float) -> None:
        """Delays every later request to this host (after a 429/503 with Retry-After)."""
        self.next_start = max(self.next_start, time.monotonic() + seconds)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def robots_opt_out(header_values: Sequence[str], user_agent_token: str, directives: Sequence[str]) -> bool:
    """True when an X-Robots-Tag header forbids use, for every agent or for ours."""
    wanted = {d.lower() for d in directives}
    token = user_agent_token.lower()
    for value in header_values:
        agent, sep, rest = value.partition(":")
        # "noindex, noai" applies to all; "mybot: noai" only to mybot. A directive such as
        # "unavailable_after: <date>" also contains a colon, so only a known agent prefix counts.
        if sep and agent.strip().lower() not in wanted and " " not in agent.strip():
            if agent.strip().lower() not in (token, "*"):
                continue
            value = rest
        if {d.strip().lower() for d in value.split(",")} & wanted:
            return True
    return False


class Fetcher:
    """Fetches batches of URLs concurrently. Not thread-safe; one per worker.

    `rate_share` divides the per-host rate among the crawl workers, so that the configured
    `per_host_rate` holds for the whole crawl.
    """

    def __init__(self, config: FetchConfig, rate_share: int = 1, seed: int = 0):
        self.config = config
        self.guard = AddressGuard(config.allowed_networks)
        self.host_rate = config.per_host_rate / max(1, rate_share)
        self.random = random.Random(seed)
        self.loop = asyncio.new_event_loop()
        self.session: aiohttp.ClientSession | None = None
        self.hosts: dict[str, HostLimiter] = {}

    def fetch_all(self, urls: Sequence[str]) -> list[FetchResult]:
        return self.loop.run_until_complete(self.fetch_many(urls))

    def close(self) -> None:
        if self.session is not None:
            self.loop.run_until_complete(self.session.close())
            self.session = None
        self.loop.close()

    async def fetch_many(self, urls: Sequence[str]) -> list[FetchResult]:
        self._ensure_session()
        in_flight = asyncio.Semaphore(self.config.max_in_flight)

        async def one(url: str) -> FetchResult:
            async with in_flight:
                return await self.fetch(url)

        return list(await asyncio.gather(*(one(u) for u in urls)))

    def _ensure_session(self) -> None:
        if self.session is None:
            cfg = self.config
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.guard),
                use_dns_cache=True,
                ttl_dns_cache=cfg.dns_cache_ttl_s,
                limit=cfg.max_in_flight,
                limit_per_host=cfg.per_host_concurrency,
            )
            timeout = aiohttp.ClientTimeout(
                total=cfg.total_timeout_s, sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s
            )
            self.session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5"},
                auto_decompress=True,
            )

    async def fetch(self, url: str) -> FetchResult:
        """Fetches one URL with retries; never raises."""
        self._ensure_session()
        result = FetchResult(url=url)
        start = time.monotonic()
        for attempt in range(self.config.max_retries + 1):
            result.attempts = attempt + 1
            try:
                result.status, result.content_type, result.final_url, result.body = await self._follow(url)
                result.error = None
                break
            except FetchError as e:
                result.error = e.reason
                if not e.retryable or attempt == self.config.max_retries:
                    break
                delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2**attempt)
                delay *= 0.5 + self.random.random()  # jitter, so retries do not arrive together
                if e.retry_after_s is not None:
                    delay = e.retry_after_s
                await asyncio.sleep(delay)
        result.elapsed_s = time.monotonic() - start
        return result

    async def _follow(self, url: str) -> tuple[int, str | None, str, bytes]:
        """One attempt: follows redirects by hand, checking every hop."""
        try:
            current = URL(url)
        except (ValueError, TypeError) as e:
            raise FetchError("invalid_url") from e
        for _ in range(self.config.max_redirects + 1):
            if current.scheme not in ("http", "https") or not current.host:
                raise FetchError("invalid_url")
            self._check_literal_address(current.host)
            location, response = await self._request(current)
            if response is not None:
                return response
            current = current.join(URL(location))
        raise FetchError("too_many_redirects")

    def _check_literal_address(self, host: str) -> None:
        # aiohttp does not call the resolver for IP literals, so those are checked here.
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return
        if not self.guard.is_allowed(host.strip("[]")):
            raise FetchError("blocked_address")

    def _limiter(self, host: str) -> HostLimiter:
        limiter = self.hosts.get(host)
        if limiter is None:
            limiter = self.hosts[host] = HostLimiter(self.config.per_host_concurrency, self.host_rate)
        return limiter

    async def _request(self, url: URL) -> tuple[str | None, tuple[int, str | None, str, bytes] | None]:
        """Returns (redirect location, None) or (None, (status, content type, final url, body))."""
        cfg = self.config
        limiter = self._limiter(url.host or "")
        assert self.session is not None
        async with limiter:
            try:
                async with self.session.get(url, allow_redirects=False) as resp:
                    if resp.status in REDIRECT_STATUS and "Location" in resp.headers:
                        return resp.headers["Location"], None
                    if resp.status != 200:
                        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                        if retry_after is not None:
                            limiter.pause(min(retry_after, cfg.max_retry_after_s))
                        retryable = resp.status in RETRYABLE_STATUS and (
                            retry_after is None or retry_after <= cfg.max_retry_after_s
                        )
                        raise FetchError(f"http_{resp.status}", retryable, retry_after)
                    if cfg.honour_robots_tag and robots_opt_out(
                        resp.headers.getall("X-Robots-Tag", []),
                        cfg.user_agent_token,
                        cfg.disallowed_robots_directives,
                    ):
                        raise FetchError("robots_opt_out")
                    content_type = resp.headers.get("Content-Type")
                    self._check_content_type(content_type)
                    if resp.content_length is not None and resp.content_length > cfg.max_body_bytes:
                        raise FetchError("too_large")
                    body = await self._read_body(resp)
                    return None, (resp.status, content_type, str(resp.url), body)
            except FetchError:
                raise
            except aiohttp.ClientConnectorDNSError as e:
                if isinstance(e.os_error, BlockedAddressError):
                    raise FetchError("blocked_address") from e
                raise FetchError("dns_error", retryable=True) from e
            except TimeoutError as e:
                raise FetchError("timeout", retryable=True) from e
            except aiohttp.ClientPayloadError as e:
                raise FetchError("truncated", retryable=True) from e
            except aiohttp.InvalidURL as e:
                raise FetchError("invalid_url") from e
            except (aiohttp.ClientError, OSError) as e:
                raise FetchError("connection_error", retryable=True) from e

    def _check_content_type(self, content_type: str | None) -> None:
        if not content_type or not self.config.content_types:
            return
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime in ("text/html", "application/xhtml+xml"):
            raise FetchError("html_page")
        if not any(mime.startswith(p) for p in self.config.content_types):
            raise FetchError("bad_content_type")

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self.config.max_body_bytes
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(256 * 1024):
            size += len(chunk)
            if size > limit:
                raise FetchError("too_large")
            chunks.append(chunk)
        if resp.content_length is not None and size < resp.content_length:
            raise FetchError("truncated", retryable=True)
        return b"".join(chunks)
