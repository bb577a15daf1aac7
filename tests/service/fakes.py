"""An honest fake engine: plays a scripted text token by token, like a real engine would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from service.engine import EngineOutput, EngineRequest, TokenLogprob
from service.errors import QueueFull, StepFailed


class ScriptedEngine:
    """Generates `script` (as token ids) for every request, honouring max_tokens and cancellation.

    `requests` records what serving submitted; `closed` the ids whose stream was closed early.
    """

    def __init__(self, tokenizer, script: str = " Paris is the capital.", *, overloaded=False, delay=0.0):
        self.tokenizer = tokenizer
        self.script_ids = tokenizer(script, add_special_tokens=False).input_ids
        self.overloaded = overloaded
        self.delay = delay
        self.requests: list[EngineRequest] = []
        self.gated: list[EngineRequest] = []  # the load gate's scoring requests
        self.closed: list[str] = []
        self.running = False
        self.failing_versions: set[str] = set()  # adapter versions whose every request fails

    @property
    def healthy(self) -> bool:
        return self.running

    async def start(self, executor=None) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False

    def admit(self, sequences: int, tenant: str | None = None) -> None:
        if self.overloaded:
            raise QueueFull("queue full")

    def adapter_state(self, key: str) -> str:
        return "registered"  # no slots: adapters are what the script says they are

    def pinned_adapters(self) -> set[str]:
        return set()

    def pin_adapter(self, name: str, pinned: bool) -> None:
        if pinned:
            raise ValueError("this engine has no adapter slots to pin to")

    def reload_adapters(self, names: list[str]) -> None:
        pass

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if not request.admitted:
            self.admit(1)
        # The load gate's scoring requests (service.adapters.gate) are kept apart from the
        # requests the tests inspect; an adapter moves every log-probability, as a trained one does.
        (self.gated if request.request_id.startswith("gate-") else self.requests).append(request)
        if request.adapter_version in self.failing_versions:
            raise StepFailed(f"version {request.adapter_version} failed")
        p = request.params
        prompt_lps = None
        if p.prompt_logprobs is not None:
            lp = -1.0 if request.adapter is None else -1.25
            prompt_lps = (
                None,
                *(TokenLogprob(t, lp, ((t, lp),) * p.prompt_logprobs) for t in request.prompt_ids[1:]),
            )
        budget = min(p.max_tokens, len(self.script_ids))
        finished = False
        try:
            if budget == 0:
                finished = True
                yield EngineOutput((), prompt_logprobs=prompt_lps, finish_reason="length")
                return
            for step, token in enumerate(self.script_ids[:budget]):
                await asyncio.sleep(self.delay)
                last = step == budget - 1
                finish = None
                if last:
                    finish = "length" if budget < len(self.script_ids) else "stop"
                lps = (
                    (TokenLogprob(token, -0.5, ((token, -0.5),) * (p.logprobs or 0)),)
                    if p.logprobs is not None
                    else None
                )
                finished = last
                yield EngineOutput(
                    (token,), logprobs=lps, prompt_logprobs=prompt_lps if step == 0 else None, finish_reason=finish
                )
        finally:
            if not finished:
                self.closed.append(request.request_id)
