"""What the OpenAI-compatible API returns: completions and chat completions (whole and as stream
chunks), model cards, errors and the service's status, in the field order of OpenAI's API
reference. hotswap's extensions (guardrail actions, adapter cards' fields) are marked where they
are. The requests are in `service.protocol`."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.protocol import ToolCall


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]

# Extension: what the guardrail hooks did (issue #5); absent when they did nothing.
GuardrailsField = Field(
    None,
    exclude_if=lambda v: not v,
    description="Guardrail actions: [{stage, hook, action, reason, details, index}]",
)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    # The adapter version that answered (X-Adapter-Version; None: the base).
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
    guardrails: list[dict[str, Any]] | None = GuardrailsField


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda v: not v)


class DeltaFunction(BaseModel):
    name: str | None = Field(None, exclude_if=lambda v: v is None)
    arguments: str = ""


class DeltaToolCall(BaseModel):
    """A streamed piece of tool call `index`: the first carries its id, type and name."""

    index: int
    id: str | None = Field(None, exclude_if=lambda v: v is None)
    type: Literal["function"] | None = Field(None, exclude_if=lambda v: v is None)
    function: DeltaFunction


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = Field(None, exclude_if=lambda v: not v)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    # The adapter version that answered (X-Adapter-Version; None: the base).
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
    guardrails: list[dict[str, Any]] | None = GuardrailsField


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    # The adapter version that answered (X-Adapter-Version; None: the base).
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
    guardrails: list[dict[str, Any]] | None = GuardrailsField


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "hotswap"
    # --- hotswap extensions (adapters only) ------------------------------------------------
    parent: str | None = None
    description: str | None = None
    prompt_template: str | None = None
    input_fields: list[dict[str, Any]] | None = None
    output: dict[str, Any] | None = None
    # Where the adapter came from (vLLM's `root`: the lora_path), its version (a hash of its
    # files) and where that version is now: registered, loading, resident (device slot), cached
    # (host memory), failed (with `error`).
    root: str | None = None
    version: str | None = None
    state: Literal["registered", "loading", "resident", "cached", "failed"] | None = None
    # Its releases (service.adapters.release): {"canary": {version, traffic} | None, "previous":
    # the version a rollback returns to, "gating": a version being checked, "refused":
    # {version, error} of the last version the gate refused}.
    release: dict[str, Any] | None = None
    pinned: bool | None = None
    error: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ServiceStatus(BaseModel):
    """`/health` and `/ready`: starting, ready, draining, stopping or failed."""

    status: str
