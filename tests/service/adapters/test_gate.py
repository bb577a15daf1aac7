"""The load gate's rules on scripted scores (service.adapters.gate); the real engine's side is
in tests/test_release.py and tests/service/serving/test_releases.py."""

from __future__ import annotations

import asyncio

from service.adapters.gate import MIN_CHANGE, SAME_QUANTIZATION, Tolerance, check
from service.adapters.manifest import GoldenPrompt
from service.engine import TokenLogprob
from service.names import AdapterKey

KEY = AdapterKey("alpha", "0123456789abcdef")
PROMPT, OUTPUT = [1, 2, 3], [4, 5, 6, 7]


def scorer(adapter_lp: list[float], base_lp: float = -2.0, top: int | None = None):
    """Scores: the base gives `base_lp` everywhere; the adapter gives `adapter_lp` on the output
    positions (and the base's on the prompt). `top`: the most likely token, if not the scored one."""
    seen = []

    async def score(key, ids):
        seen.append(key)
        out: list[TokenLogprob | None] = [None]
        for i, token in enumerate(ids[1:], start=1):
            lp = base_lp if key is None or i < len(PROMPT) else adapter_lp[i - len(PROMPT)]
            best = (top if top is not None else token, max(lp, -0.01) if top is not None else lp)
            out.append(TokenLogprob(token, lp, (best,)))
        return out

    return score, seen


def golden(logprobs=(-0.5, -0.6, -0.7, -0.8)) -> GoldenPrompt:
    return GoldenPrompt(prompt="p", output="o", prompt_ids=PROMPT, output_ids=OUTPUT, logprobs=list(logprobs))


def run(*args, **kwargs):
    return asyncio.run(check(*args, **kwargs))


def test_golden_prompts_that_reproduce_pass_and_report_their_figures():
    score, seen = scorer([-0.52, -0.58, -0.71, -0.79])
    verdict = run(KEY, [golden()], score, probe_ids=[9, 9])
    assert verdict.passed and verdict.figures["mean_logprob_diff"] == 0.015 and verdict.figures["top1_agreement"] == 1
    assert seen == [KEY, None]  # the version, then the base, on the same tokens


def test_an_adapter_that_changes_nothing_is_refused_first():
    score, _ = scorer([-2.0] * 4)
    verdict = run(KEY, [golden()], score, probe_ids=[9, 9])
    assert not verdict.passed and "does not change the base" in verdict.reason
    score, _ = scorer([-2.0 + MIN_CHANGE * 2] * 4)  # a small but real change passes this check
    assert "does not change" not in run(KEY, [golden()], score, probe_ids=[9]).reason


def test_drifted_log_probabilities_are_refused_naming_the_tolerance():
    score, _ = scorer([-0.9, -1.0, -1.1, -1.2])  # 0.4 nats off each
    verdict = run(KEY, [golden()], score, probe_ids=[9])
    assert not verdict.passed and "0.400 nats (tolerance 0.1)" in verdict.reason
    assert run(KEY, [golden()], score, probe_ids=[9], tolerance=Tolerance(0.5, 0.9)).passed


def test_recorded_tokens_that_are_no_longer_the_most_likely_are_refused():
    score, _ = scorer([-0.5, -0.6, -0.7, -0.8], top=99)  # same scores, another token on top
    verdict = run(KEY, [golden()], score, probe_ids=[9], tolerance=SAME_QUANTIZATION)
    assert not verdict.passed and "most likely at 0% of 4 positions" in verdict.reason


def test_without_golden_prompts_the_probe_shows_whether_the_adapter_changes_anything():
    calls = []

    async def score(key, ids):
        calls.append(list(ids))
        return [None] + [TokenLogprob(t, -1.0 if key is None else -1.5) for t in ids[1:]]

    verdict = asyncio.run(check(KEY, [], score, probe_ids=[7, 8, 9]))
    assert verdict.passed and verdict.reason == "no golden prompts to reproduce" and calls == [[7, 8, 9]] * 2


def test_the_base_scores_only_the_shortest_golden_sequence():
    """The base's scores serve only the 'changes the model' check: one sequence is enough."""
    calls = []
    score, _ = scorer([-0.5, -0.6, -0.7, -0.8, -1.0, -1.0])

    async def counted(key, ids):
        calls.append((key, len(ids)))
        return await score(key, ids)

    long = GoldenPrompt(
        prompt="q", output="o", prompt_ids=PROMPT, output_ids=OUTPUT + [8, 9], logprobs=[-0.5, -0.6, -0.7, -0.8, -1, -1]
    )
    verdict = run(KEY, [long, golden()], counted, probe_ids=[9])
    assert sorted(calls, key=str) == sorted([(KEY, 9), (KEY, 7), (None, 7)], key=str)
    assert verdict.figures["max_change"] == 1.5  # -0.5 against the base's -2.0
