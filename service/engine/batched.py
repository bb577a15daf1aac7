"""The batched engine: iteration-level scheduling over one padded running batch.

Each iteration admits waiting requests in FIFO order (prefill, up to the batch capacity and a
prefill token budget), then advances every running sequence by one token in a single forward
pass in which each row runs through its own adapter (PEFT's per-row `adapter_names`). A sequence
leaves the batch as soon as it finishes or its client goes away.

The running batch's KV cache (service/engine/kvcache/) is either a left-padded `DynamicCache`
(`kv_cache="dynamic"`) or one preallocated slot per row, written in place, with each decode step
replayed from a CUDA graph on CUDA (`kv_cache="static"`). Each row keeps its own positions, so
neither padding nor slots change what a sequence computes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from service.engine import BASE, EngineOutput
from service.engine.budget import StepBudget, attention_span
from service.engine.kvcache import PaddedKV, SlotKV, kv_shape
from service.engine.packed import Piece, stack_rows, to_cache
from service.engine.prefix import Hit, PrefixCache, cache_layers
from service.engine.prefix import unsupported as prefix_unsupported
from service.engine.runner import hidden_dtype
from service.engine.sampling import make_generator
from service.engine.worker import STOP, Job, Outbox, WorkerEngine
from service.errors import EngineStopped, StepFailed

log = logging.getLogger(__name__)


@dataclass
class _Row:
    job: Job
    generator: torch.Generator
    budget: int
    stop_ids: frozenset[int]
    length: int  # tokens of this row in the cache
    last_token: int = -1
    step: int = 0
    matcher: Any = None  # the row's GrammarMatcher, when its request has a grammar

    @property
    def adapter(self) -> str | None:
        """The PEFT adapter (slot) the row runs through; None for the base."""
        return self.job.slot


class BatchedEngine(WorkerEngine):
    def __init__(
        self,
        *args,
        max_batch_size: int = 16,
        max_prefill_tokens: int = 4096,
        kv_cache: str = "dynamic",
        cuda_graphs: bool = True,
        on_kv_cache: Callable[[str, bool], None] = lambda kv_cache, graphs: None,
        on_capture: Callable[[float], None] = lambda seconds: None,
        on_slot_wait: Callable[[list[str], float | None], None] = lambda waiting, seconds: None,
        on_phase: Callable[[str, float], None] = lambda phase, seconds: None,
        prefix_cache: PrefixCache | None = None,
        packed_steps: bool = True,
        step_slowdown: float = 0.0,
        overlap_masks: bool | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # Grammar masks computed during the forward pass (None: on CUDA only; see _step).
        self.overlap_masks = self.runner.device.type == "cuda" if overlap_masks is None else overlap_masks
        self.capacity = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self._pending: deque[Job] = deque()  # taken from the queue, not admitted yet (FIFO)
        self._rows: list[_Row] = []
        # Fair admission (see _admissions): the adapter whose slot is being freed for a waiting
        # one, and the hooks told who waits for a slot (labels) and how long a wait took.
        self._draining: str | None = None
        self.prefix_cache = prefix_cache  # KV of prompt prefixes, per adapter version
        # Joining jobs: their prompt is prefilled in decode steps (packed) or between them, a
        # long one a chunk per iteration (each holds the KV done so far as `job.prefix`).
        self._joining: list[Job] = []
        self._can_chunk = prefix_unsupported(self.runner, self.max_context) is None
        self.packed_steps = packed_steps  # new prompts and chunks in the decode step's pass (_packs)
        # Prompt tokens per iteration: MAX_PREFILL_TOKENS, and in packed steps beside running rows
        # as many as keep the step within `step_slowdown` plain decode steps (budget.py).
        self.step_budget = StepBudget(step_slowdown, max_prefill_tokens, span=attention_span(self.runner.model))
        self._prefill_budget: float = max_prefill_tokens  # this iteration's (_iteration_budget)
        self._timed = False  # whether it is the time budget's
        self._on_slot_wait = on_slot_wait
        # Told the seconds of each iteration's prefill work (admissions and chunks) and of each
        # decode step: where the engine thread's time goes (hotswap_engine_step_seconds).
        self._on_phase = on_phase
        self._waiters: list[str] = []
        self._admitted: list[Job] = []  # this iteration's, until they run (see _abandon)
        self._held: list[Job] = []  # taken from the queue this iteration, passed over
        if kv_cache == "static":
            slots = self.residency.max_resident if self.residency is not None else 1
            self._kv = SlotKV(
                self.runner,
                max_batch_size,
                self.max_context,
                cuda_graphs=cuda_graphs,
                lora_slots=slots,
                on_capture=on_capture,
                on_graphs_off=lambda: on_kv_cache("static", False),
            )
            shape = kv_shape(self.runner.model.config)
            if shape is not None:
                self._kv.reserve(*shape, dtype=hidden_dtype(self.runner.model))
        elif kv_cache == "dynamic":
            self._kv = PaddedKV(self.runner)
        else:
            raise ValueError(f"kv_cache must be 'static' or 'dynamic', not {kv_cache!r}")
        on_kv_cache(kv_cache, bool(getattr(self._kv, "graphs", False)))
        self._outbox = Outbox()
        self._masker: ThreadPoolExecutor | None = None  # computes grammar masks during forward passes

    @property
    def kv_cache(self) -> PaddedKV | SlotKV:
        """The running batch's KV cache."""
        return self._kv

    @property
    def running(self) -> int:
        """Sequences in the running batch now."""
        return len(self._rows)

    # --- scheduling ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._recover()
            self._prefill_budget = self._iteration_budget()
            admitted, stop = self._admissions()
            started = time.perf_counter()
            packs = bool(admitted or self._joining) and self._packs()  # one decision per iteration
            prefilled = self._admit_all(admitted, packs)
            self._admitted, self._held = [], []  # in rows, joining, pending or answered now
            pieces = [] if stop else self._piece_plan()
            separate = bool(pieces) and not packs
            if separate:
                self._advance_chunks(pieces)  # each chunk in a forward pass of its own
                pieces = []
            if prefilled or separate:
                self._on_phase("prefill", time.perf_counter() - started)
            self._outbox.flush()
            if stop:
                self._fail_running(EngineStopped("the engine stopped"))
                while self._pending:
                    self._outbox.post(self._pending.popleft(), EngineStopped("the engine stopped"))
                self._outbox.flush()
                return
            if self._rows or pieces:
                started = time.perf_counter()
                rows = len(self._rows)
                work = sum(self.step_budget.work(len(piece.ids), piece.start) for _, piece in pieces)
                joined = sum(len(job.request.prompt_ids) for job, piece in pieces if _finishes(job, piece))
                try:
                    self._step(pieces)
                except Exception as exc:  # a failed step fails its batch, never the engine
                    self._step_failed("decode step", exc, len(self._rows) + len(pieces))
                    error = StepFailed(f"generation failed: {type(exc).__name__}: {exc}")
                    self._fail_pieces(pieces, error)
                    self._fail_running(error, joining=False)
                else:
                    seconds = time.perf_counter() - started
                    self._step_succeeded()
                    self._on_phase("packed" if pieces else "decode", seconds)
                    self.step_budget.observe(rows, seconds, work, joined)
                finally:
                    self._outbox.flush()

    def _admissions(self) -> tuple[list[Job], bool]:
        """Jobs to prefill now: FIFO within capacity and the prefill token budget, where a job
        whose adapter cannot run yet does not hold up the jobs behind it.

        A job waits when its adapter's weights are still being read from disk (the batch runs
        meanwhile), or when every adapter slot serves running rows. Then, so that it is never
        starved, the engine drains one slot: no new rows join the adapter with the fewest running
        rows (unless pinned) until the waiting one has its slot, so the wait is bounded by what
        those rows have left to generate. Jobs for an adapter that waits stay behind the first
        (FIFO per adapter), and jobs on resident adapters keep flowing.
        """
        admitted: list[Job] = []
        waiting: list[Job] = []  # passed over this time, in order
        self._admitted, self._held = admitted, waiting  # for _abandon, should anything below fail
        blocked: set[str | None] = set()  # adapters that wait; their later jobs stay behind
        stop = False
        # The step's prefill budget goes to prompts still joining first, then to new ones.
        tokens = min(self._prefill_budget, sum(self._left(j) for j in self._joining))
        running = {j.key for j in self._busy_jobs()} - {None}
        if self.residency is not None:
            self.residency.preload_pending(running)
        lookahead = len(self._pending) + self.capacity * 4
        while len(self._rows) + len(self._joining) + len(admitted) < self.capacity and lookahead > 0:
            lookahead -= 1
            if self._pending:
                job = self._pending.popleft()
            elif len(waiting) >= self.capacity * 4:
                break
            else:
                idle = not self._rows and not self._joining and not admitted and not waiting
                job = self._take(block=idle)
                if job is None:
                    break
                if job is STOP:
                    stop = True
                    break
            assert isinstance(job, Job)
            if job.cancelled.is_set():
                self._change(waiting_remove=job.label)
                continue
            size = len(job.request.prompt_ids)
            if (admitted or tokens) and tokens + size > self._prefill_budget:
                waiting.append(job)  # first in line for the next iteration
                break
            if job.key in blocked or (job.key is not None and job.key == self._draining):
                waiting.append(job)
                continue
            busy = running | {j.key for j in admitted}
            ready = self._adapter_ready(job, busy - {None})
            if ready is None:
                continue
            if not ready:
                blocked.add(job.key)
                waiting.append(job)
                if job.waiting_since is None:
                    job.waiting_since = time.monotonic()
                if self._draining is None and self.residency.state(job.key) != "loading":
                    self._draining = self._drain_choice(running)
                continue
            if job.waiting_since is not None:
                self._on_slot_wait(self._slot_waiters(waiting), time.monotonic() - job.waiting_since)
                if self._draining is not None and not any(j.waiting_since for j in waiting):
                    self._draining = None
            admitted.append(job)
            tokens += size
        self._pending.extendleft(reversed(waiting))
        if not any(j.waiting_since for j in self._pending):
            self._draining = None
        waiters = self._slot_waiters(self._pending)
        if waiters != self._waiters:
            self._waiters = waiters
            self._on_slot_wait(waiters, None)
        if not admitted and not self._rows and not self._joining and self._pending and not stop:
            self._wait_for_adapters()  # every waiting job waits for a disk read
        return admitted, stop

    def _busy_jobs(self) -> list[Job]:
        """Jobs that hold an adapter slot: running rows and prompts still joining."""
        return [r.job for r in self._rows] + self._joining

    def _drain_choice(self, running: set[str]) -> str | None:
        """The running adapter to stop admitting to, so its slot frees soonest: the fewest
        running rows, never a pinned one."""
        counts: dict[str, int] = {}
        for row in self._rows:
            key = row.job.key
            if key is not None and key in running and not self.residency.is_pinned(key):
                counts[key] = counts.get(key, 0) + 1
        return min(counts, key=counts.get) if counts else None

    @staticmethod
    def _slot_waiters(jobs: Any) -> list[str]:
        return [j.label for j in jobs if j.waiting_since is not None]

    def _admit_all(self, jobs: list[Job], packs: bool) -> bool:
        """Start the jobs admitted this iteration. Where steps are packed (`packs`), every
        prompt rides in this iteration's decode step (a long one a chunk per step); otherwise
        the prompts are prefilled now, together in one forward pass (a job whose prompt starts
        with a stored prefix runs only the rest of it, in the same pass), and a long one is
        chunked. Those that want their prompt's log-probabilities (every position's logits) are
        prefilled now, one by one. Returns whether anything was prefilled now.

        Prefilling prefix hits one by one cost a forward pass each: with a shared system prompt
        every request hits, and 16 joining clients took 16 passes (bench.gap, docs/benchmarks.md).
        A pass of its own for each iteration's new prompts cost the running streams that pass's
        fixed part whenever requests arrive one by one.
        """
        for job in jobs:
            job.prefix = self._stored_prefix(job)
        for job in [j for j in jobs if self._chunked(j) or (packs and j.request.params.prompt_logprobs is None)]:
            self._change(waiting_remove=job.label, running_add=job.label)
            self._joining.append(job)
            jobs = [j for j in jobs if j is not job]
        together = [j for j in jobs if j.request.params.prompt_logprobs is None]
        if len(together) < 2:
            together = []
        for job in jobs:
            if job not in together:
                self._admit(job)
        if together:
            self._admit_together(together)
        return bool(jobs)

    def _stored_prefix(self, job: Job) -> Any:
        if self.prefix_cache is None or job.request.params.prompt_logprobs is not None:
            return None
        return self.prefix_cache.lookup(job.key or BASE, job.request.prompt_ids, DynamicCache)

    def _store_prefix(self, job: Job, layers: list) -> None:
        if self.prefix_cache is None:
            return
        try:  # storing is an optimisation: a failure (an OOM copying the KV) costs only reuse
            self.prefix_cache.store(job.key or BASE, job.request.prompt_ids, layers)
        except Exception as exc:
            log.warning("storing a prompt prefix failed: %s", exc)

    def _chunked(self, job: Job) -> bool:
        """Whether the job's prompt (past a stored prefix) exceeds the step's prefill budget:
        then it is prefilled in chunks between decode steps, so running streams keep going."""
        params = job.request.params
        return self._can_chunk and params.prompt_logprobs is None and self._left(job) > self._prefill_budget

    @staticmethod
    def _left(job: Job) -> int:
        """Prompt tokens of the job not prefilled yet."""
        return len(job.request.prompt_ids) - (job.prefix.length if job.prefix is not None else 0)

    def _piece_plan(self) -> list[tuple[Job, Piece]]:
        """This iteration's piece of each joining prompt, FIFO within the step's prefill
        budget (a prompt whose rest fits gets all of it, and starts generating after it)."""
        budget, plan = self._prefill_budget, []
        for job in list(self._joining):
            if job.cancelled.is_set():
                self._joining.remove(job)
                self._change(running_remove=job.label)
                continue
            if budget <= 0:
                continue
            prompt, left = job.request.prompt_ids, self._left(job)
            done = len(prompt) - left
            if self._timed:  # sized by time (budget.py): attention over its past, its join
                take, spent = self.step_budget.piece(budget, done, left, len(prompt))
            else:
                take = spent = min(left, budget)
            past = cache_layers(job.prefix.cache) if job.prefix is not None else None
            plan.append((job, Piece(list(prompt[done : done + take]), done, job.slot, past)))
            budget -= spent
        return plan

    def _iteration_budget(self) -> float:
        """Prompt tokens this iteration may prefill: MAX_PREFILL_TOKENS, or, where they ride in a
        packed step beside running rows, the work (budget.py: tokens, attention over their past
        counted) that keeps the rows' step within the slowdown. Separate prefill passes keep
        MAX_PREFILL_TOKENS: their cost has a fixed part (a whole forward pass) that packed steps
        share with the decode step. Each request that waits to join (as many as the batch has
        room for) widens it by one share."""
        self._timed = bool(self._rows) and self.step_budget.slowdown > 0 and self._packs()
        if not self._timed:
            return self.max_prefill_tokens
        rows = len(self._rows)
        waiting = min(len(self._joining) + self._queued(), self.capacity - rows)
        return self.step_budget.allowance(rows, waiting)

    def _packs(self) -> bool:
        """Whether this iteration's chunks join the decode step's forward pass (packed.py)
        rather than each running in a pass of its own, which the running streams wait for."""
        return self.packed_steps and isinstance(self._kv, PaddedKV) and self.runner.packable(self.max_context)

    def _advance_chunks(self, plan: list[tuple[Job, Piece]]) -> None:
        """Prefill each planned chunk in a forward pass of its own; a prompt's last one starts
        it generating."""
        for job, piece in plan:
            end = piece.start + len(piece.ids)
            if _finishes(job, piece):
                self._joining.remove(job)
                self._admit(job, started=True)
                continue
            try:
                _, cache = self.runner.prefill(list(job.request.prompt_ids[:end]), job.slot, past=job.prefix)
            except Exception as exc:
                self._step_failed("prefill", exc, 1)
                self._fail_pieces([(job, piece)], StepFailed(f"generation failed: {type(exc).__name__}: {exc}"))
                continue
            job.prefix = Hit(end, cache)

    def _finish_pieces(self, plan: list[tuple[Job, Piece]], logits: torch.Tensor, done: list) -> None:
        """After a packed step: each joining prompt keeps its KV so far, and those whose last
        piece ran start generating (the first token from the piece's last logits), joining the
        running batch together."""
        joining: list[tuple[_Row, list]] = []
        for (job, piece), last, layers in zip(plan, logits, done, strict=True):
            if not _finishes(job, piece):
                job.prefix = Hit(piece.start + len(piece.ids), to_cache(layers))
                continue
            self._joining.remove(job)
            job.prefix = None
            self._store_prefix(job, layers)
            budget = self._budget(job)
            if budget <= 0:  # max_tokens 0, or a prompt that fills the context
                self._outbox.post(job, EngineOutput((), finish_reason="length"))
                self._change(running_remove=job.label)
                continue
            row = self._new_row(job, budget)
            if self._emit(row, last):
                self._change(running_remove=job.label)
                continue
            joining.append((row, layers))
        if not joining:
            return
        try:
            self._kv.join(*stack_rows([layers for _, layers in joining]))
        except Exception as exc:  # these rows fail (after their first token), never the engine
            self._step_failed("prefill", exc, len(joining))
            for row, _ in joining:
                self._outbox.post(row.job, StepFailed(f"generation failed: {type(exc).__name__}: {exc}"))
                self._change(running_remove=row.job.label)
            return
        self._rows += [row for row, _ in joining]

    def _fail_pieces(self, plan: list[tuple[Job, Piece]], error: Exception) -> None:
        for job, _ in plan:
            if job in self._joining:
                self._joining.remove(job)
            self._outbox.post(job, error)
            self._change(running_remove=job.label)

    def _admit(self, job: Job, started: bool = False) -> None:
        if not started:
            self._change(waiting_remove=job.label, running_add=job.label)
        try:
            self._start_row(job)
        except Exception as exc:
            self._step_failed("prefill", exc, 1)
            job.push(StepFailed(f"generation failed: {type(exc).__name__}: {exc}"))
            if not any(r.job is job for r in self._rows):
                self._change(running_remove=job.label)
        else:
            self._step_succeeded()

    def _admit_together(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._change(waiting_remove=job.label, running_add=job.label)
        try:
            logits, cache, mask = self.runner.prefill_batch(
                [list(j.request.prompt_ids) for j in jobs], [j.slot for j in jobs], [j.prefix for j in jobs]
            )
            for job in jobs:
                job.prefix = None  # its cache is the batch's now
            self._step_succeeded()
        except Exception as exc:
            self._step_failed("prefill", exc, len(jobs))
            for job in jobs:
                job.push(StepFailed(f"generation failed: {type(exc).__name__}: {exc}"))
                self._change(running_remove=job.label)
            return
        if self.prefix_cache is not None:  # each row's KV: its last columns (left padding)
            width, layers = mask.shape[1], cache_layers(cache)
            for i, job in enumerate(jobs):
                start = width - len(job.request.prompt_ids)
                self._store_prefix(job, [(k[i : i + 1, :, start:], v[i : i + 1, :, start:]) for k, v in layers])
        rows, keep = [], []
        for i, job in enumerate(jobs):
            budget = self._budget(job)
            if budget <= 0:  # max_tokens 0, or a prompt that fills the context
                job.push(EngineOutput((), finish_reason="length"))
                self._change(running_remove=job.label)
                continue
            row = self._new_row(job, budget)
            if self._emit(row, logits[i]):
                self._change(running_remove=job.label)
                continue
            rows.append(row)
            keep.append(i)
        if not keep:
            return
        if len(keep) < len(jobs):
            cache.batch_select_indices(torch.tensor(keep, device=self.runner.device))
            mask = mask[keep]
        try:
            self._kv.join(cache, mask)
        except Exception as exc:  # these rows fail (after their first token), never the engine
            self._step_failed("prefill", exc, len(rows))
            for row in rows:
                self._outbox.post(row.job, StepFailed(f"generation failed: {type(exc).__name__}: {exc}"))
                self._change(running_remove=row.job.label)
            return
        self._rows += rows

    def _new_row(self, job: Job, budget: int) -> _Row:
        params = job.request.params
        return _Row(
            job=job,
            generator=make_generator(params.seed, self.runner.device),
            budget=budget,
            stop_ids=params.stop_ids(self.eos_token_ids),
            length=len(job.request.prompt_ids),
            matcher=params.grammar.matcher() if params.grammar is not None else None,
        )

    def _start_row(self, job: Job) -> None:
        logits, cache, scored, budget = self._prefill(job)
        self._store_prefix(job, cache_layers(cache))
        if budget == 0:
            self._change(running_remove=job.label)
            return
        row = self._new_row(job, budget)
        if self._emit(row, logits, scored):
            self._change(running_remove=job.label)
            return
        self._kv.join(cache, torch.ones((1, row.length), dtype=torch.long, device=self.runner.device))
        self._rows.append(row)

    def _emit(self, row: _Row, logits: torch.Tensor, scored=None, greedy: int | None = None) -> bool:
        """Sample the row's next token and hand it to its client; True when the row is done.

        `greedy` is the row's argmax when the step computed all of them at once.
        """
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
        finish = "stop" if stop else ("length" if row.step >= row.budget else None)
        self._outbox.post(
            row.job, EngineOutput((token,), logprobs=logprobs, prompt_logprobs=scored, finish_reason=finish)
        )
        row.last_token = token
        return finish is not None

    def _step(self, plan: list[tuple[Job, Piece]] = ()) -> None:
        """One token for every running row; with `plan`, the pieces of joining prompts in the
        same forward pass (a packed step)."""
        rows = self._rows
        if rows:
            self._on_step(len(rows))
        # On a GPU the grammar rows' next masks are computed on another thread while the forward
        # pass runs (llguidance drops the GIL), off the step's critical path. Not on a CPU: there
        # the forward pass already keeps every core busy, and the extra thread slowed 16
        # constrained clients from 97% to 91-93% of free ones (docs/structured-outputs.md).
        constrained = [r.matcher for r in rows if r.matcher is not None]
        overlap = constrained and self.overlap_masks
        masks = self._mask_thread().submit(lambda: [m.prefetch() for m in constrained]) if overlap else None
        tokens, positions, adapters = [r.last_token for r in rows], [r.length for r in rows], [r.adapter for r in rows]
        try:
            if plan:
                logits, done = self._kv.step_packed(tokens, positions, adapters, [piece for _, piece in plan])
            else:
                logits = self._kv.decode(tokens, positions, adapters)
        finally:
            if masks is not None:
                masks.result()
        if plan:
            logits, joined = logits[: len(rows)], logits[len(rows) :]
        # One argmax and one device-to-host copy for every greedy row, not one per row.
        greedy = None
        if any(r.job.request.params.temperature == 0.0 for r in rows):
            greedy = logits.argmax(dim=-1).tolist()
        keep = []
        for i, row in enumerate(rows):
            row.length += 1
            best = greedy[i] if greedy else None
            if row.job.cancelled.is_set() or self._emit(row, logits[i], greedy=best):
                self._change(running_remove=row.job.label)
            else:
                keep.append(i)
        if len(keep) < len(rows):
            self._retain(keep)
        if plan:
            self._finish_pieces(plan, joined, done)

    def _queued(self) -> int:
        return super()._queued() + len(self._pending)

    async def stop(self) -> None:
        await super().stop()
        if self._masker is not None:
            self._masker.shutdown(wait=False)
            self._masker = None

    def _mask_thread(self) -> ThreadPoolExecutor:
        if self._masker is None:
            self._masker = ThreadPoolExecutor(1, thread_name_prefix="hotswap-grammar")
        return self._masker

    def _retain(self, keep: list[int]) -> None:
        """Drop the finished rows (the cache may move the others: follow its order)."""
        order = self._kv.retain(keep)
        self._rows = [self._rows[i] for i in order]

    def _abandon(self, error: Exception) -> None:
        jobs = self._busy_jobs() + self._admitted + self._held + list(self._pending)
        self._rows, self._joining, self._admitted, self._held = [], [], [], []
        self._pending.clear()
        self._draining = None
        for job in {id(j): j for j in jobs}.values():  # Job compares by value: dedupe by identity
            self._outbox.post(job, error)
            self._forget(job)
        self._outbox.flush()
        try:
            self._kv.clear()
        except Exception as exc:
            log.error("clearing the KV cache failed: %s", exc)

    def _fail_running(self, error: Exception, joining: bool = True) -> None:
        """Fail the running rows (and the prompts still joining, unless `joining` is False: a
        failed step failed its own pieces, and did not touch the others)."""
        jobs = self._busy_jobs() if joining else [r.job for r in self._rows]
        for job in jobs:
            self._outbox.post(job, error)  # after the step's earlier outputs, in order
            self._change(running_remove=job.label)
        self._rows = []
        if joining:
            self._joining = []
        self._kv.clear()


def _finishes(job: Job, piece: Piece) -> bool:
    """Whether the piece is the last of its job's prompt (the job then joins the running batch)."""
    return piece.start + len(piece.ids) == len(job.request.prompt_ids)
