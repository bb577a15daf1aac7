"""Adapters load on first use and stay resident up to a limit, least recently used evicted."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch

from service.adapters.registry import AdapterRegistry
from service.adapters.residency import AdapterResidency
from service.base_model import load_base
from service.engine import EngineRequest, SamplingParams
from service.engine.batched import BatchedEngine
from service.engine.runner import ModelRunner
from service.errors import NotFoundError
from tests.factories import make_residency

PROMPT = (5, 17, 42, 99, 7, 3)


@pytest.fixture
def setup(tiny, cache_dir, tmp_path):
    events = []  # the adapters are a copy: one test corrupts a package
    residency = make_residency(
        tiny,
        cache_dir,
        tmp_path,
        1,
        on_load=lambda n, r, s: events.append(("load", n, r)),
        on_evict=lambda n: events.append(("evict", n)),
    )
    return residency, events


def test_lazy_load_lru_eviction_and_busy_adapters_are_kept(setup):
    residency, events = setup
    assert residency.resident == [] and not hasattr(residency.model, "peft_config")
    assert residency.ensure("alpha", busy=set())
    assert residency.resident == ["alpha"] and hasattr(residency.model, "peft_config")
    assert residency.ensure("alpha", busy={"alpha"})  # already there: no load
    assert not residency.ensure("beta", busy={"alpha"})  # the one slot serves a running sequence
    assert residency.ensure("beta", busy=set())  # idle now: alpha is evicted
    assert residency.resident == ["beta"] and set(residency.model.peft_config) == {"beta"}
    assert events == [("load", "alpha", "ok"), ("load", "beta", "ok"), ("evict", "alpha")]


def test_unloadable_adapter_fails_its_request_only(setup):
    residency, _ = setup
    record = residency.registry.get("alpha", param="adapter")
    (record.path / "adapter_model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(NotFoundError, match="cannot be loaded"):
        residency.ensure("alpha", busy=set())
    assert residency.registry.get("beta", param="adapter").status == "ready"
    with pytest.raises(NotFoundError):  # now refused up front, like any failed package
        residency.registry.get("alpha", param="adapter")


def test_engine_loads_on_first_use_without_disturbing_running_sequences(tiny, cache_dir, tmp_path):
    adapters = tmp_path / "adapters"
    shutil.copytree(tiny.adapter_dir, adapters)
    base = load_base(str(tiny.base_dir), quantization="fp32", device="cpu", cache_dir=cache_dir)
    registry = AdapterRegistry(adapters, base_id="tiny", base_fingerprint=tiny.fingerprint)
    registry.scan()
    residency = AdapterResidency(registry, base.model, 1)
    engine = BatchedEngine(
        ModelRunner(base.model, "cpu"),
        eos_token_ids=frozenset(),
        max_context=256,
        residency=residency,
        max_batch_size=4,
    )
    greedy = SamplingParams(max_tokens=24, temperature=0.0)

    async def main():
        await engine.start()
        try:

            async def one(adapter, delay):
                await asyncio.sleep(delay)
                outs = [o async for o in engine.generate(EngineRequest(adapter or "b", PROMPT, adapter, greedy))]
                return [t for o in outs for t in o.token_ids]

            # base runs; alpha loads while it runs; beta must wait for alpha's slot (max 1)
            return await asyncio.gather(one(None, 0), one("alpha", 0.02), one("beta", 0.04))
        finally:
            await engine.stop()

    base_tokens, alpha_tokens, beta_tokens = asyncio.run(main())
    assert residency.resident == ["beta"]
    model = residency.model
    with model.disable_adapter(), torch.no_grad():
        ref = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert base_tokens == ref[0, len(PROMPT) :].tolist()  # untouched by the loads beside it
    assert alpha_tokens != base_tokens and beta_tokens != base_tokens and len(beta_tokens) == 24


def lora_weights(model, name):
    return {k: v.clone() for k, v in model.state_dict().items() if f".{name}." in k and "lora_" in k}


def test_a_package_changed_on_disk_reloads_when_idle_after_a_rescan(setup):
    residency, events = setup
    registry = residency.registry
    assert residency.ensure("alpha", busy=set())
    before = lora_weights(residency.model, "alpha")
    # Replace alpha's weights with beta's (same name, manifest kept): a retrained package.
    shutil.copy(
        registry.directory / "beta" / "adapter_model.safetensors",
        registry.directory / "alpha" / "adapter_model.safetensors",
    )
    diff = registry.rescan()
    assert diff == {"added": [], "removed": [], "changed": ["alpha"]}
    residency.mark_stale(diff["changed"])
    assert residency.ensure("alpha", busy={"alpha"})  # in use: the old weights stay for now
    assert all(torch.equal(before[k], v) for k, v in lora_weights(residency.model, "alpha").items())
    assert residency.ensure("alpha", busy=set())  # idle: reloaded
    after = lora_weights(residency.model, "alpha")
    assert residency.resident == ["alpha"] and set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert [e for e in events if e[0] == "load"] == [("load", "alpha", "ok")] * 2
