"""robots.txt per RFC 9309: what one site's answer to `/robots.txt` allows.

Parsing and matching are Protego's (Scrapy's parser: the group for our user-agent token, else `*`;
longest-match Allow/Disallow with `*` and `$`; Crawl-delay). This module only turns the fetch outcome
into a policy, as the RFC says:
- 2xx: the rules of the first `MAX_ROBOTS_BYTES` (500 KiB, the RFC's minimum) of the file;
- 4xx ("unavailable"), or more than five redirects: everything is allowed;
- 5xx, 429 or no answer ("unreachable"): everything is disallowed for now. URLs get the transient
  reason `robots_txt_unavailable`, and the policy expires soon so a later pass asks again.

Who fetches robots.txt, and how long a policy is kept, is the host budget's business (hosts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from protego import Protego
from yarl import URL

MAX_ROBOTS_BYTES = 500 * 1024
ROBOTS_DISALLOW = "robots_txt_disallow"
ROBOTS_UNAVAILABLE = "robots_txt_unavailable"


def site_of(url: URL) -> str:
    """The scheme, host and port a robots.txt (and a host budget) applies to: "http://[::1]:8080"."""
    return str(url.origin())


def robots_url(site: str) -> str:
    return f"{site}/robots.txt"


@dataclass
class RobotsPolicy:
    """A site's robots.txt as a decision: `drop_reason` set = every URL refused with that reason."""

    rules: Protego | None = None
    drop_reason: str | None = None

    def refusal(self, url: str, token: str) -> str | None:
        """None if `url` may be fetched by `token`, else the drop reason."""
        if self.drop_reason is not None:
            return self.drop_reason
        if self.rules is None or self.rules.can_fetch(url, token):
            return None
        return ROBOTS_DISALLOW

    def crawl_delay(self, token: str) -> float:
        if self.rules is None:
            return 0.0
        return float(self.rules.crawl_delay(token) or 0.0)

    @property
    def transient(self) -> bool:
        return self.drop_reason == ROBOTS_UNAVAILABLE


def policy_from_response(status: int | None, body: bytes | None, error: str | None = None) -> RobotsPolicy:
    """The policy for a robots.txt fetch that ended with HTTP `status` (None: no answer, see `error`)."""
    if status is not None and 200 <= status < 300:
        text = (body or b"")[:MAX_ROBOTS_BYTES].decode("utf-8", errors="replace")
        return RobotsPolicy(rules=Protego.parse(text))
    if error == "too_many_redirects" or (status is not None and 400 <= status < 500 and status != 429):
        return RobotsPolicy()
    if error == "blocked_address":  # the site itself is refused (SSRF guard): not a transient state
        return RobotsPolicy(drop_reason="blocked_address")
    return RobotsPolicy(drop_reason=ROBOTS_UNAVAILABLE)
