"""What completions and chat share below their pipeline (service.serving.response): adapter
resolution, prompt checks, and running the choices.

`run_choices` turns one engine request per choice into a single stream of `ChoiceEvent`s (text
deltas that respect stop strings and UTF-8), records token metrics, and cancels every engine
request when the consumer goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import anyio.to_thread

from service.adapters.manifest import AdapterManifest
from service.adapters.registry import AdapterRegistry
from service.engine import BASE, Engine, EngineRequest, SamplingParams, TokenLogprob
from service.errors import AdapterUnavailable, InvalidRequestError, NotFoundError, QueueFull
from service.grammar import JSON_OBJECT, Grammar, GrammarCompiler, GrammarError
from service.guardrails import ActionRecord, GuardedOutput, GuardedRequest, Guardrails, Message
from service.guardrails.base import Blocked, RetryRequested
from service.guardrails.runner import OutputGuard, run_pre
from service.metrics import Metrics
from service.serving.specials import SpecialText
from service.serving.text import IncrementalDecoder, StopMatcher
from service.serving.tools import detect_format
from service.tenants import EVERYONE, RateLimits, Tenant

OFFLOAD_THREADS = 2  # threads for a request's input work off the event loop (ServingContext.offload)


@dataclass
class ServingContext:
    engine: Engine
    tokenizer: Any
    registry: AdapterRegistry
    base_id: str
    max_context: int
    metrics: Metrics
    guardrails: Guardrails = field(default_factory=Guardrails)
    default_max_tokens: int = 0  # a chat request's budget when it sets none (0: the context)
    max_request_sequences: int = 0  # prompts x n per request (0: no bound)
    max_request_tokens: int = 0  # the sum of max_tokens over a request's sequences (0: no bound)
    allow_ignore_eos: bool = True
    grammars: GrammarCompiler | None = None  # structured outputs; made from the tokenizer if None
    tenant: Tenant = EVERYONE  # the caller's (for_tenant): what it may use, whose quota it spends
    rate_limits: RateLimits | None = None  # tokens are charged to the tenant's per-minute budget
    quantization: str = ""  # the served base's (the gate's tolerance depends on it)
    gate: bool = True  # ADAPTER_GATE: versions are gated before they serve

    def for_tenant(self, tenant: Tenant) -> ServingContext:
        """This context for one caller's request: the same service, seen as `tenant` sees it."""
        if tenant is self.tenant:
            return self
        view = copy.copy(self)
        view.tenant = tenant
        return view

    def charge(self, kind: str, tokens: int) -> None:
        """Count the tenant's tokens (its metrics, and its tokens per minute)."""
        if tokens <= 0:
            return
        self.metrics.tenant_tokens.labels(self.tenant.id, kind).inc(tokens)
        if self.rate_limits is not None:
            self.rate_limits.charge(self.tenant, tokens)

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on one of OFFLOAD_THREADS threads, off the event loop: tokenizing,
        rendering and the pre hooks of a request's input are CPU work bounded only by the body
        size (a 3.5 MB /tokenize held the loop for 2.6 s; security review M1). The loop keeps
        serving streams, /health and /metrics meanwhile."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(OFFLOAD_THREADS)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's text alone (logprobs' `tokens` and `top_logprobs` keys): from a cache as
        large as the vocabulary, the misses decoded in one batch."""
        cache = self._token_texts
        missing = list(dict.fromkeys(i for i in token_ids if i not in cache))
        if missing:
            cache.update(zip(missing, self.tokenizer.batch_decode([[i] for i in missing]), strict=True))
        return [cache[i] for i in token_ids]

    def __post_init__(self) -> None:
        self._token_texts: dict[int, str] = {}  # token id -> its text (at most the vocabulary)
        self._limiter: anyio.CapacityLimiter | None = None  # made on the event loop, at first use
        self.specials = SpecialText(self.tokenizer)  # defuses control tokens typed in messages
        self.tool_format = detect_format(self.tokenizer)  # how the base spells tool calls
        # Special tokens by spelling (a tool format's prefix may be one: service.serving.tools).
        self.special_ids = dict(
            zip(
                getattr(self.tokenizer, "all_special_tokens", ()),
                getattr(self.tokenizer, "all_special_ids", ()),
                strict=False,
            )
        )
        if self.grammars is None:
            self.grammars = GrammarCompiler(
                self.tokenizer,
                on_compile=self.metrics.grammar_compile.observe,
                on_cache=lambda hit: self.metrics.grammar_cache.labels("hit" if hit else "miss").inc(),
            )

    def default_budget(self, prompt_tokens: int) -> int:
        """What a chat request that names no budget may generate: the rest of the context,
        within DEFAULT_MAX_TOKENS."""
        left = max(self.max_context - prompt_tokens, 0)
        return min(left, self.default_max_tokens) if self.default_max_tokens else left


@dataclass(frozen=True)
class Target:
    """The model a request runs on: the base (adapter None) or one registered adapter."""

    model_name: str
    adapter: str | None = None
    manifest: AdapterManifest | None = None
    # The adapter's version when the request resolved it: every choice and retry runs on it,
    # even if a new version is loaded meanwhile.
    version: str | None = None
    role: str | None = None  # "stable" or "canary": which of the name's releases answers

    @property
    def label(self) -> str:
        return self.adapter or BASE

    def count_tokens(self, ctx: ServingContext, kind: str, tokens: int) -> None:
        """The per-version token counter (canary against stable)."""
        if self.version is not None and tokens:
            ctx.metrics.version_tokens.labels(self.label, self.version, self.role or "stable", kind).inc(tokens)


def output_schema(response_format: Any, target: Target) -> tuple[dict[str, Any], str] | None:
    """The JSON schema the output must follow, and the field it comes from (issue #20): the
    request's own `response_format` wins (`text`: none); else an adapter whose manifest declares
    JSON output with a schema, unless the manifest opts out (`output.enforce: false`)."""
    if response_format is not None:
        if response_format.type == "text":
            return None
        schema = JSON_OBJECT if response_format.type == "json_object" else response_format.json_schema.schema_
        return schema, "response_format"
    if target.manifest is not None and target.manifest.output.format == "json" and target.manifest.output.enforce:
        return target.manifest.output.json_schema, "model"
    return None


async def output_grammar(response_format: Any, target: Target, ctx: ServingContext) -> Grammar | None:
    """The grammar of `output_schema`. A schema the engine cannot compile is a 400 with the
    library's reason, never a silent fallback to unconstrained text."""
    found = output_schema(response_format, target)
    if found is None:
        return None
    schema, param = found
    try:
        return await ctx.grammars.compile(schema)
    except GrammarError as exc:
        raise InvalidRequestError(f"{param}: this JSON schema cannot be enforced: {exc}", param=param) from exc


def resolve_target(model: str, adapter: str | None, ctx: ServingContext, user: str | None = None) -> Target:
    """DESIGN.md's rule: `adapter` if given, else `model` naming an adapter or the base; else 404.
    An adapter with a canary answers with the version `user` falls to (service.adapters.release).

    There is never a silent fallback to the base.
    """
    tenant = ctx.tenant
    if adapter is not None:
        if adapter == BASE and tenant.base:
            return Target(model_name=ctx.base_id)
        return _adapter_target(adapter, ctx, user, param="adapter")
    if model in ctx.registry and tenant.may_use(model):
        return _adapter_target(model, ctx, user, param="model")
    if model == ctx.base_id and tenant.base:
        return Target(model_name=ctx.base_id)
    # No list of what is served: a caller may see only what GET /v1/models shows it (tenants),
    # and a 404 should not hand every name to a scanner (security review L5).
    raise NotFoundError(f"the model {model!r} does not exist; GET /v1/models lists the served ones", param="model")


def _adapter_target(name: str, ctx: ServingContext, user: str | None, *, param: str) -> Target:
    """The adapter's target; an adapter the tenant may not use is a 404 worded exactly as for
    one that does not exist (a 403 would tell it exists)."""
    try:
        if not ctx.tenant.may_use(name):
            raise NotFoundError(f"the adapter {name!r} does not exist")
        record, role = ctx.registry.pick(name, user)
    except NotFoundError as exc:
        raise exc.about(param) from None
    return Target(model_name=name, adapter=name, manifest=record.manifest, version=record.version, role=role)


def check_token_ids(ids: Sequence[int], ctx: ServingContext, *, param: str) -> None:
    vocab = len(ctx.tokenizer)
    if any(not 0 <= i < vocab for i in ids):
        raise InvalidRequestError(f"token ids must lie in [0, {vocab})", param=param)


def check_request_size(sequences: int, tokens: int, ignore_eos: bool, ctx: ServingContext) -> None:
    """What one request may ask for, so that none can take the queue or the engine from the
    others (MAX_REQUEST_SEQUENCES, MAX_REQUEST_TOKENS, ALLOW_IGNORE_EOS)."""
    if ctx.max_request_sequences and sequences > ctx.max_request_sequences:
        raise InvalidRequestError(
            f"this request asks for {sequences} sequences (prompts x n); at most "
            f"{ctx.max_request_sequences} are served per request",
            param="n",
        )
    if ctx.max_request_tokens and tokens > ctx.max_request_tokens:
        raise InvalidRequestError(
            f"this request asks for {tokens} tokens in all (max_tokens x prompts x n); at most "
            f"{ctx.max_request_tokens} are served per request",
            param="max_tokens",
        )
    if ignore_eos and not ctx.allow_ignore_eos:
        raise InvalidRequestError("ignore_eos is off on this server (ALLOW_IGNORE_EOS)", param="ignore_eos")


def check_prompt(
    ids: Sequence[int], max_tokens: int, ctx: ServingContext, *, param: str, budget_param: str = "max_tokens"
) -> None:
    """Refuse prompts the model cannot run: empty, out-of-vocabulary ids, or too long. `param`
    names the prompt's field, `budget_param` the field `max_tokens` comes from."""
    if not ids:
        raise InvalidRequestError("the prompt must contain at least one token", param=param)
    check_token_ids(ids, ctx, param=param)
    if len(ids) >= ctx.max_context:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens; this model's context is {ctx.max_context}",
            param=param,
        )
    if len(ids) + max_tokens > ctx.max_context:
        raise InvalidRequestError(
            f"the prompt ({len(ids)} tokens) plus {budget_param} ({max_tokens}) exceeds this model's "
            f"context of {ctx.max_context} tokens",
            param=budget_param,
        )


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
