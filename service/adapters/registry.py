"""The adapter registry: which adapters exist, at which version, from which source.

Adapters come from the adapter directory (scanned at start and on an admin rescan) and from the
load API (`POST /v1/load_lora_adapter`: a local path, a hub repo or object storage, see
`service.adapters.sources`). Every package goes through the same checks before anything reaches
the engine: name, manifest, safetensors only, LoRA, base fingerprint, size.

A package is refused, with a log line saying why, when any check fails; the refusal never stops
the other adapters from serving. Refused adapters stay listed (status "failed") so a request for
one gets a clear 404 naming the reason.

Versions: each package's version is a hash of its files (`sources.content_version`). Loading a
new version under a live name makes the new version current at once (new requests resolve to
it), while the records of earlier versions stay known by their key, `name@version`, so requests
that resolved to one finish on it. The engine's adapter tiers (`service.engine.residency`) key
everything by that key, so nothing computed with one version is ever used for another.

Releases (`service.adapters.release`): a name's current version is its stable one; a version
loaded with a traffic share is its canary until promoted or rolled back, and the version a
promotion or a replacement displaced is kept for one rollback. A version is first *staged*
(fetched, checked, known by its key so the engine can load it, answering no request), then the
serving layer gates it (`service.adapters.gate`) and installs or refuses it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from service.adapters import sources
from service.adapters.desired import Serving
from service.adapters.downloads import DownloadCache
from service.adapters.manifest import parse_adapter_name
from service.adapters.package import AdapterRejected
from service.adapters.records import AdapterRecord, PackageChecks, load_onto, read_files
from service.adapters.release import Canary, Role, parse_traffic
from service.adapters.sources import SourceError
from service.errors import AdapterUnavailable, NotFoundError
from service.names import AdapterKey

log = logging.getLogger(__name__)


class AdapterExists(Exception):
    """A load under a name that is served already, without `load_inplace`."""


class AdapterRegistry:
    def __init__(
        self,
        directory: Path,
        *,
        base_id: str,
        base_fingerprint: str,
        download_dir: Path | None = None,
        allowed_sources: list[str] | tuple[str, ...] = (),
        max_bytes: int = 2 << 30,
    ):
        self.directory = directory
        self.base_id = base_id
        self.checks = PackageChecks(base_id, base_fingerprint, max_bytes)
        # Remote packages land here, one directory per version, shared with other replicas.
        self.download_dir = download_dir
        self._downloads = DownloadCache(download_dir) if download_dir is not None else None
        self.allowed_sources = list(allowed_sources)
        self._records: dict[str, AdapterRecord] = {}  # name -> its current version
        self._versions: dict[AdapterKey, AdapterRecord] = {}  # every version requests may hold
        self._loading: dict[str, str] = {}  # name -> source, while the load API fetches it
        self._gating: dict[str, AdapterRecord] = {}  # name -> a staged version being gated
        self._canaries: dict[str, Canary] = {}  # name -> its canary version and share
        self._previous: dict[str, AdapterRecord] = {}  # name -> the version a rollback returns to
        self._refused: dict[str, AdapterRecord] = {}  # name -> its last version the gate refused
        self._lock = threading.Lock()  # loads through the API run on threads of their own
        if self._downloads is not None:
            self._downloads.sweep()  # fetches a dead process did not finish (M6)

    def scan(self) -> list[AdapterRecord]:
        """Validate every package in the directory (a missing directory holds no adapters)."""
        with self._lock:
            self._records = {**self.checks.read_directory(self.directory), **self._api_records()}
            self._remember(self._records.values())
        return list(self._records.values())

    def rescan(self, *, stage: bool = False) -> dict[str, Any]:
        """Scan the directory again (admin): which packages were added, removed, or changed on
        disk. A changed package is a new version; adapters loaded through the API are kept.

        With `stage`, the added and changed packages that are valid are only staged (listed
        under "staged"): their names keep what they served until the gate installs them."""
        with self._lock:
            fresh = self.checks.read_directory(self.directory)
            old = {n: r for n, r in self._records.items() if r.origin == "directory"}
            diff = {
                "added": sorted(set(fresh) - set(old)),
                "removed": sorted(set(old) - set(fresh)),
                "changed": sorted(
                    n
                    for n in set(fresh) & set(old)
                    if (fresh[n].version, fresh[n].signature) != (old[n].version, old[n].signature)
                ),
            }
            for name in set(fresh) & set(old):  # unchanged packages keep their record
                if name not in diff["changed"]:
                    fresh[name] = old[name]
            staged: list[AdapterRecord] = []
            if stage:
                for name in diff["added"] + diff["changed"]:
                    if fresh[name].status == "ready" and name not in self._api_records():
                        staged.append(fresh[name])
                        self._gating[name] = fresh[name]
                        if name in old:
                            fresh[name] = old[name]
                        else:
                            del fresh[name]
            for name in diff["removed"]:
                self._forget(name)
            # API loads win over a directory package of the same name.
            self._records = {**fresh, **self._api_records()}  # one assignment: never a mix
            self._remember([*fresh.values(), *staged])
        return {**diff, "staged": staged}

    def _api_records(self) -> dict[str, AdapterRecord]:
        return {n: r for n, r in self._records.items() if r.origin == "api"}

    def _remember(self, records: Any) -> None:
        for record in records:
            if record.status == "ready":
                self._versions[record.key] = record

    # --- the load API -------------------------------------------------------------------------

    def register(self, name: str, spec: str, *, replace: bool = False) -> AdapterRecord:
        """Stage and install at once, ungated (tests and benchmarks; the service gates)."""
        record = self.stage(name, spec, replace=replace)
        self.install(record)
        return record

    def stage(self, name: str, spec: str, *, replace: bool = False) -> AdapterRecord:
        """Fetch and check the package at `spec` for `name` (blocking: network and disk; the
        service calls it on a thread). The version is known by its key from then on (the engine
        may load it) but answers no request until `install`; `refuse` drops it. With `replace`,
        a served name may get a new version.

        Raises ValueError (a bad name), AdapterExists, SourceError or AdapterRejected; on any
        of them nothing changes, and a served version keeps serving.
        """
        name = parse_adapter_name(name)
        if name == self.base_id:
            raise ValueError(f"adapter name {name!r} collides with the base model's id")
        source = sources.parse_source(spec)
        if not sources.allowed(source, self.allowed_sources, self.directory):
            raise SourceError(
                f"{source} is not an allowed adapter source; allowed: the adapter directory"
                + (f" and {self.allowed_sources}" if self.allowed_sources else "")
                + " (set ADAPTER_SOURCES)"
            )
        with self._lock:
            if name in self._loading or name in self._gating:
                raise AdapterExists(f"the adapter {name!r} is being loaded already")
            if name in self._records and self._records[name].status == "ready" and not replace:
                raise AdapterExists(
                    f"The lora adapter '{name}' has already been loaded. If you want to load the "
                    "adapter in place, set 'load_inplace' to True."
                )
            self._loading[name] = str(source)
        try:
            record = self.checks.fetch(name, source, self._downloads)
            if source.remote:  # the cache lets go of the versions this replica no longer needs
                self._prune(record)
            with self._lock:
                self._gating[name] = record
                self._remember([record])
        finally:
            with self._lock:
                del self._loading[name]
        log.info("adapter %r version %s staged from %s", name, record.version, source)
        return record

    def install(self, record: AdapterRecord, *, traffic: float | None = None) -> None:
        """Serve a staged version: as the name's stable version (the one it replaces is kept
        for a rollback), or, with a `traffic` share, as its canary beside the stable one."""
        name = record.name
        with self._lock:
            self._gating.pop(name, None)
            self._refused.pop(name, None)
            stable = self._records.get(name)
            if traffic is not None:
                parse_traffic(traffic)
                if stable is None or stable.status != "ready":
                    raise AdapterRejected(f"the adapter {name!r} has no serving version to split traffic with")
                if stable.version == record.version:
                    raise AdapterRejected(f"version {record.version} of {name!r} is its stable version already")
                self._canaries[name] = Canary(record, traffic)
                log.info("adapter %r version %s: canary for %.1f%% of requests", name, record.version, 100 * traffic)
                return
            self._canaries.pop(name, None)
            if stable is not None and stable.status == "ready" and stable.version != record.version:
                self._previous[name] = stable
            self._records = {**self._records, name: record}
        log.info("adapter %r version %s serving", name, record.version)

    def refuse(self, record: AdapterRecord, reason: str) -> None:
        """A staged (or, at start, a current) version that failed its gate: never served; listed
        with the reason. The name's serving versions are untouched."""
        with self._lock:
            self._gating.pop(record.name, None)
            self._versions.pop(record.key, None)
            failed = AdapterRecord(
                record.name,
                record.path,
                "failed",
                record.manifest,
                error=reason,
                signature=record.signature,
                version=record.version,
                source=record.source,
                origin=record.origin,
            )
            self._refused[record.name] = failed
            if self._records.get(record.name) is record:  # at start: nothing else serves the name
                self._records = {**self._records, record.name: failed}
        log.error("adapter %r version %s refused: %s", record.name, record.version, reason)

    def unstage(self, record: AdapterRecord) -> None:
        """A staged version that will not be installed after all (its load failed)."""
        with self._lock:
            if self._gating.get(record.name) is record:
                del self._gating[record.name]
                if not self._serves(record.key):
                    self._versions.pop(record.key, None)

    # --- releases -----------------------------------------------------------------------------

    def pick(self, name: str, user: str | None = None) -> tuple[AdapterRecord, Role]:
        """The version that answers a new request for `name`: the stable one, or its canary
        for the canary's share of users (`service.adapters.release`)."""
        stable = self.get(name)
        canary = self._canaries.get(name)
        if canary is not None and canary.takes(name, user):
            return canary.record, "canary"
        return stable, "stable"

    def promote(self, name: str) -> AdapterRecord:
        """The canary becomes the stable version (the old stable is kept for a rollback)."""
        with self._lock:
            canary = self._canaries.get(name)
        if canary is None:
            raise AdapterRejected(f"the adapter {name!r} has no canary to promote")
        self.install(canary.record)
        return canary.record

    def rollback(self, name: str, reason: str = "") -> AdapterRecord:
        """Drop the canary; with none, return to the version the last promotion or replacement
        displaced. Returns the version that now answers."""
        with self._lock:
            stable = self._records.get(name)
            if self._canaries.pop(name, None) is not None:
                log.warning("adapter %r: canary rolled back%s", name, f": {reason}" if reason else "")
                return self.get(name)
            previous = self._previous.pop(name, None)
            if previous is None or AdapterKey(name, previous.version) not in self._versions:
                raise AdapterRejected(f"the adapter {name!r} has no canary and no earlier version to roll back to")
            self._records = {**self._records, name: previous}
        log.warning("adapter %r rolled back to version %s (from %s)", name, previous.version, stable and stable.version)
        return previous

    def set_traffic(self, name: str, traffic: float) -> Canary:
        with self._lock:
            canary = self._canaries.get(name)
            if canary is None:
                raise AdapterRejected(f"the adapter {name!r} has no canary")
            canary.traffic = parse_traffic(traffic)
        return canary

    def observe(
        self, name: str, role: Role, failed: bool, *, margin: float | None, min_requests: int
    ) -> tuple[str, str] | None:
        """Count a request's outcome for the canary comparison; roll the canary back when it
        fails more than the stable by `margin` (None: never automatically), and return its
        version and why."""
        canary = self._canaries.get(name)
        if canary is None:
            return None
        canary.count(role, failed)
        reason = None if margin is None else canary.failing(margin, min_requests)
        if reason is not None:
            with self._lock:
                if self._canaries.get(name) is canary:
                    del self._canaries[name]
                else:
                    reason = None
            if reason:
                log.warning("adapter %r: canary %s rolled back automatically: %s", name, canary.version, reason)
        return (canary.version, reason) if reason else None

    def serving(self, name: str) -> Serving:
        """The sources `name` serves now, stable and canary (for the releases file's plan)."""
        with self._lock:
            stable, canary = self._records.get(name), self._canaries.get(name)
        return Serving(
            stable=_resolved(stable.source) if stable is not None and stable.status == "ready" else None,
            canary=_resolved(canary.record.source) if canary else None,
            traffic=canary.traffic if canary else None,
        )

    def release(self, name: str) -> dict[str, Any]:
        """The name's versions as `/v1/models` shows them."""
        canary = self._canaries.get(name)
        previous = self._previous.get(name)
        refused = self._refused.get(name)
        gating = self._gating.get(name)
        return {
            "canary": {"version": canary.version, "traffic": canary.traffic} if canary else None,
            "previous": previous.version if previous else None,
            "gating": gating.version if gating else None,
            "refused": {"version": refused.version, "error": refused.error} if refused else None,
        }

    def _serves(self, key: AdapterKey) -> bool:
        stable, canary = self._records.get(key.name), self._canaries.get(key.name)
        return (stable is not None and stable.key == key) or (canary is not None and canary.version == key.version)

    def _forget(self, name: str) -> None:
        self._canaries.pop(name, None)
        self._previous.pop(name, None)

    def _prune(self, fetched: AdapterRecord) -> None:
        """Let go of the downloaded versions of its name but the one just fetched, the serving
        ones and the one a rollback returns to (requests that resolved to those may still need
        to load them).
        Their directories go unless another replica sharing the cache still holds them."""
        assert self._downloads is not None
        name = fetched.name
        with self._lock:
            canary = self._canaries.get(name)
            serving = (fetched, self._records.get(name), self._previous.get(name), canary.record if canary else None)
            kept = {r.version for r in serving if r is not None and r.version is not None}
        try:
            released = self._downloads.prune(name, kept)
        except OSError as exc:  # the version is installed: a failed cleanup must not fail its load
            log.warning("adapter %r: cannot prune its downloaded versions: %s", name, exc)
            return
        with self._lock:
            for version in released:
                self._versions.pop(AdapterKey(name, version), None)

    def unregister(self, name: str) -> AdapterRecord:
        """Stop serving `name` (vLLM's unload): new requests get 404; running ones finish."""
        with self._lock:
            record = self._records.get(name)
            if record is None:
                raise NotFoundError(f"The lora adapter '{name}' cannot be found.")
            self._records = {n: r for n, r in self._records.items() if n != name}
            self._forget(name)
            self._refused.pop(name, None)
        log.info("adapter %r unregistered", name)
        return record

    def loading(self) -> dict[str, str]:
        """Names being fetched by the load API, and from where."""
        return dict(self._loading)

    def read_package(self, key: AdapterKey | str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(adapter_config.json, tensors) of one version, checked against its version hash."""
        return read_files(self.version(key))

    def mark_failed(self, key: AdapterKey | str, reason: str) -> None:
        """A version that cannot be loaded: refused from now on, with the reason (if current,
        listed as failed until a rescan or a new load)."""
        record = self._versions.pop(AdapterKey.of(key), None)
        if record is not None:
            record.status, record.error = "failed", reason

    def version(self, key: AdapterKey | str) -> AdapterRecord:
        """The record of one version by key (or of the current version by a bare name)."""
        key = AdapterKey.of(key)
        record = self._versions.get(key) if key.version is not None else self._records.get(key.name)
        if record is None or record.status != "ready":
            raise AdapterUnavailable(f"the adapter {str(key)!r} is not available")
        return record

    def current(self, key: AdapterKey | str) -> bool:
        """Whether this key is a version its adapter serves new requests with (stable or
        canary; not replaced, not unloaded)."""
        key = AdapterKey.of(key)
        record = self._records.get(key.name)
        return record is not None and (key.version is None or self._serves(key))

    def records(self) -> list[AdapterRecord]:
        return list(self._records.values())

    def load(self, model: Any, name: str, on_load: Any = None) -> Any:
        """Load the current version of `name` onto `model` as a PEFT adapter (tests, benches)."""
        return load_onto(model, self.get(name), on_load)

    def attach(self, model: Any, on_load: Any = None) -> Any:
        """Load every valid adapter (tests and benchmarks; the service loads lazily)."""
        for record in self.ready():
            try:
                model = self.load(model, record.name, on_load)
            except NotFoundError:
                continue
        return model

    # --- lookups ------------------------------------------------------------------------------

    def ready(self) -> list[AdapterRecord]:
        return [r for r in self._records.values() if r.status == "ready"]

    def get(self, name: str) -> AdapterRecord:
        """The ready record of `name`; NotFoundError if there is none, AdapterUnavailable if it
        failed."""
        record = self._records.get(name)
        if record is None:
            raise NotFoundError(f"the adapter {name!r} does not exist")
        if record.status != "ready":
            raise AdapterUnavailable(f"the adapter {name!r} is not available: {record.error}")
        return record

    def __contains__(self, name: str) -> bool:
        return name in self._records


def _resolved(source: str) -> str:
    """A recorded source as `parse_source` writes it (a directory package's path, resolved), so
    it compares with a source someone declares."""
    try:
        return str(sources.parse_source(source))
    except SourceError:
        return source
