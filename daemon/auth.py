"""Who may call what: the admin token, endpoint tokens, and the secrets store's API.

Without an admin token berth runs open (it then refuses to listen beyond loopback). With one,
the control API needs it, and data-plane calls need it or a token of the endpoint they call,
unless the endpoint is public. Endpoint tokens are 256 random bits, shown once, stored as
SHA-256; a presented token is hashed and looked up, so its bytes are never compared directly.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from aiohttp import web

from berth.daemon.errors import ApiError, json_body
from berth.daemon.keys import AUTH, ROUTER
from berth.store import Store

BEARER = "Bearer "
SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Auth:
    """The admin token and every endpoint token's hash; revocation takes effect at once."""

    admin: str = ""
    endpoint_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # hash -> (ep, id)

    @property
    def open(self) -> bool:
        return not self.admin

    async def load(self, store: Store) -> None:
        self.endpoint_tokens = {t["hash"]: (t["endpoint"], t["id"])
                                for t in await store.tokens()}

    def forget_endpoint(self, endpoint: str) -> None:
        """The endpoint is gone (its tokens left the store with it): drop them here too."""
        for key, owner in list(self.endpoint_tokens.items()):
            if owner[0] == endpoint:
                del self.endpoint_tokens[key]

    @staticmethod
    def _presented(request: web.Request) -> str:
        given = request.headers.get("Authorization", "")
        if not given.startswith(BEARER) or len(given) == len(BEARER):
            raise ApiError(401, "unauthorized",
                           "missing or malformed 'Authorization: Bearer <token>'")
        return given[len(BEARER):]

    def _is_admin(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.admin.encode())

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

    def require_endpoint(self, request: web.Request, endpoint: str, public: bool) -> None:
        """A token of `endpoint` or the admin token (nothing when public or open)."""
        if self.open or public:
            return
        token = self._presented(request)
        if self._is_admin(token):
            return
        owner = self.endpoint_tokens.get(digest(token))
        if owner is None:
            raise ApiError(401, "unauthorized", "unknown or revoked token")
        if owner[0] != endpoint:
            raise ApiError(403, "forbidden", f"this token is not for endpoint {endpoint}")


def _store(request: web.Request) -> Store:
    return request.app[ROUTER].reconciler.store


def _endpoint_name(request: web.Request) -> str:
    name = request.match_info["name"]
    pool = request.app[ROUTER].reconciler.pools.get(name)
    if pool is None or pool.removed:
        raise ApiError(404, "endpoint_not_found", f"no endpoint named {name!r}")
    return name


async def _event(request: web.Request, kind: str, message: str, endpoint: str | None) -> None:
    await request.app[ROUTER].reconciler.event(kind, message, endpoint)


async def create_token(request: web.Request) -> web.Response:
    name = _endpoint_name(request)
    token, token_id = secrets.token_urlsafe(32), "tok_" + secrets.token_hex(6)
    created = await _store(request).add_token(token_id, name, digest(token))
    request.app[AUTH].endpoint_tokens[digest(token)] = (name, token_id)
    await _event(request, "token_created", f"token {token_id} created", name)
    return web.json_response({"id": token_id, "token": token, "endpoint": name,
                              "created_at": created}, status=201)


async def list_tokens(request: web.Request) -> web.Response:
    name = _endpoint_name(request)
    tokens = [{"id": t["id"], "endpoint": t["endpoint"], "created_at": t["created_at"]}
              for t in await _store(request).tokens(name)]
    return web.json_response({"tokens": tokens})


async def revoke_token(request: web.Request) -> web.Response:
    name, token_id = _endpoint_name(request), request.match_info["id"]
    if not await _store(request).delete_token(name, token_id):
        raise ApiError(404, "token_not_found", f"endpoint {name} has no token {token_id!r}")
    tokens = request.app[AUTH].endpoint_tokens
    for key, owner in list(tokens.items()):
        if owner == (name, token_id):
            del tokens[key]
    await _event(request, "token_revoked", f"token {token_id} revoked", name)
    return web.json_response({"id": token_id, "revoked": True})


async def put_secret(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not SECRET_NAME.match(name):
        raise ApiError(422, "invalid", f"secret name {name!r} is not an environment variable "
                       "name", details=[{"path": "name", "message": "not an env var name"}])
    body = await json_body(request)
    value = body.get("value")
    if not isinstance(value, str) or set(body) != {"value"}:
        raise ApiError(422, "invalid", 'the body must be {"value": "<string>"}',
                       details=[{"path": "value", "message": "required string, no other key"}])
    await _store(request).put_secret(name, value)
    await _event(request, "secret_set", f"secret {name} set", None)
    request.app[ROUTER].reconciler.secret_changed(name)
    return web.json_response({"name": name, "stored": True})


async def delete_secret(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not await _store(request).delete_secret(name):
        raise ApiError(404, "secret_not_found", f"no secret named {name!r}")
    await _event(request, "secret_deleted", f"secret {name} deleted", None)
    return web.json_response({"name": name, "deleted": True})


async def list_secrets(request: web.Request) -> web.Response:
    return web.json_response({"secrets": await _store(request).secrets()})
