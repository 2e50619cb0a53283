"""Who may call what: the admin token and endpoint tokens (their handlers are control API).

Without an admin token berth runs open (it then refuses to listen beyond loopback). With one,
the control API needs it, and data-plane calls need it or a token of the endpoint they call,
unless the endpoint is public. Endpoint tokens are 256 random bits, shown once, stored as
SHA-256; a presented token is hashed and looked up, so its bytes are never compared directly.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from berth.daemon.errors import ApiError
from berth.daemon.http_types import HasHeaders
from berth.daemon.keys import ADMIN_ROUTES, AUTH
from berth.daemon.quota import TokenLimits
from berth.store import Store

BEARER = "Bearer "
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def digest(token: str) -> str:
    # surrogateescape: header bytes that are not UTF-8 arrive as surrogates; they are a wrong
    # token (401), not a crash (500).
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class Auth:
    """The admin token and every endpoint token's hash; revocation takes effect at once."""

    admin: str = ""
    endpoint_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # hash -> (ep, id)
    # token id -> its limits, only for tokens that have some: a call whose principal is not
    # here skips the quota, and only such calls may take the fast path.
    limits: dict[str, TokenLimits] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return not self.admin

    async def load(self, store: Store) -> None:
        tokens = await store.tokens()
        self.endpoint_tokens = {t["hash"]: (t["endpoint"], t["id"]) for t in tokens}
        self.limits = {}
        for t in tokens:
            self.set_limits(t["id"], TokenLimits(t["requests_per_minute"], t["tokens_per_day"]))

    def set_limits(self, token_id: str, limits: TokenLimits) -> None:
        if limits.any:
            self.limits[token_id] = limits
        else:
            self.limits.pop(token_id, None)

    def daily_budget(self, principal: str) -> int | None:
        """The principal's tokens_per_day; None when it has no daily budget (most callers)."""
        limits = self.limits.get(principal)
        return limits.tokens_per_day if limits is not None else None

    def remember(self, token: str, endpoint: str, token_id: str,
                 limits: TokenLimits | None = None) -> None:
        """A token just stored: it authenticates from now on."""
        self.endpoint_tokens[digest(token)] = (endpoint, token_id)
        self.set_limits(token_id, limits or TokenLimits())

    def revoke(self, endpoint: str, token_id: str) -> None:
        """A token just deleted from the store: refused from now on."""
        for key, owner in list(self.endpoint_tokens.items()):
            if owner == (endpoint, token_id):
                del self.endpoint_tokens[key]
                self.limits.pop(token_id, None)

    def forget_endpoint(self, endpoint: str) -> None:
        """The endpoint is gone (its tokens left the store with it): drop them here too."""
        for key, owner in list(self.endpoint_tokens.items()):
            if owner[0] == endpoint:
                del self.endpoint_tokens[key]
                self.limits.pop(owner[1], None)

    def principal(self, token: str | None) -> str:
        """Whom usage is counted for: a token's id, "admin", or "public" (no known token)."""
        if token is None:
            return "public"
        if self.admin and self._is_admin(token):
            return "admin"
        owner = self.endpoint_tokens.get(digest(token))
        return owner[1] if owner is not None else "public"

    @staticmethod
    def _presented(request: HasHeaders) -> str:
        given = request.headers.get("Authorization", "")
        if not given.startswith(BEARER) or len(given) == len(BEARER):
            raise ApiError(401, "unauthorized",
                           "missing or malformed 'Authorization: Bearer <token>'")
        return given[len(BEARER):]

    def _is_admin(self, token: str) -> bool:
        return hmac.compare_digest(token.encode("utf-8", "surrogateescape"),
                                   self.admin.encode())

    def knows(self, token: str) -> bool:
        """The admin token or a live endpoint token."""
        return self._is_admin(token) or digest(token) in self.endpoint_tokens

    def allows(self, token: str | None, endpoint: str, public: bool) -> bool:
        """Whether `token` (None: none presented) may call `endpoint`."""
        if self.open or public:
            return True
        if token is None:
            return False
        owner = self.endpoint_tokens.get(digest(token))
        return self._is_admin(token) or (owner is not None and owner[0] == endpoint)

    def require_admin(self, request: web.Request) -> None:
        """401 for a missing, unknown or revoked token; 403 for an endpoint's token."""
        if self.open:
            return
        token = self._presented(request)
        if self._is_admin(token):
            return
        if digest(token) in self.endpoint_tokens:
            raise ApiError(403, "forbidden", "this call needs the admin token; an endpoint's "
                           "token only calls its endpoint")
        raise ApiError(401, "unauthorized", "unknown or revoked token")

    def require_endpoint(self, request: HasHeaders, endpoint: str, public: bool) -> None:
        """A token of `endpoint` or the admin token (nothing when public or open)."""
        if public or not self.admin:  # (open, without the property call: every call asks)
            return
        token = self._presented(request)
        if self._is_admin(token):
            return
        owner = self.endpoint_tokens.get(digest(token))
        if owner is None:
            raise ApiError(401, "unauthorized", "unknown or revoked token")
        if owner[0] != endpoint:
            raise ApiError(403, "forbidden", f"this token is not for endpoint {endpoint}")


def add_admin_route(app: web.Application, method: str, path: str, handler: Handler) -> None:
    """A route that needs the admin token: the admin_auth middleware knows it by this mark,
    not by its path."""
    app[ADMIN_ROUTES].add(app.router.add_route(method, path, handler))


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routes marked by add_admin_route need the admin token, when one is configured."""
    if request.match_info.route in request.app[ADMIN_ROUTES]:
        request.app[AUTH].require_admin(request)
    return await handler(request)
