"""Writes the adapter package the service serves as it is (DESIGN.md "Adapter package")."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

from service.adapters.manifest import AdapterManifest
from service.base_model import ModelSource
from training.recipes import Task

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def draft_manifest(task: Task, name: str, source: ModelSource) -> AdapterManifest:
    """The manifest minus run results: enough to render prompts exactly as serving will."""
    return AdapterManifest(
        name=name,
        description=task.description,
        base_model={"id": source.served_id, "fingerprint": source.fingerprint},
        prompt_template=task.prompt_template,
        input_fields=task.input_fields,
        output=task.output,
    )


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def save_adapter(peft_model: Any, out: Path) -> Path:
    """The PEFT half of a package: safetensors weights and `adapter_config.json`."""
    peft_model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's boilerplate card; hotswap.json says it all
    _sort_target_modules(out / "adapter_config.json")
    return out


def write_package(
    manifest: AdapterManifest,
    out: Path,
    *,
    adapter: Path,
    training: dict[str, Any],
    metrics: dict[str, Any],
    log_history: list[dict[str, Any]] | None = None,
) -> Path:
    """`adapter`: the directory `save_adapter` wrote (the weights that were evaluated); its files
    are copied as they are. When it is `out` itself (`--eval-only`), the weights stay untouched."""
    out.mkdir(parents=True, exist_ok=True)
    if adapter.resolve() != out.resolve():
        for name in ADAPTER_FILES:
            shutil.copyfile(adapter / name, out / name)
    final = manifest.model_copy(update={"training": training, "metrics": metrics})
    final.write(out)
    if log_history is not None:
        (out / "training_log.json").write_text(json.dumps(log_history, indent=1) + "\n")
    return out


def _sort_target_modules(config_path: Path) -> None:
    """PEFT keeps `target_modules` as a set and writes it in hash order, which differs between
    processes; sorted, two runs that train the same weights write the same package."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
