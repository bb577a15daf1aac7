"""API-key authentication (OpenAI's `Authorization: Bearer <key>`).

Keys are checked by FastAPI dependencies attached to routers, so the decision follows the route
the ASGI scope's path matched: never a URL rebuilt from the Host header or forwarding headers,
which have let requests past key checks in other servers. A path that matches no route is a 404
without data, whatever it looks like.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from service.errors import AuthenticationError, PermissionDeniedError


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time comparison against every key (no early exit that would leak which), of
    SHA-256 digests: compare_digest on strings of unequal length returns at once, which told a
    key's length (security review L6)."""
    digest = hashlib.sha256(presented.encode()).digest()
    found = False
    for key in keys:
        found |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    return found


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _local_trusted(request: Request) -> bool:
    """A request that arrived on the loopback listener ADMIN_LOCAL_PORT (the socket it came in
    on, from the ASGI scope, never a header): only processes in the same pod reach it."""
    port = request.app.state.settings.admin_local_port
    server = request.scope.get("server") or (None, None)
    if not (bool(port) and server[1] == port and server[0] in ("127.0.0.1", "::1")):
        return False
    # A web page can reach a developer's loopback port through DNS rebinding, with its own
    # name in Host: only the loopback names are trusted (security review L3).
    host = request.headers.get("host", "")
    return host in {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}


async def require_api_key(request: Request) -> None:
    keys: list[str] = request.app.state.settings.api_keys
    if not keys or _local_trusted(request):
        return
    token = _bearer(request)
    if token is None or not key_matches(token, keys):
        raise AuthenticationError("a valid API key is required: 'Authorization: Bearer <key>'")


async def require_admin_key(request: Request) -> None:
    keys: list[str] = request.app.state.settings.admin_api_keys
    if _local_trusted(request):
        return
    if not keys:
        raise PermissionDeniedError(
            "the admin API is disabled; set HOTSWAP_ADMIN_API_KEYS to enable it", code="admin_disabled"
        )
    token = _bearer(request)
    if token is None or not key_matches(token, keys):
        raise AuthenticationError("a valid admin key is required: 'Authorization: Bearer <key>'")


async def require_metrics_key(request: Request) -> None:
    settings = request.app.state.settings
    if not settings.metrics_require_key:
        return
    token = _bearer(request)
    if token is None or not key_matches(token, settings.api_keys + settings.admin_api_keys):
        raise AuthenticationError("/metrics requires an API key: 'Authorization: Bearer <key>'")
