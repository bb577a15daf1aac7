"""Wire schemas of vLLM's own endpoints that hotswap serves in vLLM's shapes, so tools written
for vLLM drive it unchanged: adapter loading and the tokenizer."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from service.protocol import MAX_TOOLS, ChatMessage, ChatTool, _TextRequest

# vLLM's adapter endpoints (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), in vLLM's
# shapes, so its tooling (the Gateway API Inference Extension's lora-syncer, llm-d) drives
# hotswap unchanged. Fields vLLM tools send and hotswap has no use for are ignored, as vLLM does.


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False
    base_model_name: str | None = None  # the lora-syncer sends it: checked against the base
    # --- hotswap extensions ----------------------------------------------------------------
    traffic: float | None = Field(
        None, gt=0.0, lt=1.0, description="Serve this version as a canary for this share of the name's requests."
    )
    gate: bool = Field(True, description="false: skip the load gate (logged); for emergencies.")


class CanaryTraffic(BaseModel):
    model_config = ConfigDict(extra="forbid")

    traffic: float = Field(gt=0.0, lt=1.0, description="The canary's share of the adapter's requests.")


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=64)


# ---------------------------------------------------------------------------------------------
# vLLM's tokenizer endpoints (`/tokenize`, `/detokenize`, `/tokenizer_info`), in vLLM's shapes, so
# tools written for vLLM work unchanged: lm-evaluation-harness's `tokenizer_backend=remote`.


class TokenizeRequest(_TextRequest):
    model: str | None = Field(None, description="Optional: a served model or adapter id.")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(
        None, description="Default: true for `prompt`, false for `messages` (the chat template adds them)."
    )
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS, description="As chat's: their prompt counts.")

    @model_validator(mode="after")
    def _one_source(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError(
                "one_prompt_source",
                "{param}: give exactly one of `prompt` or `messages`",
                {"param": "prompt" if self.prompt is None else "messages"},
            )
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_TextRequest):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str
