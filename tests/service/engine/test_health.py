"""No request can make the engine unhealthy (security review H3): a failure that one request
causes fails that request only, a probe tells the engine's own faults from the requests', no
exception ends the engine thread, and prompt log-probabilities are scored in chunks."""

from __future__ import annotations

import asyncio

import pytest
import torch

from service.engine import EngineRequest, SamplingParams
from service.engine import runner as runner_module
from service.errors import StepFailed
from service.metrics import Metrics
from service.runtime import load_runtime
from tests.factories import make_engine, preload_adapters, run_engine, tiny_settings

PROMPT = (5, 17, 42, 99, 7, 3, 8, 9, 100, 101, 102, 103)


@pytest.fixture(scope="module")
def runner(tiny, cache_dir):
    return preload_adapters(load_runtime(tiny_settings(tiny, cache_dir), Metrics())).engine.runner


async def ask(engine, params, prompt=PROMPT, adapter=None):
    return [o async for o in engine.generate(EngineRequest("r", prompt, adapter, params))]


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_requests_that_run_out_of_memory_fail_alone_and_the_engine_stays_healthy(runner, kv, monkeypatch):
    """Echo + logprobs of long prompts once made three OOMs in a row, and the engine refused
    every request after them, for good."""
    engine = make_engine(runner, kv=kv)
    real = runner.score_prompt

    def oom(prompt_ids, adapter, top_k):
        if len(prompt_ids) > 8:
            raise torch.OutOfMemoryError("simulated: this prompt's logits do not fit")
        return real(prompt_ids, adapter, top_k)

    monkeypatch.setattr(runner, "score_prompt", oom)
    echo = SamplingParams(max_tokens=0, prompt_logprobs=1)

    async def body(engine):
        for _ in range(engine.max_consecutive_failures + 2):
            with pytest.raises(StepFailed):
                await ask(engine, echo)
        assert engine.healthy
        short = await ask(engine, echo, PROMPT[:5])
        assert len(short[0].prompt_logprobs) == 5
        return await ask(engine, SamplingParams(max_tokens=3, temperature=0.0))

    assert sum(len(o.token_ids) for o in run_engine(engine, body)) == 3


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_a_row_whose_sampling_fails_fails_alone(runner, kv, monkeypatch):
    engine = make_engine(runner, kv=kv)
    choose = engine._choose

    def bad_row(params, *args, **kwargs):
        if params.seed == 666:
            raise ValueError("simulated: this row's grammar broke")
        return choose(params, *args, **kwargs)

    monkeypatch.setattr(engine, "_choose", bad_row)

    async def body(engine):
        params = SamplingParams(max_tokens=6, temperature=0.0)
        rows = [ask(engine, params, PROMPT[i:]) for i in range(3)]
        rows.append(ask(engine, SamplingParams(max_tokens=6, temperature=1.0, seed=666)))
        return await asyncio.gather(*rows, return_exceptions=True), engine.healthy

    results, healthy = run_engine(engine, body)
    assert isinstance(results[-1], StepFailed)
    assert [sum(len(o.token_ids) for o in r) for r in results[:-1]] == [6, 6, 6]  # its batch served on
    assert healthy


@pytest.mark.parametrize("where", ["_admit", "_prefill"])  # each runs every iteration
def test_a_fault_outside_any_step_fails_its_requests_not_the_thread(runner, where, monkeypatch):
    engine = make_engine(runner, kv="dynamic")
    real = getattr(engine, where)
    faults = {"left": 1}

    def once(*args, **kwargs):
        if faults["left"]:
            faults["left"] -= 1
            raise RuntimeError("simulated scheduler bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, where, once)
    params = SamplingParams(max_tokens=4, temperature=0.0)

    async def body(engine):
        first = await asyncio.gather(ask(engine, params), ask(engine, params, PROMPT[3:]), return_exceptions=True)
        assert all(isinstance(r, StepFailed) for r in first)  # answered, not left hanging
        return await ask(engine, params), engine.healthy

    after, healthy = run_engine(engine, body, timeout=60)
    assert sum(len(o.token_ids) for o in after) == 4 and healthy


@pytest.mark.parametrize("plain", [True, False])
def test_prompt_logprobs_in_chunks_equal_the_whole_logits(runner, plain, monkeypatch):
    """score_prompt projects the decoder's states a chunk at a time (or, for a head that is not
    a plain projection, asks the model for each chunk's positions): the same log-probabilities
    as log_softmax over every position's logits at once."""
    monkeypatch.setattr(runner_module, "SCORE_CHUNK", 5)
    if not plain:
        monkeypatch.setattr(runner_module, "_decoder", lambda model: None)
    prompt = list(PROMPT) * 2
    last, _, scored = runner.score_prompt(prompt, "alpha", 3)
    with torch.no_grad():
        runner.model.set_adapter("alpha")
        logits = runner.model(input_ids=torch.tensor([prompt])).logits[0].float()
    whole = torch.log_softmax(logits, -1)
    assert scored[0] is None and len(scored) == len(prompt)
    for i, item in enumerate(scored[1:]):
        assert item.token_id == prompt[i + 1]
        assert item.logprob == pytest.approx(float(whole[i, prompt[i + 1]]), abs=1e-4)
        assert [t for t, _ in item.top] == torch.topk(whole[i], 3).indices.tolist()
    assert torch.allclose(last, logits[-1], atol=1e-4)
