"""Which version of an adapter answers a request: the stable one, or a canary with a share.

A name has one stable version; a new version loaded with a traffic share (`"traffic": 0.1`)
becomes its canary and answers that share of the name's new requests. The split is sticky per
`user` (OpenAI's end-user id): a user's place in [0, 1) is a hash of the adapter's name and the
user, and the canary answers the users whose place lies below its share, so a user sees one
version, and raising the share only adds users to the canary. Requests without a `user` are
split at random in the same proportion.

`promote` makes the canary stable, `rollback` drops it (or, with no canary, returns to the
version the last promotion or replacement displaced). Both take effect for the next request
resolved; requests already running finish on the version they resolved to (the registry keeps
every version a request may hold, see `AdapterRegistry.version`).

An optional automatic rollback: when the canary's error rate exceeds the stable's by more than
a margin, over at least a minimum number of canary requests, the canary is dropped.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["stable", "canary"]


def place(name: str, user: str | None) -> float:
    """A user's sticky place in [0, 1) for `name` (a fresh random one without a user)."""
    if user is None:
        return random.random()
    digest = hashlib.sha256(f"{name}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def parse_traffic(value: float) -> float:
    """A canary share: more than 0 and less than 1 (1 is a promotion, 0 a rollback)."""
    if not 0.0 < value < 1.0:
        raise ValueError(f"traffic must lie strictly between 0 and 1, not {value}")
    return value


@dataclass
class Outcomes:
    """Requests and errors one version answered since the canary began."""

    requests: int = 0
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass
class Canary:
    """The canary of one name: its version, its share, and both versions' outcomes since it
    began (for the automatic rollback)."""

    record: Any  # the canary version's AdapterRecord
    traffic: float
    outcomes: dict[Role, Outcomes] = field(default_factory=lambda: {"stable": Outcomes(), "canary": Outcomes()})

    @property
    def version(self) -> str:
        return self.record.version

    def takes(self, name: str, user: str | None) -> bool:
        return place(name, user) < self.traffic

    def count(self, role: Role, failed: bool) -> None:
        outcome = self.outcomes[role]
        outcome.requests += 1
        outcome.errors += int(failed)

    def failing(self, margin: float, min_requests: int) -> str | None:
        """Why the canary should be rolled back (None: it should not)."""
        canary, stable = self.outcomes["canary"], self.outcomes["stable"]
        if canary.requests < min_requests or canary.rate <= stable.rate + margin:
            return None
        return (
            f"the canary's error rate {canary.rate:.3f} ({canary.errors}/{canary.requests}) exceeds the "
            f"stable's {stable.rate:.3f} ({stable.errors}/{stable.requests}) by more than {margin:g}"
        )
