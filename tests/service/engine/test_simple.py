"""The simple engine on a tiny real Llama with real LoRA adapters (tier 3)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from service.engine import EngineRequest, SamplingParams
from service.errors import QueueFull
from service.metrics import Metrics
from service.runtime import load_runtime
from service.serving.errors import http_error
from tests.factories import preload_adapters, tiny_settings

PROMPT = (5, 17, 42, 99, 7, 3)


@pytest.fixture(scope="module")
def runtime(tiny, cache_dir):
    settings = tiny_settings(tiny, cache_dir, max_queued_requests=2)
    return preload_adapters(load_runtime(settings, Metrics()))


async def collect(engine, adapter, params, prompt=PROMPT):
    request = EngineRequest("r", tuple(prompt), adapter, params)
    return [out async for out in engine.generate(request)]


def run(coro_fn, runtime):
    async def main():
        await runtime.engine.start()
        try:
            return await coro_fn(runtime.engine)
        finally:
            await runtime.engine.stop()  # the module-scoped engine restarts in each test

    return asyncio.run(main())


def tokens(outputs):
    return [t for out in outputs for t in out.token_ids]


def hf_greedy(model, adapter, prompt, n):
    """Reference: transformers' own generate with the adapter set the classic way."""
    model.set_adapter(adapter) if adapter else None
    ctx = model.disable_adapter() if adapter is None else torch.no_grad()
    with ctx, torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("adapter", [None, "alpha", "beta"])
def test_greedy_matches_transformers_generate(runtime, adapter):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    got = run(lambda e: collect(e, adapter, params), runtime)
    assert tokens(got) == hf_greedy(runtime.engine.runner.model, adapter, list(PROMPT), 12)[: len(tokens(got))]
    assert got[-1].finish_reason in ("length", "stop")


def test_adapters_change_outputs_and_are_deterministic(runtime):
    params = SamplingParams(max_tokens=10, temperature=0.0)

    async def body(engine):
        return {a: tokens(await collect(engine, a, params)) for a in (None, "alpha", "beta", "alpha")}

    results = run(body, runtime)
    assert results[None] != results["alpha"] != results["beta"]
    again = run(lambda e: collect(e, "alpha", params), runtime)
    assert tokens(again) == results["alpha"]


def test_seed_makes_sampling_reproducible(runtime):
    async def body(engine):
        outs = []
        for seed in (11, 11, 12):
            params = SamplingParams(max_tokens=16, temperature=1.0, seed=seed, stop_token_ids=frozenset())
            outs.append(tokens(await collect(engine, "beta", params)))
        return outs

    a, b, c = run(body, runtime)
    assert a == b
    assert a != c


def test_prompt_logprobs_match_a_manual_forward(runtime):
    params = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=2)
    outs = run(lambda e: collect(e, "alpha", params), runtime)
    assert len(outs) == 1 and outs[0].token_ids == () and outs[0].finish_reason == "length"
    scored = outs[0].prompt_logprobs
    assert scored[0] is None and len(scored) == len(PROMPT)
    model = runtime.engine.runner.model
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT]), adapter_names=["alpha"]).logits[0]
    expected = torch.log_softmax(logits.float(), -1)
    for i, entry in enumerate(scored[1:], start=1):
        assert entry.token_id == PROMPT[i]
        assert entry.logprob == pytest.approx(float(expected[i - 1, PROMPT[i]]), abs=1e-4)
        assert len(entry.top) == 2 and entry.top[0][1] >= entry.top[1][1]


def test_closing_the_stream_cancels_and_the_engine_keeps_serving(runtime):
    async def body(engine):
        long = SamplingParams(max_tokens=200, temperature=1.0, seed=1)
        stream = engine.generate(EngineRequest("long", PROMPT, None, long))
        first = await anext(stream)
        await stream.aclose()
        short = await collect(engine, "alpha", SamplingParams(max_tokens=3, temperature=0.0))
        return first, short

    first, short = run(body, runtime)
    assert len(first.token_ids) == 1
    assert len(tokens(short)) == 3


def test_full_queue_is_refused_with_429(runtime):
    async def body(engine):
        params = SamplingParams(max_tokens=50, temperature=1.0)
        streams = [engine.generate(EngineRequest(f"r{i}", PROMPT, None, params)) for i in range(4)]
        started = [asyncio.ensure_future(anext(s)) for s in streams[:3]]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await anext(streams[3])
        for task in started:
            task.cancel()
        await asyncio.gather(*started, return_exceptions=True)
        for s in streams:
            await s.aclose()
        return info.value

    err = run(body, runtime)
    assert http_error(err).status == 429


def test_context_limit_ends_generation_with_length(runtime):
    params = SamplingParams(max_tokens=10_000, temperature=0.0)
    prompt = list(range(5, 5 + 250))
    outs = run(lambda e: collect(e, None, params, prompt), runtime)
    assert len(tokens(outs)) <= 256 - 250
    assert outs[-1].finish_reason in ("length", "stop")


def test_engine_reports_running_and_waiting_adapters(runtime):
    from service.engine.config import EngineConfig
    from service.engine.simple import SimpleEngine

    states = []

    def on_stats(stats):
        if stats.running is not None:
            states.append((list(stats.running), list(stats.waiting), stats.capacity))

    engine = SimpleEngine(runtime.engine.runner, EngineConfig(max_context=256), on_stats=on_stats)

    async def body(e):
        params = SamplingParams(max_tokens=3, temperature=0.0)
        await asyncio.gather(collect(e, "alpha", params), collect(e, "beta", params))

    run(body, type("R", (), {"engine": engine})())
    assert ([], ["alpha"], 1) in states or ([], ["beta"], 1) in states
    assert any(running == ["alpha"] for running, _, _ in states)
    assert any(running == ["beta"] for running, _, _ in states)
    assert states[-1] == ([], [], 1)

    metrics = Metrics()
    metrics.max_lora = 2
    metrics.observe_engine(["alpha"], ["beta", "base"], 1)
    text = metrics.render().decode()
    assert 'hotswap_lora_requests_info{max_lora="2",running_lora_adapters="alpha",waiting_lora_adapters="beta"}' in text
    assert "hotswap_queue_depth 2.0" in text and "hotswap_batch_utilization_ratio 1.0" in text
