"""`POST /v1/chat/completions`.

How messages become a prompt:
- the base model: the tokenizer's own chat template, with the generation prompt appended;
- an adapter: adapters are single-turn (their prompt template has named input fields), so the
  **last user message** supplies the inputs. If its text is a JSON object, its keys are the
  input fields (`{"product": ..., "description": ...}`); if it holds such an object among other
  text (a sentence around it, a Markdown fence), that object; otherwise the whole text fills the
  adapter's first input field. Earlier turns and system messages are not part of an adapter's
  prompt.
"""

from __future__ import annotations

import json

from service.engine import TokenLogprob
from service.errors import InvalidRequestError
from service.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from service.serving.generation import ChoiceEvent, Target, guard_request
from service.serving.response import EndpointServing, Prompts, ResponseRun


class _ChatRun(ResponseRun):
    id_prefix = "chatcmpl"
    response_type = ChatCompletionResponse
    chunk_type = ChatCompletionChunk

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

    def choice(self, index: int, events: list[ChoiceEvent]) -> ChatChoice:
        return ChatChoice(
            index=index,
            message=ChatResponseMessage(content="".join(e.text for e in events)),
            logprobs=self._logprobs([entry for e in events for entry in e.logprobs]),
            finish_reason=events[-1].finish_reason if events else None,
        )

    def openings(self) -> list[ChatStreamChoice]:
        # OpenAI opens each choice with the assistant role.
        return [ChatStreamChoice(index=s.index, delta=ChatDelta(role="assistant", content="")) for s in self.specs]

    def delta(self, event: ChoiceEvent) -> tuple[ChatStreamChoice, bool]:
        choice = ChatStreamChoice(
            index=event.index,
            delta=ChatDelta(content=event.text or None),
            logprobs=self._logprobs(event.logprobs),
            finish_reason=event.finish_reason,
        )
        return choice, bool(event.text or event.finish_reason or event.logprobs)


class ChatServing(EndpointServing):
    run_type = _ChatRun

    def prompts(self, request: ChatCompletionRequest, target: Target) -> Prompts:
        """The prompt's token ids, after the pre hooks, and what the hooks did."""
        tokenizer = self.ctx.tokenizer
        params = request.model_dump(exclude={"messages"}, exclude_none=True)
        if target.manifest is not None:
            inputs = self.ctx.specials.escape_values(_adapter_inputs(request, target))
            text = target.manifest.render_prompt(inputs, param="messages")
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
        messages = [{"role": m.role, "content": self.ctx.specials.escape(m.content)} for m in guarded.messages]
        ids = tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False).input_ids
        return Prompts([ids], actions, "messages")


def chat_prompt(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The base model's prompt for `messages`: its tokenizer's chat template, special tokens
    included (so the text is tokenized without adding more)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


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
