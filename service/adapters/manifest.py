"""The adapter package contract (DESIGN.md "Adapter package").

`adapters/<name>/` holds PEFT's `adapter_config.json`, `adapter_model.safetensors` and this
manifest as `hotswap.json`. `python -m training` writes it, the service reads it; both render
prompts through `AdapterManifest.render_prompt`, so training and serving cannot drift apart.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.sandbox
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.errors import InputFieldError
from service.names import BASE, PEFT_BASE

MANIFEST_FILE = "hotswap.json"
# Lower-case, starts alphanumeric, no path separators: safe as a directory name and a URL part.
ADAPTER_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
RESERVED_NAMES = frozenset({BASE, PEFT_BASE})
_FIELD_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


def parse_adapter_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise ValueError saying why."""
    if not re.fullmatch(ADAPTER_NAME_PATTERN, name) or ".." in name:
        raise ValueError(
            f"invalid adapter name {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise ValueError(f"adapter name {name!r} is reserved")
    return name


class BaseModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    fingerprint: str = Field(min_length=8)


class InputField(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_FIELD_PATTERN)
    required: bool = True
    description: str = ""


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["text", "json"] = "text"
    json_schema: dict[str, Any] | None = None
    stop: list[str] = Field(default_factory=list, max_length=4)
    # JSON output is enforced by constrained decoding unless the manifest opts out; a request's
    # own response_format wins either way.
    enforce: bool = True
    # How the adapter spells tool calls (service.serving.tools.FORMATS); None: the generic one.
    tool_format: Literal["generic", "hermes", "llama3_json", "mistral"] | None = None

    @model_validator(mode="after")
    def _json_needs_schema(self) -> OutputSpec:
        if self.format == "json" and not self.json_schema:
            raise ValueError("output.format 'json' needs output.json_schema")
        if any(not s for s in self.stop):
            raise ValueError("output.stop entries must not be empty")
        return self


class GoldenPrompt(BaseModel):
    """One prompt the trained adapter answered at publish time, greedy, with the log-probability
    of each token it chose: the gate (service.adapters.gate) scores the same tokens on the
    served base and compares."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    output: str
    prompt_ids: list[int] = Field(min_length=1, max_length=4096)
    output_ids: list[int] = Field(min_length=1, max_length=1024)
    logprobs: list[float]

    @model_validator(mode="after")
    def _one_logprob_per_token(self) -> GoldenPrompt:
        if len(self.logprobs) != len(self.output_ids):
            raise ValueError("golden logprobs must hold one value per output token")
        return self


class Evaluation(BaseModel):
    """What `python -m training ... --publish` measured, on the base as the service loads it."""

    model_config = ConfigDict(extra="forbid")

    quantization: str  # the base's, as the golden outputs and losses were computed on it
    held_out: dict[str, int | float] = Field(default_factory=dict)  # records, loss_base, loss_adapter, reduction
    task: dict[str, float] = Field(default_factory=dict)  # the task's metric (schema: valid_rate, named_rate)
    golden: list[GoldenPrompt] = Field(default_factory=list, max_length=64)


MAX_RENDERED = 1 << 20  # characters a template's arithmetic may make, and a prompt may render to


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with its arithmetic bounded (security review M7): the sandbox
    limits `range` but not `*` or `**`, and `{{ 'x' * 4000000000 }}` or `{{ 9 ** 9 ** 9 }}` in
    a package's template froze or exhausted the process on its first request."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if not isinstance(left, int | float) or not isinstance(right, int | float) or abs(right) > 64:
                raise jinja2.sandbox.SecurityError("'**' in an adapter template is limited to exponents up to 64")
            return left**right
        for size, times in ((left, right), (right, left)):
            if isinstance(size, str | list | tuple) and isinstance(times, int) and len(size) * times > MAX_RENDERED:
                raise jinja2.sandbox.SecurityError(f"a repetition in an adapter template exceeds {MAX_RENDERED}")
        if isinstance(left, int) and isinstance(right, int) and max(abs(left), abs(right)) > 1 << 64:
            raise jinja2.sandbox.SecurityError("a product of integers in an adapter template is too large")
        return left * right


_jinja = _BoundedSandbox(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@lru_cache(maxsize=128)
def _compile(template: str) -> jinja2.Template:
    return _jinja.from_string(template)


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    name: str
    description: str = ""
    base_model: BaseModelRef
    prompt_template: str = Field(min_length=1)
    input_fields: list[InputField] = Field(min_length=1)
    output: OutputSpec = Field(default_factory=OutputSpec)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    evaluation: Evaluation | None = None  # the publish step's record; the gate checks it

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return parse_adapter_name(name)

    @field_validator("input_fields", mode="before")
    @classmethod
    def _names_as_fields(cls, fields: Any) -> Any:
        # A bare list of names is shorthand for required fields.
        if isinstance(fields, list):
            return [{"name": f} if isinstance(f, str) else f for f in fields]
        return fields

    @model_validator(mode="after")
    def _template_matches_fields(self) -> AdapterManifest:
        names = [f.name for f in self.input_fields]
        if len(set(names)) != len(names):
            raise ValueError("input_fields names must be unique")
        try:
            used = meta.find_undeclared_variables(_jinja.parse(self.prompt_template))
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"prompt_template is not valid Jinja2: {exc}") from exc
        unknown = sorted(used - set(names))
        if unknown:
            raise ValueError(f"prompt_template uses undeclared input fields: {unknown}")
        return self

    # ------------------------------------------------------------------------------------------

    @classmethod
    def read(cls, directory: Path) -> AdapterManifest:
        return cls.model_validate(json.loads((directory / MANIFEST_FILE).read_text("utf-8")))

    def write(self, directory: Path) -> None:
        text = json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False)
        (directory / MANIFEST_FILE).write_text(text + "\n", "utf-8")

    def render_prompt(self, inputs: dict[str, Any], *, param: str = "input") -> str:
        """Render the prompt for `inputs`; a bad input raises InputFieldError naming it
        (`param`: where the inputs sit in the request, default `input`).

        Optional fields that are absent render as empty strings, so templates can test them
        with `{% if context %}`.
        """
        declared = {f.name: f for f in self.input_fields}
        for key, value in inputs.items():
            if key not in declared:
                raise InputFieldError(
                    f"adapter {self.name!r} has no input field {key!r}; its fields are {sorted(declared)}",
                    param=f"{param}.{key}",
                )
            if not isinstance(value, str):
                raise InputFieldError(f"input field {key!r} must be a string", param=f"{param}.{key}")
        for field in self.input_fields:
            if field.required and not inputs.get(field.name, "").strip():
                raise InputFieldError(
                    f"adapter {self.name!r} needs the input field {field.name!r}",
                    param=f"{param}.{field.name}",
                )
        values = {name: inputs.get(name, "") for name in declared}
        try:
            text = _compile(self.prompt_template).render(**values)
        except jinja2.sandbox.SecurityError as exc:
            raise InputFieldError(f"adapter {self.name!r}'s prompt template: {exc}", param=param) from None
        if len(text) > MAX_RENDERED + sum(len(v) for v in values.values()):
            raise InputFieldError(f"adapter {self.name!r}'s prompt renders past {MAX_RENDERED} characters", param=param)
        return text
