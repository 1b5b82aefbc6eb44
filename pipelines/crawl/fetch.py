"""Polite asynchronous HTTP fetching of image URLs.

One `Fetcher` per crawl worker keeps many requests in flight (aiohttp, on the caller's event loop;
every concurrent caller shares one in-flight limit and one session), with: connect/read timeouts,
bounded retries with exponential backoff on timeouts, connection errors, 429 and 5xx, a redirect
limit (redirects are followed by hand so every hop is checked), a body size limit, a content-type
check, `X-Robots-Tag` opt-outs (noai, noimageai, noindex, noimageindex), and an SSRF guard that
refuses private, loopback, link-local, reserved and cloud-metadata addresses unless a network is
explicitly allowed.

Every request (every redirect hop and retry too) waits in the worker's host-aware frontier (frontier.py)
for its site's budget (hosts.py) without holding an in-flight slot: per-host concurrency and rate hold
for the whole crawl, robots.txt is fetched once per site for the whole crawl and obeyed, and a site
answering 429/503 backs off alone. The per-host concurrency cap holds for TCP connections too: a
connection is closed when its request ends, before its lease goes back (no idle keep-alive connection
outlives its lease), so no host ever has more connections open to it than leases.

DNS: aiohttp's per-process cache (`dns_cache_ttl_s`) in front of the system resolver. At scale the
crawl nodes also run a caching resolver that the cluster setup installs (cluster/, the cluster
engineer's part), so a node's workers share one cache; there is no other DNS code here.

Every URL gets a `FetchResult` and nothing raises: a failed one carries a short drop reason
(`http_404`, `timeout`, `blocked_address`, `robots_txt_disallow`, ...) that the crawl stage counts,
and `status` keeps the HTTP status of an HTTP error.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import random
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from pipelines.crawl.frontier import Dropped, Frontier
from pipelines.crawl.hosts import (
    BACKOFF_STATUS,
    HOST_DEFERRED,
    BudgetClient,
    Grant,
    HostRules,
    budget_shards_for,
)
from pipelines.crawl.robots import MAX_ROBOTS_BYTES, robots_url, site_of

log = logging.getLogger(__name__)

# What a host may look like once parsed (IDNA-encoded names, IPv4, IPv6 without brackets).
HOST_CHARS = re.compile(r"[A-Za-z0-9._:%-]+")
# A request whose start came this many times too late (see `_slot`) goes at its next start however late:
# its release then tells the budget when it really started, so the starts after it keep their spacing.
MAX_LATE_STARTS = 3
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# Cloud metadata endpoints; most are already link-local or private, listed so that no
# allowed network can let them through by accident.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)


# The smallest value each count of FetchConfig may take.
_LEAST = {"max_in_flight": 1, "per_host_concurrency": 1, "budget_shards": 0, "max_redirects": 0, "max_retries": 0,
          "timeout_retries": 0}  # fmt: skip


@dataclass
class FetchConfig:
    user_agent: str = "clip-wit-ray/0.1 (+https://github.com/clip-wit-ray; image-text research crawler)"
    # The token matched against user-agent-specific X-Robots-Tag lines ("mybot: noai").
    user_agent_token: str = "clip-wit-ray"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_retries: int = 2
    # Of those retries, how many may follow a timeout. Each timed-out try holds a request slot for up to
    # read_timeout_s, and a host that hung once mostly hangs again, so by default a timeout is not retried
    # within the pass: the URL ends as the transient `timeout`, which the retry pass fetches later.
    timeout_retries: int = 0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    # A Retry-After longer than this is not waited for: the site is deferred for that long and its
    # URLs get the transient reason host_deferred (the retry pass fetches them later).
    max_retry_after_s: float = 30.0
    # A URL whose site has no free slot within this time is deferred too (host_deferred), so one
    # slow or strict site never holds a worker's slots for long.
    max_host_wait_s: float = 60.0
    max_in_flight: int = 64  # requests in flight per worker (CrawlStage instance)
    # Per site (scheme://host:port) for the whole crawl, however many workers (see hosts.py).
    per_host_concurrency: int = 4
    per_host_rate: float = 10.0  # request starts per second; 0: no limit
    max_redirects: int = 5
    max_body_bytes: int = 20 * 1024 * 1024
    # Accepted Content-Type prefixes; a response without Content-Type is accepted (the decoder decides).
    content_types: list[str] = field(default_factory=lambda: ["image/"])
    honour_robots_tag: bool = True
    disallowed_robots_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    dns_cache_ttl_s: int = 300
    # robots.txt (RFC 9309), fetched once per site for the whole crawl and kept this long.
    robots_txt: bool = True
    robots_ttl_s: float = 86_400.0
    robots_retry_s: float = 300.0  # an unreachable robots.txt (5xx, no answer) is asked again after this
    # Host budgets: "auto" = shared Ray actors when running under Ray, else in-process; "local" =
    # in-process only (one worker's share is then the whole budget); "cluster" = Ray actors.
    budget: str = "auto"
    # Names the budget actors: crawls with the same scope (and the same limits) share budgets.
    budget_scope: str = "crawl"
    # Budget actors (sites are spread over them by hash); 0: derived from the crawl's shard workers.
    budget_shards: int = 0
    budget_max_hosts: int = 100_000  # sites whose rate state each budget actor remembers (LRU)
    # Where robots.txt answers are kept for the whole crawl (the build sets `{output}/_hosts`); empty: memory.
    host_store: str = ""
    # Custom resources of the crawl nodes (the build copies `crawl.worker_resources`): budget actors go there.
    budget_resources: dict[str, float] = field(default_factory=dict)
    # SSRF guard: networks (CIDR) that may be fetched even though they are not public, e.g.
    # ["127.0.0.0/8"] for tests against a loopback server. Metadata addresses are never allowed.
    allowed_networks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as e:
                raise ValueError(f"allowed_networks: {network!r} is not a network (CIDR): {e}") from None
        if self.budget not in ("auto", "local", "cluster"):
            raise ValueError(f"budget must be auto, local or cluster, got {self.budget!r}")
        for name, least in _LEAST.items():
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}")

    def host_rules(self) -> HostRules:
        return HostRules(
            concurrency=self.per_host_concurrency,
            rate=self.per_host_rate,
            max_wait_s=self.max_host_wait_s,
            max_retry_after_s=self.max_retry_after_s,
            backoff_base_s=self.backoff_base_s,
            backoff_max_s=self.backoff_max_s,
            lease_s=self.total_timeout_s + 30.0,
            robots=self.robots_txt,
            robots_token=self.user_agent_token,
            robots_ttl_s=self.robots_ttl_s,
            robots_retry_s=self.robots_retry_s,
            max_hosts=self.budget_max_hosts,
            shards=self.budget_shards or budget_shards_for(1),
            scope=self.budget_scope,
            store=self.host_store,
            resources=tuple(sorted(self.budget_resources.items())),
        )


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


class Redirect(NamedTuple):
    status: int
    location: str


class Fetched(NamedTuple):
    status: int
    content_type: str | None
    final_url: str
    body: bytes


class FetchError(Exception):
    """A failed fetch with its drop reason; `retryable` errors are tried again."""

    def __init__(self, reason: str, retryable: bool = False, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.status = status


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


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except Exception:  # TypeError, ValueError, OverflowError, ... from a hostile header
        return None


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
    """Fetches URLs concurrently on the running event loop. One per worker; not thread-safe.

    All coroutines share one session (made on first use, on the loop of that call) and one
    in-flight limit; host budgets are the cluster-wide `BudgetClient`'s.
    """

    def __init__(self, config: FetchConfig, seed: int = 0):
        self.config = config
        self.guard = AddressGuard(config.allowed_networks)
        self.budget = BudgetClient(config.host_rules(), config.budget)
        self.random = random.Random(seed)
        self.session: aiohttp.ClientSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop the session lives on
        self.frontier: Frontier | None = None

    async def fetch_many(self, urls: Sequence[str]) -> list[FetchResult]:
        return list(await asyncio.gather(*(self.fetch(u) for u in urls)))

    async def close(self) -> None:
        await self.budget.drain()
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()

    async def fetch(self, url: str) -> FetchResult:
        """Fetches one URL with retries, each request within the worker's in-flight limit; never raises."""
        self._ensure_session()
        result = FetchResult(url=url)
        start = time.monotonic()
        try:
            await self._attempts(url, result)
        except Exception:  # a bug or an input nobody foresaw: a counted drop, never a failed batch
            log.warning("fetch of %r failed unexpectedly", url, exc_info=True)
            result.error, result.body = "fetch_error", None
        result.elapsed_s = time.monotonic() - start
        return result

    async def _attempts(self, url: str, result: FetchResult) -> None:
        timeouts = 0
        for attempt in range(self.config.max_retries + 1):
            result.attempts = attempt + 1
            try:
                result.status, result.content_type, result.final_url, result.body = await self._follow(url)
                result.error = None
                return
            except FetchError as e:
                result.error, result.status = e.reason, e.status
                timeouts += e.reason == "timeout"
                if (
                    not e.retryable
                    or attempt == self.config.max_retries
                    or timeouts > self.config.timeout_retries
                ):
                    return
                if e.status not in BACKOFF_STATUS:  # 429/503: the host budget pauses the site instead
                    delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2**attempt)
                    await asyncio.sleep(delay * (0.5 + self.random.random()))  # jitter

    def _ensure_session(self) -> None:
        if self.session is not None:
            return
        cfg = self.config
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.guard),
            use_dns_cache=True,
            ttl_dns_cache=cfg.dns_cache_ttl_s,
            limit=cfg.max_in_flight,
            limit_per_host=cfg.per_host_concurrency,
            force_close=True,  # a connection lives only as long as its request and lease (module doc)
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
        self.loop = asyncio.get_running_loop()
        self.frontier = Frontier(self.budget, cfg.max_in_flight, self._fetch_robots)

    async def _follow(self, url: str) -> Fetched:
        """One attempt: follows redirects by hand, checking every hop."""
        current = parse_url(url)
        for _ in range(self.config.max_redirects + 1):
            answer = await self._request(current)
            if not isinstance(answer, Redirect):
                return answer
            try:  # a hostile Location ("http://a:badport/x", "http://[::1") must not escape
                current = parse_url(str(current.join(URL(answer.location))))
            except (FetchError, ValueError, TypeError):
                raise FetchError("bad_redirect", status=answer.status) from None
        raise FetchError("too_many_redirects", status=answer.status)

    def _check_literal_address(self, host: str) -> None:
        # aiohttp does not call the resolver for IP literals, so those are checked here.
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return
        if not self.guard.is_allowed(host.strip("[]")):
            raise FetchError("blocked_address")

    async def _slot(self, site: str, url: str) -> Grant:
        """Waits in the frontier for the site's budget to let a request start, then until its start time."""
        assert self.frontier is not None
        for attempt in range(MAX_LATE_STARTS + 1):
            try:
                grant = await self.frontier.slot(site, url)
            except Dropped as e:
                raise FetchError(e.reason) from None
            await sleep_until(grant.start_at)
            if time.time() - grant.start_at <= grant.slack_s or attempt == MAX_LATE_STARTS:
                return grant
            # Too late (a busy event loop): starting now would come too close to the next start, so this
            # start is given back unused and the request queues again.
            await self.frontier.done(site, grant)
        raise AssertionError("unreachable")

    async def _fetch_robots(self, site: str, grant: Grant) -> None:
        """The frontier's robots.txt fetch for `site` under `grant`; the answer goes to the budget."""
        status, body, error, started = None, None, None, None
        try:
            await sleep_until(grant.start_at)
            started = time.time()
            status, body = await self._get_robots(URL(robots_url(site)))
        except FetchError as e:
            status, error = e.status, e.reason
        except Exception:
            log.warning("robots.txt of %s failed unexpectedly", site, exc_info=True)
            error = "fetch_error"
        finally:
            await self.budget.put_robots(site, grant.lease, status, body, error, started)

    async def _get_robots(self, url: URL) -> tuple[int, bytes]:
        """(status, first MAX_ROBOTS_BYTES of the body), following up to 5 redirects (RFC 9309)."""
        assert self.session is not None
        for _ in range(6):
            self._check_literal_address(url.host or "")
            try:
                async with self.session.get(url, allow_redirects=False) as resp:
                    if resp.status in REDIRECT_STATUS and "Location" in resp.headers:
                        url = parse_url(str(url.join(URL(resp.headers["Location"]))))
                        continue
                    if resp.status != 200:
                        return resp.status, b""
                    return resp.status, await resp.content.read(MAX_ROBOTS_BYTES)
            except (FetchError, ValueError):
                raise FetchError("too_many_redirects") from None  # a broken redirect: "unavailable"
            except aiohttp.ClientConnectorDNSError as e:
                if isinstance(e.os_error, BlockedAddressError):
                    raise FetchError("blocked_address") from e
                raise FetchError("dns_error") from e
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                raise FetchError("connection_error") from e
        raise FetchError("too_many_redirects")

    async def _request(self, url: URL) -> Redirect | Fetched:
        """One request for `url` within its site's budget."""
        self._check_literal_address(url.host or "")
        site = site_of(url)
        grant = await self._slot(site, str(url))
        status, retry_after = None, None
        assert self.session is not None
        started = time.time()
        try:
            async with self.session.get(url, allow_redirects=False) as resp:
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                return await self._response(resp, retry_after)
        except FetchError:
            raise
        except aiohttp.ClientConnectorDNSError as e:
            if isinstance(e.os_error, BlockedAddressError):
                raise FetchError("blocked_address") from e
            raise FetchError("dns_error", retryable=True) from e
        except TimeoutError as e:
            raise FetchError("timeout", retryable=True, status=status) from e
        except aiohttp.ClientPayloadError as e:
            raise FetchError("truncated", retryable=True, status=status) from e
        except aiohttp.InvalidURL as e:
            raise FetchError("invalid_url") from e
        except aiohttp.ClientResponseError as e:  # a malformed response (bad header, bad framing)
            raise FetchError("bad_response", status=status) from e
        except (aiohttp.ClientError, OSError) as e:
            raise FetchError("connection_error", retryable=True, status=status) from e
        finally:
            assert self.frontier is not None
            await self.frontier.done(site, grant, status, retry_after, started)

    async def _response(self, resp: aiohttp.ClientResponse, retry_after: float | None) -> Redirect | Fetched:
        cfg = self.config
        if resp.status in REDIRECT_STATUS and "Location" in resp.headers:
            return Redirect(resp.status, resp.headers["Location"])
        if resp.status != 200:
            if (
                resp.status in BACKOFF_STATUS
                and retry_after is not None
                and retry_after > cfg.max_retry_after_s
            ):
                raise FetchError(HOST_DEFERRED, status=resp.status)  # the retry pass asks again later
            raise FetchError(f"http_{resp.status}", resp.status in RETRYABLE_STATUS, status=resp.status)
        if cfg.honour_robots_tag and robots_opt_out(
            resp.headers.getall("X-Robots-Tag", []), cfg.user_agent_token, cfg.disallowed_robots_directives
        ):
            raise FetchError("robots_opt_out", status=resp.status)
        content_type = resp.headers.get("Content-Type")
        self._check_content_type(content_type, resp.status)
        if resp.content_length is not None and resp.content_length > cfg.max_body_bytes:
            raise FetchError("too_large", status=resp.status)
        body = await self._read_body(resp)
        return Fetched(resp.status, content_type, str(resp.url), body)

    def _check_content_type(self, content_type: str | None, status: int) -> None:
        if not content_type or not self.config.content_types:
            return
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime in ("text/html", "application/xhtml+xml"):
            raise FetchError("html_page", status=status)
        if not any(mime.startswith(p) for p in self.config.content_types):
            raise FetchError("bad_content_type", status=status)

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self.config.max_body_bytes
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(256 * 1024):
            size += len(chunk)
            if size > limit:
                raise FetchError("too_large", status=resp.status)
            chunks.append(chunk)
        if resp.content_length is not None and size < resp.content_length:
            raise FetchError("truncated", retryable=True, status=resp.status)
        return b"".join(chunks)


async def sleep_until(wall_time: float) -> None:
    delay = wall_time - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def parse_url(url: str) -> URL:
    """An absolute http(s) URL with a host and a valid port, else FetchError("invalid_url")."""
    try:
        parsed = URL(url)
        host = parsed.raw_host or ""
        if parsed.scheme not in ("http", "https") or not HOST_CHARS.fullmatch(host) or parsed.port is None:
            raise FetchError("invalid_url")
        return parsed
    except (ValueError, TypeError) as e:
        raise FetchError("invalid_url") from e
