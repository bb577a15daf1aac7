"""Optional API-key authentication for /v1/* (OpenAI's `Authorization: Bearer <key>`)."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import AuthenticationError


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time comparison against every key (no early exit that would leak which)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented.encode(), key.encode())
    return found


async def require_api_key(request: Request) -> None:
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key_matches(token.strip(), keys):
        raise AuthenticationError("a valid API key is required: 'Authorization: Bearer <key>'")
