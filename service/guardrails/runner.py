"""Running a chain: the pre hooks over a request, the post hooks over one choice's output.

Outcomes (issue #5): a blocked request is a 400 with `code: "content_policy_violation"`; a
blocked output ends its choice with `finish_reason: "content_filter"`; a hook that raises fails
the request with a 500 and nothing it had not checked leaves the server. Every action is
recorded for the response's `guardrails` field and counted in
`hotswap_guardrail_actions_total{stage,hook,action}`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from service.errors import ContentPolicyError, GuardrailError
from service.guardrails.base import (
    ActionRecord,
    Blocked,
    GuardedOutput,
    GuardedRequest,
    RetryRequested,
    StreamFilter,
    Verdict,
)
from service.guardrails.config import Chain
from service.metrics import Metrics

log = logging.getLogger(__name__)


def _record(metrics: Metrics, stage: str, hook: str, verdict: Verdict, index: int | None = None) -> ActionRecord:
    metrics.guardrail_actions.labels(stage, hook, verdict.action).inc()
    return ActionRecord(stage, hook, verdict.action, verdict.reason, dict(verdict.details), index)


def run_pre(
    chain: Chain, request: GuardedRequest, metrics: Metrics, *, param: str
) -> tuple[GuardedRequest, list[ActionRecord]]:
    """Every pre hook in order; returns the (possibly modified) request and what was done."""
    actions: list[ActionRecord] = []
    for hook in chain.pre:
        try:
            verdict = hook.pre(request)
        except Exception as exc:
            log.exception("guardrail %s failed", hook.name)
            metrics.guardrail_actions.labels("pre", hook.name, "error").inc()
            raise GuardrailError(f"guardrail {hook.name!r} failed: {type(exc).__name__}") from exc
        if verdict.action == "allow":
            continue
        actions.append(_record(metrics, "pre", hook.name, verdict))
        if verdict.action == "block":
            raise ContentPolicyError(f"blocked by guardrail {hook.name!r}: {verdict.reason}", param=param)
        if verdict.modifies and verdict.request is not None:
            request = verdict.request
    return request, actions


@dataclass
class OutputGuard:
    """One choice's post chain over a stream of text deltas (or one whole text)."""

    chain: Chain
    output: GuardedOutput
    metrics: Metrics
    index: int
    actions: list[ActionRecord] = field(default_factory=list)
    filters: list[StreamFilter] = field(init=False)
    blocked: Blocked | None = None

    def __post_init__(self) -> None:
        self.filters = [self._call(hook.name, hook.stream, self.output) for hook in self.chain.post]

    @property
    def changed(self) -> bool:
        return bool(self.actions) or self.blocked is not None

    def _call(self, hook: str, fn, *args):
        try:
            return fn(*args)
        except (Blocked, RetryRequested):
            raise
        except Exception as exc:
            log.exception("guardrail %s failed", hook)
            self.metrics.guardrail_actions.labels("post", hook, "error").inc()
            raise GuardrailError(f"guardrail {hook!r} failed: {type(exc).__name__}") from exc

    def _collect(self) -> None:
        for f in self.filters:
            for verdict in f.actions:
                self.actions.append(_record(self.metrics, "post", f.hook.name, verdict, self.index))
            f.actions.clear()

    def feed(self, delta: str) -> str:
        """Text that may leave now; raises Blocked / RetryRequested / GuardrailError."""
        return self._run(delta, final=False)

    def finish(self, lookahead: str = "") -> str:
        """The rest; `lookahead`: what the model wrote past the end (a stop string), which the
        filters may look at but never release."""
        return self._run("", final=True, lookahead=lookahead)

    def _run(self, text: str, *, final: bool, lookahead: str = "") -> str:
        try:
            for f in self.filters:
                if final:
                    text = self._call(f.hook.name, f.close, text, lookahead)
                elif text:
                    text = self._call(f.hook.name, f.feed, text)
            return text
        except Blocked as exc:
            self.blocked = exc
            self.actions.append(_record(self.metrics, "post", exc.hook, Verdict("block", exc.reason), self.index))
            raise
        except RetryRequested as exc:
            self.actions.append(_record(self.metrics, "post", exc.hook, Verdict("retry", exc.reason), self.index))
            raise
        finally:
            self._collect()
