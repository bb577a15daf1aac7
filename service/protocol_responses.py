"""Wire schemas of `POST /v1/responses` (https://platform.openai.com/docs/api-reference/responses),
stateless: what one request says is all the service knows. As in service.protocol, fields that
hotswap does not implement are accepted only at their neutral value, and refused otherwise."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from service.protocol import MAX_TOOLS, TOOL_NAME, _TextRequest


class InputText(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(BaseModel):
    """A message: `{"role", "content"}` (the easy form) or `{"type": "message", ...}`."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputText]

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_type(item: Any) -> str:
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")


class FunctionTool(BaseModel):
    """Responses' function tool: flat, where chat nests it under `function`."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = Field(description="Only function tools are served.")
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormatText(BaseModel):
    type: Literal["text"]


class TextFormatJsonObject(BaseModel):
    type: Literal["json_object"]


class TextFormatJsonSchema(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: Annotated[TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")] = (
        Field(default_factory=lambda: TextFormatText(type="text"))
    )


class ResponsesRequest(_TextRequest):
    model: str = Field(min_length=1)
    input: str | list[MessageItem | FunctionCallItem | FunctionCallOutputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    stream: bool = False
    user: str | None = None
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled"] | None = None

    # --- hotswap extension -----------------------------------------------------------------
    adapter: str | None = Field(None, description="A registered adapter's name, or 'base'. Overrides `model`.")

    @model_validator(mode="before")
    @classmethod
    def _typed_items(cls, data: Any) -> Any:
        """Input items choose their schema by `type` (a message may leave it out)."""
        if isinstance(data, dict) and isinstance(data.get("input"), list):
            models = {"message": MessageItem, "function_call": FunctionCallItem}
            models["function_call_output"] = FunctionCallOutputItem
            for i, item in enumerate(data["input"]):
                kind = _item_type(item)
                if kind not in models:
                    raise PydanticCustomError(
                        "unsupported_item",
                        "{param}: input items of type {kind!r} are not served (message, function_call, "
                        "function_call_output are)",
                        {"param": f"input.{i}.type", "kind": kind},
                    )
        return data

    @field_validator("previous_response_id")
    @classmethod
    def _stateless(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("this server keeps no responses (stateless): send the whole conversation in `input`")
        return value

    @field_validator("store")
    @classmethod
    def _no_store(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("this server keeps no responses (stateless): leave store unset or false")
        return value

    @field_validator("reasoning")
    @classmethod
    def _no_reasoning(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and any(v is not None for v in value.values()):
            raise ValueError("reasoning options are not supported by this server")
        return value


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class ResponseUsage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int = 0
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int = 0


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage | OutputFunctionCall] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    temperature: float = 1.0
    tool_choice: Any = "auto"
    tools: list[Any] = Field(default_factory=list)
    top_p: float = 1.0
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    store: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    usage: ResponseUsage | None = None
    user: str | None = None
    guardrails: list[dict[str, Any]] | None = Field(None, exclude_if=lambda v: not v)
