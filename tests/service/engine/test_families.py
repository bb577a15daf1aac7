"""Every decoder family PEFT can put LoRA on, served on both KV caches (issue #18).

Each family is a tiny random checkpoint of its real transformers class (tests/factories.py) with
two random "all-linear" LoRA adapters. The base and both adapters run in one mixed batch, greedy,
in fp32, and must give the tokens of PEFT's own single-request `generate`: on the dynamic cache,
on the static cache (slots, eager) and on the static cache as the CUDA graphs run it (buckets,
padding rows, the adapter pool), replayed eagerly here. nf4 must serve every family too. A
family a cache cannot serve is refused at start when asked for, and `auto` falls back with a log
line: never a 500 per request.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
import torch

from service.engine import EngineRequest, SamplingParams
from service.engine.kvcache import choose_kv_cache, static_kv_unsupported
from service.fingerprint import fingerprint_files, weight_files
from service.metrics import Metrics
from service.runtime import load_runtime
from service.settings import Settings
from tests.factories import FAMILIES, make_lora_adapter, make_tiny_family, preload_adapters, serve_through_slots
from tests.factories import make_engine as make
from tests.factories import run_engine as run

PROMPTS = ["The capital of France is Paris.", "Write a short email", "Numbers 0123456789, prices $19.99"]
ADAPTERS = [None, "a1", "a2"]
NEW_TOKENS = 8
STATIC_UNSUPPORTED = {"gemma2"}  # sliding-window layers: the slot cache is full attention only
# Families whose prompt chunks run in passes of their own, never packed into a decode step:
# sliding windows, ALiBi, attention outside transformers' interface, GPT-2's Conv1D LoRA layers
NOT_PACKED = {"gemma2", "gemma2_window", "bloom", "falcon_alibi", "falcon", "gpt2"}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Per family, built on first use: (base directory, adapter directory)."""
    built = {}

    def world(family):
        if family not in built:
            root = tmp_path_factory.mktemp(family)
            base = make_tiny_family(family, root / "base")
            fingerprint = fingerprint_files(weight_files(base))
            for seed, name in ((11, "a1"), (12, "a2")):
                make_lora_adapter(
                    base,
                    root / "adapters" / name,
                    fingerprint=fingerprint,
                    seed=seed,
                    targets="all-linear",
                    base_id="base",
                )
            built[family] = (base, root / "adapters")
        return built[family]

    return world


def runtime_for(worlds, family, cache_dir, quantization="fp32", device="cpu", slots=False):
    base, adapters = worlds(family)
    settings = Settings(
        model=str(base),
        quantization=quantization,
        device=device,
        adapter_dir=adapters,
        cache_dir=cache_dir,
        kv_cache="dynamic",
    )
    runtime = load_runtime(settings, Metrics())
    if slots:
        return runtime, serve_through_slots(runtime, ("a1", "a2"))
    return preload_adapters(runtime, ("a1", "a2"))


def serve_mixed_batch(runner, tokenizer, kv, engine=None) -> list[list[int]]:
    engine = engine or make(runner, kv=kv)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]

    async def body(engine):
        async def one(i):
            request = EngineRequest(
                f"r{i}",
                tuple(prompts[i]),
                ADAPTERS[i],
                SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
            )
            outputs = [o async for o in engine.generate(request)]
            assert outputs[-1].finish_reason == "length"
            return [t for o in outputs for t in o.token_ids]

        return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))

    return run(engine, body)


@pytest.mark.parametrize("kv", ["dynamic", "static", "graphs"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_batch_is_token_identical_to_peft_generate(worlds, cache_dir, family, kv):
    if kv != "dynamic" and family in STATIC_UNSUPPORTED:
        pytest.skip("refused at start: test_families_the_static_cache_cannot_serve_are_refused_or_fall_back")
    runtime = runtime_for(worlds, family, cache_dir)
    runner, tokenizer = runtime.engine.runner, runtime.tokenizer
    assert_peft_tokens(runner, tokenizer, serve_mixed_batch(runner, tokenizer, kv), (family, kv))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapters_swapped_into_device_slots_serve_every_family(worlds, cache_dir, family):
    """The service's own path: both adapters copied into device slots, requests by name."""
    runtime, slots = runtime_for(worlds, family, cache_dir, slots=True)
    runner, tokenizer = runtime.engine.runner, runtime.tokenizer
    got = serve_mixed_batch(runner, tokenizer, "dynamic", engine=runtime.engine)
    assert_peft_tokens(runner, tokenizer, got, family, slots)


def assert_peft_tokens(runner, tokenizer, got: list[list[int]], label, slots=None) -> None:
    """Each row's tokens are those of PEFT's single-request greedy `generate` (`slots`: the PEFT
    adapter that holds each named one)."""
    model = runner.model
    for prompt, adapter, tokens in zip(PROMPTS, ADAPTERS, got, strict=True):
        ids = tokenizer(prompt).input_ids
        if adapter:
            model.set_adapter(slots[adapter] if slots else adapter)
        with model.disable_adapter() if adapter is None else torch.no_grad(), torch.no_grad():
            out = model.generate(
                torch.tensor([ids], device=runner.device),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        assert tokens == out[0, len(ids) :].tolist(), (label, adapter)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nf4_serves_every_family(worlds, cache_dir, family):
    runtime = runtime_for(worlds, family, cache_dir, quantization="nf4")
    kvs = ["dynamic"] + ([] if family in STATIC_UNSUPPORTED else ["static"])
    for kv in kvs:
        got = serve_mixed_batch(runtime.engine.runner, runtime.tokenizer, kv)
        vocabulary = len(runtime.tokenizer)
        assert all(len(t) == NEW_TOKENS and all(0 <= i < vocabulary for i in t) for t in got), (family, kv)


@pytest.mark.parametrize("family", sorted(STATIC_UNSUPPORTED))
def test_families_the_static_cache_cannot_serve_are_refused_or_fall_back(worlds, cache_dir, family, caplog):
    base, adapters = worlds(family)
    settings = Settings(
        model=str(base), quantization="fp32", device="cpu", adapter_dir=adapters, cache_dir=cache_dir, kv_cache="static"
    )
    with pytest.raises(ValueError, match="KV_CACHE=static: the model has sliding-window layers .window 16. shorter"):
        load_runtime(settings, Metrics())
    # auto on a GPU, where it would otherwise pick the static cache: dynamic, with a log line
    model = runtime_for(worlds, family, cache_dir).engine.runner.model
    assert static_kv_unsupported(model.config)
    gpu = SimpleNamespace(model=model, device=torch.device("cuda"))
    with caplog.at_level(logging.INFO, logger="service.engine.kvcache"):
        assert choose_kv_cache(settings.model_copy(update={"kv_cache": "auto"}), gpu, 256) == "dynamic"
    assert any("KV cache: dynamic" in r.getMessage() and "full attention" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_packed_step_computes_what_separate_passes_do(worlds, cache_dir, family):
    """Running rows' decode tokens and pieces of joining prompts (one after stored KV, one
    from the start) in one packed pass (service/engine/packed.py): each row's logits and each
    piece's last logits and KV are those of the separate passes, on every family it serves."""
    from service.engine import PEFT_BASE
    from service.engine.packed import Piece
    from service.engine.prefix import cache_layers

    runner = runtime_for(worlds, family, cache_dir).engine.runner
    assert runner.packable(256) == (family not in NOT_PACKED), family  # the tiny context
    if family in NOT_PACKED:
        if family.startswith("gemma2"):  # soft-capped logits, which packed_attention does not apply
            from service.engine.packed import supported

            assert not supported(runner.model)
        return
    prompts = [[5, 9, 13, 2, 7, 7, 30], [40, 41, 3], list(range(20, 38))]
    adapters = ["a1", None, "a2"]
    logits, cache, mask = runner.prefill_batch(prompts[:2], adapters[:2])
    tokens = logits.argmax(dim=-1).tolist()
    positions = [len(p) for p in prompts[:2]]
    running = cache_layers(cache)
    # References: the decode step alone, and each piece's prompt prefilled whole
    reference = runner.decode_batch(
        tokens, cache, torch.cat([mask, mask.new_ones((2, 1))], dim=1), positions, adapters[:2]
    )
    _, head = runner.prefill(prompts[2][:6], "a2")
    pieces = [Piece(prompts[2][6:], 6, "a2", cache_layers(head)), Piece(prompts[0][:5], 0, None)]
    whole = [runner.prefill(prompts[2], "a2"), runner.prefill(prompts[0][:5], None)]

    # fp32 throughout: the bounds are summation order across BLAS shapes (one sequence against
    # batches), far below what a wrong position, owner or adapter would move (order 1)
    got, grown, done = runner.step_packed(running, mask, tokens, positions, adapters[:2], pieces)
    assert got.shape[0] == 4
    torch.testing.assert_close(got[:2], reference, atol=2e-4, rtol=1e-4)
    for index, (last, piece_cache) in enumerate(whole):
        torch.testing.assert_close(got[2 + index], last, atol=2e-4, rtol=1e-4)
        for (k, v), (k2, v2) in zip(done[index], cache_layers(piece_cache), strict=True):
            torch.testing.assert_close(k, k2, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v, v2, atol=1e-4, rtol=1e-4)
    for (k, v), (k2, v2) in zip(grown, cache_layers(cache), strict=True):  # the decode step's cache
        torch.testing.assert_close(k, k2, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, v2, atol=1e-4, rtol=1e-4)
    assert PEFT_BASE not in (runner.fused.names or ())  # routing reset after the pass
    assert not runner.fused.packed
    assert runner.model.config._attn_implementation != "hotswap_packed"  # the model's own again
