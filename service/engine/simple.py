"""The simple engine: one request at a time, adapter chosen per request (PEFT `adapter_names`).

Kept as the reference the batched engine is tested against, and for debugging
(`HOTSWAP_ENGINE=simple`).
"""

from __future__ import annotations

from service.engine import EngineOutput
from service.engine.jobs import Job, Ready
from service.engine.worker import STOP, WorkerEngine


class SimpleEngine(WorkerEngine):
    capacity = 1

    def _loop(self) -> None:
        while True:
            self._recover()
            self._current = None
            job = self._take(block=True)
            if job is STOP:
                return
            if not isinstance(job, Job):  # woken: nothing to run
                continue
            self._current = job
            ready = Ready.WAIT if not job.cancelled.is_set() else Ready.FAILED
            while ready is Ready.WAIT and not job.cancelled.is_set():
                ready = self._adapter_ready(job, busy=set())  # nothing runs: no slot is busy
                if ready is Ready.WAIT:  # its weights are being read
                    self._wait_for_adapters()
            if ready is Ready.GO and not job.cancelled.is_set():
                self._publish([job], [])
                self._tell()
                with self._failing([job], "generation"):
                    self._run(job)
            self._outbox.flush()
            self._publish([], [])
            self._tell()

    def _abandon(self, error: Exception) -> None:
        job, self._current = getattr(self, "_current", None), None
        if job is not None:
            job.push(error)
        self._publish([], [])
        self._tell()

    def _run(self, job: Job) -> None:
        logits, cache, scored = self._prefill_job(job)
        budget = self._budget(job)
        if budget <= 0:  # max_tokens 0, or a prompt that fills the context
            self._outbox.post(job, EngineOutput((), prompt_logprobs=scored, finish_reason="length"))
            return
        row = self._new_row(job, budget)
        while not self._emit(row, logits, scored if row.step == 0 else None):
            self._outbox.flush()
            self._tell()
            if job.cancelled.is_set():
                return
            self._stats.batch_sizes.append(1)
            logits = self.runner.decode(row.last_token, cache, job.slot)
