"""What every endpoint works with before it generates: the serving context (the service as one
caller sees it), the target a request resolves to (the base, or an adapter version and its
release role), the output schema it must follow, and the checks of what a request asks for.
Running the choices is `service.serving.generation`."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

from service.adapters.manifest import AdapterManifest
from service.adapters.registry import AdapterRegistry
from service.engine import BASE, Engine
from service.errors import InvalidRequestError, NotFoundError
from service.grammar import JSON_OBJECT, Grammar, GrammarCompiler, GrammarError
from service.guardrails import Guardrails
from service.metrics import Metrics
from service.serving.specials import SpecialText
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
