"""The engine interface: token ids and sampling parameters in, an async stream of tokens out.

The engine knows nothing of HTTP, pydantic or text; serving (`service.serving`) tokenizes,
detokenizes and applies stop strings. Closing the stream returned by `Engine.generate` cancels the
request: its slot is freed at the next step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from service.names import BASE, PEFT_BASE, AdapterKey  # noqa: F401  (re-exported: the engine's callers use them)

EngineFinish = Literal["stop", "length"]


class GrammarMatcher(Protocol):
    def mask(self, logits: Any) -> Any:
        """A copy of a 1-D row of logits with the forbidden tokens at -inf."""
        ...

    def within_budget(self, token: int, remaining: int) -> int:
        """The token to take with `remaining` steps left: the sampled one, or one that closes
        the structure in time."""
        ...

    def accept(self, token: int) -> None: ...

    def prefetch(self) -> None:
        """Compute the next mask ahead, off the engine's critical path (a GPU's forward pass)."""
        ...

    @property
    def finished(self) -> bool: ...


class Grammar(Protocol):
    def matcher(self) -> GrammarMatcher:
        """A new sequence's matcher (called on the engine thread; cheap: a copy)."""
        ...


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: chosen token plus k alternatives
    prompt_logprobs: int | None = None  # same, for every prompt token after the first
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    # Constrained decoding: each step's logits are masked to the tokens the grammar allows, and
    # the sequence ends ("stop") once the grammar is complete (service.grammar.Grammar).
    grammar: Grammar | None = field(default=None, compare=False)

    def stop_ids(self, eos_token_ids: frozenset[int]) -> frozenset[int]:
        return self.stop_token_ids if self.ignore_eos else self.stop_token_ids | eos_token_ids


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    adapter: str | None  # None: the base model
    params: SamplingParams
    # Part of an HTTP request the service already accepted (through `Engine.admit`): never
    # refused for the queue bound, so a started response is never cut short by overload.
    admitted: bool = False
    # The adapter's version the request resolved to (None: its current one). The request runs
    # on that version even if a new one is loaded meanwhile.
    adapter_version: str | None = None
    # Who sent it (a tenant of TENANTS_FILE; None: no tenants): its prefix-cache entries are its
    # own, and its rows count toward its share of the batch.
    tenant: str | None = None

    @property
    def adapter_key(self) -> AdapterKey | None:
        """The engine's id of the adapter version (no version: the name's current one)."""
        return None if self.adapter is None else AdapterKey(self.adapter, self.adapter_version)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class EngineOutput:
    """One step's result for one request: usually one new token."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # first output only
    finish_reason: EngineFinish | None = None


class Engine(Protocol):
    """What serving needs of an engine: `BatchedEngine` (batched.py) serves, and `SimpleEngine`
    (simple.py, one request at a time) is the reference it is tested against."""

    @property
    def healthy(self) -> bool: ...

    async def start(self, executor: Any = None) -> None:
        """Start the worker loop, on `executor`'s thread if given (the one that loaded the model)."""
        ...

    async def stop(self) -> None: ...

    def admit(self, sequences: int, tenant: str | None = None) -> None:
        """Raise QueueFull unless `sequences` more fit in the queue now (with tenants, in the
        tenant's own: one tenant's flood never fills another's).

        Serving admits a whole HTTP request (every choice, and any retry) before its response
        starts, then submits its sequences with `admitted=True`.
        """
        ...

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream the request's tokens; raise QueueFull if the queue is full (unless the
        request was admitted)."""
        ...

    # --- its adapters (any thread: the engine applies changes between steps) -------------------

    def adapter_state(self, key: AdapterKey) -> str:
        """Where an adapter version is: "resident" (a device slot), "cached"
        (host memory), "loading" (read from disk) or "registered" (none of these)."""
        ...

    def pinned_adapters(self) -> set[str]:
        """Names kept in a device slot whatever the traffic."""
        ...

    def pin_adapter(self, name: str, pinned: bool) -> None:
        """Keep `name` in a device slot (loaded soon, never evicted), or let it be evicted
        again. ValueError when it cannot be pinned (no slots, or every other slot pinned)."""
        ...

    def reload_adapters(self, names: list[str]) -> None:
        """These adapters have a new current version: each one that is resident now takes a
        slot for the new version before a request asks for it."""
        ...
