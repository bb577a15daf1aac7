"""The batched engine against single-request references, on a tiny real Llama with LoRA adapters."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from service.engine import EngineRequest, SamplingParams
from service.engine.simple import SimpleEngine
from service.metrics import Metrics
from service.runtime import load_runtime
from tests.factories import make_engine as make
from tests.factories import preload_adapters, tiny_settings
from tests.factories import run_engine as run
from tests.support import failing

PROMPTS = [
    (5, 17, 42, 99, 7, 3),
    (8, 9),
    (100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110),
    (33,),
    (250, 251, 252, 12, 13),
    (60, 61, 62),
]
ADAPTERS = [None, "alpha", "beta", "alpha", None, "beta"]


@pytest.fixture(scope="module")
def runner(tiny, cache_dir):
    settings = tiny_settings(tiny, cache_dir)
    return preload_adapters(load_runtime(settings, Metrics())).engine.runner


@pytest.fixture(params=["dynamic", "static", "graphs"])
def kv(request):
    """The batched engine's KV caches: dynamic; static (slots, eager); and static with the CUDA
    graph path's bucketing, padding rows and static LoRA routing, replayed eagerly on CPU."""
    return request.param


async def collect(engine, prompt, adapter, params, rid="r"):
    outs = [o async for o in engine.generate(EngineRequest(rid, tuple(prompt), adapter, params))]
    return [t for o in outs for t in o.token_ids], outs


def reference(runner, prompt, adapter, n):
    model = runner.model
    ctx = model.disable_adapter() if adapter is None else torch.no_grad()
    if adapter:
        model.set_adapter(adapter)
    with ctx, torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_mixed_batch_is_token_identical_to_single_requests(runner, kv):
    lengths = [12, 5, 20, 9, 16, 3]  # sequences leave at different steps: the batch compacts

    async def body(engine):
        tasks = []
        for i, (prompt, adapter, n) in enumerate(zip(PROMPTS, ADAPTERS, lengths, strict=True)):
            tasks.append(
                asyncio.create_task(
                    collect(engine, prompt, adapter, SamplingParams(max_tokens=n, temperature=0.0), f"r{i}")
                )
            )
            await asyncio.sleep(0.01 * i)  # later requests join a batch already running
        return await asyncio.gather(*tasks)

    results = run(make(runner, kv=kv, max_batch_size=4), body)
    for (tokens, outs), prompt, adapter, n in zip(results, PROMPTS, ADAPTERS, lengths, strict=True):
        assert tokens == reference(runner, list(prompt), adapter, n), (prompt, adapter)
        assert outs[-1].finish_reason == "length" and len(tokens) == n


def test_batched_matches_simple_engine_for_sampling_with_seeds(runner, kv):
    params = [
        SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=100 + i, logprobs=2)
        for i in range(len(PROMPTS))
    ]

    async def all_at_once(engine):
        return await asyncio.gather(
            *(
                collect(engine, p, a, s, f"r{i}")
                for i, (p, a, s) in enumerate(zip(PROMPTS, ADAPTERS, params, strict=True))
            )
        )

    batched = run(make(runner, kv=kv, max_batch_size=8), all_at_once)
    simple = run(make(runner, SimpleEngine), all_at_once)
    for (b_tokens, b_outs), (s_tokens, s_outs) in zip(batched, simple, strict=True):
        assert b_tokens == s_tokens
        for b, s in zip(b_outs, s_outs, strict=True):
            assert b.logprobs[0].logprob == pytest.approx(s.logprobs[0].logprob, abs=1e-4)


def test_cancelled_request_leaves_the_batch_and_others_continue(runner, kv):
    async def body(engine):
        long = engine.generate(
            EngineRequest("long", PROMPTS[0], "alpha", SamplingParams(max_tokens=200, temperature=1.0))
        )
        await anext(long)
        other = asyncio.create_task(collect(engine, PROMPTS[1], "beta", SamplingParams(max_tokens=30, temperature=0.0)))
        while engine.running < 2:  # both in one batch
            await asyncio.sleep(0.001)
        await long.aclose()
        tokens, _ = await other
        while engine.running:  # the cancelled row leaves at the next step (a hang fails run's timeout)
            await asyncio.sleep(0.001)
        return tokens, engine.running

    tokens, rows_left = run(make(runner, kv=kv), body)
    assert tokens == reference(runner, list(PROMPTS[1]), "beta", 30)
    assert rows_left == 0  # the cancelled row left at the next step, long before its 200 tokens


def test_queue_admission_is_fifo_beyond_capacity(runner, kv):
    order = []

    async def body(engine):
        async def one(i):
            tokens, _ = await collect(
                engine, PROMPTS[i % 6], None, SamplingParams(max_tokens=4, temperature=0.0), f"r{i}"
            )
            order.append(i)

        await asyncio.gather(*(one(i) for i in range(6)))

    run(make(runner, kv=kv, max_batch_size=2), body)
    assert order[:2] == sorted(order[:2]) and set(order) == set(range(6))
    assert order.index(0) < order.index(4) and order.index(1) < order.index(5)


def test_prompt_logprobs_and_zero_max_tokens(runner, kv):
    async def body(engine):
        return await collect(engine, PROMPTS[2], "beta", SamplingParams(max_tokens=0, prompt_logprobs=1))

    tokens, outs = run(make(runner, kv=kv), body)
    assert tokens == [] and outs[0].finish_reason == "length"
    assert outs[0].prompt_logprobs[0] is None and len(outs[0].prompt_logprobs) == len(PROMPTS[2])


def test_a_failing_step_fails_its_batch_and_the_engine_serves_on(runner, monkeypatch, kv):
    from service.errors import StepFailed

    engine = make(runner, kv=kv)
    # A device fault fails every forward pass: prefills, decode steps (forward_slots on the
    # static cache) and the engine's own probe (one token through the base).
    failures = {"left": 1}
    for step in ("_forward", "forward_slots"):
        monkeypatch.setattr(runner, step, failing(getattr(runner, step), failures, "simulated device fault"))
    # The first three requests must share the failing step: the engine takes none of them until
    # all three are queued (else, on a busy machine, the first could step alone and fail alone).
    take, gathered = engine._take, {"done": False}

    def take_together(block):
        deadline = time.monotonic() + 30
        while not gathered["done"] and len(engine._queued_labels) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        gathered["done"] = True
        return take(block)

    monkeypatch.setattr(engine, "_take", take_together)

    async def body(engine):
        async def one(prompt):
            request = EngineRequest("r", prompt, None, SamplingParams(max_tokens=4, temperature=0.0))
            return [o async for o in engine.generate(request)]

        first = await asyncio.gather(*(one(p) for p in PROMPTS[:3]), return_exceptions=True)
        assert all(isinstance(r, StepFailed) for r in first)  # the whole batch failed, cleanly
        assert engine.healthy
        after = await one(PROMPTS[0])  # and the next request is served
        assert after[-1].finish_reason == "length" and sum(len(o.token_ids) for o in after) == 4
        failures["left"] = 10**6  # now it never recovers
        for _ in range(engine.max_consecutive_failures):
            with pytest.raises(StepFailed):
                await one(PROMPTS[1])
        assert not engine.healthy  # /health and /ready turn 503; new requests are refused
        from service.errors import EngineStopped

        with pytest.raises(EngineStopped):
            await one(PROMPTS[2])
        failures["left"] = 0  # the device is back: the engine's own probe finds it
        while not engine.healthy:
            await asyncio.sleep(0.01)
        after = await one(PROMPTS[0])
        assert sum(len(o.token_ids) for o in after) == 4

    engine.probe_seconds = 0.05
    run(engine, body)


def test_admission_is_per_http_request_and_admitted_sequences_are_never_refused(runner):
    from service.errors import QueueFull

    engine = make(runner, max_queued=1)

    async def body(engine):
        with pytest.raises(QueueFull):
            engine.admit(2)  # two choices do not fit a queue of one: 429 before anything starts
        engine.admit(1)
        requests = [
            EngineRequest(f"r{i}", p, None, SamplingParams(max_tokens=3, temperature=0.0), admitted=True)
            for i, p in enumerate(PROMPTS[:4])
        ]

        async def collect(request):
            return [o async for o in engine.generate(request)]

        outs = await asyncio.gather(*(collect(r) for r in requests))  # beyond the bound: all run
        assert all(out[-1].finish_reason == "length" for out in outs)

    run(engine, body)


@pytest.mark.parametrize("packed", [True, False])
def test_the_engine_reports_its_prefill_and_decode_time(runner, packed):
    phases = []
    engine = make(runner, packed_steps=packed, on_stats=lambda stats: phases.extend(stats.phases))
    params = SamplingParams(max_tokens=5, temperature=0.0)

    async def body(engine):
        jobs = [collect(engine, PROMPTS[i], ADAPTERS[i], params, f"r{i}") for i in range(3)]
        return await asyncio.gather(*jobs)

    run(engine, body)
    decode = [s for p, s in phases if p == "decode"]
    # each prompt was prefilled: in passes of their own, or in (packed) decode steps
    prefill = [s for p, s in phases if p == ("packed" if packed else "prefill")]
    # every token after each prompt's first comes from a decode step
    assert 4 <= len(decode) <= 3 * 4 and 1 <= len(prefill) <= 3
    assert all(s > 0 for s in decode + prefill)
    assert {p for p, _ in phases} == {"packed" if packed else "prefill", "decode"}


def test_a_prefilled_batch_that_cannot_join_the_cache_fails_its_requests_not_the_engine(runner, kv):
    from service.errors import StepFailed

    engine = make(runner, kv=kv)
    engine.kv_cache.join = failing(engine.kv_cache.join, {"left": 1}, "simulated: the rows do not fit the cache")

    async def body(engine):
        async def one(prompt):
            request = EngineRequest("r", prompt, None, SamplingParams(max_tokens=4, temperature=0.0))
            return [o async for o in engine.generate(request)]

        first = await asyncio.gather(*(one(p) for p in PROMPTS[:3]), return_exceptions=True)
        assert any(isinstance(r, StepFailed) for r in first)  # the rows that were joining
        assert engine.healthy
        after = await one(PROMPTS[0])  # the engine serves on
        assert after[-1].finish_reason == "length" and sum(len(o.token_ids) for o in after) == 4

    run(engine, body)
