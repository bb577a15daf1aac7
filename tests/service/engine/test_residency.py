"""Adapter tiers: device slots filled by in-place copies, a host tier, disk reads off the engine
thread, versions side by side, pins, and what the engine computes with all of it."""

from __future__ import annotations

import asyncio
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import PeftModel

from service.adapters.registry import AdapterRegistry
from service.base_model import load_base
from service.engine import EngineRequest, SamplingParams
from service.engine.batched import BatchedEngine
from service.engine.residency import AdapterResidency
from service.engine.runner import ModelRunner
from service.errors import NotFoundError
from tests.factories import make_lora_adapter, make_residency, tiny_config

PROMPT = (5, 17, 42, 99, 7, 3)


@pytest.fixture
def setup(tiny, cache_dir, tmp_path):
    events = []  # the adapters are a copy: tests edit them
    residency = make_residency(
        tiny,
        cache_dir,
        tmp_path,
        1,
        max_host=0,
        on_load=lambda n, r, s: events.append(("load", n, r)),
        on_evict=lambda n, tier: events.append(("evict", n, tier)),
        on_swap=lambda n, source, s: events.append(("swap", n, source)),
    )
    return residency, events


def logits(residency, adapter, prompt=PROMPT):
    """The last position's logits through `adapter`'s slot (None: the base)."""
    runner = ModelRunner(residency.model, "cpu")
    slot = residency.slot(adapter) if adapter else None
    out, _ = runner.prefill(list(prompt), slot)
    return out


# The slots run the fused LoRA (all adapters stacked, zero-padded ranks), PEFT its own layers:
# fp32 summation order differs by CPU kernel, so the bound is test_lora.py's, not exact.
CLOSE = {"rtol": 1e-4, "atol": 1e-4}


def peft_logits(tiny, cache_dir, package, prompt=PROMPT):
    """The same through PEFT's own loading of the package (the reference)."""
    base = load_base(str(tiny.base_dir), quantization="fp32", device="cpu", cache_dir=cache_dir)
    model = PeftModel.from_pretrained(base.model, str(package)).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1]


def test_one_slot_lru_busy_kept_and_swaps_are_in_place(setup):
    residency, events = setup
    assert residency.resident == [] and not hasattr(residency.model, "peft_config")
    assert residency.ensure("alpha", busy=set())
    assert residency.resident == ["alpha"] and set(residency.model.peft_config) == {"slot0"}
    weight = residency.model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["slot0"].weight
    assert residency.ensure("alpha", busy={"alpha"})  # already there: nothing happens
    assert not residency.ensure("beta", busy={"alpha"})  # the one slot serves a running sequence
    assert residency.ensure("beta", busy=set())  # idle now: alpha is evicted
    assert residency.resident == ["beta"] and set(residency.model.peft_config) == {"slot0"}
    layer = residency.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["slot0"].weight is weight  # the same tensor, rewritten: no PEFT wrap
    assert events == [
        ("load", "alpha", "ok"),
        ("swap", "alpha", "disk"),
        ("load", "beta", "ok"),
        ("evict", "alpha", "host"),  # MAX_CPU_ADAPTERS 0: only the copy on its way in stays
        ("evict", "alpha", "device"),
        ("swap", "beta", "disk"),
    ]


def test_in_place_swaps_compute_what_peft_loading_computes(tiny, cache_dir, tmp_path):
    """Adapters of different ranks and layers through one slot (zero padding, scaling per
    layer, rsLoRA, a rank pattern) equal PEFT's own loading of each package."""
    fp = tiny.fingerprint
    adapters = tmp_path / "adapters"
    packages = {
        "wide": make_lora_adapter(tiny.base_dir, adapters / "wide", fingerprint=fp, seed=3, rank=8),
        "narrow": make_lora_adapter(tiny.base_dir, adapters / "narrow", fingerprint=fp, seed=4, rank=2),
        "rs": make_lora_adapter(
            tiny.base_dir, adapters / "rs", fingerprint=fp, seed=5, rank=4, targets=("q_proj",), use_rslora=True
        ),
        "pattern": make_lora_adapter(
            tiny.base_dir, adapters / "pattern", fingerprint=fp, seed=6, rank=4, rank_pattern={"v_proj": 2}
        ),
    }
    base = load_base(str(tiny.base_dir), quantization="fp32", device="cpu", cache_dir=cache_dir)
    registry = AdapterRegistry(adapters, base_id="tiny", base_fingerprint=fp)
    registry.scan()
    residency = AdapterResidency(registry, base.model, 1, max_host=0)
    for name in ["wide", "narrow", "rs", "pattern", "wide"]:
        assert residency.ensure(name, busy=set())
        assert set(residency.model.peft_config) == {"slot0"}  # every one copied into slot0
        torch.testing.assert_close(logits(residency, name), peft_logits(tiny, cache_dir, packages[name]), **CLOSE)


@pytest.mark.parametrize("min_rank", [0, 8])
def test_max_lora_rank_builds_slots_that_later_ranks_fit(tiny, cache_dir, tmp_path, min_rank):
    """MAX_LORA_RANK (min_rank): the first slot is built at that rank, so a rank-8 adapter after
    a rank-4 one is copied in place; without it the slot is rebuilt (PEFT wraps anew, and CUDA
    graphs would be captured again)."""
    fp = tiny.fingerprint
    adapters = tmp_path / "adapters"
    packages = {
        "narrow": make_lora_adapter(tiny.base_dir, adapters / "narrow", fingerprint=fp, seed=4, rank=4),
        "wide": make_lora_adapter(tiny.base_dir, adapters / "wide", fingerprint=fp, seed=3, rank=8),
    }
    base = load_base(str(tiny.base_dir), quantization="fp32", device="cpu", cache_dir=cache_dir)
    registry = AdapterRegistry(adapters, base_id="tiny", base_fingerprint=fp)
    registry.scan()
    residency = AdapterResidency(registry, base.model, 1, max_host=0, min_rank=min_rank)
    assert residency.ensure("narrow", busy=set())
    first = residency.slot("narrow")
    assert residency.ensure("wide", busy=set())
    assert (residency.slot("wide") == first) == (min_rank == 8)
    for name in ("wide", "narrow"):
        assert residency.ensure(name, busy=set())
        torch.testing.assert_close(logits(residency, name), peft_logits(tiny, cache_dir, packages[name]), **CLOSE)


def test_an_adapter_peft_must_load_gets_a_slot_built_for_it(tiny, cache_dir, tmp_path):
    fp = tiny.fingerprint
    adapters = tmp_path / "adapters"
    shutil.copytree(tiny.adapter_dir, adapters)
    dora = make_lora_adapter(tiny.base_dir, adapters / "dora", fingerprint=fp, seed=7, use_dora=True)
    base = load_base(str(tiny.base_dir), quantization="fp32", device="cpu", cache_dir=cache_dir)
    registry = AdapterRegistry(adapters, base_id="tiny", base_fingerprint=fp)
    registry.scan()
    residency = AdapterResidency(registry, base.model, 1, max_host=0)
    assert residency.ensure("alpha", busy=set())
    assert residency.ensure("dora", busy=set())  # rebuilt by PEFT (a magnitude vector per layer)
    torch.testing.assert_close(logits(residency, "dora"), peft_logits(tiny, cache_dir, dora), **CLOSE)
    assert residency.ensure("alpha", busy=set())  # and back: the slot is rebuilt plain again
    torch.testing.assert_close(logits(residency, "alpha"), peft_logits(tiny, cache_dir, adapters / "alpha"), **CLOSE)


def test_the_host_tier_serves_swaps_without_reading_disk(tiny, cache_dir, tmp_path):
    events = []
    residency = make_residency(
        tiny,
        cache_dir,
        tmp_path,
        1,
        max_host=2,
        on_load=lambda n, r, s: events.append(("load", n)),
        on_swap=lambda n, source, s: events.append(("swap", n, source)),
        on_evict=lambda n, tier: events.append(("evict", n, tier)),
    )
    for name in ["alpha", "beta", "alpha", "beta"]:
        assert residency.ensure(name, busy=set())
    assert events == [
        ("load", "alpha"),
        ("swap", "alpha", "disk"),
        ("load", "beta"),
        ("evict", "alpha", "device"),
        ("swap", "beta", "disk"),
        ("evict", "beta", "device"),
        ("swap", "alpha", "host"),
        ("evict", "alpha", "device"),
        ("swap", "beta", "host"),
    ]
    assert residency.state(residency.key("alpha")) == "cached"
    assert residency.state(residency.key("beta")) == "resident"
    residency.max_host = 1  # the host tier shrinks: the least recently used copies go
    make_lora_adapter(tiny.base_dir, residency.registry.directory / "gamma", fingerprint=tiny.fingerprint, seed=8)
    residency.registry.rescan()
    assert residency.ensure("gamma", busy=set())
    assert ("evict", "alpha", "host") in events and ("evict", "beta", "host") in events


def test_disk_reads_run_on_the_loader_thread_and_requests_wait(tiny, cache_dir, tmp_path):
    gate = threading.Event()
    residency = make_residency(tiny, cache_dir, tmp_path, 2, loader=ThreadPoolExecutor(1))
    read = residency.registry.read_package

    def slow_read(key):
        gate.wait(10)
        return read(key)

    residency.registry.read_package = slow_read
    key = residency.key("alpha")
    assert not residency.ensure("alpha", busy=set())  # submitted; the caller goes on
    assert residency.state(key) == "loading"
    gate.set()
    assert residency.ready.wait(10)
    assert residency.ensure("alpha", busy=set()) and residency.state(key) == "resident"


def test_an_unloadable_version_fails_its_requests_and_is_listed_failed(setup):
    residency, _ = setup
    registry = residency.registry
    (registry.directory / "alpha" / "adapter_model.safetensors").write_bytes(b"corrupt")
    registry.rescan()  # a new version, whose weights cannot be parsed
    with pytest.raises(NotFoundError, match="cannot be loaded"):
        residency.ensure("alpha", busy=set())
    assert registry.get("beta").status == "ready"
    with pytest.raises(NotFoundError, match="cannot be loaded"):  # refused up front from now on
        registry.get("alpha")


def test_a_package_edited_after_registration_is_refused_not_served(setup):
    residency, _ = setup
    registry = residency.registry
    shutil.copy(
        registry.directory / "beta" / "adapter_model.safetensors",
        registry.directory / "alpha" / "adapter_model.safetensors",
    )  # edited in place, no rescan: the registered version no longer exists on disk
    with pytest.raises(NotFoundError, match="changed on disk"):
        residency.ensure("alpha", busy=set())


def test_two_versions_are_two_adapters_and_the_old_one_leaves_first(tiny, cache_dir, tmp_path):
    residency = make_residency(tiny, cache_dir, tmp_path, 2, max_host=0)
    registry = residency.registry
    old = registry.get("alpha").key
    assert residency.ensure(old, busy=set())
    before = logits(residency, old)
    shutil.copy(
        registry.directory / "beta" / "adapter_model.safetensors",
        registry.directory / "alpha" / "adapter_model.safetensors",
    )
    assert registry.rescan()["changed"] == ["alpha"]
    new = registry.get("alpha").key
    assert new != old and not registry.current(old) and registry.current(new)
    assert residency.ensure(new, busy={old})  # the old version keeps serving its rows
    torch.testing.assert_close(logits(residency, old), before)
    beta = peft_logits(tiny, cache_dir, registry.directory / "beta")  # alpha's new weights are beta's
    torch.testing.assert_close(logits(residency, new), beta, **CLOSE)
    assert not torch.allclose(beta, before, atol=1e-3)
    assert residency.ensure("beta", busy=set())  # the replaced version is evicted first
    assert residency.state(old) == "registered" and residency.state(new) == "resident"


def test_pinned_adapters_are_never_evicted(tiny, cache_dir, tmp_path):
    residency = make_residency(tiny, cache_dir, tmp_path, 2, max_host=0)
    fp = tiny.fingerprint
    make_lora_adapter(tiny.base_dir, residency.registry.directory / "gamma", fingerprint=fp, seed=9)
    residency.registry.rescan()
    residency.pin("alpha")
    with pytest.raises(ValueError, match="at most 1"):
        residency.pin("beta")  # one slot must stay free
    residency.preload_pending(set())
    assert residency.resident == ["alpha"]
    for name in ["beta", "gamma", "beta", "gamma"]:
        assert residency.ensure(name, busy=set())
        assert "alpha" in residency.resident
    residency.unpin("alpha")
    assert residency.ensure("beta", busy={residency.key("gamma")}) and "alpha" not in residency.resident


def test_engine_loads_on_first_use_without_disturbing_running_sequences(tiny, cache_dir, tmp_path):
    adapters = tmp_path / "adapters"
    shutil.copytree(tiny.adapter_dir, adapters)
    base = load_base(str(tiny.base_dir), quantization="fp32", device="cpu", cache_dir=cache_dir)
    registry = AdapterRegistry(adapters, base_id="tiny", base_fingerprint=tiny.fingerprint)
    registry.scan()
    residency = AdapterResidency(registry, base.model, 1, loader=ThreadPoolExecutor(1))
    engine = BatchedEngine(ModelRunner(base.model, "cpu"), tiny_config(), residency=residency)
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


def test_start_pins_and_preloads_and_refuses_unknown_names(tiny, cache_dir, tmp_path):
    from service.runtime import preload

    residency = make_residency(tiny, cache_dir, tmp_path, 2, loader=ThreadPoolExecutor(1))
    with pytest.raises(ValueError, match=r"not served: \['nope'\]"):
        preload(residency, ["nope"], [])
    preload(residency, ["alpha"], ["beta"])
    assert sorted(residency.resident) == ["alpha", "beta"] and residency.pinned == {"alpha"}


def test_the_max_lora_rank_setting_reaches_the_slots(tiny, cache_dir):
    from service.metrics import Metrics
    from service.runtime import load_runtime
    from tests.factories import tiny_settings

    settings = tiny_settings(tiny, cache_dir, max_lora_rank=8, preload_adapters=["alpha"])  # alpha: rank 4
    residency = load_runtime(settings, Metrics()).residency
    slot = residency.slot("alpha")
    ranks = {m.lora_A[slot].weight.shape[0] for m in residency.model.modules() if slot in getattr(m, "lora_A", {})}
    assert ranks == {8}
