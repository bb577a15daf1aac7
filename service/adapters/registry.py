"""The adapter registry: scans the adapter directory, validates packages, attaches them to the base.

A package is refused, with a log line saying why, when its name, manifest, weights format or base
fingerprint is wrong; the refusal never stops the other adapters from serving. Refused adapters
stay listed (status "failed") so a request for one gets a clear 404 naming the reason.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from service.adapters.manifest import MANIFEST_FILE, AdapterManifest, parse_adapter_name
from service.errors import NotFoundError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class AdapterRejected(Exception):
    """An adapter package that cannot be served, with the reason."""


@dataclass
class AdapterRecord:
    name: str
    path: Path
    status: Literal["ready", "failed"]
    manifest: AdapterManifest | None = None
    error: str | None = None
    load_seconds: float | None = None
    signature: tuple = ()  # sizes and mtimes of the package's files: a changed package reloads

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "error": self.error}


def package_signature(path: Path) -> tuple:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def validate_package(path: Path, *, base_fingerprint: str, base_id: str) -> AdapterManifest:
    """Check one adapter directory against the package contract; raise AdapterRejected if not."""
    try:
        name = parse_adapter_name(path.name)
    except ValueError as exc:
        raise AdapterRejected(str(exc)) from None
    if name == base_id:
        raise AdapterRejected(f"adapter name {name!r} collides with the base model's id")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterRejected(f"pickle weight files are refused (use safetensors): {pickles}")
    for required in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
        if not (path / required).is_file():
            raise AdapterRejected(f"missing {required}")
    try:
        peft_config = json.loads((path / CONFIG_FILE).read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterRejected(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if peft_config.get("peft_type") != "LORA":
        raise AdapterRejected(f"only LoRA adapters are served, not {peft_config.get('peft_type')!r}")
    try:
        manifest = AdapterManifest.read(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterRejected(f"{MANIFEST_FILE} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise AdapterRejected(f"{MANIFEST_FILE} is invalid: {_brief(exc)}") from None
    if manifest.name != name:
        raise AdapterRejected(f"manifest name {manifest.name!r} differs from the directory name")
    if manifest.base_model.fingerprint != base_fingerprint:
        raise AdapterRejected(
            f"trained on base {manifest.base_model.id!r} (fingerprint "
            f"{manifest.base_model.fingerprint}), but the loaded base is {base_id!r} "
            f"(fingerprint {base_fingerprint})"
        )
    return manifest


def _brief(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}" for err in exc.errors())


class AdapterRegistry:
    def __init__(self, directory: Path, *, base_id: str, base_fingerprint: str):
        self.directory = directory
        self.base_id = base_id
        self.base_fingerprint = base_fingerprint
        self._records: dict[str, AdapterRecord] = {}

    def scan(self) -> list[AdapterRecord]:
        """Validate every package in the directory (a missing directory holds no adapters)."""
        self._records = self._read_all()
        return list(self._records.values())

    def rescan(self) -> dict[str, list[str]]:
        """Scan again (admin): which packages were added, removed, or changed on disk.

        Changed packages must be reloaded by whoever holds them loaded (the residency).
        """
        fresh = self._read_all()
        old = self._records
        diff = {
            "added": sorted(set(fresh) - set(old)),
            "removed": sorted(set(old) - set(fresh)),
            "changed": sorted(n for n in set(fresh) & set(old) if fresh[n].signature != old[n].signature),
        }
        self._records = fresh  # one assignment: readers see the old or the new set, never a mix
        return diff

    def _read_all(self) -> dict[str, AdapterRecord]:
        records: dict[str, AdapterRecord] = {}
        if not self.directory.is_dir():
            log.warning("adapter directory %s does not exist; serving the base only", self.directory)
            return records
        for path in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            if path.name.startswith("."):
                continue
            signature = package_signature(path)
            try:
                manifest = validate_package(path, base_fingerprint=self.base_fingerprint, base_id=self.base_id)
                record = AdapterRecord(path.name, path, "ready", manifest, signature=signature)
            except AdapterRejected as exc:
                log.error("adapter %r refused: %s", path.name, exc)
                record = AdapterRecord(path.name, path, "failed", error=str(exc), signature=signature)
            records[record.name] = record
        return records

    def records(self) -> list[AdapterRecord]:
        return list(self._records.values())

    def load(self, model: Any, name: str, on_load: Any = None) -> Any:
        """Load one valid adapter onto `model` as a named PEFT adapter; return the model to run.

        The first adapter wraps the base in a PeftModel; later ones are added with
        `load_adapter`. A package that fails to load is marked failed and removed again, so it
        cannot leave half-injected weights behind; AdapterUnavailable says why.
        """
        from peft import PeftModel

        record = self.get(name, param="adapter")
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
            raise NotFoundError(f"the adapter {name!r} is not available: {record.error}", param="adapter") from exc
        record.load_seconds = time.perf_counter() - started
        log.info("adapter %r loaded in %.2fs", name, record.load_seconds)
        if on_load:
            on_load(name, "ok", record.load_seconds)
        model.eval()
        return model

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

    def get(self, name: str, *, param: str) -> AdapterRecord:
        record = self._records.get(name)
        if record is None:
            raise NotFoundError(f"the adapter {name!r} does not exist", param=param)
        if record.status != "ready":
            raise NotFoundError(f"the adapter {name!r} is not available: {record.error}", param=param)
        return record

    def __contains__(self, name: str) -> bool:
        return name in self._records
