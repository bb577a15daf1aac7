"""One adapter package on disk, checked against the contract (DESIGN.md "Adapter package"):
name, manifest, safetensors only, LoRA, plain module names, the base's fingerprint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.adapters.manifest import MANIFEST_FILE, AdapterManifest, parse_adapter_name
from service.adapters.sources import CONFIG_FILE, WEIGHTS_FILE

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class AdapterRejected(Exception):
    """An adapter package that cannot be served, with the reason."""


def package_signature(path: Path) -> tuple:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def validate_package(path: Path, *, base_fingerprint: str, base_id: str, name: str | None = None) -> AdapterManifest:
    """Check one adapter directory against the package contract; raise AdapterRejected if not.
    The adapter's name is the directory's unless given: a package loaded through the API may be
    served under another name than its manifest's (vLLM's `lora_name` is the caller's choice)."""
    named = name is not None
    try:
        name = parse_adapter_name(name if name is not None else path.name)
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
    check_module_names(peft_config)
    try:
        manifest = AdapterManifest.read(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterRejected(f"{MANIFEST_FILE} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise AdapterRejected(f"{MANIFEST_FILE} is invalid: {_brief(exc)}") from None
    if manifest.name != name and not named:
        raise AdapterRejected(f"manifest name {manifest.name!r} differs from the directory name")
    if manifest.base_model.fingerprint != base_fingerprint:
        raise AdapterRejected(
            f"trained on base {manifest.base_model.id!r} (fingerprint "
            f"{manifest.base_model.fingerprint}), but the loaded base is {base_id!r} "
            f"(fingerprint {base_fingerprint})"
        )
    return manifest


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]{1,200}")


def check_module_names(peft_config: dict[str, Any]) -> None:
    """PEFT matches `target_modules` (a string), `layers_pattern` and the keys of `rank_pattern`
    and `alpha_pattern` as regular expressions, with Python's `re` under the GIL: one
    catastrophic pattern from a package froze the event loop and the engine together (security
    review M7: 1.6 s on 26 characters, doubling with each). Only plain module names are taken
    (or "all-linear"); anything else is refused when the package is validated."""
    targets = peft_config.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            raise AdapterRejected('target_modules must be a list of module names, or "all-linear"')
    elif targets is not None and not all(isinstance(t, str) and _PLAIN_NAME.fullmatch(t) for t in targets):
        raise AdapterRejected("target_modules must be plain module names (letters, digits, '_' and '.')")
    for key in ("rank_pattern", "alpha_pattern"):
        names = peft_config.get(key) or {}
        if not isinstance(names, dict) or not all(_PLAIN_NAME.fullmatch(n) for n in names):
            raise AdapterRejected(f"{key} keys must be plain module names (letters, digits, '_' and '.')")
    pattern = peft_config.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else pattern or []
    if not all(isinstance(p, str) and _PLAIN_NAME.fullmatch(p) for p in patterns):
        raise AdapterRejected("layers_pattern must be plain module names")


def _brief(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}" for err in exc.errors())
