"""Chunked prefill: a prompt longer than the step's budget is prefilled a chunk per iteration
between decode steps, with the tokens a whole prefill gives (tiny real Llama, fp32)."""

from __future__ import annotations

import asyncio

import pytest

from service.engine import EngineRequest, SamplingParams
from tests.factories import batched_engine, make_residency
from tests.factories import run_engine as run
from tests.support import failing

LONG = tuple((i * 7) % 300 + 3 for i in range(200))


def engine(residency, budget, kv="dynamic", packed=True, phases=None):
    """`phases` (a list) records the engine's iteration phases (prefill, decode, packed)."""
    hook = (lambda stats: phases.extend(p for p, _ in stats.phases)) if phases is not None else None
    return batched_engine(residency, max_prefill_tokens=budget, kv_cache=kv, packed_steps=packed, on_stats=hook)


def greedy(tokens):
    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(("kv", "packed"), [("dynamic", False), ("dynamic", True), ("static", True)])
def test_chunks_give_the_tokens_of_a_whole_prefill(tiny, cache_dir, tmp_path, kv, packed):
    """Three prompts chunked at once, on three adapters (base included): in passes of their
    own, or packed into the decode steps of the rows that already run (packed.py)."""
    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    requests = [("alpha", LONG), (None, LONG[:37]), ("beta", LONG[5:150]), ("alpha", LONG[100:104])]
    phases = []

    async def body(engine):
        async def one(adapter, prompt):
            request = EngineRequest("r", prompt, adapter, greedy(10))
            return [t async for o in engine.generate(request) for t in o.token_ids]

        return await asyncio.gather(*(one(a, p) for a, p in requests))

    assert run(engine(residency, 8, kv, packed, phases), body) == run(engine(residency, 4096, kv), body)
    assert ("packed" in phases) == (packed and kv == "dynamic")


@pytest.mark.parametrize("packed", [False, True])
def test_running_streams_advance_while_a_long_prompt_is_chunked(tiny, cache_dir, tmp_path, packed):
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

        return run(engine(residency, budget, packed=packed), body)

    assert interleaved(8) >= 15  # 200 tokens in chunks of 8: a decode step after each chunk
    assert interleaved(4096) <= 3  # the whole prompt at once: the stream waits for it


def test_a_failed_packed_step_fails_its_rows_and_chunked_prompt_and_serves_on(tiny, cache_dir, tmp_path):
    from service.errors import StepFailed

    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    eng = engine(residency, 8, packed=True)
    failures = {"left": 0}
    eng.runner.step_packed = failing(eng.runner.step_packed, failures, "simulated device fault")

    async def body(engine):
        started = asyncio.Event()

        async def running():
            request = EngineRequest("run", LONG[:10], "alpha", greedy(200))
            async for _ in engine.generate(request):
                started.set()

        async def joining():
            await started.wait()
            failures["left"] = 1  # the next packed step: the one with the long prompt's chunk
            request = EngineRequest("join", LONG, "beta", greedy(2))
            return [o async for o in engine.generate(request)]

        outcome = await asyncio.gather(running(), joining(), return_exceptions=True)
        assert all(isinstance(r, StepFailed) for r in outcome), outcome
        again = [o async for o in engine.generate(EngineRequest("again", LONG, "beta", greedy(3)))]
        return sum(len(o.token_ids) for o in again), engine.healthy

    assert run(eng, body) == (3, True)


def test_a_chunked_prompt_starts_after_a_stored_prefix_and_stores_its_own(tiny, cache_dir, tmp_path):
    """Packed chunks after a stored prefix: the tokens of a whole prefill, and the KV the last
    chunk leaves is stored for the next prompt."""
    from service.engine.prefix import PrefixCache

    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    prompts = [LONG[:20], LONG, LONG]

    async def body(engine):
        out = []
        for prompt in prompts:  # one after another: each finds what the one before stored
            request = EngineRequest("r", prompt, "alpha", greedy(6))
            out.append([t async for o in engine.generate(request) for t in o.token_ids])
        return out

    looked, phases = [], []
    cache = PrefixCache(64 << 20, on_lookup=lambda hit, tokens: looked.append(tokens))
    hook = lambda stats: phases.extend(p for p, _ in stats.phases)  # noqa: E731
    eng = batched_engine(residency, max_prefill_tokens=8, prefix_cache=cache, on_stats=hook)
    assert run(eng, body) == run(engine(residency, 4096), body)
    assert looked == [0, 20, len(LONG) - 4]  # whole 4-token blocks, the last token computed
    assert "packed" in phases


@pytest.mark.parametrize("join", [0, 6])
def test_packed_steps_beside_running_rows_carry_what_the_time_budget_gives(tiny, cache_dir, tmp_path, join):
    """PREFILL_STEP_SLOWDOWN (budget.py): beside running rows, each packed step carries the
    prompt tokens the time budget gives (pinned here at 8, as the step times of a tiny model
    are noise), with the tokens of a whole prefill; a prompt arriving when nothing runs is
    prefilled whole (nobody waits for it); the budget learns from every step beside rows. When
    joining the prompt costs `join` tokens' worth, its last step leaves room for that."""
    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    eng = batched_engine(residency, max_prefill_tokens=4096, step_slowdown=2.0)
    asked, observed, carried = [], [], []
    eng.step_budget.span = None  # work in tokens alone (test_budget.py counts attention)
    eng.step_budget.allowance = lambda rows, waiting: asked.append(rows) or 8
    eng.step_budget.join_work = lambda length: join
    eng.step_budget.observe = lambda rows, seconds, work, joined: observed.append((rows, work, joined))
    step_packed = eng.runner.step_packed

    def spy(running, mask, tokens, positions, adapters, pieces, *grow):
        carried.append((len(tokens), [len(p.ids) for p in pieces]))
        return step_packed(running, mask, tokens, positions, adapters, pieces, *grow)

    eng.runner.step_packed = spy

    async def body(engine):
        started = asyncio.Event()

        async def running():
            request = EngineRequest("run", LONG[:10], "alpha", greedy(60))
            out = []
            async for o in engine.generate(request):
                started.set()
                out += o.token_ids
            return out

        async def joining():
            await started.wait()
            request = EngineRequest("join", LONG, "beta", greedy(4))
            return [t async for o in engine.generate(request) for t in o.token_ids]

        return await asyncio.gather(running(), joining())

    assert run(eng, body) == run(engine(residency, 4096), body)
    assert carried[0] == (0, [10])  # alone: the whole prompt in one step
    beside = [pieces for rows, pieces in carried if rows]
    # 200 tokens: 25 steps of 8; or 24, then 6, then the last 2 with the join (2 + 6 = 8)
    assert beside == [[8]] * 25 if join == 0 else [[8]] * 24 + [[6], [2]]
    assert asked and min(asked) == 1  # asked only while a row ran
    assert (1, 8, 0) in observed and (1, 0, 0) in observed  # packed and plain steps both teach it
    assert [o for o in observed if o[2]] == [(0, 10, 10), (1, beside[-1][0], len(LONG))]  # the joins, told apart


def test_the_time_budget_as_it_runs_keeps_every_token(tiny, cache_dir, tmp_path):
    """PREFILL_STEP_SLOWDOWN as the service runs it (nothing pinned): the tiny model's step
    times are noise, so the pieces come in whatever sizes the budget makes of them, while
    prompts of several lengths join running rows on three adapters; every request gets the
    tokens it gets with whole prefills."""
    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    requests = [
        ("alpha", LONG[:12], 40),
        (None, LONG, 6),
        ("beta", LONG[30:150], 8),
        ("alpha", LONG[7:90], 5),
        (None, LONG[3:40], 12),
    ]

    async def body(engine):
        async def one(i, adapter, prompt, tokens):
            await asyncio.sleep(0.02 * i)  # later ones join rows that already run
            request = EngineRequest(f"r{i}", prompt, adapter, greedy(tokens))
            return [t async for o in engine.generate(request) for t in o.token_ids]

        return await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))

    timed = batched_engine(residency, max_prefill_tokens=4096, step_slowdown=1.75)
    beside = []  # pieces carried beside running rows
    step_packed = timed.runner.step_packed

    def spy(running, mask, tokens, positions, adapters, pieces, *grow):
        if tokens:
            beside.extend(len(p.ids) for p in pieces)
        return step_packed(running, mask, tokens, positions, adapters, pieces, *grow)

    timed.runner.step_packed = spy
    assert run(timed, body) == run(engine(residency, 4096), body)
    # The 200-token prompt joined running rows: at most 32 tokens a step before any was measured.
    assert beside and max(beside) < len(LONG)
