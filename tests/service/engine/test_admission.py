"""Fair admission when more adapters are wanted than slots exist: no starvation, and no
head-of-line blocking of requests that could run (tiny real model, one or two slots)."""

from __future__ import annotations

import asyncio
import time

from service.engine import EngineRequest, SamplingParams
from tests.factories import batched_engine, make_lora_adapter, make_residency

PROMPT = (5, 17, 42, 99, 7, 3)


def engine_over(residency, waits=None, waiting=None):
    """The engine; `waits` gets each slot wait's seconds, `waiting` the adapters waiting now."""

    def on_stats(stats):
        if waits is not None:
            waits.extend(stats.slot_waits)
        if waiting is not None and stats.slot_waiters is not None:
            waiting[:] = stats.slot_waiters

    return batched_engine(residency, on_stats=on_stats)


async def timed(engine, rid, adapter, tokens, after=lambda: True):
    """(request id, first token time, end time), asked once `after()` holds: arrival order is
    set by what the engine did, not by delays racing its thread."""
    while not after():
        await asyncio.sleep(0.001)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    first = None
    async for _ in engine.generate(EngineRequest(rid, PROMPT, adapter, params)):
        first = first or time.monotonic()
    return rid, first, time.monotonic()


def run(engine, jobs):
    async def main():
        await engine.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*jobs(engine)), 300)  # bounds a hang only
        finally:
            await engine.stop()

    return {rid: (first, end) for rid, first, end in asyncio.run(main())}


def test_a_flood_on_one_adapter_cannot_starve_another(tiny, cache_dir, tmp_path):
    """One slot, alpha requests arriving all the time: beta gets the slot once alpha's running
    rows end, before alpha requests that arrived after it."""
    residency = make_residency(tiny, cache_dir, tmp_path, 1)
    waits: list[float] = []
    waiting: list[str] = []
    engine = engine_over(residency, waits, waiting)

    def jobs(engine):
        early = [timed(engine, f"a{i}", "alpha", 200) for i in range(3)]
        beta = [timed(engine, "beta", "beta", 10, after=lambda: engine.running == 3)]
        late = [timed(engine, f"late{i}", "alpha", 100, after=lambda: "beta" in waiting) for i in range(8)]
        return early + beta + late

    times = run(engine, jobs)
    beta_first = times["beta"][0]
    assert all(times[f"late{i}"][0] > beta_first for i in range(8))  # the flood waited for beta
    assert all(times[f"a{i}"][1] < beta_first for i in range(3))  # beta waited for running rows
    assert waits and max(waits) < 30  # the wait was counted, and bounded


def test_requests_that_can_run_are_not_held_behind_one_that_waits(tiny, cache_dir, tmp_path):
    """Two slots busy (alpha twice, beta once): a gamma request waits for a slot, and the
    engine drains beta's (the fewest rows); the base and alpha requests queued behind gamma
    start at once."""
    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    make_lora_adapter(tiny.base_dir, residency.registry.directory / "gamma", fingerprint=tiny.fingerprint, seed=5)
    residency.registry.rescan()
    waiting: list[str] = []
    engine = engine_over(residency, waiting=waiting)

    def jobs(engine):
        return [
            timed(engine, "alpha", "alpha", 240),
            timed(engine, "alpha1", "alpha", 240),
            timed(engine, "beta", "beta", 200),
            timed(engine, "gamma", "gamma", 5, after=lambda: engine.running == 3),
            timed(engine, "base", None, 5, after=lambda: "gamma" in waiting),
            timed(engine, "alpha2", "alpha", 5, after=lambda: "gamma" in waiting),
        ]

    times = run(engine, jobs)
    gamma_first = times["gamma"][0]
    assert times["base"][1] < gamma_first and times["alpha2"][1] < gamma_first
    assert times["beta"][1] < gamma_first < times["alpha"][1]  # beta's slot was freed for it


async def tenant_timed(engine, rid, tenant, tokens, after=lambda: True):
    while not after():
        await asyncio.sleep(0.001)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    first = None
    async for _ in engine.generate(EngineRequest(rid, PROMPT, "alpha", params, tenant=tenant)):
        first = first or time.monotonic()
    return rid, first, time.monotonic()


def test_a_tenants_flood_leaves_a_row_for_another_tenant(tiny, cache_dir, tmp_path):
    """Two tenants on one adapter, 4 rows: a's flood takes 3 (the reserve stays free), b's
    request joins at once, and a's queued requests wait behind it (scheduler.py, _Shares)."""
    residency = make_residency(tiny, cache_dir, tmp_path, 1)
    shares = (("a", 1.0, None), ("b", 1.0, None))
    engine = batched_engine(residency, shares=shares)

    def jobs(engine):
        flood = [tenant_timed(engine, f"a{i}", "a", 120) for i in range(8)]
        newcomer = [tenant_timed(engine, "b", "b", 4, after=lambda: engine.running == 3)]
        return flood + newcomer

    times = run(engine, jobs)
    b_first, b_end = times["b"]
    first_wave = sorted(times, key=lambda rid: times[rid][0])[:4]
    assert "b" in first_wave  # b took the reserved row, before a's fourth
    assert b_end < min(times[f"a{i}"][1] for i in range(8))  # and finished before any of a's
