"""The simple engine: one request at a time, adapter chosen per request (PEFT `adapter_names`).

Kept as the reference the batched engine is tested against, and for debugging
(`HOTSWAP_ENGINE=simple`).
"""

from __future__ import annotations

import logging

from service.engine import EngineOutput
from service.engine.sampling import make_generator
from service.engine.worker import STOP, Job, WorkerEngine
from service.errors import StepFailed

log = logging.getLogger(__name__)


class SimpleEngine(WorkerEngine):
    capacity = 1

    def _loop(self) -> None:
        while True:
            self._recover()
            self._current = None
            job = self._take(block=True)
            if job is STOP:
                return
            if job is None:  # woken: nothing to run
                continue
            assert isinstance(job, Job)
            self._current = job
            if job.cancelled.is_set():
                self._change(waiting_remove=job.label)
                continue
            ready = self._adapter_ready(job, busy=set())  # nothing runs: no slot is busy
            while ready is False and not job.cancelled.is_set():  # its weights are being read
                self._wait_for_adapters()
                ready = self._adapter_ready(job, busy=set())
            if not ready:
                if ready is False:
                    self._change(waiting_remove=job.label)
                continue
            self._change(waiting_remove=job.label, running_add=job.label)
            try:
                self._run(job)
            except Exception as exc:  # a failed step fails its request, never the engine
                self._step_failed("generation", exc, 1)
                job.push(StepFailed(f"generation failed: {type(exc).__name__}: {exc}"))
            else:
                self._step_succeeded()
            finally:
                self._change(running_remove=job.label)

    def _abandon(self, error: Exception) -> None:
        job, self._current = getattr(self, "_current", None), None
        if job is not None:
            job.push(error)
            self._forget(job)

    def _run(self, job: Job) -> None:
        params = job.request.params
        logits, cache, scored, budget = self._prefill(job)
        if budget == 0:
            return
        generator = make_generator(params.seed, self.runner.device)
        stop_ids = params.stop_ids(self.eos_token_ids)
        matcher = params.grammar.matcher() if params.grammar is not None else None
        for step in range(budget):
            if job.cancelled.is_set():
                return
            token, logprobs, complete = self._choose(params, logits, generator, matcher, remaining=budget - step)
            stop = token in stop_ids or complete
            finish = "stop" if stop else ("length" if step == budget - 1 else None)
            job.push(
                EngineOutput(
                    (token,),
                    logprobs=logprobs,
                    prompt_logprobs=scored if step == 0 else None,
                    finish_reason=finish,
                )
            )
            if finish is not None:
                return
            self._on_step(1)
            logits = self.runner.decode(token, cache, job.slot)
