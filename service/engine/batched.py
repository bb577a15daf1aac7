"""The batched engine: iteration-level scheduling over one padded running batch.

Each iteration admits waiting requests in FIFO order (prefill, up to the batch capacity and a
prefill token budget), then advances every running sequence by one token in a single forward
pass in which each row runs through its own adapter (PEFT's per-row `adapter_names`). A sequence
leaves the batch as soon as it finishes or its client goes away.

The KV cache is a transformers `DynamicCache` whose rows are left-padded to a common length: a
new request's cache is padded (or the batch's is) when it joins, rows are dropped with
`batch_select_indices` when they leave, and columns that became padding in every row are cut
off. Each row keeps its own positions, so padding never changes what a sequence computes.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from service.engine import EngineOutput
from service.engine.sampling import make_generator, sample, token_logprob
from service.engine.worker import STOP, Job, Outbox, WorkerEngine
from service.errors import EngineError, ServiceUnavailableError

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

    @property
    def adapter(self) -> str | None:
        return self.job.request.adapter


class BatchedEngine(WorkerEngine):
    def __init__(self, *args, max_batch_size: int = 16, max_prefill_tokens: int = 4096, **kwargs):
        super().__init__(*args, **kwargs)
        self.capacity = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self._pending: deque[Job] = deque()  # taken from the queue, not admitted yet (FIFO)
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length], 0 on left padding
        self._outbox = Outbox()

    # --- scheduling ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            admitted, stop = self._admissions()
            self._admit_all(admitted)
            self._outbox.flush()
            if stop:
                self._fail_running(ServiceUnavailableError("the engine stopped"))
                self._outbox.flush()
                return
            if self._rows:
                try:
                    self._step()
                except Exception as exc:  # a failed step fails its batch, never the engine
                    self._step_failed("decode step", exc, len(self._rows))
                    self._fail_running(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                else:
                    self._step_succeeded()
                finally:
                    self._outbox.flush()

    def _admissions(self) -> tuple[list[Job], bool]:
        """Jobs to prefill now: FIFO, within capacity and the prefill token budget."""
        admitted: list[Job] = []
        tokens = 0
        while len(self._rows) + len(admitted) < self.capacity:
            if self._pending:
                job = self._pending.popleft()
            else:
                job = self._take(block=not self._rows and not admitted)
                if job is None:
                    break
                if job is STOP:
                    return admitted, True
            assert isinstance(job, Job)
            if job.cancelled.is_set():
                self._change(waiting_remove=job.label)
                continue
            size = len(job.request.prompt_ids)
            if admitted and tokens + size > self.max_prefill_tokens:
                self._pending.appendleft(job)  # first in line for the next iteration
                break
            busy = {r.adapter for r in self._rows} | {j.request.adapter for j in admitted}
            ready = self._adapter_ready(job, busy - {None})
            if ready is None:
                continue
            if not ready:
                # Every adapter slot serves a running sequence: this job waits at the head of
                # the line (strict FIFO, so no later job can keep those adapters busy forever).
                self._pending.appendleft(job)
                break
            admitted.append(job)
            tokens += size
        return admitted, False

    def _admit_all(self, jobs: list[Job]) -> None:
        """Prefill the jobs admitted this iteration: together in one forward pass, except those
        that want their prompt's log-probabilities (every position's logits), one by one."""
        together = [j for j in jobs if j.request.params.prompt_logprobs is None]
        if len(together) < 2:
            together = []
        for job in jobs:
            if job not in together:
                self._admit(job)
        if together:
            self._admit_together(together)

    def _admit(self, job: Job) -> None:
        self._change(waiting_remove=job.label, running_add=job.label)
        try:
            self._start_row(job)
        except Exception as exc:
            self._step_failed("prefill", exc, 1)
            job.push(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
            if not any(r.job is job for r in self._rows):
                self._change(running_remove=job.label)

    def _admit_together(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._change(waiting_remove=job.label, running_add=job.label)
        try:
            logits, cache, mask = self.runner.prefill_batch(
                [list(j.request.prompt_ids) for j in jobs], [j.request.adapter for j in jobs]
            )
        except Exception as exc:
            self._step_failed("prefill", exc, len(jobs))
            for job in jobs:
                job.push(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                self._change(running_remove=job.label)
            return
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
        self._join(cache, mask)
        self._rows += rows

    def _new_row(self, job: Job, budget: int) -> _Row:
        params = job.request.params
        return _Row(
            job=job,
            generator=make_generator(params.seed, self.runner.device),
            budget=budget,
            stop_ids=params.stop_ids(self.eos_token_ids),
            length=len(job.request.prompt_ids),
        )

    def _start_row(self, job: Job) -> None:
        logits, cache, scored, budget = self._prefill(job)
        if budget == 0:
            self._change(running_remove=job.label)
            return
        row = self._new_row(job, budget)
        if self._emit(row, logits, scored):
            self._change(running_remove=job.label)
            return
        self._join(cache, torch.ones((1, row.length), dtype=torch.long, device=self.runner.device))
        self._rows.append(row)

    def _emit(self, row: _Row, logits: torch.Tensor, scored=None, greedy: int | None = None) -> bool:
        """Sample the row's next token and hand it to its client; True when the row is done.

        `greedy` is the row's argmax when the step computed all of them at once.
        """
        params = row.job.request.params
        if params.temperature == 0.0 and greedy is not None:
            token = greedy
        else:
            token = sample(logits, params, row.generator)
        logprobs = None
        if params.logprobs is not None:
            logprobs = (token_logprob(torch.log_softmax(logits, -1), token, params.logprobs),)
        row.step += 1
        finish = "stop" if token in row.stop_ids else ("length" if row.step >= row.budget else None)
        self._outbox.post(row.job, EngineOutput((token,), logprobs=logprobs, prompt_logprobs=scored, finish_reason=finish))
        row.last_token = token
        return finish is not None

    def _step(self) -> None:
        rows = self._rows
        self._on_step(len(rows))
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits = self.runner.decode_batch(
            [r.last_token for r in rows],
            self._cache,
            mask,
            [r.length for r in rows],
            [r.adapter for r in rows],
        )
        self._mask = mask
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

    # --- the padded cache ---------------------------------------------------------------------

    def _join(self, cache: DynamicCache, new_mask: torch.Tensor) -> None:
        """Add freshly prefilled rows (their cache and mask, left-padded) to the running batch."""
        lead = int(new_mask.argmax(dim=1).min())  # columns that are padding in every new row
        if lead:
            new_mask = new_mask[:, lead:]
            for layer in cache.layers:
                layer.keys = layer.keys[..., lead:, :]
                layer.values = layer.values[..., lead:, :]
        if self._cache is None:
            self._cache, self._mask = cache, new_mask
            return
        width = max(self._mask.shape[1], new_mask.shape[1])
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(new_mask, width)], dim=0)
        for running, joining in zip(self._cache.layers, cache.layers, strict=True):
            running.keys = torch.cat([_pad_left(running.keys, width), _pad_left(joining.keys, width)])
            running.values = torch.cat(
                [_pad_left(running.values, width), _pad_left(joining.values, width)]
            )

    def _retain(self, keep: list[int]) -> None:
        """Drop finished rows, then the columns that are padding in every remaining row."""
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.runner.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        lead = int(self._mask.argmax(dim=1).min())  # first valid column of the earliest row
        if lead:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[..., lead:, :]
                layer.values = layer.values[..., lead:, :]

    def _fail_running(self, error: Exception) -> None:
        for row in self._rows:
            self._outbox.post(row.job, error)  # after the step's earlier outputs, in order
            self._change(running_remove=row.job.label)
        self._rows, self._cache, self._mask = [], None, None


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad the sequence dimension (-1 for masks, -2 for keys/values) with zeros to `width`."""
    dim = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
