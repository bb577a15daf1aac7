"""One generation pipeline for completions and chat; each endpoint specialises only its shapes.

`EndpointServing.create` resolves the target, has the endpoint turn the request into prompts
(through the pre hooks), checks them, compiles the output grammar, builds one `ChoiceSpec` per
choice (`to_sampling_params`) and runs them. `ResponseRun` collects or streams the choices and
keeps the usage and the guardrails' actions. An endpoint says how a prompt is made
(`EndpointServing.prompts`) and how a whole choice and a streamed delta look (`ResponseRun`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel

from service.grammar import Grammar
from service.guardrails import ActionRecord
from service.protocol_objects import UsageInfo
from service.serving.context import (
    ServingContext,
    Target,
    check_prompt,
    check_request_size,
    output_grammar,
    resolve_target,
)
from service.serving.generation import ChoiceEvent, ChoiceSpec, first_and_rest, new_id, run_choices
from service.serving.sse import Deadline, framed, within


@dataclass
class Prompts:
    """A request's prompts as token ids, after the pre hooks."""

    ids: list[list[int]]
    actions: list[ActionRecord]  # what the pre hooks did
    param: str  # the request field the prompts came from (errors about them name it)


class ResponseRun(ABC):
    """One response's choices, collected into one body or streamed as chunks."""

    id_prefix: ClassVar[str]
    response_type: ClassVar[type[BaseModel]]
    chunk_type: ClassVar[type[BaseModel]]

    def __init__(
        self,
        request: Any,
        target: Target,
        specs: list[ChoiceSpec],
        ctx: ServingContext,
        usage: UsageInfo,
        actions: list[ActionRecord],
    ):
        self.request, self.target, self.specs, self.ctx, self.usage = request, target, specs, ctx, usage
        self.id = new_id(self.id_prefix)
        self.actions = [a.as_dict() for a in actions]  # the pre hooks' actions, then the post hooks'

    @abstractmethod
    def choice(self, index: int, events: list[ChoiceEvent]) -> BaseModel:
        """The whole choice `index` from its events, in order."""

    @abstractmethod
    def delta(self, event: ChoiceEvent) -> tuple[BaseModel, bool]:
        """The streamed choice delta of one event, and whether it says anything on its own."""

    def openings(self) -> list[BaseModel]:
        """Choice deltas that open a stream before any token (chat's assistant role)."""
        return []

    def _count(self, event: ChoiceEvent) -> None:
        if event.finish_reason is not None:
            self.usage.completion_tokens += event.completion_tokens
            self.usage.total_tokens += event.completion_tokens

    def _chunk(self, choices: list[BaseModel], usage: UsageInfo | None = None, guardrails=None) -> BaseModel:
        return self.chunk_type(
            id=self.id,
            model=self.target.model_name,
            choices=choices,
            usage=usage,
            guardrails=guardrails,
            system_fingerprint=self.target.version,
        )

    async def collect(self) -> BaseModel:
        events: dict[int, list[ChoiceEvent]] = {s.index: [] for s in self.specs}
        async for event in run_choices(self.specs, self.target, self.ctx):
            self._count(event)
            events[event.index].append(event)
            self.actions += [a.as_dict() for a in event.guardrails]
        choices = [self.choice(i, events[i]) for i in sorted(events)]
        return self.response_type(
            id=self.id,
            model=self.target.model_name,
            choices=choices,
            usage=self.usage,
            guardrails=self.actions,
            system_fingerprint=self.target.version,
        )

    async def stream(self) -> AsyncIterator[BaseModel]:
        events = await first_and_rest(run_choices(self.specs, self.target, self.ctx))

        async def chunks() -> AsyncIterator[BaseModel]:
            pending = self.actions  # the pre hooks' actions ride on the first chunk
            for opening in self.openings():
                yield self._chunk([opening], guardrails=pending)
                pending = []
            async for event in events:
                self._count(event)
                choice, says = self.delta(event)
                pending = pending + [a.as_dict() for a in event.guardrails]
                if says or pending:
                    yield self._chunk([choice], guardrails=pending)
                    pending = []
            if self.request.include_usage:
                yield self._chunk([], self.usage)

        return chunks()


class EndpointServing(ABC):
    """The pipeline; subclasses say how a request becomes prompts and which run shapes them."""

    run_type: ClassVar[type[ResponseRun]]

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    @abstractmethod
    def prompts(self, request: Any, target: Target) -> Prompts: ...

    def calls(self, request: Any) -> bool:
        """Whether the output may hold tool calls."""
        return False

    async def grammar(self, request: Any, target: Target) -> Grammar | None:
        """The grammar every choice's output follows (None: free text)."""
        return await output_grammar(request.response_format, target, self.ctx)

    async def create(
        self,
        request: Any,
        on_target: Callable[[Target], None] = lambda target: None,
        deadline: Deadline | None = None,
    ) -> BaseModel | AsyncIterator[str]:
        """The response, or its SSE frames when the request streams. `on_target` is told the
        model the request resolved to (the HTTP layer labels its metrics with it); a stream
        still running at `deadline` ends with the API's error event."""
        ctx = self.ctx
        target = resolve_target(request.model, request.adapter, ctx, request.user)
        on_target(target)
        prompts = await ctx.offload(self.prompts, request, target)  # render, pre hooks, tokenize
        budgets = [request.budget(ctx.default_budget(len(ids))) for ids in prompts.ids]
        check_request_size(len(budgets) * request.n, sum(budgets) * request.n, request.ignore_eos, ctx)
        for ids, max_tokens in zip(prompts.ids, budgets, strict=True):
            check_prompt(ids, max_tokens, ctx, param=prompts.param, budget_param=request.budget_param)
        stops = (request.stop or []) + (target.manifest.output.stop if target.manifest else [])
        grammar = await self.grammar(request, target)
        n = request.n
        specs = [
            ChoiceSpec(
                index=p * n + c,
                prompt_ids=ids,
                params=request.to_sampling_params(p * n + c, max_tokens, grammar),
                stops=stops,
                stream=request.stream,
                tool_calls=self.calls(request),
            )
            for p, (ids, max_tokens) in enumerate(zip(prompts.ids, budgets, strict=True))
            for c in range(n)
        ]
        for ids in prompts.ids:
            ctx.metrics.prompt_tokens.labels(target.label).inc(len(ids))
            ctx.charge("prompt", len(ids))
            target.count_tokens(ctx, "prompt", len(ids))
        # Each prompt is counted once, however many choices sample from it (OpenAI's usage).
        prompt_tokens = sum(len(ids) for ids in prompts.ids)
        usage = UsageInfo(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
        run = self.run_type(request, target, specs, ctx, usage, prompts.actions)
        if request.stream:
            return self.frame(within(await run.stream(), deadline))
        return await run.collect()

    def frame(self, chunks: AsyncIterator[Any]) -> AsyncIterator[str]:
        """The stream's chunks as SSE frames."""
        return framed(chunks)
