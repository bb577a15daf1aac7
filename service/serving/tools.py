"""Tool calls: the model's own format, a grammar that makes every call valid, and the parser
that reads the calls back out of the text (docs/tools.md).

A format says how calls are spelled in the model's output: what opens them, how each call's
JSON object looks (`{"name": ..., "arguments": ...}`), what separates and ends them. It is
recognised from the tokenizer's chat template (`detect_format`), or named by an adapter's
manifest; a template that knows no tools gets the generic one, which the service renders into
the prompt itself. From the format and the request's tools, `tool_grammar` writes one
llguidance lark grammar:

- `required`: one or more calls (one when `parallel_tool_calls` is false);
- a named function: exactly one call of it;
- `auto`: free text (or the `response_format` JSON) *or* calls, one grammar;
- `none`: free text that does not open a call.

Each call's arguments are `%json` of the function's schema, so a call parses and validates by
construction, on every model and adapter, and the grammar's closing (service.grammar) ends a
call within the budget. `ToolCallParser` (service.serving.tool_parser) then reads content and
calls from the text as it streams.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from service.errors import InvalidRequestError
from service.grammar import GrammarError, closed_objects, schema_key

# How a grammar spells JSON (service.grammar's style): no free whitespace, OpenAI's separators.
_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # OpenAI: a function without parameters
# Calls in one output. A small model under `required` repeats calls until its budget ends (the
# 135M default did, for thousands of tokens); the grammar ends the output after this many.
MAX_CALLS = 8


@dataclass(frozen=True)
class ToolFormat:
    """How one model family spells tool calls in its output."""

    name: str
    prefix: str  # before the first call
    call_open: str  # before each call's JSON object
    call_close: str  # after it
    separator: str  # between calls
    suffix: str  # after the last call
    arguments_key: str = "arguments"
    template_renders: bool = True  # the chat template renders tools and tool messages
    mistral_ids: bool = False  # Mistral's templates want 9 alphanumeric characters as call ids

    def head(self, name: str) -> str:
        return f'{{"name": "{name}", "{self.arguments_key}": '

    def call_text(self, name: str, arguments: str) -> str:
        return f"{self.call_open}{self.head(name)}{arguments}}}{self.call_close}"

    def calls_text(self, calls: list[tuple[str, str]]) -> str:
        body = self.separator.join(self.call_text(name, arguments) for name, arguments in calls)
        return f"{self.prefix}{body}{self.suffix}"


HERMES = ToolFormat("hermes", "", "<tool_call>\n", "\n</tool_call>", "\n", "")
GENERIC = ToolFormat("generic", "", "<tool_call>\n", "\n</tool_call>", "\n", "", template_renders=False)
LLAMA3_JSON = ToolFormat("llama3_json", "", "", "", "; ", "", arguments_key="parameters")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS][", "", "", ", ", "]", mistral_ids=True)
FORMATS = {f.name: f for f in (GENERIC, HERMES, LLAMA3_JSON, MISTRAL)}


def detect_format(tokenizer: Any) -> ToolFormat:
    """The format a tokenizer's chat template uses for tools, by the markers each family's
    templates write (vLLM's parsers are chosen by hand; these are the same families)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = "\n".join(str(t) for t in template.values())
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or ("ipython" in template and '"parameters"' in template):
        return LLAMA3_JSON
    return GENERIC


def new_call_id(fmt: ToolFormat) -> str:
    if fmt.mistral_ids:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"


# ---------------------------------------------------------------------------------------------
# The grammar


def check_tools(tools: list[Any]) -> None:
    """Refuse, naming the field, a schema the grammar engine could never take: one nested or
    sized past the bounds, not an object schema, or a strict one outside OpenAI's strict rules."""
    for i, tool in enumerate(tools):
        param = f"tools.{i}.function.parameters"
        schema = tool.function.parameters
        if schema is None:
            continue
        try:
            schema_key(schema)
        except GrammarError as exc:
            raise InvalidRequestError(f"{param}: {exc}", param=param) from None
        if schema.get("type", "object") != "object":
            raise InvalidRequestError(f"{param}: a function's parameters must be an object schema", param=param)
        if tool.function.strict:
            problem = _not_strict(schema)
            if problem:
                raise InvalidRequestError(f"{param}: strict is true, but {problem}", param=param)


def _not_strict(schema: Any, path: str = "parameters") -> str | None:
    """What keeps `schema` out of OpenAI's strict mode: every object lists `properties`, sets
    `additionalProperties: false` and requires every property."""
    if isinstance(schema, list):
        return next((p for i, s in enumerate(schema) if (p := _not_strict(s, f"{path}.{i}"))), None)
    if not isinstance(schema, dict):
        return None
    if schema.get("type") == "object" or "properties" in schema:
        if schema.get("additionalProperties", True) is not False:
            return f"{path} does not set additionalProperties: false"
        missing = sorted(set(schema.get("properties", {})) - set(schema.get("required", [])))
        if missing:
            return f"{path} does not require {missing} (strict functions require every property)"
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            found = next((p for k, s in value.items() if (p := _not_strict(s, f"{path}.{key}.{k}"))), None)
        else:
            found = _not_strict(value, f"{path}.{key}") if isinstance(value, dict | list) else None
        if found:
            return found
    return None


def _literal(text: str) -> str:
    """`text` as a lark string literal."""
    return json.dumps(text)


def _arguments_schema(tool: Any) -> dict[str, Any]:
    schema = tool.function.parameters or EMPTY_PARAMETERS
    # Strict schemas are enforced as written (they close their objects themselves); others get
    # closed objects, as response_format does: a small model given extra keys never stops.
    schema = schema if tool.function.strict else closed_objects(schema)
    return {**schema, "x-guidance": _STYLE}


def tool_grammar(
    fmt: ToolFormat,
    tools: list[Any],
    mode: str,
    *,
    parallel: bool,
    answer: dict[str, Any] | None = None,
    specials: dict[str, int] | None = None,
) -> str:
    """The lark grammar of the output under tool mode `mode` ("none", "auto", "required" or a
    function's name). `answer`: the response_format's JSON schema, the non-call branch of auto.
    `specials`: the tokenizer's special tokens by spelling; a prefix that starts with one (Mistral's
    [TOOL_CALLS]) is that token, as the model was trained, not its letters."""
    prefix = _spelled(fmt.prefix, specials or {})
    lines = []
    for i, tool in enumerate(tools):
        lines.append(
            f"call_{i}: {_literal(fmt.call_open + fmt.head(tool.function.name))} args_{i} "
            f"{_literal('}' + fmt.call_close)}"
        )
        lines.append(f"args_{i}: %json {json.dumps(_arguments_schema(tool))}")
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    repeat = f"({_literal(fmt.separator)} call){{0,{MAX_CALLS - 1}}}" if parallel else ""
    lines.append("calls: " + _sequence(prefix, "call", repeat, fmt.suffix))
    # Free text: anything that does not hold the calls' opening, at its start or further on (a
    # small model copies the instructions' example into its answer), by llguidance's `&` and `~`
    # on lexemes. The opening must end where the calls' first literal does, or the lexer, greedy,
    # would keep reading text past it. A special token cannot be spelled in text at all.
    opening = fmt.prefix if fmt.prefix and prefix == _literal(fmt.prefix) else fmt.call_open + '{"name"'
    lines.append(f"TEXT: /(?s:.+)/ & ~/(?s:.*{_regex(opening)}.*)/")
    if answer is not None:
        lines.append(f"answer: %json {json.dumps({**closed_objects(answer), 'x-guidance': _STYLE})}")
    text = "answer" if answer is not None else "TEXT"
    if mode == "none":
        start = text
    elif mode == "auto":
        start = f"{text} | calls"
    elif mode == "required":
        start = "calls"
    else:
        index = next(i for i, t in enumerate(tools) if t.function.name == mode)
        start = _sequence(prefix, f"call_{index}", "", fmt.suffix)
    return "\n".join([f"start: {start}", *lines]) + "\n"


def _sequence(prefix: str, body: str, repeat: str, suffix: str) -> str:
    """Lark items in order: `prefix` (already lark), `body`, `repeat`, the literal `suffix`."""
    return " ".join(p for p in (prefix, body, repeat, _literal(suffix) if suffix else "") if p)


def _spelled(prefix: str, specials: dict[str, int]) -> str:
    """The prefix as lark: a special token it starts with as `<[id]>`, the rest as a literal."""
    if not prefix:
        return ""
    for spelling, token in specials.items():
        if spelling and prefix.startswith(spelling):
            rest = prefix[len(spelling) :]
            return f"<[{token}]>" + (f" {_literal(rest)}" if rest else "")
    return _literal(prefix)


def _regex(text: str) -> str:
    """A regex matching `text` exactly, as the body of a lark /.../ literal."""
    return re.escape(text).replace("\\\n", "\\n").replace("/", "\\/")


# ---------------------------------------------------------------------------------------------
# Prompts


def tool_specs(tools: Iterable[Any]) -> list[dict[str, Any]]:
    """The tools as chat templates take them (transformers' `tools=`: OpenAI's shape)."""
    return [
        {"type": "function", "function": tool.function.model_dump(exclude_none=True, exclude={"strict"})}
        for tool in tools
    ]


def instructions(fmt: ToolFormat, tools: list[Any], mode: str) -> str:
    """The generic format's description of the tools, for the system message (or an adapter's
    prompt): what each does, its arguments' schema, and how to call it."""
    listing = "\n".join(
        json.dumps(
            {
                "name": t.function.name,
                "description": t.function.description or "",
                "parameters": t.function.parameters or EMPTY_PARAMETERS,
            },
            ensure_ascii=False,
        )
        for t in tools
    )
    example = fmt.calls_text([("<function name>", "<arguments as a JSON object>")])
    if mode == "required":
        when = "You must call one or more of them."
    elif mode in ("auto", "none"):
        when = "Call one when it helps; otherwise answer in plain text."
    else:
        when = f"You must call {mode}."
    return (
        "You can call these functions (each with a JSON schema of its arguments):\n"
        f"{listing}\n{when} To call a function, answer with exactly:\n{example}"
    )


def history_messages(
    fmt: ToolFormat, messages: list[Any], contents: list[str], escape: Any = lambda value: value
) -> list[dict[str, Any]]:
    """The conversation as template messages. `contents`: each message's text after the pre
    hooks and escaping; `escape`: what defuses control tokens in calls' arguments and names.
    Templates that render tools get OpenAI's shape (arguments parsed, as they expect a mapping);
    for the generic format, calls become the assistant's text and results a user turn, which
    any template renders."""
    names = {call.id: call.function.name for m in messages for call in m.tool_calls or ()}
    out: list[dict[str, Any]] = []
    for i, (message, content) in enumerate(zip(messages, contents, strict=True)):
        calls = message.tool_calls or []
        if fmt.template_renders:
            entry: dict[str, Any] = {"role": message.role, "content": content}
            if calls:
                entry["tool_calls"] = [
                    {
                        "id": escape(c.id),
                        "type": "function",
                        "function": {"name": escape(c.function.name), "arguments": escape(_args(c, i))},
                    }
                    for c in calls
                ]
            if message.role == "tool":
                entry["tool_call_id"] = escape(message.tool_call_id)
                entry["name"] = escape(names.get(message.tool_call_id, message.name or ""))
            out.append(entry)
        elif message.role == "tool":
            result = {"name": escape(names.get(message.tool_call_id, message.name or "")), "content": content}
            out.append({"role": "user", "content": f"<tool_response>\n{json.dumps(result)}\n</tool_response>"})
        elif calls:
            text = fmt.calls_text([(escape(c.function.name), json.dumps(escape(_args(c, i)))) for c in calls])
            out.append({"role": "assistant", "content": f"{content}\n{text}" if content else text})
        else:
            out.append({"role": message.role, "content": content})
    return out


def _args(call: Any, index: int) -> Any:
    try:
        return json.loads(call.function.arguments or "{}")
    except ValueError:
        param = f"messages.{index}.tool_calls"
        raise InvalidRequestError(f"{param}: arguments of {call.function.name!r} are not JSON", param=param) from None


def with_instructions(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`messages` with `text` ending the first system message, or as a new one first."""
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{text}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
