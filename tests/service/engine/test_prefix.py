"""Prefix reuse: stored prompt prefixes serve later prompts on the same adapter version only,
with the tokens a full prefill gives, within a memory bound (tiny real Llama, fp32)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import DynamicCache

from service.engine import EngineRequest, SamplingParams
from service.engine.prefix import BLOCK, PrefixCache
from service.engine.runner import ModelRunner
from tests.factories import batched_engine, make_residency

SHARED = tuple(range(40, 40 + 3 * BLOCK))  # three whole blocks, as a template or system prompt


def layers(length: int, fill: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 2, length, 4), fill), torch.full((1, 2, length, 4), -fill)) for _ in range(2)]


def test_whole_blocks_are_stored_and_the_last_token_is_always_computed():
    events = []
    cache = PrefixCache(1 << 20, on_lookup=lambda hit, tokens: events.append((hit, tokens)))
    cache.store("alpha@1", SHARED + (7, 8), layers(len(SHARED) + 2))
    hit = cache.lookup("alpha@1", SHARED + (9, 10, 11), DynamicCache)
    assert hit.length == len(SHARED) and hit.cache.get_seq_length() == len(SHARED)
    assert cache.lookup("alpha@1", SHARED, DynamicCache).length == 2 * BLOCK  # one token left to run
    assert cache.lookup("alpha@1", SHARED[:BLOCK] + (0,) * BLOCK + (1,), DynamicCache).length == BLOCK
    assert cache.lookup("alpha@1", (0,) + SHARED, DynamicCache) is None  # prefixes only
    assert cache.lookup("alpha@2", SHARED + (9,), DynamicCache) is None  # another version
    assert cache.lookup("beta@1", SHARED + (9,), DynamicCache) is None  # another adapter
    assert events[-3:] == [(False, 0)] * 3 and events[0] == (True, len(SHARED))


def test_memory_is_bounded_least_recently_used_first():
    one = layers(BLOCK)
    size = sum(k.nbytes + v.nbytes for k, v in one)
    cache = PrefixCache(2 * size)
    prompts = [tuple(range(i * 100, i * 100 + BLOCK + 1)) for i in range(3)]
    cache.store("base", prompts[0], one)
    cache.store("base", prompts[1], one)
    assert cache.lookup("base", prompts[0], DynamicCache)  # prompts[0] is the most recent now
    cache.store("base", prompts[2], one)
    assert cache.nbytes <= 2 * size and len(cache) == 2
    assert cache.lookup("base", prompts[1], DynamicCache) is None  # the least recently used went
    assert cache.lookup("base", prompts[0], DynamicCache) and cache.lookup("base", prompts[2], DynamicCache)


def serve(residency, jobs, prefix_cache, kv="dynamic", **options):
    engine = batched_engine(residency, prefix_cache=prefix_cache, kv_cache=kv, **options)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def main():
        await engine.start()
        try:
            out = []
            for wave in jobs:  # one wave after another, so later waves find the earlier ones

                async def one(adapter, prompt):
                    request = EngineRequest("r", prompt, adapter, params)
                    return [t async for o in engine.generate(request) for t in o.token_ids]

                out += await asyncio.gather(*(one(a, p) for a, p in wave))
            return out
        finally:
            await engine.stop()

    return asyncio.run(main())


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_the_engine_reuses_prefixes_per_adapter_with_unchanged_tokens(tiny, cache_dir, tmp_path, kv):
    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    waves = [
        [("alpha", SHARED + (1, 2, 3)), (None, SHARED + (4, 5))],  # together: stored per row
        [("alpha", SHARED + (9, 9, 9, 9)), ("beta", SHARED + (6,)), (None, SHARED + (7, 7))],
        [("beta", SHARED + (6, 1))],
    ]
    looked = []
    cache = PrefixCache(64 << 20, on_lookup=lambda hit, tokens: looked.append(tokens))
    reused = serve(residency, waves, cache, kv)
    plain = serve(residency, waves, None, kv)
    assert reused == plain  # the stored KV gives the tokens a full prefill gives
    assert looked == [0, 0, len(SHARED), 0, len(SHARED), len(SHARED)]  # beta never used alpha's


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_prompts_with_stored_prefixes_of_any_length_prefill_together(tiny, cache_dir, tmp_path, kv, monkeypatch):
    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    other = tuple(range(90, 90 + BLOCK))
    waves = [
        [("alpha", SHARED + (1, 2)), (None, other + (3,)), ("beta", SHARED[:BLOCK] + (8, 8, 8, 8, 8))],
        # one pass: three hits of 12, 4 and 4 stored tokens, and a miss, rests of 1 to 6 tokens
        [
            ("alpha", SHARED + (5,)),
            (None, other + (6, 6, 6, 6, 6, 6)),
            ("beta", SHARED[:BLOCK] + (8, 8, 8, 8, 1)),
            ("alpha", (7,) * 9),
        ],
    ]
    plain = serve(residency, waves, None, kv)
    looked, passes = [], []
    for name in ("prefill", "prefill_batch", "step_packed"):  # count the passes that prefill
        method = getattr(ModelRunner, name)
        monkeypatch.setattr(ModelRunner, name, lambda *a, _m=method, **k: passes.append(1) or _m(*a, **k))
    cache = PrefixCache(64 << 20, on_lookup=lambda hit, tokens: looked.append(tokens))
    reused = serve(residency, waves, cache, kv)
    assert reused == plain  # token for token what full prefills give
    assert sorted(looked[3:]) == [0, BLOCK, 2 * BLOCK, len(SHARED)]
    # Each wave is one forward pass, hits included (2); a wave whose requests reach the engine
    # thread across two iterations makes it 3. One pass per hit, as before, made it 5. (On the
    # dynamic cache the passes are packed steps, which also carry the running rows' tokens.)
    assert 2 <= len(passes) <= 3


def test_a_batch_of_long_hits_and_misses_fits_the_static_cache(tiny, cache_dir, tmp_path):
    """Stored prefixes and the rests of other prompts are laid side by side for the pass (past
    columns, then rest columns): wider than any prompt. The cache the rows join is cut back to
    the longest prompt, so prompts that fit the context still fit the static cache."""
    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    long = tuple(range(10, 10 + 37 * BLOCK))  # 148 tokens; the tiny engines' context is 256
    waves = [[("alpha", long + (1,))], [("alpha", long + (2,)), (None, tuple(range(200, 350)))]]
    cache = PrefixCache(64 << 20)
    assert serve(residency, waves, cache, "static") == serve(residency, waves, None, "static")


def test_one_tenants_stored_prefixes_never_serve_another(tiny, cache_dir, tmp_path):
    """The tenant salts the prefix cache's key (vLLM's cache_salt): the same prompt on the same
    adapter version hits for its own tenant only, and each gets a whole prefill's tokens."""
    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    looked: list[tuple[bool, int]] = []
    cache = PrefixCache(64 << 20, on_lookup=lambda hit, tokens: looked.append((hit, tokens)))
    engine = batched_engine(residency, prefix_cache=cache)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = SHARED + (1, 2, 3)

    async def main():
        await engine.start()
        try:
            out = []
            for tenant in ("acme", "globex", "acme", None):
                request = EngineRequest("r", prompt, "alpha", params, tenant=tenant)
                out.append([t async for o in engine.generate(request) for t in o.token_ids])
            return out
        finally:
            await engine.stop()

    out = asyncio.run(main())
    assert [hit for hit, _ in looked] == [False, False, True, False]  # acme's own, and only acme's
    assert out[0] == out[1] == out[2] == out[3]
