"""`POST /v1/responses`, stateless (docs/tools.md).

A Responses request becomes a chat request (`to_chat`): `instructions` the system message,
message items the messages, function_call items an assistant's `tool_calls`, and
function_call_output items `tool` messages; `text.format` is `response_format`, and the flat
function tools are chat's. It then runs through chat's pipeline (prompt, pre hooks, the tool
grammar, post hooks), and its one choice is shaped as Responses output items: a `message` with
`output_text`, or `function_call` items. Streams send the Responses event types, each with its
`sequence_number`. Nothing is stored: `previous_response_id` and `store: true` are a 400.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from pydantic import BaseModel, ValidationError

from service.errors import HotswapError, InvalidRequestError, StepFailed
from service.protocol import ChatCompletionRequest
from service.protocol_responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    OutputFunctionCall,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from service.serving.chat import ChatServing, _ChatRun
from service.serving.errors import to_body
from service.serving.generation import ChoiceEvent, first_and_rest, new_id, run_choices
from service.serving.sse import Deadline
from service.serving.tool_parser import ParsedCall


def to_chat(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that computes this response."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    items = [{"role": "user", "content": request.input}] if isinstance(request.input, str) else request.input
    for item in items:
        if isinstance(item, dict):
            messages.append(item)
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
        else:
            messages.append({"role": item.role, "content": item.text})
    if not messages:
        raise InvalidRequestError("input: give at least one message", param="input")
    body: dict[str, Any] = {
        "model": request.model,
        "adapter": request.adapter,
        "messages": messages,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_completion_tokens": request.max_output_tokens,
        "stream": request.stream,
        "user": request.user,
        "parallel_tool_calls": request.parallel_tool_calls,
    }
    if request.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"})} for t in request.tools]
    choice = request.tool_choice
    if choice is not None:
        body["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    fmt = request.text.format if request.text else None
    if fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        named = (first.get("ctx") or {}).get("param")
        param = responses_param(named or ".".join(str(p) for p in first.get("loc", ())))
        message = first["msg"].removeprefix("Value error, ")
        if named:
            message = message.removeprefix(f"{named}: ")
        raise InvalidRequestError(f"{param}: {message}", param=param) from None


def responses_param(chat_param: str) -> str:
    """The Responses field that a chat request's field `chat_param` came from."""
    path = chat_param.split(".") if chat_param else []
    renames = {
        "messages": "input",
        "max_completion_tokens": "max_output_tokens",
        "max_tokens": "max_output_tokens",
        "response_format": "text.format",
    }
    if path and path[0] == "tools" and len(path) > 2 and path[2] == "function":
        path = path[:2] + path[3:]  # Responses' tools are flat
    if path and path[0] == "tool_choice":
        path = ["tool_choice", *path[2:]] if len(path) > 2 else path
    return ".".join([renames.get(path[0], path[0]), *path[1:]]) if path else "input"


class _ResponsesRun(_ChatRun):
    """The one choice of a chat run, as a Responses object or its event stream."""

    def __init__(self, *args: Any, original: ResponsesRequest):
        super().__init__(*args)
        self.original = original
        self.id = new_id("resp")
        self.created = int(time.time())
        self._sequence = 0

    def _response(self, status: str, output: list[BaseModel], reason: str | None = None) -> ResponseObject:
        original = self.original
        tool_choice = original.tool_choice or "auto"
        incomplete = None
        if status == "incomplete":
            incomplete = {"reason": "content_filter" if reason == "content_filter" else "max_output_tokens"}
        text_format = original.text.model_dump(by_alias=True) if original.text else {"format": {"type": "text"}}
        return ResponseObject(
            id=self.id,
            created_at=self.created,
            status=status,
            incomplete_details=incomplete,
            instructions=original.instructions,
            max_output_tokens=original.max_output_tokens,
            model=self.target.model_name,
            output=output,
            parallel_tool_calls=original.parallel_tool_calls,
            temperature=original.temperature,
            tool_choice=tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
            tools=[t.model_dump(exclude_none=True) for t in original.tools or ()],
            top_p=original.top_p,
            text=text_format,
            metadata=original.metadata or {},
            user=original.user,
            usage=self._usage() if status != "in_progress" else None,
            guardrails=self.actions,
        )

    def _usage(self) -> ResponseUsage:
        u = self.usage
        return ResponseUsage(
            input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.total_tokens
        )

    @staticmethod
    def _status(reason: str | None) -> str:
        return "completed" if reason in ("stop", "tool_calls") else "incomplete"

    def _items(self, text: str, calls: list[ParsedCall], status: str, message_id: str) -> list[BaseModel]:
        items: list[BaseModel] = []
        if text or not calls:
            items.append(OutputMessage(id=message_id, status=status, content=[OutputText(text=text)]))
        items += [
            OutputFunctionCall(id=f"fc_{c.id.removeprefix('call_')}", call_id=c.id, name=c.name, arguments=c.arguments)
            for c in calls
        ]
        return items

    async def collect(self) -> BaseModel:
        choice = (await super().collect()).choices[0]  # chat's one choice, reshaped
        calls = choice.message.tool_calls or []
        parsed = [ParsedCall(c.id, c.function.name, c.function.arguments, True) for c in calls]
        status = self._status(choice.finish_reason)
        items = self._items(choice.message.content or "", parsed, status, new_id("msg"))
        return self._response(status, items, choice.finish_reason)

    # --- streaming ---------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return {key: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for key, v in event.items()}

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        events = await first_and_rest(run_choices(self.specs, self.target, self.ctx))
        return self._events(events)

    async def _events(self, events: AsyncIterator[ChoiceEvent]) -> AsyncIterator[dict[str, Any]]:
        yield self._event("response.created", response=self._response("in_progress", []))
        yield self._event("response.in_progress", response=self._response("in_progress", []))
        stream = _ItemStream(self)
        reason = None
        async for event in events:
            self._count(event)
            self.actions += [a.as_dict() for a in event.guardrails]
            parser = self._parser(0)
            final = event.finish_reason is not None
            if parser is None:
                for out in stream.text(event.text):
                    yield out
            else:
                for piece in parser.feed(event.text, final=final):
                    for out in stream.piece(piece):
                        yield out
            if final:
                reason = self._finish(parser, event.finish_reason)
        status = self._status(reason)
        for out in stream.close(status):
            yield out
        kind = "response.completed" if status == "completed" else "response.incomplete"
        yield self._event(kind, response=self._response(status, stream.items, reason))


class _ItemStream:
    """Output items as they open, grow and close, in Responses events."""

    def __init__(self, run: _ResponsesRun):
        self.run = run
        self.items: list[BaseModel] = []
        self._open: BaseModel | None = None

    def text(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        out = []
        if not isinstance(self._open, OutputMessage):
            out += self._close("completed") + self._message()
        message = self._open
        message.content[0].text += text
        out.append(
            self.run._event(
                "response.output_text.delta",
                item_id=message.id,
                output_index=len(self.items) - 1,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return out

    def piece(self, piece: Any) -> list[dict[str, Any]]:
        if piece.content:
            return self.text(piece.content)
        out = []
        if piece.name is not None:
            out += self._close("completed")
            call = OutputFunctionCall(
                id=f"fc_{piece.id.removeprefix('call_')}",
                call_id=piece.id,
                name=piece.name,
                arguments="",
                status="in_progress",
            )
            out.append(self._added(call))
        if piece.arguments and isinstance(self._open, OutputFunctionCall):
            self._open.arguments += piece.arguments
            out.append(
                self.run._event(
                    "response.function_call_arguments.delta",
                    item_id=self._open.id,
                    output_index=len(self.items) - 1,
                    delta=piece.arguments,
                )
            )
        return out

    def _added(self, item: BaseModel) -> dict[str, Any]:
        self.items.append(item)
        self._open = item
        return self.run._event("response.output_item.added", output_index=len(self.items) - 1, item=item)

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self.items) - 1
        item.status = status
        out = []
        if isinstance(item, OutputMessage):
            part = item.content[0]
            fields = {"item_id": item.id, "output_index": index, "content_index": 0}
            out.append(self.run._event("response.output_text.done", **fields, text=part.text, logprobs=[]))
            out.append(self.run._event("response.content_part.done", **fields, part=part))
        else:
            out.append(
                self.run._event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=index,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
        out.append(self.run._event("response.output_item.done", output_index=index, item=item))
        return out

    def close(self, status: str) -> list[dict[str, Any]]:
        """Close the open item; an answer without any is one empty message."""
        out = [] if self.items else self._message()
        return out + self._close(status)

    def _message(self) -> list[dict[str, Any]]:
        message = OutputMessage(id=new_id("msg"), status="in_progress", content=[OutputText(text="")])
        added = self._added(message)
        part = self.run._event(
            "response.content_part.added",
            item_id=message.id,
            output_index=len(self.items) - 1,
            content_index=0,
            part=OutputText(text=""),
        )
        return [added, part]


class ResponsesServing(ChatServing):
    """Chat's pipeline with the Responses shapes."""

    def __init__(self, ctx: Any, original: ResponsesRequest):
        super().__init__(ctx)
        self.original = original
        self.run_type = partial(_ResponsesRun, original=original)

    def frame(self, chunks: AsyncIterator[Any]) -> AsyncIterator[str]:
        return framed_events(chunks)

    async def create(self, request: Any, on_target: Any = lambda target: None, deadline: Deadline | None = None) -> Any:
        """Chat's `create`; a 400 names the Responses field, not chat's."""
        try:
            return await super().create(request, on_target, deadline)
        except InvalidRequestError as exc:
            if exc.param:
                param = responses_param(exc.param)
                exc.message = re.sub(rf"\b{re.escape(exc.param)}\b", param, exc.message, count=1)
                exc.param = param
            raise


async def framed_events(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Responses' SSE: `event: <type>` and its JSON; a failure after the start is an `error` event."""
    sequence = 0
    try:
        async for event in events:
            sequence = event["sequence_number"] + 1
            yield f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
    except Exception as exc:
        error = exc if isinstance(exc, HotswapError) else StepFailed(f"stream failed: {type(exc).__name__}")
        body = to_body(error, None)["error"]
        event = {"type": "error", "sequence_number": sequence, **{k: body.get(k) for k in ("code", "message", "param")}}
        yield f"event: error\ndata: {json.dumps(event)}\n\n"
