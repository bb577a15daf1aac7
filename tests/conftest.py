from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.fingerprint import fingerprint_files, weight_files
from tests.factories import make_lora_adapter, make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
# Converted and dummy checkpoints are cached inside the checkout (ignored by git), so repeated
# runs skip the GGUF conversion without touching the user's ~/.cache.
CACHE_DIR = Path(os.environ.get("HOTSWAP_TEST_CACHE", REPO / ".cache" / "hotswap"))


@dataclass(frozen=True)
class TinyWorld:
    base_dir: Path
    fingerprint: str
    adapter_dir: Path  # holds "alpha" and "beta", two random LoRA adapters


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    root = tmp_path_factory.mktemp("tiny")
    base_dir = make_tiny_llama(root / "tiny")
    fingerprint = fingerprint_files(weight_files(base_dir))
    adapters = root / "adapters"
    adapters.mkdir()
    make_lora_adapter(base_dir, adapters / "alpha", fingerprint=fingerprint, seed=1)
    make_lora_adapter(base_dir, adapters / "beta", fingerprint=fingerprint, seed=2)
    return TinyWorld(base_dir, fingerprint, adapters)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR
