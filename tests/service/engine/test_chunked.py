"""Chunked prefill: a prompt longer than the step's budget is prefilled a chunk per iteration
between decode steps, with the tokens a whole prefill gives (tiny real Llama, fp32)."""

from __future__ import annotations

import asyncio

import pytest

from service.engine import EngineRequest, SamplingParams
from tests.factories import batched_engine, make_residency
from tests.factories import run_engine as run

LONG = tuple((i * 7) % 300 + 3 for i in range(200))


def engine(residency, budget, kv="dynamic"):
    return batched_engine(residency, max_prefill_tokens=budget, kv_cache=kv)


def greedy(tokens):
    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_chunks_give_the_tokens_of_a_whole_prefill(tiny, cache_dir, tmp_path, kv):
    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    requests = [("alpha", LONG), (None, LONG[:37]), ("beta", LONG[5:150])]

    async def body(engine):
        async def one(adapter, prompt):
            request = EngineRequest("r", prompt, adapter, greedy(10))
            return [t async for o in engine.generate(request) for t in o.token_ids]

        return await asyncio.gather(*(one(a, p) for a, p in requests))

    assert run(engine(residency, 8, kv), body) == run(engine(residency, 4096, kv), body)


def test_running_streams_advance_while_a_long_prompt_is_chunked(tiny, cache_dir, tmp_path):
    residency = make_residency(tiny, cache_dir, tmp_path, 2)

    def interleaved(budget) -> int:
        """Tokens the running stream got between the long prompt's arrival and its first token."""

        async def body(engine):
            arrivals: list[str] = []
            started = asyncio.Event()

            async def running():
                request = EngineRequest("run", LONG[:10], "alpha", greedy(240))
                async for _ in engine.generate(request):
                    arrivals.append("run")
                    if len(arrivals) == 3:
                        started.set()

            async def joining():
                await started.wait()
                arrivals.append("join")
                request = EngineRequest("join", LONG, "beta", greedy(2))
                async for _ in engine.generate(request):
                    arrivals.append("first")
                    break

            await asyncio.gather(running(), joining())
            return arrivals[arrivals.index("join") : arrivals.index("first")].count("run")

        return run(engine(residency, budget), body)

    assert interleaved(8) >= 15  # 200 tokens in chunks of 8: a decode step after each chunk
    assert interleaved(4096) <= 3  # the whole prompt at once: the stream waits for it
