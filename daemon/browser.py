"""Browser safety: requests a web page makes on a visitor's behalf never reach the API.

berthd listens on loopback without a token by default, so any web page the sysadmin opens
could otherwise create an endpoint that mounts the host's disk. Three checks stop that:

- `Host` must be the listener's literal address or a configured name (`daemon.allowed_hosts`),
  else 421: a DNS-rebinding page reaches us under its own name and is refused.
- `Origin` (sent by browsers on cross-origin writes) must be berthd's own or listed in
  `daemon.allowed_origins`, else 403; so must `Sec-Fetch-Site` say the request came from the
  same origin (or none) when a browser sends it without an Origin.
- JSON bodies need `Content-Type: application/json` (daemon.errors.json_body), which a page
  cannot send cross-origin without a CORS preflight that berthd never answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Middleware

from berth.daemon.errors import ApiError
from berth.daemon.http_types import HasHeaders

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CROSS_SITE = frozenset({"cross-site", "same-site"})  # Sec-Fetch-Site values of other origins
SEEN_HOSTS = 64  # Host values found allowed, remembered (bounded: callers choose them)


def host_part(host: str) -> str:
    """The name or address of a Host header, without port or IPv6 brackets, lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class BrowserGuard:
    """Decides whether a request's Host and Origin are ones berthd answers to."""

    listen_host: str
    allowed_hosts: frozenset[str] = frozenset({"localhost"})
    allowed_origins: frozenset[str] = frozenset()
    # every call is checked, mostly with the same Host: its verdict is looked up, not redone
    _allowed_seen: dict[str, None] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, listen_host: str, hosts: Iterable[str],
              origins: Iterable[str]) -> BrowserGuard:
        return cls(host_part(listen_host), frozenset(h.lower() for h in hosts),
                   frozenset(o.lower().rstrip("/") for o in origins))

    def host_allowed(self, host: str) -> bool:
        name = host_part(host)
        if name in self.allowed_hosts or name == self.listen_host:
            return True
        address, listening = _address(name), _address(self.listen_host)
        if address is None:
            return False  # a name nobody configured: DNS rebinding looks exactly like this
        if listening is None:  # listening on a name such as "localhost"
            return self.listen_host == "localhost" and address.is_loopback
        return listening.is_unspecified or address == listening

    def origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        return origin in self.allowed_origins or origin in (f"http://{host.lower()}",
                                                            f"https://{host.lower()}")

    def check(self, request: HasHeaders) -> None:
        """421 for a foreign Host, 403 for a foreign Origin; nothing for everything else."""
        host = request.headers.get("Host")
        if host is not None and host not in self._allowed_seen:
            if not self.host_allowed(host):
                raise ApiError(421, "misdirected_request",
                               f"this server does not answer to host {host_part(host)!r}; "
                               "add it to daemon.allowed_hosts if it is a name of this machine")
            if len(self._allowed_seen) < SEEN_HOSTS:
                self._allowed_seen[host] = None
        origin = request.headers.get("Origin")
        if origin is not None:
            if not self.origin_allowed(origin, host or ""):
                raise ApiError(403, "origin_refused",
                               f"requests from origin {origin!r} are refused; add it to "
                               "daemon.allowed_origins to let that site call berthd")
        elif request.headers.get("Sec-Fetch-Site", "").lower() in CROSS_SITE:
            raise ApiError(403, "origin_refused", "requests from other sites are refused")


def browser_middleware(guard: BrowserGuard) -> Middleware:
    @web.middleware
    async def check_browser(request: web.Request, handler: Handler) -> web.StreamResponse:
        guard.check(request)
        return await handler(request)
    return check_browser
