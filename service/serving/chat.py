"""`POST /v1/chat/completions`.

How messages become a prompt:
- the base model: the tokenizer's own chat template, with the generation prompt appended;
- an adapter: adapters are single-turn (their prompt template has named input fields), so the
  **last user message** supplies the inputs. If its text is a JSON object, its keys are the
  input fields (`{"product": ..., "description": ...}`); if it holds such an object among other
  text (a sentence around it, a Markdown fence), that object; otherwise the whole text fills the
  adapter's first input field. Earlier turns and system messages are not part of an adapter's
  prompt.

With `tools` (service.serving.tools, docs/tools.md) the prompt carries them in the model's
format: the chat template's own where it renders tools, else the generic format's instructions
in the system message. An adapter's prompt gets those instructions, and the conversation's tool
results, before its template's text. The output follows the tool grammar, and each choice's
text is read back into `content` and `tool_calls`.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2

from service.engine import TokenLogprob
from service.errors import InvalidRequestError
from service.grammar import Grammar, GrammarError
from service.protocol import ChatCompletionRequest, ToolCall, ToolCallFunction
from service.protocol_objects import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    ChatTopLogprob,
    DeltaFunction,
    DeltaToolCall,
)
from service.serving.context import ServingContext, Target, output_schema
from service.serving.generation import ChoiceEvent, guard_request
from service.serving.response import EndpointServing, Prompts, ResponseRun
from service.serving.tool_parser import Piece, ToolCallParser
from service.serving.tools import (
    FORMATS,
    GENERIC,
    ToolFormat,
    check_tools,
    history_messages,
    instructions,
    tool_grammar,
    tool_specs,
    with_instructions,
)


def tool_format(target: Target, ctx: ServingContext) -> ToolFormat:
    """How the target spells tool calls: an adapter's manifest names it (generic when it does
    not: the service renders an adapter's prompt); the base's chat template shows it."""
    if target.manifest is not None:
        return FORMATS[target.manifest.output.tool_format or GENERIC.name]
    return ctx.tool_format


def calls_expected(request: ChatCompletionRequest) -> bool:
    """The output may hold calls: tools, and a choice other than none."""
    return request.tool_mode not in (None, "none")


class _ChatRun(ResponseRun):
    id_prefix = "chatcmpl"
    response_type = ChatCompletionResponse
    chunk_type = ChatCompletionChunk

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._parsers: dict[int, ToolCallParser] = {}  # each choice's reader of calls

    def _logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.request.logprobs:
            return None
        ids = [i for entry in entries for i in (entry.token_id, *(t for t, _ in entry.top))]
        texts = dict(zip(ids, self.ctx.token_texts(ids), strict=True))  # cached, batch-decoded

        def top(token_id: int, logprob: float) -> ChatTopLogprob:
            text = texts[token_id]
            return ChatTopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        content = []
        for entry in entries:
            head = top(entry.token_id, entry.logprob)
            alternatives = [top(i, lp) for i, lp in entry.top]
            content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=alternatives))
        return ChatLogprobs(content=content)

    def _parser(self, index: int) -> ToolCallParser | None:
        """Choice `index`'s reader of calls (None when the output holds none)."""
        if not calls_expected(self.request):
            return None
        if index not in self._parsers:
            fmt = tool_format(self.target, self.ctx)
            self._parsers[index] = ToolCallParser.for_tokenizer(fmt, self.ctx.tokenizer)
        return self._parsers[index]

    @staticmethod
    def _finish(parser: ToolCallParser | None, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and parser is not None and parser.complete_calls else reason

    def choice(self, index: int, events: list[ChoiceEvent]) -> ChatChoice:
        text = "".join(e.text for e in events)
        reason = events[-1].finish_reason if events else None
        parser = self._parser(index)
        message = ChatResponseMessage(content=text)
        if parser is not None:
            parser.feed(text, final=True)
            calls = parser.complete_calls
            if calls:
                content = parser.content or None
                message = ChatResponseMessage(
                    content=content,
                    tool_calls=[
                        ToolCall(id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments)) for c in calls
                    ],
                )
        return ChatChoice(
            index=index,
            message=message,
            logprobs=self._logprobs([entry for e in events for entry in e.logprobs]),
            finish_reason=self._finish(parser, reason),
        )

    def openings(self) -> list[ChatStreamChoice]:
        # OpenAI opens each choice with the assistant role.
        return [ChatStreamChoice(index=s.index, delta=ChatDelta(role="assistant", content="")) for s in self.specs]

    def delta(self, event: ChoiceEvent) -> tuple[ChatStreamChoice, bool]:
        parser = self._parser(event.index)
        delta = ChatDelta(content=event.text or None)
        if parser is not None:
            pieces = parser.feed(event.text, final=event.finish_reason is not None)
            content = "".join(p.content for p in pieces)
            delta = ChatDelta(content=content or None, tool_calls=_delta_calls(pieces))
        choice = ChatStreamChoice(
            index=event.index,
            delta=delta,
            logprobs=self._logprobs(event.logprobs),
            finish_reason=self._finish(parser, event.finish_reason),
        )
        return choice, bool(delta.content or delta.tool_calls or event.finish_reason or event.logprobs)


def _delta_calls(pieces: list[Piece]) -> list[DeltaToolCall] | None:
    """OpenAI's streamed tool calls: a call's first delta has its index, id, type and name,
    later ones pieces of its arguments (one entry per call in a chunk)."""
    calls: dict[int, DeltaToolCall] = {}
    for piece in pieces:
        if piece.index is None:
            continue
        entry = calls.get(piece.index)
        if entry is None:
            entry = calls[piece.index] = DeltaToolCall(
                index=piece.index,
                id=piece.id,
                type="function" if piece.id else None,
                function=DeltaFunction(name=piece.name),
            )
        entry.function.arguments += piece.arguments
    return list(calls.values()) or None


class ChatServing(EndpointServing):
    run_type = _ChatRun

    def prompts(self, request: ChatCompletionRequest, target: Target) -> Prompts:
        """The prompt's token ids, after the pre hooks, and what the hooks did."""
        tokenizer, escape = self.ctx.tokenizer, self.ctx.specials.escape
        params = request.model_dump(exclude={"messages", "tools"}, exclude_none=True)
        fmt = tool_format(target, self.ctx)
        if target.manifest is not None:
            inputs = self.ctx.specials.escape_values(_adapter_inputs(request, target))
            text = target.manifest.render_prompt(inputs, param="messages")
            if request.tools:
                text = f"{escape(_adapter_tools(request, fmt))}\n\n{text}"
            guarded, actions = guard_request(self.ctx, target, "chat", prompts=[text], params=params, param="messages")
            return Prompts([tokenizer(guarded.prompts[0]).input_ids], actions, "messages")
        if not tokenizer.chat_template:
            raise InvalidRequestError("the base model has no chat template; use /v1/completions", param="messages")
        guarded, actions = guard_request(
            self.ctx,
            target,
            "chat",
            messages=[(m.role, m.text) for m in request.messages],
            params=params,
            param="messages",
        )
        contents = [escape(m.content) for m in guarded.messages]
        prompt = render_chat(self.ctx, request.messages, contents, request.tools, request.tool_mode)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        return Prompts([ids], actions, "messages")

    def calls(self, request: ChatCompletionRequest) -> bool:
        return calls_expected(request)

    async def grammar(self, request: ChatCompletionRequest, target: Target) -> Grammar | None:
        """With tools: the tool grammar in the target's format (its free-text branch the
        response_format's JSON, where one is asked for). Otherwise the response_format's."""
        mode = request.tool_mode
        if mode is None:
            return await super().grammar(request, target)
        check_tools(request.tools)
        found = output_schema(request.response_format, target)
        fmt = tool_format(target, self.ctx)
        text = tool_grammar(
            fmt,
            request.tools,
            mode,
            parallel=request.parallel_tool_calls,
            answer=found[0] if found else None,
            specials=self.ctx.special_ids,
        )
        try:
            return await self.ctx.grammars.compile_lark(text)
        except GrammarError as exc:
            param = await self._culprit(request) or "tools"
            raise InvalidRequestError(f"{param}: this tool cannot be enforced: {exc}", param=param) from exc

    async def _culprit(self, request: ChatCompletionRequest) -> str | None:
        """The first tool whose parameters' schema does not compile alone."""
        for i, tool in enumerate(request.tools or ()):
            try:
                await self.ctx.grammars.compile(tool.function.parameters or {"type": "object"})
            except GrammarError:
                return f"tools.{i}.function.parameters"
        return None


def render_chat(
    ctx: ServingContext,
    messages: list[Any],
    contents: list[str],
    tools: list[Any] | None,
    mode: str | None,
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The base model's prompt for a conversation (`contents`: its messages' texts, escaped) and
    its tools, in the base's tool format: chat and /tokenize render it alike."""
    fmt, specials = ctx.tool_format, ctx.specials
    rendered = history_messages(fmt, messages, contents, specials.escape_deep)
    specs = None
    if tools and fmt.template_renders:
        specs = specials.escape_deep(tool_specs(tools))
    elif tools:
        rendered = with_instructions(rendered, specials.escape(instructions(fmt, tools, mode or "auto")))
    return chat_prompt(ctx.tokenizer, rendered, tools=specs, add_generation_prompt=add_generation_prompt)


def chat_prompt(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True, tools=None) -> str:
    """The base model's prompt for `messages` (and `tools`, for a template that renders them):
    its tokenizer's chat template, special tokens included (so the text is tokenized without
    adding more). A template that refuses the conversation (Llama 3.1's takes one call per
    turn) is a 400 naming `messages`."""
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(
            f"messages: the chat template refused this conversation: {exc}", param="messages"
        ) from None


def _adapter_tools(request: ChatCompletionRequest, fmt: ToolFormat) -> str:
    """An adapter prompt's tool part: the instructions, then the conversation's calls and their
    results (an adapter's template takes only the last user message)."""
    parts = [instructions(fmt, request.tools, request.tool_mode)]
    names = {c.id: c.function.name for m in request.messages for c in m.tool_calls or ()}
    for message in request.messages:
        if message.tool_calls:
            parts.append(
                "Called: " + fmt.calls_text([(c.function.name, c.function.arguments) for c in message.tool_calls])
            )
        elif message.role == "tool":
            parts.append(f"Result of {names.get(message.tool_call_id, message.tool_call_id)}: {message.text}")
    return "\n".join(parts)


MAX_EMBEDDED_TRIES = 16  # `{` positions tried for an adapter's input object inside a message


def _adapter_inputs(request: ChatCompletionRequest, target: Target) -> dict[str, object]:
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise InvalidRequestError("an adapter chat needs a user message", param="messages")
    text = users[-1].text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's recursion
        value = _embedded_inputs(text, target)
    if isinstance(value, dict):
        return value
    return {target.manifest.input_fields[0].name: text}


def _embedded_inputs(text: str, target: Target) -> dict[str, object] | None:
    """The first JSON object inside `text` that is the adapter's input: its keys are input
    fields and it has every required one. Clients wrap it in prose or a Markdown fence (instructor's
    JSON modes append an instruction to the user's message)."""
    fields = {f.name for f in target.manifest.input_fields}
    required = {f.name for f in target.manifest.input_fields if f.required}
    decoder = json.JSONDecoder()
    start = text.find("{")
    # Each try parses from a `{` to where the JSON breaks: at every `{` of a long message that
    # was quadratic (security review M1). The object clients send comes early; a few tries do.
    for _ in range(MAX_EMBEDDED_TRIES):
        if start == -1:
            break
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict) and value and set(value) <= fields and required <= set(value):
            return value
        start = text.find("{", start + 1)
    return None
