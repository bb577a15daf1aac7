"""What completions, chat and responses share below their pipeline (service.serving.response):
running a request's choices (the context, target and request checks they run with are in
`service.serving.context`).

`run_choices` turns one engine request per choice into a single stream of `ChoiceEvent`s (text
deltas that respect stop strings and UTF-8), records token metrics, and cancels every engine
request when the consumer goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from service.engine import EngineRequest, SamplingParams, TokenLogprob
from service.errors import AdapterUnavailable, QueueFull
from service.guardrails import ActionRecord, GuardedOutput, GuardedRequest, Message
from service.guardrails.base import Blocked, RetryRequested
from service.guardrails.runner import OutputGuard, run_pre
from service.serving.context import ServingContext, Target
from service.serving.text import IncrementalDecoder, StopMatcher


@dataclass
class ChoiceSpec:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    stream: bool = False  # the client reads a stream: text leaves as post hooks pass it
    tool_calls: bool = False  # the output may be tool calls (service.serving.tools)


@dataclass
class ChoiceEvent:
    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0  # set on the final event
    tokens: int = 0  # generated tokens this event carries
    guardrails: list[ActionRecord] = field(default_factory=list)
    after_stop: str = ""  # on a stop: the stop string and what followed it (never sent)


def guard_request(
    ctx: ServingContext,
    target: Target,
    endpoint: str,
    *,
    prompts: list[str] | None = None,
    messages: list[tuple[str, str]] | None = None,
    params: dict[str, Any],
    param: str,
) -> tuple[GuardedRequest, list[ActionRecord]]:
    """Run the target's pre hooks; raises ContentPolicyError when one blocks."""
    request = GuardedRequest(
        endpoint=endpoint,
        adapter=target.label,
        manifest=target.manifest,
        prompts=tuple(prompts) if prompts is not None else None,
        messages=tuple(Message(r, c) for r, c in messages) if messages is not None else None,
        params=params,
    )
    chain = ctx.guardrails.chain(target.label)
    if not chain.pre:
        return request, []
    return run_pre(chain, request, ctx.metrics, param=param)


async def _run_choice(
    spec: ChoiceSpec, target: Target, ctx: ServingContext, started: float
) -> AsyncIterator[ChoiceEvent]:
    """One choice through the target's post hooks (issue #5).

    Text leaves only once every post hook has passed it. A blocked output ends the choice with
    `finish_reason: "content_filter"`; a hook asking for a retry (the JSON-schema hook) gets one
    greedy regeneration. Logprobs are held back with the text and withheld (empty) for a choice
    a hook changed, since they would spell out what was redacted.
    """
    chain = ctx.guardrails.chain(target.label)
    if not chain.post:
        async for event in _generate(spec, target, ctx, started):
            yield event
        return
    attempt = _GuardedAttempt(spec, target, ctx, started, retried=False)
    async for event in attempt.events():
        yield event
    if attempt.retry_reason is None:
        return
    greedy = replace(spec, params=replace(spec.params, temperature=0.0, top_p=1.0))
    async for event in _GuardedAttempt(greedy, target, ctx, started, retried=True).events():
        yield event


@dataclass
class _Control:
    filtered: bool = False  # a guardrail stopped the generation: not a client cancel


class _GuardedAttempt:
    """One generation of a choice, its text passed through an `OutputGuard`."""

    def __init__(self, spec: ChoiceSpec, target: Target, ctx: ServingContext, started: float, *, retried: bool):
        self.spec, self.target, self.ctx, self.started = spec, target, ctx, started
        output = GuardedOutput(
            target.label, target.manifest, "", retried, streaming=spec.stream, tool_calls=spec.tool_calls
        )
        self.guard = OutputGuard(ctx.guardrails.chain(target.label), output, ctx.metrics, spec.index)
        self.retried = retried
        self.retry_reason: str | None = None
        self.control = _Control()
        self.generated = 0
        self.released = False

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        try:
            async for event in self._guarded():
                yield event
        except Blocked:
            yield self._filtered()
        except RetryRequested as exc:
            if self.retried or self.released:  # one retry, and never after text has left
                self.guard.actions.append(ActionRecord("post", exc.hook, "block", exc.reason, index=self.spec.index))
                self.ctx.metrics.guardrail_actions.labels("post", exc.hook, "block").inc()
                yield self._filtered()
                return
            self.retry_reason = exc.reason
            yield ChoiceEvent(self.spec.index, guardrails=_take(self.guard))

    async def _guarded(self) -> AsyncIterator[ChoiceEvent]:
        held: list[TokenLogprob] = []
        stream = _generate(self.spec, self.target, self.ctx, self.started, self.control)
        async with contextlib.aclosing(stream):
            try:
                async for event in stream:
                    self.generated += event.tokens
                    held += event.logprobs
                    final = event.finish_reason is not None
                    text = self.guard.feed(event.text)
                    if final:
                        try:
                            text += self.guard.finish(event.after_stop)
                        except Blocked:  # what the hooks had passed still leaves, then the block
                            if text:
                                yield ChoiceEvent(self.spec.index, text)
                            raise
                    self.released = self.released or bool(text)
                    logprobs = held if final and not self.guard.changed else []
                    yield replace(event, text=text, logprobs=logprobs, guardrails=_take(self.guard))
            except Blocked:
                self.control.filtered = True  # set before closing `stream` stops the engine
                raise

    def _filtered(self) -> ChoiceEvent:
        return ChoiceEvent(
            self.spec.index,
            finish_reason="content_filter",
            completion_tokens=self.generated,
            guardrails=_take(self.guard),
        )


def _take(guard: OutputGuard) -> list[ActionRecord]:
    taken, guard.actions = guard.actions, []
    return taken


async def _generate(
    spec: ChoiceSpec,
    target: Target,
    ctx: ServingContext,
    started: float,
    control: _Control | None = None,
) -> AsyncIterator[ChoiceEvent]:
    decoder = IncrementalDecoder(ctx.tokenizer, spec.prompt_ids)
    stopper = StopMatcher(spec.stops)
    request = EngineRequest(
        request_id=uuid.uuid4().hex,
        prompt_ids=tuple(spec.prompt_ids),
        adapter=target.adapter,
        params=spec.params,
        admitted=True,  # run_choices admitted the whole HTTP request
        adapter_version=target.version,
        tenant=ctx.tenant.id,
    )
    generated, finished, last = 0, False, started
    stream = ctx.engine.generate(request)
    try:
        async with contextlib.aclosing(stream):
            async for output in stream:
                now = time.perf_counter()
                if output.token_ids:
                    histogram = ctx.metrics.time_to_first_token if generated == 0 else ctx.metrics.inter_token_latency
                    histogram.labels(target.label).observe(now - last)
                    last = now
                generated += len(output.token_ids)
                text, stopped = stopper.feed(decoder.push(output.token_ids))
                finish = "stop" if stopped else output.finish_reason
                if finish is not None and not stopped:
                    tail, _ = stopper.feed(decoder.flush())
                    text += tail + stopper.flush()
                event = ChoiceEvent(
                    spec.index,
                    text,
                    list(output.logprobs or ()),
                    output.prompt_logprobs,
                    finish,
                    tokens=len(output.token_ids),
                    after_stop=stopper.after if stopped else "",
                )
                if finish is not None:
                    finished = True
                    event.completion_tokens = generated
                    ctx.metrics.generation_tokens.labels(target.label).inc(generated)
                    yield event
                    return  # closing `stream` cancels the engine request on a stop string
                yield event
    except AdapterUnavailable as exc:  # the engine could not make the adapter resident
        exc.about("adapter")
        raise
    finally:
        ctx.charge("completion", generated)
        target.count_tokens(ctx, "completion", generated)
        if not finished:  # a finished one's tokens were counted where it finished
            if control is not None and control.filtered:
                ctx.metrics.generation_tokens.labels(target.label).inc(generated)
            else:  # the consumer went away (client disconnect) or the engine failed
                ctx.metrics.cancelled.labels(target.label).inc()


async def run_choices(specs: list[ChoiceSpec], target: Target, ctx: ServingContext) -> AsyncIterator[ChoiceEvent]:
    """Run every choice concurrently and interleave their events as they come.

    The whole request is admitted first: a 429 comes before any response starts, never in the
    middle of one; its choices, and a guardrail's retry of one, then run without the bound.
    """
    try:
        ctx.engine.admit(len(specs), ctx.tenant.id)
    except QueueFull:
        ctx.metrics.tenant_limited.labels(ctx.tenant.id, "queue").inc()
        raise
    started = time.perf_counter()
    if len(specs) == 1:
        async for event in _run_choice(specs[0], target, ctx, started):
            yield event
        return
    queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

    async def pump(spec: ChoiceSpec) -> None:
        try:
            async for event in _run_choice(spec, target, ctx, started):
                await queue.put(event)
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(spec)) for spec in specs]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def first_and_rest(stream: AsyncIterator[ChoiceEvent]) -> AsyncIterator[ChoiceEvent]:
    """Await the first event before a streaming response starts, so that errors raised at
    admission (queue full, engine down) still become proper HTTP errors, not a broken stream."""
    first = await anext(stream)

    async def chained() -> AsyncIterator[ChoiceEvent]:
        async with contextlib.aclosing(stream):
            yield first
            async for event in stream:
                yield event

    return chained()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
