"""The gate a version passes before it takes traffic (on load, rescan and start).

The registry has already checked the package (manifest, safetensors, LoRA, the base's
fingerprint, size). The gate runs the version on the engine, on the served base and
quantization, through the same path requests take:

1. **It changes the model.** The version and the base score the same tokens (its shortest
   golden prompt and output, or a fixed probe when it has none); when no log-probability moves by
   `MIN_CHANGE` nats, the adapter is refused: an all-zero `lora_B` (PEFT's initialisation, a
   run that never trained) serves the base under another name.
2. **Its golden prompts reproduce.** The outputs the trained adapter gave at publish time
   (`hotswap.json`'s `evaluation.golden`, greedy, with each token's log-probability) are scored
   teacher-forced: the mean absolute difference of the log-probabilities must stay within
   `Tolerance.mean_logprob`, and the recorded token must still be the most likely one at
   `Tolerance.top1` of the positions. Weights that are not the ones evaluated, a package for
   another quantization than it says, a broken kernel: all fail here.

The tolerance is wider when the golden outputs were made on another quantization of the base
than the one served (`CROSS_QUANTIZATION`): the weights then differ by the quantization error.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from service.adapters.manifest import GoldenPrompt
from service.engine import EngineRequest, SamplingParams, TokenLogprob
from service.names import AdapterKey

MIN_CHANGE = 1e-3  # nats: the largest log-probability change below which an adapter changes nothing
PROBE = "The quick brown fox jumps over the lazy dog. Write a short answer to the question below."


@dataclass(frozen=True)
class Tolerance:
    mean_logprob: float  # nats: the mean |served - recorded| over every golden token
    top1: float  # share of golden tokens that must still be the served model's most likely


# The same quantization: only kernels, batching and the compute dtype differ (measured on this
# project's adapters: docs/adapters.md, "The gate").
SAME_QUANTIZATION = Tolerance(mean_logprob=0.1, top1=0.9)
CROSS_QUANTIZATION = Tolerance(mean_logprob=0.35, top1=0.75)


@dataclass
class Verdict:
    passed: bool
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


Scorer = Callable[[AdapterKey | None, list[int]], Awaitable[list[TokenLogprob | None]]]


def engine_scorer(engine: Any) -> Scorer:
    """Scores token ids through `engine` (prompt log-probabilities, one token generated): the
    version by its key, or the base with None."""

    async def score(key: AdapterKey | None, ids: list[int]) -> list[TokenLogprob | None]:
        request = EngineRequest(
            request_id=f"gate-{uuid.uuid4().hex[:12]}",
            prompt_ids=tuple(ids),
            adapter=None if key is None else key.name,
            adapter_version=None if key is None else key.version,
            params=SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1),
            admitted=True,
        )
        scored: tuple[TokenLogprob | None, ...] = ()
        async for output in engine.generate(request):
            scored = output.prompt_logprobs or scored
        return list(scored)

    return score


async def check(
    key: AdapterKey,
    golden: list[GoldenPrompt],
    score: Scorer,
    *,
    probe_ids: list[int],
    tolerance: Tolerance = SAME_QUANTIZATION,
) -> Verdict:
    """Run the gate's checks on one version (`key`) with its golden prompts (may be empty)."""
    sequences = [g.prompt_ids + g.output_ids for g in golden] or [probe_ids]
    # The base scores one sequence, the shortest: a LoRA with any non-zero B moves every
    # position's log-probabilities, so one sequence shows whether it changes the model, and the
    # base's half of the work goes (the shipped dolly's gate here: 15 s with the base on all
    # four, 8 s with it on one).
    compared = min(range(len(sequences)), key=lambda i: len(sequences[i]))
    # All at once: the engine batches them (the shipped dolly's gate took 14 s one by one).
    *served, base = await asyncio.gather(*(score(key, ids) for ids in sequences), score(None, sequences[compared]))
    pairs = zip(served[compared], base, strict=True)
    change = max((abs(a.logprob - b.logprob) for a, b in pairs if a and b), default=0.0)
    figures: dict[str, Any] = {"max_change": round(change, 6), "golden": len(golden)}
    if change < MIN_CHANGE:
        return Verdict(
            False,
            f"the adapter does not change the base's outputs (the largest log-probability change over "
            f"{len(sequences[compared])} tokens is {change:.2g} nats; is every lora_B zero?)",
            figures,
        )
    if not golden:
        return Verdict(True, "no golden prompts to reproduce", figures)
    diffs, agree, worst = [], 0, (0.0, "")
    for g, tokens in zip(golden, served, strict=True):
        outputs = tokens[len(g.prompt_ids) :]
        these = [abs(t.logprob - lp) for t, lp in zip(outputs, g.logprobs, strict=True) if t is not None]
        agree += sum(1 for t, token in zip(outputs, g.output_ids, strict=True) if t is not None and _top(t, token))
        diffs += these
        mean = sum(these) / max(len(these), 1)
        if mean >= worst[0]:
            worst = (mean, g.prompt)
    mean = sum(diffs) / max(len(diffs), 1)
    top1 = agree / max(len(diffs), 1)
    figures.update(mean_logprob_diff=round(mean, 4), top1_agreement=round(top1, 4), tokens=len(diffs))
    if mean > tolerance.mean_logprob or top1 < tolerance.top1:
        return Verdict(
            False,
            f"its golden prompts do not reproduce on this base: mean log-probability difference {mean:.3f} nats "
            f"(tolerance {tolerance.mean_logprob}), recorded token still most likely at {top1:.0%} of "
            f"{len(diffs)} positions (tolerance {tolerance.top1:.0%}); worst prompt {worst[1][:60]!r}",
            figures,
        )
    return Verdict(True, "golden prompts reproduce", figures)


def _top(scored: TokenLogprob, token: int) -> bool:
    """Whether `token` is the most likely at this position (ties count)."""
    if scored.token_id != token:
        return False
    return not scored.top or scored.top[0][0] == token or scored.logprob >= scored.top[0][1] - 1e-6
