"""Wire schemas of the OpenAI-compatible API's requests, in the field order of OpenAI's API
reference (https://platform.openai.com/docs/api-reference/completions and .../chat). What it
returns is in `service.protocol_objects`, `/v1/responses` in `service.protocol_responses`, and
vLLM's own endpoints (adapter loading, the tokenizer) in `service.protocol_vllm`.

Limits live here, in the schema, so a bad value fails validation with the field's name. OpenAI
fields that hotswap does not implement are accepted only at their neutral value and refused
otherwise, never silently ignored. hotswap's own extensions sit in marked blocks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from service.engine import Grammar, SamplingParams

MAX_N = 16
MAX_LOGPROBS = 5
MAX_STOP = 4
MAX_PROMPTS = 64  # prompts in one completions request (each times n is a sequence to generate)

MAX_STOP_CHARS = 256  # a stop string's length (security review L8: 4 x 1 MB were accepted)

StopField = Annotated[
    Annotated[str, Field(max_length=MAX_STOP_CHARS)]
    | list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]]
    | None,
    Field(description="Up to 4 sequences where generation stops; not included in the text."),
]


def lone_surrogate_at(value: Any, path: tuple = ()) -> str | None:
    """The dotted path of the first string (or key) holding a lone UTF-16 surrogate, or None.

    JSON's `\\ud800` escape decodes to such a string: not text in any encoding, so the
    tokenizer and the guardrails cannot take it. It is refused as input, naming the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # fails on surrogates only, at C speed
        except UnicodeEncodeError:
            return ".".join(map(str, path)) or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and lone_surrogate_at(key) is not None:
            return ".".join(map(str, (*path, key)))
        found = lone_surrogate_at(item, (*path, key))
        if found is not None:
            return found
    return None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _TextRequest(BaseModel):
    """A request body whose every string must be text (refused otherwise, naming the field)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = lone_surrogate_at(data)
        if path is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "{param}: holds a lone UTF-16 surrogate, which is not text; send valid Unicode",
                {"param": path},
            )
        return data


class ResponseFormatText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    """https://platform.openai.com/docs/guides/structured-outputs: `name`, `description`,
    `schema`, `strict`. The schema is enforced by constrained decoding whatever `strict` says."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class _SamplingFields(_TextRequest):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object or json_schema: JSON enforced by constrained decoding."
    )

    # --- hotswap extension -----------------------------------------------------------------
    adapter: str | None = Field(None, description="A registered adapter's name, or 'base'. Overrides `model`.")
    ignore_eos: bool = Field(
        False, description="Generate exactly max_tokens, past the end-of-sequence token (as vLLM)."
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if isinstance(stop, str) and not stop:
            raise ValueError("stop sequences must not be empty")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        return stops

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("penalties are not supported by this server; leave it at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def budget(self, server_default: int) -> int:
        """Tokens each choice may generate (see `to_sampling_params`)."""
        raise NotImplementedError

    @property
    def budget_param(self) -> str:
        """The field `budget` comes from, for errors to name."""
        return "max_tokens"

    def to_sampling_params(self, index: int, max_tokens: int, grammar: Grammar | None) -> SamplingParams:
        """The engine parameters of choice `index` (0-based across every prompt's choices).

        One precedence rule for every value: the request's own, then the server's default (the
        caller's `max_tokens`, from `budget`), then OpenAI's (the field defaults). Choice i of
        a seeded request samples with seed + i, so `n` choices differ reproducibly.
        """
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=None if self.seed is None else self.seed + index,
            ignore_eos=self.ignore_eos,
            logprobs=self._logprobs(),
            prompt_logprobs=self._prompt_logprobs(),
            grammar=grammar,
        )

    def _logprobs(self) -> int | None:
        return None

    def _prompt_logprobs(self) -> int | None:
        return None


PromptField = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptField | None = None
    best_of: int | None = Field(None, ge=1, le=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int = Field(16, ge=0)
    suffix: str | None = None

    # --- hotswap extension -----------------------------------------------------------------
    input: dict[str, Any] | None = Field(
        None, description="The adapter's input fields, rendered through its prompt template."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: PromptField | None) -> PromptField | None:
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("prompt must not be an empty list")
            if (isinstance(prompt[0], (str, list))) and len(prompt) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if isinstance(prompt[0], list) and any(not ids for ids in prompt):
                raise ValueError("token prompts must not be empty")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        return suffix

    @model_validator(mode="after")
    def _one_prompt_source(self) -> CompletionRequest:
        if (self.prompt is None) == (self.input is None):
            raise PydanticCustomError(
                "one_prompt_source",
                "{param}: give exactly one of `prompt` or `input`",
                {"param": "prompt" if self.prompt is None else "input"},
            )
        return self

    def budget(self, server_default: int) -> int:
        return self.max_tokens  # OpenAI's default (16) applies when the request sets none

    def _logprobs(self) -> int | None:
        return self.logprobs

    def _prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None  # `echo` scores the prompt too


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


# --- tools (https://platform.openai.com/docs/guides/function-calling) -------------------------

MAX_TOOLS = 128  # functions in one request
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for a function's name


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = Field(description="Only function tools exist in chat completions.")
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, earlier in the conversation
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or ()]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise PydanticCustomError(
                    "duplicate_tool",
                    "{param}: the function name {name!r} is used twice",
                    {"param": f"tools.{i}.function.name", "name": name},
                )
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            raise PydanticCustomError(
                "tool_choice_without_tools", "{param}: tool_choice needs tools", {"param": "tool_choice"}
            )
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise PydanticCustomError(
                "unknown_tool",
                "{param}: no tool named {name!r} in tools",
                {"param": "tool_choice.function.name", "name": choice.function.name},
            )
        return self

    @property
    def tool_mode(self) -> str | None:
        """None (no tools), "none", "auto", "required", or the one function's name to call."""
        if not self.tools:
            return None
        choice = self.tool_choice or "auto"
        return choice.function.name if isinstance(choice, NamedToolChoice) else choice

    def budget(self, server_default: int) -> int:
        """`max_completion_tokens` supersedes the deprecated `max_tokens` (OpenAI's precedence);
        with neither, the server's default."""
        return self.max_completion_tokens or self.max_tokens or server_default

    @property
    def budget_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
