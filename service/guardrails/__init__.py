"""Guardrails: pre hooks on requests and post hooks on outputs (issue #5, docs/guardrails.md).

To write one, subclass `Hook`, set `name`, implement `pre` and/or `post` (and `stream` for
incremental output checks), and name it in the YAML by dotted path or through the entry-point
group `hotswap.guardrails`.
"""

from service.guardrails.base import (
    ActionRecord,
    GuardedOutput,
    GuardedRequest,
    Hook,
    Message,
    StreamFilter,
    Verdict,
)
from service.guardrails.config import GuardrailConfigError, Guardrails, load

__all__ = [
    "ActionRecord",
    "GuardedOutput",
    "GuardedRequest",
    "GuardrailConfigError",
    "Guardrails",
    "Hook",
    "Message",
    "StreamFilter",
    "Verdict",
    "load",
]
