"""Tenants: who may use which adapter, how much, and who did what on the admin API.

A tenant is one customer or team sharing the base. `TENANTS_FILE` (YAML, mounted from a
Secret) names each one's API keys, the adapters it may use, its concurrency and rate limits,
and the adapters it may load through the admin API:

    tenants:
      acme:
        keys: ["sha256:9f86d08...", "a-plain-key"]  # digests (preferred) or plain keys
        adapters: ["acme-*", "dolly"]               # names or globs
        base: true                                  # may use the base model
        max_concurrent: 8                           # sequences in the engine at once
        requests_per_minute: 600
        tokens_per_minute: 200000                   # prompt and completion tokens
        admin_adapters: ["acme-*"]                  # may load, unload and pin these itself
        weight: 1                                   # its share of the batch against the others

Without the file, `API_KEYS` is one tenant that may use everything (and no keys: everyone).
An adapter a tenant may not use is a 404 exactly as if it did not exist, everywhere. Tenants come
from the file only, so metric labels stay bounded whatever requests say.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OPEN = "-"  # the tenant of a service without keys: everyone
DEFAULT = "default"  # the tenant API_KEYS make
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_FIELDS = {
    "keys",
    "adapters",
    "base",
    "max_concurrent",
    "requests_per_minute",
    "tokens_per_minute",
    "admin_adapters",
    "weight",
}


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str:
    """A key's identity in logs: the first 8 hex digits of its SHA-256 (never the key)."""
    return digest(key).hex()[:8]


@dataclass(frozen=True)
class Tenant:
    id: str
    digests: tuple[bytes, ...] = ()
    adapters: tuple[str, ...] = ("*",)  # names or globs
    base: bool = True
    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    admin_adapters: tuple[str, ...] = ()
    weight: float = 1.0

    def may_use(self, adapter: str | None) -> bool:
        """Whether it may run on `adapter` (None: the base)."""
        if adapter is None:
            return self.base
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)

    def may_admin(self, adapter: str) -> bool:
        """Whether it may load, unload or pin `adapter` through the admin API itself."""
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.admin_adapters)


EVERYONE = Tenant(OPEN)
NOBODY = Tenant("anonymous", adapters=(), base=True)  # an unauthenticated reader of /metrics


class TenantsError(ValueError):
    """A tenants file that cannot be served, with where."""


@dataclass
class Tenants:
    """The tenants of the service, and how a presented key finds its own."""

    tenants: list[Tenant] = field(default_factory=list)

    @property
    def multi(self) -> bool:
        """Whether tenants share the service (fair shares and separate queues apply)."""
        return len(self.tenants) > 1

    def authenticate(self, presented: str) -> Tenant | None:
        """The tenant whose key this is: every digest compared in constant time, no early exit
        that would tell which tenant or how long a key is."""
        found: Tenant | None = None
        candidate = digest(presented)
        for tenant in self.tenants:
            for known in tenant.digests:
                if hmac.compare_digest(candidate, known):
                    found = tenant
        return found

    def get(self, tenant_id: str) -> Tenant | None:
        return next((t for t in self.tenants if t.id == tenant_id), None)

    @classmethod
    def from_keys(cls, keys: list[str]) -> Tenants:
        """API_KEYS alone: one tenant that may use everything."""
        return cls([Tenant(DEFAULT, tuple(digest(k) for k in keys))] if keys else [])

    @classmethod
    def load(cls, path: str | Path) -> Tenants:
        """Parse TENANTS_FILE; TenantsError naming the tenant and field when it is wrong."""
        try:
            document = yaml.safe_load(Path(path).read_text("utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise TenantsError(f"TENANTS_FILE {path}: {exc}") from exc
        entries = (document or {}).get("tenants") if isinstance(document, dict) else None
        if not isinstance(entries, dict) or not entries:
            raise TenantsError(f"TENANTS_FILE {path}: a mapping 'tenants' of tenant id to its settings is required")
        tenants = [_parse(str(name), spec) for name, spec in entries.items()]
        seen: dict[bytes, str] = {}
        for tenant in tenants:
            for known in tenant.digests:
                if known in seen:
                    raise TenantsError(f"tenants {seen[known]!r} and {tenant.id!r} share a key")
                seen[known] = tenant.id
        return cls(tenants)


def _parse(name: str, spec: Any) -> Tenant:
    where = f"tenants.{name}"
    if not _ID.match(name):
        raise TenantsError(f"{where}: a tenant id is letters, digits, '_', '.' or '-' (at most 63)")
    if not isinstance(spec, dict):
        raise TenantsError(f"{where}: a mapping of its settings is required")
    unknown = set(spec) - _FIELDS
    if unknown:
        raise TenantsError(f"{where}: unknown fields {sorted(unknown)}")
    keys = spec.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise TenantsError(f"{where}.keys: a list of keys (plain, or 'sha256:<hex>' digests) is required")
    digests = tuple(bytes.fromhex(k[7:]) if _DIGEST.match(k) else digest(k) for k in keys)
    return Tenant(
        id=name,
        digests=digests,
        adapters=_patterns(spec.get("adapters", []), f"{where}.adapters"),
        base=_flag(spec.get("base", True), f"{where}.base"),
        max_concurrent=_count(spec.get("max_concurrent"), f"{where}.max_concurrent"),
        requests_per_minute=_count(spec.get("requests_per_minute"), f"{where}.requests_per_minute"),
        tokens_per_minute=_count(spec.get("tokens_per_minute"), f"{where}.tokens_per_minute"),
        admin_adapters=_patterns(spec.get("admin_adapters", []), f"{where}.admin_adapters"),
        weight=_weight(spec.get("weight", 1), f"{where}.weight"),
    )


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise TenantsError(f"{where}: a list of adapter names or globs is required")
    return tuple(value)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise TenantsError(f"{where}: true or false")
    return value


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TenantsError(f"{where}: a positive integer (or leave it out: no limit)")
    return value


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1000:
        raise TenantsError(f"{where}: a number in (0, 1000]")
    return float(value)


def from_settings(settings: Any) -> Tenants:
    """TENANTS_FILE's tenants, and API_KEYS as one more that may use everything."""
    tenants = Tenants.load(settings.tenants_file).tenants if settings.tenants_file else []
    if settings.api_keys:
        if any(t.id == DEFAULT for t in tenants):
            raise TenantsError(f"TENANTS_FILE names a tenant {DEFAULT!r}, which API_KEYS make: rename it")
        tenants.append(Tenant(DEFAULT, tuple(digest(k) for k in settings.api_keys)))
    return Tenants(tenants)


class RateLimits:
    """Per tenant, a requests bucket and a tokens bucket, refilled continuously to their
    per-minute rates (a full minute's worth at most). A request needs one request and a
    tokens bucket that is not in debt; its tokens are charged as they are known (prompt, then
    completion), so the bucket may go below zero, and the tenant waits until it refills."""

    def __init__(self, clock: Any = time.monotonic):
        self._clock = clock
        self._levels: dict[tuple[str, str], tuple[float, float]] = {}  # (tenant, kind) -> (level, when)
        self._lock = threading.Lock()

    def _level(self, tenant: str, kind: str, rate: int) -> float:
        now = self._clock()
        level, when = self._levels.get((tenant, kind), (float(rate), now))
        level = min(float(rate), level + (now - when) * rate / 60.0)
        self._levels[(tenant, kind)] = (level, now)
        return level

    def acquire(self, tenant: Tenant) -> tuple[str, float] | None:
        """Take one request; None when it may go, else (the limit, seconds until it may)."""
        with self._lock:
            if tenant.tokens_per_minute is not None:
                level = self._level(tenant.id, "tokens", tenant.tokens_per_minute)
                if level <= 0:
                    return "tokens", (1 - level) * 60.0 / tenant.tokens_per_minute
            if tenant.requests_per_minute is not None:
                level = self._level(tenant.id, "requests", tenant.requests_per_minute)
                if level < 1:
                    return "requests", (1 - level) * 60.0 / tenant.requests_per_minute
                self._levels[(tenant.id, "requests")] = (level - 1, self._clock())
        return None

    def charge(self, tenant: Tenant, tokens: int) -> None:
        """Tokens the tenant's requests used (prompt or completion)."""
        if tenant.tokens_per_minute is None or tokens <= 0:
            return
        with self._lock:
            level = self._level(tenant.id, "tokens", tenant.tokens_per_minute)
            self._levels[(tenant.id, "tokens")] = (level - tokens, self._clock())


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
