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

from service.errors import AuthenticationError, PermissionDeniedError, RateLimited
from service.tenants import EVERYONE, NOBODY, Tenant, Tenants, key_id


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


def tenant_of(request: Request) -> Tenant:
    """The tenant the request's key belongs to (set by require_api_key)."""
    return getattr(request.state, "tenant", EVERYONE)


async def require_api_key(request: Request) -> None:
    """The caller's tenant (TENANTS_FILE, or API_KEYS as one tenant), into `request.state`;
    everyone without keys, or on the trusted local listener."""
    directory: Tenants = request.app.state.tenants
    request.state.tenant = EVERYONE
    if not directory.tenants or _local_trusted(request):
        return
    token = _bearer(request)
    tenant = directory.authenticate(token) if token is not None else None
    if tenant is None:
        raise AuthenticationError("a valid API key is required: 'Authorization: Bearer <key>'")
    request.state.tenant = tenant


async def require_quota(request: Request) -> None:
    """One request from the tenant's requests-per-minute, if its tokens are not spent: else
    429 with Retry-After (counted per tenant)."""
    tenant = tenant_of(request)
    metrics = request.app.state.hotswap.metrics
    limited = request.app.state.rate_limits.acquire(tenant)
    if limited is not None:
        limit, seconds = limited
        metrics.tenant_limited.labels(tenant.id, limit).inc()
        raise RateLimited(
            f"the {limit} per minute of this API key's tenant are spent; retry later", retry_after=seconds
        )
    metrics.tenant_requests.labels(tenant.id).inc()


async def require_admin_key(request: Request) -> None:
    """An admin key (every admin action), or the key of a tenant with `admin_adapters` (load,
    unload and pin of those alone; the routes check the name). The actor, for the audit log,
    goes into `request.state.actor`: a key's id or a tenant's, never the key."""
    keys: list[str] = request.app.state.settings.admin_api_keys
    request.state.admin_tenant = None
    if _local_trusted(request):
        request.state.actor = "local"
        return
    token = _bearer(request)
    if token is not None and keys and key_matches(token, keys):
        request.state.actor = f"admin key {key_id(token)}"
        return
    tenant = request.app.state.tenants.authenticate(token) if token is not None else None
    if tenant is not None and tenant.admin_adapters:
        request.state.actor, request.state.admin_tenant = f"tenant {tenant.id}", tenant
        return
    if not keys:
        raise PermissionDeniedError(
            "the admin API is disabled; set HOTSWAP_ADMIN_API_KEYS to enable it", code="admin_disabled"
        )
    raise AuthenticationError("a valid admin key is required: 'Authorization: Bearer <key>'")


def admin_scope(request: Request, adapter: str | None) -> None:
    """A tenant's admin key may act on the adapters its `admin_adapters` name, and on nothing
    else (None: a service-wide action such as rescan): PermissionDeniedError otherwise, decided
    by the name alone, so it tells nothing of what exists."""
    tenant: Tenant | None = getattr(request.state, "admin_tenant", None)
    if tenant is None:
        return
    if adapter is None:
        raise PermissionDeniedError("this action needs an admin key; a tenant's key acts on its own adapters")
    if not tenant.may_admin(adapter):
        raise PermissionDeniedError(f"this key may not manage an adapter named {adapter!r}", param="lora_name")


async def require_metrics_key(request: Request) -> None:
    """METRICS_REQUIRE_KEY: an API or admin key. Who reads goes into `request.state.metrics_reader`:
    None (everything) for the admin key, the local listener, or a service without two tenants;
    else the key's tenant (NOBODY without one), which sees no other tenant's detail."""
    settings = request.app.state.settings
    token = _bearer(request)
    admin = token is not None and bool(settings.admin_api_keys) and key_matches(token, settings.admin_api_keys)
    directory: Tenants = request.app.state.tenants
    tenant = directory.authenticate(token) if token is not None and not admin else None
    full = admin or _local_trusted(request) or not directory.multi
    request.state.metrics_reader = None if full else (tenant or NOBODY)
    if settings.metrics_require_key and not (admin or tenant is not None):
        raise AuthenticationError("/metrics requires an API key: 'Authorization: Bearer <key>'")
