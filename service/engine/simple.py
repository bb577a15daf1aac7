"""The simple engine: one request at a time on a worker thread, adapter chosen per request.

The asyncio side never touches the model: `generate` puts a job on a thread-safe queue and reads
results that the worker hands back with `loop.call_soon_threadsafe`. The worker checks each job's
cancellation flag between steps, so a closed stream frees the model within one token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from service.engine import EngineOutput, EngineRequest, TokenLogprob
from service.engine.runner import ModelRunner
from service.engine.sampling import make_generator, sample, token_logprob
from service.errors import EngineError, OverloadedError, ServiceUnavailableError

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Job:
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    results: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def push(self, item: EngineOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.results.put_nowait, item)


class SimpleEngine:
    def __init__(
        self,
        runner: ModelRunner,
        *,
        eos_token_ids: frozenset[int],
        max_context: int,
        max_queued: int = 256,
        on_state: Callable[[list[str], list[str], int], None] | None = None,
    ):
        self.runner = runner
        self.eos_token_ids = eos_token_ids
        self.max_context = max_context
        self.max_queued = max_queued
        # Told (running adapters, waiting adapters, capacity) at every change; "base" for none.
        self._on_state = on_state or (lambda running, waiting, capacity: None)
        self._jobs: queue.Queue[_Job | object] = queue.Queue()
        self._waiting: list[str] = []
        self._running: list[str] = []
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def start(self) -> None:
        self._stopping = False
        self._jobs = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="hotswap-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._jobs.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._stopping or self._thread is None:
            raise ServiceUnavailableError("the engine is not running")
        if self._jobs.qsize() >= self.max_queued:
            raise OverloadedError(
                f"the server is at its queue limit ({self.max_queued} waiting requests); retry later",
                code="queue_full",
            )
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue())
        self._change(waiting_add=_label(request))
        self._jobs.put(job)
        try:
            while True:
                item = await job.results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled.set()

    # --- worker thread ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                break
            assert isinstance(job, _Job)
            label = _label(job.request)
            self._change(waiting_remove=label, running_add=None if job.cancelled.is_set() else label)
            if job.cancelled.is_set():
                continue
            try:
                self._run(job)
            except Exception as exc:  # a failed step fails its request, never the engine
                log.exception("generation failed for request %s", job.request.request_id)
                job.push(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                self._change(running_remove=label)
        # Fail whatever is still waiting, so no client hangs on a stopped engine.
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            if isinstance(job, _Job):
                job.push(ServiceUnavailableError("the engine stopped"))

    def _change(
        self,
        *,
        waiting_add: str | None = None,
        waiting_remove: str | None = None,
        running_add: str | None = None,
        running_remove: str | None = None,
    ) -> None:
        with self._state_lock:
            if waiting_add:
                self._waiting.append(waiting_add)
            if waiting_remove:
                self._waiting.remove(waiting_remove)
            if running_add:
                self._running.append(running_add)
            if running_remove:
                self._running.remove(running_remove)
            running, waiting = list(self._running), list(self._waiting)
        self._on_state(running, waiting, 1)

    def _run(self, job: _Job) -> None:
        request, params = job.request, job.request.params
        prompt = list(request.prompt_ids)
        logits, cache = self.runner.prefill(
            prompt, request.adapter, all_logits=params.prompt_logprobs is not None
        )
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = _prompt_logprobs(logits, prompt, params.prompt_logprobs)
            logits = logits[-1]
        budget = min(params.max_tokens, self.max_context - len(prompt))
        if budget <= 0:
            job.push(EngineOutput((), prompt_logprobs=prompt_logprobs, finish_reason="length"))
            return
        generator = make_generator(params.seed, self.runner.device)
        stop_ids = params.stop_token_ids | self.eos_token_ids
        for step in range(budget):
            if job.cancelled.is_set():
                return
            token = sample(logits, params, generator)
            logprobs = None
            if params.logprobs is not None:
                logprobs = (token_logprob(torch.log_softmax(logits, -1), token, params.logprobs),)
            finish = "stop" if token in stop_ids else ("length" if step == budget - 1 else None)
            job.push(
                EngineOutput(
                    (token,),
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs if step == 0 else None,
                    finish_reason=finish,
                )
            )
            if finish is not None:
                return
            logits = self.runner.decode(token, cache, request.adapter)


def _label(request: EngineRequest) -> str:
    return request.adapter or "base"


def _prompt_logprobs(
    logits: torch.Tensor, prompt: list[int], top_k: int
) -> tuple[TokenLogprob | None, ...]:
    """Log-probability of each prompt token given the ones before it (the first has none)."""
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    scored = tuple(token_logprob(logprobs[i], prompt[i + 1], top_k) for i in range(len(prompt) - 1))
    return (None, *scored)
