"""Fingerprints of base-model weights, so an adapter is never served on a base it wasn't trained on.

Hashing every byte of a 7B checkpoint takes tens of seconds at each start; instead the fingerprint
hashes each weight file's name and size, its first 1 MiB (a safetensors or GGUF header with
every tensor's name, dtype and shape) and 32 evenly spaced 64 KiB samples of its data. Any
fine-tune changes essentially every weight, so two different checkpoints of one architecture
collide with negligible probability, while the cost stays O(1) in the model size. The scheme is
versioned ("hsfp1:") so it can change without silently matching old manifests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SCHEME = "hsfp1"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")
_HEAD = 1 << 20
_SAMPLE = 64 << 10
_SAMPLES = 32


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred over pickle shards."""
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def fingerprint_files(files: list[Path]) -> str:
    if not files:
        raise ValueError("no weight files to fingerprint")
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as fh:
            digest.update(fh.read(_HEAD))
            if size > _HEAD:
                step = (size - _HEAD) // _SAMPLES
                for i in range(_SAMPLES):
                    fh.seek(_HEAD + i * step)
                    digest.update(fh.read(_SAMPLE))
    return f"{SCHEME}:{digest.hexdigest()}"
