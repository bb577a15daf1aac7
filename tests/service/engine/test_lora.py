"""The fused mixed-adapter LoRA against PEFT's own mixed-batch forward (tiny real Llama)."""

from __future__ import annotations

import shutil

import pytest
import torch

from service.engine.runner import ModelRunner
from tests.factories import make_lora_adapter, make_residency

PROMPTS = [[5, 17, 42, 99, 7, 3], [8, 9], [100, 101, 102, 103], [33, 34, 35], [60, 61, 62, 63, 64]]
ADAPTERS = [None, "alpha", "beta", "alpha", "beta"]


@pytest.fixture
def residency(tiny, cache_dir, tmp_path):
    residency = make_residency(tiny, cache_dir, tmp_path, 4)
    for name in ("alpha", "beta"):
        residency.ensure(name, busy=set())
    return residency


def slots(residency, adapters):
    """The rows' PEFT adapters: the slots that hold the named adapters."""
    return [residency.slot(a) if a else None for a in adapters]


def steps(runner: ModelRunner, adapters, n=4) -> list[torch.Tensor]:
    """Prefill the prompts together, then decode n greedy steps; every step's logits."""
    logits, cache, mask = runner.prefill_batch(PROMPTS, adapters)
    out = [logits]
    positions = [len(p) for p in PROMPTS]
    for _ in range(n):
        tokens = logits.argmax(-1).tolist()
        mask = torch.cat([mask, mask.new_ones((len(PROMPTS), 1))], dim=1)
        logits = runner.decode_batch(tokens, cache, mask, positions, adapters)
        positions = [p + 1 for p in positions]
        out.append(logits)
    return out


@pytest.mark.parametrize("adapters", [ADAPTERS, ["alpha"] * 5, [None] * 5, ["beta", None, None, None, "beta"]])
def test_fused_lora_matches_peft_mixed_batches(residency, adapters):
    adapters = slots(residency, adapters)
    fused = steps(ModelRunner(residency.model, "cpu"), adapters)
    peft = steps(ModelRunner(residency.model, "cpu", fused_lora=False), adapters)
    for a, b in zip(fused, peft, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    base = steps(ModelRunner(residency.model, "cpu"), [None] * 5)
    for row, adapter in enumerate(adapters):  # and the adapters really act on their rows
        assert torch.equal(fused[0][row], base[0][row]) == (adapter is None)


def test_a_swapped_slot_is_not_served_from_stale_stacks(residency):
    """Swapping another adapter into a slot rewrites its tensors in place (same objects): the
    fused stacks built from the old values must not serve the new adapter."""
    runner = ModelRunner(residency.model, "cpu")
    rows = slots(residency, ADAPTERS)
    before = steps(runner, rows, n=1)[0]
    registry = residency.registry
    shutil.copy(
        registry.directory / "beta" / "adapter_model.safetensors",
        registry.directory / "alpha" / "adapter_model.safetensors",
    )
    registry.rescan()  # alpha's new version: beta's weights
    residency.max_resident = 2  # full: the new version replaces the old one in its slot
    assert residency.ensure("alpha", busy={residency.key("beta")})
    assert set(residency.model.peft_config) == {"slot0", "slot1"}
    rows = slots(residency, ADAPTERS)
    after = steps(runner, rows, n=1)[0]
    reference = steps(ModelRunner(residency.model, "cpu", fused_lora=False), rows, n=1)[0]
    torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after[1], before[1], atol=1e-3)  # alpha's rows use its new weights


def test_stacks_are_kept_for_a_bounded_number_of_compositions(residency, monkeypatch):
    """A fleet's batches pass through many adapter compositions: only the most recent keep
    their stacked weights, and an evicted composition is stacked again, correctly."""
    from service.engine import lora

    monkeypatch.setattr(lora, "_MAX_STACK_SETS", 2)
    monkeypatch.setattr(lora.FusedMixedLoRA, "sync_pool", lambda self: False)  # the per-batch stacks
    runner = ModelRunner(residency.model, "cpu")
    alpha, beta = slots(residency, ["alpha", "beta"])
    fused = residency.lora.fused
    mixed = [None, alpha, beta, alpha, beta]
    for composition in ([alpha] * 5, [beta] * 5, mixed, [alpha] * 5):
        steps(runner, composition, n=1)
        assert len(fused.compositions) <= 2
        assert fused.stacked <= set(fused.compositions)
    assert set(fused.compositions) == {(alpha, beta), (alpha,)}  # beta alone was the oldest
    reference = steps(ModelRunner(residency.model, "cpu", fused_lora=False), [beta] * 5, n=1)
    again = steps(runner, [beta] * 5, n=1)  # stacked anew after its eviction
    for a, b in zip(again, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_pool_serves_batches_that_use_half_of_the_loaded_adapters_or_more(tiny, residency):
    """Every row of a pooled batch goes through every loaded adapter, so a batch that uses few
    of many loaded adapters is stacked on its own (fewer weights read); either way the logits
    are PEFT's."""
    for seed, name in enumerate(("gamma", "delta"), start=3):  # four loaded: two idle in a pool
        make_lora_adapter(tiny.base_dir, residency.registry.directory / name, fingerprint=tiny.fingerprint, seed=seed)
    residency.registry.rescan()
    for name in ("gamma", "delta"):
        residency.ensure(name, busy=set())
    runner = ModelRunner(residency.model, "cpu")
    fused = residency.lora.fused
    alpha, beta = slots(residency, ["alpha", "beta"])
    reference = ModelRunner(residency.model, "cpu", fused_lora=False)
    for rows, pooled in (([alpha] * 5, False), ([alpha, beta, None, alpha, beta], True)):
        stacked = set(fused.compositions)
        got = steps(runner, rows, n=1)
        assert (set(fused.compositions) == stacked) == pooled  # one adapter of four: stacked
        for a, b in zip(got, steps(reference, rows, n=1), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
