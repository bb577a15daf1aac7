"""The batched engine: each iteration, the scheduler's plan executed over one running batch.

An iteration is plan, execute, update (docs/architecture.md draws it):

1. gather: the queue's requests join the waiting line (the thread sleeps only when nothing runs);
2. plan (scheduler.plan, pure): the budget, who is admitted, which adapter reads start, which
   adapter's slot drains so that a waiting one is never starved;
3. admit: their adapters are made resident, and their stored prompt prefixes looked up;
4. pieces (scheduler.pieces, pure): each admitted prompt's next piece `[computed, computed + n)`,
   run alone, batched with the prompts that finish, or packed into the decode step;
5. step: one token for every running row (and the packed pieces) in one forward pass, each row
   and token through its own adapter;
6. update: outputs to the clients, finished rows out, finished prompts in as rows.

A prompt becomes a row by one path whichever way its last piece ran (`_start_rows`), and a
failed pass fails its requests by one path (`WorkerEngine._failing`), never the engine. The
running batch's KV cache (kvcache/) is a left-padded `DynamicCache` (`kv_cache="dynamic"`) or
one preallocated slot per row, each decode step replayed from a CUDA graph on CUDA
(`kv_cache="static"`); the static one does not pack, which the plan says in one place
(`Snapshot.packs`). Each row keeps its own positions, so neither changes what a sequence computes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from service.engine import EngineOutput, GrammarMatcher, TokenLogprob
from service.engine import scheduler as sched
from service.engine.budget import StepBudget, attention_span
from service.engine.config import EngineConfig, EngineStats
from service.engine.jobs import Job, Ready, Row
from service.engine.kv_layers import cache_layers, stack_rows, to_cache
from service.engine.kvcache import KVCache, make_kv_cache
from service.engine.packed import Piece
from service.engine.prefix import Hit, PrefixCache, owner
from service.engine.prefix import unsupported as prefix_unsupported
from service.engine.runner import ModelRunner
from service.engine.scheduler import How, PiecePlan, StepPlan
from service.engine.waiting import WaitingLine
from service.engine.worker import STOP, WorkerEngine
from service.errors import EngineStopped

if TYPE_CHECKING:
    from service.engine.residency import AdapterResidency

log = logging.getLogger(__name__)


@dataclass
class _Work:
    """A planned piece of a joining job's prompt."""

    job: Job
    plan: PiecePlan

    def piece(self) -> Piece:
        """The piece as a packed step takes it (its past: the KV computed so far)."""
        job, start, end = self.job, self.plan.start, self.plan.start + self.plan.take
        past = cache_layers(job.computed.cache) if job.computed is not None else None
        return Piece(list(job.request.prompt_ids[start:end]), start, job.slot, past)


class BatchedEngine(WorkerEngine):
    def __init__(
        self,
        runner: ModelRunner,
        config: EngineConfig,
        *,
        residency: AdapterResidency | None = None,
        prefix_cache: PrefixCache | None = None,
        on_stats: Callable[[EngineStats], None] | None = None,
    ):
        self.capacity = config.max_batch_size
        super().__init__(runner, config, residency=residency, on_stats=on_stats)
        # Grammar masks computed during the forward pass (None: on CUDA only; see _step).
        overlap = config.overlap_masks
        self.overlap_masks = self.runner.device.type == "cuda" if overlap is None else overlap
        self.max_prefill_tokens = config.max_prefill_tokens
        self.prefix_cache = prefix_cache  # KV of prompt prefixes, per adapter version
        self.packed_steps = config.packed_steps  # pieces of prompts in the decode step's pass, where it can
        # The work an iteration's prompts may do: MAX_PREFILL_TOKENS', and in packed steps beside
        # running rows what keeps the step within `step_slowdown` plain decode steps (budget.py).
        span = attention_span(self.runner.model)
        self.step_budget = StepBudget(config.step_slowdown, config.max_prefill_tokens, span=span)
        self._can_chunk = prefix_unsupported(self.runner, self.max_context) is None
        self._pending = WaitingLine(self.residency)  # taken from the queue, not admitted yet
        self._joining: list[Job] = []  # admitted, their prompts computed a piece at a time
        self._rows: list[Row] = []
        self._shares = {tenant: sched.Share(weight, most) for tenant, weight, most in config.shares}
        slots = self.residency.max_resident if self.residency is not None else 1
        self._kv: KVCache = make_kv_cache(
            config.kv_cache,
            self.runner,
            config.max_batch_size,
            self.max_context,
            cuda_graphs=config.cuda_graphs,
            lora_slots=slots,
            on_capture=lambda seconds: self._on_stats(EngineStats(self.capacity, captures=[seconds])),
            on_graphs_off=lambda: self._on_stats(EngineStats(self.capacity, kv_cache=(config.kv_cache, False))),
        )
        self._on_stats(EngineStats(self.capacity, kv_cache=(config.kv_cache, self._kv.graphs)))
        self._masker: ThreadPoolExecutor | None = None  # computes grammar masks during forward passes

    @property
    def kv_cache(self) -> KVCache:
        """The running batch's KV cache."""
        return self._kv

    @property
    def running(self) -> int:
        """Sequences in the running batch now."""
        return len(self._rows)

    # --- the iteration ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._recover()
            if self._gather():
                self._abandon(EngineStopped("the engine stopped"))
                return
            plan = self._admit()
            started = time.perf_counter()
            self._joining = [job for job in self._joining if not job.cancelled.is_set()]
            views = tuple(self._view(job) for job in self._joining)
            work = sched.pieces(views, plan.budget, timed=plan.timed, packs=plan.packs, costs=self.step_budget)
            planned = [_Work(self._joining[p.index], p) for p in work]
            if self._prefill([w for w in planned if w.plan.how is not How.PACKED]):
                self._stats.phases.append(("prefill", time.perf_counter() - started))
            self._update()
            packed = [w for w in planned if w.plan.how is How.PACKED]
            if self._rows or packed:
                self._decode(packed)
                self._update()

    def _gather(self) -> bool:
        """Take every queued job into the waiting line, sleeping until one comes when nothing is
        to be done; True when the engine is told to stop."""
        block = not (self._rows or self._joining or self._pending)
        while True:
            job = self._take(block=block)
            if job is STOP:
                return True
            if not isinstance(job, Job):
                return False
            self._pending.append(job)
            block = False

    def _update(self) -> None:
        """Hand the iteration's outputs over, and its stats with the running and waiting labels."""
        self._outbox.flush()
        self._publish([r.job for r in self._rows] + self._joining, self._pending)
        self._tell()

    # --- admission ----------------------------------------------------------------------------

    def _admit(self) -> StepPlan:
        """Plan who joins and carry it out (waiting.py): the admitted jobs' adapters are made
        resident, and their stored prefixes looked up."""
        busy = {j.key for j in [r.job for r in self._rows] + self._joining if j.key is not None}
        if self.residency is not None:
            self.residency.preload_pending(busy)
        keys, fields = self._pending.snapshot([r.job for r in self._rows], busy)
        packs = self.packed_steps and self._kv.packable and self.runner.packable(self.max_context)
        joining = tuple(self._view(job) for job in self._joining)
        queued = self._jobs.qsize()
        fields["shares"] = self._shares
        plan = sched.plan(
            sched.Snapshot(
                self.capacity, joining=joining, budget=self.step_budget, packs=packs, queued=queued, **fields
            )
        )

        def admit(job: Job) -> Ready:
            ready = self._adapter_ready(job, busy)
            if ready is Ready.GO:
                if job.key is not None:
                    busy.add(job.key)
                job.computed = self._stored_prefix(job)
                self._joining.append(job)
            return ready

        self._pending.settle(plan, keys, admit, self._outbox, self._stats)
        if not self._rows and not self._joining and self._pending:
            self._wait_for_adapters()  # every waiting job waits for a disk read
        return plan

    def _view(self, job: Job) -> sched.Joining:
        logprobs = job.request.params.prompt_logprobs is not None
        return sched.Joining(
            len(job.request.prompt_ids), job.computed_tokens, logprobs, not self._can_chunk, tenant=job.tenant
        )

    def _stored_prefix(self, job: Job) -> Hit | None:
        if self.prefix_cache is None or job.request.params.prompt_logprobs is not None:
            return None
        return self.prefix_cache.lookup(owner(job.key, job.tenant), job.request.prompt_ids, DynamicCache)

    # --- prompts ------------------------------------------------------------------------------

    def _prefill(self, planned: list[_Work]) -> bool:
        """Run the pieces that do not ride in the decode step: alone, or the prompts that finish
        in one left-padded pass. Returns whether any ran."""
        together = [w.job for w in planned if w.plan.how is How.BATCHED]
        for work in planned:
            if work.plan.how is How.ALONE:
                self._alone(work)
        if together:
            for job in together:
                self._joining.remove(job)
            result = None
            with self._failing(together, "prefill"):
                prompts = [list(job.request.prompt_ids) for job in together]
                result = self.runner.prefill_batch(prompts, [j.slot for j in together], [j.computed for j in together])
            if result is not None:
                self._start_rows(together, *result)
        return bool(planned)

    def _alone(self, work: _Work) -> None:
        """A piece in a pass of its own: a chunk keeps its KV; a last piece starts its row."""
        job, end = work.job, work.plan.start + work.plan.take
        if not work.plan.finishes:
            with self._failing([job], "prefill"):
                _, cache = self.runner.prefill(list(job.request.prompt_ids[:end]), job.slot, past=job.computed)
                job.computed = Hit(end, cache)
            return
        self._joining.remove(job)
        result = None
        with self._failing([job], "prefill"):
            result = self._prefill_job(job)
        if result is not None:
            logits, cache, scored = result
            mask = torch.ones((1, end), dtype=torch.long, device=self.runner.device)
            self._start_rows([job], logits[None], cache, mask, scored)

    def _start_rows(
        self,
        jobs: list[Job],
        logits: torch.Tensor,
        cache: DynamicCache,
        mask: torch.Tensor,
        scored: tuple[TokenLogprob | None, ...] | None = None,
    ) -> None:
        """Prompts whose KV is whole (`cache`, left-padded, and its mask) become running rows:
        each stores its prefix, gets its first token from its last logits, and those that go on
        join the running batch in one copy."""
        width, rows, keep = mask.shape[1], [], []
        for i, job in enumerate(jobs):
            job.computed = None  # its KV is the batch's now
            if self.prefix_cache is not None:  # a row's KV: its last columns (left padding)
                start = width - len(job.request.prompt_ids)
                self._store_prefix(
                    job, [(k[i : i + 1, :, start:], v[i : i + 1, :, start:]) for k, v in cache_layers(cache)]
                )
            budget = self._budget(job)
            if budget <= 0:  # max_tokens 0, or a prompt that fills the context
                self._outbox.post(job, EngineOutput((), prompt_logprobs=scored, finish_reason="length"))
                continue
            row = self._new_row(job, budget)
            if not self._emit(row, logits[i], scored):
                rows.append(row)
                keep.append(i)
        if not rows:
            return
        if len(keep) < len(jobs):
            cache.batch_select_indices(torch.tensor(keep, device=self.runner.device))
            mask = mask[keep]
        with self._failing([row.job for row in rows], "prefill"):
            self._kv.join(cache, mask)
            self._rows += rows

    def _store_prefix(self, job: Job, layers: list) -> None:
        if self.prefix_cache is None:
            return
        try:  # storing is an optimisation: a failure (an OOM copying the KV) costs only reuse
            self.prefix_cache.store(owner(job.key, job.tenant), job.request.prompt_ids, layers)
        except Exception as exc:
            log.warning("storing a prompt prefix failed: %s", exc)

    # --- decode steps -------------------------------------------------------------------------

    def _decode(self, packed: list[_Work]) -> None:
        """One step for the running rows and the packed pieces; its time teaches the budget."""
        started, rows = time.perf_counter(), len(self._rows)
        work = sum(self.step_budget.work(w.plan.take, w.plan.start) for w in packed)
        joined = sum(len(w.job.request.prompt_ids) for w in packed if w.plan.finishes)
        stepped = False
        with self._failing([r.job for r in self._rows] + [w.job for w in packed], "decode step", clear=True):
            self._step(packed)
            stepped = True
        if stepped:
            seconds = time.perf_counter() - started
            self._stats.phases.append(("packed" if packed else "decode", seconds))
            self.step_budget.observe(rows, seconds, work, joined)

    def _step(self, packed: list[_Work]) -> None:
        """One token for every running row; with `packed`, pieces of joining prompts in the same
        forward pass."""
        rows = self._rows
        if rows:
            self._stats.batch_sizes.append(len(rows))
        # On a GPU the grammar rows' next masks are computed on another thread while the forward
        # pass runs (llguidance drops the GIL), off the step's critical path; not on a CPU, where
        # the pass already keeps every core busy (docs/structured-outputs.md).
        constrained = [r.matcher for r in rows if r.matcher is not None]
        overlap = constrained and self.overlap_masks
        masks = self._mask_thread().submit(_prefetch, constrained) if overlap else None
        tokens, positions, adapters = [r.last_token for r in rows], [r.length for r in rows], [r.adapter for r in rows]
        try:
            if packed:
                pieces = [w.piece() for w in packed]
                logits, done = self._kv.step_packed(tokens, positions, adapters, pieces)
            else:
                logits = self._kv.decode(tokens, positions, adapters)
        finally:
            if masks is not None:
                masks.result()
        # One argmax and one device-to-host copy for every greedy row, not one per row.
        greedy = None
        if any(r.job.request.params.temperature == 0.0 for r in rows):
            greedy = logits[: len(rows)].argmax(dim=-1).tolist()
        keep = []
        for i, row in enumerate(rows):
            row.length += 1
            best = greedy[i] if greedy is not None else None
            if not row.job.cancelled.is_set() and not self._emit(row, logits[i], greedy=best):
                keep.append(i)
        if len(keep) < len(rows):
            order = self._kv.retain(keep)  # the cache may move the rows: follow its order
            self._rows = [self._rows[i] for i in order]
        if packed:
            self._finish_pieces(packed, logits[len(rows) :], done)

    def _finish_pieces(self, packed: list[_Work], logits: torch.Tensor, done: list) -> None:
        """After a packed step: each joining prompt keeps its KV so far, and those whose last
        piece ran become rows together."""
        finished, last, layers = [], [], []
        for i, (work, kv) in enumerate(zip(packed, done, strict=True)):
            if not work.plan.finishes:
                work.job.computed = Hit(work.plan.start + work.plan.take, to_cache(kv))
                continue
            self._joining.remove(work.job)
            finished.append(work.job)
            last.append(i)
            layers.append(kv)
        if finished:
            self._start_rows(finished, logits[last], *stack_rows(layers))

    # --- the rest -----------------------------------------------------------------------------

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

    def _drop(self, job: Job) -> None:
        if job in self._joining:
            self._joining.remove(job)

    def _clear_rows(self) -> None:
        self._rows = []
        self._kv.clear()

    def _abandon(self, error: Exception) -> None:
        """Fail every job the loop holds (the engine stops, or a fault outside any step)."""
        jobs = [r.job for r in self._rows] + self._joining + list(self._pending)
        self._rows, self._joining = [], []
        self._pending.clear()
        for job in dict.fromkeys(jobs):  # a job the fault left in two places is answered once
            self._outbox.post(job, error)
        self._update()
        try:
            self._kv.clear()
        except Exception as exc:
            log.error("clearing the KV cache failed: %s", exc)


def _prefetch(matchers: list[GrammarMatcher]) -> None:
    for matcher in matchers:
        matcher.prefetch()
