"""`POST /v1/completions`: prompts (text, token ids, or adapter `input`) to completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from service.engine import SamplingParams, TokenLogprob
from service.errors import InvalidRequestError
from service.guardrails import ActionRecord
from service.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from service.serving.generation import (
    ChoiceEvent,
    ChoiceSpec,
    ServingContext,
    Target,
    check_prompt,
    check_token_ids,
    choice_seed,
    first_and_rest,
    guard_request,
    new_id,
    output_grammar,
    resolve_target,
    run_choices,
)
from service.serving.sse import framed


class LogprobsBuilder:
    """Accumulates OpenAI's completion `logprobs` object (tokens, logprobs, tops, offsets)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.value = CompletionLogprobs()
        self._offset = 0

    def add(self, token_id: int, entry: TokenLogprob | None) -> None:
        text = self.tokenizer.decode([token_id])
        self.value.tokens.append(text)
        self.value.text_offset.append(self._offset)
        self._offset += len(text)
        if entry is None:
            self.value.token_logprobs.append(None)
            self.value.top_logprobs.append(None)
            return
        self.value.token_logprobs.append(entry.logprob)
        top = {self.tokenizer.decode([i]): lp for i, lp in entry.top}
        self.value.top_logprobs.append(top)

    def take(self) -> CompletionLogprobs:
        """Return what was added since the last call (the streaming delta)."""
        value, self.value = self.value, CompletionLogprobs()
        return value


class CompletionServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def resolve(self, request: CompletionRequest) -> Target:
        return resolve_target(request.model, request.adapter, self.ctx)

    def _prompts(self, request: CompletionRequest, target: Target) -> tuple[list[list[int]], list[ActionRecord]]:
        """Token ids of each prompt, after the pre hooks, and what the hooks did."""
        tokenizer = self.ctx.tokenizer
        ids: list[list[int]] | None = None
        if request.input is not None:
            if target.manifest is None:
                raise InvalidRequestError(
                    "`input` needs an adapter with a prompt template; the base takes `prompt`",
                    param="input",
                )
            texts = [target.manifest.render_prompt(request.input)]
        elif isinstance(request.prompt, str):
            texts = [request.prompt]
        elif isinstance(request.prompt[0], str):
            texts = list(request.prompt)
        else:
            ids = [list(request.prompt)] if isinstance(request.prompt[0], int) else [list(p) for p in request.prompt]
            for p in ids:  # before anything decodes them: out-of-range ids overflow the tokenizer
                check_token_ids(p, self.ctx, param="prompt")
            texts = [tokenizer.decode(p) for p in ids] if self.ctx.guardrails.chain(target.label).pre else []
        param = "input" if request.input is not None else "prompt"
        params = request.model_dump(exclude={"prompt", "input"}, exclude_none=True)
        guarded, actions = guard_request(self.ctx, target, "completions", prompts=texts, params=params, param=param)
        if ids is not None and guarded.prompts == tuple(texts):
            return ids, actions  # token ids the hooks left alone go to the model as they came
        return [tokenizer(text).input_ids for text in guarded.prompts], actions

    async def create(self, request: CompletionRequest, target: Target) -> CompletionResponse | AsyncIterator[str]:
        prompts, actions = self._prompts(request, target)
        param = "input" if request.input is not None else "prompt"
        for ids in prompts:
            check_prompt(ids, request.max_tokens, self.ctx, param=param)
        stops = (request.stop or []) + (target.manifest.output.stop if target.manifest else [])
        want_prompt_logprobs = request.echo and request.logprobs is not None
        grammar = await output_grammar(request.response_format, target, self.ctx)
        specs = [
            ChoiceSpec(
                index=p * request.n + c,
                prompt_ids=ids,
                params=SamplingParams(
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    seed=choice_seed(request.seed, p * request.n + c),
                    ignore_eos=request.ignore_eos,
                    logprobs=request.logprobs,
                    prompt_logprobs=request.logprobs if want_prompt_logprobs else None,
                    grammar=grammar,
                ),
                stops=stops,
                stream=request.stream,
            )
            for p, ids in enumerate(prompts)
            for c in range(request.n)
        ]
        for ids in prompts:
            self.ctx.metrics.prompt_tokens.labels(target.label).inc(len(ids))
        run = _CompletionRun(request, target, specs, self.ctx, new_id("cmpl"), actions)
        if request.stream:
            return framed(await run.stream())
        return await run.collect()


class _CompletionRun:
    def __init__(
        self,
        request: CompletionRequest,
        target: Target,
        specs: list[ChoiceSpec],
        ctx: ServingContext,
        request_id: str,
        actions: list[ActionRecord],
    ):
        self.request, self.target, self.specs, self.ctx, self.id = request, target, specs, ctx, request_id
        self.actions = [a.as_dict() for a in actions]  # the pre hooks' actions, then the post hooks'
        self.by_index = {s.index: s for s in specs}
        self.builders = {s.index: LogprobsBuilder(ctx.tokenizer) for s in specs}
        self.started: set[int] = set()
        # Each prompt is counted once, however many choices sample from it (OpenAI's usage).
        prompt_tokens = sum(len(s.prompt_ids) for s in specs[:: request.n])
        self.usage = UsageInfo(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)

    def _echo_text(self, spec: ChoiceSpec) -> str:
        return self.ctx.tokenizer.decode(spec.prompt_ids, skip_special_tokens=True)

    def _apply(self, event: ChoiceEvent) -> CompletionChoice:
        """Turn one event into a choice (delta), echoing the prompt on the choice's first event."""
        spec = self.by_index[event.index]
        text = event.text
        builder = self.builders[event.index]
        if event.index not in self.started:
            self.started.add(event.index)
            if self.request.echo:
                text = self._echo_text(spec) + text
                if self.request.logprobs is not None:
                    prompt_lps = event.prompt_logprobs or (None,) * len(spec.prompt_ids)
                    for token_id, entry in zip(spec.prompt_ids, prompt_lps, strict=True):
                        builder.add(token_id, entry)
        for entry in event.logprobs:
            builder.add(entry.token_id, entry)
        if event.finish_reason is not None:
            self.usage.completion_tokens += event.completion_tokens
            self.usage.total_tokens += event.completion_tokens
        logprobs = builder.take() if self.request.logprobs is not None else None
        return CompletionChoice(index=event.index, text=text, logprobs=logprobs, finish_reason=event.finish_reason)

    def _chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None, guardrails=None):
        return CompletionResponse(
            id=self.id,
            model=self.target.model_name,
            choices=choices,
            usage=usage,
            guardrails=guardrails,
        )

    async def collect(self) -> CompletionResponse:
        parts: dict[int, list[CompletionChoice]] = {s.index: [] for s in self.specs}
        async for event in run_choices(self.specs, self.target, self.ctx):
            parts[event.index].append(self._apply(event))
            self.actions += [a.as_dict() for a in event.guardrails]
        choices = [_join(parts[i]) for i in sorted(parts)]
        return self._chunk(choices, self.usage, self.actions)

    async def stream(self) -> AsyncIterator[CompletionResponse]:
        events = await first_and_rest(run_choices(self.specs, self.target, self.ctx))

        async def chunks() -> AsyncIterator[CompletionResponse]:
            pending = self.actions  # the pre hooks' actions ride on the first chunk
            async for event in events:
                choice = self._apply(event)
                pending = pending + [a.as_dict() for a in event.guardrails]
                if choice.text or choice.finish_reason or pending or (choice.logprobs and choice.logprobs.tokens):
                    yield self._chunk([choice], guardrails=pending)
                    pending = []
            if self.request.include_usage:
                yield self._chunk([], self.usage)

        return chunks()


def _join(parts: list[CompletionChoice]) -> CompletionChoice:
    """Concatenate the deltas of one choice (text offsets are already absolute)."""
    logprobs = None
    if parts[0].logprobs is not None:
        logprobs = CompletionLogprobs()
        for part in parts:
            logprobs.tokens += part.logprobs.tokens
            logprobs.token_logprobs += part.logprobs.token_logprobs
            logprobs.top_logprobs += part.logprobs.top_logprobs
            logprobs.text_offset += part.logprobs.text_offset
    return CompletionChoice(
        index=parts[-1].index,
        text="".join(p.text for p in parts),
        logprobs=logprobs,
        finish_reason=parts[-1].finish_reason,
    )
