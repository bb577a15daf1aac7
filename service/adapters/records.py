"""One version of an adapter as the registry knows it (`AdapterRecord`), and how records are made
and used: read from the adapter directory or checked from a load API source (`PackageChecks`),
its files read back for the engine against its version hash, and loaded onto a PEFT model."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from service.adapters import sources
from service.adapters.downloads import DownloadCache
from service.adapters.manifest import AdapterManifest
from service.adapters.package import AdapterRejected, package_signature, validate_package
from service.adapters.sources import CONFIG_FILE, WEIGHTS_FILE, Source, SourceError
from service.errors import AdapterUnavailable
from service.names import AdapterKey

log = logging.getLogger(__name__)


@dataclass
class AdapterRecord:
    name: str
    path: Path
    status: Literal["ready", "failed"]
    manifest: AdapterManifest | None = None
    error: str | None = None
    load_seconds: float | None = None
    signature: tuple = ()  # sizes and mtimes of the package's files: a changed package reloads
    version: str | None = None  # hash of the package's files (None when it could not be read)
    source: str = ""  # where it came from: a local path, hf://repo@revision, s3://...
    origin: Literal["directory", "api"] = "directory"  # the directory scan, or the load API
    registered: float = field(default_factory=time.time)

    @property
    def key(self) -> AdapterKey:
        """The engine's id of this version of the adapter."""
        return AdapterKey(self.name, self.version)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "error": self.error, "version": self.version}


@dataclass(frozen=True)
class PackageChecks:
    """What every package must pass before the registry records it as ready: the package
    contract against this base (`validate_package`) and the size limit; its version is the hash
    of its files."""

    base_id: str
    base_fingerprint: str
    max_bytes: int

    def check(self, path: Path, label: str, name: str | None = None) -> tuple[AdapterManifest, str]:
        """(manifest, version) of the package at `path`; AdapterRejected or SourceError if not."""
        manifest = validate_package(path, base_fingerprint=self.base_fingerprint, base_id=self.base_id, name=name)
        sources.check_size(path, self.max_bytes, label)
        return manifest, sources.content_version(path)

    def read_directory(self, directory: Path) -> dict[str, AdapterRecord]:
        """Every package in the adapter directory, by name; one that fails a check is recorded
        as failed with the reason (a missing directory holds no adapters)."""
        records: dict[str, AdapterRecord] = {}
        if not directory.is_dir():
            log.warning("adapter directory %s does not exist; serving the base only", directory)
            return records
        for path in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            signature = package_signature(path)
            try:
                manifest, version = self.check(path, f"the package {path.name!r}")
                record = AdapterRecord(
                    path.name, path, "ready", manifest, signature=signature, version=version, source=str(path)
                )
            except (AdapterRejected, SourceError, OSError) as exc:
                log.error("adapter %r refused: %s", path.name, exc)
                record = AdapterRecord(path.name, path, "failed", error=str(exc), signature=signature)
            records[record.name] = record
        return records

    def fetch(self, name: str, source: Source, downloads: DownloadCache | None) -> AdapterRecord:
        """The package at a load API source, checked, as a record for `name`: a local directory
        is used in place; a remote one is fetched into a staging directory of the download cache
        and installed there under its version (shared by the replicas that mount the cache)."""
        if not source.remote:
            path = Path(source.location)
            if not path.is_dir():
                raise SourceError(f"{source} is not a directory")
            manifest, version = self.check(path, str(source), name)
            return _api_record(name, path, manifest, version, source)
        if downloads is None:
            raise SourceError("remote adapter sources need a cache directory (CACHE_DIR)")
        try:
            with downloads.staging() as staging:
                sources.fetch(source, staging, max_bytes=self.max_bytes)
                manifest, version = self.check(staging, str(source), name)
                path = downloads.install(staging, name, version)
        except OSError as exc:  # the cache's disk: full, read-only, no locks (fetch errors are SourceErrors)
            raise SourceError(f"cannot store {source} in the adapter cache {downloads.root}: {exc}") from exc
        return _api_record(name, path, manifest, version, source)


def _api_record(name: str, path: Path, manifest: AdapterManifest, version: str, source: Source) -> AdapterRecord:
    return AdapterRecord(
        name,
        path,
        "ready",
        manifest,
        signature=package_signature(path),
        version=version,
        source=str(source),
        origin="api",
    )


def read_files(record: AdapterRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, tensors) of one version, read from disk and checked against its
    version hash: a package edited in place since it was registered is refused."""
    from safetensors.torch import load as load_tensors

    blobs = {n: (record.path / n).read_bytes() for n in sources.PACKAGE_FILES}
    if sources.version_of(blobs) != record.version:
        raise AdapterRejected(
            f"the files of {record.name!r} changed on disk since version {record.version} was "
            "registered; rescan or load it again"
        )
    return json.loads(blobs[CONFIG_FILE]), load_tensors(blobs[WEIGHTS_FILE])


def load_onto(model: Any, record: AdapterRecord, on_load: Any = None) -> Any:
    """Load one ready version onto `model` as a PEFT adapter named after it; return the model
    to run (tests and benchmarks: the engine reads the files itself).

    The first adapter wraps the base in a PeftModel; later ones are added with `load_adapter`.
    A package that fails to load is marked failed and removed again, so it cannot leave
    half-injected weights behind; AdapterUnavailable says why.
    """
    from peft import PeftModel

    name = record.name
    started = time.perf_counter()
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(record.path), adapter_name=name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, str(record.path), adapter_name=name, is_trainable=False)
    except Exception as exc:  # shape mismatch, corrupt tensors: refuse this one only
        record.status, record.error = "failed", f"cannot be loaded: {exc}"
        log.error("adapter %r refused: %s", name, record.error)
        if isinstance(model, PeftModel) and name in model.peft_config:
            model.delete_adapter(name)
        if on_load:
            on_load(name, "error", time.perf_counter() - started)
        raise AdapterUnavailable(f"the adapter {name!r} is not available: {record.error}") from exc
    record.load_seconds = time.perf_counter() - started
    log.info("adapter %r loaded in %.2fs", name, record.load_seconds)
    if on_load:
        on_load(name, "ok", record.load_seconds)
    model.eval()
    return model
