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
from collections.abc import AsyncIterator

from service.engine import SamplingParams, TokenLogprob
from service.errors import InvalidRequestError
from service.guardrails import ActionRecord
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
    UsageInfo,
)
from service.serving.generation import (
    ChoiceEvent,
    ChoiceSpec,
    ServingContext,
    Target,
    check_prompt,
    choice_seed,
    first_and_rest,
    guard_request,
    new_id,
    output_grammar,
    resolve_target,
    run_choices,
)
from service.serving.sse import framed


class ChatServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def resolve(self, request: ChatCompletionRequest) -> Target:
        return resolve_target(request.model, request.adapter, self.ctx)

    def render(self, request: ChatCompletionRequest, target: Target) -> tuple[list[int], list[ActionRecord]]:
        """The prompt's token ids, after the pre hooks, and what the hooks did."""
        tokenizer = self.ctx.tokenizer
        params = request.model_dump(exclude={"messages"}, exclude_none=True)
        if target.manifest is not None:
            text = target.manifest.render_prompt(_adapter_inputs(request, target), param="messages")
            guarded, actions = guard_request(self.ctx, target, "chat", prompts=[text], params=params, param="messages")
            return tokenizer(guarded.prompts[0]).input_ids, actions
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
        messages = [{"role": m.role, "content": m.content} for m in guarded.messages]
        return tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False).input_ids, actions

    async def create(
        self, request: ChatCompletionRequest, target: Target
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        ids, actions = self.render(request, target)
        max_tokens = request.max_new_tokens or self.ctx.default_budget(len(ids))
        check_prompt(ids, max_tokens, self.ctx, param="messages")
        top = request.top_logprobs or 0
        grammar = await output_grammar(request.response_format, target, self.ctx)
        specs = [
            ChoiceSpec(
                index=i,
                prompt_ids=ids,
                params=SamplingParams(
                    max_tokens=max_tokens,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    seed=choice_seed(request.seed, i),
                    ignore_eos=request.ignore_eos,
                    logprobs=top if request.logprobs else None,
                    grammar=grammar,
                ),
                stops=(request.stop or []) + (target.manifest.output.stop if target.manifest else []),
                stream=request.stream,
            )
            for i in range(request.n)
        ]
        self.ctx.metrics.prompt_tokens.labels(target.label).inc(len(ids))
        usage = UsageInfo(prompt_tokens=len(ids), total_tokens=len(ids))
        run = _ChatRun(request, target, specs, self.ctx, usage, actions)
        if request.stream:
            return framed(await run.stream())
        return await run.collect()


def chat_prompt(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The base model's prompt for `messages`: its tokenizer's chat template, special tokens
    included (so the text is tokenized without adding more)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def _adapter_inputs(request: ChatCompletionRequest, target: Target) -> dict[str, object]:
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise InvalidRequestError("an adapter chat needs a user message", param="messages")
    text = users[-1].text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
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
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and value and set(value) <= fields and required <= set(value):
            return value
        start = text.find("{", start + 1)
    return None


class _ChatRun:
    def __init__(self, request, target, specs, ctx, usage, actions: list[ActionRecord]):
        self.request, self.target, self.specs, self.ctx, self.usage = request, target, specs, ctx, usage
        self.id = new_id("chatcmpl")
        self.actions = [a.as_dict() for a in actions]  # the pre hooks' actions, then the post hooks'

    def _logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.request.logprobs:
            return None
        decode = self.ctx.tokenizer.decode

        def top(token_id: int, logprob: float) -> ChatTopLogprob:
            text = decode([token_id])
            return ChatTopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        content = []
        for entry in entries:
            head = top(entry.token_id, entry.logprob)
            alternatives = [top(i, lp) for i, lp in entry.top]
            content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=alternatives))
        return ChatLogprobs(content=content)

    def _count(self, event: ChoiceEvent) -> None:
        if event.finish_reason is not None:
            self.usage.completion_tokens += event.completion_tokens
            self.usage.total_tokens += event.completion_tokens

    async def collect(self) -> ChatCompletionResponse:
        texts = {s.index: [] for s in self.specs}
        entries: dict[int, list[TokenLogprob]] = {s.index: [] for s in self.specs}
        finish: dict[int, str | None] = {}
        async for event in run_choices(self.specs, self.target, self.ctx):
            texts[event.index].append(event.text)
            entries[event.index] += event.logprobs
            finish[event.index] = event.finish_reason
            self.actions += [a.as_dict() for a in event.guardrails]
            self._count(event)
        choices = [
            ChatChoice(
                index=i,
                message=ChatResponseMessage(content="".join(texts[i])),
                logprobs=self._logprobs(entries[i]),
                finish_reason=finish.get(i),
            )
            for i in sorted(texts)
        ]
        return ChatCompletionResponse(
            id=self.id,
            model=self.target.model_name,
            choices=choices,
            usage=self.usage,
            guardrails=self.actions,
        )

    def _chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None, guardrails=None):
        return ChatCompletionChunk(
            id=self.id,
            model=self.target.model_name,
            choices=choices,
            usage=usage,
            guardrails=guardrails,
        )

    async def stream(self) -> AsyncIterator[ChatCompletionChunk]:
        events = await first_and_rest(run_choices(self.specs, self.target, self.ctx))

        async def chunks() -> AsyncIterator[ChatCompletionChunk]:
            for n, spec in enumerate(self.specs):  # OpenAI opens each choice with the assistant role
                opening = ChatStreamChoice(index=spec.index, delta=ChatDelta(role="assistant", content=""))
                yield self._chunk([opening], guardrails=self.actions if n == 0 else None)
            async for event in events:
                self._count(event)
                actions = [a.as_dict() for a in event.guardrails]
                if not (event.text or event.finish_reason or event.logprobs or actions):
                    continue
                choice = ChatStreamChoice(
                    index=event.index,
                    delta=ChatDelta(content=event.text or None),
                    logprobs=self._logprobs(event.logprobs),
                    finish_reason=event.finish_reason,
                )
                yield self._chunk([choice], guardrails=actions)
            if self.request.include_usage:
                yield self._chunk([], self.usage)

        return chunks()
