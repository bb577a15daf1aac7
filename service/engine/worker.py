"""What every engine shares: the bridge between asyncio and one model worker thread.

The asyncio side never touches the model: `generate` puts a job on a thread-safe queue and reads
the results that the worker hands back with `loop.call_soon_threadsafe`. Closing the stream sets
the job's cancellation flag, which the worker checks between steps. Subclasses write `_loop`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from service.engine import (
    AdapterKey,
    EngineFinish,
    EngineOutput,
    EngineRequest,
    GrammarMatcher,
    SamplingParams,
    TokenLogprob,
)
from service.engine.config import EngineConfig, EngineStats
from service.engine.jobs import Job, Outbox, Ready, Row
from service.engine.runner import ModelRunner
from service.engine.sampling import make_generator, sample, token_logprob
from service.errors import EngineStopped, HotswapError, QueueFull, StepFailed

if TYPE_CHECKING:
    from service.engine.residency import AdapterResidency

log = logging.getLogger(__name__)

STOP = object()  # queued by `stop` to wake the worker
WAKE = object()  # queued to make an idle worker look again (an adapter to preload)


class WorkerEngine:
    capacity = 1  # sequences generated at once
    # A failed step fails its requests and the engine carries on. Whether the engine itself is
    # at fault is asked of a probe, one token through the base (`_probe`): when it passes, the
    # requests caused the failure (an OOM of their own size, a bad grammar) and it is not
    # counted (security review H3: three large echo requests in a row once made the engine
    # unhealthy for good). Failures whose probe fails count; this many in a row mean the engine
    # cannot serve (a lost device, a corrupted model): it turns unhealthy, /health and /ready
    # answer 503, and it probes itself every `probe_seconds`, healthy again at the first pass.
    max_consecutive_failures = 3
    probe_seconds = 5.0

    def __init__(
        self,
        runner: ModelRunner,
        config: EngineConfig,
        *,
        residency: AdapterResidency | None = None,
        on_stats: Callable[[EngineStats], None] | None = None,
    ):
        self.runner = runner
        self.config = config
        self.residency = residency  # lazy loads and LRU eviction of adapters
        self.eos_token_ids = config.eos_token_ids
        self.max_context = config.max_context
        self.max_queued = config.max_queued
        # Told what each iteration did, in one value (the service's metrics read it).
        self._on_stats = on_stats or (lambda stats: None)
        self._stats = EngineStats(self.capacity)  # this iteration's, so far
        self._jobs: queue.Queue[Job | object] = queue.Queue()
        self._running_loop: asyncio.Future | None = None  # the worker loop, until it returns
        self._own_executor: ThreadPoolExecutor | None = None
        self._stopping = False
        # The labels of the jobs in the queue (added by `generate`, on the event loop's thread),
        # and the state last told (the worker derives it once an iteration).
        self._queued_labels: list[str] = []
        self._in_flight: dict[str | None, int] = {}  # per tenant, its requests in the engine (event loop)
        self._shown_running: list[str] = []
        self._shown_waiting: list[str] = []
        self._told: tuple[list[str], list[str]] | None = None
        self._state_lock = threading.Lock()
        self._failures = 0  # failed steps in a row
        self._outbox = Outbox()  # outputs to the event loop, handed over once an iteration
        if residency is not None:  # a pin or preload asks an idle engine to load it now
            residency.on_want = lambda: self._jobs.put(WAKE)

    @property
    def healthy(self) -> bool:
        alive = self._running_loop is not None and not self._running_loop.done() and not self._stopping
        return alive and self._failures < self.max_consecutive_failures

    def _step_failed(self, what: str, exc: Exception, jobs: int) -> None:
        if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the failed pass allocated, back for the next
        if self._probe():
            log.error("%s failed for %d requests (the engine itself works): %s", what, jobs, exc, exc_info=exc)
            self._failures = 0
            return
        self._failures += 1
        log.error("%s failed for %d requests (%d in a row): %s", what, jobs, self._failures, exc, exc_info=exc)
        if self._failures >= self.max_consecutive_failures:
            log.critical("the engine failed %d steps in a row; reporting unhealthy", self._failures)

    def _step_succeeded(self) -> None:
        self._failures = 0

    def _probe(self) -> bool:
        """One token through the base model: whether the engine itself can still compute."""
        token = min(self.eos_token_ids, default=0)
        try:
            self.runner.prefill([token], None)
        except Exception as exc:
            log.error("engine probe failed: %s", exc)
            return False
        return True

    def _recover(self) -> None:
        """An unhealthy engine probes itself (between iterations); a pass makes it healthy."""
        if self._failures >= self.max_consecutive_failures and self._probe():
            log.warning("the engine probe passed after %d failed steps; healthy again", self._failures)
            self._failures = 0

    async def start(self, executor: Executor | None = None) -> None:
        """Run the engine loop on `executor`'s thread, or on a thread of its own.

        Give it the single-thread executor that loaded the model (the service does): on CPU,
        torch's OpenMP workers belong to the OS thread that first ran an operator, and a second
        compute thread made every decode step about twice as slow (docs/benchmarks.md).
        """
        self._stopping = False
        self._jobs = queue.Queue()
        self._own_executor = None
        if executor is None:
            executor = self._own_executor = ThreadPoolExecutor(1, thread_name_prefix="hotswap-engine")
        self._running_loop = asyncio.get_running_loop().run_in_executor(executor, self._work)

    async def stop(self) -> None:
        self._stopping = True
        self._jobs.put(STOP)
        if self._running_loop is not None:
            await asyncio.gather(self._running_loop, return_exceptions=True)
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False)

    def admit(self, sequences: int, tenant: str | None = None) -> None:
        if not self.healthy:
            raise EngineStopped("the engine is not running")
        if len(self.config.shares) > 1 and tenant is not None:  # each tenant queues apart
            queued = self._in_flight.get(tenant, 0) - self.capacity  # running rows do not queue
            if queued + sequences > self.max_queued:
                raise QueueFull(
                    f"this tenant is at its queue limit ({self.max_queued} waiting requests); retry later",
                    code="tenant_queue_full",
                )
            return
        if self._queued() + sequences > self.max_queued:
            raise QueueFull(f"the server is at its queue limit ({self.max_queued} waiting requests); retry later")

    def _queued(self) -> int:
        """Requests waiting for the worker (its queue; subclasses add what they hold back)."""
        return self._jobs.qsize()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if not self.healthy:
            raise EngineStopped("the engine is not running")
        if not request.admitted:
            self.admit(1)
        job = Job(request, asyncio.get_running_loop(), asyncio.Queue())
        with self._state_lock:
            self._queued_labels.append(job.label)
            self._in_flight[request.tenant] = self._in_flight.get(request.tenant, 0) + 1
        self._publish()
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
            with self._state_lock:
                self._in_flight[request.tenant] -= 1

    # --- adapters (the Engine protocol's; AdapterResidency does the work) ---------------------

    def adapter_state(self, key: AdapterKey) -> str:
        return self.residency.state(key) if self.residency is not None else "registered"

    def pinned_adapters(self) -> set[str]:
        return self.residency.pinned if self.residency is not None else set()

    def pin_adapter(self, name: str, pinned: bool) -> None:
        if self.residency is None:
            if pinned:
                raise ValueError("this engine has no adapter slots to pin to")
            return
        if pinned:
            self.residency.pin(name)
        else:
            self.residency.unpin(name)

    def reload_adapters(self, names: list[str]) -> None:
        if self.residency is not None:
            for name in names:
                self.residency.want(name)

    # --- worker thread ------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                try:
                    self._loop()
                    return
                except Exception as exc:  # a fault outside any step: its requests fail, never the thread
                    self._step_failed("engine iteration", exc, 0)
                    try:
                        self._abandon(StepFailed(f"generation failed: {type(exc).__name__}: {exc}"))
                    except Exception:
                        log.exception("abandoning the iteration's requests failed")
        finally:
            # Fail whatever is still waiting, so no client hangs on a stopped engine.
            while not self._jobs.empty():
                job = self._take(block=False)
                if isinstance(job, Job):
                    job.push(EngineStopped("the engine stopped"))
            self._publish([], [])
            self._tell()

    def _loop(self) -> None:
        raise NotImplementedError

    def _abandon(self, error: Exception) -> None:
        """After a fault outside any step: fail every request the loop holds (subclasses say
        which), so that none waits for a loop that lost track of it."""
        raise NotImplementedError

    def _publish(self, running: Iterable[Job] | None = None, waiting: Iterable[Job] | None = None) -> None:
        """The labels of the running jobs and of the waiting ones (those the worker holds, then
        the queue's), into this iteration's stats if they changed. The worker derives them once
        an iteration; None keeps what it last gave. Called off the worker (`generate` queued a
        job), the change is told at once."""
        with self._state_lock:
            if running is not None:
                self._shown_running = [j.label for j in running]
            if waiting is not None:
                self._shown_waiting = [j.label for j in waiting]
            state = (list(self._shown_running), self._shown_waiting + self._queued_labels)
            if state == self._told:
                return
            self._told = state
        if running is None and waiting is None:
            self._on_stats(EngineStats(self.capacity, tuple(state[0]), tuple(state[1])))
        else:
            self._stats.running, self._stats.waiting = tuple(state[0]), tuple(state[1])

    def _tell(self) -> None:
        """Hand this iteration's stats to `on_stats` (if anything happened) and start anew."""
        stats, self._stats = self._stats, EngineStats(self.capacity)
        if stats:
            self._on_stats(stats)

    def _adapter_ready(self, job: Job, busy: set[AdapterKey]) -> Ready:
        """Make the job's adapter version resident: GO (`job.slot` names it for the model), WAIT
        (its weights are being read, or every slot is busy) or FAILED (it cannot be loaded: the
        job has its error). `busy`: the keys running rows use."""
        key = job.key
        if key is None or self.residency is None:
            job.slot = job.request.adapter
            return Ready.GO
        try:
            ready = self.residency.ensure(key, busy)
        except HotswapError as exc:
            self._outbox.post(job, exc)
            return Ready.FAILED
        if not ready:
            return Ready.WAIT
        job.slot = self.residency.slot(key)
        return Ready.GO

    @contextmanager
    def _failing(self, jobs: list[Job], what: str, *, clear: bool = False) -> Iterator[None]:
        """Run a step for `jobs`: if it raises, they fail (never the engine) and leave wherever
        they are (`_drop`; with `clear`, the running batch goes: its cache is in an unknown
        state), and the step counts for the engine's health."""
        try:
            yield
        except Exception as exc:
            self._step_failed(what, exc, len(jobs))
            if clear:
                self._clear_rows()
            error = StepFailed(f"generation failed: {type(exc).__name__}: {exc}")
            for job in jobs:
                self._outbox.post(job, error)  # after the step's earlier outputs, in order
                self._drop(job)
        else:
            self._step_succeeded()

    def _drop(self, job: Job) -> None:
        """Forget a failed job wherever the loop holds it (subclasses say where)."""

    def _clear_rows(self) -> None:
        """Drop every running row and its cache (subclasses that batch rows)."""

    def _wait_for_adapters(self) -> None:
        """Nothing can run until an adapter's disk read ends: sleep until one does (briefly)."""
        if self.residency is not None:
            self.residency.wait_for_reads()

    def _choose(
        self,
        params: SamplingParams,
        logits: torch.Tensor,
        generator: torch.Generator,
        matcher: GrammarMatcher | None,
        greedy: int | None = None,
        remaining: int = 1 << 30,
    ) -> tuple[int, tuple[TokenLogprob, ...] | None, bool]:
        """A row's next token, within its grammar if it has one: (token, its log-probabilities,
        whether the grammar is now complete). `greedy` is the row's argmax when a step computed
        every row's at once (unused under a grammar, whose mask changes the argmax). `remaining`:
        the steps the row has left, this one included (a grammar closes its structure in them).

        Log-probabilities are those of the distribution the token was drawn from: under a
        grammar, the masked one (docs/structured-outputs.md)."""
        started = time.perf_counter()
        if matcher is not None:
            logits, greedy = matcher.mask(logits), None
        if params.temperature == 0.0 and greedy is not None:
            token = greedy
        else:
            token = sample(logits, params, generator)
        if matcher is not None:
            token = matcher.within_budget(token, remaining)
        logprobs = None
        if params.logprobs is not None:
            logprobs = (token_logprob(torch.log_softmax(logits, -1), token, params.logprobs),)
        if matcher is None:
            return token, logprobs, False
        try:
            matcher.accept(token)
            done = matcher.finished
        except ValueError as exc:  # cannot happen with the mask applied; never fail the batch
            log.error("grammar: %s; ending the sequence", exc)
            done = True
        self._stats.grammar_seconds.append(time.perf_counter() - started)
        return token, logprobs, done

    def _new_row(self, job: Job, budget: int) -> Row:
        params = job.request.params
        return Row(
            job=job,
            generator=make_generator(params.seed, self.runner.device),
            budget=budget,
            stop_ids=params.stop_ids(self.eos_token_ids),
            length=len(job.request.prompt_ids),
            matcher=params.grammar.matcher() if params.grammar is not None else None,
        )

    def _emit(self, row: Row, logits: torch.Tensor, scored=None, greedy: int | None = None) -> bool:
        """Sample the row's next token and hand it to its client; True when the row is done.
        `greedy`: the row's argmax, when a step computed all of them at once."""
        params = row.job.request.params
        try:
            token, logprobs, complete = self._choose(
                params, logits, row.generator, row.matcher, greedy, row.budget - row.step
            )
        except Exception as exc:  # this row's sampling or grammar: this row fails, not its batch
            self._step_failed("sampling", exc, 1)
            self._outbox.post(row.job, StepFailed(f"generation failed: {type(exc).__name__}: {exc}"))
            return True
        row.step += 1
        stop = token in row.stop_ids or complete
        finish: EngineFinish | None = "stop" if stop else ("length" if row.step >= row.budget else None)
        self._outbox.post(
            row.job, EngineOutput((token,), logprobs=logprobs, prompt_logprobs=scored, finish_reason=finish)
        )
        row.last_token = token
        return finish is not None

    def _budget(self, job: Job) -> int:
        """Tokens the job may generate: max_tokens, within what is left of the context."""
        return min(job.request.params.max_tokens, self.max_context - len(job.request.prompt_ids))

    def _prefill_job(self, job: Job) -> tuple[torch.Tensor, Any, tuple | None]:
        """Run the rest of the job's prompt (after `job.computed`) in a pass of its own: (last
        logits, the whole prompt's cache, its log-probabilities when the request wants them)."""
        params, prompt = job.request.params, list(job.request.prompt_ids)
        if params.prompt_logprobs is not None:
            return self.runner.score_prompt(prompt, job.slot, params.prompt_logprobs)
        logits, cache = self.runner.prefill(prompt, job.slot, past=job.computed)
        return logits, cache, None

    def _take(self, block: bool) -> Job | object | None:
        """The next queued job (or STOP); None when nothing waits (or a WAKE came)."""
        unhealthy = self._failures >= self.max_consecutive_failures
        try:  # an unhealthy engine wakes up to probe itself (_recover)
            job = self._jobs.get(block=block, timeout=self.probe_seconds if block and unhealthy else None)
        except queue.Empty:
            return None
        if isinstance(job, Job):
            with self._state_lock:
                self._queued_labels.remove(job.label)
        return None if job is WAKE else job
