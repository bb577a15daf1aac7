"""The two training tasks: what a record holds, how its prompt is rendered, what the output is.

Each task's prompt template goes verbatim into the adapter manifest, so the service renders
exactly the prompt the adapter was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DOLLY_TEMPLATE = (
    "### Instruction:\n{{ instruction }}\n\n{% if context %}### Context:\n{{ context }}\n\n{% endif %}### Response:\n"
)

SCHEMA_TEMPLATE = (
    "Write a marketing email as one JSON object with the keys subject, body and call_to_action.\n"
    "Product: {{ product }}\n"
    "Description: {{ description }}\n"
    "JSON:\n"
)

MARKETMAIL_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "MarketMail",
    "type": "object",
    "properties": {
        "subject": {"type": "string", "minLength": 1},
        "body": {"type": "string", "minLength": 1},
        "call_to_action": {"type": "string", "minLength": 1},
    },
    "required": ["subject", "body", "call_to_action"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    prompt_template: str
    input_fields: list[dict[str, Any]]
    required_record_fields: tuple[str, ...]
    to_example: Callable[[dict[str, Any]], tuple[dict[str, str], str]]  # record -> (inputs, target)
    output: dict[str, Any] = field(default_factory=lambda: {"format": "text"})


def _dolly_example(record: dict[str, Any]) -> tuple[dict[str, str], str]:
    inputs = {"instruction": record["instruction"].strip(), "context": (record.get("context") or "").strip()}
    return inputs, record["response"].strip()


def _schema_example(record: dict[str, Any]) -> tuple[dict[str, str], str]:
    output = record["output"]
    if not isinstance(output, dict):
        raise ValueError("field 'output' must be a JSON object")
    target = json.dumps({k: output[k] for k in ("subject", "body", "call_to_action")}, ensure_ascii=False)
    return {"product": record["product"].strip(), "description": record["description"].strip()}, target


DOLLY = Task(
    name="dolly",
    description="Instruction following, QLoRA-tuned on databricks-dolly-15k (CC BY-SA 3.0).",
    prompt_template=DOLLY_TEMPLATE,
    input_fields=[
        {"name": "instruction", "required": True, "description": "what to do"},
        {"name": "context", "required": False, "description": "optional reference text"},
    ],
    required_record_fields=("instruction", "response"),
    to_example=_dolly_example,
    output={"format": "text", "stop": ["### Instruction:"]},
)

SCHEMA = Task(
    name="schema",
    description="MarketMail: product + description -> marketing email as JSON {subject, body, "
    "call_to_action}, LoRA-tuned on an 8-bit base.",
    prompt_template=SCHEMA_TEMPLATE,
    input_fields=[
        {"name": "product", "required": True, "description": "product name"},
        {"name": "description", "required": True, "description": "what the product is and does"},
    ],
    required_record_fields=("product", "description", "output"),
    to_example=_schema_example,
    output={"format": "json", "json_schema": MARKETMAIL_SCHEMA},
)

TASKS = {task.name: task for task in (DOLLY, SCHEMA)}
