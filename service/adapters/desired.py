"""The release state an operator declares for the whole fleet (RELEASES_FILE), and the steps
that bring one replica to it.

The admin calls (`promote`, `rollback`, `traffic`) change one replica. Behind a Kubernetes
Service every replica must agree, and a pod that restarts must come back on the release the
others serve, not on the adapter directory's versions. So the release may instead be declared in
a file, mounted from a ConfigMap that every replica reads:

    releases:
      dolly:
        stable: s3://adapters/dolly/2026-12-01
        canary: {source: s3://adapters/dolly/2026-12-07, traffic: 0.1}

Each replica reads it at start and again whenever its content changes (a ConfigMap edit reaches
mounted files within a minute or so, without a restart), compares it with what it serves, and
takes the steps between the two: load a stable version, promote the canary (when the declared
stable version is the canary's source), load a canary, change its share, drop it. Promote is an
edit that moves the canary's source to `stable:`; rollback is an edit that removes `canary:`
(or puts the old source back under `stable:`). Names the file does not list are left as they are.

Every load takes the load API's path: allowed sources only, the gate first. A step that fails
(the gate refuses the version, the source cannot be read) leaves the name as it was and skips
the name's later steps; it is not retried until the file changes again (or an admin asks for a
sync), so a refused version is not downloaded and gated every few seconds. The same holds for a
replica's automatic rollback: the canary stays off that replica until the file changes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from service.adapters.release import parse_traffic
from service.adapters.sources import SourceError, parse_source

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ReleasesError(ValueError):
    """RELEASES_FILE cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class CanarySpec:
    source: str
    traffic: float


@dataclass(frozen=True)
class Release:
    """What one name should serve: its stable version's source, and optionally a canary."""

    stable: str
    canary: CanarySpec | None = None


@dataclass(frozen=True)
class Serving:
    """What one name serves now on this replica (sources as the registry records them)."""

    stable: str | None = None
    canary: str | None = None
    traffic: float | None = None


Action = Literal["stable", "promote", "canary", "traffic", "drop"]


@dataclass(frozen=True)
class Step:
    action: Action
    name: str
    source: str | None = None
    traffic: float | None = None

    def __str__(self) -> str:
        match self.action:
            case "stable":
                return f"{self.name}: serve {self.source} as the stable version"
            case "canary":
                return f"{self.name}: serve {self.source} as the canary for a share of {self.traffic}"
            case "traffic":
                return f"{self.name}: set the canary's share to {self.traffic}"
            case "promote":
                return f"{self.name}: promote the canary"
        return f"{self.name}: drop the canary"


@dataclass(frozen=True)
class Declared:
    """One reading of the file: its releases and a digest of its bytes (what changed means)."""

    releases: dict[str, Release]
    digest: str


def read(path: str | Path) -> Declared:
    """Read and check the file; ReleasesError naming the field when it is wrong."""
    try:
        raw = Path(path).read_bytes()
        document = yaml.safe_load(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ReleasesError(f"RELEASES_FILE {path}: {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if document is None:
        return Declared({}, digest)
    entries = document.get("releases") if isinstance(document, dict) else None
    if not isinstance(document, dict) or set(document) != {"releases"} or not isinstance(entries, dict | None):
        raise ReleasesError(f"RELEASES_FILE {path}: a mapping 'releases' of adapter name to its release is required")
    return Declared({str(n): _release(str(n), spec, path) for n, spec in (entries or {}).items()}, digest)


def _release(name: str, spec: Any, path: str | Path) -> Release:
    where = f"RELEASES_FILE {path}: releases.{name}"
    if not _NAME.match(name):
        raise ReleasesError(f"{where}: an adapter name is letters, digits, '_', '.' or '-' (at most 64)")
    if not isinstance(spec, dict) or "stable" not in spec:
        raise ReleasesError(f"{where}: a mapping with 'stable' (the stable version's source) is required")
    unknown = set(spec) - {"stable", "canary"}
    if unknown:
        raise ReleasesError(f"{where}: unknown fields {sorted(unknown)}")
    stable = _source(spec["stable"], f"{where}.stable")
    canary = None
    if spec.get("canary") is not None:
        body = spec["canary"]
        if not isinstance(body, dict) or set(body) != {"source", "traffic"}:
            raise ReleasesError(f"{where}.canary: a mapping of 'source' and 'traffic' is required")
        traffic = body["traffic"]
        try:
            if isinstance(traffic, bool) or not isinstance(traffic, int | float):
                raise ValueError(f"traffic must be a number, not {traffic!r}")
            parse_traffic(float(traffic))
        except ValueError as exc:
            raise ReleasesError(f"{where}.canary.traffic: {exc}") from None
        canary = CanarySpec(_source(body["source"], f"{where}.canary.source"), float(traffic))
        if canary.source == stable:
            raise ReleasesError(f"{where}.canary.source: the canary is the stable version ({stable})")
    return Release(stable, canary)


def _source(spec: Any, where: str) -> str:
    """The source as the registry records it (`str(Source)`), so the two compare."""
    if not isinstance(spec, str):
        raise ReleasesError(f"{where}: a source (a path, hf://, s3:// or gs://) is required")
    try:
        return str(parse_source(spec))
    except SourceError as exc:
        raise ReleasesError(f"{where}: {exc}") from None


def plan(releases: dict[str, Release], serving: dict[str, Serving]) -> list[Step]:
    """The steps from what each declared name serves to its release, in order, per name."""
    steps: list[Step] = []
    for name, want in releases.items():
        have = serving.get(name, Serving())
        canary = have.canary
        if want.stable != have.stable:
            if want.stable == have.canary:
                steps.append(Step("promote", name))
            else:  # a new stable version replaces the canary too
                steps.append(Step("stable", name, want.stable))
            canary = None
        if want.canary is None:
            if canary is not None:
                steps.append(Step("drop", name))
        elif want.canary.source != canary:
            steps.append(Step("canary", name, want.canary.source, want.canary.traffic))
        elif want.canary.traffic != have.traffic:
            steps.append(Step("traffic", name, traffic=want.canary.traffic))
    return steps
