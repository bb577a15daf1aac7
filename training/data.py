"""Records in, tokenized examples out: loading (local JSONL or hub), checks, split, masking."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.adapters.manifest import AdapterManifest


class DataError(ValueError):
    """A dataset problem, worded for the person who runs the training."""


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            check_fields(record, required, f"{path}:{number}")
            records.append(record)
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def check_fields(record: dict[str, Any], required: tuple[str, ...], where: str) -> None:
    missing = [f for f in required if record.get(f) in (None, "")]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")


def load_records(source: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """A local JSONL file, or a hub dataset id (its train split)."""
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json") or path.exists():
        return read_jsonl(path, required)
    from datasets import load_dataset

    try:
        dataset = load_dataset(source, split="train")
    except Exception as exc:
        raise DataError(f"cannot load the hub dataset {source!r}: {exc}") from exc
    records = [dict(r) for r in dataset]
    for i, record in enumerate(records):
        check_fields(record, required, f"{source}[{i}]")
    return records


def sha256_of(source: str) -> str | None:
    path = Path(source).expanduser()
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split(records: list[Any], eval_size: int, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded shuffle, then the first `eval_size` records are held out."""
    if eval_size >= len(records):
        raise DataError(f"eval_size {eval_size} leaves no training records (have {len(records)})")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = [records[i] for i in order[:eval_size]]
    train = [records[i] for i in order[eval_size:]]
    return train, held


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: the loss covers the response and its EOS only


def tokenize_example(
    tokenizer: Any, manifest: AdapterManifest, inputs: dict[str, str], target: str, max_length: int
) -> Example | None:
    """Prompt from the manifest's template, then response + EOS; None if the prompt won't fit.

    EOS is appended as a token id and labelled, so the adapter learns to stop. Labels are built
    here, not from the pad id, because pad and EOS are the same token for SmolLM2 and a collator
    that masks by pad id would mask the EOS too.
    """
    prompt_ids = tokenizer(manifest.render_prompt(inputs)).input_ids
    response_ids = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) > max_length - 8:
        return None
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return Example(ids, labels)
