"""A request's life on the engine thread: its `Job` (from the queue to its last output), its
`Row` while it generates in the running batch, whether its adapter can run (`Ready`), and the
`Outbox` that hands a step's outputs to the event loop in one wake-up."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from enum import Enum

import torch

from service.engine import BASE, AdapterKey, EngineOutput, EngineRequest, GrammarMatcher
from service.engine.prefix import Hit


@dataclass(eq=False)  # one job is one request: compared by identity
class Job:
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    results: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    slot: str | None = None  # the PEFT adapter that holds its adapter, once resident
    waiting_since: float | None = None  # when it first waited for an adapter slot
    # Its progress: the KV of its prompt's first `computed.length` tokens (a stored prefix found
    # at admission, then the chunks so far); None before any, and once it is a running row.
    computed: Hit | None = None

    @property
    def computed_tokens(self) -> int:
        return self.computed.length if self.computed is not None else 0

    @property
    def label(self) -> str:
        return self.request.adapter or BASE

    @property
    def key(self) -> AdapterKey | None:
        return self.request.adapter_key

    @property
    def tenant(self) -> str | None:
        return self.request.tenant

    def push(self, item: EngineOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.results.put_nowait, item)


@dataclass
class Row:
    """A request that generates: one row of the running batch."""

    job: Job
    generator: torch.Generator
    budget: int
    stop_ids: frozenset[int]
    length: int  # tokens of this row in the cache
    last_token: int = -1
    step: int = 0
    matcher: GrammarMatcher | None = None  # when its request has a grammar

    @property
    def adapter(self) -> str | None:
        """The PEFT adapter (slot) the row runs through; None for the base."""
        return self.job.slot


def _deliver(items: list[tuple[Job, EngineOutput | BaseException]]) -> None:
    for job, item in items:
        job.results.put_nowait(item)


class Outbox:
    """Outputs of one engine step, handed to the event loop in one wake-up rather than one per
    row (each wake-up makes the event-loop thread compete for the GIL with the engine thread)."""

    def __init__(self) -> None:
        self._items: list[tuple[Job, EngineOutput | BaseException]] = []

    def post(self, job: Job, item: EngineOutput | BaseException) -> None:
        self._items.append((job, item))

    def flush(self) -> None:
        if not self._items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, item in self._items:
            by_loop.setdefault(job.loop, []).append((job, item))
        self._items = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)


class Ready(Enum):
    """Whether a job's adapter can run now (`WorkerEngine._adapter_ready`)."""

    GO = "go"
    WAIT = "wait"
    FAILED = "failed"
